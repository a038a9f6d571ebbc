"""What docker-up/down/status ask a host's Docker, and how the answers are read.

One sh script per host and step (probe, wait, down) so a task costs few SSH round trips; the
raw output is parsed here, in pure functions, so every interpretation is unit-tested.
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from tasks.lib.quoting import section_function, sh_join, sh_quote, split_sections

SECTION_MARK = "@@gemm-docker "
COMPOSE_FILE = "docker-compose.yaml"
# States after which a container will not come up by waiting (`restart` policies aside).
TERMINAL_STATES = frozenset({"exited", "dead", "removing"})
# Prints the compose variant to drive: v2 (the docker compose plugin), v1 (docker-compose), none.
# Shared with the preflight probe (tasks/lib/probe.py), which docker-up uses instead of its own.
COMPOSE_VARIANT_SH = ("if docker compose version >/dev/null 2>&1; then echo v2; "
                      "elif command -v docker-compose >/dev/null 2>&1; then echo v1; "
                      "else echo none; fi")
DOCKER_MISSING = "docker is not installed (not on PATH)"


def compose_file_path(registry_dir: str) -> str:
    """Where docker-up leaves the compose file on each node.

    Node-local (the registry dir, like the run registry) rather than in the workdir: on a shared
    filesystem all nodes would rewrite one file while others read it. The registry is ours alone
    (mode 0700, tasks/lib/nodefs.py): nobody else can rewrite what `docker compose` runs as root.
    """
    return posixpath.join(registry_dir, "docker", COMPOSE_FILE)


@dataclass(frozen=True)
class ContainerState:
    status: str              # docker's State.Status (running, exited, created, ...) or "absent"
    id: str = ""
    image: str = ""
    started_at: datetime | None = None
    exit_code: int | None = None
    error: str = ""          # docker's State.Error (why a start failed), if any

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def short_id(self) -> str:
        return self.id[:12]


ABSENT = ContainerState("absent")


@dataclass(frozen=True)
class DockerProbe:
    """One host's Docker as docker-up/down/status need it."""

    compose: str             # "v2" (docker compose plugin) | "v1" (docker-compose) | "none"
    engine: str | None       # server version; None when the engine did not answer
    engine_error: str        # docker's own message when it did not
    container: ContainerState
    workdir_exists: bool | None  # None: not asked
    compose_file_exists: bool


def _sections_script(lines: list[str]) -> str:
    section = section_function(SECTION_MARK)
    return "\n".join([section, *lines, "s end", "exit 0"])


def probe_script(container: str, compose_file: str, workdir: str | None = None) -> str:
    """sh script: compose variant, engine version (or docker's error), the container's inspect."""
    lines = [
        f"C={sh_quote(container)}",
        "s compose",
        COMPOSE_VARIANT_SH,
        "s engine",
        "if ! command -v docker >/dev/null 2>&1; then",
        f"  echo {sh_quote('error=' + DOCKER_MISSING)};",
        "elif v=$(docker version --format '{{.Server.Version}}' 2>&1); then echo \"version=$v\";",
        # docker prints the client half and then its error: the last line is the reason.
        "else printf 'error=%s\\n' \"$(printf '%s\\n' \"$v\" | grep -v '^ *$' | tail -n 1)\"; fi",
        "s compose_file",
        f"[ -f {sh_quote(compose_file)} ] && echo yes || echo no",
    ]
    if workdir is not None:
        lines += ["s workdir", f"[ -d {sh_quote(workdir)} ] && echo yes || echo no"]
    lines += ["s inspect", 'docker inspect --type container -- "$C" 2>/dev/null']
    return _sections_script(lines)


def inspect_script(container: str) -> str:
    inspect = f"docker inspect --type container -- {sh_quote(container)} 2>/dev/null"
    return _sections_script(["s inspect", inspect])


def down_script(compose_argv: list[str] | None, compose_file: str, project: str,
                container: str) -> str:
    """bash (run through nodefs.with_safe_fs): compose down when the file is there and still
    beyond other users' reach, then remove a container of that name left outside it.

    The leftover case: the file went with /tmp on a reboot, or the container came from elsewhere.
    A compose file someone else could have changed is never handed to docker compose (it would
    run what they wrote, as root): the container goes by name instead, with a note why.
    """
    lines = ["set -e"]
    if compose_argv:
        file = sh_quote(compose_file)
        down = sh_join([*compose_argv, "-p", project, "-f", compose_file, "down",
                        "--remove-orphans"])
        lines += [f"if [ -e {file} ] || [ -L {file} ]; then",
                  f"  if why=$(gemm_safe_file {file} 'the compose file' 2>&1); then {down} 2>&1",
                  '  else echo "note: $why; removing the container by name instead"; fi',
                  "fi"]
    lines.append(f"if docker inspect --type container -- {sh_quote(container)} >/dev/null 2>&1; "
                 f"then docker rm -f -- {sh_quote(container)} >/dev/null 2>&1; fi")
    return "\n".join(lines) + "\n"



# -- parsing --------------------------------------------------------------------------------------



def parse_probe(text: str) -> DockerProbe:
    sections = split_sections(text, SECTION_MARK)
    if "end" not in sections:
        raise ValueError("the Docker probe's output was cut short")
    engine_lines = sections.get("engine", "").splitlines()
    engine_values = dict(line.partition("=")[::2] for line in engine_lines)
    engine = engine_values.get("version", "").strip() or None
    engine_error = "" if engine else (engine_values.get("error", "").strip()
                                      or "no answer from the Docker engine")
    workdir = sections.get("workdir")
    return DockerProbe(
        compose=sections.get("compose", "none") or "none",
        engine=engine,
        engine_error=engine_error,
        container=parse_inspect(sections.get("inspect", "")) if engine else ABSENT,
        workdir_exists=None if workdir is None else workdir == "yes",
        compose_file_exists=sections.get("compose_file") == "yes",
    )


def parse_inspect(text: str) -> ContainerState:
    """The state from `docker inspect` JSON; absent when docker printed nothing or `[]`."""
    if "@@" in text:
        text = split_sections(text, SECTION_MARK).get("inspect", "")
    text = text.strip()
    if not text:
        return ABSENT
    try:
        documents = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"docker inspect printed something that is not JSON: "
                         f"{text[:200]!r}") from err
    if not documents:
        return ABSENT
    document = documents[0]
    state = document.get("State") or {}
    exit_code = state.get("ExitCode")
    return ContainerState(
        status=str(state.get("Status") or "unknown"),
        id=str(document.get("Id") or ""),
        image=str((document.get("Config") or {}).get("Image") or ""),
        started_at=parse_docker_time(state.get("StartedAt")),
        exit_code=exit_code if isinstance(exit_code, int) else None,
        error=str(state.get("Error") or ""),
    )


_DOCKER_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?")


def parse_docker_time(text: object) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds; Python keeps microseconds. Zero time: None."""
    if not isinstance(text, str):
        return None
    match = _DOCKER_TIME.fullmatch(text.strip())
    if not match or text.startswith("0001-01-01"):
        return None
    seconds, fraction, zone = match.groups()
    micro = (fraction or "0")[:6].ljust(6, "0")
    offset = "+00:00" if zone in (None, "Z") else zone
    return datetime.fromisoformat(f"{seconds}.{micro}{offset}")


def format_uptime(started_at: datetime | None, now: datetime | None = None) -> str:
    if started_at is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    seconds = max(0, int((now - started_at).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


_GENERIC = re.compile(r"Encountered errors while bringing up the project", re.IGNORECASE)


def docker_message(output: str) -> str:
    """The line of docker/compose output that says what went wrong (they end with it)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    # Compose v1 ends with a summary that names no cause; the cause is the line before.
    lines = [line for line in lines if not _GENERIC.search(line)] or lines
    for line in reversed(lines):
        if re.search(r"\berror\b|denied|not found|no such|invalid|conflict|failed|unable",
                     line, re.IGNORECASE):
            return line
    return lines[-1] if lines else "(no output)"


def up_outcome(before: ContainerState, after: ContainerState) -> str:
    """What docker-up did to a host's container, from its state before and after."""
    if before.status == "absent":
        return "created"
    if before.id != after.id:
        return "recreated"
    if before.running:
        return "already running"
    return "started"


def compose_up_failure(output: str, image: str) -> str:
    """docker's reason for a failed `compose up`, naming the image when the pull failed.

    Compose v1 prints "Pulling <service> (<image>)..." and then only the registry's error.
    """
    message = docker_message(output)
    pulled = any(line.strip().startswith("Pulling ") for line in output.splitlines())
    if pulled and image not in message:
        return f"cannot pull image {image}: {message}"
    return message
