#!/usr/bin/env python3
"""How fast `fab launch` starts a run, and how fast it tears one down after a rank dies.

    .venv/bin/python scripts/bench_launch.py [--nodes 2,4,8] [--nproc 1] [--repeat 1]
                                             [--transports ssh,srun]

For each cluster size (simulated nodes, tests/simcluster, separate filesystems) it times, from the
moment `fab launch` is started:
  launchers  every node's launcher started (the "launch: <run id>: ..." line),
  ranks      every rank started and joined the process group (every node printed train's
             "train: world ..." line, printed after init_process_group returns on all ranks),
  total      the launch returned (run finished, outputs collected, table printed);
then, on a second long run, kills one rank on the last node and times:
  detect     until the launch announced the failure ("failed first"),
  clean      until no process of the run is left on any node,
  exit       until the launch exited (non-zero).
With --transports ssh,srun the cluster also runs a Slurm (no accounting) and each measurement
is made twice on the same nodes: over SSH (the cluster's fab config), and through srun inside an
allocation of every node (`salloc --no-shell`; the config names no host, fab inherits
SLURM_JOB_ID/SLURM_JOB_NODELIST as in an interactive salloc shell).
Numbers depend on the machine's load: every rank imports torch (seconds per process on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.simcluster import SimCluster, missing_capability  # noqa: E402

FAB = str(ROOT / ".venv" / "bin" / "fab")
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
QUICK = ["--override", "training.max_steps=4", "--override", "calibration.compute_steps=1",
         "--override", "calibration.comm_steps=1"]


def fab(config: Path, *args: str, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FAB, "-f", str(config), *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


class TimedLaunch:
    """`fab launch` with every output line time-stamped (seconds since the start)."""

    def __init__(self, config: Path, args: list[str], env: dict[str, str] | None = None):
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen([FAB, "-f", str(config), "launch", *args], cwd=ROOT,
                                     env=env or ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def first(self, pattern: str) -> float | None:
        for at, line in list(self.lines):
            if re.search(pattern, line):
                return at
        return None

    def wait_for(self, pattern: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (at := self.first(pattern)) is not None:
                return at
            if self.proc.poll() is not None and not self.thread.is_alive():
                break
            time.sleep(0.05)
        tail = "\n".join(line for _, line in self.lines[-20:])
        raise RuntimeError(f"no {pattern!r} within {timeout} s:\n{tail}")

    def finish(self, timeout: float) -> float:
        self.proc.wait(timeout=timeout)
        self.thread.join(5)
        return time.monotonic() - self.started

    @property
    def run_id(self) -> str:
        for _, line in self.lines:
            if (match := re.search(r"launch: (multinode_\S+):", line)):
                return match.group(1)
        raise RuntimeError("no run id in the output")


def run_processes(cluster: SimCluster, run_id: str) -> int:
    found = 0
    for node in cluster.nodes:
        out = cluster.exec(node.index, f"grep -lzxsF -e GEMM_RUN_ID={run_id} /proc/[0-9]*/environ "
                                       "|| true").stdout
        found += len(out.split())
    return found


def prepare(nodes: int, tmp: Path, slurm: bool = False) -> tuple[SimCluster, Path]:
    cluster = SimCluster(name=f"bl-{os.getpid()}-{nodes}", nodes=nodes, slurm=slurm,
                         slurm_accounting=False).up()
    data = yaml.safe_load(cluster.write_fabric_config(tmp / f"sim{nodes}.yaml").read_text())
    data["cluster"]["experiments_dir"] = str(tmp / "experiments")
    config = tmp / f"bench{nodes}.yaml"
    config.write_text(yaml.safe_dump(data))
    return cluster, config


def srun_setup(cluster: SimCluster, config: Path) -> tuple[Path, dict[str, str], str]:
    """The same cluster through srun: a config without hosts (nor SSH key) and the environment
    of an allocation of every node; (config, env, job id)."""
    data = yaml.safe_load(config.read_text())
    data = {"cluster": {key: data["cluster"][key] for key in ("workdir", "venv",
                                                              "experiments_dir")
                        if key in data["cluster"]},
            "docker": data.get("docker", {})}
    srun_config = config.with_name(config.stem + "-srun.yaml")
    srun_config.write_text(yaml.safe_dump(data))
    result = cluster.slurm_run(["salloc", f"--nodes={cluster.node_count}", "--no-shell",
                                "--job-name=bench-launch"], timeout=60)
    job_id = next(line.rsplit(" ", 1)[1] for line in result.stderr.splitlines()
                  if "Granted job allocation" in line)
    nodelist = cluster.slurm_run(["squeue", "-h", "-j", job_id, "-o", "%N"]).stdout.strip()
    env = {**ENV, **cluster.slurm_env, "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist,
           "SLURM_JOB_NUM_NODES": str(cluster.node_count)}
    return srun_config, env, job_id


def sync(config: Path, env: dict[str, str] | None = None) -> None:
    """Before every launch: others change the checkout while the benchmark runs."""
    synced = fab(config, "sync", env=env)
    if synced.returncode != 0:
        raise RuntimeError(synced.stdout + synced.stderr)


def measure_start(config: Path, nodes: int, nproc: int,
                  env: dict[str, str] | None = None) -> dict[str, float]:
    sync(config, env)
    launch = TimedLaunch(config, ["--no-docker", "-p", str(nproc), *QUICK], env)
    launchers = launch.wait_for(r"^launch: multinode_\S+: ", 300)
    ranks = 0.0
    for node in range(nodes):
        ranks = max(ranks, launch.wait_for(rf"^\[node {node}\] train: world ", 600))
    total = launch.finish(600)
    if launch.proc.returncode != 0:
        raise RuntimeError("\n".join(line for _, line in launch.lines[-30:]))
    experiments = Path(yaml.safe_load(config.read_text())["cluster"]["experiments_dir"])
    record = json.loads((experiments / launch.run_id / "run.json").read_text())
    phases = {f"phase {k}": v for k, v in record["timings"].items() if k != "watch"}
    return {"launchers": launchers, "ranks": ranks, "total": total, **phases}


def measure_teardown(cluster: SimCluster, config: Path, nodes: int, nproc: int,
                     env: dict[str, str] | None = None) -> dict[str, float]:
    last = nodes - 1
    sync(config, env)
    launch = TimedLaunch(config, ["--no-docker", "-p", str(nproc),
                                  "--override", "training.max_steps=100000"], env)
    launch.wait_for(rf"^\[node {last}\] step \d+/", 600)
    run_id = launch.run_id
    cluster.exec(last, f"for e in /proc/[0-9]*/environ; do grep -qzxF GEMM_RUN_ID={run_id} $e "
                       "2>/dev/null && grep -qzxF LOCAL_RANK=0 $e 2>/dev/null && "
                       "p=${e#/proc/} && kill -9 ${p%/environ}; done; true")
    killed_at = time.monotonic()
    while run_processes(cluster, run_id) and time.monotonic() - killed_at < 120:
        time.sleep(0.1)
    clean = time.monotonic() - killed_at
    launch.finish(120)
    exit_at = time.monotonic() - killed_at
    detect_line = launch.first(r"failed first")
    detect = (detect_line + launch.started - killed_at) if detect_line is not None else float("nan")
    named = launch.first(rf"node {last} \(\S+\) failed first") is not None
    return {"detect": detect, "clean": clean, "exit": exit_at,
            "rc": float(launch.proc.returncode), "named_right_node": float(named)}


def bench_transport(cluster: SimCluster, ssh_config: Path, transport: str, nodes: int,
                    args: argparse.Namespace) -> None:
    config, env = ssh_config, None
    if transport == "srun":
        config, env, _ = srun_setup(cluster, ssh_config)
    starts = [measure_start(config, nodes, args.nproc, env) for _ in range(args.repeat)]
    line = ", ".join(f"{key} {statistics.median(s[key] for s in starts):.2f} s"
                     for key in starts[0])
    print(f"{nodes} nodes x {args.nproc} rank(s) via {transport}: start: {line}", flush=True)
    if not args.no_teardown:
        down = measure_teardown(cluster, config, nodes, args.nproc, env)
        print(f"{nodes} nodes x {args.nproc} rank(s) via {transport}: after a rank died on node "
              f"{nodes - 1}: failure announced {down['detect']:.1f} s, every node clean "
              f"{down['clean']:.1f} s, launch exited {down['exit']:.1f} s (rc {down['rc']:.0f}, "
              f"named node {nodes - 1}: {'yes' if down['named_right_node'] else 'NO'})",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="2,4,8")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-teardown", action="store_true", help="skip the rank-death runs")
    parser.add_argument("--transports", default="ssh", help="ssh, srun or ssh,srun")
    args = parser.parse_args()
    transports = [t for t in args.transports.split(",") if t]
    if set(transports) - {"ssh", "srun"}:
        parser.error(f"--transports: {args.transports!r}: ssh and/or srun")
    if (reason := missing_capability()):
        print(f"bench_launch: cannot run a sim cluster here: {reason}", file=sys.stderr)
        return 2
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp_name:
        tmp = Path(tmp_name)
        for nodes in [int(n) for n in args.nodes.split(",")]:
            cluster, ssh_config = prepare(nodes, tmp, slurm="srun" in transports)
            try:
                for transport in transports:
                    bench_transport(cluster, ssh_config, transport, nodes, args)
            finally:
                cluster.down()
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
