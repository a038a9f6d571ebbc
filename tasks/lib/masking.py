"""Secret values in flags: what the controller shows or records in their place.

`fab launch --env HF_TOKEN=...` must reach the ranks, but a token has no business in a dry
run's output, in run.json or sweep.json (which travel with the results), or in a log. Variables
whose name contains one of launch.secret_env_patterns (case-insensitive substrings) are masked
everywhere the controller writes or prints them; only the env script the nodes source holds the
real value. Pure: no files.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

DEFAULT_SECRET_ENV_PATTERNS: tuple[str, ...] = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")
MASK = "***"

_ASSIGNMENT = re.compile(r"^(?P<prefix>(?:--env=)?)(?P<name>[A-Za-z_][A-Za-z0-9_]*)=")


def is_secret_name(name: str, patterns: Iterable[str]) -> bool:
    upper = name.upper()
    return any(pattern.upper() in upper for pattern in patterns if pattern)


def secret_names(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The names that look secret, in order, each once."""
    patterns = tuple(patterns)
    return list(dict.fromkeys(name for name in names if is_secret_name(name, patterns)))


def mask_env(env: Mapping[str, str], patterns: Iterable[str]) -> dict[str, str]:
    """The mapping with every secret-looking variable's value replaced by MASK."""
    patterns = tuple(patterns)
    return {name: MASK if is_secret_name(name, patterns) else value for name, value in env.items()}


def mask_assignment(item: str, patterns: Iterable[str]) -> str:
    """`NAME=VALUE` (or `--env=NAME=VALUE`) with the value masked when NAME looks secret;
    anything else unchanged."""
    match = _ASSIGNMENT.match(item)
    if match and is_secret_name(match.group("name"), patterns):
        return item[:match.end()] + MASK
    return item


def mask_assignments(items: Sequence[str], patterns: Iterable[str]) -> list[str]:
    """Every item through mask_assignment: --env lists, a command line (sys.argv)."""
    patterns = tuple(patterns)
    return [mask_assignment(item, patterns) for item in items]


def is_masked_assignment(item: str) -> bool:
    """An item mask_assignment masked (what a masked record holds in place of a value)."""
    match = _ASSIGNMENT.match(item)
    return bool(match) and item[match.end():] == MASK


def assignment_name(item: str) -> str | None:
    match = _ASSIGNMENT.match(item)
    return match.group("name") if match else None


__all__ = [
    "DEFAULT_SECRET_ENV_PATTERNS", "MASK", "is_secret_name", "secret_names", "mask_env",
    "mask_assignment", "mask_assignments", "is_masked_assignment", "assignment_name",
]
