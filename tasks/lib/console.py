"""The one place that decides how tasks print to stdout: the Console, and a reader gone away."""
from __future__ import annotations

import os
import select
import signal
import sys
from typing import IO, Any

from rich.console import Console

# Without a terminal rich assumes 80 columns (or $COLUMNS) and fits every table into them:
# columns squashed to "…" or to nothing in CI logs and pipes. Nothing reads a pipe by its
# width, so rows are as long as their values.
NO_TERMINAL_WIDTH = 10_000
SIGPIPE_STATUS = 128 + signal.SIGPIPE  # what a shell reports for a program killed by SIGPIPE

_stdout_lost = False  # the reader of stdout went away; fd 1 is /dev/null since


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own ends with exit status 1, which a pipeline cannot tell from a failure.
        # SystemExit, not an exception: task code that catches OSError must not mistake it for
        # its own; the clean-ups on the way out still run (their output goes to /dev/null).
        self.quiet = True
        lose_stdout()
        raise SystemExit(SIGPIPE_STATUS)


def make_console(file: IO[str] | None = None, **options: Any) -> Console:
    """A Console for `file` (default stdout): the terminal's width on a terminal; elsewhere
    (a pipe, a file, CI) wide enough that every value prints in full, one row per line.

    options: rich Console options (soft_wrap ...); highlight is off unless asked for: numbers
    and paths in our lines are data, not syntax to colour.
    """
    stream = file if file is not None else sys.stdout
    options.setdefault("highlight", False)
    if not is_terminal(stream):
        options["width"] = NO_TERMINAL_WIDTH
    return _Console(file=file, **options)


def write_plain(console: Console, text: str) -> None:
    """`text` (whole lines, each ending in a newline) to the console's file as it is: no markup,
    no wrapping, no per-line rich processing. For node output at the rate a node sends it: rich
    makes a Text of every line (~10 us each), a verbose node sends ~500 000 lines a second."""
    if console.quiet:
        return
    try:
        console.file.write(text)
        console.file.flush()
    except BrokenPipeError:
        console.quiet = True
        lose_stdout()


# -- a reader that went away -----------------------------------------------------------------------


def lose_stdout() -> None:
    """Point fd 1 at /dev/null: later writes (clean-ups, the interpreter's flush at exit) succeed
    unseen instead of raising again."""
    global _stdout_lost
    if _stdout_lost:
        return
    _stdout_lost = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def stdout_closed() -> bool:
    """Whether stdout's reader has gone away (a pipe or socket with no reader left)."""
    if _stdout_lost:
        return True
    try:
        fd = sys.__stdout__.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are reported whatever is asked for
    try:
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except OSError:
        return False


def stdout_was_lost() -> bool:
    return _stdout_lost


def die_of_sigpipe() -> None:
    """End as a program whose reader went away ends: killed by SIGPIPE, nothing more printed."""
    lose_stdout()
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(SIGPIPE_STATUS)  # not reached: the signal ends the process
