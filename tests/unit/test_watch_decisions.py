"""The watch loop's turn-by-turn decision (tasks.run.watch.next_move), taken from one snapshot."""
from tasks.run.watch import FAILURE_SETTLE_S, next_move


def test_a_fresh_failure_waits_for_the_culprit_while_nodes_still_run():
    assert next_move(True, False, False, first_seen=10.0, now=10.5) == "wait"


def test_a_settled_failure_stops_every_node():
    assert next_move(True, False, False, first_seen=10.0,
                     now=10.0 + FAILURE_SETTLE_S) == "fail-fast"


def test_every_node_ended_with_an_unsettled_failure_still_names_a_culprit():
    # The heartbeat ended the last node right after the failure was first seen: the run must
    # not end without "node N failed first" (this ended runs silently before).
    assert next_move(True, True, False, first_seen=10.0, now=10.1) == "fail-fast"


def test_after_fail_fast_the_run_ends_once_every_node_ended():
    assert next_move(True, False, True, first_seen=10.0, now=30.0) == "wait"
    assert next_move(True, True, True, first_seen=10.0, now=30.0) == "end"


def test_a_clean_run_ends_when_every_node_ended():
    assert next_move(False, False, False, first_seen=None, now=1.0) == "wait"
    assert next_move(False, True, False, first_seen=None, now=1.0) == "end"
