"""What NCCL/RCCL really used, read back from its own debug output (pure: no torch).

Asking NCCL for channels or threads proves nothing: an environment variable can clamp a
per-communicator setting (NCCL_MIN_NCHANNELS=4 turns min/max CTAs 2/2 into 4 channels), a
variable the library does not know is silently ignored, and a preset can ask for InfiniBand
while NCCL falls back to sockets. So every rank runs with ``NCCL_DEBUG=INFO`` and its lines
sent to a per-rank file (``NCCL_DEBUG_FILE``), and this module reads, per communicator, what
NCCL printed while building it and while running collectives on it:

- ``Comm config Min CTAs set to X`` / ``Max CTAs set to Y`` (the per-communicator request,
  printed just before the communicator's ``Init START``),
- ``N coll channels, N collnet channels, N nvls channels, N p2p channels, ...`` (the channels
  built; the ``Channel xx/NN`` lines' NN when that summary line is missing),
- ``<NAME> set by environment to <value>.`` (every NCCL_*/RCCL_* variable the library read),
- ``Channel 00/0 : 0[0] -> 1[1] via P2P/IPC`` (transports: P2P, SHM, NET/IB, NET/Socket),
- the TUNING table (``Max NThreads`` per algorithm/protocol; rank 0 only, only when more than
  one rank shares the communicator) and one ``AllReduce: 67108864 Bytes -> Algo RING proto
  SIMPLE channel{Lo..Hi}={0..31}`` line per collective (NCCL >= 2.19; older builds print
  ``67108864 Bytes -> Algo 1 proto 2 time 30.5``), which give the algorithm, protocol, the
  channels that collective used and, from the table, its thread count.

Communicators are told apart by their ``Init START`` lines (NCCL reuses addresses: a split
made after another was destroyed can get the same ``comm 0x..``). A per-collective TUNING
line names no communicator: it is counted for the last communicator created and not yet
destroyed, which is the point's own in this package (one point group at a time).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEBUG_FILE_PATTERN = "nccl_debug_rank_{rank:02d}.log"
DEFAULT_SUBSYSTEMS = ("INIT", "ENV", "TUNING")
DATA_COLLECTIVE_BYTES = 1 << 20

# Indices of older NCCL's numeric "Algo %d proto %d" (src/include/device.h order).
ALGORITHMS = ("TREE", "RING", "COLLNET_DIRECT", "COLLNET_CHAIN", "NVLS", "NVLS_TREE", "PAT")
PROTOCOLS = ("LL", "LL128", "SIMPLE")

# Thread knobs each library reads, and what the other one does with them: the thread setting
# of a point is real only if the library found prints "<NAME> set by environment".
# NCCL: src/graph/tuning.cc NCCL_PARAM(Nthreads, "NTHREADS", -2) (NCCL_NTHREADS; multiple of
# 32, 64..512 else clamped with a WARN). RCCL: the same NCCL_PARAM in its tuning.cc (so
# NCCL_NTHREADS is read there too) plus RCCL_THREADS_PER_BLOCK, listed in RCCL's CHANGELOG
# (the release after 2.27.7 for ROCm 7.2.0) as a WarpSpeed knob. NCCL has no RCCL_* variable.
THREAD_KNOBS = {"nccl": ("NCCL_NTHREADS",), "rccl": ("RCCL_THREADS_PER_BLOCK", "NCCL_NTHREADS")}
CHANNEL_KNOBS = ("NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "NCCL_MIN_CTAS", "NCCL_MAX_CTAS")

_PREFIX = re.compile(r"^(?P<host>[^\s:]+):(?P<pid>\d+):(?P<tid>\d+) \[(?P<dev>[^\]]*)\] "
                     r"NCCL (?P<level>INFO|WARN|TRACE) (?P<msg>.*)$")
_VERSION = re.compile(r"^(?:NCCL|RCCL) version:? ?(?P<v>\S+)")
_ENV = re.compile(r"^(?P<name>(?:NCCL|RCCL)_\w+) set by environment to (?P<value>.*?)\.?\s*$")
_CONFIG = re.compile(r"^Comm config (?P<key>[\w ]+?) set to (?P<value>\S+)")
_INIT_START = re.compile(
    r"^(?P<kind>ncclCommInitRank\w*|ncclCommSplit|ncclCommInitAll|ncclCommShrink) comm "
    r"(?P<comm>0x[0-9a-f]+) rank (?P<rank>\d+) nranks (?P<nranks>\d+).*?"
    r"(?:parent (?P<parent>0x[0-9a-f]+) splitCount (?P<split>\d+).*?)?- Init START")
_INIT_DONE = re.compile(r"^\w+ comm (?P<comm>0x[0-9a-f]+) rank \d+ nranks \d+.*- Init COMPLETE")
_DESTROY = re.compile(r"^comm (?P<comm>0x[0-9a-f]+) rank \d+ nranks \d+.*- Destroy COMPLETE")
# "64 coll channels, 64 collnet channels, 0 nvls channels, 64 p2p channels, ..." (2.2x);
# older builds print fewer fields ("2 coll channels, 2 p2p channels, ...").
_CHANNELS_LINE = re.compile(r"^(?P<coll>\d+) coll channels,")
_NVLS = re.compile(r"(?P<n>\d+) nvls channels")
_P2P = re.compile(r"(?P<n>\d+) p2p channels(?!\s+per)")
_CHANNEL = re.compile(r"^Channel (?P<i>\d+)/(?P<n>\d+) :(?P<rest>.*)$")
_VIA = re.compile(r"via (?P<t>NET/[A-Za-z]+|P2P|SHM|CollNet\w*)")
_NETWORK = re.compile(r"^Using network (?P<net>\S+)")
# TUNING table headers: NCCL <= 2.1x one "Latency/AlgBw | Tree/LL | ..." line; later builds
# blocks of three algorithms, "Algorithm | Tree | Ring | ..." then "Protocol | LL | LL128 | ...".
_TABLE_HEAD = re.compile(r"^\s*Latency/AlgBw\s*\|(?P<cols>.*)$")
_TABLE_ALGOS = re.compile(r"^\s*Algorithm\s*\|(?P<cols>.*)$")
_TABLE_PROTOS = re.compile(r"^\s*Protocol\s*\|(?P<cols>.*)$")
_MAX_THREADS = re.compile(r"^\s*Max NThreads\s*\|(?P<cols>.*)$")
_COLL_NAMED = re.compile(
    r"^(?P<op>\w+): (?P<bytes>\d+) Bytes -> Algo (?P<algo>[A-Za-z_]+) proto (?P<proto>[A-Za-z0-9_]+)"
    r"(?: channel\{Lo\.\.Hi\}=\{(?P<lo>\d+)\.\.(?P<hi>\d+)\})?")
_COLL_NUMERIC = re.compile(
    r"^(?:(?P<op>\w+): )?(?P<bytes>\d+) Bytes -> Algo (?P<algo>\d+) proto (?P<proto>\d+)")
_THRESHOLDS = re.compile(r"^threadThresholds (?P<v>.*)$")


@dataclass
class Communicator:
    """One communicator as NCCL described it (JSON-ready through ``as_dict``)."""

    comm: str
    kind: str                       # init (ncclCommInitRank*) | split (ncclCommSplit) | ...
    rank: int
    nranks: int
    parent: str | None = None
    split_count: int | None = None
    min_ctas: int | None = None     # asked through ncclConfig_t (torch pg_options)
    max_ctas: int | None = None
    config: dict[str, str] = field(default_factory=dict)
    channels: int | None = None     # coll channels built
    nvls_channels: int | None = None
    p2p_channels: int | None = None
    ring_channels_seen: int | None = None  # NN of "Channel xx/NN" (fallback for channels)
    transports: list[str] = field(default_factory=list)
    network: str | None = None
    max_threads: dict[str, int] = field(default_factory=dict)   # "RING/SIMPLE" -> threads
    thread_thresholds: str | None = None
    collectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False
    destroyed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "comm": self.comm, "kind": self.kind, "rank": self.rank, "nranks": self.nranks,
            "parent": self.parent, "split_count": self.split_count,
            "min_ctas": self.min_ctas, "max_ctas": self.max_ctas,
            "channels": self.channels if self.channels is not None else self.ring_channels_seen,
            "nvls_channels": self.nvls_channels, "p2p_channels": self.p2p_channels,
            "transports": sorted(self.transports), "network": self.network,
            "max_threads": dict(self.max_threads) or None,
            "thread_thresholds": self.thread_thresholds,
            "collectives": list(self.collectives.values()),
            "complete": self.complete, "destroyed": self.destroyed,
        }


@dataclass
class NcclLog:
    version: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    communicators: list[Communicator] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # NCCL's own WARN lines (first few)
    lines: int = 0

    @property
    def vendor(self) -> str | None:
        if self.version is None:
            return None
        return "rccl" if ("hip" in self.version.lower() or "rocm" in self.version.lower()) else "nccl"


def _split_columns(text: str) -> list[str]:
    return [c.strip() for c in text.split("|") if c.strip()]


def _column_name(text: str) -> str:
    """'   Ring/Simple' -> 'RING/SIMPLE' (the table's spelling differs from the TUNING lines')."""
    algo, _, proto = text.partition("/")
    return f"{algo.strip().upper()}/{proto.strip().upper()}"


def parse_nccl_log(text: str) -> NcclLog:
    """Every communicator NCCL described in ``text`` (one rank's debug file, or a slice of it)."""
    log = NcclLog()
    pending_config: dict[str, str] = {}
    pending_network: str | None = None
    building: dict[str, Communicator] = {}       # comm address -> being initialised
    columns: list[str] = []
    algos: list[str] = []
    for raw in text.splitlines():
        match = _PREFIX.match(raw)
        if match is None:
            continue
        log.lines += 1
        msg = match.group("msg")
        if match.group("level") == "WARN":
            if len(log.warnings) < 10:
                log.warnings.append(msg[:300])
            continue
        if (m := _VERSION.match(msg)) and log.version is None:
            log.version = m.group("v")
            continue
        if m := _ENV.match(msg):
            log.env[m.group("name")] = m.group("value")
            continue
        if m := _CONFIG.match(msg):
            pending_config[m.group("key")] = m.group("value")
            continue
        if m := _NETWORK.match(msg):
            pending_network = m.group("net")
            continue
        if m := _INIT_START.match(msg):
            kind = m.group("kind")
            comm = Communicator(
                comm=m.group("comm"),
                kind="split" if kind == "ncclCommSplit" else "init" if kind.startswith(
                    "ncclCommInit") else kind,
                rank=int(m.group("rank")), nranks=int(m.group("nranks")),
                parent=m.group("parent"),
                split_count=int(m.group("split")) if m.group("split") else None,
                config=dict(pending_config), network=pending_network,
            )
            comm.min_ctas = _int(pending_config.get("Min CTAs"))
            comm.max_ctas = _int(pending_config.get("Max CTAs"))
            pending_config, pending_network = {}, None
            log.communicators.append(comm)
            building[comm.comm] = comm
            continue
        current = _current(log, building)
        if m := _INIT_DONE.match(msg):
            done = building.pop(m.group("comm"), None)
            if done is not None:
                done.complete = True
            continue
        if m := _DESTROY.match(msg):
            for comm in reversed(log.communicators):
                if comm.comm == m.group("comm") and not comm.destroyed:
                    comm.destroyed = True
                    break
            continue
        if current is None:
            continue
        if m := _CHANNELS_LINE.match(msg):
            current.channels = int(m.group("coll"))
            if n := _NVLS.search(msg):
                current.nvls_channels = int(n.group("n"))
            if n := _P2P.search(msg):
                current.p2p_channels = int(n.group("n"))
        elif m := _CHANNEL.match(msg):
            n = int(m.group("n"))
            current.ring_channels_seen = max(current.ring_channels_seen or 0, n)
            if v := _VIA.search(m.group("rest")):
                if v.group("t") not in current.transports:
                    current.transports.append(v.group("t"))
        elif (v := _VIA.search(msg)) and "Connected" not in msg:
            if v.group("t") not in current.transports:
                current.transports.append(v.group("t"))
        elif m := _TABLE_HEAD.match(msg):
            columns = [_column_name(c) for c in _split_columns(m.group("cols"))]
        elif m := _TABLE_ALGOS.match(msg):
            algos = [c.upper() for c in _split_columns(m.group("cols"))]
        elif m := _TABLE_PROTOS.match(msg):
            protos = [c.upper() for c in _split_columns(m.group("cols"))]
            per = max(1, len(protos) // max(1, len(algos)))
            columns = [f"{algos[i // per]}/{p}" for i, p in enumerate(protos) if i // per < len(algos)]
        elif m := _MAX_THREADS.match(msg):
            values = _split_columns(m.group("cols"))
            # Several blocks of the table each bring their own algorithms: accumulate.
            current.max_threads.update({name: int(v) for name, v in zip(columns, values, strict=False)
                                        if v.lstrip("-").isdigit()})
        elif m := _THRESHOLDS.match(msg):
            current.thread_thresholds = m.group("v").strip()
        elif (m := _COLL_NAMED.match(msg)) or (m := _COLL_NUMERIC.match(msg)):
            _count_collective(current, m)
    return log


def _current(log: NcclLog, building: Mapping[str, Communicator]) -> Communicator | None:
    """The communicator the next line is about: the one being built, else the last one made
    and not destroyed (collectives run on it)."""
    if building:
        return list(building.values())[-1]
    for comm in reversed(log.communicators):
        if not comm.destroyed:
            return comm
    return None


def _count_collective(comm: Communicator, m: re.Match[str]) -> None:
    algo, proto = m.group("algo"), m.group("proto")
    if algo.isdigit():
        algo = ALGORITHMS[int(algo)] if int(algo) < len(ALGORITHMS) else algo
    if proto.isdigit():
        proto = PROTOCOLS[int(proto)] if int(proto) < len(PROTOCOLS) else proto
    algo, proto = algo.upper(), proto.upper()
    op = m.group("op") or "collective"
    lo = m.groupdict().get("lo")
    hi = m.groupdict().get("hi")
    used = int(hi) - int(lo) + 1 if lo is not None and hi is not None else None
    key = f"{op} {algo}/{proto}"
    entry = comm.collectives.setdefault(key, {
        "op": op, "algorithm": algo, "protocol": proto, "count": 0,
        "threads": comm.max_threads.get(f"{algo}/{proto}"), "channels_used": used,
        "bytes_max": 0})
    entry["count"] += 1
    entry["bytes_max"] = max(entry["bytes_max"], int(m.group("bytes")))
    if used is not None:
        entry["channels_used"] = max(entry["channels_used"] or 0, used)


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
    as one-line flags. A flag is a finding about the measurement, not an error of the run.

    process: the whole file's parse, when ``log`` is a slice of it: NCCL prints its version
    and the variables it read once per process, before the first communicator."""
    if process is not None:
        log = NcclLog(version=log.version or process.version, env={**process.env, **log.env},
                      communicators=log.communicators, warnings=log.warnings,
                      lines=log.lines + process.lines)
    comms = [c for c in log.communicators if c.complete or c.channels is not None]
    point = comms[0] if comms else None
    flags: list[str] = []
    threads_used: list[int] = []
    algorithms: list[str] = []
    if point is not None:
        entries = list(point.collectives.values())
        # The gradient buckets, not the one-element stop-flag all_reduce (LL, its own threads).
        data = [e for e in entries if e["bytes_max"] >= DATA_COLLECTIVE_BYTES] or entries
        for entry in data:
            if entry.get("threads") is not None:
                threads_used.append(int(entry["threads"]))
            algorithms.append(f"{entry['algorithm']}/{entry['protocol']}")
    vendor = log.vendor or ("rccl" if accelerator == "rocm" else "nccl")
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
    notes: list[str] = []
    for warning in knob_warnings(environ, log, vendor):
        # The launch exports both thread variables; under NCCL the RCCL one is a no-op by
        # design, and the point still ran with its threads when NCCL read NCCL_NTHREADS
        # with the same value: worth saying, not a mismatch.
        name = warning.split("=", 1)[0]
        sibling = "NCCL_NTHREADS" if name == "RCCL_THREADS_PER_BLOCK" else None
        if sibling and log.env.get(sibling) is not None and log.env.get(sibling) == environ.get(name):
            notes.append(warning)
        else:
            flags.append(warning)
    if asked.threads is not None and threads_used and any(t != asked.threads for t in threads_used):
        flags.append(f"threads: asked {asked.threads}, collectives ran with "
                     f"{sorted(set(threads_used))} (NCCL's Max NThreads of the algorithm used)")
    info = point.as_dict() if point is not None else None
    return {
        "nccl_version": log.version,
        "vendor": vendor,
        "asked": {"channels": asked.channels, "threads": asked.threads,
                  "min_ctas": asked.min_ctas, "max_ctas": asked.max_ctas,
                  "network": asked.network},
        "channels": None if info is None else info["channels"],
        "min_ctas": None if point is None else point.min_ctas,
        "max_ctas": None if point is None else point.max_ctas,
        "threads": sorted(set(threads_used)) or None,
        "algorithms": sorted(set(algorithms)) or None,
        "transports": None if info is None else (info["transports"] or None),
        "network": None if point is None else point.network,
        "env_read": dict(sorted(log.env.items())),
        "communicator": info,
        "communicators_seen": len(log.communicators),
        "nccl_warnings": log.warnings,
        "flags": flags,
        "notes": notes,
    }


def _channel_cause(asked: Asked, channels: int, env_read: Mapping[str, str]) -> str:
    lo, hi = _int(env_read.get("NCCL_MIN_NCHANNELS")), _int(env_read.get("NCCL_MAX_NCHANNELS"))
    if lo is not None and channels == lo and asked.channels is not None and asked.channels < lo:
        return f" (raised to NCCL_MIN_NCHANNELS={lo} from the environment)"
    if hi is not None and channels == hi and asked.channels is not None and asked.channels > hi:
        return f" (capped by NCCL_MAX_NCHANNELS={hi} from the environment)"
    if asked.channels is not None and channels < asked.channels:
        return " (clamped: fewer channels than asked; topology or NCCL's maximum)"
    return " (clamped)"


def knob_warnings(environ: Mapping[str, str], log: NcclLog, vendor: str) -> list[str]:
    """A thread or channel variable the rank had but the library never reported reading: a
    no-op knob (a sweep axis that changes nothing)."""
    if not log.lines:
        return []
    warnings = []
    for name in ("NCCL_NTHREADS", "RCCL_THREADS_PER_BLOCK", *CHANNEL_KNOBS):
        if name not in environ:
            continue
        if name.startswith("RCCL_") and vendor == "nccl":
            warnings.append(f"{name}={environ[name]} is a no-op: NCCL has no such variable "
                            f"(NCCL reads {', '.join(THREAD_KNOBS['nccl'])})")
        elif name not in log.env:
            warnings.append(f"{name}={environ[name]} was set but {vendor.upper()} never reported "
                            "reading it (no 'set by environment' line): treat it as a no-op")
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
    return {"kernels": sum(int(k.get("kernels") or 0) for k in found), "grid_x": grid_x,
            "block_x": union("block_x"), "reason": None if grid_x else "; ".join(reasons) or None}
