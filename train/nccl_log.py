"""NCCL's and RCCL's debug output parsed into communicators (pure: no torch).

Every format read here comes from the libraries' own sources at named releases (NVIDIA/nccl,
ROCm/rccl; tests/unit/data/nccl/README.md names the commit for each) and from output recorded
on a GPU. What changes between releases, and is handled:

- the version line: ``NCCL version 2.28.9+cuda13.0``; RCCL up to ROCm 6.2 ``RCCL version
  2.20.5+hip6.2 <git>``, from ROCm 6.3 ``RCCL version : 2.21.5-<git>`` (then HIP/ROCm lines);
  it is an INFO line in the debug file and bare on stdout. The library is read from it.
- communicators: ``Init START`` from 2.18 (with the function name from 2.21, the parent and,
  from 2.23, ``splitCount`` on splits); 2.12-2.17 print only ``Init COMPLETE``, so the lines
  before it describe a communicator still unnamed.
- WARN lines carry ``file.cc:line`` (newer builds ``(function)``) before ``NCCL WARN`` and,
  from 2.26, a ``[date time]`` before the host.
- the TUNING table (rank 0, more than one rank) spells algorithms ``NVLSTree``/``CollNetDirect``;
  the per-collective lines (rank 0) ``NVLS_TREE``/``COLLNET_DIRECT`` (2.23+), or as indices
  (2.19-2.22); 2.12-2.18 print no per-collective line at INFO.

Communicators are told apart by their ``Init START`` lines (NCCL reuses addresses: a split
made after another was destroyed can get the same ``comm 0x..``). A per-collective TUNING
line names no communicator: it is counted for the last communicator created and not yet
destroyed, which is the point's own in this package (one point group at a time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from train.nccl_launch import version_tuple

DATA_COLLECTIVE_BYTES = 1 << 20

# Indices of the numeric "Algo %d proto %d" lines (src/include/nccl_common.h order).
ALGORITHMS = ("TREE", "RING", "COLLNET_DIRECT", "COLLNET_CHAIN", "NVLS", "NVLS_TREE", "PAT")
OLD_ALGORITHMS = ("TREE", "RING", "COLLNET")
PROTOCOLS = ("LL", "LL128", "SIMPLE")
# ncclAlgoStr spellings (upper case, "_" removed) -> ncclAlgoToString's.
ALGORITHM_NAMES = {"TREE": "TREE", "RING": "RING", "COLLNET": "COLLNET",
                   "COLLNETDIRECT": "COLLNET_DIRECT", "COLLNETCHAIN": "COLLNET_CHAIN",
                   "NVLS": "NVLS", "NVLSTREE": "NVLS_TREE", "PAT": "PAT"}

# One debug line: host:pid:tid [dev] NCCL INFO msg (src/debug.cc). WARN lines put the source
# position before the level ("[dev] file.cc:123 NCCL WARN", newer builds "file.cc:123 (func)")
# and, from NCCL 2.26 (NCCL_DEBUG_TIMESTAMP_LEVELS defaults to WARN), a "[%F %T] " timestamp
# before the host, which any level gets on request; TRACE adds a float time before the source.
_PREFIX = re.compile(
    r"^(?:\[[^\]]{1,64}\] ?)?(?P<host>[^\s:\[]+):(?P<pid>\d+):(?P<tid>\d+) "
    r"(?:\[(?P<dev>[^\]]*)\] )?(?:[\d.]+ )?(?:(?P<src>\S+:\d+)(?: \([^)]*\))? )?"
    r"NCCL (?P<level>INFO|WARN|TRACE) (?P<msg>.*)$")
# "NCCL version 2.28.9+cuda13.0" (INFO, or bare on stdout / at NCCL_DEBUG=VERSION), "RCCL version
# 2.18.3+hip6.0 <git>" (RCCL up to ROCm 6.2), "RCCL version : 2.21.5-<git>" (ROCm 6.3 on, the
# first line of a multi-line INFO): the library names itself.
_VERSION = re.compile(r"^(?:\[[^\]]{1,64}\] ?)?(?P<lib>NCCL|RCCL) version\s*:?\s*"
                      r"(?P<v>\d+\.\d+\.\d+\S*)")
_ENV = re.compile(r"^(?P<name>(?:NCCL|RCCL)_\w+) set by environment to (?P<value>.*?)\.?\s*$")
_CONFIG = re.compile(r"^Comm config (?P<key>[\w ]+?) set to (?P<value>\S+)")
# 2.21+ "<function> comm 0x.. rank .. nranks .. ... - Init START" (splits add "parent 0x..", 2.23+
# "splitCount N"); 2.18-2.20 the same without the function; 2.12-2.17 print no START at all.
_INIT_START = re.compile(r"^(?:(?P<func>\w+) )?comm (?P<comm>0x[0-9a-fA-F]+) rank (?P<rank>\d+) "
                         r"nranks (?P<nranks>\d+)(?P<rest>.*?)\s?- Init START")
_INIT_DONE = re.compile(r"^(?:\w+ )?comm (?P<comm>0x[0-9a-fA-F]+) rank (?P<rank>\d+) "
                        r"nranks (?P<nranks>\d+).*- Init COMPLETE")
_PARENT = re.compile(r"\bparent (?P<parent>0x[0-9a-fA-F]+)")
_SPLIT_COUNT = re.compile(r"\bsplitCount (?P<split>\d+)")
_DESTROY = re.compile(r"^comm (?P<comm>0x[0-9a-fA-F]+) rank \d+ nranks \d+.*- Destroy COMPLETE")
# "%d coll channels, [%d collnet channels, ][%d nvls channels, ]%d p2p channels, ..." (fields
# added over releases; 2.12 prints only coll and p2p).
_CHANNELS_LINE = re.compile(r"^(?P<coll>\d+) coll channels,")
_NVLS = re.compile(r"(?P<n>\d+) nvls channels")
_P2P = re.compile(r"(?P<n>\d+) p2p channels(?!\s+per)")
# Ring lines (rank 0 only): "Channel 00/32 :    0   1"; connection lines reuse the prefix with
# the connection index instead of a count: "Channel 00/0 : 0[0] -> 1[1] via P2P/IPC".
_CHANNEL = re.compile(r"^Channel (?P<i>\d+)/(?P<n>\d+) :(?P<rest>.*)$")
_RING_RANKS = re.compile(r"^[\s\d]*$")
_VIA = re.compile(r"via (?P<t>NET/[A-Za-z]+|P2P|SHM|CollNet\w*)")
_NETWORK = re.compile(r"^Using network (?P<net>\S+)")
# TUNING table (src/graph/tuning.cc, rank 0, nRanks > 1): NCCL 2.12 one "Latency/AlgBw |" header
# ("Tree/LL | ..."), later blocks of three algorithms: "Algorithm |", "Protocol |",
# "Max NThreads |".
_TABLE_HEAD = re.compile(r"^\s*Latency/AlgBw\s*\|(?P<cols>.*)$")
_TABLE_ALGOS = re.compile(r"^\s*Algorithm\s*\|(?P<cols>.*)$")
_TABLE_PROTOS = re.compile(r"^\s*Protocol\s*\|(?P<cols>.*)$")
_MAX_THREADS = re.compile(r"^\s*Max NThreads\s*\|(?P<cols>.*)$")
# Per collective on rank 0: 2.23+ "AllReduce: 33554432 Bytes -> Algo RING proto SIMPLE
# channel{Lo..Hi}={0..7}"; 2.19-2.22 "33554432 Bytes -> Algo 1 proto 2 time 120.5" (indices).
# 2.12-2.18 print neither at INFO (the numeric one is commented out / TRACE).
_COLL_NAMED = re.compile(
    r"^(?P<op>\w+): (?P<bytes>\d+) Bytes -> Algo (?P<algo>[A-Za-z_]+) "
    r"proto (?P<proto>[A-Za-z0-9_]+)"
    r"(?: channel\{Lo\.\.Hi\}=\{(?P<lo>\d+)\.\.(?P<hi>\d+)\})?")
_COLL_NUMERIC = re.compile(
    r"^(?:(?P<op>\w+): )?(?P<bytes>\d+) Bytes -> Algo (?P<algo>\d+) proto (?P<proto>\d+)")
_THRESHOLDS = re.compile(r"^threadThresholds (?P<v>.*)$")
# getNthreads (tuning.cc): "Invalid NCCL_NTHREADS 48 (must be a multiple of 32)" -> its maximum,
# "(maximum 512)." -> 512, "(minimum 64)." -> 64 (WARN; INFO in newer builds).
_INVALID = re.compile(r"^Invalid (?P<name>(?:NCCL|RCCL)_\w+) (?P<value>-?\d+) \((?:must be a "
                      r"multiple of (?P<multiple>\d+)|maximum (?P<max>\d+)|minimum (?P<min>\d+))\)")
# rcclOptThreadBlockSize: "RCCL Threads per block adjusted to 256 to be multiple of warp size 64",
# "... reduced to 256 to match max threads", "... increased to 192 to be at least one warp".
_RCCL_TPB = re.compile(r"^RCCL Threads per block (?:adjusted|reduced|increased) to (?P<n>\d+)")
# Lines that belong to a communicator being built: without Init START (NCCL < 2.18) they open
# an unnamed one that its "Init COMPLETE" names.
_INIT_LINES = (_CHANNELS_LINE, _CHANNEL, _TABLE_HEAD, _TABLE_ALGOS, _TABLE_PROTOS, _MAX_THREADS,
               _THRESHOLDS)


@dataclass
class Communicator:
    """One communicator as NCCL described it (JSON-ready through ``as_dict``)."""

    comm: str
    kind: str                       # init | split | unnamed (NCCL < 2.21 names no function)
    rank: int | None
    nranks: int | None
    parent: str | None = None
    split_count: int | None = None
    min_ctas: int | None = None     # asked through ncclConfig_t (torch pg_options)
    max_ctas: int | None = None
    config: dict[str, str] = field(default_factory=dict)
    channels: int | None = None     # coll channels built
    nvls_channels: int | None = None
    p2p_channels: int | None = None
    ring_channels_seen: int | None = None  # NN of the ring lines "Channel xx/NN" (fallback)
    transports: list[str] = field(default_factory=list)
    network: str | None = None
    max_threads: dict[str, int] = field(default_factory=dict)   # "RING/SIMPLE" -> Max NThreads
    thread_thresholds: str | None = None
    thresholds: dict[str, int] = field(default_factory=dict)    # "RING/SIMPLE" -> threshold
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
    library: str | None = None      # "NCCL" or "RCCL", as the version line names it
    env: dict[str, str] = field(default_factory=dict)
    communicators: list[Communicator] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # NCCL's own WARN lines (first few)
    invalid: dict[str, dict[str, Any]] = field(default_factory=dict)  # knob -> what NCCL used
    rccl_threads_adjusted: int | None = None
    network: str | None = None      # "Using network X" (once per process before 2.18)
    lines: int = 0

    @property
    def vendor(self) -> str | None:
        """nccl or rccl, from the library's own version line; None when it printed none."""
        return self.library.lower() if self.library else None

    @property
    def version_tuple(self) -> tuple[int, int, int] | None:
        return version_tuple(self.version)


def _split_columns(text: str) -> list[str]:
    return [c.strip() for c in text.split("|") if c.strip()]


def algorithm_name(text: str) -> str:
    """The TUNING table's spelling (ncclAlgoStr: Tree, CollNetDirect, NVLSTree) as the
    per-collective lines spell it (ncclAlgoToString: TREE, COLLNET_DIRECT, NVLS_TREE)."""
    key = text.strip().upper().replace("_", "")
    return ALGORITHM_NAMES.get(key, text.strip().upper())


def _column_name(text: str) -> str:
    """'   Ring/Simple' -> 'RING/SIMPLE' (NCCL 2.12's single-header table)."""
    algo, _, proto = text.partition("/")
    return f"{algorithm_name(algo)}/{proto.strip().upper()}"


class _Parser:
    """State of one pass over a debug file (see ``parse_nccl_log``)."""

    def __init__(self) -> None:
        self.log = NcclLog()
        self.pending_config: dict[str, str] = {}
        self.pending_network: str | None = None
        self.building: dict[str, Communicator] = {}   # comm address -> being initialised
        self.unnamed: Communicator | None = None      # NCCL < 2.18: init lines before COMPLETE
        self.seen_start = False
        self.columns: list[str] = []
        self.algos: list[str] = []

    def line(self, raw: str) -> None:
        match = _PREFIX.match(raw)
        if match is None:
            # The bare version line (stdout, or NCCL_DEBUG=VERSION) has no prefix.
            if (m := _VERSION.match(raw)) and self.log.version is None:
                self.log.library, self.log.version = m.group("lib"), m.group("v")
            return
        self.log.lines += 1
        msg = match.group("msg")
        if match.group("level") == "WARN":
            if len(self.log.warnings) < 10:
                self.log.warnings.append(msg[:300])
            self._invalid(msg)
            return
        if match.group("level") != "INFO":
            return
        self.message(msg)

    def _invalid(self, msg: str) -> bool:
        if not (m := _INVALID.match(msg)):
            return False
        bound = m.group("max") or m.group("min")
        self.log.invalid[m.group("name")] = {
            "value": int(m.group("value")),
            "effective": int(bound) if bound else None,
            "why": (f"above the maximum {bound}" if m.group("max") else
                    f"below the minimum {bound}" if m.group("min") else
                    f"not a multiple of {m.group('multiple')} (the library uses its maximum)"),
        }
        return True

    def message(self, msg: str) -> None:
        log = self.log
        if (m := _VERSION.match(msg)) and log.version is None:
            log.library, log.version = m.group("lib"), m.group("v")
        elif m := _ENV.match(msg):
            log.env[m.group("name")] = m.group("value")
        elif m := _CONFIG.match(msg):
            self.pending_config[m.group("key")] = m.group("value")
        elif m := _NETWORK.match(msg):
            self.pending_network = m.group("net")
            log.network = log.network or m.group("net")
        elif m := _INIT_START.match(msg):
            self._start(m)
        elif m := _INIT_DONE.match(msg):
            self._done(m)
        elif m := _DESTROY.match(msg):
            for comm in reversed(log.communicators):
                if comm.comm == m.group("comm") and not comm.destroyed:
                    comm.destroyed = True
                    break
        elif self._invalid(msg):
            pass
        elif m := _RCCL_TPB.match(msg):
            log.rccl_threads_adjusted = int(m.group("n"))
        else:
            self._about_communicator(msg)

    def _start(self, m: re.Match[str]) -> None:
        self.seen_start = True
        func, rest = m.group("func"), m.group("rest")
        parent = _PARENT.search(rest)
        split = _SPLIT_COUNT.search(rest)
        kind = ("split" if func == "ncclCommSplit" or parent else
                "init" if func and func.startswith("ncclCommInit") else func or "unnamed")
        comm = Communicator(
            comm=m.group("comm"), kind=kind, rank=int(m.group("rank")),
            nranks=int(m.group("nranks")), parent=parent.group("parent") if parent else None,
            split_count=int(split.group("split")) if split else None,
            config=dict(self.pending_config), network=self.pending_network or self.log.network)
        self._take_config(comm)
        self.log.communicators.append(comm)
        self.building[comm.comm] = comm

    def _take_config(self, comm: Communicator) -> None:
        comm.min_ctas = _int(self.pending_config.get("Min CTAs"))
        comm.max_ctas = _int(self.pending_config.get("Max CTAs"))
        self.pending_config, self.pending_network = {}, None

    def _done(self, m: re.Match[str]) -> None:
        done = self.building.pop(m.group("comm"), None)
        if done is None and not self.seen_start:
            # NCCL < 2.18: the communicator is named only now; the lines since the last one
            # completed describe it.
            done = self.unnamed or Communicator(comm="", kind="unnamed", rank=None, nranks=None)
            done.comm, done.rank, done.nranks = (m.group("comm"), int(m.group("rank")),
                                                 int(m.group("nranks")))
            done.config = {**self.pending_config, **done.config}
            done.network = done.network or self.pending_network or self.log.network
            self._take_config(done)
            self.log.communicators.append(done)
            self.unnamed = None
        if done is not None:
            done.complete = True

    def _current(self, msg: str) -> Communicator | None:
        """The communicator the line is about: the one being built, else (NCCL < 2.18) an
        unnamed one opened by an init line, else the last one made and not destroyed."""
        if self.building:
            return list(self.building.values())[-1]
        if not self.seen_start and (self.unnamed is not None
                                    or any(p.match(msg) for p in _INIT_LINES)):
            if self.unnamed is None:
                self.unnamed = Communicator(comm="", kind="unnamed", rank=None, nranks=None)
            return self.unnamed
        for comm in reversed(self.log.communicators):
            if not comm.destroyed:
                return comm
        return None

    def _about_communicator(self, msg: str) -> None:
        current = self._current(msg)
        if current is None:
            return
        if m := _CHANNELS_LINE.match(msg):
            current.channels = int(m.group("coll"))
            if n := _NVLS.search(msg):
                current.nvls_channels = int(n.group("n"))
            if n := _P2P.search(msg):
                current.p2p_channels = int(n.group("n"))
        elif m := _CHANNEL.match(msg):
            if _RING_RANKS.match(m.group("rest")):
                n = int(m.group("n"))
                current.ring_channels_seen = max(current.ring_channels_seen or 0, n)
            elif (v := _VIA.search(m.group("rest"))) and v.group("t") not in current.transports:
                current.transports.append(v.group("t"))
        elif (v := _VIA.search(msg)) and "Connected" not in msg:
            if v.group("t") not in current.transports:
                current.transports.append(v.group("t"))
        elif m := _TABLE_HEAD.match(msg):
            self.columns = [_column_name(c) for c in _split_columns(m.group("cols"))]
        elif m := _TABLE_ALGOS.match(msg):
            self.algos = [algorithm_name(c) for c in _split_columns(m.group("cols"))]
        elif m := _TABLE_PROTOS.match(msg):
            # Every block prints the protocols of three algorithms, also the last one with
            # fewer (2.23+, seven algorithms): three per algorithm, the rest unused.
            protos = [c.upper() for c in _split_columns(m.group("cols"))]
            per = len(PROTOCOLS)
            self.columns = [f"{self.algos[i // per]}/{p}" for i, p in enumerate(protos)
                            if i // per < len(self.algos)]
        elif m := _MAX_THREADS.match(msg):
            values = _split_columns(m.group("cols"))
            # Several blocks of the table each bring their own algorithms: accumulate.
            current.max_threads.update({
                name: int(v) for name, v in zip(self.columns, values, strict=False)
                if v.lstrip("-").isdigit()})
        elif m := _THRESHOLDS.match(msg):
            current.thread_thresholds = m.group("v").strip()
            current.thresholds = _thresholds(current.thread_thresholds)
        elif (m := _COLL_NAMED.match(msg)) or (m := _COLL_NUMERIC.match(msg)):
            _count_collective(current, m, self.log.version_tuple)


def parse_nccl_log(text: str) -> NcclLog:
    """Every communicator NCCL described in ``text`` (one rank's debug file, or a slice of it)."""
    parser = _Parser()
    for raw in text.splitlines():
        parser.line(raw)
    if parser.unnamed is not None and parser.unnamed.channels is not None:
        # Init lines with no COMPLETE yet (the slice ends mid-init, or init failed).
        parser.log.communicators.append(parser.unnamed)
    return parser.log


def _thresholds(text: str) -> dict[str, int]:
    """'8/8/64 | 8/8/64 | 512 | 512' -> TREE then RING per protocol (LL/LL128/SIMPLE)."""
    groups = [g.strip() for g in text.split("|")]
    found: dict[str, int] = {}
    for algo, group in zip(("TREE", "RING"), groups, strict=False):
        for proto, value in zip(("LL", "LL128", "SIMPLE"), group.split("/"), strict=False):
            if value.strip().lstrip("-").isdigit():
                found[f"{algo}/{proto}"] = int(value)
    return found


def _count_collective(comm: Communicator, m: re.Match[str],
                      version: tuple[int, int, int] | None) -> None:
    algo, proto = m.group("algo"), m.group("proto")
    if algo.isdigit():
        # ncclAlgoStr order (src/include/nccl_common.h): 2.12/2.13 Tree, Ring, CollNet; from
        # 2.14 CollNet splits into Direct and Chain, then NVLS (2.17), NVLS_TREE (2.18), PAT (2.23).
        names = OLD_ALGORITHMS if version is not None and version[:2] < (2, 14) else ALGORITHMS
        algo = names[int(algo)] if int(algo) < len(names) else algo
    if proto.isdigit():
        proto = PROTOCOLS[int(proto)] if int(proto) < len(PROTOCOLS) else proto
    algo, proto = algorithm_name(algo), proto.upper()
    op = m.group("op") or "collective"
    lo = m.groupdict().get("lo")
    hi = m.groupdict().get("hi")
    used = int(hi) - int(lo) + 1 if lo is not None and hi is not None else None
    nbytes = int(m.group("bytes"))
    small = nbytes < DATA_COLLECTIVE_BYTES
    key = f"{op} {algo}/{proto}{' small' if small else ''}"
    entry = comm.collectives.setdefault(key, {
        "op": op, "algorithm": algo, "protocol": proto, "count": 0,
        "max_threads": comm.max_threads.get(f"{algo}/{proto}"), "channels_used": used,
        "bytes_max": 0, "bytes_min": nbytes})
    entry["count"] += 1
    entry["bytes_max"] = max(entry["bytes_max"], nbytes)
    entry["bytes_min"] = min(entry["bytes_min"], nbytes)
    if used is not None:
        entry["channels_used"] = max(entry["channels_used"] or 0, used)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None



