"""The sweep as an experiment design: --axis knobs and their checks, --repeat rounds in a shuffled
order that never runs a point twice in a row, which points share a rank pool, resume."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.lib import design
from tasks.lib import sweep as sw
from tasks.lib.knobs import Axis, KnobError, effective_mismatch, parse_axes
from tasks.lib.runspec import RESERVED_ENV
from tasks.sweeping.plan import plan_sweep
from tasks.sweeping.runner import FLAG_DEFAULTS, launch_flags_for, launch_flags_record, write_sweep


def axes(*items: str) -> list[Axis]:
    return parse_axes(list(items), reserved=RESERVED_ENV)[0]


# -- knobs ----------------------------------------------------------------------------------------

def test_algorithm_and_protocol_names_are_nccl_and_rccl_own_any_case() -> None:
    # NCCL's ncclAlgoStr / ncclProtoStr (NVIDIA/nccl v2.23+; ROCm/rccl src/include/nccl_common.h
    # has the same 7 algorithms and 3 protocols), compared with strcasecmp.
    parsed = axes("NCCL_PROTO=Simple,LL128,ll,^LL128", "NCCL_ALGO=Ring,tree,NVLSTree,PAT,CollNetDirect,"
                  "allreduce:tree;broadcast:ring")
    assert parsed == [Axis("NCCL_PROTO", ("Simple", "LL128", "ll", "^LL128")),
                      Axis("NCCL_ALGO", ("Ring", "tree", "NVLSTree", "PAT", "CollNetDirect",
                                         "allreduce:tree;broadcast:ring"))]


@pytest.mark.parametrize("item, message", [
    ("NCCL_PROTO=Simpel", "'Simpel' is not a NCCL protocol"),
    ("NCCL_ALGO=Ring,Rnig", "'Rnig' is not a NCCL algorithm"),
    ("NCCL_ALGO=allgather:ring;tree", "every entry but the first needs a collective prefix"),
    ("NCCL_ALGO=allsum:ring", "'allsum' is not a collective"),
    ("NCCL_BUFFSIZE=4M", "expected an integer >= 1"),
    ("NCCL_MAX_NCHANNELS=4,8", "the launch sets it; use --channels"),
    ("NCCL_NTHREADS=256", "the launch sets it; use --threads"),
    ("HF_TOKEN=a,b", "looks secret"),
    ("NCCL_PROTO", "expected NAME=VALUE1,VALUE2"),
    ("1BAD=x", "not a valid variable name"),
    ("NCCL_DEBUG=$(reboot)", "must be at most 128 characters of letters"),
])
def test_bad_axes_are_refused_with_the_reason(item: str, message: str) -> None:
    with pytest.raises(KnobError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        parse_axes([item], reserved=RESERVED_ENV)


def test_unknown_names_are_allowed_with_a_warning_and_an_axis_is_given_once() -> None:
    parsed, warnings = parse_axes(["NCCL_CTA_POLICY=0,1", "RCCL_MSCCL_ENABLE=0,1"], reserved=RESERVED_ENV)
    assert [a.name for a in parsed] == ["NCCL_CTA_POLICY", "RCCL_MSCCL_ENABLE"]
    assert len(warnings) == 2 and "not a variable whose values this tool checks" in warnings[0]
    with pytest.raises(KnobError, match="given twice"):
        parse_axes(["NCCL_PROTO=LL", "NCCL_PROTO=Simple"], reserved=RESERVED_ENV)


def test_effective_algorithm_and_protocol_against_what_was_asked() -> None:
    # summary.json effective_settings.algorithms: "ALGO/PROTO" of each data collective, as the
    # TUNING lines print them ("Algo RING proto SIMPLE", NCCL >= 2.19).
    assert effective_mismatch("NCCL_PROTO", "Simple", ["RING/SIMPLE"]) is None
    assert effective_mismatch("NCCL_PROTO", "LL128", ["RING/SIMPLE", "RING/LL128"]) == (
        "NCCL_PROTO=LL128 asked, but the collectives ran with SIMPLE (TUNING: RING/LL128, RING/SIMPLE)")
    assert effective_mismatch("NCCL_PROTO", "^LL128", ["RING/LL"]) is None
    assert effective_mismatch("NCCL_ALGO", "NVLSTree", ["NVLS_TREE/SIMPLE"]) is None
    assert effective_mismatch("NCCL_ALGO", "allreduce:tree;broadcast:ring", ["RING/LL"]) is not None
    assert effective_mismatch("NCCL_ALGO", "Tree", []) is None        # nothing printed: unknown
    assert effective_mismatch("NCCL_BUFFSIZE", "1", ["RING/LL"]) is None


# -- the grid and its order -----------------------------------------------------------------------

def test_axes_multiply_the_grid_after_channels_and_threads() -> None:
    grid = sw.grid_points([4, 32], [256], axes("NCCL_PROTO=Simple,LL128"))
    assert [p.label for p in grid] == ["4ch × 256th NCCL_PROTO=Simple", "4ch × 256th NCCL_PROTO=LL128",
                                       "32ch × 256th NCCL_PROTO=Simple", "32ch × 256th NCCL_PROTO=LL128"]
    assert grid[1].env == ["NCCL_PROTO=LL128"]


@pytest.mark.parametrize("pools", [True, False])
def test_rounds_hold_every_point_once_shuffled_and_never_back_to_back(pools: bool) -> None:
    grid = sw.grid_points([4, 16, 32], [256, 512], axes("NCCL_PROTO=Simple,LL"))
    key = design.restart_key if pools else None
    for seed in range(40):
        order = design.run_order(grid, 3, seed, key)
        assert len(order) == 3 * len(grid)
        for round_ in range(3):
            configs = [run.config for run in order if run.repeat == round_]
            assert sorted(configs) == list(range(len(grid)))
            assert order[round_ * len(grid)].repeat == round_           # rounds do not mix
        assert all(a.config != b.config for a, b in zip(order, order[1:])), seed
        assert order == design.run_order(grid, 3, seed, key)            # replayable from the seed
        if pools:
            # A round keeps each pool's points together: one launch per restart key per round.
            for round_ in range(3):
                keys = [design.restart_key(grid[r.config]) for r in order if r.repeat == round_]
                assert len([k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]) == len(set(keys))
    orders = {tuple(r.config for r in design.run_order(grid, 3, seed, key)) for seed in range(10)}
    assert len(orders) > 5   # the seed matters


def test_no_back_to_back_at_the_round_boundary_even_with_one_pool_or_one_point() -> None:
    two = sw.grid_points([4, 32], [256])
    for seed in range(30):
        order = design.run_order(two, 4, seed)
        assert all(a.config != b.config for a, b in zip(order, order[1:]))
    single = sw.grid_points([4], [256], axes("NCCL_PROTO=Simple,LL"))   # two pools of one point
    for seed in range(30):
        order = design.run_order(single, 4, seed)
        assert all(a.config != b.config for a, b in zip(order, order[1:]))


def test_one_run_per_point_keeps_the_grid_order() -> None:
    grid = sw.grid_points([4, 32], [256, 512])
    assert [r.config for r in design.run_order(grid, 1, 5, None)] == [0, 1, 2, 3]
    assert [r.config for r in design.run_order(grid, 1, 5)] == [0, 2, 1, 3]   # pools: threads-major


def test_pools_restart_for_threads_and_every_axis_and_say_so() -> None:
    parsed = axes("NCCL_PROTO=Simple,LL128", "NCCL_ALGO=Ring")
    grid = sw.grid_points([4, 32], [256, 512], parsed)
    runs = [(i, 0, p) for i, p in enumerate(grid)]
    batches = design.pool_batches(sorted(runs, key=lambda r: design._sortable(design.restart_key(r[2]))))
    assert sorted(len(b) for b in batches) == [2, 2, 2, 2]   # 2 channel values share each launch
    reason = design.restart_reason(parsed, [256, 512])
    assert reason == ("threads (NCCL reads NCCL_NTHREADS once per process); NCCL_PROTO (process "
                      "environment: one value per launch)")
    assert "NCCL_ALGO" not in reason   # one value: it forces nothing


# -- the document, the plan, the launch -----------------------------------------------------------

def new_document(repeat: int = 3, **extra) -> dict:
    return sw.new_sweep(sweep_id="sweep_x", channels=[4, 32], threads=[256],
                        axes=axes("NCCL_PROTO=Simple,LL128"), repeat=repeat, seed=9,
                        launch_flags=launch_flags_record(**FLAG_DEFAULTS), hosts=["h"], fail_fast=False,
                        controller={}, created_at="t", **extra)


def test_a_repeated_sweep_document_has_one_entry_per_run_and_their_order() -> None:
    document = new_document()
    assert len(document["configs"]) == 4 and len(document["points"]) == 12
    assert [(p["config"], p["repeat"]) for p in document["points"][:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert document["points"][3]["settings"] == {"NCCL_PROTO": "LL128"}
    assert document["grid"]["repeat"] == 3 and document["grid"]["seed"] == 9
    assert sorted(document["order"]) == list(range(12))
    assert sw.validate_sweep(document, "x") is document
    # Resume runs what is left, in the recorded order.
    for index in document["order"][:5]:
        document["points"][index]["status"] = "completed"
    assert sw.points_to_run(document, lambda p: True) == document["order"][5:]


def test_a_schema_1_sweep_reads_as_one_run_per_point() -> None:
    old = {"schema": 1, "grid": {"channels": [28], "threads": [256, 512]}, "launch_flags": {},
           "points": [{"index": 0, "channels": 28, "threads": 256, "status": "completed"},
                      {"index": 1, "channels": 28, "threads": 512, "status": "pending"}]}
    document = sw.validate_sweep(old, "sweep.json")
    assert document["schema"] == 2 and document["order"] == [0, 1]
    assert [p["config"] for p in document["points"]] == [0, 1] and document["grid"]["repeat"] == 1


def test_a_point_launch_carries_its_axis_values_as_env() -> None:
    record = launch_flags_record(**{**FLAG_DEFAULTS, "env": ["NCCL_DEBUG=WARN"]})
    point = sw.grid_points([4], [256], axes("NCCL_PROTO=LL128"))[0]
    flags = launch_flags_for(record, point, [])
    assert flags.env == ("NCCL_DEBUG=WARN", "NCCL_PROTO=LL128")


def test_plan_of_a_sweep_with_axes_repeats_and_seed(tmp_path: Path) -> None:
    given = launch_flags_record(**FLAG_DEFAULTS)
    plan = plan_sweep(given, "4,32", "256", None, axis=["NCCL_PROTO=Simple,LL128"], repeat="3", seed="5")
    assert (plan.repeat, plan.seed, [a.name for a in plan.axes], len(plan.points)) == (3, 5, ["NCCL_PROTO"], 4)
    assert plan_sweep(given, "4", "256", None).seed > 0   # a fresh seed, recorded
    with pytest.raises(sw.SweepError, match="--repeat 0: give 1 to 100"):
        plan_sweep(given, "4", "256", None, repeat="0")
    with pytest.raises(sw.SweepError, match="--axis NCCL_PROTO and --env NCCL_PROTO=... both set it"):
        plan_sweep(launch_flags_record(**{**FLAG_DEFAULTS, "env": ["NCCL_PROTO=LL"]}), "4", "256", None,
                   axis=["NCCL_PROTO=Simple"])
    # A point override narrowed to one axis value.
    narrowed = plan_sweep(launch_flags_record(**{**FLAG_DEFAULTS, "point_override": [
        "*x256,NCCL_PROTO=LL128:debug.delay_ms=5"]}), "4,32", "256", None, axis=["NCCL_PROTO=Simple,LL128"])
    assert {p.label: v for p, v in narrowed.extra_overrides.items() if v} == {
        "4ch × 256th NCCL_PROTO=LL128": ["debug.delay_ms=5"], "32ch × 256th NCCL_PROTO=LL128": ["debug.delay_ms=5"]}

    write_sweep(tmp_path, new_document())
    resumed = plan_sweep(given, None, None, str(tmp_path))
    assert (resumed.repeat, resumed.seed, len(resumed.points)) == (3, 9, 4)
    with pytest.raises(sw.SweepError, match="--repeat 2 differs from the resumed sweep's 3"):
        plan_sweep(given, None, None, str(tmp_path), repeat="2")
    with pytest.raises(sw.SweepError, match="--axis differs from the resumed sweep's"):
        plan_sweep(given, None, None, str(tmp_path), axis=["NCCL_PROTO=LL"])
    with pytest.raises(sw.SweepError, match="--seed 1 differs"):
        plan_sweep(given, None, None, str(tmp_path), seed="1")
