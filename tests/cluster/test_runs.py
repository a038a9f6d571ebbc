"""fab status / logs / stop / emergency-stop on the simulated cluster, against real node launchers.

The launchers are rendered here (tasks.lib.registry) around tests/fake_torchrun.py -- a torchrun
stand-in whose workers live in sessions of their own, as torch's do -- pushed into each node's own
/srv and started over real SSH with launcher_start_command, exactly as `fab launch` does. The
tasks run as `fab -f <runtime config>` subprocesses. Every test uses its own registry dir and
run id, and kills what it started, so the shared clusters are left as found.
"""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fabric import Connection

from tasks.cluster.hostkeys import apply_host_key_policy
from tasks.lib.quoting import sh_quote
from tasks.lib.registry import (
    SCAN_KILL_SH,
    launcher_start_command,
    render_node_launcher,
    stop_command,
)
from tests.helpers import REPO, docker_config, run_fab, wait_until
from tests.simcluster import SimCluster

pytestmark = pytest.mark.cluster

FAKE_TORCHRUN = REPO / "tests" / "fake_torchrun.py"
WORKDIR = "/srv/gemm"  # the sim's default: each node's own /srv


# -- helpers ----------------------------------------------------------------------------------------

def new_run_id() -> str:
    return f"multinode_28ch_256th_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"


def write_config(cluster: SimCluster, path: Path, registry: str, **docker: object) -> Path:
    config = yaml.safe_load(cluster.write_fabric_config().read_text())
    config["cluster"]["registry_dir"] = registry
    config["docker"].update(docker)
    path.write_text(yaml.safe_dump(config))
    return path


def connect(cluster: SimCluster, index: int) -> Connection:
    connection = Connection(cluster.nodes[index].address, user="root", connect_kwargs={
        "key_filename": [str(cluster.key_path)], "look_for_keys": False, "allow_agent": False})
    apply_host_key_policy(connection.client, "reject", cluster.known_hosts_path)
    return connection


class Run:
    """One fake run on some nodes of a cluster: bundle pushed, launchers started over SSH."""

    def __init__(self, cluster: SimCluster, registry: str, *, container: str | None = None,
                 fake_args: tuple[str, ...] = (), workdir: str = WORKDIR):
        self.cluster = cluster
        self.registry = registry
        self.run_id = new_run_id()
        self.container = container
        self.run_dir = f"{workdir}/experiments/{self.run_id}"
        self.output_dir = f"{self.run_dir}/256thread_28channels"
        self.launcher_path = f"{self.run_dir}/node_launcher.sh"
        nproc = fake_args[fake_args.index("--nproc") + 1] if "--nproc" in fake_args else "2"
        self.nproc = int(nproc)
        self.launcher = render_node_launcher(
            run_id=self.run_id, registry_dir=registry, run_dir=self.run_dir,
            output_dir=self.output_dir, env_script=f"{self.run_dir}/env.sh", workdir=workdir,
            torchrun_argv=[str(FAKE_TORCHRUN), "--output-dir", self.output_dir, *fake_args],
            wrapper_argv=None, container=container, venv=None)

    def push(self, index: int) -> None:
        # Replaced, not rewritten in place: on a shared filesystem another node's launcher runs it.
        # Private (0700), as fab launch makes it: the start refuses a run dir others can read.
        self.cluster.exec(index, f"mkdir -p -m 700 {sh_quote(self.run_dir)} && "
                          f"cat > {sh_quote(self.launcher_path)}.{index} && "
                          f"mv -f {sh_quote(self.launcher_path)}.{index} {sh_quote(self.launcher_path)} && "
                          f"printf 'export FAKE_ENV=%s\\n' node{index} > "
                          f"{sh_quote(self.run_dir + '/env.sh')}", input=self.launcher)

    def start(self, index: int, connection: Connection | None = None) -> int:
        self.push(index)
        own = connection is None
        connection = connection or connect(self.cluster, index)
        try:
            result = connection.run(launcher_start_command(self.launcher_path, index,
                                                           self.registry, self.run_id),
                                    hide=True, in_stream=False, timeout=30)
        finally:
            if own:
                connection.close()
        return int(result.stdout.strip())

    def entry_value(self, index: int, name: str) -> str:
        path = f"{self.registry}/{self.run_id}/node_{index}/{name}"
        return self.cluster.exec(index, f"cat {sh_quote(path)} 2>/dev/null", check=False).stdout.strip()

    def recorded_pid(self, index: int, name: str) -> tuple[str, str]:
        """A pid file's "pid start-time" (the start time tells a reused pid apart)."""
        pid, _, start = self.entry_value(index, name).partition(" ")
        return pid, start

    def steps(self, index: int) -> int:
        """Steps of the node's first rank (the output dir may be shared by every node)."""
        path = f"{self.output_dir}/rank_{index * self.nproc:02d}_metrics.jsonl"
        out = self.cluster.exec(index, f"cat {sh_quote(path)} 2>/dev/null | wc -l").stdout
        return int(out.strip() or 0)

    def wait_steps(self, indices: list[int], at_least: int = 2, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.steps(i) >= at_least for i in indices):
            assert time.monotonic() < deadline, f"no progress on {indices}"
            time.sleep(0.1)

    def kill_all(self) -> None:
        for index in range(len(self.cluster.nodes)):
            self.cluster.exec(index, stop_command(self.registry, self.run_id, 0, True), check=False)
            self.cluster.exec(index, f"rm -rf {sh_quote(self.run_dir)}", check=False)


def marked_pids(run_id: str) -> list[int]:
    """Every process of the run on every node: from here (the host) all node pid namespaces
    are visible, containers' included."""
    marker = f"GEMM_RUN_ID={run_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def wait_gone(run_id: str, timeout: float) -> float:
    started = time.monotonic()
    while marked_pids(run_id):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"processes of {run_id} still alive: {marked_pids(run_id)}")
        time.sleep(0.02)
    return time.monotonic() - started


def start_decoy(cluster: SimCluster, index: int) -> int:
    """A process named like ours (command line with train.py and torchrun), not ours."""
    out = cluster.exec(index, "setsid bash -c 'exec -a \"python train.py torchrun --nnodes 2\" "
                       "sleep 300' </dev/null >/dev/null 2>&1 & echo $!").stdout
    return int(out.strip())


def alive_in_node(cluster: SimCluster, index: int, pid: int) -> bool:
    return cluster.exec(index, f"kill -0 {pid}", check=False).returncode == 0


@pytest.fixture
def registry(cluster3: SimCluster) -> Iterator[str]:
    """A registry dir of this test's own on cluster3's nodes, removed afterwards."""
    path = f"/tmp/gemm-runs-test-{uuid.uuid4().hex[:8]}"
    yield path
    for index in range(len(cluster3.nodes)):
        cluster3.exec(index, f"rm -rf {sh_quote(path)}", check=False)


# -- tests ------------------------------------------------------------------------------------------

def test_status_logs_and_graceful_stop(cluster3: SimCluster, registry: str, tmp_path: Path) -> None:
    config = write_config(cluster3, tmp_path / "runs.yaml", registry, enabled=False)
    run = Run(cluster3, registry)
    nodes = list(range(len(cluster3.nodes)))
    try:
        pids = [run.start(i) for i in nodes]
        run.wait_steps(nodes)

        status = run_fab(config, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        rows = [line for line in status.stdout.splitlines() if run.run_id in line]
        assert len(rows) == len(nodes), status.stdout
        for node, row in zip(cluster3.nodes, rows):
            assert node.address in row and "running" in row, row

        logs = run_fab(config, "logs", "--run", run.run_id)
        assert logs.returncode == 0, logs.stdout + logs.stderr
        for index in nodes:
            # env.sh reached the ranks on every node, and the prefix is the node's rank
            assert f"[node {index}] fake torchrun: node {index}, env FAKE_ENV='node{index}'" \
                in logs.stdout, logs.stdout
            assert re.search(rf"^\[node {index}\] step \d+/", logs.stdout, re.M), logs.stdout

        # Stopping on one host leaves the others running.
        one = run_fab(config, "stop", "--run", run.run_id, "--grace", "10",
                      "--hosts", cluster3.nodes[1].address)
        assert one.returncode == 0, one.stdout + one.stderr
        assert run.entry_value(1, "state") == "stopped"
        assert run.entry_value(0, "state") == run.entry_value(2, "state") == "running"

        stop = run_fab(config, "stop", "--run", run.run_id, "--grace", "10")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        wait_gone(run.run_id, 5)
        for index, pid in zip(nodes, pids):
            assert run.entry_value(index, "state") == "stopped"
            # the workers finished their step on SIGTERM (143 from each), torchrun passed it on
            assert run.entry_value(index, "exit_code") == "143"
            recorded, start = run.recorded_pid(index, "launcher.pid")
            assert recorded == str(pid) and start.isdigit()
            log = cluster3.exec(index, f"cat {run.output_dir}/node_{index}_output.log").stdout
            assert "stopping after step" in log and "ended with exit code 143 (stopped)" in log

        after = run_fab(config, "status", "--run", run.run_id)
        assert after.returncode == 0 and after.stdout.count("stopped") == len(nodes), after.stdout
        again = run_fab(config, "stop")
        assert again.returncode == 0 and again.stdout.count("nothing to stop") == len(nodes)
    finally:
        run.kill_all()


def test_emergency_stop_kills_every_node_fast_and_spares_look_alikes(
        cluster3: SimCluster, registry: str, tmp_path: Path) -> None:
    config = write_config(cluster3, tmp_path / "runs.yaml", registry, enabled=False)
    # Workers that ignore SIGTERM: only SIGKILL ends them.
    run = Run(cluster3, registry, fake_args=("--ignore-term", "--nproc", "4"))
    nodes = list(range(len(cluster3.nodes)))
    decoys = [start_decoy(cluster3, i) for i in nodes]
    try:
        for i in nodes:
            run.start(i)
        run.wait_steps(nodes)
        before = len(marked_pids(run.run_id))
        assert before == len(nodes) * 6  # launcher + torchrun + 4 workers per node

        started = time.monotonic()
        result = run_fab(config, "emergency-stop")
        command_s = time.monotonic() - started
        gone_s = command_s + wait_gone(run.run_id, 5)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count(f"run {run.run_id}") == len(nodes), result.stdout
        assert gone_s < 10, gone_s
        print(f"\nemergency-stop, {len(nodes)} nodes x {before // len(nodes)} processes: "
              f"fab emergency-stop {command_s:.2f} s, every process gone after {gone_s:.2f} s")
        for index, decoy in zip(nodes, decoys):
            assert alive_in_node(cluster3, index, decoy), f"decoy on node {index} was killed"
            assert run.entry_value(index, "state") == "killed"
            assert run.entry_value(index, "exit_code") == "137"
    finally:
        run.kill_all()
        for index, decoy in zip(nodes, decoys):
            cluster3.exec(index, f"kill {decoy}", check=False)


def test_launcher_outlives_the_ssh_connection_that_started_it(
        cluster3: SimCluster, registry: str, tmp_path: Path) -> None:
    run = Run(cluster3, registry)
    try:
        connection = connect(cluster3, 1)
        pid = run.start(1, connection)
        # Drop the connection hard (no clean channel close), as a dying controller would.
        connection.client.get_transport().sock.close()
        connection.close()
        run.wait_steps([1], at_least=2)
        steps = run.steps(1)
        wait_until(lambda: run.steps(1) > steps, timeout=15,
                   what="training stopped with the SSH connection", interval=0.2)
        launcher_pid = run.recorded_pid(1, "launcher.pid")[0]
        assert alive_in_node(cluster3, 1, int(launcher_pid))
        assert run.entry_value(1, "state") == "running" and pid > 0
        # its own session: not the sshd session that started it
        sid = cluster3.exec(1, f"ps -o sid= -p {launcher_pid}").stdout.strip()
        assert sid == launcher_pid
    finally:
        run.kill_all()


def test_logs_follow_ends_with_the_run(cluster3: SimCluster, registry: str, tmp_path: Path) -> None:
    config = write_config(cluster3, tmp_path / "runs.yaml", registry, enabled=False)
    run = Run(cluster3, registry, fake_args=("--steps", "15", "--interval", "0.1"))
    try:
        for index in (0, 2):
            run.start(index)
        started = time.monotonic()
        follow = run_fab(config, "logs", "--follow")  # the latest run: this one
        assert follow.returncode == 0, follow.stdout + follow.stderr
        assert time.monotonic() - started < 30
        for index in (0, 2):
            assert f"[node {index}] step 15/15" in follow.stdout, follow.stdout
            assert f"[node {index}] [launcher] node {index}: ended with exit code 0" in follow.stdout
        assert "[node 1]" not in follow.stdout
        missing = run_fab(config, "logs", "--run", "no_such_run")
        assert missing.returncode == 1 and "no entry" in missing.stderr
    finally:
        run.kill_all()


# -- docker ---------------------------------------------------------------------------------------

@pytest.mark.docker
def test_stop_and_emergency_stop_reach_into_the_container(
        cluster_docker: SimCluster, image: str, tmp_path: Path) -> None:
    container = f"runs-{uuid.uuid4().hex[:8]}"
    config = docker_config(cluster_docker, tmp_path / "dockerruns.yaml", image, container=container)
    registry = yaml.safe_load(config.read_text())["cluster"]["registry_dir"]
    nodes = list(range(len(cluster_docker.nodes)))
    runs: list[Run] = []
    try:
        up = run_fab(config, "docker-up")
        assert up.returncode == 0, up.stdout + up.stderr

        # Graceful: SIGTERM reaches torchrun inside the container (not just the exec client).
        graceful = Run(cluster_docker, registry, container=container, workdir=str(REPO))
        runs.append(graceful)
        for i in nodes:
            graceful.start(i)
        graceful.wait_steps(nodes)
        for i in nodes:
            inner, start = graceful.recorded_pid(i, "container.pid")
            assert inner.isdigit() and start.isdigit(), "the in-container pid was not recorded"
        stop = run_fab(config, "stop", "--run", graceful.run_id, "--grace", "10")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        wait_gone(graceful.run_id, 5)
        for i in nodes:
            log = cluster_docker.exec(i, f"tail -5 {graceful.output_dir}/node_{i}_output.log").stdout
            assert graceful.entry_value(i, "state") == "stopped", stop.stdout + log
            assert graceful.entry_value(i, "exit_code") == "143", stop.stdout + log

        # Emergency: SIGKILL everything, the in-container processes included.
        hard = Run(cluster_docker, registry, container=container, workdir=str(REPO),
                   fake_args=("--ignore-term",))
        runs.append(hard)
        for i in nodes:
            hard.start(i)
        hard.wait_steps(nodes)
        in_container = _container_marked(cluster_docker, 0, container, hard.run_id)
        assert in_container >= 3, in_container  # torchrun + 2 workers (+ setsid -w)
        started = time.monotonic()
        result = run_fab(config, "emergency-stop")
        assert result.returncode == 0, result.stdout + result.stderr
        gone_s = time.monotonic() - started + wait_gone(hard.run_id, 5)
        print(f"\nemergency-stop in docker, {len(nodes)} nodes: every process gone after "
              f"{gone_s:.2f} s")
        assert gone_s < 10, result.stdout
        for i in nodes:
            assert _container_marked(cluster_docker, i, container, hard.run_id) == 0
            assert hard.entry_value(i, "state") == "killed"
    finally:
        for run in runs:
            run.kill_all()
        run_fab(config, "docker-down")
        for index in nodes:
            cluster_docker.exec(index, f"docker rm -f {container} >/dev/null 2>&1; "
                                f"rm -rf {registry}", check=False)


def _container_marked(cluster: SimCluster, index: int, container: str, run_id: str) -> int:
    """How many processes inside the container carry the run's markers, counted by the same
    in-container scan stop uses when the host cannot see into the container (signal 0)."""
    out = cluster.exec(index, f"docker exec {container} sh -c {sh_quote(SCAN_KILL_SH)} scan 0 "
                       f"{run_id} {index}").stdout
    return int(out.strip())
