"""A training of the user's own as the launch's entry point (`--entry`, `launch.entry`).

By default every rank runs our experiment, `python -m train`. An entry replaces that with what
the user would type after `torchrun [options]`: a script and its arguments (`train.py --config
my.yaml`) or a module (`-m mypkg.train --lr 3e-4`). Everything else a launch does stays: the env
script (channels, threads, presets, --env), fail-fast, stop, the hang watchdog and collection.

Where the script comes from, decided here on the controller:

- inside this checkout (and not ignored by git): the node's checkout has it (`fab sync`
  carries it, the checkout check compares it);
- anywhere else: the directory that holds it is pushed with the run bundle into
  `<run dir>/entry/` on every node (regular files, bounded: a home directory or a data set is
  refused, naming what to do), so its own modules and config files come along.

The ranks start in the script's directory (a module's: the workdir), as `cd DIR && torchrun
... train.py ARGS` would, so relative paths in the arguments mean what they mean there.

Entry arguments are the user's values: they reach the node launcher as an argument vector and
every one of them is shell-quoted where it is written (tasks.lib.quoting through the template).
Pure: reads only the files of the entry's directory on the controller.
"""
from __future__ import annotations

import os
import posixpath
import re
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# A pushed entry directory larger than this is not a training script's directory.
MAX_PUSH_FILES = 500
MAX_PUSH_BYTES = 32 << 20
SKIPPED_DIRS = frozenset({"__pycache__", "experiments", "outputs", "wandb"})
NODE_ENTRY_DIR = "entry"
_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Ours: `-m train` is the default experiment, not an entry.
OWN_MODULE = "train"

# How a rank's output line is marked in the node's log, so that the controller knows whose it
# is (torchrun's --tee with this prefix template: `${rank}` is the global rank).
RANK_PREFIX_TEMPLATE = "[rank${rank}]:"
RANK_PREFIX = re.compile(r"^\[rank(?P<rank>\d{1,6})\]:\s?(?P<text>.*)$")
TORCHRUN_LOGS = "torchrun_logs"   # torchrun's per-rank stdout/stderr files, per node, collected
FLIGHT_DIR = "flight_recorder"    # train.flight's name: the hang watchdog looks there
NCCL_DEBUG_FILE = "nccl_debug_%h_%p.log"  # NCCL expands %h (host) and %p (pid) only
NCCL_DEBUG_GLOB = "nccl_debug_*.log"


class EntryError(ValueError):
    """An entry that cannot run; one line saying what and how to fix."""


@dataclass(frozen=True)
class Entry:
    """A validated entry point. `script` is the file on the controller (None for a module)."""

    argv: tuple[str, ...]               # as given: ("train.py", "--config", "x") or ("-m", ...)
    module: str | None = None
    script: Path | None = None
    in_checkout: str | None = None      # the script's path relative to the checkout
    push_root: Path | None = None       # the directory pushed with the run (outside scripts)
    push_files: tuple[str, ...] = ()    # relative paths under push_root
    push_bytes: int = 0
    skipped: tuple[str, ...] = ()       # symlinks and the like, not pushed (named in a warning)
    args: tuple[str, ...] = field(default=())

    @property
    def display(self) -> str:
        """The entry as the user would type it after torchrun (for the launch's first line)."""
        return shlex.join(self.argv)

    def describe(self) -> str:
        if self.module is not None:
            return f"{self.display} (module, run from the workdir)"
        if self.in_checkout is not None:
            return f"{self.display} (in this checkout: {self.in_checkout})"
        return (f"{self.display} (pushed with the run: {self.push_root}, "
                f"{len(self.push_files)} file(s), {self.push_bytes / 1024:.1f} KiB)")

    def record(self) -> dict[str, object]:
        """For run.json: what ran and where it came from."""
        return {"argv": list(self.argv), "module": self.module,
                "script": str(self.script) if self.script else None,
                "in_checkout": self.in_checkout,
                "pushed_from": str(self.push_root) if self.push_root else None,
                "pushed_files": len(self.push_files)}


def split_entry(value: object, what: str = "--entry") -> tuple[str, ...]:
    """The entry's argument vector: a string is split as a shell would (quotes kept together,
    nothing expanded); a list (launch.entry in YAML) is taken item by item."""
    if isinstance(value, str):
        try:
            argv = tuple(shlex.split(value))
        except ValueError as err:
            raise EntryError(f"{what} {value!r}: {err} (quote it as in a shell)") from None
    elif isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        argv = tuple(value)
    else:
        raise EntryError(f"{what}: {value!r} is neither a command line nor a list of strings")
    if not argv:
        raise EntryError(f"{what} is empty: give a script (train.py ARGS) or a module (-m PKG ARGS)")
    for item in argv:
        if "\0" in item:
            raise EntryError(f"{what}: an argument contains a NUL byte, which no argv can hold")
    return argv


def resolve_entry(value: object, project_root: Path, *, what: str = "--entry",
                  is_ignored: Callable[[Path, str], bool] | None = None) -> Entry:
    """Validate an entry against this machine's files; EntryError names what is wrong."""
    argv = split_entry(value, what)
    if argv[0] in ("-m", "--module"):
        if len(argv) < 2 or not _MODULE.fullmatch(argv[1]):
            raise EntryError(f"{what}: -m needs a module name (dotted identifiers), got "
                             f"{argv[1] if len(argv) > 1 else 'nothing'!r}")
        if argv[1] == OWN_MODULE:
            raise EntryError(f"{what} -m {OWN_MODULE} is the default experiment: drop --entry "
                             "(and give its flags: --config, --override)")
        return Entry(argv=("-m", *argv[1:]), module=argv[1], args=argv[2:])
    if argv[0].startswith("-"):
        raise EntryError(f"{what}: {argv[0]!r} is an option; the entry starts with a script "
                         "(train.py ARGS) or -m MODULE (torchrun's own options are the launch's)")
    script = Path(argv[0]).expanduser()
    script = script if script.is_absolute() else project_root / script
    if not script.is_file():
        raise EntryError(f"{what}: {argv[0]}: no such file here (a relative path is taken from "
                         f"{project_root}); the script must exist on this machine: it is pushed "
                         "with the run, or carried by `fab sync` when it is in this checkout")
    script = script.resolve()
    root = project_root.resolve()
    try:
        relative = script.relative_to(root).as_posix()
    except ValueError:
        relative = None
    if relative is not None:
        ignored = (is_ignored or git_ignored)(root, relative)
        if ignored:
            raise EntryError(f"{what}: {relative} is ignored by git in this checkout, so `fab "
                             "sync` does not carry it to the nodes: move its directory out of the "
                             "checkout (it is then pushed with every run) or stop ignoring it")
        return Entry(argv=argv, script=script, in_checkout=relative, args=argv[1:])
    return Entry(argv=argv, script=script, args=argv[1:], **_push_listing(script.parent, root, what))


def git_ignored(root: Path, relative: str) -> bool:
    """Whether git ignores this path of the checkout (no git, or no repository: not ignored)."""
    try:
        done = subprocess.run(["git", "-c", "core.fsmonitor=false", "-C", str(root),
                               "check-ignore", "-q", "--", relative],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _push_listing(directory: Path, project_root: Path, what: str) -> dict[str, object]:
    """The regular files of the script's directory to push, bounded; EntryError when too big."""
    if directory == Path(directory.anchor) or project_root.is_relative_to(directory):
        raise EntryError(f"{what}: the script's directory {directory} holds "
                         f"{'everything' if directory == Path(directory.anchor) else 'this checkout'}"
                         "; put the script in a directory of its own (it is pushed with the run)")
    files: list[str] = []
    skipped: list[str] = []
    total = 0
    for current, dirnames, filenames in os.walk(directory):
        here = Path(current)
        kept = []
        for name in sorted(dirnames):
            path = here / name
            if path.is_symlink():
                skipped.append(path.relative_to(directory).as_posix())
            elif not name.startswith(".") and name not in SKIPPED_DIRS:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = here / name
            relative = path.relative_to(directory).as_posix()
            if name.startswith(".") or name.endswith(".pyc"):
                continue
            if path.is_symlink() or not path.is_file() or _CONTROL.search(relative):
                skipped.append(relative)
                continue
            files.append(relative)
            total += path.stat().st_size
            if len(files) > MAX_PUSH_FILES or total > MAX_PUSH_BYTES:
                raise EntryError(
                    f"{what}: the script's directory {directory} holds more than "
                    f"{MAX_PUSH_FILES} files or {MAX_PUSH_BYTES >> 20} MiB, all of which would be "
                    "pushed with every run: keep the training code in a small directory of its "
                    "own (data and checkpoints elsewhere), or put it in this checkout (fab sync)")
    return {"push_root": directory, "push_files": tuple(files), "push_bytes": total,
            "skipped": tuple(skipped)}


# -- on the nodes ------------------------------------------------------------------------------

def node_entry_dir(node_run_dir: str) -> str:
    return posixpath.join(node_run_dir, NODE_ENTRY_DIR)


def entry_bundle(entry: Entry, node_run_dir: str) -> dict[str, bytes]:
    """The files pushed to every node for an outside script: node path -> content."""
    if entry.push_root is None:
        return {}
    base = node_entry_dir(node_run_dir)
    return {posixpath.join(base, relative): (entry.push_root / relative).read_bytes()
            for relative in entry.push_files}


def entry_argv(entry: Entry, *, workdir: str, node_run_dir: str) -> tuple[list[str], str]:
    """(what torchrun runs after its own options, the directory the ranks start in) on a node."""
    if entry.module is not None:
        return ["-m", entry.module, *entry.args], workdir
    if entry.in_checkout is not None:
        script = posixpath.join(workdir, entry.in_checkout)
    else:
        assert entry.script is not None and entry.push_root is not None
        script = posixpath.join(node_entry_dir(node_run_dir),
                                entry.script.relative_to(entry.push_root).as_posix())
    return [script, *entry.args], posixpath.dirname(script)


def entry_env(user_env: Mapping[str, str], *, output_dir: str, accelerator: str,
              flight_entries: int) -> dict[str, str]:
    """What every rank of an entry gets besides the user's settings: where to write outputs
    (GEMM_OUTPUT_DIR, collected), its output lines marked with its rank, PyTorch's flight
    recorder on (dumped at a collective timeout, and on request by the hang watchdog through
    ProcessGroupNCCL's dump pipe), and NCCL's debug lines in per-process files the report reads
    back (effective channels/threads). A value the user set (--env, a preset) wins."""
    env: dict[str, str] = {"GEMM_OUTPUT_DIR": output_dir,
                           "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": RANK_PREFIX_TEMPLATE}
    nccl = accelerator != "cpu"
    flight = posixpath.join(output_dir, FLIGHT_DIR)
    if flight_entries > 0:
        if "TORCH_FR_BUFFER_SIZE" not in user_env and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in user_env:
            env["TORCH_FR_BUFFER_SIZE"] = str(flight_entries)
            if nccl:  # ProcessGroupNCCL of torch 2.11 reads only the old name (train/flight.py)
                env["TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(flight_entries)
        if nccl:
            env["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
            env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = posixpath.join(flight, "torch_rank_")
            env["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"] = posixpath.join(flight, "pipe_rank_")
    if nccl and "NCCL_DEBUG_FILE" not in user_env:
        from train.nccl_debug import capture_env  # torch-free by train's contract

        env.update(capture_env(user_env, posixpath.join(output_dir, NCCL_DEBUG_FILE)))
    return {name: value for name, value in env.items() if name not in user_env
            or name in ("NCCL_DEBUG", "NCCL_DEBUG_SUBSYS")}


def torchrun_log_env(output_dir: str, node_rank: int) -> dict[str, str]:
    """torchrun's --log-dir of one node (PET_LOG_DIR: torchrun reads its options from PET_*), so
    the per-rank stdout/stderr files land in the output directory, apart per node."""
    return {"PET_LOG_DIR": posixpath.join(output_dir, TORCHRUN_LOGS, f"node_{node_rank}")}


_RANK_MARK = re.compile(r"^\[rank(\d{1,6})\]:", re.M)


def count_rank_lines(block: str) -> dict[int, int]:
    """{global rank: lines it printed} in a block of a node's lines (newline-joined): the
    progress of a program that writes no metrics files. One regex pass over the block, so a
    flooding node costs no Python per line."""
    counts: dict[int, int] = {}
    for match in _RANK_MARK.finditer(block):
        rank = int(match.group(1))
        counts[rank] = counts.get(rank, 0) + 1
    return counts


def split_rank_line(line: str) -> tuple[int, str] | None:
    """(global rank, the rank's own text) of a line marked by RANK_PREFIX_TEMPLATE, else None."""
    match = RANK_PREFIX.match(line)
    return (int(match.group("rank")), match.group("text")) if match else None


__all__ = ["Entry", "EntryError", "resolve_entry", "split_entry", "entry_bundle", "entry_argv",
           "entry_env", "torchrun_log_env", "split_rank_line", "count_rank_lines", "node_entry_dir",
           "RANK_PREFIX_TEMPLATE", "NCCL_DEBUG_GLOB", "TORCHRUN_LOGS", "MAX_PUSH_FILES",
           "MAX_PUSH_BYTES"]
