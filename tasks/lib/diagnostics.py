"""Hang diagnostics, controller side: the node command, parsing its report and py-spy dumps, the
files written under `<run dir>/hang/` (or `diagnose_<ts>/`), and the user-facing summary.

Pure apart from reading files of a run directory (`load_summary`, `hang_summary_markdown`).
The node-side collector is `tasks/lib/diagnostics_node.py`, sent as source text.
"""
from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.lib import diagnostics_node, untrusted
from tasks.lib.nodereport import clean_node_report
from tasks.lib.quoting import FedCommand, drain_stdin_after, sh_quote

NODE_SCRIPT = Path(diagnostics_node.__file__).read_text()
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
HANG_DIR = "hang"
# Process states that explain a hang by themselves: stopped, traced, uninterruptible, zombie, dead.
SUSPECT_STATES = {"T": "stopped", "t": "traced", "D": "uninterruptible I/O wait", "Z": "zombie",
                  "X": "dead"}
INNERMOST_FRAMES = 4
TRAIN_PACKAGE_PREFIX = "train/"

_THREAD = re.compile(r'^Thread (?P<tid>0x[0-9a-fA-F]+|\d+) \((?P<status>[^)]*)\)(?:: "(?P<name>.*)")?\s*$')
_FRAME = re.compile(r"^    (?P<name>\S.*?) \((?P<loc>[^()]*)\)\s*$")
_PY_LOC = re.compile(r"^(?P<file>.+):(?P<line>\d+)$")


# -- the node command --------------------------------------------------------------------------

def node_venv(configured: str | None, workdir: str) -> str:
    """The virtualenv a node's Python tools come from: cluster.venv when set, else the
    checkout's own <workdir>/.venv (the one decision launch, check and diagnose share)."""
    return configured or posixpath.join(workdir, ".venv")


def node_diagnostics_command(
    run_id: str,
    node_rank: int | None,
    registry_dir: str | None,
    *,
    workdir: str | None = None,
    venv: str | None = None,
    container: str | None = None,
    output_log: str | None = None,
    native: bool = True,
    log_lines: int = 200,
    timeout: float = 20.0,
) -> FedCommand:
    """Shell command that prints one JSON report of the run's processes on a node.

    py-spy is looked for in the run's venv, the checkout's .venv, then PATH. When the host has no
    python3 the collector runs inside the container (which has one: it runs torch).
    """
    venvs = (venv, node_venv(None, workdir) if workdir else None)
    pyspy = [f"{v.rstrip('/')}/bin/py-spy" for v in venvs if v]
    args = {"run_id": run_id, "node_rank": node_rank, "registry_dir": registry_dir,
            "pyspy": pyspy, "container": container, "output_log": output_log, "native": native,
            "log_lines": log_lines, "timeout": timeout}
    return _collector_command(args, container)


def _collector_command(args: dict[str, Any], container: str | None) -> FedCommand:
    """Run the node collector (diagnostics_node.py, handed over in an environment variable)
    on the host, or inside the container when the host has no python3. Its arguments go on
    stdin, never in an argv: the start-up scan's include the master port."""
    env_name = diagnostics_node.SOURCE_ENV
    src = f"{env_name}={sh_quote(NODE_SCRIPT)}; export {env_name}; "
    host_run = f'python3 -c "${env_name}"'
    stdin = json.dumps(args, sort_keys=True) + "\n"
    if not container:
        return FedCommand(src + drain_stdin_after(host_run), stdin)
    # The collector reads one line; the container's copy reads the next (inside_container set).
    container_run = (f'{{ read -r _; docker exec -i -e {env_name} {sh_quote(container)} '
                     f'python3 -c "${env_name}"; }}')
    inner = json.dumps(dict(args, inside_container=True), sort_keys=True) + "\n"
    return FedCommand(src + drain_stdin_after(f"if command -v python3 >/dev/null 2>&1; then "
                                              f"{host_run}; else {container_run}; fi"),
                      stdin + inner)


def node_phases_command(run_id: str, node_rank: int, registry_dir: str | None, *,
                        master_port: int | None, output_dir: str | None,
                        container: str | None = None, timeout: float = 10.0) -> FedCommand:
    """Shell command that prints one JSON line: the start-up watch's view of a node
    (diagnostics_node.phases_report: processes, their states and TCP sockets, progress)."""
    args = {"mode": "phases", "run_id": run_id, "node_rank": node_rank,
            "registry_dir": registry_dir, "master_port": master_port, "output_dir": output_dir,
            "container": container, "timeout": timeout}
    return _collector_command(args, container)


# -- parsing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    name: str
    location: str  # "train/trainer.py:123" for Python, "libc.so.6" for native frames

    @property
    def is_python(self) -> bool:
        return bool(_PY_LOC.match(self.location))

    @property
    def in_train_package(self) -> bool:
        return self.location.startswith(TRAIN_PACKAGE_PREFIX) or f"/{TRAIN_PACKAGE_PREFIX}" in self.location

    def __str__(self) -> str:
        return f"{self.name} ({self.location})"


@dataclass(frozen=True)
class ThreadStack:
    thread_id: str
    status: str           # py-spy's "active", "idle", "active+gil", ...
    name: str | None
    frames: tuple[Frame, ...]  # innermost first, as py-spy prints them

    @property
    def is_main(self) -> bool:
        return self.name == "MainThread"


def parse_pyspy_dump(text: str) -> list[ThreadStack]:
    """Threads and frames of a `py-spy dump` text (with or without --native/--locals)."""
    threads: list[ThreadStack] = []
    current: dict[str, Any] | None = None

    def close() -> None:
        if current is not None:
            threads.append(ThreadStack(current["tid"], current["status"], current["name"],
                                       tuple(current["frames"])))

    for line in text.splitlines():
        header = _THREAD.match(line)
        if header:
            close()
            current = {"tid": header.group("tid"), "status": header.group("status"),
                       "name": header.group("name"), "frames": []}
            continue
        frame = _FRAME.match(line)
        if frame and current is not None:
            current["frames"].append(Frame(frame.group("name"), frame.group("loc")))
    close()
    return threads


def main_thread(threads: Sequence[ThreadStack]) -> ThreadStack | None:
    for thread in threads:
        if thread.is_main:
            return thread
    return threads[0] if threads else None


def innermost_frames(thread: ThreadStack, count: int = INNERMOST_FRAMES) -> list[Frame]:
    """The innermost Python frames (native frames say little to a reader of the summary; they stay
    in the full dump)."""
    python = [f for f in thread.frames if f.is_python]
    return (python or list(thread.frames))[:count]


def innermost_train_frame(thread: ThreadStack) -> Frame | None:
    for frame in thread.frames:
        if frame.in_train_package:
            return frame
    return None


def thread_line(thread: ThreadStack) -> str | None:
    """One line for a secondary thread that runs train code; None for the others (torch's own
    watchdog and pool threads say nothing about where the training stopped)."""
    train = innermost_train_frame(thread)
    if train is None:
        return None
    inner = innermost_frames(thread, 1)
    name = thread.name or thread.thread_id
    if inner and inner[0] != train:
        return f"{name}: {inner[0]} <- {train}"
    return f"{name}: {train}"


@dataclass
class RankStack:
    """What one rank process was doing when the diagnostics ran."""

    rank: int
    node_rank: int | None
    host: str
    pid: int
    state: str
    step: int | None = None
    frames: list[str] = field(default_factory=list)   # innermost first
    train_frame: str | None = None
    # Other threads running train code (e.g. the communication worker inside a collective):
    # "<thread>: <innermost Python frame> <- <innermost train frame>".
    threads: list[str] = field(default_factory=list)
    dump_file: str | None = None
    dump_error: str | None = None

    @property
    def state_note(self) -> str | None:
        return SUSPECT_STATES.get(self.state)


@dataclass
class NodeReport:
    """The parsed JSON of one node's collector (`diagnostics_node.collect`)."""

    node_rank: int | None
    host: str
    data: dict[str, Any]

    @property
    def processes(self) -> list[dict[str, Any]]:
        inner = self.data.get("container_report") or {}
        return list(self.data.get("processes", [])) + list(inner.get("processes", []))

    @property
    def rank_processes(self) -> list[dict[str, Any]]:
        return [p for p in self.processes if p.get("role") == "rank" and p.get("rank") is not None]

    @property
    def progress(self) -> dict[int, dict[str, Any]]:
        merged = dict((self.data.get("container_report") or {}).get("progress", {}))
        merged.update(self.data.get("progress", {}))
        return {int(rank): value for rank, value in merged.items()}


def parse_node_report(stdout: str, node_rank: int | None, host: str) -> NodeReport:
    """The collector's JSON (the last JSON line of stdout: env scripts may print before it),
    bounded and checked (tasks/lib/nodereport.py): what cannot be read is dropped and listed in
    the report's "unreadable", never raised later on the way to stopping a hung run."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                data = untrusted.loads(line)
            except ValueError as err:
                raise ValueError(f"the diagnostics report of {host} is unreadable: "
                                 f"{str(err)[:200]}") from None
            clean, problems = clean_node_report(data)
            if problems:
                clean["unreadable"] = problems
            return NodeReport(node_rank, host, clean)
    raise ValueError(f"no diagnostics report in the output of {host}: {stdout.strip()[-200:]!r}")


# -- files written per node --------------------------------------------------------------------

def dump_file_name(proc: Mapping[str, Any]) -> str:
    """A plain file name whatever the node reported: its rank, role and pid are its own word,
    and a name with '/' or '..' must not reach a path on the controller."""
    pid = _name_part(proc.get("pid"))
    rank = proc.get("rank")
    if isinstance(rank, int) or (isinstance(rank, str) and rank.isdigit()):
        return f"pyspy_rank{int(rank):02d}_pid{pid}.txt"
    return f"pyspy_{_name_part(proc.get('role', 'proc'))}_pid{pid}.txt"


def _name_part(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(value))[:40] or "_"


def node_report_files(report: NodeReport) -> dict[str, str]:
    """{relative path: content} to write under `<diag dir>/node_<rank>/`."""
    files: dict[str, str] = {"report.json": json.dumps(report.data, indent=1, sort_keys=True) + "\n"}
    for proc in report.processes:
        stack = proc.get("stack")
        if not stack:
            continue
        inner = proc.get("ns_pid")
        where = f" (pid {inner} in its container)" if inner and inner != proc["pid"] else ""
        header = (f"# pid {proc['pid']}{where} state {proc['state']} role {proc.get('role')} "
                  f"rank {proc.get('rank')}\n# {' '.join(proc.get('cmdline', []))}\n")
        if stack.get("ok"):
            header += f"# {' '.join(stack['command'])}\n"
            files[dump_file_name(proc)] = header + "\n" + stack["text"]
        else:
            files[dump_file_name(proc)] = header + "# no stack: " + "; ".join(stack.get("errors", [])) + "\n"
    files["processes.txt"] = processes_table(report.processes)
    files["nccl_env.txt"] = env_text(report.processes)
    gpu = list(report.data.get("gpu", [])) + list((report.data.get("container_report") or {}).get("gpu", []))
    files["gpu.txt"] = gpu_text(gpu)
    tail = report.data.get("log_tail") or {}
    files["log_tail.txt"] = (f"# last {len(tail.get('lines', []))} lines of {tail.get('path')}\n"
                             + ("\n".join(tail.get("lines", [])) + "\n" if tail.get("lines") else
                                f"# {tail.get('error') or 'empty'}\n"))
    return files


def processes_table(processes: Iterable[Mapping[str, Any]]) -> str:
    lines = ["pid\tcontainer_pid\tppid\tstate\trole\trank\tcommand"]
    for p in processes:
        lines.append(f"{p['pid']}\t{p.get('ns_pid')}\t{p.get('ppid')}\t{p['state']}\t{p.get('role')}\t"
                     f"{'' if p.get('rank') is None else p['rank']}\t{' '.join(p.get('cmdline', []))[:300]}")
    return "\n".join(lines) + "\n"


def env_text(processes: Iterable[Mapping[str, Any]]) -> str:
    """The NCCL/TORCH_NCCL (and related) environment of each rank process."""
    out = []
    for p in processes:
        if p.get("role") not in ("rank", "torchrun"):
            continue
        label = f"rank {p['rank']}" if p.get("rank") is not None else p.get("role")
        out.append(f"# {label} (pid {p['pid']})")
        out += [f"{k}={v}" for k, v in sorted(p.get("env", {}).items())]
        out.append("")
    return "\n".join(out) + ("\n" if out else "# no rank process found\n")


def gpu_text(commands: Iterable[Mapping[str, Any]]) -> str:
    out = []
    for cmd in commands:
        out.append(f"$ {' '.join(cmd['argv'])}   (rc={cmd.get('rc')})")
        out.append(cmd.get("stdout", "").rstrip())
        if cmd.get("stderr", "").strip():
            out.append(cmd["stderr"].rstrip())
        out.append("")
    return "\n".join(out) + "\n" if out else "no GPU tool (nvidia-smi, rocm-smi, amd-smi) on this host\n"


# -- the summary -------------------------------------------------------------------------------

def rank_stacks(reports: Iterable[NodeReport]) -> list[RankStack]:
    stacks = []
    for report in reports:
        progress = report.progress
        for proc in report.rank_processes:
            rank = int(proc["rank"])
            stack = proc.get("stack") or {}
            entry = RankStack(rank=rank, node_rank=report.node_rank, host=report.host, pid=proc["pid"],
                              state=proc["state"], step=(progress.get(rank) or {}).get("step"),
                              dump_file=f"node_{report.node_rank}/{dump_file_name(proc)}")
            if stack.get("ok"):
                threads = parse_pyspy_dump(stack["text"])
                thread = main_thread(threads)
                if thread is not None:
                    entry.frames = [str(f) for f in innermost_frames(thread)]
                    train = innermost_train_frame(thread)
                    entry.train_frame = str(train) if train else None
                entry.threads = [line for t in threads if t is not thread
                                 for line in [thread_line(t)] if line]
            else:
                entry.dump_error = "; ".join(stack.get("errors", [])) or "not dumped"
            stacks.append(entry)
    return sorted(stacks, key=lambda s: s.rank)


def suspect_ranks(stacks: Iterable[RankStack], expected_ranks: Iterable[int] = ()) -> list[int]:
    """Ranks whose process state alone explains a hang (stopped, zombie, ...), plus expected ranks
    with no process at all."""
    stacks = list(stacks)
    seen = {s.rank for s in stacks}
    return sorted({s.rank for s in stacks if s.state in SUSPECT_STATES} | (set(expected_ranks) - seen))


def first_stalled(progress_first: Sequence[int], suspects: Sequence[int]) -> tuple[list[int], str]:
    """The rank(s) that stopped advancing first, and what that rests on.

    Progress decides when it singles out fewer ranks than the suspects; when ranks tie on progress
    (every rank blocks in the same collective), the process states narrow it down.
    """
    progress_first, suspects = list(progress_first), list(suspects)
    narrowed = [r for r in progress_first if r in suspects]
    if narrowed and len(narrowed) < len(progress_first):
        return narrowed, "progress, narrowed by process state"
    if not progress_first and suspects:
        return suspects, "process state"
    return progress_first, "progress"


@dataclass
class DiagnosticsSummary:
    """Written as summary.json next to the per-node files; what report.md and the terminal show."""

    run_id: str
    kind: str                               # "hang", "startup" (stuck before the first step) or "diagnose"
    collected_at: float
    ranks: list[RankStack]
    first_stalled_ranks: list[int] = field(default_factory=list)
    basis: str | None = None
    suspects: list[int] = field(default_factory=list)
    rank_steps: dict[int, int | None] = field(default_factory=dict)
    hang: dict[str, Any] | None = None      # HangReport.as_dict() when the watchdog fired
    node_errors: dict[str, str] = field(default_factory=dict)  # host: why no report

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rank_steps"] = {str(k): v for k, v in self.rank_steps.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiagnosticsSummary:
        values = dict(data)
        values["ranks"] = [RankStack(**r) for r in data.get("ranks", [])]
        values["rank_steps"] = {int(k): v for k, v in (data.get("rank_steps") or {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


def build_summary(
    run_id: str,
    kind: str,
    reports: Sequence[NodeReport],
    collected_at: float,
    *,
    hang: Mapping[str, Any] | None = None,
    expected_ranks: Iterable[int] = (),
    node_errors: Mapping[str, str] | None = None,
) -> DiagnosticsSummary:
    stacks = rank_stacks(reports)
    steps: dict[int, int | None] = {}
    for report in reports:
        steps.update({rank: p.get("step") for rank, p in report.progress.items()})
    if hang:
        # The watchdog's view is the one the decision was made on.
        steps.update({int(k): v for k, v in (hang.get("rank_steps") or {}).items()})
    for stack in stacks:
        stack.step = steps.get(stack.rank, stack.step)
    for rank in expected_ranks:
        steps.setdefault(rank, None)
    expected = set(steps)
    suspects = suspect_ranks(stacks, expected)
    progress_first = list(hang.get("first_stalled_ranks", [])) if hang else least_progress(steps)
    chosen, basis = first_stalled(progress_first, suspects)
    startup = (hang or {}).get("startup")
    if isinstance(startup, Mapping):
        # The start-up watch decided on phases: its ranks are the answer, whatever the states.
        chosen = list(startup.get("ranks") or progress_first)
        basis = f"start-up phase '{startup.get('phase')}', rule {startup.get('rule')}"
    return DiagnosticsSummary(run_id=run_id, kind=kind, collected_at=collected_at, ranks=stacks,
                              first_stalled_ranks=chosen, basis=basis, suspects=suspects,
                              rank_steps=dict(sorted(steps.items())),
                              hang=dict(hang) if hang else None, node_errors=dict(node_errors or {}))


def least_progress(steps: Mapping[int, int | None]) -> list[int]:
    if not steps:
        return []
    values = {rank: (-1 if step is None else step) for rank, step in steps.items()}
    low = min(values.values())
    return sorted(rank for rank, value in values.items() if value == low)


def hang_record(summary: DiagnosticsSummary, diag_dir_name: str) -> dict[str, Any]:
    """run.json's `hang` entry (with the run's state set to "hung" by the caller)."""
    record = dict(summary.hang or {})
    record.update({
        "first_stalled_ranks": summary.first_stalled_ranks,
        "basis": summary.basis,
        "suspect_ranks": summary.suspects,
        "rank_steps": {str(k): v for k, v in summary.rank_steps.items()},
        "diagnostics": diag_dir_name,
    })
    if summary.hang:
        record["progress_first_stalled_ranks"] = summary.hang.get("first_stalled_ranks", [])
    return record


def summary_lines(summary: DiagnosticsSummary) -> list[str]:
    """Plain lines for the terminal (the task prints them; rich markup is not used here)."""
    lines = []
    startup = startup_record(summary)
    phases = (startup or {}).get("phases") or {}
    if startup:
        lines.append(f"run {summary.run_id} STUCK IN START-UP: {startup.get('headline')}")
    elif summary.kind == "hang" and summary.hang:
        lines.append(f"run {summary.run_id} HUNG: no rank advanced for "
                     f"{summary.hang.get('stalled_for_s', summary.hang.get('timeout_s'))} s "
                     f"(hang timeout {summary.hang.get('timeout_s')} s)")
    else:
        lines.append(f"diagnostics of run {summary.run_id}")
    if summary.first_stalled_ranks and _singles_out(summary):
        lines.append(f"{_first_label(summary)}: rank(s) {', '.join(map(str, summary.first_stalled_ranks))} "
                     f"({summary.basis})")
    for stack in summary.ranks:
        state = f"state {stack.state}" + (f" ({stack.state_note})" if stack.state_note else "")
        where = (f"phase {phases[str(stack.rank)]}" if str(stack.rank) in phases
                 else f"step {'-' if stack.step is None else stack.step}")
        lines.append(f"  rank {stack.rank} (node {stack.node_rank}, {stack.host}, pid {stack.pid}): "
                     f"{where}, {state}")
        if stack.frames:
            for frame in stack.frames:
                lines.append(f"      {frame}")
            if stack.train_frame and stack.train_frame not in stack.frames:
                lines.append(f"      ... in {stack.train_frame}")
            for thread in stack.threads:
                lines.append(f"    thread {thread}")
        elif stack.dump_error:
            lines.append(f"      (no stack: {stack.dump_error})")
    seen = {s.rank for s in summary.ranks}
    for rank, step in summary.rank_steps.items():
        if rank not in seen:
            where = (f"phase {phases[str(rank)]}" if str(rank) in phases
                     else f"step {'-' if step is None else step}")
            lines.append(f"  rank {rank}: {where}, no process found")
    for host, error in summary.node_errors.items():
        lines.append(f"  {host}: no diagnostics: {error}")
    return lines


def summary_markdown(summary: DiagnosticsSummary, diag_dir_name: str) -> str:
    startup = startup_record(summary)
    title = ("Stuck in start-up" if startup else "Hang" if summary.kind == "hang"
             else "Diagnostics")
    out = [f"## {title}: {summary.run_id}", ""]
    if startup:
        out.append(f"{_md_escape(str(startup.get('headline')))}; the run was stopped.")
    elif summary.hang:
        out.append(f"No rank advanced for {summary.hang.get('stalled_for_s')} s "
                   f"(hang timeout {summary.hang.get('timeout_s')} s); the run was stopped.")
    if summary.first_stalled_ranks and _singles_out(summary):
        out.append(f"{_first_label(summary).capitalize()}: **rank {', '.join(map(str, summary.first_stalled_ranks))}** "
                   f"({summary.basis}).")
    out += ["", "| rank | node | host | step | process state | innermost frames |",
            "|---:|---:|---|---:|---|---|"]
    seen = set()
    for s in summary.ranks:
        seen.add(s.rank)
        state = s.state + (f" ({s.state_note})" if s.state_note else "")
        frames = "<br>".join(_md_cell_code(f) for f in s.frames) if s.frames else \
            f"no stack: {_md_escape(s.dump_error or '')}"
        if s.train_frame and s.train_frame not in s.frames:
            frames += f"<br>… in {_md_cell_code(s.train_frame)}"
        for thread in s.threads:
            frames += f"<br>thread {_md_cell_code(thread)}"
        out.append(f"| {s.rank} | {s.node_rank} | {_md_escape(s.host)} | "
                   f"{'-' if s.step is None else s.step} | {_md_escape(state)} | {frames} |")
    for rank, step in summary.rank_steps.items():
        if rank not in seen:
            out.append(f"| {rank} | | | {'-' if step is None else step} | no process | |")
    for host, error in summary.node_errors.items():
        out.append(f"\n{_md_escape(host)}: no diagnostics ({_md_escape(error)})")
    out += ["", f"Full stack dumps, GPU state, log tails and NCCL environment: `{diag_dir_name}/`.", ""]
    return "\n".join(out)


def startup_record(summary: DiagnosticsSummary) -> dict[str, Any] | None:
    """The start-up watch's record (startwatch.StartupStall.as_dict) when it fired, else None."""
    startup = (summary.hang or {}).get("startup")
    return dict(startup) if isinstance(startup, Mapping) else None


def _first_label(summary: DiagnosticsSummary) -> str:
    if startup_record(summary):
        return "stuck in start-up"
    return "stopped advancing first" if summary.kind in ("hang", "startup") else "behind the others"


def _singles_out(summary: DiagnosticsSummary) -> bool:
    """A hang always names its first ranks; an on-demand snapshot only when some ranks lag."""
    everyone = set(summary.rank_steps) | {s.rank for s in summary.ranks}
    return summary.kind in ("hang", "startup") or set(summary.first_stalled_ranks) != everyone


def _md_escape(text: str) -> str:
    return untrusted.md_text(text)


def _md_cell_code(text: str) -> str:
    """A code span inside a table cell: GFM splits cells at "|" even inside code spans."""
    return untrusted.md_code(text).replace("|", "\\|")


# -- reading back from a run directory ---------------------------------------------------------

def load_summary(diag_dir: Path) -> DiagnosticsSummary | None:
    path = Path(diag_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    return DiagnosticsSummary.from_dict(json.loads(path.read_text()))


def hang_summary_markdown(run_dir: str | Path) -> str:
    """Markdown section for report.md: the hang of this run, or "" when it did not hang."""
    diag_dir = Path(run_dir) / HANG_DIR
    summary = load_summary(diag_dir)
    if not summary:
        return ""
    text = summary_markdown(summary, HANG_DIR)
    dumps = read_flight_dumps(run_dir)
    if dumps:
        findings = untrusted.md_text(flight_recorder_findings(dumps)["summary"], 2000)
        text = text.rstrip("\n") + ("\n\nFlight recorder (PyTorch, dumped at the hang): "
                                    f"{findings}.\n")
    return text


# -- PyTorch's flight recorder (train.flight dumps it on the hang watchdog's request) ---------------

FLIGHT_DIR = "flight_recorder"
FLIGHT_TRIGGER = "DUMP"
FLIGHT_RANK_RE = re.compile(r"^rank_([0-9]{1,9})\.json$")


def flight_dump_command(output_dir: str) -> str:
    """Asks every rank of a node to dump its flight recorder: our train package polls the
    trigger file (train.flight); any other PyTorch job's ProcessGroupNCCL reads the named pipe
    TORCH_NCCL_DEBUG_INFO_PIPE_FILE<rank>.pipe the launch gave it (tasks/lib/entry.py) and dumps
    to TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank> (torch's own pickle format: collected, never
    unpickled here). A pipe nobody reads any more would block the writer: 2 s at most."""
    target = posixpath.join(output_dir, FLIGHT_DIR)
    pipes = sh_quote(target) + "/*.pipe"
    return (f"mkdir -p {sh_quote(target)} && touch {sh_quote(posixpath.join(target, FLIGHT_TRIGGER))}"
            f"; for p in {pipes}; do [ -p \"$p\" ] && timeout 2 sh -c 'printf 1 > \"$1\"' "
            "gemm-dump \"$p\" 2>/dev/null; done; true")


def read_flight_dumps(run_dir: str | Path) -> dict[int, Any]:
    """rank -> the parsed dump, from the run's flight_recorder/ directory (the first found)."""
    for directory in sorted(Path(run_dir).rglob(FLIGHT_DIR)):
        dumps: dict[int, Any] = {}
        for path in sorted(directory.glob("rank_*.json")):
            match = FLIGHT_RANK_RE.match(path.name)
            if not match:
                continue
            try:
                dumps[int(match.group(1))] = untrusted.read_json(path)
            except (OSError, ValueError):
                dumps[int(match.group(1))] = {"error": f"{path.name} unreadable"}
        if dumps:
            return dumps
    return {}


def flight_recorder_findings(dumps: Mapping[int, Any]) -> dict[str, Any]:
    """Which collective the ranks went out of step on: per process group, the last collective
    sequence number each rank issued; ranks behind the others never reached the collective the
    others wait in (named with its sizes and per-rank state)."""
    last: dict[str, dict[int, dict[str, Any]]] = {}
    errors = {rank: d["error"] for rank, d in dumps.items() if isinstance(d, Mapping) and d.get("error")}
    for rank, dump in dumps.items():
        entries = dump.get("entries") if isinstance(dump, Mapping) else None
        for entry in entries or []:
            if not isinstance(entry, Mapping) or entry.get("is_p2p"):
                continue
            group = entry.get("process_group")
            if not isinstance(group, list) or not group:
                group = [entry.get("pg_id")]
            pg = str(group[0])
            seq = entry.get("collective_seq_id")
            if not isinstance(seq, int):
                continue
            seen = last.setdefault(pg, {}).get(rank)
            if seen is None or seq > seen["collective_seq_id"]:
                last[pg][rank] = dict(entry)
    groups: dict[str, Any] = {}
    headline = None
    for pg, by_rank in sorted(last.items()):
        top = max(e["collective_seq_id"] for e in by_rank.values())
        behind = sorted(r for r, e in by_rank.items() if e["collective_seq_id"] < top)
        missing = sorted(set(dumps) - set(by_rank) - set(errors))
        ahead = sorted(r for r, e in by_rank.items() if e["collective_seq_id"] == top)
        waiting = by_rank[ahead[0]]
        groups[pg] = {
            "last_seq": {str(r): e["collective_seq_id"] for r, e in sorted(by_rank.items())},
            "state": {str(r): e.get("state") for r, e in sorted(by_rank.items())},
            "behind": behind, "never_seen": missing,
            "collective": waiting.get("profiling_name"), "seq": top,
            "input_sizes": waiting.get("input_sizes"),
        }
        stuck = [r for r in ahead if by_rank[r].get("state") != "completed"]
        if (behind or missing) and headline is None:
            name = (group_names := by_rank[ahead[0]].get("process_group")) and group_names[-1]
            headline = (f"group {name or pg}: rank(s) {behind + missing} never reached "
                        f"{waiting.get('profiling_name')} #{top} (input {waiting.get('input_sizes')}) "
                        f"that rank(s) {stuck or ahead} {'wait in' if stuck else 'completed'}")
    return {"groups": groups, "errors": {str(r): e for r, e in errors.items()},
            "summary": headline or ("every rank reached the same last collective" if groups
                                    else "no collectives in the flight recorder")}
