"""Effective settings read back from every supported NCCL/RCCL release (issue 23, findings 1-3).

The logs are rebuilt from each release's own printf formats (tests/unit/nccl_source_logs.py
names the commit of each; tests/unit/data/nccl/README.md the same), the world-size-1 ones are
recorded on an H100 (NCCL 2.28.9). A thread sweep of 64/128/256/512 under RING/SIMPLE and
under TREE must flag nothing that ran as the library launches it and flag the no-op knob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit import nccl_source_logs as src
from train.launchdelay import launch_check
from train.nccl_debug import asked_from_env, effective_settings, parse_nccl_log

DATA = Path(__file__).parent / "data" / "nccl"
THREADS = (64, 128, 256, 512)


def point_of(text: str, env: dict[str, str], ctas: int | None = 8) -> dict[str, Any]:
    """What a pool point reads: the slice from its communicator's request, with the process."""
    marker = "Comm config Min CTAs set to" if ctas else "Init START"
    start = text.rfind("\n", 0, text.index(marker)) + 1 if marker in text else 0
    return effective_settings(parse_nccl_log(text[start:]), asked_from_env(env, ctas, ctas), env,
                              process=parse_nccl_log(text))


def launched(block_x: int, grid_x: int = 8, n: int = 4) -> list[dict[str, Any]]:
    """Sampled steps whose gradient kernels ran with this launch configuration."""
    return [{"collective_launches": [{"kernel": "ncclDevKernel_Generic", "grid": [grid_x, 1, 1],
                                      "block": [block_x, 1, 1], "op": "all_reduce", "bucket": i}
                                     for i in range(n)]}]


def thread_flags(flags: list[str]) -> list[str]:
    return [f for f in flags if f.startswith(("threads", "kernels"))]


# -- finding 2: the library names itself -----------------------------------------------------

@pytest.mark.parametrize(("name", "library", "version"), [
    ("src_rccl-2.20.5_rocm6.2_rank00.log", "RCCL", "2.20.5+hip6.2"),
    ("src_rccl-2.27.7_rocm7_rank00.log", "RCCL", "2.27.7-HEAD:9a8b7c6"),
    ("src_nccl-2.21.5_rank00.log", "NCCL", "2.21.5+cuda12.4"),
    ("nccl-2.28.9_h100_world1_default.log", "NCCL", "2.28.9+cuda13.0"),
])
def test_the_version_line_names_the_library(name: str, library: str, version: str) -> None:
    log = parse_nccl_log((DATA / name).read_text())
    assert (log.library, log.version, log.vendor) == (library, version, library.lower())


def test_bare_version_lines_count_too() -> None:
    """stdout and NCCL_DEBUG=VERSION print the version without the host:pid prefix."""
    assert parse_nccl_log("NCCL version 2.13.4+cuda11.7\n").version == "2.13.4+cuda11.7"
    rccl = parse_nccl_log("RCCL version : 2.21.5-HEAD:4a1b2c3\nHIP version  : 6.3.42131\n")
    assert (rccl.vendor, rccl.version) == ("rccl", "2.21.5-HEAD:4a1b2c3")


def test_rccl_threads_per_block_is_judged_as_rccl() -> None:
    """ROCm 7.x reads RCCL_THREADS_PER_BLOCK and reduced 512 to 256 (its own line): the point
    ran with 256, said so; never 'a no-op: NCCL has no such variable'."""
    env = {"RCCL_THREADS_PER_BLOCK": "512", "NCCL_NTHREADS": "512"}
    point = point_of(src.rccl_rocm7(), env, ctas=None)
    assert point["vendor"] == "rccl" and point["threads"] == [256]
    assert not [f for f in point["flags"] + point["notes"] if "NCCL has no such variable" in f]
    assert any("RCCL_THREADS_PER_BLOCK=512 adjusted by RCCL to 256" in f for f in point["flags"])
    checked = launch_check(launched(256, 64), 64, 512, "control", point["launch_expectation"])
    assert checked["flags"] == []
    assert launch_check(launched(512, 64), 64, 512, "control",
                        point["launch_expectation"])["flags"], "512 threads is not what RCCL ran"


def test_rocm_6_2_knobs_rccl_did_not_take() -> None:
    """RCCL 2.20.5 has no RCCL_THREADS_PER_BLOCK (never read) and clamps NCCL_NTHREADS to 256."""
    env = {"RCCL_THREADS_PER_BLOCK": "512", "NCCL_NTHREADS": "512"}
    point = point_of(src.rccl_rocm62(nthreads=512), env, ctas=None)
    assert point["vendor"] == "rccl"
    assert any(f.startswith("RCCL_THREADS_PER_BLOCK=512 was set but RCCL never reported")
               for f in point["flags"])
    assert any("NCCL_NTHREADS=512 is above the maximum 256; RCCL ran 256" in f for f in point["flags"])
    assert point["threads_knob"]["effective"] == 256
    # RCCL's own block rule without the knob is not derived here: not compared, not flagged.
    assert point["launch_expectation"]["allowed"] is None
    assert launch_check(launched(256, 56), 56, 512, "control",
                        point["launch_expectation"])["flags"] == []


# -- finding 3: communicators and warnings of older and newer NCCL ---------------------------

def test_nccl_2_12_without_init_start() -> None:
    log = parse_nccl_log((DATA / "src_nccl-2.12.12_rank00.log").read_text())
    assert [(c.comm, c.kind, c.nranks, c.channels, c.complete) for c in log.communicators] == [
        ("0x55a0c0", "unnamed", 2, 16, True), ("0x77b1d0", "unnamed", 2, 8, True)]
    assert log.communicators[1].destroyed and not log.communicators[0].destroyed
    assert log.communicators[0].max_threads["RING/SIMPLE"] == 256
    assert log.communicators[0].max_threads["COLLNET/SIMPLE"] == 512
    assert log.network == "IB" and log.communicators[0].network == "IB"
    point = effective_settings(log, asked_from_env({"NCCL_NTHREADS": "256"}), {"NCCL_NTHREADS": "256"})
    assert point["channels"] == 16 and point["flags"] == []
    # 2.12 prints no per-collective algorithm at INFO: unknown, with the reason.
    assert point["algorithms"] is None and "2.12.12" in point["algorithms_reason"]
    assert point["threads"] is None and point["threads_reason"]


def test_nccl_2_18_init_start_without_function() -> None:
    text = src.nccl_2_18()
    log = parse_nccl_log(text)
    assert [(c.comm, c.kind, c.min_ctas, c.channels) for c in log.communicators] == [
        ("0x55a0c0", "unnamed", None, 16), ("0x77b1d0", "unnamed", 8, 8)]
    assert all(c.complete for c in log.communicators)
    point = point_of(text, {"NCCL_NTHREADS": "128"})
    assert (point["channels"], point["max_ctas"], point["flags"]) == (8, 8, [])


def test_nccl_2_21_split_parent_and_numeric_collectives() -> None:
    text = (DATA / "src_nccl-2.21.5_rank00.log").read_text()
    log = parse_nccl_log(text)
    split = log.communicators[1]
    assert (split.kind, split.parent, split.split_count, split.channels) == ("split", "0x55d0c000", None, 8)
    point = point_of(text, {"NCCL_NTHREADS": "256"})
    assert point["algorithms"] == ["RING/SIMPLE"] and point["threads"] == [288]


@pytest.mark.parametrize("name", ["src_nccl-2.12.12_nthreads1024_rank00.log",
                                  "src_nccl-2.26.2_tree_rank00.log"])
def test_warn_lines_with_source_position_and_timestamp(name: str) -> None:
    log = parse_nccl_log((DATA / name).read_text())
    assert log.warnings and log.warnings[0] == "Invalid NCCL_NTHREADS 1024 (maximum 512)."
    point = effective_settings(log, asked_from_env({"NCCL_NTHREADS": "1024"}), {"NCCL_NTHREADS": "1024"})
    assert point["nccl_warnings"] == log.warnings
    assert any("NCCL_NTHREADS=1024 is above the maximum 512; NCCL ran 512" in f for f in point["flags"])


def test_table_and_collective_spellings_agree() -> None:
    """The table says NVLSTree/CollNetDirect, the collective lines NVLS_TREE/COLLNET_DIRECT."""
    log = parse_nccl_log(src.nccl_2_2x("2.26", algorithm="NVLS_TREE"))
    comm = log.communicators[1]
    assert {"NVLS_TREE/SIMPLE", "COLLNET_DIRECT/SIMPLE", "PAT/SIMPLE"} <= set(comm.max_threads)
    assert comm.max_threads["PAT/SIMPLE"] == 640 and "NVLSTREE/SIMPLE" not in comm.max_threads
    entry = next(e for e in comm.collectives.values() if e["bytes_max"] > 4)
    assert (entry["algorithm"], entry["max_threads"]) == ("NVLS_TREE", 640)


def test_ring_lines_not_transport_lines_count_channels() -> None:
    """'Channel 00/0 : 0[0] -> 1[0] via NET/IB' carries a connection index, not a count."""
    log = parse_nccl_log(src.nccl_2_2x("2.28", ring_lines=True, ctas=8))
    assert log.communicators[1].ring_channels_seen == 8 and log.communicators[1].transports == ["NET/IB"]
    rank1 = parse_nccl_log(src.nccl_2_2x("2.28", rank=1, ring_lines=True))
    assert rank1.communicators[1].ring_channels_seen is None  # rank 0 prints the rings


# -- finding 1: the block NCCL launches, per algorithm/protocol and release -------------------

RING_SIMPLE = {  # block.x for NCCL_NTHREADS 64/128/256/512 under RING/SIMPLE
    "2.21": {64: 96, 128: 160, 256: 288, 512: 544},    # +1 warp, floor 3 warps
    "2.26": {64: 128, 128: 160, 256: 288, 512: 544},   # +1 warp, plan floor 4 warps (2.22+)
    "2.28": {64: 128, 128: 160, 256: 288, 512: 544},
}


@pytest.mark.parametrize("release", sorted(RING_SIMPLE))
@pytest.mark.parametrize("threads", THREADS)
def test_ring_simple_sweep_ran_as_asked(release: str, threads: int) -> None:
    env = {"NCCL_NTHREADS": str(threads), "RCCL_THREADS_PER_BLOCK": str(threads)}
    point = point_of(src.nccl_2_2x(release, nthreads=threads), env)
    block = RING_SIMPLE[release][threads]
    assert point["threads"] == [block]
    assert thread_flags(point["flags"]) == [], point["flags"]
    checked = launch_check(launched(block), 8, threads, "control", point["launch_expectation"])
    assert checked["flags"] == [] and checked["block_x"] == [block]
    # The kernels ran with exactly the threads asked: not what NCCL launches, so measured
    # evidence that something else sized them.
    if block != threads:
        wrong = launch_check(launched(threads), 8, threads, "control", point["launch_expectation"])
        assert wrong["flags"] and f"block.x [{threads}]" in wrong["flags"][0]


@pytest.mark.parametrize("threads", THREADS)
def test_ring_simple_ignoring_the_knob_is_flagged(threads: int) -> None:
    """NCCL read NCCL_NTHREADS but the kernels ran with the default 512 + 1 warp."""
    env = {"NCCL_NTHREADS": str(threads)}
    point = point_of(src.nccl_2_2x("2.28", nthreads=threads), env)
    checked = launch_check(launched(544), 8, threads, "control", point["launch_expectation"])
    assert bool(checked["flags"]) == (threads != 512)


@pytest.mark.parametrize("release", ["2.26", "2.28"])
@pytest.mark.parametrize("threads", THREADS)
def test_tree_sweep_is_a_no_op_from_2_22(release: str, threads: int) -> None:
    """TREE launches 640 whatever NCCL_NTHREADS says; the table's Max NThreads still shows the
    asked value: the point is flagged as a no-op knob, its kernels (640) are as NCCL runs them."""
    env = {"NCCL_NTHREADS": str(threads)}
    text = src.nccl_2_2x(release, nthreads=threads, algorithm="TREE")
    point = point_of(text, env)
    assert parse_nccl_log(text).communicators[1].max_threads["TREE/SIMPLE"] == threads
    assert point["threads"] == [640] and point["algorithms"] == ["TREE/SIMPLE"]
    assert [f for f in point["flags"] if "no-op for TREE/SIMPLE" in f], point["flags"]
    assert launch_check(launched(640), 8, threads, "control", point["launch_expectation"])["flags"] == []


@pytest.mark.parametrize("threads", THREADS)
def test_tree_before_2_22_follows_the_knob(threads: int) -> None:
    """NCCL 2.21 TREE/SIMPLE adds four warps to NCCL_NTHREADS: ran as asked, nothing flagged."""
    env = {"NCCL_NTHREADS": str(threads)}
    point = point_of(src.nccl_2_2x("2.21", nthreads=threads, algorithm="TREE"), env)
    assert point["threads"] == [threads + 128]
    assert thread_flags(point["flags"]) == []
    assert launch_check(launched(threads + 128), 8, threads, "control",
                        point["launch_expectation"])["flags"] == []


def test_ranks_without_collective_lines_accept_any_block_nccl_launches() -> None:
    """Rank 1 prints no per-collective line: the RING/TREE blocks of its release are accepted,
    a block NCCL never launches with these settings is not."""
    point = point_of(src.nccl_2_2x("2.28", rank=1, nthreads=256), {"NCCL_NTHREADS": "256"})
    assert point["threads"] is None and "rank 0" in point["threads_reason"]
    allowed = point["launch_expectation"]["allowed"]
    assert {288, 640, 256} <= set(allowed)
    assert launch_check(launched(288), 8, 256, "control", point["launch_expectation"])["flags"] == []
    assert launch_check(launched(544), 8, 256, "control", point["launch_expectation"])["flags"]


def test_old_releases_without_algorithms_still_check_the_blocks() -> None:
    """2.12 and 2.18 name no algorithm per collective; the candidates of the release apply."""
    for text, threads, ring in ((src.nccl_2_12(nthreads=256), 256, 288), (src.nccl_2_18(nthreads=128), 128, 160)):
        point = point_of(text, {"NCCL_NTHREADS": str(threads)}, ctas=8 if "Min CTAs" in text else None)
        assert ring in point["launch_expectation"]["allowed"]
        assert launch_check(launched(ring, point["channels"]), point["channels"], threads, "control",
                            point["launch_expectation"])["flags"] == []


# -- world size 1: what cannot be known is null with a reason, never a flag -------------------

@pytest.mark.parametrize("name", ["nccl-2.28.9_h100_world1_nthreads256.log",
                                  "nccl-2.28.9_h100_world1_default.log"])
def test_world_size_one_raises_no_false_flag(name: str) -> None:
    text = (DATA / name).read_text()
    env = {"NCCL_NTHREADS": "256", "RCCL_THREADS_PER_BLOCK": "256"} if "256" in name else {}
    start = text.rfind("\n", 0, text.index("Comm config Min CTAs set to 8")) + 1
    point = effective_settings(parse_nccl_log(text[start:]), asked_from_env(env, 8, 8), env,
                               process=parse_nccl_log(text))
    assert point["flags"] == [], point["flags"]
    assert point["threads"] is None and point["threads_reason"].startswith("world size 1")
    assert point["algorithms"] is None and point["algorithms_reason"].startswith("world size 1")
    assert point["launch_expectation"]["allowed"] is None
    checked = launch_check([], point["channels"], 256, "control", point["launch_expectation"])
    assert checked["flags"] == [] and checked["reason"] == "no collective kernel in the sampled steps"


def test_rccl_world_size_one_threads_per_block_unknown_not_flagged() -> None:
    """RCCL reads RCCL_THREADS_PER_BLOCK when it sizes a kernel: at world size 1 it never does."""
    text = src.rccl_rocm7(nranks=1, threads_per_block=None)
    env = {"RCCL_THREADS_PER_BLOCK": "256", "NCCL_NTHREADS": "256"}
    point = point_of(text, env, ctas=None)
    assert point["flags"] == [], point["flags"]
    assert any(n.startswith("unknown whether RCCL_THREADS_PER_BLOCK=256") for n in point["notes"])
