"""What NCCL/RCCL really used, read back from its own debug output (pure: no torch).

Asking NCCL for channels or threads proves nothing: an environment variable can clamp a
per-communicator setting (NCCL_MIN_NCHANNELS=4 turns min/max CTAs 2/2 into 4 channels), a
variable the library does not know is silently ignored, a thread count only applies to some
algorithms, and a preset can ask for InfiniBand while NCCL falls back to sockets. So every rank
runs with ``NCCL_DEBUG=INFO`` and its lines sent to a per-rank file (``NCCL_DEBUG_FILE``);
train.nccl_log parses them into communicators (channels built, transports, the TUNING table,
the per-collective algorithm and protocol), train.nccl_threads derives the block each
collective launched with, and this module compares it all with what the point asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.nccl_log import (  # parse_nccl_log re-exported: callers read logs through here
    DATA_COLLECTIVE_BYTES,
    Communicator,
    NcclLog,
    parse_nccl_log,
)
from train.nccl_threads import WORLD_ONE, thread_settings

DEBUG_FILE_PATTERN = "nccl_debug_rank_{rank:02d}.log"
DEFAULT_SUBSYSTEMS = ("INIT", "ENV", "TUNING")
# Thread knobs each library reads, and what the other one does with them: the thread setting
# of a point is real only if the library found prints "<NAME> set by environment".
# NCCL: src/graph/tuning.cc NCCL_PARAM(Nthreads, "NTHREADS", -2) (NCCL_NTHREADS; multiple of
# 32, 64..512 else clamped with a WARN). RCCL: the same NCCL_PARAM in its tuning.cc (so
# NCCL_NTHREADS is read there too) plus RCCL_THREADS_PER_BLOCK, listed in RCCL's CHANGELOG
# (the release after 2.27.7 for ROCm 7.2.0) as a WarpSpeed knob. NCCL has no RCCL_* variable.
THREAD_KNOBS = {"nccl": ("NCCL_NTHREADS",), "rccl": ("RCCL_THREADS_PER_BLOCK", "NCCL_NTHREADS")}
CHANNEL_KNOBS = ("NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "NCCL_MIN_CTAS", "NCCL_MAX_CTAS")

def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# -- the environment that turns the capture on ----------------------------------------------------

def capture_env(environ: Mapping[str, str], path: str | Path,
                subsystems: Sequence[str] = DEFAULT_SUBSYSTEMS) -> dict[str, str]:
    """The variables to set so NCCL writes what this module reads into ``path``.

    A level the user asked for above INFO (TRACE) is kept; their subsystems are kept and ours
    added (ALL stays ALL). NCCL_DEBUG_FILE expands only %h and %p, so the per-rank path is made
    here, by the rank itself, before NCCL is first called.
    """
    level = environ.get("NCCL_DEBUG", "").strip().upper()
    wanted = [s.strip().upper() for s in environ.get("NCCL_DEBUG_SUBSYS", "").split(",") if s.strip()]
    if "ALL" not in wanted and not any(s.startswith("^") for s in wanted):
        wanted += [s for s in subsystems if s not in wanted]
    return {
        "NCCL_DEBUG": level if level == "TRACE" else "INFO",
        "NCCL_DEBUG_SUBSYS": ",".join(wanted) if wanted else ",".join(subsystems),
        "NCCL_DEBUG_FILE": str(path),
    }


# -- what a point asked against what it got ------------------------------------------------------

@dataclass(frozen=True)
class Asked:
    """What a point asked for. channels: min = max CTAs of its communicator (pool) or the
    pinned NCCL_MIN/MAX_NCHANNELS of the process (restart mode); threads from the env."""

    channels: int | None
    threads: int | None
    min_ctas: int | None = None
    max_ctas: int | None = None
    network: str | None = None      # "IB" when the run asked for InfiniBand (NCCL_IB_DISABLE=0)


def asked_from_env(env: Mapping[str, str], min_ctas: int | None = None,
                   max_ctas: int | None = None) -> Asked:
    """A point's request: per-communicator CTAs when given, else the channel variables."""
    channels = max_ctas if max_ctas is not None else _int(
        env.get("NCCL_MAX_CTAS") or env.get("NCCL_MAX_NCHANNELS"))
    threads = _int(env.get("NCCL_NTHREADS") or env.get("RCCL_THREADS_PER_BLOCK"))
    network = "IB" if env.get("NCCL_IB_DISABLE", "").strip() == "0" else None
    return Asked(channels=channels, threads=threads, min_ctas=min_ctas, max_ctas=max_ctas,
                 network=network)


def effective_settings(log: NcclLog, asked: Asked, environ: Mapping[str, str],
                       accelerator: str = "cuda", process: NcclLog | None = None) -> dict[str, Any]:
    """One rank's effective settings for a point: the point's communicator (the first one
    created in the slice of the log the point covers) and every mismatch with what it asked,
    as one-line flags. A flag is a finding about the measurement, not an error of the run; a
    value the output cannot establish is None with a reason, not a flag.

    process: the whole file's parse, when ``log`` is a slice of it: NCCL prints its version
    and the variables it read once per process, before the first communicator.
    accelerator: only a fallback for a log without a version line (the library is read from
    that line, never guessed)."""
    if process is not None:
        log = NcclLog(version=log.version or process.version,
                      library=log.library or process.library, env={**process.env, **log.env},
                      communicators=log.communicators, warnings=log.warnings,
                      invalid={**process.invalid, **log.invalid},
                      rccl_threads_adjusted=(log.rccl_threads_adjusted if log.rccl_threads_adjusted
                                             is not None else process.rccl_threads_adjusted),
                      network=log.network or process.network,
                      lines=log.lines + process.lines)
    comms = [c for c in log.communicators if c.complete or c.channels is not None]
    point = comms[0] if comms else None
    flags: list[str] = []
    algorithms: list[str] = []
    if point is not None:
        entries = list(point.collectives.values())
        # The gradient buckets, not the one-element stop-flag all_reduce (LL, its own threads).
        data = [e for e in entries if e["bytes_max"] >= DATA_COLLECTIVE_BYTES] or entries
        algorithms = [f"{e['algorithm']}/{e['protocol']}" for e in data]
    vendor = log.vendor
    if point is None:
        flags.append("no communicator in the NCCL debug output: effective settings unknown")
    else:
        channels = point.channels if point.channels is not None else point.ring_channels_seen
        if asked.channels is not None and channels is not None and channels != asked.channels:
            why = _channel_cause(asked, channels, log.env)
            flags.append(f"channels: asked {asked.channels}, NCCL built {channels}{why}")
        if asked.max_ctas is not None and point.max_ctas is None:
            flags.append(f"max CTAs {asked.max_ctas} asked per communicator but NCCL printed no "
                         "'Comm config Max CTAs' (per-communicator CTAs not supported here)")
        if asked.network == "IB" and point.network and point.network.upper() != "IB":
            flags.append(f"network: the run asked for InfiniBand (NCCL_IB_DISABLE=0) but NCCL "
                         f"used {point.network}")
        if any(t.startswith("NET/Socket") for t in point.transports) and asked.network == "IB":
            flags.append("transport: NET/Socket used although InfiniBand was asked")
    threads = thread_settings(log, point, asked.threads, vendor)
    flags += threads["flags"]
    notes: list[str] = list(threads["notes"])
    no_kernel = point is not None and point.nranks == 1
    for name, warning in knob_warnings(environ, log, vendor, no_kernel=no_kernel):
        # The launch exports both thread variables; under NCCL the RCCL one is a no-op by
        # design, and the point still ran with its threads when NCCL read NCCL_NTHREADS
        # with the same value: worth saying, not a mismatch.
        sibling = "NCCL_NTHREADS" if name == "RCCL_THREADS_PER_BLOCK" and vendor == "nccl" else None
        if (sibling and log.env.get(sibling) is not None
                and log.env.get(sibling) == environ.get(name)) or warning.startswith("unknown"):
            notes.append(warning)
        else:
            flags.append(warning)
    info = point.as_dict() if point is not None else None
    return {
        "nccl_version": log.version,
        "vendor": vendor,
        "library_source": "version line" if vendor else None,
        "asked": {"channels": asked.channels, "threads": asked.threads,
                  "min_ctas": asked.min_ctas, "max_ctas": asked.max_ctas,
                  "network": asked.network},
        "channels": None if info is None else info["channels"],
        "min_ctas": None if point is None else point.min_ctas,
        "max_ctas": None if point is None else point.max_ctas,
        "threads": threads["threads"],
        "threads_reason": threads["threads_reason"],
        "threads_knob": threads["threads_knob"],
        "threads_per_algorithm": threads["per_algorithm"],
        "launch_expectation": threads["launch_expectation"],
        "algorithms": sorted(set(algorithms)) or None,
        "algorithms_reason": None if algorithms else _algorithms_reason(log, point),
        "transports": None if info is None else (info["transports"] or None),
        "network": None if point is None else point.network,
        "env_read": dict(sorted(log.env.items())),
        "communicator": info,
        "communicators_seen": len(log.communicators),
        "nccl_warnings": log.warnings,
        "flags": flags,
        "notes": notes,
    }


def _algorithms_reason(log: NcclLog, point: Communicator | None) -> str:
    if point is None:
        return "no communicator in the debug output"
    if point.nranks == 1:
        return WORLD_ONE
    version = log.version_tuple
    if log.vendor == "nccl" and version is not None and version[:2] < (2, 19):
        return (f"NCCL {log.version} prints no per-collective algorithm at INFO (from 2.19 on "
                "rank 0 only)")
    return "no per-collective TUNING line on this rank (printed on rank 0 only)"


def _channel_cause(asked: Asked, channels: int, env_read: Mapping[str, str]) -> str:
    lo, hi = _int(env_read.get("NCCL_MIN_NCHANNELS")), _int(env_read.get("NCCL_MAX_NCHANNELS"))
    if lo is not None and channels == lo and asked.channels is not None and asked.channels < lo:
        return f" (raised to NCCL_MIN_NCHANNELS={lo} from the environment)"
    if hi is not None and channels == hi and asked.channels is not None and asked.channels > hi:
        return f" (capped by NCCL_MAX_NCHANNELS={hi} from the environment)"
    if asked.channels is not None and channels < asked.channels:
        return " (clamped: fewer channels than asked; topology or NCCL's maximum)"
    return " (clamped)"


def knob_warnings(environ: Mapping[str, str], log: NcclLog, vendor: str | None,
                  no_kernel: bool = False) -> list[tuple[str, str]]:
    """A thread or channel variable the rank had but the library never reported reading: a
    no-op knob (a sweep axis that changes nothing). (name, text) pairs; a text that starts
    with "unknown" is a value the output cannot settle.

    no_kernel: no collective kernel ran (world size 1): RCCL reads RCCL_THREADS_PER_BLOCK only
    when it sizes one, so its silence says nothing there."""
    if not log.lines:
        return []
    library = vendor.upper() if vendor else "the library"
    warnings = []
    for name in ("NCCL_NTHREADS", "RCCL_THREADS_PER_BLOCK", *CHANNEL_KNOBS):
        if name not in environ or name in log.env:
            continue
        if name.startswith("RCCL_") and vendor == "nccl":
            warnings.append((name, f"{name}={environ[name]} is a no-op: NCCL has no such variable "
                                   f"(NCCL reads {', '.join(THREAD_KNOBS['nccl'])})"))
        elif vendor is None:
            warnings.append((name, f"unknown whether {name}={environ[name]} was read: the debug "
                                   "output names no library (no version line)"))
        elif name == "RCCL_THREADS_PER_BLOCK" and no_kernel:
            warnings.append((name, f"unknown whether {name}={environ[name]} takes effect: RCCL "
                                   "reads it when it sizes a collective kernel, and none runs at "
                                   "world size 1"))
        else:
            warnings.append((name, f"{name}={environ[name]} was set but {library} never reported "
                                   "reading it (no 'set by environment' line): treat it as a "
                                   "no-op"))
    return warnings


def same_effective(points: Sequence[Mapping[str, Any]]) -> dict[int, list[int]]:
    """Points (by index) whose effective (channels, threads, algorithms) equal an earlier
    point's although they asked for something else: {earlier: [later, ...]}."""
    seen: dict[tuple[Any, ...], int] = {}
    asked_of: dict[int, Any] = {}
    duplicates: dict[int, list[int]] = {}
    for index, point in enumerate(points):
        if not point or point.get("channels") is None:
            continue
        key = (point.get("channels"), tuple(point.get("threads") or ()),
               tuple(point.get("algorithms") or ()), (point.get("asked") or {}).get("threads"))
        asked = (point.get("asked") or {}).get("channels")
        if key in seen and asked_of[seen[key]] != asked:
            duplicates.setdefault(seen[key], []).append(index)
        else:
            seen.setdefault(key, index)
            asked_of.setdefault(index, asked)
    return duplicates


# -- one rank's debug file, read per point ---------------------------------------------------------

@dataclass
class CaptureFile:
    """The debug file NCCL writes for this process, and where the current point's part of it
    begins (a byte offset: NCCL opens the file once per process and flushes every line)."""

    path: Path
    start: int = 0

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def mark(self) -> None:
        """The next point's lines begin here."""
        self.start = self.size()

    def read(self) -> tuple[NcclLog, NcclLog, int]:
        """(whole file, this point's slice, end offset) as parsed logs."""
        try:
            data = self.path.read_bytes()
        except OSError:
            data = b""
        text = data.decode(errors="replace")
        point = data[self.start:].decode(errors="replace")
        return parse_nccl_log(text), parse_nccl_log(point), len(data)

    def effective(self, asked: Asked, environ: Mapping[str, str],
                  accelerator: str = "cuda") -> dict[str, Any]:
        whole, point, end = self.read()
        result = effective_settings(point, asked, environ, accelerator, process=whole)
        result["file"] = self.path.name
        result["bytes"] = [self.start, end]
        if not whole.lines:
            result["flags"] = [f"{self.path.name} is empty or missing: NCCL wrote no debug lines "
                               "(NCCL_DEBUG_FILE not honoured, or set after NCCL started)"]
        return result


def summarize_ranks(per_rank: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The cross-rank view of the ranks' effective settings for summary.json: a value where
    every rank agrees (else null and the per-rank list shows the disagreement, itself flagged),
    flags prefixed by the ranks they concern."""
    ranks = [r for r in per_rank if r]
    if not ranks:
        return {"channels": None, "flags": [], "per_rank": list(per_rank)}

    def agreed(key: str) -> Any:
        values = [r.get(key) for r in ranks]
        return values[0] if all(v == values[0] for v in values) else None

    channels = [r.get("channels") for r in ranks]
    flags: dict[str, list[int]] = {}
    for index, r in enumerate(per_rank):
        for flag in (r or {}).get("flags") or []:
            flags.setdefault(flag, []).append(index)
    lines = []
    for flag, where in flags.items():
        who = "all ranks" if len(where) == len(per_rank) else "rank " + ",".join(map(str, where))
        lines.append(f"{who}: {flag}")
    notes = sorted({n for r in ranks for n in (r.get("notes") or [])})
    if len({c for c in channels if c is not None}) > 1:
        lines.append(f"ranks built different channel counts: {channels}")
    union = lambda key: sorted({v for r in ranks for v in (r.get(key) or [])}) or None  # noqa: E731
    return {
        "nccl_version": agreed("nccl_version"),
        "vendor": agreed("vendor"),
        "asked": agreed("asked"),
        "channels": agreed("channels"),
        "channels_per_rank": channels,
        "min_ctas": agreed("min_ctas"),
        "max_ctas": agreed("max_ctas"),
        "threads": union("threads"),
        "threads_reason": None if union("threads") else agreed("threads_reason"),
        "threads_knob": agreed("threads_knob"),
        "algorithms": union("algorithms"),
        "transports": union("transports"),
        "network": agreed("network"),
        "env_read": agreed("env_read"),
        "flags": lines,
        "notes": notes,
        "kernel_launch": merge_kernel_launches([r.get("kernel_launch") for r in ranks]),
        "per_rank": list(per_rank),
    }


def merge_kernel_launches(launches: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The ranks' kernel_launch checks (train.launchdelay.launch_check) as one: kernels summed,
    the distinct grid.x/block.x over every rank; its flags are already in the ranks' flags."""
    found = [k for k in launches if isinstance(k, Mapping)]
    if not found:
        return None
    union = lambda key: sorted({v for k in found for v in (k.get(key) or [])}) or None  # noqa: E731
    reasons = sorted({k["reason"] for k in found if k.get("reason")})
    grid_x = union("grid_x")
    checks = sorted({str(k["block_check"]) for k in found if k.get("block_check")})
    return {"kernels": sum(int(k.get("kernels") or 0) for k in found), "grid_x": grid_x,
            "block_x": union("block_x"), "block_check": "; ".join(checks) or None,
            "reason": None if grid_x else "; ".join(reasons) or None}
