"""The project's config sections as validated dataclasses.

The values come from the Invoke/Fabric config tree (built-in defaults below, then fabric.yaml at
the repo root, then `fab -f FILE`). Loading checks every key and type once, so a typo in a config
file fails with its key named instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import posixpath
from types import UnionType
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS
from tasks.lib.transports import TRANSPORTS

HOST_KEY_POLICIES = ("reject", "accept-new", "auto-add")
PLATFORMS = ("rocm", "cuda", "cpu")


class SettingsError(ValueError):
    """A config value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ClusterSettings:
    hosts: tuple = ()                       # master first; "host", "user@host:port" or mappings
    hosts_file: str = "node_ip_list.txt"    # used when hosts is empty
    workdir: str | None = None              # checkout on every node; None: this checkout's path
    venv: str | None = None                 # for bare runs; None: <workdir>/.venv if present
    known_hosts: str = "~/.ssh/known_hosts"
    host_key_policy: str = "accept-new"
    experiments_dir: str = "experiments"    # on the controller
    # Node-local run registry ($HOME is often shared). None: /tmp/gemm-runs-<uid>, one per user,
    # so no other user of a shared node can pre-create it or plant entries (tasks/lib/nodefs.py).
    registry_dir: str | None = None
    socket_ifname: str | None = None        # None: resolved per host by the route to the master
    # How the nodes are reached (tasks/cluster/transport.py): auto = srun inside a Slurm allocation whose
    # nodes are the inventory, else SSH (or this machine alone without an inventory).
    transport: str = "auto"
    srun_options: tuple = ()                # extra options of a run's srun step (--gpus-per-node=8)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise SettingsError(f"cluster.transport: {self.transport!r} is not one of "
                                f"{', '.join(TRANSPORTS)}")
        for option in self.srun_options:
            if not isinstance(option, str) or not option.startswith("--") or "\n" in option:
                raise SettingsError(f"cluster.srun_options: {option!r} is not a long srun option "
                                    "(e.g. --gpus-per-node=8)")
        if self.host_key_policy not in HOST_KEY_POLICIES:
            raise SettingsError(f"cluster.host_key_policy: {self.host_key_policy!r} is not one of "
                                f"{', '.join(HOST_KEY_POLICIES)}")
        for key in NODE_PATH_KEYS:
            value = getattr(self, key)
            if value is not None:
                check_node_path(f"cluster.{key}", value)


# Paths used verbatim on every node, quoted: "~" or a relative path would not mean what it says.
NODE_PATH_KEYS = ("workdir", "registry_dir", "venv")


def check_node_path(key: str, path: str) -> None:
    if path.startswith("~"):
        raise SettingsError(f"{key}: {path!r}: '~' is not "
                            "expanded on the nodes; write the absolute path (/home/USER/...)")
    if not posixpath.isabs(path) or any(c in path for c in "\n\0"):
        raise SettingsError(f"{key}: {path!r} must be an absolute path on the nodes "
                            "(starting with '/', no newline)")


BUILTIN_ULIMITS: Mapping[str, object] = {"memlock": -1, "stack": 67108864}


@dataclass(frozen=True)
class DockerSettings:
    enabled: bool = True
    container: str = "training-overlap"
    image: str | None = None
    platform: str = "rocm"
    volumes: tuple = ()                     # extra "src:dst[:ro]" mounts
    env: Mapping[str, str] = field(default_factory=dict)
    shm_size: str = "17G"
    # Container rlimits: a number (-1: unlimited) or {soft, hard}; null drops one (daemon default).
    # memlock unlimited is what RDMA (IB/RoCE) needs; raising it needs CAP_SYS_RESOURCE.
    # Given ones are merged over BUILTIN_ULIMITS here, not in the config tree: see default_config.
    ulimits: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ulimits", {**BUILTIN_ULIMITS, **self.ulimits})
        if self.platform not in PLATFORMS:
            raise SettingsError(f"docker.platform: {self.platform!r} is not one of {', '.join(PLATFORMS)}")
        for volume in self.volumes:
            if not isinstance(volume, str) or len(volume.split(":")) not in (2, 3):
                raise SettingsError(f"docker.volumes: {volume!r} is not 'src:dst[:ro]'")


@dataclass(frozen=True)
class LaunchSettings:
    channels: int = 28
    threads: int = 256
    nproc: int | str = 8                    # or "auto": the GPUs of each node
    config: str = "config/multi_node/distributed_multinode.yaml"
    master_port: int | None = None          # None: a free port on the master
    nccl_preset: str | None = None          # ib | ethernet | debug (config/nccl/<name>.yaml)
    hang_timeout: float = 600.0             # seconds without progress before the watchdog acts
    stop_grace: float = 15.0                # SIGTERM to SIGKILL, seconds
    # Your own training instead of `-m train` (tasks/lib/entry.py): "train.py --config my.yaml",
    # "-m pkg.train ARGS", or the same as a list of arguments. None: our GEMM experiment.
    entry: str | tuple | None = None
    # The objective of a sweep of an entry (tasks/lib/objective.py): "trace", a regex with one
    # group, or "json:FIELD" in the ranks' output lines; "max:" first when higher is better.
    metric: str | None = None
    # --env variables whose name contains one of these (any case) are shown and recorded as ***
    secret_env_patterns: tuple = DEFAULT_SECRET_ENV_PATTERNS

    def __post_init__(self) -> None:
        if isinstance(self.nproc, str) and self.nproc != "auto":
            raise SettingsError(f"launch.nproc: {self.nproc!r} is neither a number nor 'auto'")
        for pattern in self.secret_env_patterns:
            if not isinstance(pattern, str) or not pattern.strip():
                raise SettingsError(f"launch.secret_env_patterns: {pattern!r} is not a non-empty "
                                    "string (e.g. [TOKEN, SECRET, PASSWORD, KEY, CREDENTIAL])")


@dataclass(frozen=True)
class Settings:
    cluster: ClusterSettings
    docker: DockerSettings
    launch: LaunchSettings

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        """Build from a config tree (an Invoke Config or a plain mapping); missing keys take defaults."""
        check_connection_keys(config)
        return cls(**{
            name: _build(section_cls, plain(config[name]) if name in config else {}, name)
            for name, section_cls in SECTIONS.items()
        })


def check_connection_keys(config: Mapping[str, Any]) -> None:
    """Fabric's own keys every connection uses: Fabric would raise a TypeError or ValueError for
    a wrong type deep inside the first Connection instead of naming the key."""
    user, port = config.get("user"), config.get("port")
    if user is not None and not isinstance(user, str):
        raise SettingsError(f"user: expected a string (the SSH login name), got {user!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 1 <= port <= 65535):
        raise SettingsError(f"port: expected an SSH port number (1-65535), got {port!r}")
    connect = plain(config.get("timeouts") or {}).get("connect")
    if connect is not None and (isinstance(connect, bool) or not isinstance(connect, (int, float))
                                or connect <= 0):
        raise SettingsError(f"timeouts.connect: expected seconds (a number above 0), "
                            f"got {connect!r}")
    keys = plain(config.get("connect_kwargs") or {}).get("key_filename")
    if keys is not None and not isinstance(keys, str) and not (
            isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise SettingsError(f"connect_kwargs.key_filename: expected a path or a list of paths, "
                            f"got {keys!r}")


SECTIONS: dict[str, type] = {
    "cluster": ClusterSettings,
    "docker": DockerSettings,
    "launch": LaunchSettings,
}


def default_config() -> dict[str, Any]:
    """The built-in defaults as a config tree, for `Collection.configure`."""
    tree = {name: _as_config(section_cls()) for name, section_cls in SECTIONS.items()}
    # Invoke merges config files key by key and refuses a mapping ({soft, hard}) where the tree
    # holds a number (memlock: -1): the built-in limits are DockerSettings', not the tree's.
    tree["docker"]["ulimits"] = {}
    return {
        **tree,
        # Fabric has no connect timeout by default: one dead host would stall every task for
        # minutes of TCP retries.
        "timeouts": {"connect": 10},
    }


def plain(value: Any) -> Any:
    """Invoke's DataProxy (and nested ones) as plain dicts and lists."""
    if isinstance(value, Mapping) or hasattr(value, "_config"):
        return {key: plain(value[key]) for key in value}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def _as_config(obj: Any) -> dict[str, Any]:
    return {key: (list(val) if isinstance(val, tuple) else val) for key, val in dataclasses.asdict(obj).items()}


def _build(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{section}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SettingsError(f"{section}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {key: _coerce(hints[key], val, f"{section}.{key}") for key, val in raw.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a simple annotation; lists become tuples so settings stay hashable."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise SettingsError(f"{key}: must not be null")
    for option in options:
        base = get_origin(option) or option
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, str):
            return value
        if base is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if base is Mapping and isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
    expected = " or ".join(_TYPE_WORDS.get(get_origin(o) or o, getattr(o, "__name__", str(o)))
                           for o in options if o is not type(None))
    raise SettingsError(f"{key}: expected {expected}, got {value!r}")


# How the config file spells what _coerce expects.
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a list", Mapping: "a mapping"}
