"""Output files: rank_XX_metrics.jsonl and summary.json (no torch).

A second run into the same output directory is refused (never appended, never rotated): the
directory is checked before any process group starts, and files are created with O_EXCL.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from train.config import ConfigError

SUMMARY_NAME = "summary.json"
COLLECTIVES_NAME = "collectives.jsonl"  # rank 0, at the end: every collective across ranks
PROFILER_DIR = "torch_profiler"


def say(message: str, stream: TextIO | None = None) -> None:
    """One console line, in one write. A node's ranks share one log file; print() writes the
    text and its newline separately where Python is unbuffered (PYTHONUNBUFFERED=1, set in our
    images and in many CI runners), and another rank's line then lands between the two: the
    controller would read a peer's failure glued to this rank's banner."""
    stream = stream if stream is not None else sys.stdout
    stream.write(message + "\n")
    stream.flush()


def metrics_name(rank: int) -> str:
    return f"rank_{rank:02d}_metrics.jsonl"


def earlier_run_files(output_dir: Path) -> list[str]:
    """Names of files an earlier run left in output_dir (empty when it is free to use)."""
    if not output_dir.is_dir():
        return []
    found = sorted(p.name for p in output_dir.glob("rank_*_metrics.jsonl"))
    if (output_dir / SUMMARY_NAME).exists():
        found.append(SUMMARY_NAME)
    return found


def check_output_dir(output_dir: str | Path, source: str) -> None:
    """Raises ConfigError when output_dir holds an earlier run's results or is not a directory."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{source}: training.output_dir {path} exists and is not a directory")
    found = earlier_run_files(path)
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(
            f"{source}: training.output_dir {path} already holds an earlier run's results "
            f"({shown}); pass a new one (--override training.output_dir=DIR) or remove them"
        )


class MetricsWriter:
    """One JSON object per line, flushed after every line so a crash loses at most one."""

    def __init__(self, output_dir: Path, rank: int) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / metrics_name(rank)
        self._file: TextIO | None = open(self.path, "x", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_atomic(path: Path, write: Any) -> None:
    """Writes through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    def write(f: TextIO) -> None:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")

    _write_atomic(path, write)


def write_jsonl_atomic(path: Path, lines: Iterable[Any]) -> None:
    def write(f: TextIO) -> None:
        for line in lines:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")

    _write_atomic(path, write)
