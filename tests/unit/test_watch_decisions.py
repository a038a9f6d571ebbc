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


def test_only_waiting_ranks_so_far_give_the_cause_longer_to_show():
    from tasks.run.watch import CONSEQUENCE_SETTLE_S

    assert CONSEQUENCE_SETTLE_S > FAILURE_SETTLE_S
    later = 10.0 + FAILURE_SETTLE_S + 0.5
    assert next_move(True, False, False, 10.0, later, CONSEQUENCE_SETTLE_S) == "wait"
    assert next_move(True, False, False, 10.0, 10.0 + CONSEQUENCE_SETTLE_S,
                     CONSEQUENCE_SETTLE_S) == "fail-fast"
    assert next_move(True, True, False, 10.0, 10.1, CONSEQUENCE_SETTLE_S) == "fail-fast"
