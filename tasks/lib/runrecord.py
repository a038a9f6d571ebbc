"""run.json: what a launch decided, where it ran, and how each node ended.

Written into the controller's run directory at each stage (rendered, started, ended) and pushed
with the bundle, so any controller (and `fab report`, `fab collect`) can read it back. Pure: the
record is plain dataclasses turned into JSON; no files, no network.

Schema (version 1), top level:
  schema, run_id, status (rendered|running|detached|succeeded|failed|stopped|hung),
  exit_status (the launch's own exit code, null until it ends), created_at, started_at, ended_at,
  controller {host, user, cwd, commit}, run_dir (controller), node_run_dir, output_dir (name of
  <T>thread_<C>channels), flags (RunSpec.flags_record: values and their sources),
  master {addr, port}, nnodes, nproc_per_node, world_size,
  env {common: {...}, per_node: [{...} per node rank]}, torchrun_argv, wrapper_argv,
  nodes [{node_rank, host, hostname, address, ifname, gpus, gpu_names, commit, branch, ranks,
          launcher_pid, state, exit_code, started_at, ended_at, steps_done, steps_total, log,
          collected, collect_error, collect_refused}],
  first_failure {node_rank, host, ranks, exit_code, reason, at, last_lines, basis, evidence,
    consequences} | null (a push or start failure: reason "<phase> failed on node N (host)",
    last_lines one line per host; a rank's failure: the rank the others waited for, basis and
    evidence say why (tasks/lib/blame.py), consequences the waiting ranks' errors),
  headline {metric: value} (from summary.json, when there is one),
  timings {phase: seconds} (validate, probe, rendezvous, busy_check, render, push, start, watch,
    collect, finish (flight-recorder dumps, the headline, run.json), report (results.csv,
    report.md, plots)),
  hang {first_stalled_ranks, basis, suspect_ranks, rank_steps, stalled_for_s, timeout_s,
        detected_at, diagnostics, startup} | null (when the watchdog stopped a run that made no
    progress; startup: the start-up watch's record when it was stuck before its first step:
    rule, phase, missing, ranks, nodes, limit_s, waited_s, detail, headline, phases).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.lib.blame import WaitSign, is_error_line, line_rank, waiting_sign
from tasks.lib.localfs import name_problem, shown_name
from tasks.lib.quoting import sh_quote
from tasks.lib.untrusted import finite_number, plain_int, short_text
from tasks.lib.watchdog import STEP_LINE

SCHEMA_VERSION = 1
RUN_JSON = "run.json"
LAST_LINES = 20
# Node states that mean the launcher is gone and will not write again.
FINAL_NODE_STATES = ("exited", "stopped", "killed", "lost")


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path`, atomically: a reader or a Ctrl-C never sees half a
    file (written beside it as .NAME.tmp, then renamed over it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


class RunRecordError(ValueError):
    """run.json that cannot be read back (wrong schema, not JSON)."""


@dataclass
class NodeRecord:
    node_rank: int
    host: str
    ranks: list[int]
    hostname: str | None = None
    address: str | None = None
    ifname: str | None = None
    gpus: int | None = None
    gpu_names: list[str] = field(default_factory=list)
    commit: str | None = None
    branch: str | None = None
    launcher_pid: int | None = None
    state: str = "pending"       # pending | starting | running | exited | stopped | killed | lost
    exit_code: int | None = None
    started_at: str | None = None
    ended_at: str | None = None
    steps_done: int | None = None
    steps_total: int | None = None
    log: str | None = None        # controller log file, relative to the run dir
    collected: dict[str, int] | None = None  # {"files", "bytes", "skipped", "refused"}
    collect_error: str | None = None  # why this node's outputs could not be collected
    # Entries of its output directory not copied ("'name' (why)"): not regular files, or names
    # that are no plain relative path.
    collect_refused: list[str] = field(default_factory=list)


@dataclass
class Failure:
    node_rank: int
    host: str
    ranks: list[int]
    exit_code: int | None
    reason: str
    at: str
    last_lines: list[str]
    # Why this rank is blamed (tasks/lib/blame.py: own failure, store keys, peer address, ...),
    # what shows it, and the errors of the ranks that failed waiting for it.
    basis: str | None = None
    evidence: list[str] = field(default_factory=list)
    consequences: list[str] = field(default_factory=list)


@dataclass
class RunRecord:
    run_id: str
    run_dir: str
    node_run_dir: str
    output_dir: str
    created_at: str
    controller: dict[str, Any]
    flags: dict[str, Any]
    schema: int = SCHEMA_VERSION
    status: str = "rendered"
    exit_status: int | None = None
    started_at: str | None = None
    ended_at: str | None = None
    master: dict[str, Any] = field(default_factory=dict)
    nnodes: int = 0
    nproc_per_node: int = 0
    world_size: int = 0
    env: dict[str, Any] = field(default_factory=lambda: {"common": {}, "per_node": []})
    torchrun_argv: list[str] = field(default_factory=list)
    wrapper_argv: list[str] | None = None
    nodes: list[NodeRecord] = field(default_factory=list)
    first_failure: Failure | None = None
    headline: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # launch phases, seconds
    hang: dict[str, Any] | None = None  # the hang watchdog's record (tasks.lib.diagnostics)

    # -- building -------------------------------------------------------------------------------

    def plan(
        self,
        *,
        master_addr: str,
        master_port: int | str,
        nproc_per_node: int,
        hosts: Sequence[Mapping[str, Any]],
        common_env: Mapping[str, str],
        per_node_env: Sequence[Mapping[str, str]],
        torchrun_argv: Sequence[str],
        wrapper_argv: Sequence[str] | None,
    ) -> None:
        """Fill in the placement: hosts[i] holds host (label) and the probe's facts for node i."""
        self.master = {"addr": master_addr, "port": master_port}
        self.nnodes = len(hosts)
        self.nproc_per_node = nproc_per_node
        self.world_size = self.nnodes * nproc_per_node
        self.env = {"common": dict(common_env), "per_node": [dict(env) for env in per_node_env]}
        self.torchrun_argv = list(torchrun_argv)
        self.wrapper_argv = list(wrapper_argv) if wrapper_argv else None
        known = {f.name for f in fields(NodeRecord)}
        self.nodes = [
            NodeRecord(node_rank=rank, ranks=global_ranks(rank, nproc_per_node),
                       **{key: value for key, value in host.items() if key in known})
            for rank, host in enumerate(hosts)
        ]

    def node(self, node_rank: int) -> NodeRecord:
        return self.nodes[node_rank]

    def mark_started(self, node_rank: int, launcher_pid: int | None, at: str) -> None:
        node = self.node(node_rank)
        node.launcher_pid = launcher_pid
        node.state = "running"
        node.started_at = at
        if self.started_at is None:
            self.started_at = at
        self.status = "running"

    def mark_node_ended(self, node_rank: int, *, state: str, exit_code: int | None,
                        at: str) -> None:
        node = self.node(node_rank)
        if node.state in FINAL_NODE_STATES:
            return  # the first ending seen is the one that happened
        node.state = state
        node.exit_code = exit_code
        node.ended_at = at

    def record_failure(self, node_rank: int, *, reason: str, exit_code: int | None, at: str,
                       last_lines: Iterable[str]) -> bool:
        """Keep the first failure only; True when this one is it."""
        if self.first_failure is not None:
            return False
        node = self.node(node_rank)
        self.first_failure = Failure(node_rank=node_rank, host=node.host, ranks=list(node.ranks),
                                     exit_code=exit_code, reason=reason, at=at,
                                     last_lines=list(last_lines)[-LAST_LINES:])
        return True

    def record_phase_failure(self, phase: str, host_errors: Mapping[int, str], *, at: str,
                             detail: str = "") -> bool:
        """A launch phase (push, start) failed before any rank ran: first_failure names the
        phase, its first failing node, and one line per failing host in last_lines. Without
        per-host errors (the controller itself failed) it is pinned on node 0, with `detail`."""
        if self.first_failure is not None:
            return False
        lines = [f"node {rank} ({self.node(rank).host}): {error}"
                 for rank, error in sorted(host_errors.items())]
        rank = min(host_errors) if host_errors else 0
        if host_errors:
            hosts = ", ".join(f"node {r} ({self.node(r).host})" for r in sorted(host_errors))
            reason = f"{phase} failed on {hosts}"
        else:
            reason = f"{phase} failed: {detail}" if detail else f"{phase} failed"
        self.first_failure = Failure(node_rank=rank, host=self.node(rank).host if self.nodes else "",
                                     ranks=[], exit_code=None, reason=reason, at=at,
                                     last_lines=lines)
        return True

    def finish(self, *, status: str, exit_status: int, at: str) -> None:
        self.status = status
        self.exit_status = exit_status
        self.ended_at = at

    # -- reading --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema": data.pop("schema"), "run_id": data.pop("run_id"),
                "status": data.pop("status"), **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        if not isinstance(data, Mapping) or data.get("schema") != SCHEMA_VERSION:
            found = data.get("schema") if isinstance(data, Mapping) else type(data).__name__
            raise RunRecordError(f"run.json schema {found!r} is not {SCHEMA_VERSION}")
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["nodes"] = [NodeRecord(**_known(NodeRecord, n)) for n in data.get("nodes", [])]
        failure = data.get("first_failure")
        values["first_failure"] = Failure(**_known(Failure, failure)) if failure else None
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RunRecordError(f"run.json is not JSON: {err}") from None
        return cls.from_dict(data)


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


def new_record(*, run_id: str, run_dir: str, node_run_dir: str, output_dir: str,
               controller: Mapping[str, Any], flags: Mapping[str, Any],
               created_at: str) -> RunRecord:
    return RunRecord(run_id=run_id, run_dir=run_dir, node_run_dir=node_run_dir,
                     output_dir=output_dir, created_at=created_at, controller=dict(controller),
                     flags=dict(flags))


# -- helpers --------------------------------------------------------------------------------------

def global_ranks(node_rank: int, nproc_per_node: int) -> list[int]:
    """torchrun's static rendezvous numbers ranks node by node."""
    return list(range(node_rank * nproc_per_node, (node_rank + 1) * nproc_per_node))


def now_iso(when: datetime | None = None) -> str:
    moment = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds")


def parse_progress(line: str) -> tuple[int, int] | None:
    """(done, total) from a train progress line ("step 12/100 | iter ..."); the one `step N/M`
    pattern is the hang watchdog's, which also reads the rank prefix."""
    match = STEP_LINE.search(line)
    return (int(match.group("step")), int(match.group("total"))) if match else None


def last_progress(block: str) -> tuple[int, int] | None:
    """parse_progress of the last progress line in a block of lines ("\\n"-joined), found
    from the end with str.rfind: a block of ten thousand lines costs no Python loop over them."""
    end = len(block)
    while end > 0:
        found = max(block.rfind(word, 0, end) for word in ("step", "Step", "STEP"))
        if found < 0:
            return None
        start = block.rfind("\n", 0, found) + 1
        stop = block.find("\n", found)
        if (progress := parse_progress(block[start:stop if stop >= 0 else len(block)])):
            return progress
        end = start
    return None


def exit_reason(state: str, exit_code: int | None) -> str:
    """One phrase for how a node ended."""
    if state == "lost":
        return "the node stopped answering (host down or network lost)"
    if exit_code is None:
        return f"launcher {state} without an exit code"
    if exit_code > 128:
        return f"exited {exit_code} (signal {exit_code - 128})"
    if exit_code < 0:
        return f"killed by signal {-exit_code}"
    return f"exited {exit_code}"


HEADLINE_METRICS: tuple[tuple[str, str], ...] = (
    ("iter_ms", "iter ms"),
    ("compute_ms", "compute ms"),
    ("comm_ms", "comm ms"),
    ("exposed_comm_ms", "exposed comm ms"),
    ("overlap_fraction", "overlap"),
    ("gemm_tflops", "GEMM TFLOP/s"),
    ("stream_busbw_gbps", "busbw GB/s (stream events)"),
    ("kernel_busbw_gbps", "busbw GB/s (kernel-active)"),
    ("contention_slowdown", "contention slowdown"),
)


def headline_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Medians of the summary's aggregates, plus status and step counts, for the final table."""
    # summary.json comes from a node: only values of the expected kinds are kept (a string
    # where a number belongs must not break the table, nor a 4000-digit integer a float()).
    headline: dict[str, Any] = {
        "status": short_text(summary.get("status"), 40),
        "world_size": plain_int(summary.get("world_size")),
        "backend": short_text(summary.get("backend"), 40),
        "steps_completed": plain_int(summary.get("steps_completed")),
        "steps_per_s": finite_number(summary.get("steps_per_s")),
    }
    for key, _ in HEADLINE_METRICS:
        value = summary.get(key)
        headline[key] = finite_number(value.get("median")) if isinstance(value, Mapping) else None
    return headline


# -- failure evidence in the nodes' output -------------------------------------------------------

# ASCII digits, bounded: a node's line is its own word ("\d" also takes "٣", and int() of a
# 5000-digit number raises).
_AGENT_FAILED = re.compile(r"failed \(exitcode: (-?[0-9]{1,9})\) local_rank: ([0-9]{1,9})\b")
_AGENT_CLOSING = re.compile(r"Sending process [0-9]+ closing signal")
AGENT_DEATH_SIGNAL = re.compile(r"Received \S+ death signal")
_RANK_FAILED = re.compile(r"train: rank ([0-9]{1,9}) failed: (.*)")
# A block of lines without any of these holds no failure sign: the watcher looks at lines one by
# one only when one is in it (str's search runs at memory speed; classify_line costs ~2 us a
# line, and a verbose node sends ~500 000 lines a second). A superset of what classify_line
# matches, a Python exception's last line ("...Error: ", "...Exception: ") included: keep it one.
FAILURE_HINTS = ("failed (exitcode: ", "closing signal", "death signal", "train: rank ",
                 "Error: ", "Exception: ")


@dataclass
class Evidence:
    """A sign that something failed on a node, as seen by the controller."""

    node_rank: int
    at: float                  # monotonic
    # rank-signal | rank-exit | agent-stopping | rank-error | rank-waiting (failed waiting for a
    # peer: tasks/lib/blame.py) | node-exit | lost
    kind: str
    rank: int | None
    exit_code: int | None
    line: str
    waits: WaitSign | None = None


def classify_line(line: str, node_rank: int, nproc: int, at: float,
                  stopping_from_outside: bool, world_size: int | None = None) -> Evidence | None:
    """Failure signs in torchrun's and train's output.

    torchrun's agent logs "Sending process N closing signal" as soon as a local rank died (it then
    waits for the others, up to 30 s) and "failed (exitcode: X) local_rank: L" after; the same
    closing lines follow "Received SIGTERM death signal" when the node was told to stop, which
    is not a failure of its own. A rank's error that says it was waiting for a peer (a store
    key, a closed pair, a collective timeout) is "rank-waiting": a consequence, whose cause
    tasks/lib/blame.py looks for. Error lines without a rank (a traceback's last line) are
    returned with rank None: context for the blame, not a failure sign by themselves.
    """
    if stopping_from_outside:
        return None
    if (match := _AGENT_FAILED.search(line)):
        code, local_rank = int(match.group(1)), int(match.group(2))
        return Evidence(node_rank, at, "rank-signal" if code < 0 else "rank-exit",
                        node_rank * nproc + local_rank, code, line)
    if _AGENT_CLOSING.search(line):
        return Evidence(node_rank, at, "agent-stopping", None, None, line)
    # train's own failure line counts wherever it sits in the line (after a node's escape
    # sequences, say); other error lines only at its start, as Python prints an exception.
    if not is_error_line(line) and not _RANK_FAILED.search(line):
        return None
    rank = line_rank(line)
    waits = waiting_sign(line, world_size or 1 << 30)
    if waits is not None:
        return Evidence(node_rank, at, "rank-waiting", rank, None, line, waits)
    if (match := _RANK_FAILED.search(line)):
        return Evidence(node_rank, at, "rank-error", int(match.group(1)), None, line)
    if rank is not None:
        return Evidence(node_rank, at, "rank-error", rank, None, line)
    return None


def is_failure_sign(evidence: Evidence) -> bool:
    """Whether this evidence alone says the run failed (a waiting error without a rank is a
    traceback's last line: context for the blame, which its rank's own line or torchrun's
    report of the exit will confirm)."""
    return not (evidence.kind == "rank-waiting" and evidence.rank is None)


def choose_first_failure(evidence: Sequence[Evidence]) -> Evidence:
    """The culprit among near-simultaneous failures: a rank killed by a signal did not die because
    of a peer (peers raise errors, they are not signalled), so it wins; otherwise the earliest."""
    signalled = [e for e in evidence if e.kind == "rank-signal"]
    first = min(signalled or evidence, key=lambda e: e.at)
    if first.kind == "agent-stopping":
        # torchrun's agent starts closing the node's ranks as soon as one exited, and names it
        # ("failed (exitcode: 1) local_rank: L") only once they are closed: that one is the
        # culprit (a program without our `train: rank N failed` lines has no earlier name).
        named = [e for e in evidence if e.node_rank == first.node_rank and e.kind == "rank-exit"]
        if named:
            return min(named, key=lambda e: e.at)
    return first


def failure_reason(culprit: Evidence) -> str:
    """run.json's first_failure.reason for the evidence chosen as the culprit."""
    if culprit.kind in ("lost", "node-exit"):
        return culprit.line
    if culprit.kind == "rank-signal" and culprit.exit_code is not None:
        return f"rank {culprit.rank} killed by signal {-culprit.exit_code}"
    if culprit.rank is not None:
        return f"rank {culprit.rank} failed"
    return "a rank failed (torchrun is stopping the node's ranks)"


# -- collection -----------------------------------------------------------------------------------

# Entries "<type> <size> <path>" separated by NUL, the one byte no file name can hold: a name
# with a newline or a tab cannot pose as another entry. Directories are left out (their files
# are listed); anything else that is not a regular file is listed so that it can be refused.
_LIST_FORMAT = "%y %s %P\\0"


def list_files_command(directory: str) -> str:
    """Type, size and relative path of everything but directories under `directory` (not
    following symlinks); a missing directory (or one that cannot be read) exits non-zero
    saying so, never "no files"."""
    quoted = sh_quote(directory)
    return (f"if [ -d {quoted} ]; then find {quoted} -mindepth 1 ! -type d "
            f"-printf '{_LIST_FORMAT}'; "
            f"else echo {sh_quote(f'no output directory {directory}')} >&2; exit 3; fi")


@dataclass
class FileListing:
    """What a node listed: the regular files to copy (size, relative path), and every entry
    refused, as (name as it may be shown, why)."""

    files: list[tuple[int, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def parse_file_list(text: str) -> FileListing:
    """The node's listing (list_files_command's output, or whatever a hostile node sent):
    only regular files whose names are plain relative paths are kept."""
    listing = FileListing()
    for entry in text.split("\0"):
        if not entry.strip():
            continue
        kind, _, rest = entry.partition(" ")
        size, _, path = rest.partition(" ")
        if len(kind) != 1 or not size.isdigit() or not path:
            listing.refused.append((shown_name(entry), "not a listing entry"))
            continue
        problem = name_problem(path)
        if problem is None and kind != "f":
            problem = "a symlink" if kind == "l" else f"not a regular file (type {kind})"
        if problem:
            listing.refused.append((shown_name(path), problem))
        else:
            listing.files.append((int(size), path))
    return listing


def refusal_line(refused: Sequence[tuple[str, str]], shown: int = 5) -> str:
    """One line naming what a node's listing had that was not copied."""
    names = ", ".join(f"{name} ({why})" for name, why in refused[:shown])
    more = f", and {len(refused) - shown} more" if len(refused) > shown else ""
    return (f"refused {len(refused)} entr{'y' if len(refused) == 1 else 'ies'} of its output "
            f"directory (only regular files with plain relative names are copied): {names}{more}")


__all__ = [
    "RunRecord", "NodeRecord", "Failure", "RunRecordError", "new_record", "global_ranks",
    "now_iso", "parse_progress", "exit_reason", "headline_metrics", "HEADLINE_METRICS",
    "SCHEMA_VERSION", "RUN_JSON", "FINAL_NODE_STATES", "Evidence", "classify_line",
    "choose_first_failure", "failure_reason", "AGENT_DEATH_SIGNAL", "FAILURE_HINTS",
    "last_progress", "list_files_command", "is_failure_sign",
    "parse_file_list", "FileListing", "refusal_line", "write_json_atomic",
]
