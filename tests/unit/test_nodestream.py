"""tasks.lib.nodestream.LineSplitter: the one line splitter for node output (launch console and
`fab logs`): whole lines, in bounded memory, whatever a node sends."""
from __future__ import annotations

import tracemalloc

from tasks.lib.nodestream import CUT_MARKER, LineSplitter


def collect(max_line: int | None = None) -> tuple[list[str], LineSplitter]:
    lines: list[str] = []
    splitter = (LineSplitter(lines.extend) if max_line is None
                else LineSplitter(lines.extend, max_line=max_line))
    return lines, splitter


def test_whole_lines_across_chunks_without_newlines_or_carriage_returns():
    lines, splitter = collect()
    splitter.feed(b"step 1/3\r\nst")
    splitter.feed(b"ep 2/3\n\nlast")
    assert lines == ["step 1/3", "step 2/3", ""]
    splitter.close()
    splitter.close()  # nothing left: no second "last"
    assert lines == ["step 1/3", "step 2/3", "", "last"]


def test_a_crlf_split_across_chunks_and_a_character_split_across_chunks():
    lines, splitter = collect()
    word = "größe ✓".encode()
    splitter.feed(b"a\r")
    splitter.feed(b"\n" + word[:3])
    splitter.feed(word[3:] + b"\n\xff\xfe bad bytes\n")
    assert lines == ["a", "größe ✓", "\ufffd\ufffd bad bytes"]


def test_lines_come_in_one_batch_per_chunk():
    batches: list[list[str]] = []
    splitter = LineSplitter(batches.append)
    splitter.feed(b"".join(b"line %d\n" % i for i in range(1000)))
    assert len(batches) == 1 and len(batches[0]) == 1000 and batches[0][-1] == "line 999"


def test_an_endless_line_is_cut_with_a_marker_and_the_stream_goes_on():
    """8 MiB without a newline (what a hostile node sends), fed as SSH delivers it: the first
    max_line characters come out at once with the marker, the rest is dropped until its newline,
    and the lines after it arrive as usual. Memory stays near one chunk."""
    lines, splitter = collect(max_line=1000)
    chunk = b"x" * 32768
    tracemalloc.start()
    try:
        for _ in range(256):
            splitter.feed(chunk)
        assert len(lines) == 1  # handed over long before the line ends
        splitter.feed(b"x" * 100 + b"\nafter 1\nafter 2\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == ["x" * 1000 + CUT_MARKER.format(limit=1000), "after 1", "after 2"]
    assert peak < 1024 * 1024, peak
    assert splitter.cut_lines == 1


def test_a_long_line_inside_one_chunk_is_cut_and_its_neighbours_kept():
    lines, splitter = collect(max_line=10)
    splitter.feed(b"short\n" + b"y" * 50 + b"\nnext\n")
    assert lines == ["short", "y" * 10 + CUT_MARKER.format(limit=10), "next"]


def test_an_unterminated_long_last_line_is_cut_at_close():
    lines, splitter = collect(max_line=10)
    splitter.feed(b"z" * 25)
    splitter.close()
    assert lines == ["z" * 10 + CUT_MARKER.format(limit=10)]
