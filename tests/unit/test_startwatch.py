"""The start-up watch: phases read from a node's scan, and the rules that call a start-up stuck
(clock injected). The node scan itself runs for real in test_startup_scan.py; on the simulated
cluster in tests/cluster/test_startup.py."""

from __future__ import annotations

import pytest

from tasks.lib.startwatch import (
    NodePhases,
    ProcessView,
    StartupWatch,
    node_phase,
    parse_node_phases,
    phase_index,
    rank_phase,
)


def node(index: int, *, torchrun: str | None = "established", ranks: dict | None = None,
         progress: dict | None = None, agent_state: str = "S") -> NodePhases:
    agents = () if torchrun is None else (ProcessView(100 + index, agent_state, torchrun),)
    return NodePhases(index, "running", agents, ranks or {}, progress or {})


def rank(state: str = "S", store: str | None = None, peers: int = 0,
         ports: tuple[str, ...] = ()) -> ProcessView:
    return ProcessView(1000, state, store, peers, 0, ports)


def watch(**kwargs) -> StartupWatch:
    return StartupWatch(nnodes=2, nproc=2, started_at=0.0, **kwargs)


def test_phases_from_processes_and_sockets():
    assert node_phase(node(0, torchrun=None)) == phase_index("launcher")
    assert node_phase(node(0, torchrun="syn_sent")) == phase_index("torchrun")
    assert node_phase(node(0, torchrun="listen")) == phase_index("rendezvous")
    scanned = node(1, ranks={2: rank(), 3: rank(store="established", peers=3)}, progress={3: 1})
    assert rank_phase(scanned, 2) == phase_index("worker")
    assert rank_phase(scanned, 3) == phase_index("step")
    assert rank_phase(node(1, ranks={2: rank(store="established")}), 2) == phase_index("store")
    assert rank_phase(node(1, ranks={2: rank(store="syn_sent")}), 2) == phase_index("worker")


def test_a_node_report_moves_only_its_own_ranks():
    data = {"registry": [{"state": "running"}],
            "processes": [{"role": "torchrun", "pid": 7, "state": "S", "store": "established"},
                          {"role": "rank", "rank": 2, "pid": 8, "state": "T", "store": None,
                           "peers": 0, "ports": ["10.0.0.2:4000"]},
                          {"role": "rank", "rank": 0, "pid": 9, "state": "R",
                           "store": "established", "peers": 3},          # node 0's rank
                          {"role": "rank", "rank": "3", "pid": 10, "state": "S"},  # not an int
                          {"role": "rank", "rank": 3, "pid": -1, "state": "S"},    # bad pid
                          "garbage", {"role": "rank", "rank": 3, "pid": 11, "state": "long"}],
            "progress": {"2": {"lines": 4}, "0": {"lines": 9}, "x": {"lines": 1},
                         "3": {"lines": "many"}}}
    parsed = parse_node_phases(data, 1, [2, 3])
    assert parsed.launcher == "running"
    assert [p.pid for p in parsed.torchrun] == [7]
    assert set(parsed.ranks) == {2} and parsed.ranks[2].state == "T"
    assert parsed.ranks[2].ports == ("10.0.0.2:4000",)
    assert parsed.progress == {2: 4}
    assert parse_node_phases({"processes": "nope", "progress": []}, 0, [0]).ranks == {}


def test_a_stopped_rank_is_named_after_a_few_seconds_with_its_phase():
    w = watch()
    w.observe(node(0, torchrun="listen", ranks={0: rank(store="established"),
                                                1: rank(store="established")}), 5.0)
    w.observe(node(1, ranks={2: rank(store="established"), 3: rank("T")}), 5.0)
    assert w.check(6.0) is None
    w.observe(node(1, ranks={2: rank(store="established"), 3: rank("T")}), 8.0)
    assert w.check(8.5) is None  # stopped since 5.0: 3.5 s
    stall = w.check(9.1)
    assert stall is not None and stall.rule == "stopped"
    assert (stall.ranks, stall.nodes, stall.phase, stall.missing) == ((3,), (1,), "worker", "store")
    assert "state T (stopped)" in stall.detail
    assert stall.headline().startswith("rank 3 (node 1) stuck in start-up phase 'worker' "
                                       "(rank process started), never reached 'store'")
    assert w.check(100.0) is stall  # fires once


def test_a_rank_that_runs_again_is_not_stopped():
    w = watch()
    w.observe(node(1, ranks={2: rank(), 3: rank("T")}), 1.0)
    w.observe(node(1, ranks={2: rank(), 3: rank("R")}), 4.0)
    w.observe(node(1, ranks={2: rank(), 3: rank("T")}), 6.0)
    assert w.check(9.0) is None  # stopped again only since 6.0


def test_a_stopped_torchrun_stops_its_nodes_ranks():
    w = watch()
    w.observe(node(0, torchrun="listen"), 1.0)
    w.observe(node(1, torchrun=None), 1.0)
    w.observe(node(1, torchrun="syn_sent", agent_state="T"), 2.0)
    stall = w.check(6.5)
    assert stall.rule == "stopped" and stall.ranks == (2, 3) and stall.phase == "torchrun"
    assert "torchrun is stopped" in stall.detail


def test_a_rank_behind_the_others_is_named_once_the_phase_limit_passed():
    w = watch(hang_timeout_s=240.0)
    both = {0: rank(store="established"), 1: rank(store="established")}
    w.observe(node(0, torchrun="listen", ranks=both), 10.0)
    w.observe(node(1, ranks={2: rank(store="established"), 3: rank()}), 12.0)
    assert w.laggards() == [3]
    assert w.check(69.0) is None   # 'store' reached by rank 0 at 10.0; limit 60 s
    stall = w.check(70.5)
    assert stall.rule == "behind" and stall.ranks == (3,) and stall.missing == "store"
    assert "rank 0 (node 0) reached 'store' 60 s before (limit 60 s)" in stall.detail
    assert stall.phases == {0: "store", 1: "store", 2: "store", 3: "worker"}


def test_limits_where_peers_wait_in_the_group_timeout_are_capped_by_the_hang_timeout():
    w = watch(hang_timeout_s=48.0)  # cpu_tiny: distributed.timeout_s 60 -> hang timeout 48 s
    assert w.limit(w.behind_s, "store") == 24.0
    assert w.limit(w.behind_s, "rendezvous") == 60.0  # agents wait on torchrun's own timeout
    assert watch(hang_timeout_s=4.0).limit(w.behind_s, "store") == 10.0  # never below 10 s
    both = {0: rank(store="established"), 1: rank(store="established")}
    w.observe(node(0, torchrun="listen", ranks=both), 10.0)
    w.observe(node(1, ranks={2: rank(store="established"), 3: rank()}), 10.0)
    assert w.check(33.0) is None and w.check(34.5).ranks == (3,)


def test_a_node_whose_torchrun_never_reaches_the_store_is_named_with_its_socket_state():
    w = watch()
    w.observe(node(0, torchrun="listen"), 3.0)
    w.observe(node(1, torchrun="syn_sent"), 3.0)
    stall = w.check(64.0)
    assert stall.rule == "behind" and stall.nodes == (1,) and stall.ranks == (2, 3)
    assert (stall.phase, stall.missing) == ("torchrun", "rendezvous")
    assert "node 1's torchrun has no answer from the master port (its connection is SYN_SENT" \
        in stall.detail


def test_everyone_stuck_alike_is_a_stall_after_the_phase_limit():
    w = watch()
    w.observe(node(0, torchrun="listen", ranks={0: rank(), 1: rank()}), 5.0)
    w.observe(node(1, ranks={2: rank(), 3: rank()}), 5.0)
    assert w.check(304.0) is None
    stall = w.check(305.5)
    assert stall.rule == "stalled" and stall.ranks == (0, 1, 2, 3) and stall.missing == "store"
    # Connected to its peers: the step watchdog's turn, the start-up watch stays quiet.
    w2 = watch()
    group = {0: rank(store="established", peers=3), 1: rank(store="established", peers=3)}
    w2.observe(node(0, torchrun="listen", ranks=group), 5.0)
    w2.observe(node(1, ranks={2: rank(store="established", peers=3),
                              3: rank(store="established", peers=3)}), 5.0)
    assert w2.done and w2.check(10_000.0) is None


def test_one_step_anywhere_ends_the_start_up_watch():
    w = watch()
    w.observe(node(0, torchrun="listen", ranks={0: rank()}, progress={0: 1}), 5.0)
    assert w.done and w.check(1000.0) is None


def test_phases_only_move_forward_and_ports_are_kept():
    w = watch()
    w.observe(node(1, ranks={2: rank(store="established", peers=1, ports=("10.0.0.2:5000",))}),
              5.0)
    w.observe(node(1, ranks={}), 7.0)  # the process is gone: its phase stays what it reached
    assert w.phases()[2] == "group"
    assert w.rank_ports() == {2: ["10.0.0.2:5000"]}
    assert w.ranks[2].reached_at[phase_index("worker")] == 5.0


@pytest.mark.parametrize("bad", [None, 0, -3])
def test_without_a_hang_timeout_the_limits_are_the_phases_own(bad):
    w = watch(hang_timeout_s=bad)
    assert w.limit(w.behind_s, "store") == 60.0
