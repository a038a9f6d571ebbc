"""tasks/lib/runrecord.py: run.json building, round trip, failure evidence, collection listing."""
from __future__ import annotations

import json
import subprocess

import pytest

from tasks.lib.runrecord import (
    LAST_LINES,
    SCHEMA_VERSION,
    Evidence,
    RunRecord,
    RunRecordError,
    choose_first_failure,
    classify_line,
    exit_reason,
    failure_reason,
    global_ranks,
    headline_metrics,
    list_files_command,
    new_record,
    parse_file_list,
    parse_progress,
    refusal_line,
    write_json_atomic,
)


def planned_record() -> RunRecord:
    record = new_record(run_id="multinode_28ch_256th_20250101_000000", run_dir="/c/experiments/r",
                        node_run_dir="/srv/gemm/experiments/r", output_dir="256thread_28channels",
                        controller={"host": "ctl", "user": "me", "commit": "abc"},
                        flags={"channels": 28, "threads": 256}, created_at="2025-01-01T00:00:00Z")
    record.plan(master_addr="10.0.0.1", master_port=29500, nproc_per_node=2,
                hosts=[{"host": "n0", "ifname": "eth0", "commit": "abc", "gpus": 0, "bogus": 1},
                       {"host": "root@n1:2222", "ifname": "ens5", "commit": "abc"}],
                common_env={"NCCL_MAX_NCHANNELS": "28"},
                per_node_env=[{"NCCL_SOCKET_IFNAME": "eth0"}, {"NCCL_SOCKET_IFNAME": "ens5"}],
                torchrun_argv=["torchrun", "-m", "train"], wrapper_argv=None)
    return record


def test_plan_places_ranks_node_by_node():
    record = planned_record()
    assert (record.nnodes, record.nproc_per_node, record.world_size) == (2, 2, 4)
    assert [n.ranks for n in record.nodes] == [[0, 1], [2, 3]]
    assert record.nodes[1].host == "root@n1:2222" and record.nodes[1].ifname == "ens5"
    assert record.env["per_node"][1] == {"NCCL_SOCKET_IFNAME": "ens5"}
    assert global_ranks(3, 8) == list(range(24, 32))


def test_lifecycle_and_json_round_trip():
    record = planned_record()
    record.mark_started(0, 111, "t1")
    record.mark_started(1, 222, "t2")
    assert record.status == "running" and record.started_at == "t1"
    record.mark_node_ended(1, state="exited", exit_code=1, at="t3")
    record.mark_node_ended(1, state="killed", exit_code=137, at="t4")  # the first ending stays
    assert (record.nodes[1].state, record.nodes[1].exit_code) == ("exited", 1)
    lines = [f"line {i}" for i in range(50)]
    assert record.record_failure(1, reason="exited 1", exit_code=1, at="t3", last_lines=lines)
    assert not record.record_failure(0, reason="later", exit_code=143, at="t5", last_lines=[])
    record.finish(status="failed", exit_status=1, at="t6")

    data = json.loads(record.to_json())
    assert data["schema"] == SCHEMA_VERSION
    assert data["first_failure"]["node_rank"] == 1 and data["first_failure"]["ranks"] == [2, 3]
    assert data["first_failure"]["last_lines"] == lines[-LAST_LINES:]
    assert data["nodes"][0]["launcher_pid"] == 111
    again = RunRecord.from_json(record.to_json())
    assert again == record


def test_from_json_refuses_other_schemas():
    with pytest.raises(RunRecordError, match="schema"):
        RunRecord.from_dict({"schema": 99})
    with pytest.raises(RunRecordError, match="not JSON"):
        RunRecord.from_json("{")


def test_exit_reason():
    assert exit_reason("exited", 1) == "exited 1"
    assert exit_reason("killed", 137) == "exited 137 (signal 9)"
    assert "stopped answering" in exit_reason("lost", None)
    assert exit_reason("killed", None) == "launcher killed without an exit code"


def test_progress():
    assert parse_progress("step 12/100 | iter 3.1 ms") == (12, 100)
    assert parse_progress("[node 1] step 3/20 | ...") == (3, 20)
    assert parse_progress("warmup step") is None
    # The same pattern the hang watchdog reads: rank prefixes do not hide the fraction.
    assert parse_progress("[rank 2] step 7/10 | iter 1 ms") == (7, 10)
    assert parse_progress("step 7 of 10") is None


def test_write_json_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old, not JSON")
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"b": 1, "a": [1, 2]}
    assert target.read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_headline_takes_medians():
    summary = {"status": "completed", "world_size": 4, "steps_completed": 20, "steps_per_s": 5.0,
               "iter_ms": {"median": 2.5, "p10": 2.0}, "stream_busbw_gbps": None}
    headline = headline_metrics(summary)
    assert headline["iter_ms"] == 2.5 and headline["stream_busbw_gbps"] is None
    assert headline["kernel_busbw_gbps"] is None
    assert headline["status"] == "completed" and headline["steps_per_s"] == 5.0


# -- failure evidence ------------------------------------------------------------------------------

AGENT_FAILED = ("E1201 12:00:00.123 torch/distributed/elastic/multiprocessing/api.py:882] failed "
                "(exitcode: -9) local_rank: 1 (pid: 4242) of binary: /usr/bin/python3")
AGENT_CLOSING = ("W1201 12:00:00.100 torch/distributed/elastic/multiprocessing/api.py:900] Sending "
                 "process 4243 closing signal SIGTERM")


def test_classify_torchrun_and_train_lines():
    killed = classify_line(AGENT_FAILED, node_rank=1, nproc=2, at=1.0, stopping_from_outside=False)
    assert (killed.kind, killed.rank, killed.exit_code) == ("rank-signal", 3, -9)
    exited = classify_line(AGENT_FAILED.replace("-9", "1"), 1, 2, 1.0, False)
    assert exited.kind == "rank-exit"
    closing = classify_line(AGENT_CLOSING, 1, 2, 1.0, False)
    assert closing.kind == "agent-stopping" and closing.rank is None
    error = classify_line("train: rank 0 failed: RuntimeError: CUDA error: out of memory",
                          0, 2, 1.0, False)
    assert (error.kind, error.rank) == ("rank-error", 0)
    # A rank whose error says it lost its peer failed waiting: a consequence (tasks/lib/blame.py).
    victim = classify_line("train: rank 0 failed: RuntimeError: Connection closed by peer",
                           0, 2, 1.0, False)
    assert (victim.kind, victim.rank, victim.waits.kind) == ("rank-waiting", 0, "peer")
    assert classify_line("step 3/20 | iter 1 ms", 0, 2, 1.0, False) is None
    # After "Received SIGTERM death signal" the node was told to stop: not a failure of its own.
    assert classify_line(AGENT_CLOSING, 1, 2, 1.0, stopping_from_outside=True) is None


def test_signal_death_is_the_culprit_even_when_victims_report_first():
    victim = Evidence(0, 1.00, "rank-error", 0, None, "train: rank 0 failed: connection closed")
    agent = Evidence(1, 1.05, "agent-stopping", None, None, AGENT_CLOSING)
    culprit = Evidence(1, 1.30, "rank-signal", 3, -9, AGENT_FAILED)
    assert choose_first_failure([victim, agent, culprit]) is culprit
    assert choose_first_failure([agent, victim]) is victim  # no signal death: the earliest


def test_the_agents_closing_line_gives_way_to_the_rank_it_names_next():
    """A program of the user's own prints no `train: rank N failed`: torchrun's agent says it is
    closing the node's ranks first, and which local rank exited a moment later (0.43 s on the
    simulated cluster). The culprit is that rank, not a rank-less "closing" line."""
    agent = Evidence(1, 1.00, "agent-stopping", None, None, AGENT_CLOSING)
    exited = Evidence(1, 1.43, "rank-exit", 3, 1, AGENT_FAILED.replace("-9", "1"))
    other_node = Evidence(0, 1.20, "agent-stopping", None, None, AGENT_CLOSING)
    assert choose_first_failure([agent, other_node, exited]) is exited
    assert choose_first_failure([agent, other_node]) is agent
    victim = Evidence(0, 0.90, "rank-error", 0, None, "train: rank 0 failed: connection closed")
    assert choose_first_failure([victim, agent, exited]) is victim


def test_failure_reason_names_the_rank_when_known():
    assert failure_reason(Evidence(1, 0.0, "rank-signal", 3, -9, "")) == "rank 3 killed by signal 9"
    assert failure_reason(Evidence(0, 0.0, "rank-error", 1, None, "")) == "rank 1 failed"
    assert failure_reason(Evidence(1, 0.0, "node-exit", None, 1, "exited 1")) == "exited 1"
    assert "torchrun is stopping" in failure_reason(Evidence(1, 0.0, "agent-stopping", None,
                                                             None, "Sending process"))


def test_parse_file_list_keeps_regular_files_with_plain_relative_names():
    text = "f 12 node_1_output.log\0f 3 torch_profiler/a b.json\0f 0  lead space\0"
    listing = parse_file_list(text)
    assert listing.files == [(12, "node_1_output.log"), (3, "torch_profiler/a b.json"),
                             (0, " lead space")]
    assert listing.refused == []


@pytest.mark.parametrize(("entry", "why"), [
    ("f 5 ../../escape", "'..' component"),
    ("f 5 sub/../../escape", "'..' component"),
    ("f 5 /etc/cron.d/evil", "absolute path"),
    ("f 5 a\nf 9 ../x", "control character in the name"),
    ("f 5 tab\there", "control character in the name"),
    ("f 5 esc\x1b[2Jx", "control character in the name"),
    ("f 5 c1\x9bx", "control character in the name"),
    ("f 5 bad\ufffdutf8", "not valid UTF-8"),
    ("f 5 a//b", "not a plain relative path (empty or '.' component)"),
    ("f 5 ./a", "not a plain relative path (empty or '.' component)"),
    ("f 5 dir/", "not a plain relative path (empty or '.' component)"),
    ("l 11 passwd", "a symlink"),
    ("p 0 fifo", "not a regular file (type p)"),
    ("f x name", "not a listing entry"),
    ("f 12", "not a listing entry"),
    ("garbage from a login script", "not a listing entry"),
])
def test_parse_file_list_refuses_what_a_hostile_node_may_send(entry, why):
    listing = parse_file_list(f"f 1 good\0{entry}\0f 2 also/good\0")
    assert listing.files == [(1, "good"), (2, "also/good")]
    assert len(listing.refused) == 1 and listing.refused[0][1] == why
    shown = listing.refused[0][0]
    assert shown.isprintable() and "\n" not in shown and "\t" not in shown


def test_refusal_line_is_one_line_and_bounded():
    refused = parse_file_list("".join(f"l 1 link{i}\0" for i in range(8))
                              + "f 1 a\nb\0").refused
    line = refusal_line(refused)
    assert "\n" not in line and line.startswith("refused 9 entries")
    assert "'link0' (a symlink)" in line and "and 4 more" in line
    assert refusal_line(refused[:1]).startswith("refused 1 entry of")


def test_list_files_fails_on_a_missing_directory(tmp_path):
    """A node whose output directory is missing is a failed collection, not "0 files"."""
    missing = tmp_path / "no such dir"
    result = subprocess.run(["bash", "-c", list_files_command(str(missing))],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode != 0 and result.stdout == ""
    assert f"no output directory {missing}" in result.stderr
    (tmp_path / "out dir" / "sub").mkdir(parents=True)
    (tmp_path / "out dir" / "sub" / "a b.json").write_text("12345")
    result = subprocess.run(["bash", "-c", list_files_command(str(tmp_path / "out dir"))],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert parse_file_list(result.stdout).files == [(5, "sub/a b.json")]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(["bash", "-c", list_files_command(str(empty))],
                            capture_output=True, text=True, timeout=10)
    assert (result.returncode, result.stdout) == (0, "")


def test_list_files_of_planted_names_lists_them_as_entries_to_refuse(tmp_path):
    """Real find output for the names a hostile node plants: each is one entry, none can pose
    as another, and only the plain regular file is kept."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "ok.txt").write_text("fine")
    (out / "sub" / "f").write_text("deep")
    # Under the old "size<TAB>path<NEWLINE>" listing these read as "../escape" and "/abs".
    (out / "q\n7\t..").mkdir()
    (out / "q\n7\t.." / "escape").write_text("escaped")
    (out / "q\n4 \t").mkdir()
    (out / "q\n4 \t" / "abs").write_text("abs!")
    (out / "tab\tname").write_text("tab")
    (out / "passwd").symlink_to("/etc/passwd")
    (out / "etc").symlink_to("/etc")
    result = subprocess.run(["bash", "-c", list_files_command(str(out))], capture_output=True,
                            text=True, timeout=10)
    listing = parse_file_list(result.stdout)
    assert sorted(listing.files) == [(4, "ok.txt"), (4, "sub/f")]
    assert sorted(why for _, why in listing.refused) == [
        "a symlink", "a symlink", "control character in the name",
        "control character in the name", "control character in the name"]


def test_phase_failure_names_the_phase_and_every_failing_host():
    record = planned_record()
    assert record.record_phase_failure("push", {1: "No space left on device"}, at="t")
    failure = record.first_failure
    assert failure is not None
    assert (failure.node_rank, failure.host) == (1, "root@n1:2222")
    assert failure.reason == "push failed on node 1 (root@n1:2222)"
    assert failure.last_lines == ["node 1 (root@n1:2222): No space left on device"]
    assert not record.record_phase_failure("start", {0: "later"}, at="t")  # the first one stays
    record.finish(status="failed", exit_status=1, at="t2")
    data = json.loads(record.to_json())
    assert data["status"] == "failed" and data["first_failure"]["reason"].startswith("push")

    record = planned_record()
    record.record_phase_failure("start", {}, at="t", detail="interrupted (Ctrl-C)")
    assert record.first_failure.reason == "start failed: interrupted (Ctrl-C)"  # type: ignore[union-attr]


def test_collect_error_round_trips():
    record = planned_record()
    record.node(1).collect_error = "no output directory /x"
    assert RunRecord.from_json(record.to_json()).node(1).collect_error == "no output directory /x"
