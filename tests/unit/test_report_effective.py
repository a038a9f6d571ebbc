"""fab report: points flagged when their effective settings (read back from NCCL) differ from
what they asked, and pool points that share one run directory."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from tasks.lib import report as rep
from tests.unit.report_fixtures import make_run, make_sweep


def effective(channels: int, asked: int, flags: list[str] | None = None,
              transports: list[str] | None = None) -> dict:
    return {"capture": "on", "channels": channels, "threads": [256], "algorithms": ["RING/SIMPLE"],
            "transports": transports or ["P2P"], "asked": {"channels": asked, "threads": 256},
            "flags": flags or []}


def set_effective(run_dir: Path, value: dict, pool: dict | None = None) -> None:
    summary_path = next(run_dir.glob("*thread_*channels")) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["effective_settings"] = value
    if pool is not None:
        summary["pool"] = pool
    summary_path.write_text(json.dumps(summary))


def rows_of(sweep_dir: Path) -> list[rep.PointRow]:
    rows, _ = rep.collect_rows(rep.discover(sweep_dir))
    return rows


def test_clamped_and_duplicate_points_are_flagged(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, [(2, 256, {}), (4, 256, {}), (8, 256, {})])
    runs = {c: tmp_path / f"multinode_{c}ch_256th_20250101_12{i:02d}00" for i, c in enumerate((2, 4, 8))}
    set_effective(runs[2], effective(4, 2, ["all ranks: channels: asked 2, NCCL built 4 (raised "
                                            "to NCCL_MIN_NCHANNELS=4 from the environment)"]))
    set_effective(runs[4], effective(4, 4))
    set_effective(runs[8], effective(8, 8))
    two, four, eight = rows_of(sweep)
    assert (two.effective_channels, four.effective_channels, eight.effective_channels) == (4, 4, 8)
    assert two.settings_flag and four.settings_flag and eight.settings_flag is False
    assert any("NCCL_MIN_NCHANNELS=4" in f for f in two.settings_flags)
    # 4 asked 4 and got 4, but so did 2: their difference measures nothing.
    assert any(f.startswith("same effective settings as another point (2ch × 256th, 4ch × 256th)")
               for f in four.settings_flags)

    table = list(csv.DictReader(io.StringIO(rep.results_csv([two, four, eight]))))
    assert [r["settings_flag"] for r in table] == ["True", "True", "False"]
    assert [r["effective_channels"] for r in table] == ["4", "4", "8"]
    assert "NCCL_MIN_NCHANNELS=4" in table[0]["settings_flags"]
    md = rep.report_markdown(rep.discover(sweep), [two, four, eight], [])
    assert "## Effective settings" in md
    assert "**2ch × 256th: FLAGGED**" in md and "- 8ch × 256th: as asked" in md


def test_grid_mismatch_without_a_train_flag_and_ib_preset_on_sockets(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, [(16, 256, {})])
    run = tmp_path / "multinode_16ch_256th_20250101_120000"
    set_effective(run, effective(12, 16, transports=["NET/Socket", "P2P"]))
    document = json.loads((sweep / "sweep.json").read_text())
    document["launch_flags"] = {"nccl_preset": "ib"}
    (sweep / "sweep.json").write_text(json.dumps(document))
    (row,) = rows_of(sweep)
    assert row.settings_flag
    assert "grid channels 16, NCCL built 12" in row.settings_flags
    assert "nccl_preset ib, but NCCL used NET/Socket" in row.settings_flags


def test_uncaptured_points_are_unknown_not_clean(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, [(4, 256, {})])
    set_effective(tmp_path / "multinode_4ch_256th_20250101_120000",
                  {"capture": "off: gloo backend", "channels": None, "flags": []})
    (row,) = rows_of(sweep)
    assert row.settings_flag is None and row.effective_channels is None
    assert "## Effective settings" not in rep.report_markdown(rep.discover(sweep), [row], [])


def test_pool_points_read_their_own_directory(tmp_path: Path) -> None:
    """A rank pool's points share one run directory; sweep.json names each point's."""
    run = make_run(tmp_path, 4, 256, run_id="multinode_4ch_256th_20250101_120000", iter_ms=90.0)
    other = make_run(tmp_path / "tmp", 8, 256, run_id="x", iter_ms=120.0)
    shutil.move(str(other / "256thread_8channels"), run / "256thread_8channels")
    leak = {"leak_free": False, "leak": {"0": {"process_groups": 1}}, "mode": "in_process"}
    set_effective(run, effective(4, 4))
    summary_8 = run / "256thread_8channels" / "summary.json"
    data = json.loads(summary_8.read_text())
    data.update(effective_settings=effective(8, 8), pool=leak)
    summary_8.write_text(json.dumps(data))
    sweep = tmp_path / "sweep_1"
    sweep.mkdir()
    points = [{"index": i, "channels": c, "threads": 256, "status": "completed",
               "run_id": run.name, "run_dir": f"../{run.name}", "output_dir": f"256thread_{c}channels"}
              for i, c in enumerate((4, 8))]
    points.append({"index": 2, "channels": 16, "threads": 256, "status": "completed",
                   "run_id": run.name, "run_dir": f"../{run.name}", "output_dir": "../../etc"})
    (sweep / "sweep.json").write_text(json.dumps({"schema": 1, "points": points}))
    four, eight, bad = rows_of(sweep)
    assert four.iter_ms_median < 100 < 110 < eight.iter_ms_median
    assert four.run_dir != eight.run_dir and eight.run_dir.endswith("256thread_8channels")
    # Its only flag: the 16-channel entry whose output_dir was refused read this point too.
    assert [f.split(" (")[0] for f in four.settings_flags] == ["same effective settings as another point"]
    assert eight.settings_flag and any("resources not back" in f for f in eight.settings_flags)
    # A path in output_dir is not followed: the row falls back to the run's own directory.
    assert "several output directories; reading 256thread_4channels" in bad.problems


def test_threads_the_library_clamped_to_one_value_are_one_point(tmp_path: Path) -> None:
    """RCCL of ROCm 6.x takes NCCL_NTHREADS only as 256 (minimum 4 warps of 64, maximum 256:
    its "Invalid NCCL_NTHREADS" lines): the 64 and the 512 point ran the same, and say so.
    Points the library ran with their own value stay apart (world size 1: no kernel block)."""
    sweep = make_sweep(tmp_path, [(4, 64, {}), (4, 512, {})])
    for i, threads in enumerate((64, 512)):
        set_effective(tmp_path / f"multinode_4ch_{threads}th_20250101_12{i:02d}00", {
            "capture": "on", "channels": 4, "threads": None, "algorithms": None,
            "transports": None, "asked": {"channels": 4, "threads": threads},
            "env_read": {"NCCL_NTHREADS": str(threads)},
            "threads_knob": {"name": "NCCL_NTHREADS", "read": threads, "effective": 256},
            "flags": [f"all ranks: threads: NCCL_NTHREADS={threads} is outside RCCL's range; RCCL ran 256"]})
    low, high = rows_of(sweep)
    assert low.effective_threads == high.effective_threads == "256 (NCCL_NTHREADS read)"
    assert any(f.startswith("same effective settings as another point") for f in low.settings_flags)

    apart = make_sweep(tmp_path / "b", [(4, 256, {}), (4, 512, {})])
    for i, threads in enumerate((256, 512)):
        set_effective(tmp_path / "b" / f"multinode_4ch_{threads}th_20250101_12{i:02d}00", {
            "capture": "on", "channels": 4, "threads": None, "algorithms": None,
            "threads_reason": "world size 1: no collective kernel",
            "asked": {"channels": 4, "threads": threads},
            "threads_knob": {"name": "NCCL_NTHREADS", "read": threads, "effective": threads},
            "flags": []})
    rows = rows_of(apart)
    assert [r.settings_flag for r in rows] == [False, False]
    assert [r.effective_threads for r in rows] == ["256 (NCCL_NTHREADS read)", "512 (NCCL_NTHREADS read)"]


# -- --axis values read back ------------------------------------------------------------------------

NCCL_DATA = Path(__file__).parent / "data" / "nccl"


def effective_from_logs(logs: list[str], environ: dict[str, str], ctas: int | None = None) -> dict:
    """summary.json's effective_settings as the train package builds it from the ranks' logs; with
    `ctas`, as a pool point does: the point's communicator is the split made with those min/max
    CTAs (the log from its Init START on), the process's lines (version, ENV) from the whole file."""
    from train.nccl_debug import asked_from_env, effective_settings, parse_nccl_log, summarize_ranks

    per_rank = []
    for text in logs:
        start = text.rfind("\n", 0, text.index("ncclCommSplit")) + 1 if ctas else 0
        per_rank.append(effective_settings(parse_nccl_log(text[start:]), asked_from_env(environ, ctas, ctas),
                                           environ, process=parse_nccl_log(text)))
    return {"capture": "on", **summarize_ranks(per_rank)}


def with_env_line(text: str, name: str, value: str) -> str:
    """A log with the line NCCL prints when it reads NCCL_PROTO / NCCL_ALGO: src/graph/tuning.cc
    `INFO(NCCL_ENV, "NCCL_PROTO set by environment to %s", protoStr)` (NVIDIA/nccl v2.7.8 to
    v2.2x; no trailing '.', unlike the NCCL_PARAM lines), after the log's first ENV line."""
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "set by environment to" in line)
    prefix = lines[at].split("NCCL INFO ")[0]
    lines.insert(at + 1, f"{prefix}NCCL INFO {name} set by environment to {value}\n")
    return "".join(lines)


def axis_sweep(tmp_path: Path, world_size: int) -> tuple[Path, list[Path]]:
    from tests.unit.report_fixtures import make_repeated_sweep

    sweep = make_repeated_sweep(tmp_path, [(8, 256, {"NCCL_PROTO": "Simple"}, [10.0], {"world_size": world_size,
                                                                                       "nodes": world_size}),
                                           (8, 256, {"NCCL_PROTO": "LL128"}, [10.0], {"world_size": world_size,
                                                                                      "nodes": world_size})],
                                repeat=1)
    return sweep, sorted(tmp_path.glob("multinode_*"))


def test_a_protocol_the_collectives_did_not_use_is_flagged(tmp_path: Path) -> None:
    """Two ranks (rank 0's log rebuilt from NCCL 2.28's format strings, src_nccl-2.28.9_rank00.log:
    a split communicator of 2 ranks whose per-collective lines read AllReduce ... Algo RING proto
    SIMPLE): the Simple point ran as asked; the LL128 one, which NCCL read but did not use, is
    flagged."""
    sweep, (simple_run, ll128_run) = axis_sweep(tmp_path, 2)
    logs = [(NCCL_DATA / "src_nccl-2.28.9_rank00.log").read_text()]
    env = {"NCCL_NTHREADS": "256", "NCCL_IB_DISABLE": "0"}
    set_effective(simple_run, effective_from_logs([with_env_line(t, "NCCL_PROTO", "Simple") for t in logs],
                                                  {**env, "NCCL_PROTO": "Simple"}, ctas=8))
    set_effective(ll128_run, effective_from_logs([with_env_line(t, "NCCL_PROTO", "LL128") for t in logs],
                                                 {**env, "NCCL_PROTO": "LL128"}, ctas=8))
    simple, ll128 = rows_of(sweep)
    assert simple.effective_env == {"NCCL_PROTO": "Simple"}
    assert not any("NCCL_PROTO" in f for f in simple.settings_flags)
    assert ll128.settings_flag and any(f.startswith("NCCL_PROTO=LL128 asked, but the collectives ran with SIMPLE")
                                       for f in ll128.settings_flags)
    md = rep.report_markdown(rep.discover(sweep), rep.group_points(rows_of(sweep), rep.discover(sweep)), [])
    assert "NCCL_PROTO read as LL128" in md and "**8ch × 256th NCCL_PROTO=LL128: FLAGGED**" in md


def test_at_world_size_one_the_protocol_read_is_shown_and_points_stay_apart(tmp_path: Path) -> None:
    """The H100 recording (NCCL 2.28.9, one rank): no TUNING line, so no protocol per collective;
    what NCCL read tells the two points apart (not 'same effective settings'), and a point whose
    variable NCCL never reported reading says so in its notes, not as a flag."""
    sweep, (simple_run, ll128_run) = axis_sweep(tmp_path, 1)
    text = (NCCL_DATA / "nccl-2.28.9_h100_world1_nthreads256.log").read_text()
    env = {"NCCL_NTHREADS": "256"}
    set_effective(simple_run, effective_from_logs([with_env_line(text, "NCCL_PROTO", "Simple")],
                                                  {**env, "NCCL_PROTO": "Simple"}))
    set_effective(ll128_run, effective_from_logs([text], {**env, "NCCL_PROTO": "LL128"}))
    simple, ll128 = rows_of(sweep)
    assert simple.effective_env == {"NCCL_PROTO": "Simple"} and ll128.effective_env == {}
    assert not any(f.startswith("same effective settings") for f in simple.settings_flags + ll128.settings_flags)
    assert any("not reported read (world size 1" in n for n in ll128.notes)
    assert any("no per-collective TUNING line" in n for n in simple.notes)
