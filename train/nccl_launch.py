"""The block size NCCL/RCCL launches a collective kernel with, derived from their launch code
(pure: no torch), so that a point is flagged only when its kernels ran with something else.

Asking NCCL_NTHREADS=256 does not give block.x 256, and that is by design. What each version
does, read in NVIDIA/nccl at the commit of the release named (makefiles/version.mk there):

- 2.12.12 (7aa1c46f), src/enqueue.cc getAlgoInfo/ncclSetupCollKernel:
  nt = maxThreads[algo][proto], halved while nBytes < nc*nt*threadThreshold once nc is down to
  one channel; SIMPLE adds one warp ("Extra warp for sync"), TREE and COLLNET three more;
  blockDim.x = the largest nt of the launch. No floor.
- 2.17.1 (5d3ab08b): the same, plus a floor of 3 warps; NVLS/SIMPLE launches
  NCCL_MAX_NTHREADS (640); the plan's block is at least 3 warps.
- 2.18.1 (d97a32fa) to 2.21.5 (ab2b89c4), getAlgoInfo / getChannnelThreadInfo: SIMPLE adds one
  warp to RING and four to TREE (none to the others); floor 3 warps; plan floor 3 warps.
- 2.22.3 (178b6b75), topoGetAlgoInfo: as before, then TREE always NCCL_MAX_NTHREADS ("Tree now
  uses all threads always"); finishPlan floors the block at NCCL_MIN_NTHREADS (4 warps, 128).
- 2.23 on (PAT exists; read at 2.26.2, f44ac759, and 2.28.3, f1308997): PAT also 640.

maxThreads (src/graph/tuning.cc, same releases): RING and TREE take NCCL_NTHREADS for SIMPLE
and LL (getNthreads: a multiple of 32 in 64..512, else NCCL uses its bound and says "Invalid
NCCL_NTHREADS ..."); without it RING/SIMPLE defaults to 256 or 512 by topology, TREE/SIMPLE and
LL to 512; LL128 reads NCCL_LL128_NTHREADS (640); CollNet, NVLS and NVLS-Tree use
NCCL_MAX_NTHREADS (640; 512 for 2.12's CollNet). So NCCL_NTHREADS is a no-op knob for TREE
from 2.22, PAT, LL128, CollNet and NVLS: their block does not follow it.

RCCL (ROCm/rccl): RCCL_THREADS_PER_BLOCK, where RCCL has it (rcclOptThreadBlockSize, the
WarpSpeed knobs of the release after 2.27.7), sets the block of every collective: rounded up to
a multiple of the warp size (64 on CDNA), capped at the architecture's maximum, at least 3 warps,
each adjustment printed ("RCCL Threads per block adjusted/reduced/increased to N"). Releases
without it never read the variable (no "set by environment" line: a no-op). Otherwise RCCL's
blocks come from getNthreads with min 4 warps and NCCL_MAX_NTHREADS 256 (src/include/device.h,
857cc6a9) and HIP builds add no sync warp (src/enqueue.cc, 7383f10d): too architecture-bound to
derive here, so they are not compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

WARP = 32
NCCL_MAX_NTHREADS = 640
NCCL_SIMPLE_MAX_NTHREADS = 512
NCCL_LL_MAX_NTHREADS = 512
NCCL_LL128_MAX_NTHREADS = 640
NCCL_MIN_NTHREADS = 4 * WARP       # 2.22+ plan floor
FLOOR_3_WARPS = 3 * WARP

# Algorithms whose maxThreads is NCCL_MAX_NTHREADS whatever NCCL_NTHREADS says.
FIXED_MAX_ALGOS = ("COLLNET", "COLLNET_DIRECT", "COLLNET_CHAIN", "NVLS", "NVLS_TREE")
# Algorithms NCCL does not halve threads for (their own channel logic).
NO_HALVING_ALGOS = ("NVLS", "NVLS_TREE", "COLLNET_DIRECT", "COLLNET")


@dataclass(frozen=True)
class Block:
    """The block.x NCCL launches for one algorithm/protocol (None: not derivable, see why)."""

    value: int | None
    knob_effective: bool | None   # does the thread knob change this block
    why: str


def version_tuple(version: str | None) -> tuple[int, int, int] | None:
    """'2.28.9+cuda13.0' / '2.21.5-HEAD:abc' -> (2, 28, 9)."""
    if not version:
        return None
    head = version.split("+", 1)[0].split("-", 1)[0]
    parts = head.split(".")
    try:
        major, minor, patch = (int(p) for p in parts[:3])
    except ValueError:
        return None
    return major, minor, patch


def _halve(nt: int, nbytes: int | None, channels: int | None, threshold: int | None) -> int:
    """NCCL's "while (nBytes < nc*nt*threadThreshold) if (nt % 128 == 0) nt /= 2" once the
    channel count is settled; without the inputs the collective is taken as large."""
    if nbytes is None or channels is None or threshold is None:
        return nt
    while nbytes < channels * nt * threshold and nt % 128 == 0:
        nt //= 2
    return nt


def nccl_block(version: tuple[int, int, int] | None, algorithm: str, protocol: str,
               max_threads: int | None, *, nbytes: int | None = None,
               channels: int | None = None, threshold: int | None = None) -> Block:
    """block.x for one collective of NCCL ``version`` (its only collective in the launch).

    max_threads: maxThreads[algorithm][protocol] (the TUNING table's Max NThreads, or what the
    thread knob gives: see ``max_threads_for``); None when unknown."""
    algo, proto = algorithm.upper(), protocol.upper()
    if version is None:
        return Block(None, None, "NCCL version unknown (no version line): launch rule not known")
    v = version[:2]
    if algo == "TREE" and v >= (2, 22):
        return Block(NCCL_MAX_NTHREADS, False,
                     f"TREE launches NCCL_MAX_NTHREADS={NCCL_MAX_NTHREADS} from NCCL 2.22 "
                     "(src/enqueue.cc: \"Tree now uses all threads always\")")
    if algo == "PAT":
        return Block(NCCL_MAX_NTHREADS, False, f"PAT launches NCCL_MAX_NTHREADS={NCCL_MAX_NTHREADS}"
                     " (src/enqueue.cc, NCCL 2.23+)")
    if algo == "NVLS" and proto == "SIMPLE" and v < (2, 18) and v >= (2, 17):
        return Block(NCCL_MAX_NTHREADS, False, "NVLS/SIMPLE launches NCCL_MAX_NTHREADS (2.17)")
    knob = algo in ("RING", "TREE") and proto in ("SIMPLE", "LL")
    if max_threads is None:
        return Block(None, knob, f"{algo}/{proto}: NCCL's Max NThreads unknown (no TUNING table on "
                     "this rank and no thread variable read)")
    nt = max_threads
    if algo not in NO_HALVING_ALGOS:
        nt = _halve(nt, nbytes, channels, threshold)
    extra = 0
    if proto == "SIMPLE":
        if v < (2, 18):
            extra = WARP + (3 * WARP if algo in ("TREE", "COLLNET", "COLLNET_DIRECT",
                                                   "COLLNET_CHAIN") else 0)
        else:
            extra = {"RING": WARP, "TREE": 4 * WARP}.get(algo, 0)
    nt += extra
    steps = [f"Max NThreads {max_threads}"]
    if nt - extra != max_threads:
        steps.append(f"halved to {nt - extra} for {nbytes} bytes on {channels} channels")
    if extra:
        steps.append(f"+{extra // WARP} warp{'s' if extra > WARP else ''} "
                     f"({'sync warp' if extra == WARP else 'split-thread warps'})")
    if v >= (2, 17):
        floor = NCCL_MIN_NTHREADS if v >= (2, 22) else FLOOR_3_WARPS
        if nt < floor:
            steps.append(f"raised to the floor {floor}")
            nt = floor
    elif v >= (2, 13) and nt < FLOOR_3_WARPS:
        return Block(None, knob, f"{algo}/{proto}: {nt} threads; whether NCCL "
                     f"{'.'.join(map(str, version))} raises it to 3 warps was not read from source")
    release = ".".join(map(str, version))
    return Block(nt, knob, f"NCCL {release} {algo}/{proto}: " + ", ".join(steps))


def max_threads_for(algorithm: str, protocol: str, nthreads: int | None,
                    ll128_nthreads: int | None = None,
                    version: tuple[int, int, int] | None = None) -> int | None:
    """maxThreads[algorithm][protocol] from the thread variables NCCL read (effective values,
    after its own clamping), where the TUNING table is not there to say it; None where the
    default depends on the topology (RING/SIMPLE without NCCL_NTHREADS)."""
    algo, proto = algorithm.upper(), protocol.upper()
    if proto == "LL128":
        return ll128_nthreads or NCCL_LL128_MAX_NTHREADS
    if algo in FIXED_MAX_ALGOS:
        old_collnet = algo == "COLLNET" and version is not None and version[:2] < (2, 14)
        return NCCL_SIMPLE_MAX_NTHREADS if old_collnet else NCCL_MAX_NTHREADS
    if algo in ("RING", "TREE") and proto in ("SIMPLE", "LL"):
        if nthreads is not None:
            return nthreads
        if proto == "LL":
            return NCCL_LL_MAX_NTHREADS
        return NCCL_SIMPLE_MAX_NTHREADS if algo == "TREE" else None
    return None


def nccl_nthreads_effective(asked: int | None, invalid: Mapping[str, Any] | None) -> int | None:
    """NCCL_NTHREADS as NCCL uses it: the value, or the bound its "Invalid NCCL_NTHREADS" line
    named (getNthreads: below the minimum -> minimum, above the maximum -> maximum)."""
    if invalid and invalid.get("effective") is not None:
        return int(invalid["effective"])
    return asked


def rccl_block(threads_per_block: int | None, adjusted: int | None) -> Block:
    """RCCL_THREADS_PER_BLOCK as RCCL launches it: the value it printed after adjusting it,
    else the value read (RCCL prints every adjustment, so no line means none)."""
    if threads_per_block is None:
        return Block(None, None, "RCCL did not read RCCL_THREADS_PER_BLOCK: RCCL sizes blocks by "
                     "architecture (not compared)")
    if adjusted is not None:
        return Block(adjusted, True, f"RCCL_THREADS_PER_BLOCK={threads_per_block}, adjusted by "
                     f"RCCL to {adjusted} (its \"RCCL Threads per block ...\" line)")
    return Block(threads_per_block, True, f"RCCL_THREADS_PER_BLOCK={threads_per_block} "
                 "(rcclOptThreadBlockSize: the block of every collective)")
