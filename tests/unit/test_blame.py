"""Blame the cause, not the victim: real torch 2.13 failure output (tests/unit/data/torch/)
replayed through the watch loop's line classifier and the blame, as the launch reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks.lib.blame import find_culprit, key_rank, line_rank, waiting_sign
from tasks.lib.runrecord import Evidence, choose_first_failure, classify_line, is_failure_sign

DATA = Path(__file__).parent / "data" / "torch"
NODE_LINE = re.compile(r"^\[node (\d+)\] (.*)$")
ADDRESSES = {0: "10.236.56.10", 1: "10.236.56.11"}  # the nodes of the captures


def replay(name: str, *, nproc: int = 2, world: int = 4, stop_at: str | None = None
           ) -> tuple[list[Evidence], list[Evidence]]:
    """(failure signs, context lines) as the watch loop sorts them, in arrival order."""
    signs: list[Evidence] = []
    context: list[Evidence] = []
    for at, raw in enumerate((DATA / name).read_text().splitlines()):
        if stop_at and stop_at in raw:
            break
        match = NODE_LINE.match(raw)
        node, line = (int(match.group(1)), match.group(2)) if match else (0, raw)
        evidence = classify_line(line, node, nproc, float(at), False, world)
        if evidence is not None:
            (signs if is_failure_sign(evidence) else context).append(evidence)
    return signs, context


def test_store_keys_name_the_rank_that_never_arrived():
    signs, context = replay("torch-2.13.0_gloo_rank3_frozen_in_init.log")
    # The earliest sign is a waiting rank on node 0: what the launch blamed before.
    assert choose_first_failure(signs).node_rank == 0
    culprit = find_culprit(signs + context, nproc=2, world_size=4, node_addresses=ADDRESSES)
    assert culprit is not None
    assert (culprit.node_rank, culprit.ranks, culprit.basis) == (1, [3], "store keys")
    assert "missing key(s): /default_pg/0//cpu//0/3" in culprit.reason
    assert "ranks 0, 1, 2 failed waiting for it" in culprit.reason
    assert [line.split(":")[0] for line in culprit.consequences] == ["rank 0", "rank 1", "rank 2"]
    assert all("DistStoreError: wait timeout after 60000ms" in c for c in culprit.consequences)


def test_a_rank_that_dies_after_its_peers_failed_is_still_the_cause():
    signs, context = replay("torch-2.13.0_gloo_rank3_died_in_init.log")
    assert choose_first_failure(signs).rank == 1  # a victim on node 0 spoke first
    culprit = find_culprit(signs + context, nproc=2, world_size=4, node_addresses=ADDRESSES)
    assert (culprit.node_rank, culprit.ranks, culprit.basis) == (1, [3], "own failure")
    assert culprit.reason == "rank 3 failed: RuntimeError: injected: rank 3 died during init"
    assert {c.split(":")[0] for c in culprit.consequences} == {"rank 0", "rank 1", "rank 2"}


def test_a_rank_that_fails_in_the_group_is_not_said_to_be_starting():
    """The start-up phase goes into the reason only before the rank joined its peers: a script
    that writes no metrics is still at "group" when it raises at its fifth step."""
    signs, context = replay("torch-2.13.0_gloo_rank3_died_in_init.log")
    reasons = {phase: find_culprit(signs + context, nproc=2, world_size=4,
                                   node_addresses=ADDRESSES, phases={3: phase}).reason
               for phase in ("worker", "store", "group", "step")}
    assert reasons["worker"].startswith("rank 3 (start-up phase worker) failed")
    assert reasons["store"].startswith("rank 3 (start-up phase store) failed")
    assert reasons["group"] == reasons["step"] == (
        "rank 3 failed: RuntimeError: injected: rank 3 died during init")


def test_the_rank_that_raised_is_blamed_not_the_peer_that_aborted_on_the_closed_pair():
    """A user's script through torchrun --tee: its exception line carries two rank marks; the
    rank beside it aborts on gloo's closed pair (SIGABRT, torchrun's "root cause")."""
    signs, context = replay("torch-2.13.0_gloo_own_training_rank2_raised_srun.log")
    assert choose_first_failure(signs).rank == 3  # the signal death the launch took before
    culprit = find_culprit(signs + context, nproc=2, world_size=4, node_addresses=ADDRESSES)
    assert (culprit.node_rank, culprit.ranks, culprit.basis) == (1, [2], "own failure")
    assert culprit.reason == ("rank 2 failed: RuntimeError: own training: rank 2 failed on "
                              "purpose at step 5")


def test_before_the_cause_speaks_the_peer_addresses_point_at_it():
    # What the launch knows when it must decide before rank 3's own error arrives.
    signs, context = replay("torch-2.13.0_gloo_rank3_died_in_init.log",
                            stop_at="train: rank 3 failed")
    culprit = find_culprit(signs + context, nproc=2, world_size=4, node_addresses=ADDRESSES)
    assert (culprit.node_rank, culprit.ranks, culprit.basis) == (1, [3], "peer address")
    # With the ports the start-up scan saw, the rank is named by its socket.
    culprit = find_culprit(signs + context, nproc=2, world_size=4, node_addresses={},
                           rank_ports={3: ["10.236.56.11:31398"], 1: ["10.236.56.10:3484"]})
    assert culprit.ranks == [3] and "10.236.56.11:31398" in culprit.reason


def test_torch_rank_prefix_and_torchrun_report_of_a_victim():
    signs, context = replay("torch-2.13.0_gloo_reset_one_node.log", nproc=4)
    # torchrun's "failed (exitcode: 1) local_rank: 1" is rank 1's exit after it failed waiting.
    assert {(s.kind, s.rank) for s in signs} >= {("rank-waiting", 1), ("rank-exit", 1)}
    culprit = find_culprit(signs + context, nproc=4, world_size=4,
                           node_addresses={0: "127.0.0.1"},
                           rank_ports={3: ["127.0.0.1:36547"], 0: ["127.0.0.1:1"]})
    assert culprit.ranks == [3] and culprit.basis == "peer address"


def test_phases_and_silence_when_no_message_names_anyone():
    timeout = "train: rank {} failed: RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:81] " \
              "Timed out waiting 60000ms for recv operation to complete"
    signs = [classify_line(timeout.format(r), r // 2, 2, float(r), False, 4) for r in (0, 1, 2)]
    assert all(s.kind == "rank-waiting" and s.waits.kind == "collective" for s in signs)
    by_phase = find_culprit(signs, nproc=2, world_size=4, laggards=[3],
                            phases={0: "group", 1: "group", 2: "group", 3: "store"})
    assert by_phase.ranks == [3] and by_phase.basis == "start-up phase"
    assert "(start-up phase store)" in by_phase.reason
    silent = find_culprit(signs, nproc=2, world_size=4)
    assert silent.ranks == [3] and silent.basis == "silent ranks"


def test_own_failures_win_and_signals_first():
    waiting = classify_line("train: rank 0 failed: DistStoreError: wait timeout after 5ms, keys: "
                            "/default_pg/0//cpu//0/1", 0, 2, 1.0, False, 4)
    killed = classify_line("E1201 torch/distributed/elastic/multiprocessing/api.py:882] failed "
                           "(exitcode: -9) local_rank: 1 (pid: 42) of binary: python", 1, 2, 2.0,
                           False, 4)
    culprit = find_culprit([waiting, killed], nproc=2, world_size=4)
    assert (culprit.ranks, culprit.reason) == ([3], "rank 3 killed by signal 9")
    assert culprit.consequences and culprit.consequences[0].startswith("rank 0: ")


@pytest.mark.parametrize("line, kind, ranks, peer", [
    ("torch.distributed.DistStoreError: wait timeout after 60000ms, keys: /default_pg/0//cpu//0/3",
     "store-timeout", (3,), None),
    ("DistStoreError: wait timeout after 1ms, keys: /default_pg/0//cpu//0/1, /default_pg/0//cpu//0/2",
     "store-timeout", (1, 2), None),
    # ProcessGroupNCCL.cpp broadcastUniqueNCCLID: every rank waits for rank 0's id.
    ("DistBackendError: [2] is setting up NCCL communicator and retrieving ncclUniqueId from [0] "
     "via c10d key-value store by key '0', but store->get('0') got error: wait timeout",
     "nccl-id", (0,), None),
    ("DistStoreError: wait timeout after 5ms, keys: /default_pg/0//cuda//0", "store-timeout",
     (0,), None),
    ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
     "[127.0.0.1]:34722: Connection reset by peer.", "peer", (), "127.0.0.1:34722"),
    ("torch.distributed.DistNetworkError: The client socket has timed out after 60000ms while "
     "trying to connect to (10.0.0.1, 29500).", "store-connect", (), "10.0.0.1:29500"),
])
def test_waiting_signs(line, kind, ranks, peer):
    sign = waiting_sign(line, 4)
    assert (sign.kind, sign.ranks, sign.peer) == (kind, ranks, peer)


def test_what_is_not_a_failure_line():
    # c10d's warnings mention timeouts and resets without being a rank's failure.
    warning = ("[W1207 06:30:39.136581915 socket.cpp:494] [c10d] waitForInput: socket "
               "SocketImpl(fd=3) timed out after 60000ms")
    assert classify_line(warning, 0, 2, 0.0, False, 4) is None
    bare = classify_line("torch.distributed.DistStoreError: wait timeout after 5ms, keys: a/1",
                         0, 2, 0.0, False, 4)
    assert bare.rank is None and not is_failure_sign(bare)  # context, not a trigger
    assert line_rank("[rank12]: RuntimeError: x") == 12
    assert key_rank("/default_pg/0//cpu//0/9", 4) is None  # no such rank: no guess
    assert find_culprit([], nproc=2, world_size=4) is None


def _record(nnodes: int = 2, nproc: int = 2):
    from tasks.lib.runrecord import new_record

    record = new_record(run_id="r", run_dir="/x", node_run_dir="/y", output_dir="o",
                        controller={}, flags={}, created_at="t")
    record.plan(master_addr="a", master_port=1, nproc_per_node=nproc,
                hosts=[{"host": f"h{i}"} for i in range(nnodes)], common_env={},
                per_node_env=[{}] * nnodes, torchrun_argv=[], wrapper_argv=None)
    return record


def _findings():
    from tasks.lib.diagnostics import flight_recorder_findings

    entry = lambda seq, state: {"collective_seq_id": seq, "process_group": ["0", "default_pg"],  # noqa: E731
                                "profiling_name": "gloo:all_reduce", "state": state,
                                "input_sizes": [[1024]]}
    ahead = {"entries": [entry(1, "completed"), entry(2, "started")]}
    behind = {"entries": [entry(1, "completed")]}
    return flight_recorder_findings({0: ahead, 1: ahead, 2: behind, 3: ahead})


def test_the_flight_recorder_pins_a_hung_run_and_weak_guesses():
    from tasks.lib.blame import flight_out_of_step, pin_on_flight_recorder

    ranks, line = flight_out_of_step(_findings())
    assert ranks == [2] and "rank(s) [2] never reached gloo:all_reduce #2" in line
    hung = _record()
    hung.hang = {"first_stalled_ranks": [0, 1, 2, 3]}
    pin_on_flight_recorder(hung, _findings(), "hung", "now")
    failure = hung.first_failure
    assert (failure.node_rank, failure.host, failure.ranks, failure.basis) == (
        1, "h1", [2], "flight recorder")
    # Without dumps a hung run is pinned on its progress.
    plain = _record()
    plain.hang = {"first_stalled_ranks": [3]}
    pin_on_flight_recorder(plain, None, "hung", "now")
    assert (plain.first_failure.ranks, plain.first_failure.basis) == ([3], "progress")
    # A guess from silence is replaced; a rank's own failure only gets the line as evidence.
    for basis, expected in (("silent ranks", [2]), ("own failure", [0])):
        failed = _record()
        failed.record_failure(0, reason="x", exit_code=1, at="t", last_lines=[])
        failed.first_failure.ranks, failed.first_failure.basis = [0], basis
        pin_on_flight_recorder(failed, _findings(), "failed", "now")
        assert failed.first_failure.ranks == expected
        assert failed.first_failure.evidence[-1].startswith("flight recorder: group default_pg")
