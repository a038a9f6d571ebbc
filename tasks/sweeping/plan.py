"""What a new or resumed sweep (or tune) runs: its launch flags, grid, axes, repeats and seed, or
those recorded in the resumed sweep.json. Pure apart from reading that file."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lib import sweep as sw
from tasks.lib.knobs import Axis, KnobError, parse_axes
from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS
from tasks.lib.quoting import is_env_name
from tasks.lib.runspec import RESERVED_ENV
from tasks.cluster.session import cli_path
from tasks.sweeping.runner import FLAG_DEFAULTS, OPERATIONAL_FLAGS, load_sweep

MAX_REPEAT = 100


@dataclass
class SweepPlan:
    """What a new or resumed sweep runs: its launch flags, grid and (resumed) document."""

    flags_record: dict[str, Any]
    channels: list[int]
    threads: list[int]
    points: list[sw.GridPoint]            # the grid's points (configs), in grid order
    extra_overrides: dict[sw.GridPoint, list[str]]
    document: dict[str, Any] | None = None   # None: a new sweep (created once the hosts are known)
    sweep_dir: Path | None = None
    axes: list[Axis] = field(default_factory=list)
    repeat: int = 1
    seed: int = 0
    warnings: list[str] = field(default_factory=list)


def parse_repeat(value: Any) -> int:
    try:
        repeat = int(str(value)) if value not in (None, "") else 1
    except ValueError:
        raise sw.SweepError(f"--repeat {value!r} is not a whole number of runs per point") from None
    if not 1 <= repeat <= MAX_REPEAT:
        raise sw.SweepError(f"--repeat {repeat}: give 1 to {MAX_REPEAT} runs per point (3 is a good start)")
    return repeat


def parse_seed(value: Any) -> int:
    """--seed as given, else a fresh one (recorded in sweep.json, so the order can be replayed)."""
    if value in (None, ""):
        return random.SystemRandom().randrange(1, 2 ** 31)
    try:
        seed = int(str(value))
    except ValueError:
        raise sw.SweepError(f"--seed {value!r} is not an integer") from None
    if not 0 <= seed < 2 ** 63:
        raise sw.SweepError(f"--seed {seed} must be >= 0")
    return seed


def plan_axes(axis: Any, env: Sequence[str], secret_patterns: Sequence[str]) -> tuple[list[Axis], list[str]]:
    """--axis items as axes (tasks/lib/knobs.py) that no --env item also sets."""
    try:
        axes, warnings = parse_axes(axis, reserved=RESERVED_ENV, secret_patterns=secret_patterns)
    except KnobError as err:
        raise sw.SweepError(str(err)) from None
    fixed = {item.partition("=")[0] for item in env or [] if is_env_name(item.partition("=")[0])}
    for one in axes:
        if one.name in fixed:
            raise sw.SweepError(f"--axis {one.name} and --env {one.name}=... both set it; keep the axis")
    return axes, warnings


def plan_sweep(given: dict[str, Any], channels: Any, threads: Any, resume: str | None,
               secret_patterns: Sequence[str] = DEFAULT_SECRET_ENV_PATTERNS, *, axis: Any = None,
               repeat: Any = None, seed: Any = None) -> SweepPlan:
    """The grid and flags of a new sweep, or those recorded in the resumed one's sweep.json (with
    the operational flags given now, and the secret --env values it masked given again);
    SweepError for anything that does not fit."""
    channel_values = sw.parse_grid_values(channels, "--channels")
    thread_values = sw.parse_grid_values(threads, "--threads")
    repeats = parse_repeat(repeat)
    if not resume:
        axes, warnings = plan_axes(axis, given.get("env") or [], secret_patterns)
        points = sw.grid_points(channel_values, thread_values, axes)  # both axes present
        return SweepPlan(given, channel_values, thread_values, points,
                         sw.parse_point_overrides(given["point_override"], points),
                         axes=axes, repeat=repeats, seed=parse_seed(seed), warnings=warnings)
    sweep_dir = cli_path(resume)
    document = load_sweep(sweep_dir)
    axes = plan_axes(axis, [], secret_patterns)[0] if axis else []
    sw.check_resume_grid(document, channel_values, thread_values, axes, repeats if repeat else None)
    if seed not in (None, "") and int(str(seed)) != document["grid"].get("seed"):
        raise sw.SweepError(f"--seed {seed} differs from the resumed sweep's {document['grid'].get('seed')}; "
                            "the order is recorded: drop --seed")
    recorded = document["launch_flags"]
    env = sw.restore_masked_env(recorded.get("env") or [], given.get("env") or [], secret_patterns)
    sw.check_resume_flags(recorded, {k: v for k, v in given.items()
                                     if k != "env" and v != FLAG_DEFAULTS.get(k)},
                          may_change=OPERATIONAL_FLAGS)
    flags_record = {**recorded, **{k: given[k] for k in OPERATIONAL_FLAGS if given.get(k)},
                    "env": env}
    if not given.get("force"):
        flags_record["force"] = False  # --force is for this invocation, not remembered
    points = [sw.point_of(config) for config in document["configs"]]
    extra = sw.parse_point_overrides(flags_record.get("point_override") or [], points)
    grid = document["grid"]
    return SweepPlan(flags_record, channel_values, thread_values, points, extra, document, sweep_dir,
                     axes=sw.axes_of(document), repeat=int(grid.get("repeat") or 1),
                     seed=int(grid.get("seed") or 0))
