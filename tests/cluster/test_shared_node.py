"""Shared nodes: a second, unprivileged user on the simulated nodes plays the attacker.

GPU nodes are shared and /tmp is everyone's. Each test here is one way another user of a node
could hijack, redirect or block our runs (issue "shared nodes", docs/SECURITY.md); each asserts
that our launch (or stop, or docker-up) either works or stops with a message naming the path and
the fix, and that nothing of the attacker's was written through or run. The attacker is a real
Unix user (`gemm-attacker`, created here when missing) whose commands run on the node through
`runuser`; we are root, as the sim's fab runtime config connects.
"""
from __future__ import annotations

import pwd
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.lib.registry import launcher_start_command, render_node_launcher, stop_command
from tests.helpers import REPO, docker_config, run_fab
from tests.simcluster import SimCluster
from tests.simcluster.testing import make_sim_cluster

pytestmark = pytest.mark.cluster

ATTACKER = "gemm-attacker"
FAKE_TORCHRUN = REPO / "tests" / "fake_torchrun.py"
FAST = ["--no-docker", "--override", "training.max_steps=2", "--override",
        "calibration.compute_steps=1", "--override", "calibration.comm_steps=1"]
q = shlex.quote


@pytest.fixture(scope="module")
def attacker() -> tuple[str, int]:
    """The attacker's name and uid: a system user without a home or password."""
    try:
        return ATTACKER, pwd.getpwnam(ATTACKER).pw_uid
    except KeyError:
        pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/bash", ATTACKER],
                   check=True, capture_output=True)
    return ATTACKER, pwd.getpwnam(ATTACKER).pw_uid


def as_attacker(sim: SimCluster, index: int, script: str, check: bool = True):
    return sim.exec(index, f"cd / && runuser -u {ATTACKER} -- bash -c {q(script)}", check=check)


def listing(sim: SimCluster, index: int, path: str) -> str:
    """Every entry under path (kind, owner, mode, size, symlink target): what "unchanged" means."""
    return sim.exec(index, f"find {q(path)} -printf '%y %u %m %s %p %l\\n' 2>/dev/null | sort",
                    check=False).stdout


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Iterator[tuple[SimCluster, Path, Path]]:
    """A 2-node cluster of this module's own: its /tmp has no registry of ours yet, so the
    attacker can get there first, as on a node we have not used since its reboot."""
    with make_sim_cluster(prefix="sh", nodes=2) as sim:
        tmp = tmp_path_factory.mktemp("shared")
        data = yaml.safe_load(sim.write_fabric_config(tmp / "sim.yaml").read_text())
        data["cluster"]["experiments_dir"] = str(tmp / "experiments")
        config = tmp / "shared.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        synced = run_fab(config, "sync", timeout=120)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        yield sim, config, tmp / "experiments"


def launch(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    for _ in range(3):  # a file saved in this checkout between sync and launch: sync again
        result = run_fab(config, "launch", *FAST, *args, timeout=240)
        if "checkout differs" not in result.stderr:
            return result
        run_fab(config, "sync", timeout=120)
    return result


# -- finding 1: the registry in a shared, predictable place ---------------------------------------

def test_a_registry_planted_by_another_user_is_refused_and_never_written_through(fresh, attacker):
    sim, config, _ = fresh
    name, uid = attacker
    ours = "/tmp/gemm-runs-0"  # root's per-user registry: the attacker knows our uid
    bait = f"/tmp/attacker-{uuid.uuid4().hex[:6]}"
    # Node 0: a symlink to a directory of the attacker's; node 1: the directory itself, 0777.
    as_attacker(sim, 0, f"mkdir -m 755 {bait} && echo theirs > {bait}/keep && ln -s {bait} {ours}")
    as_attacker(sim, 1, f"mkdir -m 777 {ours} && echo theirs > {ours}/keep")
    before = [listing(sim, 0, bait), listing(sim, 1, ours)]
    try:
        result = launch(config)
        assert result.returncode != 0, result.stdout
        err = result.stderr
        assert f"refusing the run registry (cluster.registry_dir) {ours}" in err, err
        for index in (0, 1):  # node 0's is the symlink: judged itself, never followed
            assert re.search(rf"node {index} .*{ours} is owned by {name}", err), err
        assert "choose another path" in err
        # Nothing of ours went into the attacker's directories (the symlink was not followed).
        assert [listing(sim, 0, bait), listing(sim, 1, ours)] == before
        for index in (0, 1):
            assert sim.exec(index, "grep -lzs '^GEMM_RUN_ID=' /proc/[0-9]*/environ | wc -l"
                            ).stdout.strip() == "0"
    finally:
        sim.exec(0, f"rm -rf {ours} {bait}", check=False)
        sim.exec(1, f"rm -rf {ours}", check=False)
    # With the planted entries gone, the same launch works (and makes the registry 0700, ours).
    result = launch(config)
    assert result.returncode == 0, result.stdout + result.stderr
    for index in (0, 1):
        assert sim.exec(index, f"stat -c '%U %a %F' {ours}").stdout.split() == [
            "root", "700", "directory"]


def test_a_planted_run_entry_in_our_registry_is_impossible_and_the_run_dir_is_private(
        fresh, attacker):
    """Once the registry exists (0700, ours) the attacker cannot plant a fake "running" entry or
    pre-create a future run's entry; the node run directories are 0700 and env.sh 0600."""
    sim, config, experiments = fresh
    result = launch(config)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = re.search(r"^launch: (multinode_\S+): ", result.stdout, re.M).group(1)
    assert re.fullmatch(r"multinode_\d+ch_\d+th_\d{8}_\d{6}_[0-9a-f]{6}", run_id)
    planted = as_attacker(sim, 0, f"mkdir -p /tmp/gemm-runs-0/{run_id}_x/node_0", check=False)
    assert planted.returncode != 0 and "Permission denied" in planted.stderr
    node_run_dir = f"{sim.workdir}/experiments/{run_id}"
    for index in (0, 1):
        assert sim.exec(index, f"stat -c %a {q(node_run_dir)} {q(node_run_dir + '/env.sh')}"
                        ).stdout.split() == ["700", "600"]
    assert (experiments / run_id).stat().st_mode & 0o077 == 0


# -- finding 3: another user's fake run neither blocks nor counts ---------------------------------

def test_another_users_marked_processes_and_entries_do_not_block_or_count(fresh, attacker):
    sim, config, _ = fresh
    name, uid = attacker
    fake = "multinode_28ch_256th_20990101_000000_fake00"
    reg = f"/tmp/gemm-runs-{uid}"
    # Their own registry with a "running" entry, and a process carrying our markers.
    as_attacker(sim, 0, f"mkdir -p -m 700 {reg}/{fake}/node_0 && cd {reg}/{fake}/node_0 && "
                        f"echo running > state && echo {fake} > run_id && echo 0 > node_rank")
    decoy = int(as_attacker(sim, 0, f"GEMM_RUN_ID={fake} GEMM_NODE_RANK=0 setsid sleep 300 "
                                    "</dev/null >/dev/null 2>&1 & echo $!").stdout.strip())
    try:
        status = run_fab(config, "status", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert fake not in status.stdout
        result = launch(config)  # not "a run is active on the cluster" (exit 3)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "a run is active" not in result.stderr
        stopped = run_fab(config, "emergency-stop", timeout=60)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert fake not in stopped.stdout
        assert sim.exec(0, f"kill -0 {decoy}", check=False).returncode == 0  # theirs, untouched
    finally:
        sim.exec(0, f"kill -9 {decoy}; rm -rf {reg}", check=False)


# -- finding 8: root's emergency-stop is scoped to root's runs --------------------------------------

def start_attackers_run(sim: SimCluster, index: int, uid: int) -> tuple[str, str]:
    """A real node launcher (around tests/fake_torchrun.py) run by the attacker in their own
    registry and workdir: another user's legitimate run on a shared node."""
    run_id = f"multinode_28ch_256th_20990101_000000_{uuid.uuid4().hex[:6]}"
    workdir = f"/tmp/attacker-work-{uuid.uuid4().hex[:6]}"
    run_dir = f"{workdir}/experiments/{run_id}"
    output_dir = f"{run_dir}/out"
    launcher = render_node_launcher(
        run_id=run_id, registry_dir=None, run_dir=run_dir, output_dir=output_dir,
        env_script=f"{run_dir}/env.sh", workdir=workdir,
        torchrun_argv=[str(FAKE_TORCHRUN), "--output-dir", output_dir, "--interval", "0.2"],
        wrapper_argv=None, container=None, venv=None)
    as_attacker(sim, index, f"mkdir -m 700 {workdir} && mkdir -p -m 700 {run_dir} && "
                            f": > {run_dir}/env.sh && cat > {run_dir}/node_launcher.sh <<'EOF'\n"
                            f"{launcher}\nEOF\n")
    start = launcher_start_command(f"{run_dir}/node_launcher.sh", 0, None, run_id)
    as_attacker(sim, index, start)
    return run_id, workdir


def run_pids(sim: SimCluster, index: int, run_id: str) -> list[str]:
    return sim.exec(index, f"grep -lzxsF -e GEMM_RUN_ID={run_id} /proc/[0-9]*/environ || true"
                    ).stdout.split()


def test_roots_emergency_stop_spares_other_users_unless_all_users(fresh, attacker):
    sim, config, _ = fresh
    name, uid = attacker
    run_id, workdir = start_attackers_run(sim, 1, uid)
    try:
        # Launcher, fake torchrun and its 2 workers (the workers start a moment later).
        deadline = time.monotonic() + 30
        while len(run_pids(sim, 1, run_id)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        theirs = run_pids(sim, 1, run_id)
        assert len(theirs) >= 4, theirs

        mine = run_fab(config, "emergency-stop", timeout=60)
        assert mine.returncode == 0, mine.stdout + mine.stderr
        assert run_id not in mine.stdout
        assert set(theirs) <= set(run_pids(sim, 1, run_id))  # every one of theirs still there

        # Not root: refused on the node, nothing killed.
        refused = as_attacker(sim, 1, stop_command(None, None, 0, True, all_users=True),
                              check=False)
        assert refused.returncode == 2 and "--all-users needs root" in refused.stderr

        everyone = run_fab(config, "emergency-stop", "--all-users", timeout=60)
        assert everyone.returncode == 0, everyone.stdout + everyone.stderr
        assert f"run {run_id} of user {name} node 0 killed" in everyone.stdout
        deadline = time.monotonic() + 10
        while run_pids(sim, 1, run_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run_pids(sim, 1, run_id) == []
        help_text = run_fab(config, "--help", "emergency-stop", timeout=30).stdout
        assert "--all-users" in help_text and "other users' runs" in help_text
    finally:
        for pid in run_pids(sim, 1, run_id):
            sim.exec(1, f"kill -9 {pid.split('/')[2]}", check=False)
        sim.exec(1, f"rm -rf {workdir} /tmp/gemm-runs-{uid}", check=False)


# -- finding 2: docker-up never runs a compose file another user could write -----------------------

@pytest.mark.docker
@pytest.mark.parametrize("planted_by", ["attacker", "a world-writable mode"])
def test_docker_up_refuses_a_registry_others_can_write(cluster_docker, image, attacker,
                                                       tmp_path, planted_by):
    sim = cluster_docker
    name, _ = attacker
    registry = f"/tmp/gemm-shared-{uuid.uuid4().hex[:6]}"
    container = f"gemm-shared-{uuid.uuid4().hex[:6]}"
    config = docker_config(sim, tmp_path / "up.yaml", image, container=container)
    data = yaml.safe_load(config.read_text())
    data["cluster"]["registry_dir"] = registry
    config.write_text(yaml.safe_dump(data))
    pwned = f"/tmp/pwned-{uuid.uuid4().hex[:6]}"
    # What the attacker wants docker compose to run as root: a service writing to the host.
    evil = (f"services:\n  evil:\n    image: {image}\n    container_name: {container}\n"
            f"    command: sh -c 'touch /host{pwned}; sleep 60'\n    volumes: ['/tmp:/host/tmp']\n")
    for index in (0, 1):
        make = (f"mkdir -m 777 {registry} && mkdir -m 777 {registry}/docker && "
                f"cat > {registry}/docker/docker-compose.yaml <<'EOF'\n{evil}EOF\n")
        if planted_by == "attacker":
            as_attacker(sim, index, make)
        else:
            sim.exec(index, make)
    before = [listing(sim, i, registry) for i in (0, 1)]
    try:
        result = run_fab(config, "docker-up", "--wait", "20", timeout=180)
        assert result.returncode != 0, result.stdout
        owner = (f"owned by {name}" if planted_by == "attacker"
                 else "is writable by other users (mode 777)")
        assert f"refusing directory {registry}" in result.stderr, result.stderr
        assert owner in result.stderr and result.stderr.count(registry) >= 2, result.stderr
        for index in (0, 1):
            assert sim.exec(index, f"ls {pwned}", check=False).returncode != 0
            assert sim.exec(index, f"docker ps -aq --filter name={container}").stdout.strip() == ""
        assert [listing(sim, i, registry) for i in (0, 1)] == before
    finally:
        for index in (0, 1):
            sim.exec(index, f"docker rm -f {container} >/dev/null 2>&1; rm -rf {registry} {pwned}",
                     check=False)
