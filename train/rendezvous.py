"""Is the rendezvous store this run's? Checked before the process group starts, so before any
collective and before this rank sends anything to a peer.

torchrun's store (a c10d TCPStore that node 0's torchrun serves on the master port) answers
anyone: another user of node 0 who binds that port first (our torchrun binds it only after
importing torch, seconds after the start) serves our other nodes a store of theirs, and their
processes become our ranks' peers. `fab launch` gives every node a secret of the run in env.sh
(mode 0600, never an argv: tasks/run/plan.py). Rank 0 -- on node 0, where its own torchrun holds
the port, or it would not be running -- writes a proof derived from the secret into the store;
every other rank reads it and compares before anything else. A store without the proof, or with
another, is not ours: the rank stops and says so.

What this cannot do (docs/SECURITY.md): the store still has no authentication. Whoever reaches
the port can read and overwrite its keys while the run lives, and so disrupt it; they never get
code run in our ranks (nothing is unpickled: train/exchange.py) nor a rank started on their store.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import MutableMapping
from typing import Any

SECRET_ENV = "GEMM_RENDEZVOUS_SECRET"
PROOF_KEY = "gemm/rendezvous_proof"
_PROOF_LABEL = b"gemm rendezvous proof v1"


class RendezvousError(RuntimeError):
    """The store this rank reached is not this run's."""


def take_secret(environ: MutableMapping[str, str]) -> str | None:
    """The run's secret, removed from the environment: no child process (profilers, py-spy),
    summary or diagnostics of this rank sees it. None when not started by `fab launch`."""
    return environ.pop(SECRET_ENV, None) or None


def proof(secret: str) -> bytes:
    """What rank 0 writes: useless for anything else (the secret cannot be recovered from it)."""
    return hmac.new(secret.encode(), _PROOF_LABEL, hashlib.sha256).hexdigest().encode()


def verify_store(store: Any, rank: int, secret: str, where: str) -> None:
    """Rank 0 writes the proof; every other rank waits for it (up to the store's timeout, the
    process group's) and compares. RendezvousError naming `where` (host:port) if it differs."""
    expected = proof(secret)
    if rank == 0:
        store.set(PROOF_KEY, expected)
        return
    try:
        found = store.get(PROOF_KEY)
    except Exception as exc:  # noqa: BLE001 - torch raises DistStoreError or RuntimeError
        raise RendezvousError(
            f"rendezvous store at {where} is not this run's: no proof from rank 0 "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
            "another process may hold the port") from None
    if not hmac.compare_digest(bytes(found), expected):
        raise RendezvousError(
            f"rendezvous store at {where} is not this run's: another process holds the port "
            "(its proof does not match this run's secret); this rank sent it nothing and stops")
