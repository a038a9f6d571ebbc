"""Reading and showing what a node sent: bounded, never raising what a caller does not expect,
escaped for where it is shown.

A node is not trusted (docs/SECURITY.md): summary.json, metrics lines, diagnostics reports and
registry values are its own word. Readers here bound size, nesting and number length and raise
only `ValueError` (or `OSError` for a file that cannot be read), so `except (OSError,
ValueError)` is the whole contract; a caller turns that into "unreadable from node N" and goes
on with the run's own bookkeeping. Writers escape per output format: a terminal (control
characters), Markdown/HTML (report.md), CSV cells (spreadsheet formulas); rich markup is escaped
with rich.markup.escape where the value is printed.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# A summary.json of 64 nodes x 8 ranks is a few MiB; a metrics line ~2 KiB.
MAX_JSON_BYTES = 32 * 1024 * 1024
MAX_JSON_LINE_BYTES = 1024 * 1024
# Our own documents nest 6 levels or so; Python's parser recurses once per level.
MAX_JSON_DEPTH = 64
# Integers beyond 64 bits are no step, rank, pid or byte count of ours; int() and float() of
# longer digit strings raise (Python's 4300-digit limit) or overflow. 19 digits, because an
# epoch time in nanoseconds has 19 (PyTorch's flight recorder writes time_created_ns).
MAX_INT_DIGITS = 19
MAX_SHOWN_CHARS = 300

_LONG_DIGITS = re.compile(rb"[0-9]{%d,}" % (MAX_INT_DIGITS + 1))
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{%d,}" % (MAX_INT_DIGITS + 1))
_DECIMAL = re.compile(r"[+-]?[0-9]{1,%d}" % MAX_INT_DIGITS)


class UnreadableNodeData(ValueError):
    """What a node sent cannot be read within the bounds (too big, too deep, a number too long)."""


# -- reading --------------------------------------------------------------------------------------

def loads(data: str | bytes, *, max_bytes: int = MAX_JSON_BYTES,
          max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads of node data, bounded: raises only ValueError (json.JSONDecodeError,
    UnicodeDecodeError or UnreadableNodeData)."""
    if len(data) > max_bytes:
        raise UnreadableNodeData(f"larger than {max_bytes} bytes")
    try:
        value = json.loads(data)
    except RecursionError:
        raise UnreadableNodeData(f"nested deeper than {max_depth} levels") from None
    # The walk costs a Python call per value: only when the text could hold what it looks for.
    digits = _LONG_DIGITS if isinstance(data, bytes) else _LONG_DIGITS_TEXT
    opening = (data.count(b"[") + data.count(b"{") if isinstance(data, bytes)
               else data.count("[") + data.count("{"))
    if opening > max_depth or digits.search(data):
        _check_bounds(value, max_depth)
    return value


def _check_bounds(value: Any, max_depth: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        elif isinstance(item, int) and not isinstance(item, bool):
            if plain_int(item) is None:
                raise UnreadableNodeData(f"an integer of more than {MAX_INT_DIGITS} digits")
            continue
        else:
            continue
        if depth > max_depth:
            raise UnreadableNodeData(f"nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def read_json(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file a node wrote, bounded (see `loads`); OSError when it cannot be read."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    return loads(data, max_bytes=max_bytes)


def read_lines(path: Path, *, max_line: int = MAX_JSON_LINE_BYTES):
    """(line number, bytes without the newline, complete) of a file a node wrote, in bounded
    memory; a line longer than `max_line` comes as None (counted, never read whole).
    `complete` is False for a last line without its newline."""
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(max_line + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(max_line + 1)
                yield number, None, True
                continue
            complete = raw.endswith(b"\n")
            yield number, raw.rstrip(b"\n"), complete


def plain_int(value: Any) -> int | None:
    """An int (not bool) of at most MAX_INT_DIGITS digits, else None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if -(10 ** MAX_INT_DIGITS) < value < 10 ** MAX_INT_DIGITS else None


def int_text(text: Any) -> int | None:
    """The int an ASCII decimal string spells ("12", " -3 "), within MAX_INT_DIGITS; else None
    (str.isdigit() also accepts "²", which int() refuses)."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    return int(text) if _DECIMAL.fullmatch(text) else None


def finite_number(value: Any) -> float | None:
    """A finite float of an int or float (not bool), else None: an int too large for a float
    is no measurement."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def short_text(value: Any, max_chars: int = MAX_SHOWN_CHARS) -> str | None:
    """A str value, cut to max_chars (with "..."), else None."""
    if not isinstance(value, str):
        return None
    return value if len(value) <= max_chars else value[:max_chars] + "..."


# -- showing --------------------------------------------------------------------------------------

# C0 controls but tab, DEL, C1 controls (ESC starts terminal escape sequences; CR overwrites the
# "[node N]" prefix on a terminal; U+009B is a one-character CSI on some terminals).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


_ASCII_CONTROLS = bytes(range(0x09)) + bytes(range(0x0a, 0x20)) + b"\x7f"  # tab stays
_ASCII_CONTROLS_BUT_NEWLINE = _ASCII_CONTROLS.replace(b"\n", b"")


def terminal_text(text: str, keep_newlines: bool = False) -> str:
    """`text` as it may reach a terminal: control characters shown as \\xNN, never acted on
    (keep_newlines: a block of lines, each already split off at its newline)."""
    if text.isascii():
        # The usual case, at memory speed: ASCII text without a control character is returned
        # as it is (a regex scan costs ~10 ms per MB; node output comes at 50+ MB/s).
        controls = _ASCII_CONTROLS_BUT_NEWLINE if keep_newlines else _ASCII_CONTROLS
        raw = text.encode("ascii")
        if len(raw.translate(None, controls)) == len(raw):
            return text
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_visible, text)


# What starts structure in the middle of a line (the text never starts one: newlines are
# gone): code spans, emphasis, links and images ([ ]), HTML tags and entities, table cells,
# GitHub's strikethrough and math. CommonMark lets a backslash escape any ASCII punctuation.
# "_" is left alone: intraword it is no emphasis in GFM, and file and status names are full of it.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|~&$])")


def md_text(value: Any, max_chars: int = MAX_SHOWN_CHARS) -> str:
    """A node value inside a line of report.md: one line (newlines and controls become spaces or
    \\xNN), Markdown and HTML specials backslash-escaped (no link, image, emphasis, tag, entity,
    table cell or heading can come from it), cut to max_chars."""
    text = str(value)
    if len(text) > max_chars:
        text = text[:max_chars] + "..."
    text = re.sub(r"[\r\n]+", " ", text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", terminal_text(text))


def md_code(value: Any, max_chars: int = MAX_SHOWN_CHARS) -> str:
    """A node value as a Markdown code span (shown literally; HTML inside is text): the fence is
    one backtick longer than the longest run of backticks in it (CommonMark)."""
    text = re.sub(r"[\r\n]+", " ", terminal_text(str(value)[:max_chars]))
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or longest else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def csv_cell(value: Any) -> Any:
    """A results.csv cell: text that a spreadsheet would run as a formula (=, +, -, @, tab, CR
    first: OWASP's CSV injection list) gets a leading apostrophe; numbers, also negative ones
    and numbers written as text, stay numbers."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    if _NUMBER.fullmatch(value):
        return value
    return "'" + value


__all__ = [
    "UnreadableNodeData", "loads", "read_json", "read_lines", "plain_int", "int_text",
    "finite_number", "short_text", "terminal_text", "md_text", "md_code", "csv_cell",
    "MAX_JSON_BYTES", "MAX_JSON_LINE_BYTES", "MAX_JSON_DEPTH", "MAX_INT_DIGITS",
]
