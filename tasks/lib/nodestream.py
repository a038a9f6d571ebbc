"""A node's output as lines, in bounded memory, at the rate the bytes arrive.

The bytes come from a node (`Node.stream`): a log the ranks write, whatever they print. A
verbose or hostile node can send hundreds of megabytes, or one line without an end. Invoke's own
capture keeps every chunk and re-joins the whole buffer per chunk (quadratic in the output), and
a splitter that re-joins its unfinished line per chunk is quadratic in the line: neither is used
on node output. Here each chunk is split once, complete lines are handed over in batches (one
call per chunk, not per line: a node may send a million lines), and an unfinished line is kept
only up to `max_line` characters: past that it is handed over cut, with a marker, and the rest
of it is dropped until its newline comes.
"""
from __future__ import annotations

from collections.abc import Callable

# Far above any line NCCL, torchrun or the train package prints (a metrics JSON line is ~2 KiB).
MAX_LINE_CHARS = 64 * 1024
CUT_MARKER = " [... line cut: longer than {limit} characters; the rest of it was dropped]"

LinesSink = Callable[[list[str]], None]


class LineSplitter:
    """Bytes in (`feed`), lists of whole lines out (`on_lines`): no newline, no trailing CR,
    invalid UTF-8 replaced. `close()` hands over an unterminated last line."""

    def __init__(self, on_lines: LinesSink, max_line: int = MAX_LINE_CHARS):
        self._on_lines = on_lines
        self._max_line = max_line
        self._partial: list[bytes] = []   # the unfinished line's chunks
        self._partial_size = 0
        self._dropping = False            # inside a line already handed over cut
        self.cut_lines = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        last_newline = data.rfind(b"\n")
        if last_newline < 0:
            self._keep(data)
            return
        complete, rest = data[:last_newline], data[last_newline + 1:]
        lines: list[str] = []
        if self._dropping:
            # The cut line ends at the first newline of this chunk: nothing of it is kept.
            first_newline = complete.find(b"\n")
            self._dropping = False
            if first_newline < 0:
                complete = None
            else:
                complete = complete[first_newline + 1:]
        elif self._partial:
            self._partial.append(complete)
            complete = b"".join(self._partial)
            self._partial, self._partial_size = [], 0
        if complete is not None:
            lines = self._decode(complete)
        if lines:
            self._on_lines(lines)
        self._keep(rest)

    def close(self) -> None:
        if self._partial and not self._dropping:
            lines = self._decode(b"".join(self._partial))
            if lines != [""]:
                self._on_lines(lines)
        self._partial, self._partial_size, self._dropping = [], 0, False

    def _keep(self, data: bytes) -> None:
        if not data or self._dropping:
            return
        self._partial.append(data)
        self._partial_size += len(data)
        # Bytes, not characters: a UTF-8 character is at most 4 bytes.
        if self._partial_size > 4 * self._max_line:
            self._cut_partial()

    def _cut_partial(self) -> None:
        text = b"".join(self._partial).decode("utf-8", "replace").replace("\r", "")
        self._partial, self._partial_size = [], 0
        self._dropping = True
        self.cut_lines += 1
        self._on_lines([self._cut(text)])

    def _decode(self, data: bytes) -> list[str]:
        text = data.decode("utf-8", "replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n")
            if text.endswith("\r"):
                text = text[:-1]
        lines = text.split("\n")
        # Only a chunk longer than a line may hold a line too long (max(map()) runs in C).
        if len(text) > self._max_line and max(map(len, lines)) > self._max_line:
            for index, line in enumerate(lines):
                if len(line) > self._max_line:
                    lines[index] = self._cut(line)
                    self.cut_lines += 1
        return lines

    def _cut(self, line: str) -> str:
        return line[:self._max_line] + CUT_MARKER.format(limit=self._max_line)


__all__ = ["LineSplitter", "LinesSink", "MAX_LINE_CHARS", "CUT_MARKER"]
