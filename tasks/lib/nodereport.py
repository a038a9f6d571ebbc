"""A node's diagnostics report (tasks/lib/diagnostics_node.py's JSON), checked before use.

The report is the node's word: the hang watchdog reads it between "no rank advanced" and the
stop of the run, so a rank that is not a number, a pid that is a list or a megabyte-long state
must not raise there (the hung run would stay alive). `clean_node_report` keeps what the
collector documents, in the types it documents, bounded in size; every process that cannot be
read is dropped and named in the problems it returns.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.lib.untrusted import finite_number, int_text, plain_int, short_text

MAX_PROCESSES = 4096
MAX_LIST_ITEMS = 1000
MAX_VALUE_CHARS = 4096
MAX_STACK_CHARS = 1024 * 1024     # the collector sends at most MAX_DUMP_CHARS of a dump
MAX_OUTPUT_CHARS = 256 * 1024     # a GPU tool's output


def _text(value: Any, max_chars: int = MAX_VALUE_CHARS) -> str | None:
    return short_text(value, max_chars)


def _texts(value: Any, max_chars: int = MAX_VALUE_CHARS) -> list[str]:
    if not isinstance(value, list):
        return []
    return [t for t in (_text(v, max_chars) for v in value[:MAX_LIST_ITEMS]) if t is not None]


def _count(value: Any) -> int | None:
    number = plain_int(value)
    return number if number is not None and number >= 0 else None


def _stack(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        return None
    ok = value.get("ok") is True
    text = _text(value.get("text"), MAX_STACK_CHARS) or ""
    command = _texts(value.get("command"))
    return {"ok": ok and bool(command) and bool(text), "command": command, "text": text,
            "errors": _texts(value.get("errors"))}


def clean_process(proc: Any) -> dict[str, Any] | None:
    """One process of the report in the collector's types, or None (no usable pid)."""
    if not isinstance(proc, Mapping):
        return None
    pid = _count(proc.get("pid"))
    if not pid:
        return None
    env = proc.get("env")
    clean = {
        "pid": pid,
        "ns_pid": _count(proc.get("ns_pid")),
        "ppid": _count(proc.get("ppid")),
        "pgrp": _count(proc.get("pgrp")),
        "session": _count(proc.get("session")),
        "state": _text(proc.get("state"), 8) or "?",
        "comm": _text(proc.get("comm"), 64),
        "exe": _text(proc.get("exe")),
        "cmdline": _texts(proc.get("cmdline")),
        "env": {k: v for k, v in list(env.items())[:MAX_LIST_ITEMS]
                if _text(k, 256) == k and _text(v) == v} if isinstance(env, Mapping) else {},
        "matched_by": _text(proc.get("matched_by"), 32),
        "python": proc.get("python") is True,
        "role": _text(proc.get("role"), 32) or "?",
        "rank": _count(proc.get("rank")),
    }
    stack = _stack(proc.get("stack"))
    if stack is not None:
        clean["stack"] = stack
    # The start-up watch's poll ("phases" mode) adds what the process's TCP sockets say.
    if "store" in proc:
        clean["store"] = _text(proc.get("store"), 16)
    for key in ("peers", "listening"):
        if key in proc:
            clean[key] = _count(proc.get(key))
    if "ports" in proc:
        clean["ports"] = _texts(proc.get("ports"), 64)[:64]
    return clean


def _progress(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        return {}
    progress = {}
    for rank, entry in list(value.items())[:MAX_PROCESSES]:
        number = int_text(rank)
        if number is None or number < 0 or not isinstance(entry, Mapping):
            continue
        progress[str(number)] = {"lines": _count(entry.get("lines")), "step": _count(entry.get("step")),
                                 "mtime": finite_number(entry.get("mtime"))}
    return progress


def _gpu(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    commands = []
    for entry in value[:16]:
        if isinstance(entry, Mapping):
            commands.append({"argv": _texts(entry.get("argv")), "rc": plain_int(entry.get("rc")),
                             "stdout": _text(entry.get("stdout"), MAX_OUTPUT_CHARS) or "",
                             "stderr": _text(entry.get("stderr"), MAX_OUTPUT_CHARS) or "",
                             "seconds": finite_number(entry.get("seconds"))})
    return commands


def _log_tail(value: Any) -> dict[str, Any]:
    value = value if isinstance(value, Mapping) else {}
    return {"path": _text(value.get("path")), "lines": _texts(value.get("lines")),
            "error": _text(value.get("error"))}


def clean_node_report(data: Any, *, nested: bool = False) -> tuple[dict[str, Any], list[str]]:
    """(the report in the collector's types, what was dropped and why)."""
    if not isinstance(data, Mapping):
        return {}, ["the diagnostics report is not a JSON object"]
    problems: list[str] = []
    raw = data.get("processes")
    raw = raw if isinstance(raw, list) else []
    processes = [p for p in (clean_process(p) for p in raw[:MAX_PROCESSES]) if p is not None]
    if len(processes) < len(raw):
        problems.append(f"{len(raw) - len(processes)} of {len(raw)} process entries unreadable "
                        f"(no usable pid, or beyond the first {MAX_PROCESSES})")
    cleaners = {
        "format": plain_int(data.get("format")),
        "hostname": _text(data.get("hostname"), 256),
        "collected_at": finite_number(data.get("collected_at")),
        "run_id": _text(data.get("run_id"), 256),
        "node_rank": _count(data.get("node_rank")),
        "uid": _count(data.get("uid")),
        "inside_container": data.get("inside_container") is True,
        "container": _text(data.get("container"), 256),
        "pyspy": _text(data.get("pyspy")),
        "processes": processes,
        "unreadable_environments": _texts(data.get("unreadable_environments")),
        "gpu": _gpu(data.get("gpu")),
        "log_tail": _log_tail(data.get("log_tail")),
        "progress": _progress(data.get("progress")),
        "mode": _text(data.get("mode"), 16),
    }
    # Only what the node sent: a key it left out stays out (readers default it).
    report: dict[str, Any] = {key: value for key, value in cleaners.items() if key in data}
    registry = data.get("registry")
    if isinstance(registry, list):
        report["registry"] = [
            {"dir": _text(e.get("dir")), "state": _text(e.get("state"), 64),
             "ids": {k: v for k, v in list(e["ids"].items())[:16] if _text(k, 64) == k
                     and _count(v) is not None} if isinstance(e.get("ids"), Mapping) else {}}
            for e in registry[:64] if isinstance(e, Mapping)]
    if not nested:
        if "container_report" in data:
            inner, inner_problems = clean_node_report(data.get("container_report"), nested=True)
            report["container_report"] = inner
            problems += [f"container: {p}" for p in inner_problems]
        if (error := _text(data.get("container_error"))) is not None:
            report["container_error"] = error
    return report, problems


__all__ = ["clean_node_report", "clean_process"]
