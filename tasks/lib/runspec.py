"""What one `fab launch` means, resolved and validated before any host is touched.

`resolve_run_spec` is the one place launch values are decided: each comes from the flag, else the
project config (`launch.*` keys the user set), else the original scripts' environment variables
(CHANNELS, THREADS, NPROC_PER_NODE, CONFIG_FILE, MASTER_PORT), else a built-in default. Everything
else here derives from a RunSpec: the NCCL/RCCL variables, run id and directories, the torchrun
and profiler argument vectors. Pure: no network, no torch (train.config is torch-free).
"""
from __future__ import annotations

import posixpath
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from tasks.lib.entry import Entry, EntryError, resolve_entry
from tasks.lib.objective import MetricError, parse_metric
from tasks.lib.profiling import (
    ProfilerChoice,
    ProfilingError,
    resolve_profilers,
    torch_profile_overrides,
)
from tasks.lib.quoting import is_env_name
from tasks.lib.settings import LaunchSettings
from tasks.lib.watchdog import default_hang_timeout, hang_timeout_warning

Accelerator = Literal["cuda", "rocm", "cpu"]
ACCELERATORS: tuple[str, ...] = ("cuda", "rocm", "cpu")

# NCCL's channel limit (MAXCHANNELS); NCCL_MIN/MAX_NCHANNELS and NCCL_MIN/MAX_CTAS share it.
MIN_CHANNELS, MAX_CHANNELS = 1, 64
# NCCL_NTHREADS accepts exactly these; RCCL rounds RCCL_THREADS_PER_BLOCK to a multiple of 64 and
# caps it at 256 or 512 depending on the GPU architecture. A sweep point must mean what it says,
# so only values both libraries take as given are accepted.
THREAD_VALUES: tuple[int, ...] = (64, 128, 256, 512)
RCCL_THREAD_STEP = 64
RCCL_LOW_CAP = 256

ENV_FALLBACKS: dict[str, str] = {  # RunSpec field -> the original scripts' environment variable
    "channels": "CHANNELS",
    "threads": "THREADS",
    "nproc": "NPROC_PER_NODE",
    "config": "CONFIG_FILE",
    "master_port": "MASTER_PORT",
}
# The launch.* defaults are LaunchSettings' (one place); they rank last, below the env variables.
_LAUNCH_DEFAULTS = LaunchSettings()
BUILTINS: dict[str, Any] = {
    name: getattr(_LAUNCH_DEFAULTS, name)
    for name in ("channels", "threads", "nproc", "config", "master_port", "hang_timeout")
}
# launch.* keys whose value the user may set (the rest of a config tree is not launch's).
LAUNCH_KEYS = frozenset(f.name for f in fields(LaunchSettings))
# Without GPUs the same run is a small gloo job: two ranks per node and the CPU-sized config.
CPU_BUILTINS: dict[str, Any] = {
    "nproc": 2,
    "config": "config/multi_node/cpu_tiny.yaml",
}

# Set by the launch itself (env.sh, node launcher, torchrun): a user value would be overwritten
# or would break rendezvous, so --env refuses them with the flag to use instead.
RESERVED_ENV: dict[str, str] = {
    "NCCL_MIN_NCHANNELS": "--channels", "NCCL_MAX_NCHANNELS": "--channels",
    "NCCL_MIN_CTAS": "--channels", "NCCL_MAX_CTAS": "--channels",
    "RCCL_THREADS_PER_BLOCK": "--threads", "NCCL_NTHREADS": "--threads",
    "NCCL_SOCKET_IFNAME": "cluster.socket_ifname", "GLOO_SOCKET_IFNAME": "cluster.socket_ifname",
    "MASTER_ADDR": "the inventory's first host", "MASTER_PORT": "--master-port",
    "GEMM_RENDEZVOUS_SECRET": "the launch",
    "NODE_RANK": "the inventory order", "RANK": "torchrun", "LOCAL_RANK": "torchrun",
    "WORLD_SIZE": "--nproc and the inventory", "LOCAL_WORLD_SIZE": "--nproc",
    "GEMM_RUN_ID": "the launch", "GEMM_NODE_RANK": "the launch",
    "GEMM_OUTPUT_DIR": "the launch (the run's output directory)",
    "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "the launch (it marks each line with its rank)",
    "PET_LOG_DIR": "the launch (torchrun's per-rank logs go to the output directory)",
}
# The launch points training.output_dir at the run directory; collection depends on it.
RESERVED_OVERRIDES: tuple[str, ...] = ("training.output_dir",)

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")
CONFIG_NAME_ON_NODE = "train_config.yaml"
ROCPROF_INPUT_NAME_ON_NODE = "rocprof_input"


class RunSpecError(ValueError):
    """A launch input that cannot be used; the message is one line saying what and how to fix."""


@dataclass(frozen=True)
class LaunchFlags:
    """The command line as typed: None (or empty) means "not given"."""

    channels: object = None
    threads: object = None
    nproc: object = None
    config: str | None = None
    master_port: object = None
    nccl_preset: str | None = None
    overrides: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    docker: bool | None = None
    rocprof: bool = False
    stats: bool = False
    rocprof_input: str | None = None
    nsys: bool = False
    torch_profile: bool = False
    hang_timeout: object = None
    pin_channels: bool = True
    detach: bool = False
    dry_run: bool = False
    force: bool = False
    entry: object = None             # your own training (tasks/lib/entry.py); None: -m train
    metric: str | None = None        # the objective of an entry run (tasks/lib/objective.py)


@dataclass(frozen=True)
class RunSpec:
    """A validated launch. `nproc` stays "auto" until the hosts' GPU counts are known."""

    channels: int
    threads: int
    nproc: int | Literal["auto"]
    config: str                      # as resolved (relative to the checkout, or absolute)
    config_path: Path | None         # the file on the controller, validated (None: an entry)
    overrides: tuple[str, ...]       # user overrides, one section.key=value each
    env: tuple[tuple[str, str], ...]  # --env pairs in order
    accelerator: Accelerator
    docker: bool
    master_port: int | None          # None: pick a free port on the master
    nccl_preset: str | None
    profilers: ProfilerChoice        # rocprof_input there: the path on the controller
    rocprof_input: Path | None
    hang_timeout: float              # 0: no hang watchdog
    pin_channels: bool
    detach: bool
    dry_run: bool
    force: bool
    sources: Mapping[str, str] = field(default_factory=dict)  # field -> flag|config|env X|built-in
    warnings: tuple[str, ...] = ()
    # The hang limit is the launch's default (below distributed.timeout_s) and shrinks to a
    # multiple of the slowest step once steps are seen (tasks.lib.watchdog).
    hang_auto: bool = False
    entry: Entry | None = None       # your own training instead of our train package
    metric: str | None = None        # the objective of an entry run, as given (validated)

    @property
    def entry_display(self) -> str:
        """What the ranks run, as typed after torchrun (the launch's first line)."""
        if self.entry is not None:
            return self.entry.display
        overrides = " ".join(f"--override {pair}" for pair in self.train_overrides)
        return f"-m train --config {self.config}" + (f" {overrides}" if overrides else "")

    @property
    def output_dir_name(self) -> str:
        return output_dir_name(self.channels, self.threads)

    @property
    def rocprof(self) -> bool:
        return self.profilers.rocprof

    @property
    def train_overrides(self) -> tuple[str, ...]:
        """The user's overrides plus what the profiling flags need from the train package."""
        return self.overrides + tuple(torch_profile_overrides(self.profilers))

    def flags_record(self) -> dict[str, Any]:
        """The resolved values and where each came from, for run.json."""
        return {
            "channels": self.channels, "threads": self.threads, "nproc": self.nproc,
            "config": self.config, "overrides": list(self.overrides),
            "env": {key: value for key, value in self.env}, "accelerator": self.accelerator,
            "docker": self.docker, "master_port": self.master_port or "auto",
            "nccl_preset": self.nccl_preset, **self.profilers.as_dict(),
            "rocprof_input": str(self.rocprof_input) if self.rocprof_input else None,
            "hang_timeout": self.hang_timeout, "hang_auto": self.hang_auto,
            "pin_channels": self.pin_channels, "detach": self.detach, "force": self.force,
            "sources": dict(self.sources),
            "entry": self.entry.record() if self.entry is not None else None,
            "metric": self.metric,
        }


# -- resolution ------------------------------------------------------------------------------------

def explicit_launch_config(config: Any) -> dict[str, Any]:
    """The `launch.*` keys a user set (fabric.yaml, -f FILE, ~/.fabric.yaml, FABRIC_LAUNCH_* ...).

    Built-in defaults live in the config tree too (Collection.configure); they must not hide the
    original scripts' environment variables, which rank between the config and the built-ins.
    Invoke keeps each source as its own layer, so the user's layers are read directly.
    """
    layers = ("_system", "_user", "_project", "_env", "_runtime", "_overrides", "_modifications")
    found: dict[str, Any] = {}
    for layer_name in layers:
        layer = getattr(config, layer_name, None) if not isinstance(config, Mapping) else None
        section = layer.get("launch") if isinstance(layer, Mapping) else None
        if isinstance(section, Mapping):
            found.update({key: value for key, value in section.items() if key in LAUNCH_KEYS})
    if isinstance(config, Mapping):  # a plain dict (tests): everything in it counts as set
        section = config.get("launch") or {}
        found.update({key: value for key, value in section.items() if key in LAUNCH_KEYS})
    return found


@dataclass(frozen=True)
class LaunchValues:
    """The launch values that have a flag, a config key, an env variable and a built-in."""

    channels: int
    threads: int
    nproc: int | Literal["auto"]
    master_port: int | None
    config: str
    hang_timeout: float
    sources: Mapping[str, str]    # field -> flag | config | env X | built-in


def resolve_launch_values(
    flags: LaunchFlags,
    config: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    accelerator: str,
    builtin_overrides: Mapping[str, Any] | None = None,
) -> LaunchValues:
    """THE resolution order of launch values: flag -> config -> environment -> built-in.

    `fab launch` (through resolve_run_spec) and `fab check` both use it, so a check judges the
    nproc and master port the launch would use. config: only the `launch.*` keys the user set
    (explicit_launch_config). Raises RunSpecError naming where a bad value came from.
    """
    if accelerator not in ACCELERATORS:
        raise RunSpecError(f"unknown accelerator {accelerator!r} "
                           f"(one of {', '.join(ACCELERATORS)})")
    builtins = {**BUILTINS, **(CPU_BUILTINS if accelerator == "cpu" else {}),
                **(builtin_overrides or {})}
    sources: dict[str, str] = {}

    def pick(name: str, flag_value: object) -> object:
        if flag_value not in (None, ""):
            sources[name] = "flag"
            return flag_value
        if config.get(name) is not None:
            sources[name] = "config"
            return config[name]
        env_name = ENV_FALLBACKS.get(name)
        if env_name and environ.get(env_name, "").strip():
            sources[name] = f"env {env_name}"
            return environ[env_name].strip()
        sources[name] = "built-in"
        return builtins[name]

    def where(name: str) -> str:
        source = sources[name]
        if source == "flag":
            return f"--{name.replace('_', '-')}"
        if source == "config":
            return f"launch.{name}"
        return source.removeprefix("env ") if source.startswith("env ") else name

    channels = parse_channels(pick("channels", flags.channels), where("channels"))
    threads = parse_threads(pick("threads", flags.threads), where("threads"))
    nproc = parse_nproc(pick("nproc", flags.nproc), where("nproc"))
    master_port = parse_master_port(pick("master_port", flags.master_port), where("master_port"))
    config_text = str(pick("config", flags.config))
    if accelerator == "cpu" and nproc == "auto":
        raise RunSpecError(f"{where('nproc')}: 'auto' counts GPUs and these nodes have none; "
                           "give a number of CPU ranks per node, e.g. --nproc 2")
    hang_timeout = parse_hang_timeout(pick("hang_timeout", flags.hang_timeout),
                                      where("hang_timeout"))
    return LaunchValues(channels=channels, threads=threads, nproc=nproc,
                        master_port=master_port, config=config_text,
                        hang_timeout=hang_timeout, sources=sources)


def resolve_run_spec(
    flags: LaunchFlags,
    config: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    accelerator: str,
    docker_default: bool,
    project_root: Path,
    validate_config: Callable[[Path, Sequence[str]], None] | None = None,
    builtin_overrides: Mapping[str, Any] | None = None,
    preset_loader: Callable[[str], Mapping[str, str]] | None = None,
) -> RunSpec:
    """Decide and validate every launch value (resolve_launch_values' order for those it owns).

    config: only the `launch.*` keys the user set (built-in defaults excluded, so the original
    environment variables still apply). accelerator: "cuda" | "rocm" | "cpu", what the nodes run
    on (CPU: gloo, and the CPU built-ins for nproc and config). docker_default: docker on/off when
    neither --docker nor --no-docker was given. validate_config: raises RunSpecError for a bad
    config (default: train.config.load_config, torch-free). builtin_overrides: built-ins of this
    situation (the embedded default on a GPU machine uses nproc "auto": its own GPUs).
    preset_loader: reads an NCCL preset's variables (render.load_nccl_preset); a preset that sets
    the channel or thread variables (one written by `fab report --export-preset`) gives the
    launch its channels and threads unless --channels/--threads do (preset_launch_values).
    """
    values = resolve_launch_values(flags, config, environ, accelerator=accelerator,
                                   builtin_overrides=builtin_overrides)
    sources = dict(values.sources)
    channels, threads, nproc = values.channels, values.threads, values.nproc
    master_port, config_text, hang_timeout = values.master_port, values.config, values.hang_timeout
    overrides = parse_overrides(flags.overrides)
    env = parse_env_pairs(flags.env, environ)
    entry = resolve_entry_value(flags, config, project_root, sources)
    metric = flags.metric or config.get("metric") or None
    if metric is not None:
        try:
            parse_metric(metric)
        except MetricError as err:
            raise RunSpecError(str(err)) from None

    nccl_preset = flags.nccl_preset or config.get("nccl_preset") or None
    sources["nccl_preset"] = "flag" if flags.nccl_preset else ("config" if nccl_preset else "none")
    pin_channels = flags.pin_channels
    preset_warnings: list[str] = []
    if nccl_preset and preset_loader is not None:
        try:
            preset_env = preset_loader(nccl_preset)
        except ValueError as err:
            raise RunSpecError(f"--nccl-preset: {err}") from None
        channels, threads, pin_channels, preset_warnings = preset_launch_values(
            nccl_preset, preset_env, channels, threads, pin_channels, sources)

    # The profiling flags' rules are tasks.lib.profiling's (--stats, --rocprof-input: --rocprof).
    try:
        profilers = resolve_profilers(rocprof=flags.rocprof, stats=flags.stats,
                                      rocprof_input=flags.rocprof_input, nsys=flags.nsys,
                                      torch_profile=flags.torch_profile, platform=accelerator)
    except ProfilingError as err:
        raise RunSpecError(str(err)) from None
    if profilers.wraps_torchrun and accelerator == "cpu":
        tool = "rocprofv3" if profilers.rocprof else "nsys"
        raise RunSpecError(f"{tool} profiles GPU kernels and these nodes are CPU-only (platform "
                           "cpu): drop the profiler flag, or set docker.platform to the GPUs' kind")
    rocprof_input = None
    if flags.rocprof_input:
        rocprof_input = _project_file(flags.rocprof_input, project_root)
        if not rocprof_input.is_file():
            raise RunSpecError(f"--rocprof-input {flags.rocprof_input}: no such file")

    warnings = [*preset_warnings, *thread_warnings(threads, accelerator)]
    config_path: Path | None = None
    if entry is None:
        config_path = _project_file(config_text, project_root)
        (validate_config or load_train_config)(
            config_path, overrides + tuple(torch_profile_overrides(profilers)))
    else:
        warnings += entry_warnings(entry, flags, sources, overrides, profilers)

    docker = docker_default if flags.docker is None else bool(flags.docker)
    sources["docker"] = "built-in" if flags.docker is None else "flag"

    collective_timeout = collective_timeout_s(config_path, overrides) if config_path else None
    # An entry's progress is its output lines, not steps: no step-derived limit (a quiet
    # evaluation would read as a hang).
    hang_auto = (sources.get("hang_timeout") == "built-in" and hang_timeout > 0
                 and entry is None)
    if hang_auto:
        hang_timeout = default_hang_timeout(hang_timeout, collective_timeout)
    elif (warning := hang_timeout_warning(hang_timeout, collective_timeout)):
        warnings.append(warning)
    return RunSpec(
        channels=channels, threads=threads, nproc=nproc, config=config_text,
        config_path=config_path, overrides=overrides, env=env,
        accelerator=accelerator,  # type: ignore[arg-type]
        docker=docker, master_port=master_port, nccl_preset=nccl_preset,
        profilers=profilers, rocprof_input=rocprof_input, hang_timeout=hang_timeout,
        pin_channels=pin_channels, detach=flags.detach, dry_run=flags.dry_run,
        force=flags.force, sources=sources, warnings=tuple(warnings), hang_auto=hang_auto,
        entry=entry, metric=metric,
    )


def preset_launch_values(name: str, preset: Mapping[str, str], channels: int, threads: int,
                         pin_channels: bool, sources: dict[str, str]) -> tuple[int, int, bool, list[str]]:
    """Channels, threads and pinning from a preset's channel/thread variables where no flag gave
    them (the launch sets those variables itself from --channels/--threads, so without this a
    preset's values would be silently replaced by the defaults); the warnings where a flag wins."""
    warnings: list[str] = []
    where = f"NCCL preset {name}"
    wanted_channels = preset.get("NCCL_MAX_NCHANNELS") or preset.get("NCCL_MAX_CTAS")
    wanted_threads = preset.get("NCCL_NTHREADS") or preset.get("RCCL_THREADS_PER_BLOCK")
    for field_name, text in (("channels", wanted_channels), ("threads", wanted_threads)):
        if text is None:
            continue
        value = (parse_channels if field_name == "channels" else parse_threads)(text, f"{where}: {field_name}")
        current = channels if field_name == "channels" else threads
        if sources.get(field_name) == "flag":
            if value != current:
                warnings.append(f"--{field_name} {current} replaces the {field_name} of {where} ({value})")
            continue
        sources[field_name] = where
        if field_name == "channels":
            channels = value
        else:
            threads = value
    if wanted_channels is not None and sources.get("channels") == where:
        pin_channels = preset.get("NCCL_MIN_NCHANNELS") == wanted_channels
    return channels, threads, pin_channels, warnings


def resolve_entry_value(flags: LaunchFlags, config: Mapping[str, Any], project_root: Path,
                        sources: dict[str, str]) -> Entry | None:
    """--entry, else launch.entry, validated (tasks.lib.entry); None: our train package."""
    value, where = flags.entry, "--entry"
    if value in (None, "", [], ()):
        value, where = config.get("entry"), "launch.entry"
    if value in (None, "", [], ()):
        sources["entry"] = "built-in"
        return None
    sources["entry"] = "flag" if where == "--entry" else "config"
    try:
        return resolve_entry(value, project_root, what=where)
    except EntryError as err:
        raise RunSpecError(str(err)) from None


def entry_warnings(entry: Entry, flags: LaunchFlags, sources: Mapping[str, str],
                   overrides: Sequence[str], profilers: ProfilerChoice) -> list[str]:
    """The train package's flags mean nothing to another program: given on the command line
    they are refused; a default from the config or the environment is said to be unused."""
    given = [name for name, value in (("--config", flags.config), ("--override", overrides),
                                      ("--torch-profile", profilers.torch_profile)) if value]
    if given:
        raise RunSpecError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} the train package's and "
            f"--entry runs your own program: give its options in the entry itself, e.g. "
            f"--entry \"{entry.argv[0]} --config my.yaml\" (files next to the script are "
            "pushed with it), and have it write profiler traces under $GEMM_OUTPUT_DIR")
    warnings = []
    if sources.get("config") not in (None, "built-in"):
        warnings.append(f"{sources['config'].removeprefix('env ')} names a train package config; "
                        "with --entry it is not used")
    if entry.skipped:
        shown = ", ".join(entry.skipped[:5]) + (" ..." if len(entry.skipped) > 5 else "")
        warnings.append(f"entry: not pushed (symlinks or special files): {shown}")
    return warnings


def collective_timeout_s(config_path: Path, overrides: Sequence[str]) -> float | None:
    """distributed.timeout_s of the train config (None when it cannot be read here: the train
    package's own check reports why)."""
    from train.config import ConfigError, load_config  # torch-free by train's contract

    try:
        return load_config(config_path, overrides).distributed.timeout_s
    except (ConfigError, OSError):
        return None


def _project_file(path: str, project_root: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else project_root / candidate


# -- single values ---------------------------------------------------------------------------------

def _as_int(value: object, what: str, hint: str) -> int:
    if isinstance(value, bool):
        raise RunSpecError(f"{what}: {value!r} is not an integer ({hint})")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise RunSpecError(f"{what}: {value!r} is not an integer ({hint})")
    return int(text)


def parse_channels(value: object, what: str = "--channels") -> int:
    hint = f"NCCL's range is {MIN_CHANNELS}-{MAX_CHANNELS}"
    channels = _as_int(value, what, hint)
    if not MIN_CHANNELS <= channels <= MAX_CHANNELS:
        raise RunSpecError(f"{what}: {channels} is outside {MIN_CHANNELS}-{MAX_CHANNELS} "
                           f"(NCCL's channel limit; NCCL would clamp it silently)")
    return channels


def parse_threads(value: object, what: str = "--threads") -> int:
    accepted = ", ".join(map(str, THREAD_VALUES))
    threads = _as_int(value, what, f"one of {accepted}")
    if threads in THREAD_VALUES:
        return threads
    rounded = max(RCCL_THREAD_STEP, threads - threads % RCCL_THREAD_STEP)
    raise RunSpecError(
        f"{what}: {threads} threads per block is not a value NCCL/RCCL take as given (one of "
        f"{accepted}): NCCL_NTHREADS rejects it and RCCL would run "
        f"{min(rounded, 512)} (multiple of {RCCL_THREAD_STEP}, at most 256 or 512 by GPU "
        "architecture) without saying so")


def thread_warnings(threads: int, accelerator: str) -> list[str]:
    """What RCCL will change without an error, for values parse_threads accepts."""
    if accelerator == "rocm" and threads > RCCL_LOW_CAP:
        return [f"RCCL caps RCCL_THREADS_PER_BLOCK at {RCCL_LOW_CAP} on GPU architectures whose "
                f"limit is {RCCL_LOW_CAP}; there --threads {threads} runs as {RCCL_LOW_CAP} (check "
                "the RCCL log with --nccl-preset debug)"]
    return []


def parse_nproc(value: object, what: str = "--nproc") -> int | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    nproc = _as_int(value, what, "a number of ranks per node, or auto = the GPUs of each node")
    if nproc < 1:
        raise RunSpecError(f"{what}: {nproc} ranks per node; give at least 1 (or auto)")
    return nproc


def parse_master_port(value: object, what: str = "--master-port") -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    port = _as_int(value, what, "a TCP port 1024-65535, or auto")
    if not 1024 <= port <= 65535:
        raise RunSpecError(f"{what}: {port} is not a usable port (1024-65535, or auto)")
    return port


def parse_hang_timeout(value: object, what: str = "--hang-timeout") -> float:
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        raise RunSpecError(f"{what}: {value!r} is not a number of seconds (0 turns the hang "
                           "watchdog off)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise RunSpecError(f"{what}: {value!r} must be a number of seconds >= 0 (0: off)")
    return seconds


def parse_env_pairs(items: Sequence[str],
                    environ: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """--env KEY=VALUE items; the value is kept byte for byte (quotes, $(...), newlines).

    `--env KEY` alone takes KEY's value from `environ` (this process's environment), as
    `docker run -e KEY` does: a secret given so never sits in an argv (`ps` shows every user
    the command line of `fab` itself), and `fab launch --slurm` hands its batch job secrets
    that way (tasks/run/submit.py)."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep and environ is not None and is_env_name(name) and name in environ:
            value = environ[name]
        elif not sep:
            raise RunSpecError(f"--env {item!r} is not KEY=VALUE (e.g. --env NCCL_DEBUG=INFO), "
                               "nor the name of a variable set in this environment")
        if not is_env_name(name):
            raise RunSpecError(f"--env {name!r} is not a valid variable name (letters, digits "
                               "and _, not starting with a digit)")
        if name in RESERVED_ENV:
            raise RunSpecError(f"--env {name} is set by the launch; "
                               f"use {RESERVED_ENV[name]} instead")
        if name.startswith("PET_"):
            # torchrun's flags from the environment: one could switch its rendezvous to the
            # c10d backend, whose state torchrun unpickles from a store anyone can write.
            raise RunSpecError(f"--env {name}: torchrun's settings (PET_*) are the launch's")
        if name in pairs:
            raise RunSpecError(f"--env {name} is given twice; keep one")
        if "\0" in value:
            raise RunSpecError(f"--env {name} contains a NUL byte, which no environment can hold")
        pairs[name] = value
    return tuple(pairs.items())


def parse_overrides(items: Sequence[str]) -> tuple[str, ...]:
    """--override section.key=value items (several per item allowed, as the train package does)."""
    from train.config import split_overrides  # torch-free by train's contract

    pairs = tuple(split_overrides(items))
    for pair in pairs:
        if not _OVERRIDE.match(pair):
            raise RunSpecError(f"--override {pair!r} is not section.key=value "
                               "(e.g. --override training.max_steps=20)")
        key = pair.split("=", 1)[0]
        if key in RESERVED_OVERRIDES:
            raise RunSpecError(f"--override {key} is set by the launch (outputs go to the run "
                               "directory); drop it")
    return pairs


def load_train_config(path: Path, overrides: Sequence[str]) -> None:
    """Validate with the train package's own loader (torch-free: train.config imports no torch)."""
    from train.config import ConfigError, load_config

    try:
        load_config(path, overrides)
    except ConfigError as err:
        raise RunSpecError(f"config: {err}") from None


def resolve_nproc(nproc: int | str, gpu_counts: Mapping[str, int], accelerator: str) -> int:
    """Ranks per node once the hosts' GPU counts (label -> count) are known.

    auto: the GPUs of each node, which must agree (torchrun's static rendezvous gives every node
    the same nproc_per_node). A number must fit on every GPU node.
    """
    if accelerator == "cpu":
        if nproc == "auto":
            raise RunSpecError("--nproc auto counts GPUs and the nodes have none; give a number")
        return int(nproc)
    missing = [label for label, count in gpu_counts.items() if count < 1]
    if missing:
        raise RunSpecError(f"no GPU found on {', '.join(missing)} (platform {accelerator}); set "
                           "docker.platform: cpu for CPU nodes or fix the driver")
    if nproc == "auto":
        counts = sorted(set(gpu_counts.values()))
        if len(counts) > 1:
            detail = ", ".join(f"{label}: {count}" for label, count in gpu_counts.items())
            raise RunSpecError(f"--nproc auto: the nodes have different GPU counts ({detail}); "
                               f"give --nproc {counts[0]} to use the same number everywhere")
        return counts[0]
    too_few = [f"{label} has {count}" for label, count in gpu_counts.items() if count < int(nproc)]
    if too_few:
        raise RunSpecError(f"--nproc {nproc} is more than the GPUs of a node "
                           f"({'; '.join(too_few)}): lower --nproc or use auto")
    return int(nproc)


# -- environment of the ranks ----------------------------------------------------------------------

def nccl_env(channels: int, threads: int, *, pin_channels: bool,
             accelerator: str) -> dict[str, str]:
    """Channels and threads as NCCL/RCCL variables.

    Pinned (min = max) so a sweep point runs with the channel count it names, not "up to" it.
    On CUDA, NVLS and other CTA-based algorithms ignore channel limits: NCCL_MIN/MAX_CTAS bound
    them.
    """
    env = {}
    if pin_channels:
        env["NCCL_MIN_NCHANNELS"] = str(channels)
    env["NCCL_MAX_NCHANNELS"] = str(channels)
    if accelerator == "cuda":
        if pin_channels:
            env["NCCL_MIN_CTAS"] = str(channels)
        env["NCCL_MAX_CTAS"] = str(channels)
    env["RCCL_THREADS_PER_BLOCK"] = str(threads)
    env["NCCL_NTHREADS"] = str(threads)
    return env


def socket_env(ifname: str) -> dict[str, str]:
    """Bootstrap and gloo traffic on the interface that routes to the master, per host."""
    return {"NCCL_SOCKET_IFNAME": ifname, "GLOO_SOCKET_IFNAME": ifname}


# -- naming ----------------------------------------------------------------------------------------

def run_id_base(channels: int, threads: int, when: datetime) -> str:
    return f"multinode_{channels}ch_{threads}th_{when:%Y%m%d_%H%M%S}"


RUN_ID_SUFFIX_BYTES = 3  # 6 hex digits after the timestamp


def run_id_candidates(channels: int, threads: int, when: datetime,
                      token: Callable[[int], str] = secrets.token_hex) -> Iterator[str]:
    """Run ids `<base>_<6 random hex>`, fresh each; the first free one wins.

    Random, not a counter: on a shared node nobody can guess (and pre-create or squat) the
    directory or registry entry of a run before it starts. The timestamp keeps them sorted.
    """
    base = run_id_base(channels, threads, when)
    while True:
        yield f"{base}_{token(RUN_ID_SUFFIX_BYTES)}"


def output_dir_name(channels: int, threads: int) -> str:
    """The seed's layout: <T>thread_<C>channels/ inside the run directory."""
    return f"{threads}thread_{channels}channels"


def node_run_dir(workdir: str, run_id: str) -> str:
    """Inside the workdir, so a container that mounts it at the same path sees the same files."""
    return posixpath.join(workdir, "experiments", run_id)


def log_file_name(node_rank: int, when: datetime) -> str:
    return f"node_{node_rank}_{when:%Y%m%d_%H%M%S}.txt"


# -- argument vectors ------------------------------------------------------------------------------

def torchrun_argv(
    *,
    nnodes: int,
    nproc: int | str,          # str only for --dry-run's placeholders
    master_addr: str,
    config_path: str,
    output_dir: str,
    overrides: Sequence[str],
    entry: Sequence[str] | None = None,
) -> list[str]:
    """torchrun for one node, the node rank left out: the node launcher adds it (same file on
    every node). No restarts: a failed rank must end the run so fail-fast sees it.

    No master port: torchrun reads it from PET_MASTER_PORT, which env.sh sets. An argv is
    readable by every user of the node, and whoever binds that port first serves the store
    our other nodes join (train/rendezvous.py, docs/SECURITY.md).
    entry: what runs instead of `-m train` (tasks.lib.entry.entry_argv); its ranks' output is
    teed to per-rank files and marked with the rank in the node's log (--tee=3)."""
    argv = [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        f"--master-addr={master_addr}",
        "--max-restarts=0",
    ]
    if entry is not None:
        return [*argv, "--tee=3", *entry]
    argv += [
        "-m", "train",
        "--config", config_path,
        "--override", f"training.output_dir={output_dir}",
    ]
    for pair in overrides:
        argv += ["--override", pair]
    return argv


__all__ = [
    "Accelerator", "LaunchFlags", "RunSpec", "RunSpecError", "resolve_run_spec", "parse_channels",
    "parse_threads", "thread_warnings", "parse_nproc", "parse_master_port", "parse_env_pairs",
    "parse_overrides", "load_train_config", "resolve_nproc", "nccl_env", "socket_env",
    "run_id_base", "run_id_candidates", "output_dir_name", "node_run_dir", "log_file_name",
    "torchrun_argv", "parse_hang_timeout", "BUILTINS", "CPU_BUILTINS", "ENV_FALLBACKS",
    "THREAD_VALUES", "CONFIG_NAME_ON_NODE", "ROCPROF_INPUT_NAME_ON_NODE", "LAUNCH_KEYS",
    "LaunchValues", "resolve_launch_values", "explicit_launch_config",
]
