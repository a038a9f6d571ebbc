#!/usr/bin/env python3
"""Record a sweep's measurements as a compact table: every point's runs, each run's (step,
iteration time) pairs of every rank, the sample the report decides on.

    scripts/record_sweep_table.py experiments/sweep_<ts> tests/unit/data/sweep_tables/NAME.json

The table replays a real sweep without its run directories: tests/unit/test_tune_search.py runs
`fab tune`'s search on it (the k-th run the search asks of a point is its k-th recorded run) and
compares the result with the full grid's decision (recorded here as the report made it). Runs on
CPU or GPU alike (no torch).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.lib import report as rep  # noqa: E402


def table(sweep_dir: Path) -> dict:
    report_input = rep.discover(sweep_dir)
    if report_input.sweep is None:
        raise SystemExit(f"{sweep_dir}: not a sweep directory (no sweep.json)")
    points, _, _ = rep.collect_points(report_input)
    decision = rep.decide_rows(points)
    grid = report_input.sweep["grid"]
    axes = [{"name": "channels", "values": [str(v) for v in grid["channels"]]},
            {"name": "threads", "values": [str(v) for v in grid["threads"]]},
            *({"name": a["name"], "values": [str(v) for v in a["values"]]} for a in grid.get("axes") or [])]
    out = []
    for point in points:
        if point.status != rep.COMPLETED:
            raise SystemExit(f"{point.label}: {point.status}; a table needs every run completed")
        values = {"channels": str(point.channels), "threads": str(point.threads), **point.settings}
        runs = [[[step, round(ms, 4)] for step, ms in run.samples] for run in point.runs or [point]]
        out.append({"values": values, "runs": runs})
    return {"source": str(sweep_dir.name), "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "repeat": grid.get("repeat"), "seed": grid.get("seed"),
            "launch_flags": {k: report_input.sweep["launch_flags"].get(k) for k in ("override", "point_override")},
            "hosts": report_input.sweep.get("hosts"), "axes": axes, "points": out,
            # The report's own decision over the whole grid: the test replays the table and must reach it.
            "decision": {"status": decision.status, "winner": decision.winner,
                         "within_noise": decision.within_noise}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    document = table(args.sweep_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    runs = sum(len(p["runs"]) for p in document["points"])
    print(f"{args.out}: {len(document['points'])} points, {runs} runs")


if __name__ == "__main__":
    main()
