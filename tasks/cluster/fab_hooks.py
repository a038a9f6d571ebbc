"""Hooks into the `fab` process for what happens before or after any task code runs.

Installed by fabfile.py; everything else in tasks/ is ordinary task code. Two things need them:

- Config files. Invoke reads fabric.yaml while it loads this collection and the runtime file
  (`fab -f FILE`, or $INVOKE_RUNTIME_CONFIG) just before it executes the first task. A runtime
  file that does not exist is skipped silently (the task then runs on whatever inventory the
  other files name: a stop reaches another cluster); a syntax error, an unreadable file, or a
  section of the wrong kind (`cluster: [1, 2]`, which Invoke's merge cannot combine with our
  defaults) escapes Invoke as a traceback. Invoke has no hook for either, so its per-format
  loaders and `load_runtime` are wrapped: a bad file is noted with its line, and the first note
  stops `fab` (one line, exit 2) before any task runs. Noting instead of raising keeps
  `fab --list` and `fab --help TASK` working, which need no config.
- A closed stdout (`fab --list | head -1`): Python reports the broken pipe as a traceback (from
  Invoke's --list, or any print), and again when it flushes stdout at exit; rich's Console exits
  1 instead. Here a reader that went away ends `fab` the way it ends any program in a pipeline:
  killed by SIGPIPE (shell status 141), nothing more printed (tasks.lib.console does the rich
  side). Not 0: the output was cut short, and `set -o pipefail` scripts see what they see from
  `yes | head -1`. Setting SIGPIPE to SIG_DFL up front would be shorter, but would also kill
  `fab` silently whenever a node's SSH connection drops while we write to it.
"""
from __future__ import annotations

import atexit
import errno
import functools
import json
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from invoke.config import AmbiguousMergeError, Config, copy_dict, merge_dicts
from invoke.exceptions import Exit, UnknownFileType
from invoke.util import yaml  # the YAML Invoke parses config files with (vendored)

from tasks.lib.console import die_of_sigpipe, stdout_closed, stdout_was_lost
from tasks.lib.exits import EXIT_USAGE

_ERRORS = "_fab_hooks_file_errors"  # where a Config keeps the notes on its files


# -- config files: pure checks ---------------------------------------------------------------------


def describe_load_error(path: str, err: BaseException) -> str:
    """One line for a config file that could not be read or parsed."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        text = f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {err.problem}"
        if err.context:
            where = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
            text += f" ({err.context}{where})"
        return text
    if isinstance(err, json.JSONDecodeError):
        return f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}"
    if isinstance(err, SyntaxError):
        return f"{path}:{err.lineno}: invalid Python: {err.msg}"
    if isinstance(err, UnicodeDecodeError):
        return f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})"
    if isinstance(err, OSError):
        return f"{path}: cannot read: {err.strerror or err}"
    return f"{path}: {type(err).__name__}: {_one_line(str(err))}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{value!r}"


def check_shape(data: Any, reference: Mapping[str, Any]) -> tuple[dict, str | None, tuple]:
    """A loaded file against the defaults it is merged over: (data to merge, problem, key path).

    Invoke merges files key by key and fails where one side is a mapping and the other is not:
    that is the problem reported, with the key path to find its line. A section left empty
    (`cluster:` with every key commented out) is dropped, as an empty mapping would be.
    """
    if data is None:
        return {}, None, ()
    if not isinstance(data, dict):
        return {}, f"expected a mapping of settings (key: value lines), got {_kind(data)}", ()
    cleaned, problem, keys = _check_mapping(data, reference, ())
    return (cleaned, None, ()) if problem is None else ({}, problem, keys)


def _check_mapping(data: dict, reference: Mapping[str, Any], where: tuple):
    cleaned = {}
    for key, value in data.items():
        keys = (*where, key)
        name = ".".join(map(str, keys))
        if key not in reference:
            cleaned[key] = value
            continue
        known = reference[key]
        if isinstance(known, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                problem = f"{name}: expected a mapping (key: value lines), got {_kind(value)}"
                return {}, problem, keys
            value, problem, bad = _check_mapping(value, known, keys)
            if problem is not None:
                return {}, problem, bad
        elif isinstance(value, dict):
            return {}, f"{name}: expected a single value, got a mapping", keys
        cleaned[key] = value
    return cleaned, None, ()


def yaml_line(text: str, keys: Sequence[object]) -> int | None:
    """The 1-based line of the key path `keys` in YAML `text` (None: not found)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(key):
                node, line = value_node, key_node.start_mark.line + 1
                break
        else:
            return None
    return line


def shape_error(path: str, problem: str, keys: Sequence[object]) -> str:
    line = None
    if path.endswith((".yaml", ".yml")):
        try:
            with open(path, encoding="utf-8") as stream:
                line = yaml_line(stream.read(), keys)
        except (OSError, UnicodeDecodeError):
            pass
    return f"{path}:{line}: {problem}" if line else f"{path}: {problem}"


def runtime_file_problem(path: str) -> str | None:
    """Why a runtime file cannot be used before anything is read from it (None: it can)."""
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):  # a dangling link too: Invoke would skip it silently
        return f"{path}: no such file; check the path given to -f"
    if os.path.isdir(expanded):
        return f"{path}: is a directory, not a config file"
    if not expanded.endswith((".yaml", ".yml", ".json", ".py")):
        return f"{path}: not a config file: name it *.yaml (or .yml, .json, .py)"
    return None


# -- config files: the hooks -----------------------------------------------------------------------


def _note(config: Config, message: str) -> None:
    config.__dict__.setdefault(_ERRORS, []).append(message)


def _guard_loader(loader: Callable[[Config, str], Any], reference: Mapping[str, Any]):
    @functools.wraps(loader)
    def load(self: Config, path: str) -> Any:
        try:
            data = loader(self, path)
        except FileNotFoundError:
            raise  # Invoke tries fabric.yaml, .yml, .json, .py in turn and skips the absent ones
        except Exception as err:  # noqa: BLE001 - whatever fails to load is the file's to fix
            _note(self, describe_load_error(path, err))
            return {}
        known = merge_dicts(copy_dict(self._defaults), copy_dict(dict(reference)))
        data, problem, keys = check_shape(data, known)
        if problem is not None:
            _note(self, shape_error(path, problem, keys))
        return data
    return load


def _guard_load_runtime(load_runtime: Callable[..., None]):
    @functools.wraps(load_runtime)
    def load(self: Config, merge: bool = True) -> None:
        path = self._runtime_path
        problem = runtime_file_problem(str(path)) if path is not None else None
        if problem is not None:
            _note(self, problem)
        else:
            try:
                load_runtime(self, merge=merge)
            except UnknownFileType as err:
                _note(self, f"{path}: {err}")
        errors = self.__dict__.get(_ERRORS)
        if errors:
            raise Exit(f"config error: {errors[0]}", code=EXIT_USAGE)
    return load


def _guard_merge(merge: Callable[[Config], None]):
    @functools.wraps(merge)
    def guarded(self: Config) -> None:
        try:
            merge(self)
        except AmbiguousMergeError as err:
            # Two files disagree on a key our defaults do not have (check_shape knows ours).
            raise Exit(f"config error: {_one_line(str(err))}; make both files give that key "
                       "the same kind of value", code=EXIT_USAGE) from None
    return guarded


def install_config_checks(reference: Mapping[str, Any]) -> None:
    """Wrap Invoke's config loading (every Config of this process). reference: our defaults."""
    if getattr(Config.load_runtime, "_fab_hooks", False):
        return
    for name in ("_load_yaml", "_load_yml", "_load_json", "_load_py"):
        setattr(Config, name, _guard_loader(getattr(Config, name), reference))
    Config.load_runtime = _guard_load_runtime(Config.load_runtime)
    Config.merge = _guard_merge(Config.merge)
    Config.load_runtime._fab_hooks = True  # type: ignore[attr-defined]


# -- a closed stdout -------------------------------------------------------------------------------


def _is_closed_stdout(exc_type: type[BaseException], exc: BaseException | None) -> bool:
    broken = issubclass(exc_type, BrokenPipeError) or (
        isinstance(exc, OSError) and exc.errno == errno.EPIPE)
    return broken and stdout_closed()


def install_pipe_handling() -> None:
    if getattr(sys.excepthook, "_fab_hooks", False):
        return
    previous = sys.excepthook
    previous_thread = threading.excepthook

    def excepthook(exc_type, exc, tb):
        if _is_closed_stdout(exc_type, exc):
            die_of_sigpipe()
        previous(exc_type, exc, tb)

    def thread_excepthook(args):
        if _is_closed_stdout(args.exc_type, args.exc_value):
            die_of_sigpipe()
        previous_thread(args)

    def flush_stdout() -> None:
        # Output still buffered when fab ends is written here, before the interpreter's own
        # flush, which would report a broken pipe as "Exception ignored" and exit 120. A task
        # that lost its reader earlier (make_console's Console) ends the same way.
        if stdout_was_lost():
            die_of_sigpipe()
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            die_of_sigpipe()
        except (OSError, ValueError):
            pass

    excepthook._fab_hooks = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    atexit.register(flush_stdout)


def install(reference: Mapping[str, Any]) -> None:
    install_config_checks(reference)
    install_pipe_handling()
