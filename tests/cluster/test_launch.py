"""`fab launch` end to end: real sshd nodes (tests/simcluster), real torchrun gloo ranks.

One 2-node cluster (separate filesystems, interfaces eth0 and ens5) serves the module; each test
drives `fab` as a subprocess with a runtime config pointing experiments_dir at a temp dir. The
first two tests need no cluster: they point the inventory at a TCP listener and check that it
never sees a connection.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

from tests.helpers import wait_until
from tests.simcluster import SimCluster
from tests.simcluster.testing import make_sim_cluster

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).with_name("fab"))
# COLUMNS: rich tables are as wide as the terminal; a pipe would otherwise get 80 columns.
FAB_ENV = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
for name in ("CHANNELS", "THREADS", "NPROC_PER_NODE", "CONFIG_FILE", "MASTER_PORT",
             "SLURM_JOB_NODELIST"):
    FAB_ENV.pop(name, None)
FAST = ["--override", "training.max_steps=4", "--override", "calibration.compute_steps=1",
        "--override", "calibration.comm_steps=1"]
LONG = ["--override", "training.max_steps=100000"]


def fab(config: Path | None, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    argv = [FAB] + (["-f", str(config)] if config else []) + list(args)
    return subprocess.run(argv, cwd=ROOT, env=FAB_ENV, capture_output=True, text=True,
                          timeout=timeout)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- no host may be contacted ----------------------------------------------------------------------

class Listener:
    """A TCP port that counts connections (and closes them at once, so SSH fails fast)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listeners(tmp_path) -> Iterator[tuple[list[Listener], Path]]:
    found = [Listener(), Listener()]
    config = write_config(tmp_path / "unreachable.yaml", {
        "timeouts": {"connect": 3},
        "cluster": {"hosts": [f"127.0.0.1:{found[0].port}", f"localhost:{found[1].port}"],
                    "host_key_policy": "auto-add", "experiments_dir": str(tmp_path / "exp"),
                    "workdir": "/srv/gemm"},
        "docker": {"enabled": False, "platform": "cpu"},
    })
    yield found, config
    for listener in found:
        listener.close()


BAD_FLAGS = [
    (["--channels", "65"], "outside 1-64"),
    (["-t", "300"], "not a value NCCL/RCCL take as given"),
    (["-p", "0"], "at least 1"),
    (["--nproc", "auto"], "counts GPUs"),
    (["--env", "1X=1"], "not a valid variable name"),
    (["--env", "NCCL_MAX_NCHANNELS=4"], "use --channels"),
    (["--override", "max_steps=3"], "section.key=value"),
    (["--override", "training.max_steps=0"], "training.max_steps must be >= 1"),
    (["-C", "config/multi_node/nope.yaml"], "not found"),
    (["--docker", "--no-docker"], "contradict"),
    (["--master-port", "80"], "not a usable port"),
    (["--nccl-preset", "nope"], "unknown NCCL preset"),
]


def test_bad_flags_fail_before_any_host_is_contacted(listeners):
    hosts, config = listeners
    for flags, message in BAD_FLAGS:
        result = fab(config, "launch", *flags, timeout=60)
        assert result.returncode == 2, (flags, result.stdout, result.stderr)
        error = result.stderr.strip()
        assert message in error and len(error.splitlines()) == 1, (flags, error)
    assert [h.connections for h in hosts] == [0, 0]
    # The same command line with valid flags does reach the hosts: the listeners can tell.
    result = fab(config, "launch", "--channels", "64", timeout=60)
    assert result.returncode == 1 and "probe failed on 2 of 2 host(s)" in result.stderr
    assert all(h.connections >= 1 for h in hosts)


def test_dry_run_touches_nothing(listeners, tmp_path):
    hosts, config = listeners
    result = fab(config, "launch", "--dry-run", "-c", "42", "-t", "512",
                 "--env", "NCCL_X=$(touch /tmp/gemm-dry) 'q'", timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert [h.connections for h in hosts] == [0, 0]
    assert not (tmp_path / "exp").exists() and not Path("/tmp/gemm-dry").exists()
    for index, listener in enumerate(hosts):
        assert f"node {index} (" in out and f":{listener.port})" in out
    assert out.count("node_launcher.sh (") == 2 and out.count("env.sh (") == 2
    # No cluster.registry_dir: '' lets each node use its user's /tmp/gemm-runs-<uid>.
    assert out.count("gemm-start '' multinode_42ch_512th_") == 2
    assert "run registry: /tmp/gemm-runs-<uid> of the user on each host" in out
    assert "export NCCL_MIN_NCHANNELS=42" in out and "export RCCL_THREADS_PER_BLOCK=512" in out
    assert "export NCCL_X='$(touch /tmp/gemm-dry) '\"'\"'q'\"'\"''" in out
    assert "--nnodes=2" in out and "--nproc-per-node=2" in out


# -- the embedded default --------------------------------------------------------------------------

def test_embedded_default_runs_here_without_ssh(tmp_path):
    """README's first command: no inventory, this machine, CPU ranks with gloo."""
    config = write_config(tmp_path / "local.yaml", {"cluster": {
        "hosts_file": str(tmp_path / "no_hosts.txt"), "experiments_dir": str(tmp_path / "exp")}})
    result = fab(config, "launch", *FAST, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    run_dir = only_run_dir(tmp_path / "exp")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and record["nodes"][0]["host"] == "localhost"
    assert record["flags"]["accelerator"] == "cpu" and record["world_size"] == 2
    outputs = run_dir / "256thread_28channels"
    assert {"rank_00_metrics.jsonl", "rank_01_metrics.jsonl", "summary.json",
            "node_0_output.log"} <= {p.name for p in outputs.iterdir()}


# -- this machine alone, no cluster: the watcher's ending and `fab collect` ---------------------------

def local_session(tmp_path: Path):
    from invoke import Config, Context

    from tasks.cluster.session import ClusterSession

    return ClusterSession(Context(Config(overrides={"cluster": {
        "hosts_file": str(tmp_path / "no_hosts.txt"), "experiments_dir": str(tmp_path / "exp")}})))


def test_tail_command_from_start_or_from_the_end():
    from tasks.run.watch import tail_command

    assert "tail -n +1 -F" in tail_command("/o/node_0_output.log", 42)
    reopened = tail_command("/o/node_0_output.log", 42, from_start=False)
    assert "tail -n 0 -F" in reopened and "+1" not in reopened


def one_node_plan(session, tmp_path: Path):
    """The plan of a one-node run on this machine (nothing started) and its node's output log,
    holding one line."""
    from tasks.lib.runspec import LaunchFlags
    from tasks.run.plan import build_plan, resolve_spec
    from tasks.run.watch import node_log_path

    spec = resolve_spec(session, LaunchFlags(hang_timeout="0"), {}, {})
    plan = build_plan(session, spec, run_id="multinode_28ch_256th_20260101_000000",
                      run_dir=tmp_path / "run", nproc=1, master_addr="127.0.0.1",
                      master_port=29500, ifnames=["lo"], facts=None)
    plan = replace(plan, output_dir=str(tmp_path / "out"))
    log = Path(node_log_path(plan, 0))
    log.parent.mkdir(parents=True)
    log.write_text("first line\n")
    return plan, log


def test_last_lines_reach_the_controller_log_after_the_registry_says_ended(tmp_path):
    """The registry may report a node's end before its tail delivered the last lines: the watch
    ends only when the streams did, and a line arriving after the files closed raises nothing."""
    from rich.console import Console

    from tasks.run.watch import Watcher

    with local_session(tmp_path) as session:
        plan, log = one_node_plan(session, tmp_path)
        # The "launcher" writes its last line a moment after the registry recorded its end.
        launcher = subprocess.Popen(["bash", "-c", f"sleep 1.5; echo 'last line' >> {shlex.quote(str(log))}"])
        reaper = threading.Thread(target=launcher.wait, daemon=True)  # tail --pid sees zombies
        reaper.start()
        watcher = Watcher(session, plan, {0: launcher.pid}, Console(file=io.StringIO()))
        watch = watcher.watches[0]
        try:
            watcher.start_tails()
            deadline = time.monotonic() + 15
            while "first line" not in watch.lines and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "first line" in watch.lines
            watch.state, watch.exit_code, watch.ended_at = "exited", 0, time.monotonic()
            assert watcher.wait() == "succeeded"
        finally:
            watcher.close()
            reaper.join(10)
        assert watch.tail_done.is_set() and watch.tail_error is None
        written = (plan.run_dir / plan.record.node(0).log).read_text()
        assert written == "first line\nlast line\n"
        watcher._on_lines(watch, ["a line after the end"])  # closed: dropped, no ValueError
        assert (plan.run_dir / plan.record.node(0).log).read_text() == written


def test_the_launchers_last_line_completes_the_stream_while_its_pid_lingers(tmp_path):
    """A launcher whose parent is gone stays a zombie until init reaps it (seconds, where init
    is a container's or a sandbox's), and `tail --pid` sees zombies: once the launcher's own last
    line came through, its stream is complete and the watch does not wait for the pid."""
    from rich.console import Console

    from tasks.run.watch import Watcher

    with local_session(tmp_path) as session:
        plan, log = one_node_plan(session, tmp_path)
        end_line = "[launcher] node 0: ended with exit code 0 (exited)"
        # The "launcher" writes its last line, then its pid stays (as an unreaped zombie's).
        launcher = subprocess.Popen(["bash", "-c", f"sleep 0.5; echo {shlex.quote(end_line)} >> "
                                     f"{shlex.quote(str(log))}; sleep 60"])
        output = io.StringIO()
        watcher = Watcher(session, plan, {0: launcher.pid}, Console(file=output))
        watch = watcher.watches[0]
        try:
            watcher.start_tails()
            wait_until(watch.end_seen.is_set, 15, "the launcher's last line in the stream")
            watch.state, watch.exit_code, watch.ended_at = "exited", 0, time.monotonic()
            assert watcher.wait() == "succeeded"
            assert launcher.poll() is None  # still there: the wait did not end on the pid
        finally:
            watcher.close()
            launcher.kill()
            launcher.wait()
        assert "did not end within" not in output.getvalue(), output.getvalue()
        written = (plan.run_dir / plan.record.node(0).log).read_text()
        assert written == f"first line\n{end_line}\n"
        # Another node's end line (a rank that prints one, a hostile node) completes nothing.
        watcher.watches[0].end_seen.clear()
        watcher._on_lines(watch, ["[launcher] node 3: ended with exit code 0 (exited)"])
        assert not watch.end_seen.is_set()


def write_fake_run(experiments: Path, node_run_dir: Path) -> str:
    """run.json of a one-node run on this machine whose outputs are in node_run_dir."""
    from tasks.lib.runrecord import new_record, now_iso

    run_id = "multinode_28ch_256th_20260101_000000"
    record = new_record(run_id=run_id, run_dir=str(experiments / run_id),
                        node_run_dir=str(node_run_dir), output_dir="256thread_28channels",
                        controller={}, flags={}, created_at=now_iso())
    record.plan(master_addr="127.0.0.1", master_port=29500, nproc_per_node=2,
                hosts=[{"host": "localhost"}], common_env={}, per_node_env=[{}],
                torchrun_argv=["torchrun"], wrapper_argv=None)
    (experiments / run_id).mkdir(parents=True)
    (experiments / run_id / "run.json").write_text(record.to_json())
    return run_id


def test_collect_fails_when_a_host_has_no_output_directory(tmp_path):
    config = write_config(tmp_path / "local.yaml", {"cluster": {
        "hosts_file": str(tmp_path / "no_hosts.txt"), "experiments_dir": str(tmp_path / "exp")}})
    node_run_dir = tmp_path / "node"
    run_id = write_fake_run(tmp_path / "exp", node_run_dir)
    result = fab(config, "collect", "--run", run_id, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "collecting outputs failed on 1 of 1 host(s)" in result.stderr
    assert f"no output directory {node_run_dir}/256thread_28channels" in result.stderr
    record = json.loads((tmp_path / "exp" / run_id / "run.json").read_text())
    assert "no output directory" in record["nodes"][0]["collect_error"]

    (node_run_dir / "256thread_28channels").mkdir(parents=True)
    (node_run_dir / "256thread_28channels" / "summary.json").write_text("{}")
    result = fab(config, "collect", "--run", run_id, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node 0: 1 file(s), 2 bytes copied" in result.stdout
    assert (tmp_path / "exp" / run_id / "256thread_28channels" / "summary.json").read_text() == "{}"


# -- the cluster -----------------------------------------------------------------------------------

@dataclass
class LaunchCluster:
    sim: SimCluster
    config: Path
    experiments: Path

    def sync(self) -> None:
        result = fab(self.config, "sync", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    def launch(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        # Other people edit this checkout while tests run: a file saved between sync and launch
        # makes the checkout check refuse. Re-sync and retry then (CI has no such editors).
        for _ in range(3):
            result = fab(self.config, "launch", *args, timeout=timeout)
            if "checkout differs" not in result.stderr:
                return result
            self.sync()
        return result

    def popen_launch(self, *args: str) -> subprocess.Popen[str]:
        self.sync()
        return subprocess.Popen([FAB, "-f", str(self.config), "launch", *args], cwd=ROOT,
                                env=FAB_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def run_processes(self, run_id: str) -> list[str]:
        """Processes of the run left on any node (by the launch's environment markers)."""
        found = []
        for node in self.sim.nodes:
            out = self.sim.exec(node.index, f"grep -lzxsF -e GEMM_RUN_ID={run_id} "
                                            "/proc/[0-9]*/environ || true").stdout
            found += [f"node{node.index}:{line}" for line in out.split()]
        return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LaunchCluster]:
    with make_sim_cluster(prefix="ln", nodes=2, ifnames=["eth0", "ens5"]) as sim:
        tmp = tmp_path_factory.mktemp("launch")
        data = yaml.safe_load(sim.write_fabric_config(tmp / "sim.yaml").read_text())
        data["cluster"]["experiments_dir"] = str(tmp / "experiments")
        launch = LaunchCluster(sim, write_config(tmp / "launch.yaml", data), tmp / "experiments")
        launch.sync()
        yield launch


@pytest.fixture(autouse=True)
def no_run_left_behind(request):
    """After each test on the module's cluster: kill whatever a failed test left running, so one
    failure does not make every later launch refuse as "busy"."""
    yield
    if "cluster" not in request.fixturenames:
        return
    sim = request.getfixturevalue("cluster").sim
    for node in sim.nodes:
        sim.exec(node.index, "for f in $(grep -lzs '^GEMM_RUN_ID=' /proc/[0-9]*/environ); do "
                             "p=${f#/proc/}; kill -9 ${p%/environ} 2>/dev/null; done; true",
                 check=False)


def only_run_dir(experiments: Path, run_id: str | None = None) -> Path:
    if run_id:
        return experiments / run_id
    runs = sorted(experiments.glob("multinode_*"))
    assert len(runs) >= 1, list(experiments.iterdir()) if experiments.exists() else "no dir"
    return max(runs, key=lambda p: p.stat().st_mtime)


def run_id_of(output: str) -> str:
    match = re.search(r"(multinode_\d+ch_\d+th_\d{8}_\d{6}(?:_[0-9a-f]+)?)", output)
    assert match, output[-2000:]
    return match.group(1)


HOSTILE = {
    "GEMMTEST_SUBST": "$(touch /tmp/gemm-pwned)",
    "GEMMTEST_QUOTES": "it's \"quoted\" `x`",
    "GEMMTEST_SPACES": "  two  spaces  ",
    "GEMMTEST_NEWLINE": "line1\nline2",
}


@pytest.mark.cluster
def test_two_nodes_bare_every_rank_collected_env_literal(cluster):
    env_flags = [arg for name, value in HOSTILE.items() for arg in ("--env", f"{name}={value}")]
    result = cluster.launch("--no-docker", "-c", "42", *FAST, *env_flags)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    run_dir = only_run_dir(cluster.experiments, run_id_of(result.stdout))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and record["exit_status"] == 0
    assert [n["ifname"] for n in record["nodes"]] == ["eth0", "ens5"]
    assert [n["exit_code"] for n in record["nodes"]] == [0, 0]
    assert all(n["commit"] for n in record["nodes"])

    # Every rank's outputs, from two separate filesystems, are on the controller now.
    outputs = run_dir / "256thread_42channels"
    names = {p.name for p in outputs.iterdir()}
    assert {f"rank_{r:02d}_metrics.jsonl" for r in range(4)} <= names
    assert {"node_0_output.log", "node_1_output.log", "summary.json"} <= names
    assert record["nodes"][1]["collected"]["files"] >= 3
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert [name.split("_")[1] for name in logs] == ["0", "1"]
    assert "[node 1] step 4/4" in result.stdout
    # The closing table: one row per node (status, exit code, steps, duration), then headline.
    for node in cluster.sim.nodes:
        assert re.search(rf"│ {node.index}\s+│ {re.escape(node.address)}\s+│ exited\s+│ 0\s+│ "
                         r"4/4\s+│ \d+\.\d s", result.stdout), result.stdout[-3000:]
    headline = re.search(r"│ iter ms\s+│\s+([0-9.e+-]+) │", result.stdout)
    assert headline and float(headline.group(1)) == pytest.approx(
        record["headline"]["iter_ms"], rel=1e-3), result.stdout[-2000:]

    # Every env.sh variable reached the ranks, per node where it differs, hostile values literal.
    summary = json.loads((outputs / "summary.json").read_text())
    ranks_env = summary["env"]
    for name, value in record["env"]["common"].items():
        assert ranks_env.get(name) == value, name
    assert {name: ranks_env[name] for name in HOSTILE} == HOSTILE
    for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        assert summary["env_differences"][name] == {"0": "eth0", "1": "eth0", "2": "ens5",
                                                    "3": "ens5"}
    for node in cluster.sim.nodes:
        assert cluster.sim.exec(node.index, "test -e /tmp/gemm-pwned", check=False).returncode == 1
    assert not Path("/tmp/gemm-pwned").exists()


def kill_local_rank(sim: SimCluster, node: int, run_id: str, local_rank: int) -> str:
    script = (f"for e in /proc/[0-9]*/environ; do "
              f"grep -qzxF GEMM_RUN_ID={run_id} $e 2>/dev/null && "
              f"grep -qzxF LOCAL_RANK={local_rank} $e 2>/dev/null && "
              f"p=${{e#/proc/}} && p=${{p%/environ}} && kill -9 $p && echo $p; done; true")
    return sim.exec(node, script).stdout.strip()


def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> list[str]:
    """Lines of proc's output up to the first matching `pattern` (fails on timeout or exit)."""
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert found.is_set(), f"no {pattern!r} within {timeout} s:\n" + "".join(lines[-30:])
    return lines


@pytest.mark.cluster
def test_fail_fast_after_a_rank_dies_on_node_1(cluster):
    proc = cluster.popen_launch("--no-docker", *LONG)
    try:
        lines = read_until(proc, r"\[node 1\] step \d+/", timeout=150)
        run_id = run_id_of("".join(lines))
        killed = kill_local_rank(cluster.sim, 1, run_id, local_rank=1)
        killed_at = time.monotonic()
        assert killed, "no rank process found on node 1"
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert proc.returncode == 1, output[-3000:]
    assert re.search(r"node 1 \([0-9.]+\) failed first", output), output[-3000:]
    while cluster.run_processes(run_id) and time.monotonic() - killed_at < 15:
        time.sleep(0.2)
    clean_after = time.monotonic() - killed_at
    assert not cluster.run_processes(run_id)
    assert clean_after < 10, f"nodes clean only {clean_after:.1f} s after the rank died"
    record = json.loads((only_run_dir(cluster.experiments, run_id) / "run.json").read_text())
    failure = record["first_failure"]
    assert failure["node_rank"] == 1 and failure["ranks"] == [3], failure
    assert failure["last_lines"] and record["status"] == "failed" and record["exit_status"] == 1
    # Whatever the ending: the outputs of both nodes were collected.
    outputs = only_run_dir(cluster.experiments, run_id) / "256thread_28channels"
    assert {"node_0_output.log", "node_1_output.log"} <= {p.name for p in outputs.iterdir()}


@pytest.mark.cluster
def test_detach_then_logs_then_stop(cluster):
    result = cluster.launch("--no-docker", "--detach", *LONG)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = run_id_of(result.stdout)
    assert f"fab logs --follow --run {run_id}" in result.stdout
    assert f"fab stop --run {run_id}" in result.stdout
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = fab(cluster.config, "logs", "--run", run_id, timeout=60)
        if "[node 1] step" in logs.stdout and "[node 0] step" in logs.stdout:
            break
        time.sleep(1)
    assert "[node 0] step" in logs.stdout and "[node 1] step" in logs.stdout, logs.stdout[-2000:]
    stop = fab(cluster.config, "stop", "--run", run_id, "--grace", "5", timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not cluster.run_processes(run_id)
    status = fab(cluster.config, "status", "--run", run_id, timeout=60)
    assert status.returncode == 0 and status.stdout.count(run_id) == 2, status.stdout
    assert "running" not in status.stdout


def launched_run_id(output: str) -> str:
    """The id of the run this launch started (a --force warning names other runs first)."""
    match = re.search(r"^launch: (multinode_\S+): ", output, re.M)
    assert match, output[-2000:]
    return match.group(1)


def registry_entries(cluster: LaunchCluster) -> dict[int, set[str]]:
    return {node.index: set(cluster.sim.exec(node.index, "ls /tmp/gemm-runs-0 2>/dev/null || true")
                            .stdout.split()) for node in cluster.sim.nodes}


@pytest.mark.cluster
def test_ctrl_c_detaches_and_a_second_launch_is_refused_unless_forced(cluster):
    proc = cluster.popen_launch("--no-docker", *LONG)
    run_id = None
    try:
        lines = read_until(proc, r"\[node 1\] step \d+/", timeout=150)
        run_id = launched_run_id("".join(lines))
        # Ctrl-C in a terminal signals the controller's whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        output = "".join(lines) + rest
        assert proc.returncode == 130, output[-3000:]
        assert "launch: detached (Ctrl-C)" in output
        assert f"fab logs --follow --run {run_id}" in output
        assert f"fab stop --run {run_id}" in output
        record = json.loads((only_run_dir(cluster.experiments, run_id) / "run.json").read_text())
        assert record["status"] == "detached"
        assert cluster.run_processes(run_id), "Ctrl-C stopped the run: it must go on"

        runs_before, entries_before = set(cluster.experiments.iterdir()), registry_entries(cluster)
        busy = fab(cluster.config, "launch", "--no-docker", *FAST, timeout=120)
        assert busy.returncode == 3, busy.stdout[-3000:] + busy.stderr
        for node in cluster.sim.nodes:
            assert f"node {node.index} ({node.address}): run {run_id}" in busy.stderr, busy.stderr
        assert f"fab stop --run {run_id}" in busy.stderr and "--force" in busy.stderr
        assert set(cluster.experiments.iterdir()) == runs_before  # refused before any run dir
        assert registry_entries(cluster) == entries_before       # and before any node start

        forced = cluster.launch("--no-docker", "--force", *FAST)
        assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr
        assert "warning: --force: launching beside active run(s)" in forced.stdout
        forced_id = launched_run_id(forced.stdout)
        assert forced_id != run_id
        record = json.loads((only_run_dir(cluster.experiments, forced_id) / "run.json").read_text())
        assert record["status"] == "succeeded"
        assert cluster.run_processes(run_id), "the forced launch disturbed the active run"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop = fab(cluster.config, "stop", "--run", run_id, "--grace", "5", timeout=60) \
            if run_id else None
    assert stop is not None and stop.returncode == 0, stop and stop.stdout + stop.stderr
    assert not cluster.run_processes(run_id)


@pytest.mark.cluster
def test_launch_refuses_a_node_whose_files_changed_before_touching_any_node(cluster):
    workdir = yaml.safe_load(cluster.config.read_text())["cluster"]["workdir"]
    runs_before, entries_before = set(cluster.experiments.iterdir()), registry_entries(cluster)
    # Someone edited a file on node 1 after the sync: it would run other code than node 0.
    cluster.sim.exec(1, f"echo '# edited on node 1' >> {shlex.quote(workdir + '/README.md')}")
    try:
        result = fab(cluster.config, "launch", "--no-docker", *FAST, timeout=120)
    finally:
        resynced = fab(cluster.config, "sync", timeout=120)  # back to this checkout
    assert resynced.returncode == 0, resynced.stdout + resynced.stderr
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    address = cluster.sim.nodes[1].address
    assert re.search(rf"node 1 \({re.escape(address)}\): its synced files differ from this "
                     r"checkout .*fab sync", result.stderr), result.stderr
    assert "node 0 (" not in result.stderr, result.stderr
    assert set(cluster.experiments.iterdir()) == runs_before
    assert registry_entries(cluster) == entries_before


@pytest.mark.cluster
def test_a_node_that_goes_silent_fails_the_run_and_the_others_are_stopped(cluster):
    """Node 1 drops off the network mid-run (its link cut on the bridge side: no RST, no FIN,
    silence, as when a host dies): the controller declares it lost, stops node 0 and finishes,
    instead of waiting on SSH channel opens (paramiko's default: an hour) or the gloo timeout."""
    node = cluster.sim.nodes[1]
    # gloo's own timeout far away: node 0's ranks must be stopped by the controller, not by it.
    proc = cluster.popen_launch("--no-docker", *LONG, "--override", "distributed.timeout_s=900")
    run_id = None
    try:
        lines = read_until(proc, r"\[node 1\] step \d+/", timeout=150)
        run_id = launched_run_id("".join(lines))
        subprocess.run(["ip", "link", "set", node.host_veth, "down"], check=True)
        cut_at = time.monotonic()
        rest, _ = proc.communicate(timeout=200)
        ended_after = time.monotonic() - cut_at
    finally:
        subprocess.run(["ip", "link", "set", node.host_veth, "up"], check=False)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # Node 1 is back: what it still runs is stopped by the ordinary command.
        stop = fab(cluster.config, "stop", "--run", run_id, "--grace", "3", timeout=120) \
            if run_id else None
    output = "".join(lines) + rest
    assert proc.returncode == 1, output[-3000:]
    assert re.search(rf"node 1 \({re.escape(node.address)}\) failed first: no answer for \d+ s",
                     output), output[-3000:]
    # Not asked again (another timeout): the user is told how to fetch node 1's outputs later.
    assert f"node 1 ({node.address}) was lost: its outputs stay there; once it answers: " \
           f"fab collect --run {run_id}" in output, output[-3000:]
    print(f"\nnode 1 cut off: fab launch ended {ended_after:.1f} s later")
    record = json.loads((only_run_dir(cluster.experiments, run_id) / "run.json").read_text())
    assert record["status"] == "failed" and record["first_failure"]["node_rank"] == 1
    assert [n["state"] for n in record["nodes"]] in (["killed", "lost"], ["stopped", "lost"])
    assert record["nodes"][1]["collect_error"] == "not collected: the node was lost"
    assert not [p for p in cluster.run_processes(run_id) if p.startswith("node0:")], \
        "node 0 was not stopped"
    assert stop is not None and stop.returncode == 0, stop and stop.stdout + stop.stderr
    assert not cluster.run_processes(run_id)


@pytest.mark.cluster
def test_controller_killed_while_attached_run_completes(cluster):
    steps = 60
    proc = cluster.popen_launch("--no-docker", "--override", f"training.max_steps={steps}",
                                "--override", "training.log_interval=1")
    try:
        lines = read_until(proc, r"\[node 1\] step \d+/", timeout=150)
        run_id = run_id_of("".join(lines))
        os.kill(proc.pid, signal.SIGKILL)  # the controller and its SSH connections vanish
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 150
    states = []
    while time.monotonic() < deadline:
        states = [cluster.sim.exec(n.index, f"cat /tmp/gemm-runs-0/{run_id}/node_{n.index}/state "
                                            f"/tmp/gemm-runs-0/{run_id}/node_{n.index}/exit_code "
                                            "2>/dev/null || true").stdout.split()
                  for n in cluster.sim.nodes]
        if all(s and s[0] != "running" and s[0] != "starting" for s in states):
            break
        time.sleep(1)
    assert states == [["exited", "0"], ["exited", "0"]], states
    status = fab(cluster.config, "status", "--run", run_id, timeout=60)
    assert status.returncode == 0 and status.stdout.count("exited") >= 2, status.stdout
    collected = fab(cluster.config, "collect", "--run", run_id, timeout=60)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    outputs = only_run_dir(cluster.experiments, run_id) / "256thread_28channels"
    summary = json.loads((outputs / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_completed"] == steps
    assert {f"rank_{r:02d}_metrics.jsonl" for r in range(4)} <= {p.name for p in outputs.iterdir()}


@pytest.mark.cluster
@pytest.mark.docker
def test_two_nodes_in_docker_every_env_variable_reaches_the_ranks(cluster_docker, tmp_path):
    sim = cluster_docker
    data = yaml.safe_load(sim.write_fabric_config(tmp_path / "sim.yaml").read_text())
    # The session cluster is shared: our own container, registry and outputs.
    data["cluster"]["experiments_dir"] = str(tmp_path / "experiments")
    data["cluster"]["registry_dir"] = "/tmp/gemm-runs-launch-test"
    data["docker"]["container"] = "gemm-launch-test"
    # The sim image has no Python of its own: the checkout's venv is mounted (read-only) and goes
    # first on the container's PATH, as torchrun does in a real ROCm/CUDA image.
    venv_bin = str(Path(sys.executable).parent)
    data["docker"]["env"] = {"PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                     "/usr/bin:/sbin:/bin"}
    cluster = LaunchCluster(sim, write_config(tmp_path / "docker.yaml", data),
                            tmp_path / "experiments")
    cluster.sync()
    up = fab(cluster.config, "docker-up", timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        env_flags = [arg for name, value in HOSTILE.items() for arg in ("--env", f"{name}={value}")]
        result = cluster.launch("--docker", *FAST, *env_flags)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr
        run_dir = only_run_dir(cluster.experiments, run_id_of(result.stdout))
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "succeeded" and record["flags"]["docker"] is True
        assert "in container gemm-launch-test" in result.stdout
        outputs = run_dir / "256thread_28channels"
        names = {p.name for p in outputs.iterdir()}
        assert {f"rank_{r:02d}_metrics.jsonl" for r in range(4)} <= names
        summary = json.loads((outputs / "summary.json").read_text())
        for name, value in record["env"]["common"].items():
            assert summary["env"].get(name) == value, name
        assert summary["env_differences"]["NCCL_SOCKET_IFNAME"] == {"0": "eth0", "1": "eth0",
                                                                    "2": "ens5", "3": "ens5"}
        for node in sim.nodes:
            assert sim.exec(node.index, "test -e /tmp/gemm-pwned", check=False).returncode == 1
            inside = sim.exec(node.index, "docker exec gemm-launch-test test -e /tmp/gemm-pwned",
                              check=False)
            assert inside.returncode == 1, inside.stderr
    finally:
        fab(cluster.config, "docker-down", timeout=240)


@pytest.mark.cluster
def test_push_failure_finishes_run_json_as_failed_naming_the_host(cluster):
    """Nothing started: run.json must not stay "rendered" (the report would show it running)."""
    workdir = yaml.safe_load(cluster.config.read_text())["cluster"]["workdir"]
    experiments = shlex.quote(f"{workdir}/experiments")
    # A file where node 1's run directories go: the push fails there, and only there.
    cluster.sim.exec(1, f"mv {experiments} {experiments}.moved 2>/dev/null; touch {experiments}")
    try:
        result = cluster.launch("--no-docker", *FAST)
    finally:
        cluster.sim.exec(1, f"rm -f {experiments}; mv {experiments}.moved {experiments} "
                            "2>/dev/null; true")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    assert "pushing the run bundle failed on 1 of 2 host(s)" in result.stderr
    record = json.loads((only_run_dir(cluster.experiments) / "run.json").read_text())
    assert record["status"] == "failed" and record["exit_status"] == 1
    failure = record["first_failure"]
    assert failure["node_rank"] == 1 and failure["reason"].startswith("push failed on node 1 ")
    assert len(failure["last_lines"]) == 1 and failure["last_lines"][0].startswith("node 1 (")
    assert [n["state"] for n in record["nodes"]] == ["pending", "pending"]


@pytest.mark.cluster
def test_check_judges_the_master_port_launch_would_use(cluster):
    """MASTER_PORT (an original env variable the launch honours) is checked by `fab check` too."""
    port = 29777
    # Listens in node 0's namespaces until its stdin closes (nsenter forks: killing it alone
    # would leave the listener).
    holder = subprocess.Popen([*cluster.sim.nsenter_argv(0), "python3", "-c",
                               "import socket, sys; s = socket.create_server(('0.0.0.0', "
                               f"{port})); print('listening', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "listening"
        argv = [FAB, "-f", str(cluster.config), "check"]
        for _ in range(3):
            result = subprocess.run(argv, cwd=ROOT, env={**FAB_ENV, "MASTER_PORT": str(port)},
                                    capture_output=True, text=True, timeout=120)
            if "checkout differs" not in result.stdout + result.stderr:
                break
            cluster.sync()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    assert f"{port} busy" in result.stdout, result.stdout[-3000:]
