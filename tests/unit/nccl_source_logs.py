"""Debug output of NCCL/RCCL releases, rebuilt from each release's own format strings.

One GPU shows world size 1 only (no TUNING table, no per-collective line, no collective
kernel), so what a multi-rank run prints is built here from the printf formats of the
libraries' sources, read at the commit of each release (NVIDIA/nccl and ROCm/rccl; the commit
is named per format, makefiles/version.mk or CHANGELOG.md at that commit gives the release).
Only the formats are the libraries'; addresses, host names, timings and table numbers are
invented. tests/unit/data/nccl/README.md has the same table; ``python -m
tests.unit.nccl_source_logs`` rewrites the sample files there.

Release    commit (NVIDIA/nccl)   formats read there
2.12.12    7aa1c46f   init.cc: showVersion (INFO "%s" VERSION_STRING when NCCL_DEBUG_FILE is
                      set), "Using network %s", "comm %p rank %d nranks %d cudaDev %d busId %lx
                      - Init COMPLETE" (no Init START), "- Destroy COMPLETE"; graph/paths.cc
                      "%d coll channels, %d p2p channels, %d p2p channels per peer"; enqueue.cc:
                      the per-collective INFO is commented out (no per-collective line).
2.13.4     19ab67d1   debug.cc: "%s:%d:%d [%d] NCCL INFO ", WARN "\\n%s:%d:%d [%d] %s:%d NCCL WARN "
                      (no debug.cc is stored at 2.12.x; 2.13.4 is the next release).
2.18.1/.3  d97a32fa / ea383122  init.cc (2.18.3): "comm %p rank %d nranks %d cudaDev %d nvmlDev
                      %d busId %lx commId 0x%llx - Init START" (no function, no parent), same
                      COMPLETE, "Comm config %s set to %d", "%d coll channels, %d nvls channels, %d
                      p2p channels, %d p2p channels per peer"; graph/tuning.cc (2.18.1): the
                      TUNING table in blocks of NCCL_NUM_ALGORITHMS/2, "threadThresholds ...".
2.21.5     ab2b89c4   init.cc: "ncclCommInitRank comm %p ... commId 0x%llx - Init START",
                      "ncclCommSplit comm %p ... parent %p color %d key %d commId 0x%llx - Init
                      START"; enqueue.cc: rank 0 "%ld Bytes -> Algo %d proto %d time %f";
                      debug.cc as 2.13.4.
2.26.2     f44ac759   debug.cc: WARN gets "[%F %T] " (NCCL_DEBUG_TIMESTAMP_LEVELS defaults to
                      WARN); enqueue.cc: rank 0 "%s: %ld Bytes -> Algo %s proto %s
                      channel{Lo..Hi}={%d..%d}" (ncclAlgoToString: TREE, NVLS_TREE, ...);
                      tuning.cc: table in blocks of three (7 algorithms, PAT last).
2.28.x     f1308997 (2.28.3) and the 2.28.9 recordings of tests/unit/data/nccl (the version,
                      Comm config, Init START/COMPLETE, coll channels and Destroy lines as
                      printed); "%s comm %p ... parent %p splitCount %d color %d key %d- Init
                      START" (job->funcName; 2.23+ source).
RCCL 2.20.5 (ROCm 6.2): NCCL 2.20's formats (its base); VERSION_STRING "RCCL version " ...
                      NCCL_SUFFIX "+hip" HIP major.minor, printed "%s %s" with rcclGitHash.
RCCL ROCm 6.3+ (7383f10d): "RCCL version : " X.Y.Z NCCL_SUFFIX, printed "%s-%s\\n%s\\n..." with
                      rcclGitHash then "HIP version  : ", "ROCm version : ", Hostname, Librccl
                      path lines; RCCL getNthreads WARN "Invalid %s %d (maximum %d)." (min 4
                      warps, NCCL_MAX_NTHREADS 256, src/include/device.h 857cc6a9);
                      rcclOptThreadBlockSize INFO "RCCL Threads per block reduced to %d to match
                      max threads" / "adjusted to %d to be multiple of warp size %d" / "increased
                      to %d to be at least one warp".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

HOST, PID = "nodeA", 4100
ALGO_STR = ("Tree", "Ring", "CollNetDirect", "CollNetChain", "NVLS", "NVLSTree", "PAT")  # ncclAlgoStr
PROTO_STR = ("LL", "LL128", "Simple")                                                  # ncclProtoStr
ALGO_INDEX = {"TREE": 0, "RING": 1, "COLLNET_DIRECT": 2, "COLLNET_CHAIN": 3, "NVLS": 4,
              "NVLS_TREE": 5, "PAT": 6}
PROTO_INDEX = {"LL": 0, "LL128": 1, "SIMPLE": 2}


_C_CONVERSION = re.compile(r"%([-+ #0]*\d*(?:\.\d+)?)(?:hh|ll|h|l|z)?([diouxXfFeEgGcsp%])")


def printf(fmt: str, *args: object) -> str:
    """C printf for the formats copied verbatim from the sources (length modifiers dropped,
    %p and %u as Python has them)."""
    def convert(m: re.Match[str]) -> str:
        conv = {"p": "s", "u": "d", "i": "d"}.get(m.group(2), m.group(2))
        return "%" + m.group(1) + conv
    return _C_CONVERSION.sub(convert, fmt) % args if args else fmt


class Lines:
    """printf-style emission with one release's debug prefix (src/debug.cc)."""

    def __init__(self, release: str, rank: int = 0, dev: int = 0, warn_timestamp: bool = False) -> None:
        self.release, self.dev, self.warn_timestamp = release, dev, warn_timestamp
        self.tid = PID + rank
        self.pid = PID + rank
        self.out: list[str] = [f"# Rebuilt from {release}'s format strings (tests/unit/nccl_source_logs.py); "
                               "values invented"]

    def info(self, fmt: str, *args: object) -> None:
        self.out.append(f"{HOST}:{self.pid}:{self.tid} [{self.dev}] NCCL INFO " + printf(fmt, *args))

    def warn(self, where: str, fmt: str, *args: object) -> None:
        # "\n%s:%d:%d [%d] %s:%d NCCL WARN " (2.13.4); 2.26.2 puts "[%F %T] " after the "\n".
        stamp = "[2026-01-15 10:20:30] " if self.warn_timestamp else ""
        self.out.append("")
        self.out.append(f"{stamp}{HOST}:{self.pid}:{self.tid} [{self.dev}] {where} NCCL WARN "
                        + printf(fmt, *args))

    def raw(self, text: str) -> None:
        self.out.append(text)

    def text(self) -> str:
        return "\n".join(self.out) + "\n"


def table_blocks(lines: Lines, algos: Sequence[str], max_threads: dict[str, int], per_block: int) -> None:
    """graph/tuning.cc (2.18.1 blocks of NCCL_NUM_ALGORITHMS/2; 2.26.2 blocks of 3)."""
    for start in range(0, len(algos), per_block):
        block = algos[start:start + per_block]
        line = "  Algorithm   |"
        for a in block:
            line += printf(" %14s   %14s   %14s |", "", a, "")
        lines.info("%s", line)
        line = "  Protocol    |"
        for _ in range(per_block):
            for p in PROTO_STR:
                line += " %14s |" % p
        lines.info("%s", line)
        line = " Max NThreads |"
        for a in block:
            for p in PROTO_STR:
                line += " %14d |" % max_threads.get(f"{a}/{p}", 0)
        lines.info("%s", line)
        line = "%13s |" % "AllReduce"
        for _ in block:
            for _p in PROTO_STR:
                line += "%8.1f/%6.1f |" % (10.0, 20.0)
        lines.info("%s", line)


def _max_threads_2x(nthreads: int | None, algos: Sequence[str]) -> dict[str, int]:
    """tuning.cc maxThreads (2.18.1+): NCCL_NTHREADS for Ring/Tree Simple and LL, 640 for LL128,
    CollNet and NVLS (ring simple default 512 here: an NVLink-class topology)."""
    table: dict[str, int] = {}
    for a in algos:
        for p in PROTO_STR:
            if p == "LL128":
                value = 640
            elif a in ("Ring", "Tree"):
                value = nthreads or 512
            else:
                value = 640 if p == "Simple" else 0
            table[f"{a}/{p}"] = value
    return table


def nccl_2_12(*, rank: int = 0, nranks: int = 2, nthreads: int | None = 256,
              invalid_nthreads: int | None = None) -> str:
    """NCCL 2.12.12: no Init START, no per-collective line; a default group and one more."""
    out = Lines("NCCL 2.12.12 (7aa1c46f)", rank=rank)
    out.info("Using network %s", "IB")
    out.info("%s", "NCCL version 2.12.12+cuda11.6")
    if invalid_nthreads is not None:
        out.info("%s set by environment to %lu.", "NCCL_NTHREADS", invalid_nthreads)
        for _ in range(3):  # getNthreads for Ring/Simple, Tree/Simple and LL
            out.warn("graph/tuning.cc:79", "Invalid %s %d (maximum %d).", "NCCL_NTHREADS", invalid_nthreads, 512)
    elif nthreads is not None:
        out.info("%s set by environment to %lu.", "NCCL_NTHREADS", nthreads)
    nt = 512 if invalid_nthreads is not None else (nthreads or 512)
    for comm, channels in (("0x55a0c0", 16), ("0x77b1d0", 8)):
        if rank == 0:
            out.info("%s", "Latency/AlgBw |" + "".join(" %7s/%6s |" % (a, p) for a in ("Tree", "Ring", "CollNet")
                                                       for p in PROTO_STR))
            out.info("%s", " Max NThreads |" + "".join(
                " %14d |" % (640 if p == "LL128" else (512 if a == "CollNet" else nt))
                for a in ("Tree", "Ring", "CollNet") for p in PROTO_STR))
        out.info("%d coll channels, %d p2p channels, %d p2p channels per peer", channels, channels, 2)
        out.info("comm %s rank %d nranks %d cudaDev %d busId %lx - Init COMPLETE", comm, rank, nranks, 0, 0x1b000)
    out.info("comm %s rank %d nranks %d cudaDev %d busId %lx - Destroy COMPLETE", "0x77b1d0", rank, nranks, 0, 0x1b000)
    return out.text()


def nccl_2_18(*, rank: int = 0, nranks: int = 2, nthreads: int | None = 128) -> str:
    """NCCL 2.18.3: Init START without the function or the parent; no per-collective line."""
    algos = ALGO_STR[:6]
    out = Lines("NCCL 2.18.3 (ea383122; tuning.cc 2.18.1 d97a32fa)", rank=rank)
    out.info("%s", "NCCL version 2.18.3+cuda12.2")
    if nthreads is not None:
        out.info("%s set by environment to %lld.", "NCCL_NTHREADS", nthreads)
    for comm, channels, ctas in (("0x55a0c0", 16, None), ("0x77b1d0", 8, 8)):
        out.info("Comm config %s set to %d", "Blocking", 1)
        if ctas:
            out.info("Comm config %s set to %d", "Min CTAs", ctas)
            out.info("Comm config %s set to %d", "Max CTAs", ctas)
        out.info("comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx commId 0x%llx - Init START",
                 comm, rank, nranks, 0, 0, 0x1b000, 0x5ca1ab1e)
        if rank == 0:
            table_blocks(out, algos, _max_threads_2x(nthreads, algos), 3)
        out.info("threadThresholds %ld/%ld/%ld | %ld/%ld/%ld | %ld | %ld", 8, 8, 64, 8 * nranks, 8, 64, 512, 512)
        out.info("%d coll channels, %d nvls channels, %d p2p channels, %d p2p channels per peer",
                 channels, 0, channels, 2)
        out.info("comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx commId 0x%llx - Init COMPLETE",
                 comm, rank, nranks, 0, 0, 0x1b000, 0x5ca1ab1e)
    out.info("comm %s rank %d nranks %d cudaDev %d busId %lx - Destroy COMPLETE", "0x77b1d0", rank, nranks, 0, 0x1b000)
    return out.text()


def _collective_lines(out: Lines, form: str, algorithm: str, protocol: str, channels: int,
                      data_bytes: int, data_count: int) -> None:
    """Rank 0 only. numeric (2.19-2.22 enqueue.cc), named (2.23+, with the channel range)."""
    for nbytes, algo, proto, hi in [(data_bytes, algorithm, protocol, channels - 1)] * data_count + \
            [(4, "RING", "LL", 0)]:
        if form == "numeric":
            out.info("%ld Bytes -> Algo %d proto %d time %f", nbytes, ALGO_INDEX[algo], PROTO_INDEX[proto], 42.5)
        else:
            out.info("%s: %ld Bytes -> Algo %s proto %s channel{Lo..Hi}={%d..%d}", "AllReduce", nbytes, algo,
                     proto, 0, hi)


def nccl_2_2x(release: str, *, rank: int = 0, nranks: int = 2, nthreads: int | None = 256,
              algorithm: str = "RING", protocol: str = "SIMPLE", ctas: int = 8,
              data_bytes: int = 33554432, data_count: int = 4, invalid_nthreads: int | None = None,
              ring_lines: bool = False, network: str = "IB") -> str:
    """NCCL 2.21.5 ("2.21"), 2.26.2 ("2.26") or 2.28 ("2.28"): a default group, then a split
    with min/max CTAs, its collectives (rank 0 prints them), destroyed."""
    minor = int(release.split(".")[1])
    algos = ALGO_STR[:6] if minor < 23 else ALGO_STR
    patch = {21: "2.21.5+cuda12.4", 26: "2.26.2+cuda12.8", 28: "2.28.9+cuda13.0"}[minor]
    out = Lines(f"NCCL {patch}", rank=rank, warn_timestamp=minor >= 26)
    out.info("%s", f"NCCL version {patch}")
    if invalid_nthreads is not None:
        out.info("%s set by environment to %lld.", "NCCL_NTHREADS", invalid_nthreads)
        out.warn("graph/tuning.cc:25", "Invalid %s %d (maximum %d).", "NCCL_NTHREADS", invalid_nthreads, 512)
        nthreads = 512
    elif nthreads is not None:
        out.info("%s set by environment to %lld.", "NCCL_NTHREADS", nthreads)
    for comm, channels, parent in (("0x55d0c000", 32, None), ("0x7f10aa00", ctas, "0x55d0c000")):
        out.info("Comm config %s set to %d", "Blocking", 1)
        if parent:
            out.info("Comm config %s set to %d", "Min CTAs", ctas)
            out.info("Comm config %s set to %d", "Max CTAs", ctas)
        out.info("Using network %s", network)
        if minor < 23:
            if parent:
                out.info("ncclCommSplit comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx parent %s "
                         "color %d key %d commId 0x%llx - Init START", comm, rank, nranks, 0, 0, 0x1b000,
                         parent, 59908776, 0, 0x5ca1ab1e)
            else:
                out.info("ncclCommInitRank comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx "
                         "commId 0x%llx - Init START", comm, rank, nranks, 0, 0, 0x1b000, 0x5ca1ab1e)
        elif parent:
            out.info("%s comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx parent %s splitCount %d "
                     "color %d key %d- Init START", "ncclCommSplit", comm, rank, nranks, 0, 0, 0x1b000, parent,
                     1, 59908776, 0)
        else:
            out.info("%s comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx commId 0x%llx - Init START",
                     "ncclCommInitRankConfig", comm, rank, nranks, 0, 0, 0x1b000, 0x5ca1ab1e)
        if ring_lines and rank == 0:
            for c in range(channels):
                out.info("Channel %02d/%02d : %s", c, channels, " ".join(str(r) for r in range(nranks)))
        for c in range(2):
            out.info("Channel %02d/%d : %d[%d] -> %d[%d] [send] via NET/%s/%d%s%s", c, 0, rank, 0,
                     (rank + 1) % nranks, 0, network, 0, "/GDRDMA" if network == "IB" else "", "")
        if rank == 0:
            table_blocks(out, algos, _max_threads_2x(nthreads, algos), 3)
        out.info("threadThresholds %ld/%ld/%ld | %ld/%ld/%ld | %ld | %ld", 8, 8, 64, 8 * nranks, 8, 64, 512, 512)
        out.info("%d coll channels, %d collnet channels, %d nvls channels, %d p2p channels, "
                 "%d p2p channels per peer", channels, channels, 0, channels, 2)
        if minor < 23:
            name = "ncclCommSplit" if parent else "ncclCommInitRank"
            extra = f" parent {parent} color 59908776 key 0" if parent else ""
            out.info("%s comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx%s commId 0x%llx - Init COMPLETE",
                     name, comm, rank, nranks, 0, 0, 0x1b000, extra, 0x5ca1ab1e)
        else:
            name = "ncclCommSplit" if parent else "ncclCommInitRankConfig"
            extra = f" parent {parent} splitCount 1 color 59908776 key 0" if parent else ""
            out.info("%s comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx%s commId 0x%llx - Init COMPLETE",
                     name, comm, rank, nranks, 0, 0, 0x1b000, extra, 0x5ca1ab1e)
    if rank == 0:
        _collective_lines(out, "numeric" if minor < 23 else "named", algorithm, protocol, ctas,
                          data_bytes, data_count)
    out.info("comm %s rank %d nranks %d cudaDev %d busId %lx - Destroy COMPLETE", "0x7f10aa00", rank, nranks, 0, 0x1b000)
    return out.text()


def rccl_rocm62(*, rank: int = 0, nranks: int = 2, nthreads: int | None = 256,
                threads_per_block_env: bool = True) -> str:
    """RCCL 2.20.5 (ROCm 6.2): NCCL 2.20's formats; RCCL_THREADS_PER_BLOCK does not exist yet
    (never read); NCCL_NTHREADS is read by RCCL's getNthreads (min 4 warps of 64, max 256)."""
    algos = ALGO_STR[:6]
    out = Lines("RCCL 2.20.5 (ROCm 6.2; NCCL 2.20 formats)", rank=rank)
    out.info("%s %s", "RCCL version 2.20.5+hip6.2", "HEAD:1f2e3d4")
    if nthreads is not None:
        out.info("%s set by environment to %lld.", "NCCL_NTHREADS", nthreads)
        if nthreads > 256:
            out.warn("graph/tuning.cc:27", "Invalid %s %d (maximum %d).", "NCCL_NTHREADS", nthreads, 256)
        elif nthreads < 256:
            out.warn("graph/tuning.cc:27", "Invalid %s %d (minimum %d).", "NCCL_NTHREADS", nthreads, 256)
    out.info("Comm config %s set to %d", "Blocking", 1)
    out.info("comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx commId 0x%llx - Init START",
             "0x6a00f0", rank, nranks, 0, 0, 0xc1000, 0xbeef)
    if rank == 0:
        table_blocks(out, algos, _max_threads_2x(256, algos), 3)
    out.info("%d coll channels, %d collnet channels, %d nvls channels, %d p2p channels, %d p2p channels per peer",
             56, 0, 0, 56, 2)
    out.info("comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx commId 0x%llx - Init COMPLETE",
             "0x6a00f0", rank, nranks, 0, 0, 0xc1000, 0xbeef)
    if rank == 0:
        _collective_lines(out, "numeric", "RING", "SIMPLE", 56, 33554432, 2)
    return out.text()


def rccl_rocm7(*, rank: int = 0, nranks: int = 2, threads_per_block: int | None = 512,
               adjusted: int | None = 256, version: str = "2.27.7") -> str:
    """RCCL of ROCm 7.x: the version block of 7383f10d's showVersion; with the WarpSpeed knob
    RCCL_THREADS_PER_BLOCK read lazily at the first collective and each adjustment printed."""
    algos = ALGO_STR
    out = Lines(f"RCCL {version} (ROCm 7.x; showVersion of 7383f10d)", rank=rank)
    out.info("%s", f"RCCL version : {version}-HEAD:9a8b7c6\nHIP version  : 7.1.25424-4179531dcd\n"
             f"ROCm version : 7.1.0.0-38-4179531\n{'Hostname':<12s} : {HOST}\n"
             f"{'Librccl path':>12s} : /opt/rocm/lib/librccl.so.1")
    out.info("%s set by environment to %lld.", "NCCL_NTHREADS", 256)
    out.info("Comm config %s set to %d", "Blocking", 1)
    out.info("%s comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx commId 0x%llx - Init START",
             "ncclCommInitRankConfig", "0x6a00f0", rank, nranks, 0, 0, 0xc1000, 0xbeef)
    if rank == 0:
        table_blocks(out, algos, _max_threads_2x(256, algos), 3)
    out.info("%d coll channels, %d collnet channels, %d nvls channels, %d p2p channels, %d p2p channels per peer",
             64, 0, 0, 64, 2)
    out.info("%s comm %s rank %d nranks %d cudaDev %d nvmlDev %d busId %lx commId 0x%llx - Init COMPLETE",
             "ncclCommInitRankConfig", "0x6a00f0", rank, nranks, 0, 0, 0xc1000, 0xbeef)
    if threads_per_block is not None:
        out.info("%s set by environment to %lld.", "RCCL_THREADS_PER_BLOCK", threads_per_block)
        if adjusted is not None and adjusted < threads_per_block:
            out.info("RCCL Threads per block reduced to %d to match max threads", adjusted)
        elif adjusted is not None and adjusted > threads_per_block:
            out.info("RCCL Threads per block increased to %d to be at least one warp", adjusted)
    if rank == 0:
        _collective_lines(out, "named", "RING", "SIMPLE", 64, 33554432, 2)
    return out.text()


SAMPLES = {
    "src_nccl-2.12.12_rank00.log": lambda: nccl_2_12(),
    "src_nccl-2.12.12_rank01.log": lambda: nccl_2_12(rank=1),
    "src_nccl-2.12.12_nthreads1024_rank00.log": lambda: nccl_2_12(invalid_nthreads=1024),
    "src_nccl-2.18.3_rank00.log": lambda: nccl_2_18(),
    "src_nccl-2.21.5_rank00.log": lambda: nccl_2_2x("2.21"),
    "src_nccl-2.21.5_rank01.log": lambda: nccl_2_2x("2.21", rank=1),
    "src_nccl-2.26.2_tree_rank00.log": lambda: nccl_2_2x("2.26", algorithm="TREE", invalid_nthreads=1024),
    "src_nccl-2.28.9_rank00.log": lambda: nccl_2_2x("2.28", ring_lines=True),
    "src_rccl-2.20.5_rocm6.2_rank00.log": lambda: rccl_rocm62(nthreads=512),
    "src_rccl-2.27.7_rocm7_rank00.log": lambda: rccl_rocm7(),
}


def write_samples(directory: Path) -> None:
    for name, make in SAMPLES.items():
        (directory / name).write_text(make())


if __name__ == "__main__":
    write_samples(Path(__file__).parent / "data" / "nccl")
