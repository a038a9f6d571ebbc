#!/usr/bin/env python3
"""Bring-up and tear-down time of the simulated cluster, without and with Docker.

    sudo .venv/bin/python scripts/bench_simcluster.py [--nodes 4] [--repeat 3]

Targets (issue 3): 4 nodes without Docker < 10 s, with Docker < 60 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.simcluster import SimCluster, missing_capability  # noqa: E402

TARGETS_S = {False: 10.0, True: 60.0}


def measure(nodes: int, docker: bool, repeat: int) -> tuple[list[float], list[float]]:
    ups, downs = [], []
    for attempt in range(repeat):
        cluster = SimCluster(name=f"bench-{os.getpid()}-{attempt}", nodes=nodes, docker=docker)
        cluster.up()
        ups.append(cluster.up_seconds or 0.0)
        started = time.monotonic()
        cluster.down()
        downs.append(time.monotonic() - started)
    return ups, downs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    reason = missing_capability(docker=True)
    if reason:
        print(f"bench_simcluster: {reason}", file=sys.stderr)
        return 1
    failed = False
    for docker in (False, True):
        ups, downs = measure(args.nodes, docker, args.repeat)
        target = TARGETS_S[docker]
        verdict = "ok" if max(ups) < target else "OVER TARGET"
        failed |= verdict != "ok"
        label = "with docker   " if docker else "without docker"
        print(f"{args.nodes} nodes {label}: up median {statistics.median(ups):.2f} s "
              f"(min {min(ups):.2f}, max {max(ups):.2f}; target < {target:.0f} s: {verdict}), "
              f"down median {statistics.median(downs):.2f} s  [n={args.repeat}]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
