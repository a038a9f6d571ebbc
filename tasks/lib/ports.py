"""Who listens on a TCP port of a node: named wherever a launch finds its rendezvous port taken
(the probe of node 0, and node 0's launcher right before and after torchrun binds the port).

Another user who holds the port serves our other nodes a store of theirs (docs/SECURITY.md,
train/rendezvous.py): the run must stop naming them, not just say "address already in use".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# POSIX sh (the probe runs under sh, the launcher under bash). One line per listener on TCP port
# $1: "uid U (user), pid P: command". The uid comes from /proc/net/tcp{,6}, readable by all; pid
# and command only where /proc shows the socket's owner (our own processes, or everyone's to
# root). The command is another user's text: printable ASCII only, cut short.
PORT_HOLDERS_SH = r"""gemm_port_holders() {
  awk -v p="$(printf ':%04X' "$1")" '$4 == "0A" && substr($2, length($2) - 4) == p {print $8, $10}' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -u | while read -r u i; do
    n=$(getent passwd "$u" 2>/dev/null | cut -d: -f1)
    w="uid $u${n:+ ($n)}"
    f=$(find /proc/[0-9]*/fd -maxdepth 1 -lname "socket:\[$i\]" 2>/dev/null | head -n 1)
    if [ -n "$f" ]; then
      p=${f#/proc/}; p=${p%%/*}
      w="$w, pid $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | tr -c '[:print:]' '?' | cut -c1-160)"
    fi
    printf '%s\n' "${w% }"
  done
}
"""

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def parse_port_holders(lines: Iterable[str]) -> tuple[str, ...]:
    """The holders PORT_HOLDERS_SH printed (a node's text: printable ASCII only, bounded)."""
    cleaned = (_UNPRINTABLE.sub("?", line).strip()[:300] for line in lines)
    return tuple(line for line in cleaned if line.startswith("uid "))


def held_by(holders: Iterable[str]) -> str:
    """The words to add to a "port in use" message: empty when nobody is named."""
    holders = list(holders)
    return f" (held by {'; '.join(holders)})" if holders else ""
