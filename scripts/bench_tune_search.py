#!/usr/bin/env python3
"""How often `fab tune`'s search reaches the full grid's decision, and with how many runs, on a
6 x 4 x 2 space (144 runs for the grid at 3 runs per point), over many seeds: the named surfaces
of tests/unit/tune_surfaces.py (bowl, interaction, corner, flat) and random unimodal surfaces
(optimum anywhere, 3 to 9 % per step away from it, a channels x threads twist), each table drawn
with 1 % run-to-run and 2 % step-to-step noise.

    scripts/bench_tune_search.py [--seeds 100] [--gap 0.03]

Prints per family: success rate (the tune's decision equals the grid's: same winner, or no
winner and a leader in the grid's within-noise set), runs (min / median / max) and how many
searches stayed within 40 % of the grid's runs. CPU only, no cluster (the search is pure).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.tune_surfaces import BOUND, GRID_RUNS, SURFACES, make_table, outcome, random_surface  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--gap", type=float, default=0.03, help="random surfaces: least step away from the optimum")
    args = parser.parse_args()
    families = {name: (lambda seed, s=surface: s) for name, (surface, _) in SURFACES.items()}
    families["random"] = lambda seed: random_surface(seed, gap=args.gap)[0]
    print(f"6 x 4 x 2 grid, {GRID_RUNS} runs at 3 per point; bound {BOUND:.1f} runs (40 %); {args.seeds} seeds each")
    print(f"{'surface':<12} {'success':>9} {'runs min/median/max':>20} {'<= 40 %':>9} {'s':>6}")
    totals = [0, 0]
    for name, make in families.items():
        started = time.perf_counter()
        results = [outcome(make_table(make(seed), seed=seed)) for seed in range(args.seeds)]
        runs = [r.runs for r in results]
        ok = sum(r.success for r in results)
        totals[0] += ok
        totals[1] += len(results)
        print(f"{name:<12} {ok:>4}/{len(results):<4} {min(runs):>6} / {statistics.median(runs):>5g} / {max(runs):<5}"
              f" {sum(r.within_bound for r in results):>4}/{len(results):<4} {time.perf_counter() - started:>6.1f}")
        for seed, r in enumerate(results):
            if not r.success:
                print(f"    seed {seed}: grid {r.grid.status} {r.grid.winner or r.grid.within_noise[:4]}; "
                      f"tune {r.found.status} {r.found.winner or r.found.leader} after {r.runs} runs")
    print(f"all: {totals[0]}/{totals[1]} = {totals[0] / totals[1]:.1%}")


if __name__ == "__main__":
    main()
