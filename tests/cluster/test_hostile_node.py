"""A node is not trusted: `fab collect` against a node whose output directory holds names
meant to write outside the run directory on the controller (real sshd nodes, tests/simcluster).

The run is one this test writes itself (run.json naming a node run directory under each node's
private /tmp): no ranks need to run for the collection to be the real one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
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
