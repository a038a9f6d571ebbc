#!/usr/bin/env python3
"""Time `fab emergency-stop` and `fab stop` on the simulated cluster (run as root).

For each node count: start a run on every node (node launchers around tests/fake_torchrun.py, 4
workers per node in sessions of their own, as torch starts them), then time from the `fab`
command's start until no process carrying the run's marker is left on any node (seen from the
host, which sees every node's pid namespace). Also times the node-side stop command alone.

    .venv/bin/python scripts/bench_stop.py [--nodes 2,3] [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.lib.registry import stop_command  # noqa: E402
from tests.cluster.test_runs import Run, marked_pids, run_fab, wait_gone, write_config  # noqa: E402
from tests.simcluster import SimCluster  # noqa: E402

REGISTRY = "/tmp/gemm-runs-bench"


def start_run(cluster: SimCluster, ignore_term: bool) -> Run:
    args = ("--nproc", "4", "--interval", "0.1") + (("--ignore-term",) if ignore_term else ())
    run = Run(cluster, REGISTRY, fake_args=args)
    for index in range(len(cluster.nodes)):
        run.start(index)
    run.wait_steps(list(range(len(cluster.nodes))))
    return run


def timed_fab(config: Path, run: Run, *args: str) -> tuple[float, float]:
    """(seconds the fab command took, seconds until every process of the run was gone)."""
    started = time.monotonic()
    result = run_fab(config, *args)
    command_s = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"fab {' '.join(args)} failed: {result.stderr.strip()}")
    return command_s, command_s + wait_gone(run.run_id, 30)


def node_side(cluster: SimCluster) -> float:
    run = start_run(cluster, ignore_term=True)
    started = time.monotonic()
    cluster.exec(0, stop_command(REGISTRY, run.run_id, 0, True))
    elapsed = time.monotonic() - started
    run.kill_all()
    return elapsed


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="2,3", help="comma-separated node counts")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("| nodes | processes | fab emergency-stop: command | all gone | node-side kill command "
          "| fab stop --grace 10: all gone |")
    print("| --- | --- | --- | --- | --- | --- |")
    for nodes in (int(n) for n in args.nodes.split(",")):
        with SimCluster(name=f"bench-stop-{nodes}", nodes=nodes) as cluster:
            config = write_config(cluster, cluster.state_dir / "bench.yaml", REGISTRY, enabled=False)
            kills, graceful, processes = [], [], 0
            for _ in range(args.repeat):
                run = start_run(cluster, ignore_term=True)
                processes = len(marked_pids(run.run_id))
                kills.append(timed_fab(config, run, "emergency-stop"))
                run.kill_all()
                run = start_run(cluster, ignore_term=False)
                graceful.append(timed_fab(config, run, "stop", "--grace", "10")[1])
                run.kill_all()
            local = [node_side(cluster) for _ in range(args.repeat)]
            print(f"| {nodes} | {processes} | {summary([k[0] for k in kills])} | "
                  f"{summary([k[1] for k in kills])} | {summary(local)} | {summary(graceful)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
