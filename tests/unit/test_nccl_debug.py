"""train.nccl_debug: NCCL's own account of each communicator, read from recorded debug output.

The nccl-2.28.9_h100_* files are real (tests/unit/data/nccl/README.md says how they were made);
what one GPU cannot show (TUNING tables, several ranks, transports, per-collective lines) is
rebuilt from the releases' own format strings (tests/unit/nccl_source_logs.py, src_* files).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import assert_imports_none_of
from tests.unit import nccl_source_logs as src
from train.nccl_debug import (
    Asked,
    asked_from_env,
    capture_env,
    effective_settings,
    knob_warnings,
    parse_nccl_log,
    same_effective,
)

DATA = Path(__file__).parent / "data" / "nccl"
# The recorder's points, in order: default group, then new_group with no CTA setting and with
# min/max CTAs 2/2, 4/4, 8/8, 16/16, 1/64.
CTAS = [(None, None), (None, None), (2, 2), (4, 4), (8, 8), (16, 16), (1, 64)]


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_parser_needs_no_torch() -> None:
    assert_imports_none_of(("torch", "numpy"), "import train.nccl_debug")


def test_real_default_log_channels_follow_ctas() -> None:
    log = parse_nccl_log(read("nccl-2.28.9_h100_world1_default.log"))
    assert log.version == "2.28.9+cuda13.0" and log.vendor == "nccl"
    assert [c.kind for c in log.communicators] == ["init"] + ["split"] * 6
    assert [(c.min_ctas, c.max_ctas) for c in log.communicators] == CTAS
    # Without a CTA request NCCL builds its maximum (64 at world size 1 on an H100).
    assert [c.channels for c in log.communicators] == [64, 64, 2, 4, 8, 16, 64]
    assert all(c.complete and c.destroyed for c in log.communicators)
    # The same address is reused by every split: told apart by their Init START lines.
    assert len({c.comm for c in log.communicators[1:]}) == 1
    assert [c.split_count for c in log.communicators[1:]] == [1, 2, 3, 4, 5, 6]
    assert {c.network for c in log.communicators} == {"Socket"}
    assert log.env == {}
    # World size 1: no TUNING table, no collective lines.
    assert all(not c.max_threads and not c.collectives for c in log.communicators)


def test_real_env_channels_clamp_ctas() -> None:
    log = parse_nccl_log(read("nccl-2.28.9_h100_world1_env-channels4.log"))
    assert log.env == {"NCCL_MAX_NCHANNELS": "4", "NCCL_MIN_NCHANNELS": "4"}
    # CTAs 2/2 are raised to the env's 4; 8/8 and 16/16 pass; 1/64 is held at 4.
    assert [c.channels for c in log.communicators] == [4, 4, 4, 4, 8, 16, 4]


def test_real_nthreads_is_reported_read() -> None:
    log = parse_nccl_log(read("nccl-2.28.9_h100_world1_nthreads256.log"))
    assert log.env == {"NCCL_NTHREADS": "256"}
    assert [c.channels for c in log.communicators] == [64, 64, 2, 4, 8, 16, 64]


def test_effective_settings_flag_a_clamped_point() -> None:
    text = read("nccl-2.28.9_h100_world1_env-channels4.log")
    env = {"NCCL_MIN_NCHANNELS": "4", "NCCL_MAX_NCHANNELS": "4"}
    # Slice the log at the third communicator's request (what a pool point reads).
    start = text.index("Comm config Min CTAs set to 2")
    start = text.rfind("\n", 0, start) + 1
    whole = parse_nccl_log(text)
    point = effective_settings(parse_nccl_log(text[start:]), asked_from_env(env, 2, 2), env,
                               process=whole)
    assert point["channels"] == 4 and point["min_ctas"] == 2 and point["max_ctas"] == 2
    assert any("asked 2, NCCL built 4" in f and "NCCL_MIN_NCHANNELS=4" in f
               for f in point["flags"]), point["flags"]
    matching_start = text.index("Comm config Min CTAs set to 8")
    matching_start = text.rfind("\n", 0, matching_start) + 1
    ok = effective_settings(parse_nccl_log(text[matching_start:]), asked_from_env(env, 8, 8), env,
                            process=whole)
    assert ok["channels"] == 8
    assert ok["flags"] == []
    # Without the process part of the file neither the library nor the variables it read are
    # known: said as unknowns, not flagged as no-ops.
    alone = effective_settings(parse_nccl_log(text[matching_start:]), asked_from_env(env, 8, 8), env)
    assert alone["vendor"] is None and alone["flags"] == []
    assert any(n.startswith("unknown whether NCCL_MIN_NCHANNELS=4 was read") for n in alone["notes"])


def test_no_op_knobs_are_named() -> None:
    log = parse_nccl_log(read("nccl-2.28.9_h100_world1_default.log"))
    env = {"RCCL_THREADS_PER_BLOCK": "512", "NCCL_NTHREADS": "512"}
    warnings = [text for _, text in knob_warnings(env, log, "nccl")]
    assert any(w.startswith("RCCL_THREADS_PER_BLOCK=512 is a no-op") for w in warnings)
    # This process had no NCCL_NTHREADS, so NCCL never said it read one: flagged too.
    assert any(w.startswith("NCCL_NTHREADS=512 was set but NCCL never") for w in warnings)
    read_log = parse_nccl_log(read("nccl-2.28.9_h100_world1_nthreads256.log"))
    assert knob_warnings({"NCCL_NTHREADS": "256"}, read_log, "nccl") == []
    assert knob_warnings(env, parse_nccl_log(""), "nccl") == []  # no capture: no verdict


def test_ib_asked_but_sockets_used_is_flagged() -> None:
    """Rebuilt from NCCL 2.21.5's formats (tests/unit/nccl_source_logs.py): the preset asked
    for InfiniBand, NCCL found no IB device and used sockets."""
    text = src.nccl_2_2x("2.21", network="Socket")
    env = {"NCCL_NTHREADS": "256", "NCCL_IB_DISABLE": "0"}
    start = text.rfind("\n", 0, text.index("Comm config Min CTAs")) + 1
    point = effective_settings(parse_nccl_log(text[start:]), asked_from_env(env, 8, 8), env,
                               process=parse_nccl_log(text))
    assert point["channels"] == 8 and point["max_ctas"] == 8
    assert point["transports"] == ["NET/Socket"] and point["network"] == "Socket"
    assert any("InfiniBand" in f and "Socket" in f for f in point["flags"])
    assert not [f for f in point["flags"] if f.startswith(("channels", "threads"))]
    # The whole file's first communicator is the default group (no collectives of its own).
    whole = parse_nccl_log(text)
    assert effective_settings(whole, asked_from_env(env), env)["channels"] == 32


def test_lines_outside_nccl_format_are_ignored() -> None:
    log = parse_nccl_log("hello\nTraceback (most recent call last):\n  NCCL INFO nope\n")
    assert log.lines == 0 and log.communicators == []
    point = effective_settings(log, Asked(channels=8, threads=None), {})
    assert point["channels"] is None
    assert point["flags"] == ["no communicator in the NCCL debug output: effective settings unknown"]


@pytest.mark.parametrize(("environ", "expected_level", "expected_subsys"), [
    ({}, "INFO", "INIT,ENV,TUNING"),
    ({"NCCL_DEBUG": "WARN"}, "INFO", "INIT,ENV,TUNING"),
    ({"NCCL_DEBUG": "TRACE", "NCCL_DEBUG_SUBSYS": "NET"}, "TRACE", "NET,INIT,ENV,TUNING"),
    ({"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "ALL"}, "INFO", "ALL"),
])
def test_capture_env(environ: dict[str, str], expected_level: str, expected_subsys: str) -> None:
    env = capture_env(environ, "/run/out/nccl_debug_rank_03.log")
    assert env == {"NCCL_DEBUG": expected_level, "NCCL_DEBUG_SUBSYS": expected_subsys,
                   "NCCL_DEBUG_FILE": "/run/out/nccl_debug_rank_03.log"}


def test_same_effective_settings_across_points() -> None:
    points = [
        {"channels": 4, "threads": None, "algorithms": None, "asked": {"channels": 2, "threads": 256}},
        {"channels": 4, "threads": None, "algorithms": None, "asked": {"channels": 4, "threads": 256}},
        {"channels": 8, "threads": None, "algorithms": None, "asked": {"channels": 8, "threads": 256}},
        {"channels": 4, "threads": None, "algorithms": None, "asked": {"channels": 2, "threads": 512}},
        None,
    ]
    assert same_effective(points) == {0: [1]}


def test_rccl_knob_beside_a_read_nccl_nthreads_is_a_note_not_a_flag() -> None:
    """The launch exports both thread variables: under NCCL the RCCL one is a no-op, but the
    point ran with its threads when NCCL read NCCL_NTHREADS with the same value."""
    log = parse_nccl_log(read("nccl-2.28.9_h100_world1_nthreads256.log"))
    same = {"NCCL_NTHREADS": "256", "RCCL_THREADS_PER_BLOCK": "256"}
    point = effective_settings(log, asked_from_env(same), same)
    assert not [f for f in point["flags"] if "RCCL_THREADS_PER_BLOCK" in f]
    assert any(n.startswith("RCCL_THREADS_PER_BLOCK=256 is a no-op") for n in point["notes"])
    other = {"NCCL_NTHREADS": "256", "RCCL_THREADS_PER_BLOCK": "512"}
    assert any("RCCL_THREADS_PER_BLOCK=512" in f
               for f in effective_settings(log, asked_from_env(other), other)["flags"])
