"""PyTorch's flight recorder, dumped on request while a rank is stuck (imports torch lazily).

The recorder keeps the last ``distributed.flight_recorder_entries`` collectives of every group
(sequence number, op, sizes, state: scheduled/started/completed). A hung run is found by the
launch's hang watchdog, which fires before the collective timeout; by then the NCCL watchdog
has not dumped anything yet (TORCH_NCCL_DUMP_ON_TIMEOUT dumps only at the timeout). So each
rank runs a small thread that writes its recorder to ``flight_recorder/rank_XX.json`` when
the trigger file ``flight_recorder/DUMP`` appears in its output directory: the watchdog
creates it on every node before it takes stacks. A rank blocked in a collective still dumps:
torch releases the GIL while it waits.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path

FLIGHT_DIR = "flight_recorder"
TRIGGER_NAME = "DUMP"
POLL_S = 0.5


def flight_recorder_env(environ: Mapping[str, str], entries: int, output_dir: Path,
                        nccl: bool) -> dict[str, str]:
    """Variables that turn the recorder on (before the first group starts); a value the user
    set wins. TORCH_FR_BUFFER_SIZE is the current name, TORCH_NCCL_TRACE_BUFFER_SIZE the one
    ProcessGroupNCCL reads in older torch."""
    env: dict[str, str] = {}
    if entries <= 0:
        return env
    if "TORCH_FR_BUFFER_SIZE" not in environ and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in environ:
        env["TORCH_FR_BUFFER_SIZE"] = str(entries)
        if nccl:
            # ProcessGroupNCCL of torch 2.11 reads only the old name (recorded on the H100: no
            # entries with TORCH_FR_BUFFER_SIZE alone); newer torch reads it with a warning.
            env["TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(entries)
    if nccl:
        # At the collective timeout torch's own watchdog dumps too, into the same directory.
        env.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", environ.get("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"))
        env.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", environ.get(
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(output_dir / FLIGHT_DIR / "torch_timeout_rank_")))
    return env


def dump_json() -> str:
    """This process's flight recorder as JSON text (torch's own format)."""
    import torch._C._distributed_c10d as c10d

    # ProcessGroupNCCL's recorder first where the build has one: on the H100 (torch 2.11) the
    # generic _dump_fr_trace_json held no entries of an NCCL group (not yet verified otherwise).
    for name in ("_dump_nccl_trace_json", "_dump_fr_trace_json"):
        fn = getattr(c10d, name, None)
        if fn is not None:
            raw = fn()
            return raw.decode() if isinstance(raw, bytes) else str(raw)
    raise RuntimeError("this torch build has no flight recorder dump")


class FlightDumper:
    """Writes rank_XX.json each time the trigger file changes (a daemon thread)."""

    def __init__(self, output_dir: Path, rank: int) -> None:
        self.dir = output_dir / FLIGHT_DIR
        self.rank = rank
        self._stop = threading.Event()
        self._seen: float | None = None
        self._thread = threading.Thread(target=self._loop, name="flight-recorder", daemon=True)

    def start(self) -> FlightDumper:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        trigger = self.dir / TRIGGER_NAME
        while not self._stop.wait(POLL_S):
            try:
                stamp = trigger.stat().st_mtime
            except OSError:
                continue
            if stamp != self._seen:
                self._seen = stamp
                self.dump()

    def dump(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank_{self.rank:02d}.json"
        try:
            text = dump_json()
        except Exception as exc:  # noqa: BLE001 - a missing dump is said, never fatal
            text = json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]})
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
        return path
