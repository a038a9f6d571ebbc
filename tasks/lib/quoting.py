"""The one place remote shell text is built.

Every value that reaches a remote shell goes through `sh_quote`, so `$(...)`, quotes, spaces and
newlines arrive literally. Templates use the same function as their `q` filter.
"""
from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from typing import NamedTuple


class FedCommand(NamedTuple):
    """A shell command and the text it reads on stdin: its arguments, where one of them (a
    master port) must stay out of every argv, which any user of the node reads in /proc."""

    command: str
    stdin: str


def drain_stdin_after(command: str) -> str:
    """`command`, then the rest of stdin read and dropped, keeping its exit status: whichever
    way it ends (a branch that reads nothing, an early failure), the sender of stdin never
    writes to, or closes, a finished channel (Invoke raises there)."""
    return f"{{ {command}; }}; gemm_rc=$?; cat >/dev/null; exit $gemm_rc"


def sh_quote(value: object) -> str:
    """Quote one value for POSIX sh. None is refused: an unset value is a bug, not an empty string."""
    if value is None:
        raise ValueError("refusing to shell-quote None")
    if isinstance(value, bool):
        value = "1" if value else "0"
    return shlex.quote(str(value))


def sh_join(argv: Iterable[object]) -> str:
    """Quote and join an argument vector."""
    return " ".join(sh_quote(arg) for arg in argv)


def shell_command(
    argv: Iterable[object],
    *,
    cwd: str | None = None,
    env: Mapping[str, object] | None = None,
) -> str:
    """Build `cd CWD && env K=V ... ARGV...` with every part quoted."""
    parts = []
    if cwd is not None:
        parts.append(f"cd {sh_quote(cwd)} &&")
    if env:
        for key in env:
            if not is_env_name(key):
                raise ValueError(f"not a valid environment variable name: {key!r}")
        parts.append("env " + " ".join(f"{key}={sh_quote(val)}" for key, val in env.items()))
    parts.append(sh_join(argv))
    return " ".join(parts)


def is_env_name(name: str) -> bool:
    """True for names a POSIX shell accepts as variables (letters, digits, _; no leading digit)."""
    return bool(name) and (name[0].isalpha() or name[0] == "_") and all(
        ch.isalnum() or ch == "_" for ch in name
    ) and name.isascii()


def sh_command(script: str) -> str:
    """Run a multi-line script with sh, whatever the remote login shell is."""
    return "sh -c " + sh_quote(script)


def section_function(mark: str) -> str:
    """Shell function `s NAME` that starts a named section of a script's output.

    Scripts that report many facts in one round trip print sections; `split_sections` reads them.
    """
    return f"s() {{ printf '\\n{mark}%s\\n' \"$1\"; }}"


def split_sections(text: str, mark: str) -> dict[str, str]:
    """Output of a script using `section_function(mark)`, as {section name: body}."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(mark):
            current = sections.setdefault(line[len(mark):].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(body).strip() for name, body in sections.items()}
