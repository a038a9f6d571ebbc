"""Rendering of what the controller sends to the nodes: the run's env script and the compose file.

Pure: reads only the project's own templates/ and config/nccl/, no network. Templates and their
quoting filters are in tasks.lib.templating.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS, MASK, secret_names
from tasks.lib.quoting import is_env_name
from tasks.lib.registry import CONTAINER_NAME, validate_run_id
from tasks.lib.settings import DockerSettings
from tasks.lib.templating import render_template, scalar_text

NCCL_PRESETS_DIR = Path(__file__).resolve().parents[2] / "config" / "nccl"

ENV_TEMPLATE = "env.sh.j2"
COMPOSE_TEMPLATE = "docker-compose.yaml.j2"

_PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


# -- NCCL presets ---------------------------------------------------------------------------------

def nccl_preset_names(presets_dir: Path = NCCL_PRESETS_DIR) -> list[str]:
    return sorted(path.stem for path in presets_dir.glob("*.yaml"))


def load_nccl_preset(name: str, presets_dir: Path = NCCL_PRESETS_DIR) -> dict[str, str]:
    """The variables of config/nccl/<name>.yaml, in file order, values as strings."""
    available = nccl_preset_names(presets_dir)
    # Checked against the listing, not joined into a path: "../x" must not name a file.
    if name not in available:
        raise ValueError(f"unknown NCCL preset {name!r}; available: "
                         f"{', '.join(available) or 'none'} (files in {presets_dir})")
    path = presets_dir / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of VARIABLE: value, "
                         f"got {type(data).__name__}")
    preset: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not is_env_name(key):
            raise ValueError(f"{path}: {key!r} is not a valid environment variable name")
        preset[key] = scalar_text(value, f"{path}: {key} =")
    return preset


# -- env script -----------------------------------------------------------------------------------

def render_env_script(
    *,
    run_id: str,
    common_env: Mapping[str, object],
    node_env: Sequence[Mapping[str, object]],
    master_port: int | str | None = None,
    rendezvous_secret: str | None = None,
    secret_patterns: Sequence[str] = DEFAULT_SECRET_ENV_PATTERNS,
    masked: bool = False,
) -> str:
    """The run's env.sh: identical on every node, sourced by the node launcher with NODE_RANK set.

    `common_env` is exported first, in order; then the entry of `node_env` at index NODE_RANK, so a
    per-node value (the socket interface resolved on that host) wins over a common one (a preset's
    NCCL_SOCKET_IFNAME). An unknown NODE_RANK makes sourcing fail instead of running
    half-configured.

    The master port (torchrun's PET_MASTER_PORT) and the run's rendezvous secret (`fab launch`
    gives both) are here and in no argv (train/rendezvous.py); the secret is in no list of
    variables the ranks record, and `masked` shows it as "***".

    Variables whose name matches `secret_patterns` (tasks.lib.masking) are listed in
    GEMM_MASKED_VARS, so the ranks record them as "***"; `masked` renders the controller's copy,
    with those values replaced by "***" too (the nodes get the real ones).
    """
    # Run ids name directories and appear in the env script's comments: keep them plain.
    validate_run_id(run_id)  # a RegistryError, which is a ValueError
    if not node_env:
        raise ValueError("node_env is empty: a run has at least one node")
    common_items = _env_items(common_env, "common_env")
    node_items = [_env_items(env, f"node_env[{rank}]") for rank, env in enumerate(node_env)]
    # The ranks record every variable named here in summary.json, whatever its prefix, so a
    # run shows that each setting of its env.sh arrived (--env extras included).
    names = dict.fromkeys(name for items in (common_items, *node_items) for name, _ in items)
    secrets = secret_names(names, secret_patterns)
    if masked:
        common_items = [(name, MASK if name in secrets else value) for name, value in common_items]
        node_items = [[(name, MASK if name in secrets else value) for name, value in items]
                      for items in node_items]
    return render_template(
        ENV_TEMPLATE,
        run_id=run_id,
        common_env=common_items,
        node_env=node_items,
        env_var_names=" ".join(names),
        masked_var_names=" ".join(secrets),
        master_port=master_port,
        rendezvous_secret=MASK if masked and rendezvous_secret is not None else rendezvous_secret,
    )


def _env_items(env: Mapping[str, object], what: str) -> list[tuple[str, str]]:
    items = []
    for name, value in env.items():
        if not isinstance(name, str) or not is_env_name(name):
            raise ValueError(f"{what}: {name!r} is not a valid environment variable name")
        text = scalar_text(value, f"{what}: {name} =")
        if "\0" in text:
            raise ValueError(f"{what}: {name} contains a NUL byte, which no environment can hold")
        items.append((name, text))
    return items


# -- compose --------------------------------------------------------------------------------------

def compose_project_name(container: str) -> str:
    """Compose project names are lowercase letters, digits, '-' and '_'."""
    return re.sub(r"[^a-z0-9_-]", "-", container.lower()).lstrip("-_") or "gemm"


def render_compose(
    *,
    docker: DockerSettings,
    workdir: str,
    registry_dir: str,
    project_name: str | None = None,
) -> str:
    """The compose file of the experiment container (one service, an exec target that sleeps).

    `workdir` and `registry_dir` are mounted at the same path inside, so paths in the env script,
    the outputs and the pid files the node launcher records mean the same on both sides.
    Relative sources of docker.volumes are taken relative to `workdir` (the compose file itself
    does not live there). `project_name` is recorded in a comment: compose v1 has no `name:` key,
    so the project goes on the command line (`-p`, see compose_command's callers).
    """
    if project_name is not None and not _PROJECT_NAME.fullmatch(project_name):
        raise ValueError(f"compose project name {project_name!r}: "
                         "lowercase letters, digits, '-', '_'")
    if not docker.image:
        raise ValueError("docker.image is not set: set it in fabric.yaml or the runtime config "
                         "(e.g. docker: {image: rocm/pytorch:latest})")
    if not CONTAINER_NAME.fullmatch(docker.container):
        raise ValueError(f"docker.container {docker.container!r} is not a valid container name "
                         "(letters, digits, '_', '.', '-'; not starting with a symbol)")
    for what, path in (("workdir", workdir), ("registry_dir", registry_dir)):
        if not posixpath.isabs(path) or ":" in path:
            raise ValueError(f"{what} {path!r} must be an absolute path without ':' to be mounted")
    volumes = [f"{workdir}:{workdir}", f"{registry_dir}:{registry_dir}"]
    for volume in docker.volumes:
        resolved = _resolve_volume(volume, workdir)
        target = posixpath.normpath(resolved.split(":")[1])
        if target in (posixpath.normpath(workdir), posixpath.normpath(registry_dir)):
            # Docker refuses duplicate mount points; say which setting collides instead.
            raise ValueError(f"docker.volumes: {volume!r} mounts over {target}, which is already "
                             "mounted read-write as the workdir or the run registry")
        volumes.append(resolved)
    return render_template(
        COMPOSE_TEMPLATE,
        project_name=project_name,
        service=docker.container,
        container=docker.container,
        image=docker.image,
        platform=docker.platform,
        shm_size=docker.shm_size,
        workdir=workdir,
        volumes=volumes,
        environment=_env_items(docker.env, "docker.env"),
        ulimits=_ulimits(docker.ulimits),
    )


# What Docker's --ulimit accepts (the rlimits Linux has, by their short names).
ULIMIT_NAMES = ("core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
                "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")


def _ulimits(ulimits: Mapping[str, object]) -> list[tuple[str, int | tuple[int, int]]]:
    """(name, limit or (soft, hard)) for the template; None values are dropped."""
    items: list[tuple[str, int | tuple[int, int]]] = []
    for name, value in ulimits.items():
        if name not in ULIMIT_NAMES:
            raise ValueError(f"docker.ulimits: unknown limit {name!r}; "
                             f"known: {', '.join(ULIMIT_NAMES)}")
        if value is None:
            continue
        if isinstance(value, Mapping) and set(value) == {"soft", "hard"}:
            soft, hard = (_ulimit_number(value[k], name) for k in ("soft", "hard"))
            items.append((name, (soft, hard)))
        else:
            items.append((name, _ulimit_number(value, name)))
    return items


def _ulimit_number(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"docker.ulimits.{name}: {value!r} is not a limit (a number, -1 for "
                         "unlimited, or {soft: N, hard: N}; null to leave the default)")
    return value


def _resolve_volume(volume: str, workdir: str) -> str:
    source, rest = volume.split(":", 1)
    if not source or not rest:
        raise ValueError(f"docker.volumes: {volume!r} is not 'src:dst[:ro]'")
    if not (source.startswith("/") or source.startswith("~")):
        source = posixpath.normpath(posixpath.join(workdir, source))
    return f"{source}:{rest}"


def compose_command(available: str) -> list[str]:
    """The compose argv for what a host's probe found: "v2" (the docker plugin) or "v1"."""
    if available == "v2":
        return ["docker", "compose"]
    if available == "v1":
        return ["docker-compose"]
    raise ValueError("neither `docker compose` (v2 plugin) nor `docker-compose` (v1) is installed: "
                     "install docker-compose-plugin or docker-compose")
