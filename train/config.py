"""Typed, validated configuration of the train package.

Importable without torch (the controller validates configs before it launches anything):
only the standard library and PyYAML. Checks that need the hardware (bf16 support, device
count) live in ``train.runtime`` and run after this, still before any process group starts.

A config file is YAML with the sections below; every key is optional (defaults here), an
unknown section or key is an error. ``--override section.key=value`` pairs apply in order on
top of the file, values parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Dtype = Literal["bf16", "fp16", "fp32"]
Collective = Literal["all_reduce", "reduce_scatter", "all_gather"]
Backend = Literal["auto", "nccl", "gloo"]
TimingGranularity = Literal["gemm", "phase", "step"]
StreamPriority = Literal["high", "default"]


class ConfigError(Exception):
    """A config problem; ``str()`` is the one-line message shown to the user."""


def _min(value: float) -> dict[str, float]:
    return {"min": value}


def _gt(value: float) -> dict[str, float]:
    return {"gt": value}


@dataclass
class TrainingConfig:
    max_steps: int = field(default=100, metadata=_min(1))
    warmup_steps: int = field(default=5, metadata=_min(0))
    output_dir: str = "outputs"
    log_interval: int = field(default=10, metadata=_min(1))
    dtype: Dtype = "bf16"
    seed: int = 1234
    lr: float = field(default=1.0e-6, metadata=_gt(0))


@dataclass
class ModelConfig:
    layers: int = field(default=8, metadata=_min(1))
    tokens: int = field(default=8192, metadata=_min(1))
    hidden: int = field(default=8192, metadata=_min(1))


@dataclass
class CommConfig:
    collective: Collective = "all_reduce"
    bucket_mb: float = field(default=128.0, metadata=_gt(0))
    overlap: bool = True
    # high: the comm stream (and NCCL's own stream) get the device's highest priority, so a
    # collective kernel is scheduled ahead of queued GEMM blocks; default: priority 0, like
    # the compute stream. No effect on CPU (gloo runs in a worker thread).
    stream_priority: StreamPriority = "high"


@dataclass
class CalibrationConfig:
    warmup_steps: int = field(default=2, metadata=_min(0))
    # The first block, before the measured steps.
    compute_steps: int = field(default=5, metadata=_min(0))
    comm_steps: int = field(default=5, metadata=_min(0))
    # Every interval_steps measured steps another block of interval_compute_steps GEMM-only
    # and interval_comm_steps comm-only steps runs (0: calibrate once, before the loop), so the
    # baselines follow the clocks and power state of the run.
    interval_steps: int = field(default=0, metadata=_min(0))
    interval_compute_steps: int = field(default=1, metadata=_min(0))
    interval_comm_steps: int = field(default=1, metadata=_min(0))


@dataclass
class DistributedConfig:
    backend: Backend = "auto"
    timeout_s: float = field(default=300.0, metadata=_gt(0))
    # PyTorch's flight recorder: the last N collectives of every group, dumped to
    # flight_recorder/rank_XX.json when the launch's hang watchdog asks (train.flight). 0: off.
    flight_recorder_entries: int = field(default=2000, metadata=_min(0))


@dataclass
class ProfilingConfig:
    enabled: bool = False
    wait: int = field(default=1, metadata=_min(0))
    warmup: int = field(default=1, metadata=_min(0))
    active: int = field(default=2, metadata=_min(1))
    repeat: int = field(default=1, metadata=_min(0))
    # Extra train steps after the measured ones, each under torch.profiler on GPU, to read
    # how long a collective kernel waited to start (launch_delay_ms). 0: not measured.
    launch_delay_steps: int = field(default=3, metadata=_min(0))


@dataclass
class TelemetryConfig:
    # SM clock, power and temperature per step through NVML (CUDA) or amdsmi (ROCm); null
    # on CPU. Sampled on the host while the step runs: no device synchronisation.
    enabled: bool = True
    sample_every: int = field(default=1, metadata=_min(1))


@dataclass
class TimingConfig:
    # gemm: events around every GEMM and collective; phase: one interval for the forward GEMMs
    # and one for the backward GEMMs; step: only iter_ms (compute/comm fields are null).
    granularity: TimingGranularity = "gemm"


@dataclass
class DebugConfig:
    # Adds param_checksum (float64 sum of all parameters after the update) to every metrics
    # line, so tests can check that data-parallel ranks stay identical.
    param_checksum: bool = False
    # A straggler on purpose: rank delay_rank sleeps delay_ms before the backward pass of
    # every delay_every-th train step (host sleep on CPU, a GPU spin kernel on the compute
    # stream on GPU), so its gradient buckets reach the collectives late. -1: nobody is
    # delayed. delay_every 2 delays the even steps only: the odd ones are the same run's
    # undelayed reference, under the same load.
    delay_rank: int = field(default=-1, metadata=_min(-1))
    delay_ms: float = field(default=0.0, metadata=_min(0))
    delay_every: int = field(default=1, metadata=_min(1))


@dataclass
class NcclConfig:
    # Every rank sends NCCL's INFO output (subsystems below) to nccl_debug_rank_XX.log in its
    # output directory and the summary records what NCCL built (channels, CTAs, threads,
    # algorithm, protocol, transport: effective_settings). Only with the nccl backend; the
    # lines go to the file, not to the console. false: NCCL_DEBUG* are left as they are.
    capture: bool = True
    subsystems: str = "INIT,ENV,TUNING"


@dataclass
class PoolConfig:
    # Several sweep points in one process: a comma-separated list of channel values, each run
    # as its own point on a new communicator (min = max CTAs through ProcessGroupNCCL options;
    # on gloo a new gloo group, channels a no-op). Empty: this run is one point.
    channels: str = ""
    # Per-point train overrides, "C:section.key=value;C:section.key=value" (C one of channels).
    point_overrides: str = ""
    # Where each point's outputs go: "siblings" <parent of training.output_dir>/<T>thread_<C>channels
    # (the launch's run-directory layout: the first point's is training.output_dir itself);
    # "children" <training.output_dir>/<T>thread_<C>channels.
    layout: Literal["siblings", "children"] = "children"
    # The thread value the points are named after (the process's NCCL_NTHREADS; threads are
    # read once per process, so they cannot change between points). 0: from the environment.
    threads: int = field(default=0, metadata=_min(0))


@dataclass
class TrainConfig:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    nccl: NcclConfig = field(default_factory=NcclConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    # Where the values came from, for messages and the summary's config echo.
    source: str = field(default="<defaults>", metadata={"internal": True})
    overrides: tuple[str, ...] = field(default=(), metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: dataclasses.asdict(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("internal")
        }


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=globals())


SECTIONS: dict[str, type] = {
    f.name: _resolved_hints(TrainConfig)[f.name]
    for f in dataclasses.fields(TrainConfig)
    if not f.metadata.get("internal")
}


def known_keys() -> list[str]:
    """Every ``section.key`` a config file or an override may set."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_YAML12_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Returns value as type tp or raises ValueError with the reason (no key, no file)."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    # bool is an int subclass in Python: reject it where a number is meant, and vice versa.
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string; YAML 1.2 and people
        # read it as a number.
        if isinstance(value, str) and _YAML12_FLOAT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        # pool.channels=4 reads as the integer 4 in YAML: a number is its own text here.
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug here, not bad input


def _check_bounds(meta: Mapping[str, Any], value: Any) -> None:
    if "min" in meta and value < meta["min"]:
        raise ValueError(f"must be >= {meta['min']}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise ValueError(f"must be > {meta['gt']}, got {value!r}")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not key=value (e.g. training.max_steps=8)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(
            f"override {text!r}: value is not a YAML scalar ({exc.__class__.__name__})"
        ) from None
    return key, value


_PAIR_BOUNDARY = re.compile(r"\s+(?=[A-Za-z_]\w*\.[A-Za-z_]\w*=)")


def split_overrides(overrides: Sequence[str]) -> list[str]:
    """Flattens ``--override`` arguments: one argument may hold several whitespace-separated
    ``section.key=value`` pairs (``--override 'a.b=1 c.d=2'``); a space not followed by
    ``section.key=`` stays inside the value (``model.x=[1, 2]``)."""
    pairs: list[str] = []
    for item in overrides:
        pairs.extend(p for p in _PAIR_BOUNDARY.split(item.strip()) if p)
    return pairs


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (pass an existing --config FILE)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"config file {path}: invalid YAML{where}: {problem}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


def build_config(
    data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "<dict>"
) -> TrainConfig:
    """Validates a nested mapping plus overrides into a TrainConfig (raises ConfigError)."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    origin: dict[str, str] = {}  # dotted key -> where its value came from, for messages

    def where(key: str) -> str:
        return origin.get(key, source)

    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section {section!r} (known: {', '.join(SECTIONS)})"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys")
        for key, value in body.items():
            values[section][str(key)] = value
            origin[f"{section}.{key}"] = source

    for text in split_overrides(overrides):
        try:
            dotted, value = _parse_override(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        section, dot, key = dotted.partition(".")
        if not dot or section not in SECTIONS:
            raise ConfigError(
                f"{source} (--override {text}): unknown key {dotted!r} "
                f"(keys are section.key, sections: {', '.join(SECTIONS)})"
            )
        values[section][key] = value
        origin[dotted] = f"{source} (--override {text})"

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        hints = _resolved_hints(cls)
        fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values[section].items():
            dotted = f"{section}.{key}"
            if key not in fields_by_name:
                raise ConfigError(
                    f"{where(dotted)}: unknown key {dotted!r} "
                    f"(known in {section}: {', '.join(fields_by_name)})"
                )
            try:
                coerced = _coerce(dotted, hints[key], value)
                _check_bounds(fields_by_name[key].metadata, coerced)
            except ValueError as exc:
                raise ConfigError(f"{where(dotted)}: {dotted} {exc}") from None
            kwargs[key] = coerced
        sections[section] = cls(**kwargs)

    config = TrainConfig(**sections, source=source, overrides=tuple(split_overrides(overrides)))
    _check_cross_field(config, where)
    return config


def _check_cross_field(config: TrainConfig, where: Any) -> None:
    p = config.profiling
    if p.enabled and p.wait + p.warmup + p.active > config.training.max_steps:
        raise ConfigError(
            f"{where('profiling.active')}: profiling.wait+warmup+active "
            f"({p.wait + p.warmup + p.active}) exceeds training.max_steps "
            f"({config.training.max_steps}); no trace would be written"
        )
    try:
        channels = pool_channels(config.pool.channels)
        pool_point_overrides(config.pool.point_overrides, channels)
    except ValueError as exc:
        key = "pool.point_overrides" if "point_overrides" in str(exc) else "pool.channels"
        raise ConfigError(f"{where(key)}: {exc}") from None
    d = config.debug
    if d.delay_ms > 0 and d.delay_rank < 0:
        raise ConfigError(
            f"{where('debug.delay_ms')}: debug.delay_ms {d.delay_ms} needs debug.delay_rank "
            "(the rank to delay, 0..world_size-1)"
        )


# What a pool decides once for all its points: the process's backend, devices and dtype, the
# NCCL capture set up before NCCL starts, the pool itself, where the points' outputs go.
POOL_FIXED_SECTIONS = ("distributed", "nccl", "pool")
POOL_FIXED_KEYS = ("training.output_dir", "training.dtype", "comm.stream_priority")


def pool_channels(text: str) -> list[int]:
    """pool.channels as a list (empty: no pool); ValueError naming the bad value."""
    values: list[int] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"pool.channels {text!r}: {item!r} is not a positive integer "
                             "(give e.g. pool.channels=4,8,16)")
        if int(item) in values:
            raise ValueError(f"pool.channels {text!r}: {item} is listed twice")
        values.append(int(item))
    return values


def pool_point_overrides(text: str, channels: Sequence[int]) -> dict[int, list[str]]:
    """pool.point_overrides as {channels: [section.key=value, ...]}; ValueError if a pair is
    malformed or names a channel value that is not a point."""
    found: dict[int, list[str]] = {}
    for item in (p.strip() for p in text.split(";")):
        if not item:
            continue
        head, sep, pair = item.partition(":")
        if not sep or not head.strip().isdigit() or "=" not in pair or "." not in pair.split("=")[0]:
            raise ValueError(f"pool.point_overrides {item!r} is not C:section.key=value "
                             "(e.g. 8:model.layers=2)")
        value = int(head)
        key = pair.split("=")[0].strip()
        if key.split(".")[0] in POOL_FIXED_SECTIONS or key in POOL_FIXED_KEYS:
            raise ValueError(f"pool.point_overrides {item!r}: {key} is the same for every point "
                             "of a pool (one process, one backend, one output root); run that "
                             "point in its own process (fab sweep --no-pool)")
        if value not in channels:
            raise ValueError(f"pool.point_overrides {item!r}: {value} is not one of "
                             f"pool.channels ({', '.join(map(str, channels)) or 'empty'})")
        found.setdefault(value, []).append(pair.strip())
    return found


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML config file and applies ``key=value`` overrides in order.

    Raises ConfigError (one-line message naming the key and the file) on any problem.
    """
    path = Path(path)
    return build_config(_read_yaml(path), overrides, source=str(path))
