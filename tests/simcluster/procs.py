"""Processes by pid: identity (pid + start time, so a reused pid is never killed), liveness,
namespace membership. Nothing here finds a process by its name."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessId:
    """A pid plus its start time (clock ticks since boot): unique for the machine's uptime."""

    pid: int
    start: int

    def to_json(self) -> list[int]:
        return [self.pid, self.start]

    @classmethod
    def from_json(cls, value: list[int]) -> "ProcessId":
        return cls(int(value[0]), int(value[1]))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def process_id(pid: int) -> ProcessId:
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(f"no process {pid}")
    return ProcessId(pid, int(fields[19]))


def is_running(proc: ProcessId) -> bool:
    """True while the very process recorded runs (a zombie or a reused pid counts as gone)."""
    fields = _stat_fields(proc.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == proc.start


def kill(proc: ProcessId, sig: int = signal.SIGKILL) -> bool:
    if not is_running(proc):
        return False
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(procs: list[ProcessId], timeout: float) -> list[ProcessId]:
    """Polls until none runs; returns those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if is_running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def namespace_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(PROC / str(pid) / "ns" / kind).st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def pids_in_namespace(kind: str, inode: int) -> list[int]:
    """Every process in the namespace with this inode (e.g. all processes of one node)."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and namespace_inode(int(entry.name), kind) == inode:
            found.append(int(entry.name))
    return found


def host_pid(namespace_pid: int, pid_ns_inode: int) -> int | None:
    """The host pid of the process known as `namespace_pid` inside a pid namespace."""
    for pid in pids_in_namespace("pid", pid_ns_inode):
        try:
            status = (PROC / str(pid) / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) >= 2 and int(ids[-1]) == namespace_pid:
                    return pid
    return None
