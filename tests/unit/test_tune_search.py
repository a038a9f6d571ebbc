"""fab tune's search (coordinate descent over ordered axes, successive halving of repeats) on
synthetic response surfaces with a known optimum and noise, and on a recorded sweep table: it
finds the grid's best set within noise with at most 40 % of the grid's runs on a 6 x 4 x 2 space,
and its decision equals the full grid's. scripts/bench_tune_search.py gives the success rate over
many more seeds (docs/PERFORMANCE.md)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.lib import report as rep
from tasks.sweeping.search import Point, Search
from tests.unit.tune_surfaces import (BOUND, SURFACES, grid_decision, label, make_table, outcome,
                                      random_surface, tune)

DATA = Path(__file__).parent / "data" / "sweep_tables"


@pytest.mark.parametrize("name", sorted(SURFACES))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_search_finds_the_grids_best_within_noise_in_40_percent_of_its_runs(name: str, seed: int) -> None:
    surface, optimum = SURFACES[name]
    table = make_table(surface, seed=seed)
    grid = grid_decision(table)
    search = tune(table)
    found = search.decide()

    assert search.runs_done <= BOUND, (name, seed, search.runs_done, search.messages)
    if optimum is not None:
        assert grid.winner == label(optimum), (grid.status, grid.within_noise)
        assert found.winner == grid.winner, (found.status, found.within_noise, search.messages)
    else:
        # No false winner, and what the tune leads with is as good as the best, in truth.
        assert grid.winner is None and found.winner is None
        leader = tuple(int(v) for v in found.leader.split())
        assert surface(leader) <= min(surface(p) for p in table) * 1.01


def test_on_random_surfaces_the_search_reaches_the_grids_decision_for_nearly_every_seed() -> None:
    """25 unimodal surfaces, optimum anywhere, 3 to 9 % per step away from it, a channels x
    threads twist: every search within the bound, at most one seed off the grid's decision (the
    bench measures 100 seeds a family)."""
    results = [outcome(make_table(random_surface(seed)[0], seed=seed)) for seed in range(25)]
    assert all(r.within_bound for r in results), [r.runs for r in results]
    failed = [(seed, r.grid.status, r.grid.winner, r.found.status, r.found.leader)
              for seed, r in enumerate(results) if not r.success]
    assert len(failed) <= 1, failed
    # The surfaces do have a grid winner mostly: the comparison is not between two "no winner"s.
    assert sum(r.grid.winner is not None for r in results) >= 20


def test_a_point_dropped_on_one_unlucky_run_does_not_leave_the_leader_a_false_winner() -> None:
    """Random surface seed 9: the grid (3 runs each) cannot tell 2 1 1 from 3 1 1; the neighbour
    3 1 1 drew a slow first run and was dropped early. Without the final runs for the leader's
    neighbours the search named 2 1 1 the winner on that one run."""
    table = make_table(random_surface(9)[0], seed=9)
    result = outcome(table)
    assert result.grid.status == rep.WITHIN_NOISE and set(result.grid.within_noise[:2]) == {"2 1 1", "3 1 1"}
    assert result.success and result.found.status == rep.WITHIN_NOISE, result.found.status


def test_the_search_prints_each_round_and_stops() -> None:
    search = tune(make_table(SURFACES["bowl"][0], seed=5))
    assert search.done and search.next_batch() == []
    assert search.messages[0].startswith("pass 1, axis 1 line at 1 0: 6 point(s) with 1 run(s) each; leader ")
    assert any(m.startswith("pass 1: axis 1 moves to 4") for m in search.messages)
    # The second pass walks lines measured in the first: nothing runs, nothing is printed.
    assert not any(m.startswith("pass 2") for m in search.messages), search.messages


def recorded_table(path: Path) -> tuple[tuple[int, ...], dict[Point, list], Callable[[Point], str],
                                        Callable[[Point], str], dict]:
    """A table recorded from a real sweep by scripts/record_sweep_table.py: sizes, runs, the
    report's name and interval seed of each point (its label and selector), its decision."""
    document = json.loads(path.read_text())
    axes = document["axes"]
    sizes = tuple(len(a["values"]) for a in axes)
    table = {}
    for point in document["points"]:
        index = tuple(axis["values"].index(str(point["values"][axis["name"]])) for axis in axes)
        table[index] = [[(int(s), float(v)) for s, v in run] for run in point["runs"]]

    def value(p: Point, axis: int) -> str:
        return axes[axis]["values"][p[axis]]

    def name(p: Point) -> str:
        return " ".join([f"{value(p, 0)}ch × {value(p, 1)}th",
                         *(f"{axes[a]['name']}={value(p, a)}" for a in range(2, len(axes)))])

    def selector(p: Point) -> str:
        return ",".join([f"{value(p, 0)}x{value(p, 1)}", *(f"{axes[a]['name']}={value(p, a)}" for a in range(2, len(axes)))])

    return sizes, table, name, selector, document["decision"]


def test_on_a_recorded_sweep_table_the_search_reaches_the_grids_decision() -> None:
    """cpu_gloo_6x4x2_delays.json: `fab sweep -c 2,4,8,16,32,64 -t 64,128,256,512 --axis
    NCCL_PROTO=Simple,LL128 --repeat 3` on the embedded default (2 gloo ranks), rank 0 delayed
    10 + 4 (i - 3)^2 + 6 |j - 2| + 10 k ms per step (i, j, k: the value's index on each axis; the
    rest is real noise of a loaded 2-core machine). The report of the full grid (recorded with the
    table) named 16ch x 256th Simple best."""
    tables = sorted(DATA.glob("*.json"))
    assert tables, "no recorded sweep table"
    for path in tables:
        sizes, table, name, selector, recorded = recorded_table(path)
        grid = grid_decision(table, name, selector)
        # The replay's grid decision is the report's, so the comparison below is with the real one.
        assert (grid.status, grid.winner, grid.within_noise) == (
            recorded["status"], recorded["winner"], recorded["within_noise"]), path.name
        repeat = min(len(runs) for runs in table.values())   # the search replays at most these
        search = tune(table, sizes, max_runs=repeat, point_name=name, seed_name=selector)
        found = search.decide()
        assert (found.status, found.winner) == (grid.status, grid.winner), (path.name, search.messages)
        assert found.leader in grid.within_noise, (path.name, found.leader, grid.within_noise)
        if len(table) >= 48:   # the bound is the issue's, for spaces of 6 x 4 x 2 and up
            assert search.runs_done <= 0.40 * len(table) * repeat, (path.name, search.runs_done)
    # At least one table has a point made to matter: the grid names a winner there.
    assert any(json.loads(path.read_text())["decision"]["status"] == rep.WINNER for path in tables)


# -- fab tune's plumbing around the search -------------------------------------------------------

def test_budget_runs_or_time_and_requests_of_repeated_points() -> None:
    from invoke.exceptions import Exit

    from tasks.tune import budget_stop, parse_budget, requests_of

    assert parse_budget("40") == (40, None) and parse_budget("30m") == (None, 1800.0)
    assert parse_budget("1.5h") == (None, 5400.0) and parse_budget(None) == (None, None)
    with pytest.raises(Exit, match="give a number of runs"):
        parse_budget("soon")
    assert budget_stop(10, None, 8, 3, 0.0) == "--budget 10 runs reached (8 run, the next round needs 3)"
    assert budget_stop(10, None, 8, 2, 0.0) is None
    search = Search((2,))
    search.observe((0,), [(0, 1.0)])
    assert requests_of(search, [(0,), (0,), (1,)]) == [((0,), 1), ((0,), 2), ((1,), 0)]


def test_fab_tune_takes_the_sweeps_axes_and_launch_flags() -> None:
    from tasks.sweep import sweep
    from tasks.tune import TUNE_HELP, tune

    def flags(task) -> set[str]:
        return set(task.argspec(task.body).parameters)

    assert flags(sweep) - flags(tune) == {"repeat", "seed", "no_report"}
    assert flags(tune) - flags(sweep) == {"budget", "max_runs", "export", "export_preset", "pick"}
    assert set(TUNE_HELP) == flags(tune)


def test_the_search_axes_map_to_the_sweeps_configs_by_value_and_a_resume_keeps_the_grid(tmp_path: Path) -> None:
    from tasks.lib import sweep as sw
    from tasks.sweeping.runner import FLAG_DEFAULTS
    from tasks.sweeping.plan import plan_sweep
    from tasks.tune import grid_index

    plan = plan_sweep(dict(FLAG_DEFAULTS), "4,8,16", "256,512", None, axis=["NCCL_PROTO=Simple,LL128"])
    sizes, config_of, labels, names = grid_index(plan)
    assert sizes == [3, 2, 2] and names == ["channels", "threads", "NCCL_PROTO"]
    for (c, t, proto), index in config_of.items():
        point = plan.points[index]
        assert (point.channels, point.threads, dict(point.settings)["NCCL_PROTO"]) == (
            [4, 8, 16][c], [256, 512][t], ["Simple", "LL128"][proto])
    assert labels[0] == ["4ch", "8ch", "16ch"] and labels[2] == ["NCCL_PROTO=Simple", "NCCL_PROTO=LL128"]
    # --resume without the grid flags: the grid comes from sweep.json.
    document = sw.new_sweep(sweep_id="sweep_x", channels=plan.channels, threads=plan.threads, axes=plan.axes,
                            repeat=1, seed=0, pools=True, kind="tune", launch_flags=dict(FLAG_DEFAULTS),
                            hosts=["local"], fail_fast=False, controller={}, created_at="now")
    (tmp_path / "sweep_x").mkdir()
    (tmp_path / "sweep_x" / "sweep.json").write_text(json.dumps(document))
    resumed = plan_sweep(dict(FLAG_DEFAULTS), None, None, str(tmp_path / "sweep_x"))
    assert grid_index(resumed)[:2] == (sizes, config_of)


def test_a_point_whose_run_fails_is_out_of_the_search_and_never_chosen() -> None:
    """The bowl's optimum fails its first run: the search goes on without it and names no point
    it did not measure; the failed point is never asked for again."""
    surface, optimum = SURFACES["bowl"]
    table = make_table(surface, seed=4)
    search = Search((6, 4, 2), labels=[[str(i) for i in range(n)] for n in (6, 4, 2)])
    asked = []
    while batch := search.next_batch():
        for point in batch:
            asked.append(point)
            if point == optimum:
                search.fail(point)
            else:
                search.observe(point, table[point][len(search.runs.get(point, []))])
    assert asked.count(optimum) == 1
    found = search.decide()
    assert found.leader != label(optimum) and label(optimum) in found.excluded
    assert f"{label(optimum)}: a run did not complete; out of the search" in search.messages
