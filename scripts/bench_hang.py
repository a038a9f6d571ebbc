#!/usr/bin/env python3
"""How a launch ends when a rank freezes (SIGSTOP), after its steps began or while it starts.

    .venv/bin/python scripts/bench_hang.py [--scenarios steps,startup] [--repeat 3]
                                           [--hang-timeout 20]

On a simulated cluster of its own (tests/simcluster: 2 nodes x 2 gloo ranks, bare, this checkout
as the workdir, config/multi_node/cpu_tiny.yaml, distributed.timeout_s 60), each repeat runs one
`fab launch` and freezes rank 3 (node 1):
  steps    once rank 3 wrote 3 metrics lines, with --hang-timeout (the hang-after-steps case);
  startup  the moment its process appears (before its first step), default hang timeout.
Timed from the freeze (seconds): `announce` until the launch said what it found (the hang
watchdog's "no rank advanced" / "start-up stuck" line, or "failed first"), `exit` until the
launch returned; `stalled` is run.json's hang.stalled_for_s (the idle time the watchdog saw when
it fired). The run's status and who it names come from run.json.
Run it from a checkout to measure that checkout's code (the nodes run the same files).
Numbers depend on the machine's load: every rank imports torch (seconds on 2 cores).
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

FAB = str(Path(sys.executable).with_name("fab"))
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
ANNOUNCE = re.compile(r"launch: (no rank advanced|start-up stuck)|failed first")


class Freeze:
    """SIGSTOPs rank 3 on node 1: at once, or once its metrics file has `after_lines` lines."""

    def __init__(self, sim: SimCluster, run_id: str | None = None, after_lines: int = 0):
        wait = "" if not after_lines else (
            f"[ \"$(cat {ROOT}/experiments/{run_id}/*/rank_03_metrics.jsonl 2>/dev/null | wc -l)\" "
            f"-ge {after_lines} ] || {{ sleep 0.2; continue; }}; ")
        script = ("while :; do " + wait + "for f in /proc/[0-9]*/environ; do "
                  "grep -qz '^GEMM_RUN_ID=' $f 2>/dev/null && grep -qzx 'RANK=3' $f 2>/dev/null "
                  "&& grep -qz '^LOCAL_RANK=' $f 2>/dev/null || continue; "
                  "p=${f#/proc/}; p=${p%/environ}; kill -STOP $p && echo $p && exit 0; done; "
                  "sleep 0.05; done")
        self.proc = subprocess.Popen([*sim.nsenter_argv(1), "/bin/bash", "-c", script],
                                     stdout=subprocess.PIPE, text=True)
        self.at: float | None = None
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip().isdigit():
            self.at = time.monotonic()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def one_run(sim: SimCluster, config: Path, scenario: str, hang_timeout: float) -> dict:
    args = [FAB, "-f", str(config), "launch", "--override", "training.log_interval=1"]
    freeze: Freeze | None = None
    if scenario == "steps":
        args += ["--override", "training.max_steps=100000", "--hang-timeout", str(hang_timeout)]
    else:
        args += ["--override", "training.max_steps=4"]
        freeze = Freeze(sim)
    announced: list[float] = []
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run_id = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if run_id is None and (match := re.search(r"launch: (multinode_\S+?):", line)):
            run_id = match.group(1)
            if freeze is None:  # steps: this run's rank 3, once it wrote 3 metrics lines
                freeze = Freeze(sim, run_id, after_lines=3)
        if not announced and ANNOUNCE.search(line):
            announced.append(time.monotonic())
    proc.wait()
    ended = time.monotonic()
    if freeze is not None:
        freeze.stop()
    record = {}
    if run_id:
        experiments = Path(yaml.safe_load(config.read_text())["cluster"]["experiments_dir"])
        record = json.loads((experiments / run_id / "run.json").read_text())
    hang = record.get("hang") or {}
    failure = record.get("first_failure") or {}
    at = freeze.at if freeze else None
    return {
        "rc": proc.returncode, "status": record.get("status"),
        "announce": round(announced[0] - at, 1) if at and announced else None,
        "exit": round(ended - at, 1) if at else None,
        "stalled": hang.get("stalled_for_s"),
        "named": (f"node {failure.get('node_rank')} ranks {failure.get('ranks')}" if failure
                  else f"ranks {hang.get('first_stalled_ranks')}"),
        "phase": (hang.get("startup") or {}).get("phase"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="steps,startup")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hang-timeout", type=float, default=20.0)
    options = parser.parse_args()
    reason = missing_capability()
    if reason:
        print(f"bench_hang: {reason}", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-hang-") as tmp, \
            SimCluster(name=f"bh{os.getpid()}", nodes=2, ifnames=["eth0", "ens5"]) as sim:
        data = yaml.safe_load(sim.write_fabric_config().read_text())
        data["cluster"].update(workdir=str(ROOT), registry_dir="/tmp/gemm-runs-benchhang",
                               experiments_dir=f"{tmp}/experiments")
        data.setdefault("docker", {}).update(enabled=False, platform="cpu")
        data.setdefault("launch", {})["nproc"] = 2
        config = Path(tmp) / "bench.yaml"
        config.write_text(yaml.safe_dump(data))
        for scenario in options.scenarios.split(","):
            for index in range(options.repeat):
                result = one_run(sim, config, scenario, options.hang_timeout)
                results.setdefault(scenario, []).append(result)
                print(f"{scenario} #{index + 1}: {result}", flush=True)
        for run_dir in Path(tmp, "experiments").glob("multinode_*"):
            subprocess.run(["rm", "-rf", str(ROOT / "experiments" / run_dir.name)], check=False)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    for scenario, runs in results.items():
        def median(key: str) -> str:
            values = [r[key] for r in runs if isinstance(r[key], (int, float))]
            return f"{statistics.median(values):.1f}" if values else "-"
        statuses = sorted({str(r['status']) for r in runs})
        named = sorted({str(r['named']) for r in runs})
        print(f"{scenario}: announce {median('announce')} s, exit {median('exit')} s, "
              f"stalled {median('stalled')} s (median of {len(runs)}); status {statuses}; "
              f"named {named}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
