"""Docker probe scripts (run by a real sh) and the reading of docker's answers."""
from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tasks.lib.containers import (
    ABSENT,
    SECTION_MARK,
    ContainerState,
    compose_file_path,
    compose_up_failure,
    docker_message,
    down_script,
    format_uptime,
    parse_docker_time,
    parse_inspect,
    parse_probe,
    probe_script,
    up_outcome,
)
from tasks.lib.quoting import sh_command

INSPECT_RUNNING = [{
    "Id": "a238e43bae94" + "0" * 52,
    "State": {"Status": "running", "Running": True, "ExitCode": 0, "Error": "",
              "StartedAt": "2026-11-24T08:13:50.123456789Z"},
    "Config": {"Image": "gemm-sim:latest"},
}]
INSPECT_EXITED = [{
    "Id": "b" * 64,
    "State": {"Status": "exited", "Running": False, "ExitCode": 127,
              "Error": "exec: \"sleep\": executable file not found in $PATH",
              "StartedAt": "0001-01-01T00:00:00Z"},
    "Config": {"Image": "img"},
}]


def probe_output(compose: str, engine: str, inspect: object, workdir: str | None = None,
                 end: bool = True) -> str:
    parts = [f"{SECTION_MARK}compose", compose, f"{SECTION_MARK}engine", engine,
             f"{SECTION_MARK}compose_file", "yes"]
    if workdir is not None:
        parts += [f"{SECTION_MARK}workdir", workdir]
    parts += [f"{SECTION_MARK}inspect", json.dumps(inspect, indent=4) if inspect is not None else ""]
    if end:
        parts.append(f"{SECTION_MARK}end")
    return "\n" + "\n".join(parts) + "\n"


def test_parse_probe_running_container() -> None:
    probe = parse_probe(probe_output("v1", "version=20.10.24+dfsg1", INSPECT_RUNNING, "yes"))
    assert probe.compose == "v1" and probe.engine == "20.10.24+dfsg1" and probe.engine_error == ""
    assert probe.workdir_exists is True and probe.compose_file_exists is True
    state = probe.container
    assert state.running and state.short_id == "a238e43bae94" and state.image == "gemm-sim:latest"
    assert state.started_at == datetime(2026, 11, 24, 8, 13, 50, 123456, tzinfo=timezone.utc)


def test_parse_probe_engine_down_ignores_inspect() -> None:
    probe = parse_probe(probe_output("v2", "error=Cannot connect to the Docker daemon at "
                                     "unix:///var/run/docker.sock. Is the docker daemon running?", []))
    assert probe.engine is None and "Cannot connect" in probe.engine_error
    assert probe.container == ABSENT and probe.workdir_exists is None


def test_parse_probe_refuses_truncated_output() -> None:
    with pytest.raises(ValueError, match="cut short"):
        parse_probe(probe_output("v1", "version=1", [], end=False))


def test_parse_inspect_states() -> None:
    assert parse_inspect("") == ABSENT and parse_inspect("[]") == ABSENT
    exited = parse_inspect(json.dumps(INSPECT_EXITED))
    assert exited.status == "exited" and not exited.running and exited.exit_code == 127
    assert exited.started_at is None and "executable file not found" in exited.error
    with pytest.raises(ValueError, match="not JSON"):
        parse_inspect("Error: something else")


@pytest.mark.parametrize("text, expected", [
    ("2026-11-24T08:13:50.123456789Z", datetime(2026, 11, 24, 8, 13, 50, 123456, tzinfo=timezone.utc)),
    ("2026-11-24T08:13:50Z", datetime(2026, 11, 24, 8, 13, 50, tzinfo=timezone.utc)),
    ("2026-11-24T10:13:50.5+02:00", datetime(2026, 11, 24, 8, 13, 50, 500000, tzinfo=timezone.utc)),
    ("0001-01-01T00:00:00Z", None),
    ("", None),
    (None, None),
    ("yesterday", None),
])
def test_parse_docker_time(text: object, expected: datetime | None) -> None:
    assert parse_docker_time(text) == expected


@pytest.mark.parametrize("seconds, expected", [
    (5, "5s"), (65, "1m 5s"), (3600 * 3 + 120, "3h 2m"), (86400 * 2 + 3600 * 5, "2d 5h"), (-3, "0s"),
])
def test_format_uptime(seconds: int, expected: str) -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert format_uptime(now - timedelta(seconds=seconds), now) == expected
    assert format_uptime(None, now) == "-"


def test_docker_message_finds_the_reason() -> None:
    v1_conflict = ("Creating training-overlap ... \nCreating training-overlap ... error\n\n"
                   "ERROR: for training-overlap  Cannot create container for service x: Conflict. "
                   "The container name \"/training-overlap\" is already in use\n"
                   "ERROR: Encountered errors while bringing up the project.\n")
    assert "Conflict. The container name" in docker_message(v1_conflict)
    assert docker_message("") == "(no output)"
    assert docker_message("just one line\n\n") == "just one line"


def test_compose_up_failure_names_the_image_when_the_pull_failed() -> None:
    v1_pull = ("Pulling training-overlap (gemm-sim:nope)...\nGet \"https://registry-1.docker.io/v2/\": "
               "dial tcp: lookup registry-1.docker.io: no such host\n")
    message = compose_up_failure(v1_pull, "gemm-sim:nope")
    assert message.startswith("cannot pull image gemm-sim:nope: ") and "no such host" in message
    v2_pull = ("training-overlap Pulling\nError response from daemon: pull access denied for nope, "
               "repository does not exist\n")
    assert compose_up_failure(v2_pull, "nope") == docker_message(v2_pull)


def test_up_outcome() -> None:
    running = ContainerState("running", id="a" * 64)
    assert up_outcome(ABSENT, running) == "created"
    assert up_outcome(ContainerState("exited", id="a" * 64), running) == "started"
    assert up_outcome(running, running) == "already running"
    assert up_outcome(ContainerState("running", id="b" * 64), running) == "recreated"


def test_compose_file_is_node_local() -> None:
    assert compose_file_path("/tmp/gemm-runs") == "/tmp/gemm-runs/docker/docker-compose.yaml"


def run_sh(script: str, path: str, tmp_path: Path) -> subprocess.CompletedProcess:
    bash = shutil.which("bash") or "/bin/bash"
    env = {"PATH": path, "HOME": str(tmp_path), "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    return subprocess.run([bash, "-c", sh_command(script)], capture_output=True, text=True,
                          timeout=20, env=env)


def test_probe_script_without_docker_on_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "printf", "grep", "tail"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = run_sh(probe_script("training-overlap", str(tmp_path / "compose.yaml"), str(tmp_path)),
                  str(bin_dir), tmp_path)
    assert proc.returncode == 0, proc.stderr
    probe = parse_probe(proc.stdout)
    assert probe.compose == "none" and probe.engine is None
    assert probe.engine_error == "docker is not installed (not on PATH)"
    assert probe.workdir_exists is True and probe.compose_file_exists is False


@pytest.mark.skipif(not shutil.which("docker"), reason="no docker client installed")
def test_probe_script_with_a_dead_engine_and_a_hostile_name(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker})'\"; touch {marker}"
    proc = run_sh(probe_script(hostile, f"{tmp_path}/x $(touch {marker})", f"{tmp_path}/no dir"),
                  "/usr/local/bin:/usr/bin:/bin", tmp_path)
    assert proc.returncode == 0, proc.stderr
    probe = parse_probe(proc.stdout)
    assert probe.engine is None and "no-such.sock" in probe.engine_error
    assert probe.workdir_exists is False
    expected_compose = ("v2" if subprocess.run(["docker", "compose", "version"], capture_output=True)
                        .returncode == 0 else "v1" if shutil.which("docker-compose") else "none")
    assert probe.compose == expected_compose
    assert not marker.exists()


def test_down_script_quotes_and_skips_compose_when_missing() -> None:
    with_compose = down_script(["docker-compose"], "/tmp/r/docker/docker-compose.yaml", "proj", "c'x")
    assert "docker-compose -p proj -f /tmp/r/docker/docker-compose.yaml down --remove-orphans" in with_compose
    assert "'c'\"'\"'x'" in with_compose
    without = down_script(None, "/f", "proj", "c")
    assert "down" not in without and "docker rm -f -- c" in without


@pytest.mark.parametrize("mode, runs", [(0o600, True), (0o666, False)])
def test_down_hands_compose_only_a_file_nobody_else_could_have_written(tmp_path, mode, runs):
    """Run for real with bash: `echo` stands in for the compose binary (its argv is ours); a
    compose file others can write is never given to it, and the output says why."""
    import subprocess

    from tasks.lib.nodefs import with_safe_fs

    base = tmp_path / "reg"
    (base / "docker").mkdir(parents=True, mode=0o700)
    base.chmod(0o700)
    compose = base / "docker" / "docker-compose.yaml"
    compose.write_text("services: {}\n")
    compose.chmod(mode)
    script = down_script(["echo", "COMPOSE-RAN"], str(compose), "proj", f"gemm-none-{mode}")
    result = subprocess.run(with_safe_fs(script), shell=True, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert ("COMPOSE-RAN" in result.stdout) is runs
    if not runs:
        assert "note: refusing the compose file" in result.stdout
        assert "removing the container by name instead" in result.stdout
