"""pid 1 of a simulated node: sets the hostname, says "ready", then reaps orphans forever.

Reaping matters: a finished detached job (re-parented to pid 1) must not linger as a zombie
that `kill -0` still reports alive. SIGCHLD stays blocked so none is lost between a reap and
the wait. Runs with `python -I -S` (stdlib only). The holder kills it with SIGKILL, which makes
the kernel kill every other process of the node.
"""

import os
import signal
import socket
import sys


def main() -> None:
    socket.sethostname(sys.argv[1])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    os.write(1, b"ready\n")
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        signal.sigtimedwait({signal.SIGCHLD}, 60)


if __name__ == "__main__":
    main()
