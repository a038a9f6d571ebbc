#!/usr/bin/env python3
"""How fast node output reaches the controller, and in how much memory (issue 26, finding 4).

    .venv/bin/python scripts/bench_node_output.py [--sizes 5,10,20,50] [--long-line 8]
                                                  [--paths logs,console] [--timeout 600]

One simulated node (tests/simcluster, real sshd). For each size a real node launcher runs a
"torchrun" that prints that many MB (NCCL INFO and step lines, ~110 bytes each, as a verbose
NCCL_DEBUG=INFO run does; with --long-line, N MB on one line without a newline, then a short
line), so the node's registry has the run and its output log. Then, for that run:

  logs     `fab logs --run RUN` as a user runs it (a subprocess, its stdout read through a pipe
           as a terminal would), from start to exit, start-up and the SSH connection included;
  console  the launch's log streaming (tasks/run/watch.Watcher's tail of the node's output log
           over SSH: controller log file, progress, failure evidence, console) in a process of
           its own, from start_tails() until the stream ended.

Each line: MB, seconds, MB/s and the process's peak RSS (wait4). Needs root (the sim cluster).
The same script runs on an older checkout (it uses only interfaces that existed before issue 26):
copy it there and run it from that checkout to get the "before" figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAB = str(Path(sys.executable).with_name("fab"))
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
BENCH_DIR = "/srv/bench-node-output"

# Lines as a verbose run prints them: NCCL INFO lines (NCCL 2.21 init.cc/transport format
# strings) and the train package's progress lines.
GENERATOR = r'''
import sys
size = int(sys.argv[1]) * 1000 * 1000
long_line = int(sys.argv[2]) * 1000 * 1000
out = sys.stdout.buffer
if long_line:
    block = b"x" * 65536
    for _ in range(long_line // len(block)):
        out.write(block)
    out.write(b"\nafter the long line\n")
    raise SystemExit(0)
pattern = b"".join(
    b"node0:1234:1300 [%d] NCCL INFO Channel %02d/32 :    0   1   2   3   4   5   6   7 via P2P/IPC/read\n"
    % (i % 8, i % 32) for i in range(64))
pattern += b"step 12/100000 | iter 37.52 ms | gemm 684.6 TFLOP/s | comm 12.1 ms | exposed 0.2 ms\n"
written = 0
while written < size:
    out.write(pattern)
    written += len(pattern)
'''


def new_run_id() -> str:
    return f"multinode_28ch_256th_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"


def start_run(cluster, registry: str, mb: int, long_line_mb: int) -> tuple[str, str, int, int]:
    """A finished run on node 0 whose output log holds the generated output; (run id, output
    dir, launcher pid, output log bytes)."""
    from tasks.lib.registry import launcher_start_command, render_node_launcher

    run_id = new_run_id()
    run_dir = f"{BENCH_DIR}/experiments/{run_id}"
    output_dir = f"{run_dir}/256thread_28channels"
    generator = f"{BENCH_DIR}/gen.py"
    launcher = render_node_launcher(
        run_id=run_id, registry_dir=registry, run_dir=run_dir, output_dir=output_dir,
        env_script=f"{run_dir}/env.sh", workdir=BENCH_DIR,
        torchrun_argv=[f"{BENCH_DIR}/torchrun", str(mb), str(long_line_mb)],
        wrapper_argv=None, container=None, venv=None)
    q = shlex.quote
    cluster.exec(0, f"mkdir -p -m 700 {q(run_dir)} && cat > {q(run_dir)}/node_launcher.sh && "
                    f"touch {q(run_dir)}/env.sh", input=launcher)
    # The launcher adds --node-rank=N after argv[0]: the stand-in drops it.
    cluster.exec(0, f"cat > {q(generator)}", input=GENERATOR)
    cluster.exec(0, f"printf '#!/bin/sh\\nshift\\nexec python3 {generator} \"$@\"\\n' > "
                    f"{BENCH_DIR}/torchrun && chmod 755 {BENCH_DIR}/torchrun")
    started = cluster.exec(0, launcher_start_command(f"{run_dir}/node_launcher.sh", 0, registry,
                                                     run_id, workdir=BENCH_DIR))
    pid = int(started.stdout.strip().split()[-1])
    deadline = time.monotonic() + 600
    state = ""
    while time.monotonic() < deadline:
        state = cluster.exec(0, f"cat {q(registry)}/{run_id}/node_0/state 2>/dev/null",
                             check=False).stdout.strip()
        if state in ("exited", "killed", "stopped"):
            break
        time.sleep(0.2)
    size = cluster.exec(0, f"stat -c %s {q(output_dir)}/node_0_output.log").stdout.strip()
    print(f"  run {run_id}: launcher {state}, output log {int(size) / 1e6:.1f} MB", flush=True)
    return run_id, output_dir, pid, int(size)


def mb_per_s(size: int, seconds: float) -> str:
    return f"{size / 1e6 / seconds:.1f} MB/s" if seconds > 0 else "-"


def timed_child(argv: list[str], timeout: float) -> dict[str, float]:
    """Run argv, reading its stdout through a pipe; wall seconds, bytes read, peak RSS (MiB)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    received = 0
    last = b""
    deadline = started + timeout
    os.set_blocking(process.stdout.fileno(), True)
    while True:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            return {"seconds": float("nan"), "bytes": received, "rss_mib": float("nan"),
                    "timed_out": 1.0}
        chunk = os.read(process.stdout.fileno(), 1 << 20)
        if not chunk:
            break
        received += len(chunk)
        last = (last + chunk)[-4096:]
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {process.returncode}: {stderr[-2000:]}")
    return {"seconds": seconds, "bytes": received, "rss_mib": usage.ru_maxrss / 1024,
            "last": last.decode(errors="replace")[-300:]}


def console_worker(config: str, output_dir: str, pid: int) -> None:
    """In its own process: the launch's Watcher streaming node 0's output log once; prints JSON."""
    from fabric import Config
    from invoke import Context
    from rich.console import Console

    from tasks.cluster.session import ClusterSession
    from tasks.lib.runspec import LaunchFlags
    from tasks.run.plan import build_plan, resolve_spec
    from tasks.run.watch import Watcher

    fab_config = Config(runtime_path=config)
    fab_config.load_runtime()
    with tempfile.TemporaryDirectory() as tmp, ClusterSession(Context(fab_config)) as session:
        spec = resolve_spec(session, LaunchFlags(hang_timeout="0", nproc="1"), {}, {})
        plan = build_plan(session, spec, run_id=new_run_id(), run_dir=Path(tmp) / "run", nproc=1,
                          master_addr=session.nodes[0].label, master_port=29500, ifnames=["eth0"],
                          facts=None)
        plan = replace(plan, output_dir=output_dir)
        console_file = open(Path(tmp) / "console.txt", "w")  # noqa: SIM115 - closed below
        watcher = Watcher(session, plan, {0: pid}, Console(file=console_file, soft_wrap=True))
        watch = watcher.watches[0]
        session.nodes[0].run("true")  # the SSH connection is open before the clock starts
        # When the last line was handled: the stream itself ends up to tail's poll interval
        # (0.5 s) later, when tail notices the launcher is gone.
        last = [0.0]
        name = "_on_lines" if hasattr(watcher, "_on_lines") else "_on_line"  # before issue 26
        handle = getattr(watcher, name)

        def timed(*args):
            handle(*args)
            last[0] = time.monotonic()

        setattr(watcher, name, timed)
        started = time.monotonic()
        watcher.start_tails()
        watch.tail_done.wait()
        ended = time.monotonic() - started
        seconds = last[0] - started
        watcher.close()
        console_file.close()
        log = plan.run_dir / plan.record.node(0).log
        print(json.dumps({"seconds": seconds, "ended": ended, "log_bytes": log.stat().st_size,
                          "console_bytes": (Path(tmp) / "console.txt").stat().st_size,
                          "error": repr(watch.tail_error) if watch.tail_error else None,
                          "last_line": list(watch.lines)[-1] if watch.lines else None}))


def measure(cluster, config: Path, registry: str, paths: list[str], mb: int, long_line: int,
            timeout: float) -> None:
    run_id, output_dir, pid, node_bytes = start_run(cluster, registry, mb, long_line)
    what = f"{long_line} MB on one line" if long_line else f"{mb} MB of lines"
    if "logs" in paths:
        result = timed_child([FAB, "-f", str(config), "logs", "--run", run_id], timeout)
        if result.get("timed_out"):
            print(f"logs     {what}: not done within {timeout:.0f} s "
                  f"({result['bytes'] / 1e6:.1f} MB printed by then)", flush=True)
        else:
            print(f"logs     {what}: {result['seconds']:.2f} s from start to exit "
                  f"({mb_per_s(node_bytes, result['seconds'])} of node output), "
                  f"{result['bytes'] / 1e6:.1f} MB printed, peak RSS {result['rss_mib']:.0f} MiB",
                  flush=True)
    if "console" in paths:
        result = timed_child([sys.executable, __file__, "--console-worker", str(config),
                              output_dir, str(pid)], timeout)
        if result.get("timed_out"):
            print(f"console  {what}: not done within {timeout:.0f} s", flush=True)
        else:
            figures = json.loads(result["last"].strip().splitlines()[-1])
            print(f"console  {what}: last line after {figures['seconds']:.2f} s "
                  f"({mb_per_s(node_bytes, figures['seconds'])} of node output; stream ended "
                  f"after {figures['ended']:.2f} s), {figures['log_bytes'] / 1e6:.1f} MB into the "
                  f"controller log, {figures['console_bytes'] / 1e6:.1f} MB to the console, "
                  f"peak RSS {result['rss_mib']:.0f} MiB, error {figures['error']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5,10,20,50", help="MB of lines per run")
    parser.add_argument("--long-line", type=int, default=8, help="MB on one line (0: skip)")
    parser.add_argument("--paths", default="logs,console")
    parser.add_argument("--timeout", type=float, default=600.0, help="per measurement")
    parser.add_argument("--console-worker", nargs=3, metavar=("CONFIG", "OUTPUT_DIR", "PID"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.console_worker:
        config, output_dir, pid = args.console_worker
        console_worker(config, output_dir, int(pid))
        return 0

    from tests.simcluster import SimCluster

    paths = [p for p in args.paths.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        cluster = SimCluster(name=f"bno-{os.getpid()}", nodes=1).up()
        try:
            data = yaml.safe_load(cluster.write_fabric_config(Path(tmp) / "sim.yaml").read_text())
            registry = f"/tmp/bench-registry-{os.getpid()}"
            data["cluster"].update(experiments_dir=str(Path(tmp) / "experiments"),
                                   registry_dir=registry)
            config = Path(tmp) / "bench.yaml"
            config.write_text(yaml.safe_dump(data))
            cluster.exec(0, f"mkdir -p -m 755 {BENCH_DIR}")
            print(f"checkout {ROOT}, 1 sim node over SSH, load {os.getloadavg()[0]:.1f}", flush=True)
            for mb in (int(s) for s in args.sizes.split(",") if s):
                measure(cluster, config, registry, paths, mb, 0, args.timeout)
            if args.long_line:
                measure(cluster, config, registry, paths, 0, args.long_line, args.timeout)
            print(f"load at the end {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
