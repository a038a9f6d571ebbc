"""Small, comment-preserving edits of the YAML config files that `fab setup` writes to.

A line edit keeps the user's comments and layout; the result is re-parsed and compared with
the intended data, and only when the line edit cannot express the change (flow mappings,
anchors, odd layouts) is the file re-dumped as plain YAML (comments are then lost).
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml


class ConfigEditError(ValueError):
    """The file is not a YAML mapping (or its section is not one): we will not guess."""


def set_yaml_key(text: str, section: str, key: str, value: Any) -> str:
    """`text` with `section.key` set to `value` (a scalar or a list of scalars)."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as err:
        raise ConfigEditError(f"not valid YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigEditError("the file is not a YAML mapping")
    expected = dict(data)
    current = expected.get(section) or {}
    if not isinstance(current, dict):
        raise ConfigEditError(f"'{section}' is not a mapping")
    expected[section] = {**current, key: value}
    candidate = _line_edit(text, section, key, json.dumps(value))
    try:
        if yaml.safe_load(candidate) == expected:
            return candidate
    except yaml.YAMLError:
        pass
    return yaml.safe_dump(expected, sort_keys=False, default_flow_style=False)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _line_edit(text: str, section: str, key: str, rendered: str) -> str:
    lines = text.splitlines()
    header = re.compile(rf"^{re.escape(section)}:\s*(#.*)?$")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        tail = [] if not lines or lines[-1].strip() == "" else [""]
        return "\n".join(lines + tail + [f"{section}:", f"  {key}: {rendered}"]) + "\n"
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith((" ", "#"))):
        end += 1
    body = [
        i
        for i in range(start + 1, end)
        if lines[i].strip() and not lines[i].lstrip().startswith("#")
    ]
    indent = _indent(lines[body[0]]) if body else 2
    key_line = re.compile(rf"^ {{{indent}}}{re.escape(key)}:(\s|$)")
    for i in body:
        if key_line.match(lines[i]):
            stop = i + 1
            # The old value may continue below: deeper lines, or an indentless "- item" list.
            while stop < end and (
                not lines[stop].strip()
                or _indent(lines[stop]) > indent
                or (_indent(lines[stop]) == indent and lines[stop].lstrip().startswith("- "))
            ):
                stop += 1
            while stop > i + 1 and not lines[stop - 1].strip():
                stop -= 1
            return "\n".join(lines[:i] + [f"{' ' * indent}{key}: {rendered}"] + lines[stop:]) + "\n"
    return (
        "\n".join(lines[: start + 1] + [f"{' ' * indent}{key}: {rendered}"] + lines[start + 1 :])
        + "\n"
    )
