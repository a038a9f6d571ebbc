"""A node is not trusted (real sshd nodes, tests/simcluster): `fab collect` against a node whose
output directory holds names meant to write outside the run directory on the controller; `fab
check` against another user's checkout; `fab launch`, `fab logs` and `fab status` against a node
whose "ranks" flood the controller with output, write hostile files and values.

The collection's run is one the test writes itself (run.json naming a node run directory under
each node's private /tmp): no ranks need to run for the collection to be the real one. The
launches run a hostile stand-in for torchrun on node 0 (HOSTILE_TORCHRUN).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_fab

pytestmark = pytest.mark.cluster

OUTPUT_DIR = "256thread_28channels"


def tree_state(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under root except `skip`'s subtree: kind, mode and content hash."""
    state: dict[str, tuple] = {}
    for directory, dirs, files in os.walk(root):
        if Path(directory) == skip or skip in Path(directory).parents:
            continue
        for name in dirs + files:
            path = Path(directory, name)
            if path == skip:
                continue
            info = path.lstat()
            if path.is_symlink():
                state[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                state[str(path)] = ("file", info.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                state[str(path)] = ("dir", info.st_mode)
    return state


def write_run(experiments: Path, run_id: str, node_run_dir: str, hosts: list[str]) -> Path:
    from tasks.lib.runrecord import new_record, now_iso

    run_dir = experiments / run_id
    record = new_record(run_id=run_id, run_dir=str(run_dir), node_run_dir=node_run_dir,
                        output_dir=OUTPUT_DIR, controller={}, flags={}, created_at=now_iso())
    record.plan(master_addr=hosts[0], master_port=29500, nproc_per_node=2,
                hosts=[{"host": host} for host in hosts], common_env={},
                per_node_env=[{} for _ in hosts], torchrun_argv=["torchrun"], wrapper_argv=None)
    run_dir.mkdir(parents=True, mode=0o700)
    (run_dir / "run.json").write_text(record.to_json())
    return run_dir


def test_collect_copies_only_plain_regular_files_from_a_hostile_node(cluster3, tmp_path):
    sim = cluster3
    hosts = sim.hosts[:2]
    controller = tmp_path / "controller"
    experiments = controller / "experiments"
    data = yaml.safe_load(Path(sim.write_fabric_config(tmp_path / "sim.yaml")).read_text())
    data["cluster"].update(hosts=hosts, experiments_dir=str(experiments))
    config = tmp_path / "collect.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    run_id = "multinode_28ch_256th_20260101_000000"
    node_run_dir = f"/tmp/gemm-hostile-{uuid.uuid4().hex[:8]}/{run_id}"
    output = f"{node_run_dir}/{OUTPUT_DIR}"
    run_dir = write_run(experiments, run_id, node_run_dir, hosts)
    # Where the old "size<TAB>path<NEWLINE>" listing sent two of the planted names: one level up
    # (the run directory), and an absolute path: a file of the controller's.
    victim = controller / "victim.txt"
    victim.write_text("the controller's own file\n")
    q = shlex.quote
    sim.exec(0, f"mkdir -p {q(output)} && echo '{{}}' > {q(output)}/summary.json && "
                f"echo r0 > {q(output)}/rank_00_metrics.jsonl")
    sim.exec(1, "\n".join([
        "set -e",
        f"o={q(output)}",
        'mkdir -p "$o/sub" && echo r2 > "$o/rank_02_metrics.jsonl" && echo deep > "$o/sub/deep.txt"',
        # A line parser reads the names below as "q", then "../escape" and an absolute path.
        'echo q > "$o/q"',
        "mkdir \"$o/\"$'q\\n7\\t..' && echo escaped > \"$o/\"$'q\\n7\\t..'/escape",
        f"echo escaped > {q(node_run_dir)}/escape",
        # ... and one that reads as an absolute path
        f"mkdir -p \"$o/\"$'q\\n5\\t'{q(str(controller))} {q(str(controller))}",
        f"echo 'abs!' | tee \"$o/\"$'q\\n5\\t'{q(str(victim))} > {q(str(victim))}",
        "echo tab > \"$o/\"$'tab\\tname'",
        'ln -s /etc/passwd "$o/passwd"',
        'ln -s /etc "$o/etcdir"',
    ]))
    before = tree_state(tmp_path, skip=run_dir)
    try:
        result = run_fab(config, "collect", "--run", run_id, timeout=120)
    finally:
        for index in (0, 1):
            sim.exec(index, f"rm -rf {q(str(Path(node_run_dir).parent))} {q(str(controller))}",
                     check=False)
    out = result.stdout + result.stderr
    assert tree_state(tmp_path, skip=run_dir) == before, out
    assert victim.read_text() == "the controller's own file\n"

    assert result.returncode == 1, out
    assert "node 0: 2 file(s)" in result.stdout and "node 1: 3 file(s)" in result.stdout, out
    refusal = [line for line in result.stderr.splitlines() if line.strip().startswith("node 1 (")]
    assert len(refusal) == 1, out
    assert f"node 1 ({hosts[1]}): refused 5 entries of its output directory" in refusal[0]
    assert "'passwd' (a symlink)" in refusal[0] and "'etcdir' (a symlink)" in refusal[0]
    assert "control character in the name" in refusal[0]
    assert "node 0 (" not in result.stderr  # node 0 had nothing to refuse

    outputs = run_dir / OUTPUT_DIR
    arrived = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert arrived == ["256thread_28channels", "256thread_28channels/q",
                       "256thread_28channels/rank_00_metrics.jsonl",
                       "256thread_28channels/rank_02_metrics.jsonl", "256thread_28channels/sub",
                       "256thread_28channels/sub/deep.txt", "256thread_28channels/summary.json",
                       "run.json"]
    assert (outputs / "sub" / "deep.txt").read_text() == "deep\n"
    assert not any(p.is_symlink() for p in run_dir.rglob("*"))

    record = json.loads((run_dir / "run.json").read_text())
    node1 = record["nodes"][1]
    assert node1["collected"] == {"files": 3, "bytes": 10, "skipped": 0, "refused": 5}
    assert len(node1["collect_refused"]) == 5 and node1["collect_error"] is None
    assert record["nodes"][0]["collect_refused"] == []


def test_check_names_the_owner_of_another_users_checkout_and_never_runs_its_config(cluster3,
                                                                                   tmp_path):
    """Another user's checkout as the workdir of node 1: its .git/config names a core.fsmonitor
    program, which git would run as us for `git status`. `fab check` reports the owner instead."""
    sim = cluster3
    import pwd

    try:
        owner = pwd.getpwnam("gemm-probe-test")
        uid, name = owner.pw_uid, owner.pw_name
    except KeyError:
        uid, name = 65533, "uid 65533"
    workdir = f"/srv/gemm-foreign-{uuid.uuid4().hex[:8]}"
    marker = f"/tmp/fsmonitor-ran-{uuid.uuid4().hex[:8]}"
    q = shlex.quote
    sim.exec(1, "\n".join([
        "set -e",
        f"git init -q -b main {q(workdir)} && cd {q(workdir)}",
        "echo x > a && git add a && git -c user.name=t -c user.email=t@t commit -qm one",
        f"printf '#!/bin/sh\\ntouch %s\\n' {q(marker)} > .git/fsmonitor-hook",
        "chmod 755 .git/fsmonitor-hook && git config core.fsmonitor \"$PWD/.git/fsmonitor-hook\"",
        f"chown -R {uid} {q(workdir)}",
    ]))
    data = yaml.safe_load(Path(sim.write_fabric_config(tmp_path / "sim.yaml")).read_text())
    data["cluster"]["workdir"] = workdir
    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        result = run_fab(config, "check", timeout=120)
        ran = sim.exec(1, f"test -e {q(marker)} && echo ran || echo clean").stdout.strip()
    finally:
        sim.exec(1, f"rm -rf {q(workdir)} {q(marker)}", check=False)
    out = result.stdout + result.stderr
    assert ran == "clean", out
    assert result.returncode != 0, out
    line = [x for x in out.splitlines() if f"node 1 ({sim.hosts[1]})" in x and "owned by" in x]
    assert len(line) == 1, out
    assert f"checkout owned by {name}: git is not run in another user's checkout" in line[0]
    assert "set cluster.workdir" in line[0]


# -- what a node prints and writes during a launch (issue 26, findings 4-6) ------------------------

# A "torchrun" for the hostile node: what a compromised node or a broken workload can do from the
# ranks' place. It never imports torch; HOSTILE_MODE (the launch's --env) picks the attack.
HOSTILE_TORCHRUN = r'''#!/usr/bin/env python3
import json, os, sys
out_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("training.output_dir="))
os.makedirs(out_dir, exist_ok=True)
mode = os.environ["HOSTILE_MODE"]
step = {"rank": 0, "world_size": 1, "step": 0, "iter_ms": 10.0, "gemm_tflops": 1.0}
with open(os.path.join(out_dir, "rank_00_metrics.jsonl"), "w") as metrics:
    for i in range(4):
        metrics.write(json.dumps(dict(step, step=i, iter_ms=10.0 + i)) + "\n")
    if mode == "flood":
        metrics.write('{"rank": 0, "step": 9, "iter_ms": ' + "9" * 5000 + "}\n")
out = sys.stdout.buffer
if mode == "flood":
    with open(os.path.join(out_dir, "summary.json"), "w") as summary:
        summary.write("[" * 100000 + "]" * 100000)
    line = b"node0:1234:1300 [0] NCCL INFO Channel 00/32 :    0   1   2   3   4   5   6   7 via P2P/IPC/read\n"
    block = line * 10000
    for _ in range(20_000_000 // len(block)):
        out.write(block)
    out.write(b"step 4/4 | iter 10.0 ms\n")
    out.write(b"x" * 8_000_000)
    out.write(b"\ntrain: rank 0 failed: hostile flood\n")
    out.flush()
    sys.exit(1)
forged = ("$\\frac{$ completed\n\n## Best point\n\n**Best point: 64ch x 512th** "
          "<script>alert(1)</script> [/] [bold red]x")
with open(os.path.join(out_dir, "summary.json"), "w") as summary:
    json.dump({"status": forged, "world_size": 1, "iter_ms": {"median": "=1+1"},
               "effective_settings": {"capture": "on", "channels": 28,
                                      "flags": ['=HYPERLINK("http://evil.example","x")'],
                                      "notes": ["@SUM(1+1)", "<img src=x onerror=alert(2)>"]}},
              summary)
out.write(b"\x1b]0;owned\x1b\\\x1b[2J[/] [bold]not markup[/bold] \x1b[31mred\r\n")
out.write(b"step 4/4 | iter 10.0 ms\n")
'''


@pytest.fixture
def hostile_launch(cluster3, tmp_path):
    """A config whose node 0 runs HOSTILE_TORCHRUN instead of torchrun (through cluster.venv, as
    the launcher activates it), in a workdir of its own synced from this checkout."""
    sim = cluster3
    base = f"/srv/gemm-hostile-{uuid.uuid4().hex[:8]}"
    venv = f"{base}/venv"
    q = shlex.quote
    sim.exec(0, f"mkdir -p -m 755 {q(base)} {q(venv)}/bin && "
                f"printf 'PATH=%s/bin:$PATH; export PATH\\n' {q(venv)} > {q(venv)}/bin/activate && "
                f"cat > {q(venv)}/bin/torchrun && chmod 755 {q(venv)}/bin/torchrun",
             input=HOSTILE_TORCHRUN)
    data = yaml.safe_load(Path(sim.write_fabric_config(tmp_path / "sim.yaml")).read_text())
    data["cluster"].update(hosts=sim.hosts[:1], workdir=f"{base}/checkout", venv=venv,
                           experiments_dir=str(tmp_path / "experiments"))
    data["docker"]["enabled"] = False
    config = tmp_path / "hostile.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    synced = run_fab(config, "sync", timeout=180)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    try:
        yield sim, config, tmp_path / "experiments"
    finally:
        sim.exec(0, f"rm -rf {q(base)}", check=False)


def launch_hostile(config: Path, mode: str, timeout: float) -> subprocess.CompletedProcess[str]:
    for _ in range(3):  # others edit this checkout meanwhile: re-sync when the check refuses
        result = run_fab(config, "launch", "-p", "1", "--env", f"HOSTILE_MODE={mode}",
                         "--override", "training.max_steps=4", timeout=timeout)
        if "checkout differs" not in result.stderr and "synced files differ" not in result.stderr:
            return result
        run_fab(config, "sync", timeout=180)
    return result


def only_run(experiments: Path) -> Path:
    runs = sorted(experiments.glob("multinode_*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_a_flooding_node_with_hostile_files_cannot_stall_or_crash_the_launch(hostile_launch):
    """20 MB of output, an 8 MB line without a newline, a summary.json nested 100 000 deep and a
    metrics line with a 5000-digit number. Before: the launch console took minutes per 20 MB
    (quadratic), and the summary's RecursionError killed the launch with run.json "running".
    Now: the output streams at line rate, the endless line is cut, the rank's failure line after
    the flood is seen, the run ends "failed" with its report, and `fab logs` prints it all."""
    sim, config, experiments = hostile_launch
    result = launch_hostile(config, "flood", timeout=150)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "[node 0] train: rank 0 failed: hostile flood" in result.stdout
    assert "[... line cut: longer than 65536 characters; the rest of it was dropped]" in result.stdout
    assert "launch: summary.json from the nodes is unreadable (nested deeper than 64 levels)" \
        in result.stdout
    run_dir = only_run(experiments)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["first_failure"]["node_rank"] == 0
    report = (run_dir / "report.md").read_text()
    assert "summary.json unreadable: nested deeper than 64 levels" in report
    assert "rank_00_metrics.jsonl: 1 corrupt line(s) skipped" in report

    logs = run_fab(config, "logs", "--run", run_dir.name, timeout=90)
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert logs.stdout.count("\n") > 200_000
    assert "[node 0] train: rank 0 failed: hostile flood" in logs.stdout
    assert "[... line cut: longer than 65536 characters" in logs.stdout


def test_a_nodes_values_are_escaped_in_the_report_the_terminal_and_fab_status(hostile_launch):
    """A summary whose status forges a "Best point" line with HTML and mathtext, formulas for a
    spreadsheet, terminal escapes and rich markup in the output, and a registry state that is
    rich markup: each is shown as the text it is, nowhere acted on."""
    sim, config, experiments = hostile_launch
    result = launch_hostile(config, "values", timeout=150)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "\x1b" not in result.stdout and "no report written" not in out, out[-3000:]
    assert "[node 0] \\x1b]0;owned\\x1b\\\\x1b[2J[/] [bold]not markup[/bold] \\x1b[31mred" \
        in result.stdout
    run_dir = only_run(experiments)
    report = (run_dir / "report.md").read_text()
    lines = report.splitlines()
    # The report's own headings are "## Decision" and "## Iteration time per point": a
    # "## Best point" line or a bold "Best point" at a line's start could only be forged.
    assert "## Decision" in lines and "## Best point" not in lines and not any(
        line.startswith("**Best point: 64ch") for line in lines), report
    assert not re.search(r"(?<!\\)(<script|<img)", report), report
    assert (run_dir / "per_rank_step_time.png").is_file()  # "$\frac{$" drawn as text
    with open(run_dir / "results.csv", newline="") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert cells and not any(cell.startswith(("=", "+", "@")) for cell in cells), cells
    assert any(cell.startswith("'=HYPERLINK") for cell in cells)

    # The node's registry is its word too: a state that is rich markup.
    state = f"/tmp/gemm-runs-0/{run_dir.name}/node_0/state"
    sim.exec(0, f"printf '%s\\n' '[/]' > {shlex.quote(state)}")
    status = run_fab(config, "status", "--run", run_dir.name, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "[/]" in status.stdout and run_dir.name in status.stdout

    logs = run_fab(config, "logs", "--run", run_dir.name, timeout=60)
    assert logs.returncode == 0 and "\x1b" not in logs.stdout, logs.stderr
    assert "[node 0] \\x1b]0;owned" in logs.stdout
