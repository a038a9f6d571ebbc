"""Slurm in the simulated cluster (opt-in: `SimCluster(..., slurm=True)`); see docs/SLURM.md.

The controller's side (the root namespace, where `fab` and the client tools run) gets one munged
and one slurmctld (in a UTS namespace of its own, so its hostname is `<cluster>-ctl` whatever
this machine is called; it listens on a free port of this machine, reached by the nodes through
the bridge address). Every node runs one `slurmd -N <node hostname>` inside its namespaces.
Nothing reads /etc/slurm or /etc/munge: the client tools find this cluster through
`SLURM_CONF=<state>/slurm/slurm.conf`, and every daemon and client reaches munged through the
socket that slurm.conf names (`AuthInfo=socket=...`), so two clusters never meet.

Slurm node names are the node hostnames (`<cluster>-node<i>`): `SLURM_JOB_NODELIST` then names
hosts that every node resolves through its /etc/hosts, as on a real site.

Layout under the cluster's state directory (removed with it):

    slurm/slurm.conf  munge.key  munge/munge.socket  munged.log  slurmctld.log  ctld/ (state)
    slurm/nodes/<node hostname>/spool/  slurmd.log

Without cgroups of its own in the namespaces, tasks are tracked by process tree
(proctrack/linuxproc, task/none): a step's processes are those slurmstepd forked, which is what
scancel, --kill-on-bad-exit and the end of a job signal.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import naming, procs
from .procs import ProcessId

if TYPE_CHECKING:
    from .cluster import SimCluster

OTHER_USER = "gemm-slurm-other"   # a second submitter: scoped stop/cancel must leave it alone
PARTITION = "sim"
NODE_CPUS = 8                     # per node, whatever the machine has (config_overrides)
SLURMD_PORT = 6818                # each node has its own network namespace
READY_TIMEOUT_S = 30.0
TOOLS = ("munged", "slurmctld", "slurmd", "srun", "sinfo", "squeue", "scancel", "sbatch",
         "salloc", "scontrol")
ACCOUNTING_TOOLS = ("slurmdbd", "sacct", "sacctmgr", "mariadbd", "mariadb-install-db")
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class SlurmLayout:
    """Paths of one cluster's Slurm, all under `<state>/slurm`."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_key(self) -> Path:
        return self.root / "munge.key"

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def munged_log(self) -> Path:
        return self.root / "munged.log"

    @property
    def ctld_state(self) -> Path:
        return self.root / "ctld"

    @property
    def ctld_log(self) -> Path:
        return self.root / "slurmctld.log"

    @property
    def dbd_conf(self) -> Path:
        """slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF."""
        return self.root / "slurmdbd.conf"

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def db_socket(self) -> Path:
        return self.db_dir / "mariadbd.sock"

    def node_dir(self, node_name: str) -> Path:
        return self.root / "nodes" / node_name

    def slurmd_log(self, node_name: str) -> Path:
        return self.node_dir(node_name) / "slurmd.log"


def controller_hostname(cluster: str) -> str:
    return f"{cluster}-ctl"


def render_slurm_conf(
    *, cluster: str, control_addr: str, port: int, layout: SlurmLayout,
    nodes: Sequence[tuple[str, str]], cpus: int = NODE_CPUS, dbd_port: int | None = None,
) -> str:
    """slurm.conf of one simulated cluster; `nodes` are (Slurm node name, address) pairs.

    With `dbd_port`, jobs and steps are recorded by the cluster's slurmdbd (sacct works).

    %n in the slurmd paths is the node name (`slurmd -N`), so each slurmd has its own spool and
    log; SlurmdPidFile is under /run, which is private to each node.
    """
    root = layout.root
    lines = [
        f"# slurm.conf of sim-cluster {cluster!r}, rendered by tests/simcluster/slurm.py",
        f"ClusterName={cluster}",
        f"SlurmctldHost={controller_hostname(cluster)}({control_addr})",
        f"SlurmctldPort={port}",
        f"SlurmdPort={SLURMD_PORT}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={layout.munge_socket}",
        f"StateSaveLocation={layout.ctld_state}",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmctldLogFile={layout.ctld_log}",
        f"SlurmdSpoolDir={root}/nodes/%n/spool",
        f"SlurmdLogFile={root}/nodes/%n/slurmd.log",
        "SlurmdPidFile=/run/slurmd.pid",
        # No cgroup hierarchy of the nodes' own: track steps by process tree.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        *([
            "JobAcctGatherType=jobacct_gather/linux",
            "AccountingStorageType=accounting_storage/slurmdbd",
            f"AccountingStorageHost={control_addr}",
            f"AccountingStoragePort={dbd_port}",
            # The munge socket for talking to slurmdbd (its default would be /run/munge's).
            f"AccountingStoragePass={layout.munge_socket}",
            # Keep batch scripts and environments in the database, as sites that want
            # `sacct --batch-script/--env-vars` do: what a job leaves there is testable.
            "AccountingStoreFlags=job_script,job_env",
        ] if dbd_port else [
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
        ]),
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        # Every node claims NODE_CPUS whatever the host has, so that several jobs share nodes.
        "SlurmdParameters=config_overrides",
        # Seconds between SIGTERM and SIGKILL when a step is cancelled or a task fails.
        "KillWait=5",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for name, address in nodes:
        lines.append(f"NodeName={name} NodeAddr={address} NodeHostname={name} CPUs={cpus} "
                     "State=UNKNOWN")
    lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def render_slurmdbd_conf(*, cluster: str, control_addr: str, port: int, db_port: int,
                         layout: SlurmLayout) -> str:
    """slurmdbd.conf: slurmdbd on the controller's side, its MariaDB on 127.0.0.1:db_port."""
    return "\n".join([
        f"# slurmdbd.conf of sim-cluster {cluster!r}, rendered by tests/simcluster/slurm.py",
        "AuthType=auth/munge",
        f"AuthInfo=socket={layout.munge_socket}",
        f"DbdHost={controller_hostname(cluster)}",
        f"DbdAddr={control_addr}",
        f"DbdPort={port}",
        "SlurmUser=root",
        f"LogFile={layout.root}/slurmdbd.log",
        f"PidFile={layout.root}/slurmdbd.pid",
        "StorageType=accounting_storage/mysql",
        "StorageHost=127.0.0.1",
        f"StoragePort={db_port}",
        "StorageUser=root",
        "StorageLoc=slurm_acct_db",
    ]) + "\n"


def missing_capability(accounting: bool = False) -> str | None:
    """None when Slurm and munge (and for accounting slurmdbd + MariaDB) are installed."""
    path = SBIN_PATH + ":" + os.environ.get("PATH", "")
    tools = TOOLS + (ACCOUNTING_TOOLS if accounting else ())
    missing = [tool for tool in tools if shutil.which(tool, path=path) is None]
    if missing:
        return f"missing {', '.join(missing)} (run scripts/install-system-deps as root)"
    return None


def ensure_other_user() -> str:
    """Creates the second submitter (a system user without home or shell) when missing."""
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                        OTHER_USER], check=True, capture_output=True, text=True, timeout=30)
    return OTHER_USER


def free_port() -> int:
    """A TCP port free on every address of this machine (slurmctld binds all of them)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def client_env(layout: SlurmLayout, base: dict[str, str]) -> dict[str, str]:
    return {**base, "SLURM_CONF": str(layout.conf)}


def client_argv(layout: SlurmLayout, argv: Sequence[str], user: str | None = None) -> list[str]:
    """argv that runs a Slurm client tool against this cluster, as root or as `user`."""
    command = ["env", f"SLURM_CONF={layout.conf}", *argv]
    return command if user is None else ["runuser", "-u", user, "--", *command]


def node_states(layout: SlurmLayout, env: dict[str, str]) -> dict[str, str]:
    """{Slurm node name: state} as sinfo reports it ({} while slurmctld does not answer)."""
    result = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N|%T"],
                            capture_output=True, text=True, timeout=10,
                            env=client_env(layout, env))
    if result.returncode != 0:
        return {}
    states = {}
    for line in result.stdout.splitlines():
        name, _, state = line.partition("|")
        states[name.strip()] = state.strip()
    return states


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(cluster: "SimCluster") -> None:
    """Starts munged, slurmctld and every slurmd of an up cluster; waits until all nodes are idle.

    Host-side daemons are recorded in `cluster.host_pids`, slurmd in each node's pids, so that
    tear-down (also of a killed run) ends them by pid.
    """
    from .cluster import NODE_ENV, SimClusterError, _write_private

    assert cluster.subnet is not None
    layout = cluster.slurm_layout
    ensure_other_user()
    # The second submitter must reach slurm.conf and the munge socket: the state directory
    # becomes traversable (not listable); the private key inside stays 0600.
    cluster.state_dir.chmod(0o711)
    for directory in (layout.root, layout.munge_dir, layout.ctld_state):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
    layout.ctld_state.chmod(0o700)
    _write_private(layout.munge_key, os.urandom(1024).hex(), 0o600)
    started = time.monotonic()

    munged = cluster._start_host_daemon("munged", [
        "munged", "--foreground", "--force", f"--key-file={layout.munge_key}",
        f"--socket={layout.munge_socket}", f"--pid-file={layout.munge_dir}/munged.pid",
        f"--seed-file={layout.munge_dir}/munged.seed", f"--log-file={layout.munged_log}",
        "--num-threads=4",
    ], layout.munged_log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not layout.munge_socket.exists():
        if not procs.is_running(munged) or time.monotonic() > deadline:
            raise SimClusterError(f"munged did not start: {_log_tail(layout.munged_log)}")
        time.sleep(0.02)

    gateway = naming.gateway_address(cluster.subnet)
    ctl = controller_hostname(cluster.name)
    for node in cluster.nodes:
        (layout.node_dir(node.hostname) / "spool").mkdir(parents=True, exist_ok=True)
    dbd_port = _start_accounting(cluster, layout, gateway) if cluster.slurm_accounting else None
    _write_private(layout.conf, render_slurm_conf(
        cluster=cluster.name, control_addr=gateway, port=free_port(), layout=layout,
        nodes=[(node.hostname, node.address) for node in cluster.nodes], dbd_port=dbd_port))
    slurmctld = _start_in_holder(cluster, "slurmctld", f"slurmctld -D -f {layout.conf}",
                                 layout.root / "slurmctld.out")

    for node in cluster.nodes:
        cluster.exec(node.index, f"rm -f /run/slurmd.pid; setsid slurmd -D -N {node.hostname} "
                                 f"-f {layout.conf} </dev/null "
                                 f">>{layout.node_dir(node.hostname)}/slurmd.out 2>&1 &")
    for node in cluster.nodes:
        cluster._record_daemon(node, "slurmd", node.run_dir / "slurmd.pid")
    cluster._save_state()

    want = {node.hostname for node in cluster.nodes}
    deadline = time.monotonic() + READY_TIMEOUT_S
    states: dict[str, str] = {}
    while True:
        if not procs.is_running(slurmctld):
            raise SimClusterError(f"slurmctld exited: {_log_tail(layout.ctld_log)}")
        states = node_states(layout, NODE_ENV)
        if set(states) == want and all(state == "idle" for state in states.values()):
            break
        if time.monotonic() > deadline:
            raise SimClusterError(
                f"Slurm nodes not idle after {READY_TIMEOUT_S:.0f} s: {states or 'no answer'} "
                f"(see {layout.ctld_log} and {layout.root}/nodes/*/slurmd.log)")
        time.sleep(0.05)
    cluster.timings["slurm_only"] = time.monotonic() - started


def _start_in_holder(cluster: "SimCluster", role: str, command: str, log: Path,
                     env: dict[str, str] | None = None) -> ProcessId:
    """Starts `command` as init of a new pid + UTS namespace whose hostname is `<cluster>-ctl`.

    slurmctld and slurmdbd check that they run on the host slurm.conf names; the pid namespace
    makes their helpers (slurmscriptd) die with them. Records holder and daemon.
    """
    from .cluster import SimClusterError

    holder = cluster._start_host_daemon(f"{role}-holder", [
        "unshare", "--uts", "--pid", "--fork", "--kill-child", "--", "/bin/sh", "-c",
        f"hostname {controller_hostname(cluster.name)} && exec {command}",
    ], log, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (children := procs.children(holder.pid)):
        if not procs.is_running(holder) or time.monotonic() > deadline:
            raise SimClusterError(f"{role} did not start: {_log_tail(log)}")
        time.sleep(0.01)
    daemon = procs.process_id(children[0])
    with cluster._state_lock:
        cluster.host_pids[role] = daemon
    cluster._save_state()
    return daemon


def _wait_tcp(address: str, port: int, daemon: ProcessId, what: str, log: Path) -> None:
    from .cluster import SimClusterError

    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError), socket.create_connection((address, port), 0.5):
            return
        if not procs.is_running(daemon) or time.monotonic() > deadline:
            raise SimClusterError(f"{what} not answering on {address}:{port}: {_log_tail(log)}")
        time.sleep(0.02)


def _start_accounting(cluster: "SimCluster", layout: SlurmLayout, gateway: str) -> int:
    """MariaDB (data under the state dir, 127.0.0.1 only) and slurmdbd; returns DbdPort."""
    from .cluster import NODE_ENV, SimClusterError, _write_private

    data = layout.db_dir / "data"
    layout.db_dir.mkdir(mode=0o700, exist_ok=True)
    started = time.monotonic()
    server_options = ["--no-defaults", f"--datadir={data}", "--user=root"]
    install = subprocess.run(
        ["mariadb-install-db", *server_options, "--auth-root-authentication-method=normal",
         "--skip-test-db", "--skip-name-resolve", "--innodb-log-file-size=8M"],
        capture_output=True, text=True, timeout=120, env=NODE_ENV, cwd="/")
    if install.returncode != 0:
        raise SimClusterError("mariadb-install-db failed: " + " | ".join(
            (install.stderr or install.stdout).strip().splitlines()[-3:]))
    cluster.timings["slurm_db_install"] = time.monotonic() - started
    db_port = free_port()
    db_log = layout.db_dir / "mariadbd.log"
    mariadbd = cluster._start_host_daemon("mariadbd", [
        "mariadbd", *server_options, f"--socket={layout.db_socket}", f"--port={db_port}",
        "--bind-address=127.0.0.1", f"--pid-file={layout.db_dir}/mariadbd.pid",
        f"--log-error={db_log}", "--skip-log-bin", "--skip-name-resolve",
        "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M",
        "--innodb-lock-wait-timeout=900",
    ], layout.db_dir / "mariadbd.out")
    _wait_tcp("127.0.0.1", db_port, mariadbd, "mariadbd", db_log)
    cluster.timings["slurm_db_up"] = time.monotonic() - started
    dbd_port = free_port()
    _write_private(layout.dbd_conf, render_slurmdbd_conf(
        cluster=cluster.name, control_addr=gateway, port=dbd_port, db_port=db_port,
        layout=layout), 0o600)
    # slurmdbd finds slurmdbd.conf next to SLURM_CONF; slurm.conf itself comes later.
    slurmdbd = _start_in_holder(cluster, "slurmdbd", "slurmdbd -D", layout.root / "slurmdbd.out",
                                env=client_env(layout, NODE_ENV))
    _wait_tcp(gateway, dbd_port, slurmdbd, "slurmdbd", layout.root / "slurmdbd.log")
    cluster.timings["slurm_dbd_up"] = time.monotonic() - started
    return dbd_port


def kill_host_daemons(state: dict) -> list[ProcessId]:
    """Kills the controller-side daemons a state file records; returns them all, to wait on.

    slurmctld first: it is the init of its holder's pid namespace, so the kernel kills what it
    started and the holder reaps it and exits (killing the holder first would leave a zombie).
    """
    recorded = {role: ProcessId.from_json(value)
                for role, value in (state.get("host_pids") or {}).items()}
    holders = [pid for role, pid in recorded.items() if role.endswith("-holder")]
    for role, pid in recorded.items():
        if not role.endswith("-holder"):
            procs.kill(pid)
    procs.wait_gone(holders, timeout=5)
    for pid in holders:
        procs.kill(pid)
    return list(recorded.values())
