"""Which transport reaches the nodes: this machine alone, SSH, or srun inside a Slurm job.

Pure: the choice is made from the setting (`cluster.transport`), the inventory and the Slurm
allocation this process runs in (tasks/lib/slurm.detect_allocation), and it carries the reason
the launch prints, so that nobody has to guess why `fab launch` used srun (or did not).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .slurm import Allocation

TRANSPORTS = ("auto", "local", "ssh", "srun")


class TransportError(ValueError):
    """A transport that cannot reach this inventory; the message says how to fix it."""


@dataclass(frozen=True)
class TransportChoice:
    name: str                        # local | ssh | srun
    reason: str                      # one line: why this one
    allocation: Allocation | None = None   # the job whose nodes srun reaches


def choose_transport(setting: str, *, hosts: Sequence[str], local: bool,
                     allocation: Allocation | None) -> TransportChoice:
    """hosts: the inventory's host names, master first; local: the inventory is this machine
    alone (the embedded default)."""
    if setting not in TRANSPORTS:
        raise TransportError(f"cluster.transport: {setting!r} is not one of "
                             f"{', '.join(TRANSPORTS)}")
    outside = [h for h in hosts if allocation is None or h not in allocation.nodes]
    if setting == "local":
        if not local:
            raise TransportError(f"cluster.transport is local (this machine alone) but the "
                                 f"inventory names {', '.join(hosts)}; set it to auto or ssh")
        return TransportChoice("local", "cluster.transport: local")
    if setting == "ssh":
        if local:
            raise TransportError("cluster.transport is ssh but the inventory names no host "
                                 "(cluster.hosts, node_ip_list.txt or --hosts)")
        return TransportChoice("ssh", "cluster.transport: ssh")
    if setting == "srun":
        if allocation is None:
            raise TransportError("cluster.transport is srun but this is not inside a Slurm "
                                 "allocation (SLURM_JOB_ID is unset): run fab under salloc or "
                                 "sbatch, or use `fab launch --slurm`")
        if local or outside:
            names = "this machine" if local else ", ".join(outside)
            raise TransportError(f"cluster.transport is srun but {names} is not a node of "
                                 f"Slurm job {allocation.job_id} "
                                 f"({', '.join(allocation.nodes)}); drop --hosts/cluster.hosts "
                                 "to use the allocation's nodes")
        return TransportChoice("srun", f"cluster.transport: srun (job {allocation.job_id})",
                               allocation)
    # auto
    if local:
        return TransportChoice("local", "no inventory: this machine alone, no SSH")
    if allocation is None:
        return TransportChoice("ssh", "not inside a Slurm allocation (SLURM_JOB_ID unset)")
    if outside:
        return TransportChoice("ssh", f"inside Slurm job {allocation.job_id}, but "
                                      f"{', '.join(outside)} is not one of its nodes")
    return TransportChoice("srun", f"inside Slurm job {allocation.job_id} (SLURM_JOB_ID) and "
                                   "every host is one of its nodes", allocation)
