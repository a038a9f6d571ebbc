"""Did each --axis value reach the library? A point's axis values against what NCCL/RCCL reported:
the variables it read (`NAME set by environment to VALUE`) and the algorithm/protocol of each
data collective (TUNING lines), both from summary.json's effective_settings (train/nccl_debug.py).

A contradiction (NCCL_PROTO=LL128 asked, the collectives ran SIMPLE; the library read another
value) flags the point, so the decision never chooses it. A variable the library never reported
reading flags the point where ranks talked to each other (world size > 1: a no-op axis measures
nothing); at world size 1 NCCL selects no algorithm at all, which the point's notes say.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.lib.knobs import effective_mismatch
from tasks.lib.report.point import PointRow
from tasks.lib.report.values import _get


LIBRARY_PREFIXES = ("NCCL_", "RCCL_")


def check_axes(row: PointRow, summary: Mapping[str, Any] | None) -> None:
    """Fills row.effective_env and adds the flags and notes of the row's axis values."""
    effective = _get(summary, "effective_settings")
    if not row.settings or not isinstance(effective, Mapping) or effective.get("capture") != "on":
        return
    used = [str(u) for u in effective.get("algorithms") or [] if isinstance(u, str)]
    env_read = effective.get("env_read") if isinstance(effective.get("env_read"), Mapping) else {}
    for name, value in row.settings.items():
        read = env_read.get(name)
        if isinstance(read, str):
            row.effective_env[name] = read
        mismatch = effective_mismatch(name, value, used)
        if mismatch:
            _flag(row, mismatch)
        elif isinstance(read, str) and read != value:
            _flag(row, f"{name}={value} asked, but the library reported reading {name}={read}")
        elif read is None and name.startswith(LIBRARY_PREFIXES) and env_read:
            if (row.world_size or 0) > 1:
                _flag(row, f"{name}={value} was set but the library never reported reading it (no 'set "
                           "by environment' line): treat the axis as a no-op")
            else:
                row.notes.append(f"{name}={value}: not reported read (world size 1: NCCL chooses no "
                                 "algorithm or protocol for one rank)")
        if name in ("NCCL_ALGO", "NCCL_PROTO") and not used:
            row.notes.append(f"{name}={value}: no per-collective TUNING line to read the algorithm and "
                             "protocol from (they need more than one rank and NCCL_DEBUG_SUBSYS TUNING)")


def _flag(row: PointRow, text: str) -> None:
    row.settings_flags.append(text)
    row.settings_flag = True
