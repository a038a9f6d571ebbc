"""tasks.runs.LineStream: the one line splitter for Invoke out_streams (launch and logs)."""

from __future__ import annotations

from tasks.runs import LineStream


def test_whole_lines_across_writes_without_newlines_or_carriage_returns():
    lines: list[str] = []
    stream = LineStream(lines.append)
    assert stream.write("step 1/3\r\nst") == len("step 1/3\r\nst")
    stream.write("ep 2/3\n\nlast")
    assert lines == ["step 1/3", "step 2/3", ""]
    stream.close_partial()
    stream.close_partial()  # nothing left: no second "last"
    assert lines == ["step 1/3", "step 2/3", "", "last"]
