"""The run registry: rendering and parsing (pure), and the node-side shell run for real on this
machine (a real launcher, a torchrun stand-in whose workers live in sessions of their own, real
signals): start, status, graceful stop, escalation, emergency kill sparing a look-alike decoy."""
from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks.lib import registry
from tasks.lib.registry import (
    NodeRunRecord,
    RegistryError,
    latest_run_id,
    launcher_start_command,
    logs_command,
    parse_status,
    parse_stop_output,
    render_node_launcher,
    status_command,
    stop_command,
)

FAKE_TORCHRUN = Path(__file__).resolve().parents[1] / "fake_torchrun.py"


def render(tmp: Path, argv: list[str], **overrides: object) -> str:
    args = dict(
        run_id="multinode_28ch_256th_20240101_000000",
        registry_dir=str(tmp / "reg"),
        run_dir=str(tmp / "run"),
        output_dir=str(tmp / "run" / "out"),
        env_script=str(tmp / "run" / "env.sh"),
        workdir=str(tmp),
        torchrun_argv=argv,
        wrapper_argv=None,
        container=None,
        venv=None,
    )
    args.update(overrides)
    return render_node_launcher(**args)  # type: ignore[arg-type]


def bash_syntax_ok(script: str) -> None:
    subprocess.run(["bash", "-n", "-c", script], check=True)


# -- pure -----------------------------------------------------------------------------------------

def test_rendered_launcher_is_valid_bash_and_quotes_every_value(tmp_path: Path) -> None:
    hostile = "$(touch /tmp/pwned) `id` 'quote' \"dq\"\nnewline ; rm -rf /"
    text = render(tmp_path, ["torchrun", "--override", hostile], wrapper_argv=["rocprofv3", "--"],
                  container="training-overlap", venv=str(tmp_path / "venv"))
    bash_syntax_ok(text)
    assert "$(touch /tmp/pwned)" in text  # present, but only inside single quotes
    assert "'$(touch /tmp/pwned) `id` '\"'\"'quote'\"'\"'" in text


@pytest.mark.parametrize("bad", [
    {"run_id": "../etc"}, {"run_id": "a b"}, {"run_id": "*"},
    {"registry_dir": "relative/reg"}, {"registry_dir": "~/reg"},
    {"workdir": "x"}, {"container": "bad name"}, {"torchrun_argv": []},
    {"venv": "venv"},
])
def test_render_refuses_values_the_nodes_could_misread(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(RegistryError):
        render(tmp_path, ["torchrun"], **bad)


def test_node_commands_are_valid_bash() -> None:
    for command in (
        launcher_start_command("/w/run/node_launcher.sh", 1, "/tmp/gemm-runs", "r1"),
        stop_command("/tmp/gemm-runs", None, 15, False),
        stop_command("/tmp/gemm-runs", "r1", 0, True),
        status_command("/tmp/gemm-runs"),
        logs_command("/tmp/gemm-runs", "r1", True),
    ):
        bash_syntax_ok(command)
        argv = shlex.split(command)
        assert argv[:2] == ["bash", "-c"]
        bash_syntax_ok(argv[2])  # the script the outer quoting carries
        assert "_POLLS" not in argv[2] and "EXIT_NO_SUCH_RUN" not in argv[2]


def test_command_builders_refuse_bad_input() -> None:
    with pytest.raises(RegistryError):
        launcher_start_command("/w/l.sh", -1, "/reg", "r1")
    with pytest.raises(RegistryError):
        launcher_start_command("l.sh", 0, "/reg", "r1")
    with pytest.raises(RegistryError):
        stop_command("/reg", "r1", float("nan"), False)
    with pytest.raises(RegistryError):
        stop_command("/reg", "r 1", 1, False)
    with pytest.raises(RegistryError):
        status_command("reg")


STATUS_TEXT = """\
@@ host node1
@@ entry
run_id=multinode_28ch_256th_20240101_000000
node_rank=1
state=running
exit_code=
started_at=2024-01-01T00:00:01.000Z
ended_at=
host=node1
user=root
container=training-overlap
output_dir=/w/experiments/r/256thread_28channels
output_log=/w/experiments/r/256thread_28channels/node_1_output.log
run_dir=/w/experiments/r
launcher.pid=4242
entry=/tmp/gemm-runs/r/node_1
pid_alive=1
procs=5
steps_done=17
@@ entry
run_id=older
node_rank=0
state=running
exit_code=
started_at=2023-12-31T00:00:00.000Z
pid_alive=0
procs=0
steps_done=
@@ entry
node_rank=x
state=exited
"""


def test_parse_status_reads_blocks_and_skips_malformed_ones() -> None:
    records = parse_status(STATUS_TEXT)
    assert [r.run_id for r in records] == ["multinode_28ch_256th_20240101_000000", "older"]
    first, second = records
    assert first == NodeRunRecord(
        run_id="multinode_28ch_256th_20240101_000000", node_rank=1, state="running",
        exit_code=None, started_at="2024-01-01T00:00:01.000Z", ended_at=None, pid_alive=True,
        steps_done=17, output_log="/w/experiments/r/256thread_28channels/node_1_output.log",
        procs=5, host="node1", user="root", container="training-overlap",
        output_dir="/w/experiments/r/256thread_28channels", run_dir="/w/experiments/r",
        launcher_pid=4242, entry="/tmp/gemm-runs/r/node_1")
    assert first.active and not first.lost
    assert second.lost and second.active and second.steps_done is None
    assert latest_run_id(records) == first.run_id
    assert latest_run_id([]) is None


def test_parse_stop_output() -> None:
    text = ("stopped run=r1 node=0 state=stopped exit_code=143 survivors=-\n"
            "some noise\n"
            "stopped run=r1 node=1 state=killed exit_code=137 survivors=12,13\n")
    outcomes = parse_stop_output(text)
    assert [(o.node_rank, o.state, o.exit_code, o.survivors) for o in outcomes] == [
        (0, "stopped", 143, ()), (1, "killed", 137, (12, 13))]


# -- the node side, for real ----------------------------------------------------------------------

class LocalNode:
    """This machine as a node: a rendered launcher in tmp, commands through bash.

    The emergency kill matches GEMM_RUN_ID machine-wide: every test needs a run id of its own,
    or it could kill another test's (or another pytest run's) processes.
    """

    def __init__(self, tmp: Path, run_id: str, *, fake_args: list[str] | None = None,
                 env_text: str = "", **render_overrides: object):
        self.tmp = tmp
        self.run_id = run_id
        self.registry = str(tmp / "reg")
        # A run directory is private (0700): the start refuses one other users can read.
        (tmp / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
        (tmp / "run" / "env.sh").write_text(env_text or "export FAKE_ENV='from env.sh'\n")
        self.output_dir = tmp / "run" / "out"
        argv = [sys.executable, str(FAKE_TORCHRUN), "--output-dir", str(self.output_dir),
                *(fake_args or [])]
        # The launcher puts --node-rank right after argv[0]: make argv[0] the fake itself.
        wrapper = tmp / "torchrun"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_TORCHRUN} \"$@\"\n")
        wrapper.chmod(0o755)
        argv = [str(wrapper), *argv[2:]]
        self.launcher = tmp / "run" / "node_launcher.sh"
        self.launcher.write_text(render(tmp, argv, run_id=run_id, **render_overrides))

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, shell=True, capture_output=True, text=True, check=check,
                              timeout=60)

    def start(self, rank: int = 0) -> int:
        result = self.sh(launcher_start_command(str(self.launcher), rank, self.registry,
                                                self.run_id))
        return int(result.stdout.strip())

    def status(self) -> list[NodeRunRecord]:
        return parse_status(self.sh(status_command(self.registry)).stdout)

    def wait_for(self, predicate, timeout: float = 15.0) -> list[NodeRunRecord]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.status()
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; status: {records}")
            time.sleep(0.1)

    def marker_pids(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"GEMM_RUN_ID={self.run_id}".encode() in env:
                found.append(int(entry.name))
        return found


    def kill_everything(self) -> None:
        self.sh(stop_command(self.registry, None, 0, True), check=False)


@pytest.fixture
def run_id() -> str:
    return f"test_registry_{os.getpid()}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_node(tmp_path: Path, run_id: str) -> Iterator[Callable[..., LocalNode]]:
    """Factory for this test's LocalNode; whatever it started is killed when the test ends."""
    made: list[LocalNode] = []

    def factory(**kwargs: object) -> LocalNode:
        local = LocalNode(tmp_path, run_id, **kwargs)  # type: ignore[arg-type]
        made.append(local)
        return local

    yield factory
    for local in made:
        local.kill_everything()


@pytest.fixture
def node(make_node: Callable[..., LocalNode]) -> LocalNode:
    return make_node()


def running_with_steps(records: list[NodeRunRecord]) -> bool:
    return bool(records) and records[0].state == "running" and (records[0].steps_done or 0) >= 2


def test_start_status_and_graceful_stop(node: LocalNode) -> None:
    pid = node.start()
    records = node.wait_for(running_with_steps)
    record = records[0]
    assert record.pid_alive and record.launcher_pid == pid and record.node_rank == 0
    # launcher + torchrun + 2 workers, the workers in sessions of their own
    assert record.procs == 4
    meta = json.loads((node.tmp / "reg" / node.run_id / "node_0" / "meta.json").read_text())
    assert meta["launcher_pid"] == pid and meta["container"] is None
    assert meta["command"][0].endswith("torchrun")

    result = node.sh(stop_command(node.registry, node.run_id, 10, False))
    [outcome] = parse_stop_output(result.stdout)
    assert outcome.state == "stopped" and outcome.survivors == ()
    # The workers got SIGTERM once (through torchrun) and finished their step.
    assert outcome.exit_code not in (None, 137)
    log = (node.output_dir / "node_0_output.log").read_text()
    assert "stopping after step" in log and "env FAKE_ENV='from env.sh'" in log
    assert "ended with exit code" in log
    assert node.marker_pids() == []
    [after] = node.status()
    assert after.state == "stopped" and not after.active and after.ended_at


def test_stop_escalates_to_sigkill_after_the_grace_period(
        make_node: Callable[..., LocalNode]) -> None:
    node = make_node(fake_args=["--ignore-term"])
    node.start()
    node.wait_for(running_with_steps)
    started = time.monotonic()
    result = node.sh(stop_command(node.registry, None, 1.0, False))
    elapsed = time.monotonic() - started
    [outcome] = parse_stop_output(result.stdout)
    assert outcome.state == "killed" and outcome.survivors == ()
    assert 1.0 <= elapsed < 6, elapsed
    assert node.marker_pids() == []


def test_emergency_kill_is_fast_and_spares_a_look_alike(node: LocalNode) -> None:
    decoy = subprocess.Popen(["bash", "-c", 'exec -a "python train.py torchrun --nproc 8" sleep 300'],
                             start_new_session=True)
    try:
        node.start()
        node.wait_for(running_with_steps)
        started = time.monotonic()
        result = node.sh(stop_command(node.registry, None, 0, True))
        elapsed = time.monotonic() - started
        [outcome] = parse_stop_output(result.stdout)
        assert outcome.state == "killed" and outcome.exit_code == 137 and outcome.survivors == ()
        assert node.marker_pids() == []
        assert elapsed < 3, elapsed
        assert decoy.poll() is None, "the decoy was killed"
    finally:
        decoy.kill()
        decoy.wait()


def test_launcher_records_exit_code_of_a_finished_run(
        make_node: Callable[..., LocalNode]) -> None:
    node = make_node(fake_args=["--steps", "3", "--interval", "0.01"])
    node.start(rank=2)
    # The launcher records the end, then exits: wait until it is gone.
    [record] = node.wait_for(lambda rs: bool(rs) and rs[0].state == "exited" and not rs[0].pid_alive)
    assert record.exit_code == 0 and record.node_rank == 2 and record.steps_done == 3
    assert not record.active
    # logs: the node rank first, then the output log
    out = node.sh(logs_command(node.registry, node.run_id, follow=True)).stdout.splitlines()
    assert out[0] == "@@ node_rank 2"
    assert any(line.startswith("step 3/3") for line in out)
    # Its last line is the one the launch's watch takes for the end of the node's stream.
    from tasks.run.watch import LAUNCHER_END

    last = LAUNCHER_END.match(out[-1])
    assert last is not None and last.group(1) == "2", out[-1]
    missing = node.sh(logs_command(node.registry, "other_run", follow=False), check=False)
    assert missing.returncode == registry.EXIT_NO_SUCH_RUN


@pytest.mark.parametrize("required, state, exit_code", [(False, "exited", 0), (True, "exited", 1)])
def test_a_missing_venv_fails_the_node_only_when_configured(
        make_node: Callable[..., LocalNode], tmp_path: Path, required: bool, state: str,
        exit_code: int) -> None:
    # The <workdir>/.venv default is optional ("if present"); an explicit cluster.venv is not.
    node = make_node(fake_args=["--steps", "1", "--interval", "0.01"],
                     venv=str(tmp_path / "no-such-venv"), venv_required=required)
    node.start()
    # The launcher writes exit_code, then ended_at, then state: wait for the last of them.
    [record] = node.wait_for(lambda rs: bool(rs) and rs[0].exit_code is not None
                             and rs[0].state != "running")
    assert (record.state, record.exit_code) == (state, exit_code)


def test_a_second_start_of_a_live_run_is_refused(node: LocalNode) -> None:
    node.start()
    result = node.sh(launcher_start_command(str(node.launcher), 0, node.registry, node.run_id),
                     check=False)
    assert result.returncode == 1 and "already has a live launcher" in result.stderr


def test_hostile_arguments_reach_torchrun_literally(tmp_path: Path, run_id: str) -> None:
    hostile = "$(touch pwned) `id` 'q' \"dq\" ; x"
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "run" / "env.sh").write_text("")
    script = tmp_path / "torchrun"
    script.write_text("#!/bin/sh\nprintf '<%s>\\n' \"$@\"\n")
    script.chmod(0o755)
    launcher = tmp_path / "run" / "node_launcher.sh"
    launcher.write_text(render(tmp_path, [str(script), "--x", hostile], run_id=run_id))
    subprocess.run(launcher_start_command(str(launcher), 0, str(tmp_path / "reg"), run_id),
                   shell=True, check=True, capture_output=True)
    log = tmp_path / "run" / "out" / "node_0_output.log"
    deadline = time.monotonic() + 10
    while "ended with exit code" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert f"<--node-rank=0>\n<--x>\n<{hostile}>\n" in log.read_text()
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run" / "pwned").exists()


def test_status_of_a_launcher_killed_without_recording_reports_it_lost(node: LocalNode) -> None:
    pid = node.start()
    node.wait_for(running_with_steps)
    os.kill(pid, signal.SIGKILL)
    [record] = node.wait_for(lambda rs: bool(rs) and not rs[0].pid_alive)
    # torchrun and its workers are still there: active, not lost
    assert record.active and record.procs == 3 and not record.lost
    node.sh(stop_command(node.registry, None, 5, False))
    [record] = node.status()
    assert record.state in ("stopped", "killed") and not record.active


def test_a_run_whose_processes_all_vanished_is_lost_then_recorded_killed(node: LocalNode) -> None:
    node.start()
    node.wait_for(running_with_steps)
    for pid in node.marker_pids():  # as the OOM killer would: nothing gets to record anything
        os.kill(pid, signal.SIGKILL)
    [record] = node.wait_for(lambda rs: bool(rs) and rs[0].procs == 0 and not rs[0].pid_alive)
    assert record.lost and record.state == "running"
    result = node.sh(stop_command(node.registry, None, 5, False))
    [outcome] = parse_stop_output(result.stdout)
    assert outcome.state == "killed" and outcome.exit_code is None
    [record] = node.status()
    assert record.state == "killed" and not record.active and not record.lost


def test_a_finished_entry_stays_active_while_a_process_of_its_run_is_left(node: LocalNode) -> None:
    """The busy check reads every entry of the registry without a fork each (a scan look-up):
    an entry that says "exited" while a rank of its run lingers is still active, and one among
    hundreds of finished entries of the same host is found."""
    pid = node.start()
    node.wait_for(running_with_steps)
    os.kill(pid, signal.SIGKILL)  # the launcher is gone; torchrun and its workers are not
    entry = node.tmp / "reg" / node.run_id / "node_0"
    (entry / "state").write_text("exited\n")
    for n in range(300):  # earlier runs of this user on this host, all finished
        old = node.tmp / "reg" / f"old_run_{n}" / "node_0"
        old.mkdir(parents=True)
        for key, value in (("run_id", f"old_run_{n}"), ("node_rank", "0"), ("state", "exited"),
                           ("started_at", "2026-01-01T00:00:00+00:00"), ("host", os.uname().nodename)):
            (old / key).write_text(value + "\n")
    active = parse_status(node.sh(status_command(node.registry, recent=0)).stdout)
    assert [(r.run_id, r.active) for r in active] == [(node.run_id, True)]
    node.kill_everything()
    assert parse_status(node.sh(status_command(node.registry, recent=0)).stdout) == []
    assert len(node.status()) == 10 and not any(r.active for r in node.status())


# -- shared nodes: pid reuse, a planted registry -----------------------------------------------------

def start_time(pid: int) -> str:
    script = registry.SHELL_LIB + 'gemm_start_time "$1"'
    return subprocess.run(["bash", "-c", script, "x", str(pid)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_gemm_kill_signals_a_pid_only_while_it_is_the_process_recorded() -> None:
    """A pid file outlives its process; the kernel may give the pid to someone else's. The
    start time (/proc/PID/stat field 22) recorded with it tells them apart."""
    other = subprocess.Popen(["sleep", "300"])
    try:
        started = start_time(other.pid)
        fields = Path(f"/proc/{other.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert started == fields[19]  # field 22 of the whole line
        stale = str(int(started) - 1)
        kill = registry.SHELL_LIB + 'gemm_kill TERM "$1" "$2"'
        result = subprocess.run(["bash", "-c", kill, "x", str(other.pid), stale])
        assert result.returncode != 0 and other.poll() is None  # a different process: spared
        result = subprocess.run(["bash", "-c", kill, "x", str(other.pid), started])
        assert result.returncode == 0 and other.wait(timeout=10) == -signal.SIGTERM
    finally:
        other.kill()
        other.wait()


def test_stop_never_signals_a_recorded_pid_now_held_by_an_unrelated_process(node: LocalNode) -> None:
    node.start()
    node.wait_for(lambda rs: bool(rs) and rs[0].state == "running")
    node.sh(stop_command(node.registry, node.run_id, 5, False))
    entry = Path(node.registry) / node.run_id / "node_0"
    stranger = subprocess.Popen(["sleep", "300"])  # no markers: not ours, whatever its pid
    try:
        for name in ("launcher.pid", "child.pid"):
            (entry / name).write_text(f"{stranger.pid} {start_time(stranger.pid)}\n")
        node.sh(stop_command(node.registry, node.run_id, 1, False))
        node.sh(stop_command(node.registry, node.run_id, 0, True))
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_registry_that_is_a_symlink_is_refused_and_not_written_through(
        make_node: Callable[..., LocalNode], tmp_path: Path) -> None:
    node = make_node()
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    Path(node.registry).symlink_to(target)
    result = node.sh(launcher_start_command(str(node.launcher), 0, node.registry, node.run_id),
                     check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"refusing the run registry (cluster.registry_dir) {node.registry}: "
                                    "it is a symlink or not a directory")
    assert list(target.iterdir()) == []
    status = node.sh(status_command(node.registry), check=False)
    assert status.returncode == 1 and "it is a symlink" in status.stderr


# -- the rendezvous port on node 0 ----------------------------------------------------------------

def listener() -> socket.socket:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def holder_phrase(pid: int) -> str:
    return f"uid {os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name}), pid {pid}: "


def test_node_0_never_starts_torchrun_while_someone_listens_on_the_rendezvous_port(
        make_node: Callable[..., LocalNode]) -> None:
    """Someone who took the port before our torchrun would serve the other nodes their store:
    node 0's launcher stops first, naming them; the other nodes' launchers do not look."""
    held = listener()
    port = held.getsockname()[1]
    try:
        node = make_node(master_port=port)
        node.start(0)
        [record] = node.wait_for(lambda rs: bool(rs) and rs[0].state == "exited")
        log = (node.output_dir / "node_0_output.log").read_text()
        assert record.exit_code == 1, log
        assert (f"[launcher] node 0: rendezvous port {port} on {socket.gethostname()} is held "
                f"by {holder_phrase(os.getpid())}") in log, log
        assert "another process holds the port; torchrun not started" in log
        assert "fake torchrun" not in log
        # The same file on node 1 starts its torchrun (it joins node 0's store, checked there).
        other = make_node(master_port=port)
        other.start(1)
        other.wait_for(lambda rs: any(r.node_rank == 1 and (r.steps_done or 0) >= 1 for r in rs))
    finally:
        held.close()


def test_node_0_starts_torchrun_when_the_rendezvous_port_is_free(
        make_node: Callable[..., LocalNode]) -> None:
    with listener() as closed:
        port = closed.getsockname()[1]
    node = make_node(master_port=port)
    node.start(0)
    node.wait_for(running_with_steps)


def test_node_0_names_who_took_the_port_when_torchrun_failed(
        make_node: Callable[..., LocalNode], tmp_path: Path) -> None:
    """Taken after the launcher looked (torchrun imports torch for seconds): torchrun fails, and
    the launcher says who holds the port. Here env.sh, sourced right before torchrun, starts the
    listener and fails as torchrun would."""
    with listener() as probe:
        port = probe.getsockname()[1]
    ready = tmp_path / "listening"
    env_text = (f"{sys.executable} -c 'import socket, time; s = socket.create_server((\"127.0.0.1\","
                f" {port})); open(\"{ready}\", \"w\").close(); time.sleep(30)' &\n"
                f"while [ ! -e {ready} ]; do sleep 0.05; done\n"
                "echo 'EADDRINUSE (as torchrun says it)' >&2; exit 1\n")
    node = make_node(master_port=port, env_text=env_text)
    node.start(0)
    [record] = node.wait_for(lambda rs: bool(rs) and rs[0].state == "exited")
    log = (node.output_dir / "node_0_output.log").read_text()
    assert record.exit_code == 1, log
    holder = subprocess.run(["pgrep", "-f", f"create_server.*{port}"], capture_output=True,
                            text=True).stdout.split()
    try:
        assert len(holder) == 1, holder
        assert (f"[launcher] node 0: rendezvous port {port} on {socket.gethostname()} is held by "
                f"{holder_phrase(int(holder[0]))}") in log, log
        assert "another process holds the port" in log
    finally:
        for pid in holder:
            os.kill(int(pid), signal.SIGKILL)
