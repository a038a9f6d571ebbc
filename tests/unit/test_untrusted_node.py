"""What a node sends back is its own word: names from it never become paths outside our
directories, and the values the launch marks secret are not kept in what it reports."""
from __future__ import annotations

import os

import pytest

from tasks.run.diagnosing import write_diagnostics
from tasks.lib.diagnostics import NodeReport, build_summary, dump_file_name
from tasks.lib.diagnostics_node import keep_env


def snapshot(root) -> dict[str, tuple[int, int]]:
    return {os.path.join(d, n): (os.lstat(os.path.join(d, n)).st_mode,
                                 os.lstat(os.path.join(d, n)).st_size)
            for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.mark.parametrize("proc", [
    {"pid": "1/../../../../escape", "role": "rank", "rank": None, "state": "S"},
    {"pid": 7, "role": "../../escape", "state": "S"},
    {"pid": 7, "role": "/abs", "state": "S"},
    {"pid": "..", "role": "..", "state": "S"},
    {"pid": 7, "rank": "3/../../x", "role": "torchrun", "state": "S"},
    {"pid": 7, "role": "a\nb\tc", "state": "S"},
])
def test_dump_file_names_are_plain_whatever_the_node_reports(proc):
    name = dump_file_name(proc)
    assert "/" not in name and name not in (".", "..") and name.isprintable()
    assert name.startswith("pyspy_") and name.endswith(".txt")


def test_a_hostile_diagnostics_report_writes_only_under_its_directory(tmp_path):
    dest = tmp_path / "run" / "hang"
    hostile = {"pid": "1/../../../../../escape", "role": "../../../escape2", "rank": None,
               "state": "S", "cmdline": ["x"], "stack": {"ok": True, "command": ["py-spy"],
                                                          "text": "frames"}}
    report = NodeReport(0, "h", {"processes": [hostile], "gpu": [], "log_tail": {}})
    (tmp_path / "run").mkdir()
    outside = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(str(dest))}
    write_diagnostics(dest, [report], build_summary("r", "hang", [report], 0.0))
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(str(dest))} == outside
    dumps = [p.name for p in (dest / "node_0").iterdir() if p.name.startswith("pyspy_")]
    assert len(dumps) == 1 and (dest / "node_0" / dumps[0]).read_text().endswith("frames")


def test_diagnostics_keep_no_value_the_launch_marked_secret():
    env = {"NCCL_DEBUG": "INFO", "GEMM_API_TOKEN": "s3cret", "NCCL_IB_KEY": "k",
           "GEMM_MASKED_VARS": "GEMM_API_TOKEN NCCL_IB_KEY", "HOME": "/root"}
    kept = keep_env(env)
    assert kept["NCCL_DEBUG"] == "INFO"
    assert kept["GEMM_API_TOKEN"] == "***" and kept["NCCL_IB_KEY"] == "***"
    assert "s3cret" not in repr(kept) and "HOME" not in kept
