"""A multi-node test cluster on one machine: every node is a set of Linux namespaces.

Each node has its own network namespace (an address on the cluster's bridge, interface named
as asked), hostname (UTS), mount namespace (private /run, /tmp, /srv, /dev/shm, /etc/hosts and a
sysfs of its own), IPC and pid namespace (a node's `ps` and `pkill` see only that node). The
rest of the filesystem (/usr, /work/main and its venv, the base Python) is the host's, like a
cluster with the toolchain installed everywhere. Each node runs sshd on port 22 of its address
and, on request, its own containerd + dockerd.

A node's processes all live in its pid namespace, whose init (a tiny reaper) is recorded by
pid + start time; killing that init makes the kernel kill everything else in the node. Every
pid started is recorded in the cluster's state file so that `scripts/sim-cluster down` cleans
up after a run that was killed.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import fcntl
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from . import image, naming, procs
from . import slurm as slurm_module
from .procs import ProcessId

STATE_ROOT_DEFAULT = "/var/lib/sim-cluster"
STATE_VERSION = 1
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NODE_ENV = {"PATH": STANDARD_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
            "SHELL": "/bin/bash", "LANG": "C.UTF-8"}
READY_TIMEOUT_S = 15.0
SSH_READY_TIMEOUT_S = 15.0
DOCKER_READY_TIMEOUT_S = 45.0

NODE_INIT = Path(__file__).with_name("node_init.py")

class SimClusterError(RuntimeError):
    """The cluster cannot be brought up or used; the message says what and how to fix it."""


class NodeCommandError(subprocess.CalledProcessError):
    def __init__(self, node: str, returncode: int, cmd: str, output: str, stderr: str):
        super().__init__(returncode, cmd, output, stderr)
        self.node = node

    def __str__(self) -> str:
        tail = (self.stderr or self.output or "").strip().splitlines()[-5:]
        return f"{self.node}: `{self.cmd}` exited {self.returncode}: " + " | ".join(tail)


def default_state_root() -> Path:
    return Path(os.environ.get("SIM_CLUSTER_STATE_ROOT", STATE_ROOT_DEFAULT))


def default_venv() -> Path | None:
    """The venv the nodes should use: the one running this process, else the checkout's.

    None when there is neither (the generated config then leaves cluster.venv out).
    """
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    checkout_venv = image.repo_root() / ".venv"
    return checkout_venv if checkout_venv.is_dir() else None


def _tool(name: str) -> str | None:
    return shutil.which(name, path=STANDARD_PATH + ":" + os.environ.get("PATH", ""))


@lru_cache(maxsize=None)
def _namespace_probe() -> str | None:
    unshare = _tool("unshare")
    if unshare is None:
        return "unshare not found (install util-linux)"
    probe = subprocess.run(
        [unshare, "--net", "--uts", "--ipc", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True, text=True, timeout=10,
    )
    if probe.returncode != 0:
        return "cannot create namespaces: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
    return None


def missing_capability(docker: bool = False) -> str | None:
    """None when this machine can run a cluster, else a one-line reason."""
    if os.geteuid() != 0:
        return "needs root (network, mount and pid namespaces, veth, bridge)"
    tools = ["ip", "unshare", "nsenter", "sshd", "ssh-keygen", "mount"]
    if docker:
        tools += ["dockerd", "containerd", "docker"]
    missing = [tool for tool in tools if _tool(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (run scripts/install-system-deps as root)"
    if not Path("/proc/self/ns/net").exists():
        return "kernel without namespaces"
    return _namespace_probe()


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PATH": STANDARD_PATH})
    if check and result.returncode != 0:
        raise SimClusterError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
    return result


def _write_private(path: Path, text: str, mode: int = 0o644) -> None:
    partial = path.with_name(path.name + f".tmp{os.getpid()}.{threading.get_ident()}")
    partial.write_text(text)
    partial.chmod(mode)
    partial.replace(path)


@dataclass
class SimNode:
    """One node. `address` is reachable from the controller (the root namespace) on port 22."""

    index: int
    name: str
    hostname: str
    address: str
    ifname: str
    netns: str
    host_veth: str
    dir: Path            # this node's state on the host
    srv_dir: Path        # the host directory this node sees as /srv
    cgroup_parent: str
    ssh_port: int = 22
    pids: dict[str, ProcessId] = field(default_factory=dict)
    pid_ns: int | None = None

    @property
    def run_dir(self) -> Path:
        """The host directory this node sees as /run (and /var/run)."""
        return self.dir / "run"

    @property
    def tmp_dir(self) -> Path:
        """The host directory this node sees as /tmp."""
        return self.dir / "tmp"

    @property
    def docker_host(self) -> str:
        """DOCKER_HOST for talking to this node's engine from the controller."""
        return f"unix://{self.run_dir / 'docker.sock'}"

    @property
    def init(self) -> ProcessId | None:
        return self.pids.get("init")

    def to_json(self) -> dict:
        return {
            "index": self.index, "name": self.name, "hostname": self.hostname,
            "address": self.address, "ifname": self.ifname, "netns": self.netns,
            "host_veth": self.host_veth, "dir": str(self.dir), "srv_dir": str(self.srv_dir),
            "cgroup_parent": self.cgroup_parent, "ssh_port": self.ssh_port,
            "pids": {role: pid.to_json() for role, pid in self.pids.items()},
            "pid_ns": self.pid_ns,
        }

    @classmethod
    def from_json(cls, data: dict) -> "SimNode":
        return cls(
            index=data["index"], name=data["name"], hostname=data["hostname"],
            address=data["address"], ifname=data["ifname"], netns=data["netns"],
            host_veth=data["host_veth"], dir=Path(data["dir"]), srv_dir=Path(data["srv_dir"]),
            cgroup_parent=data["cgroup_parent"], ssh_port=data.get("ssh_port", 22),
            pids={role: ProcessId.from_json(v) for role, v in data.get("pids", {}).items()},
            pid_ns=data.get("pid_ns"),
        )


class SimCluster:
    """N namespace nodes reachable over real SSH; see the module docstring and docs/SIM_CLUSTER.md.

    >>> with SimCluster(name="demo", nodes=2) as c:
    ...     c.exec(0, "hostname").stdout
    """

    def __init__(
        self, name: str = "sim", nodes: int = 3, docker: bool = False, shared_fs: bool = False,
        ifnames: str | Sequence[str] | None = None, workdir: str = "/srv/gemm",
        state_root: str | Path | None = None, venv: str | Path | None = None,
        slurm: bool = False, slurm_accounting: bool = True,
    ) -> None:
        self.name = naming.validate_name(name)
        self.node_count = naming.validate_node_count(nodes)
        self.docker = docker
        self.slurm = slurm
        # slurmdbd + MariaDB, so that sacct answers (a few seconds more bring-up).
        self.slurm_accounting = slurm and slurm_accounting
        self.shared_fs = shared_fs
        self.ifnames = naming.parse_ifnames(ifnames, nodes)
        self.workdir = workdir
        self.state_root = Path(state_root) if state_root else default_state_root()
        self.state_dir = self.state_root / self.name
        self.venv: Path | None = Path(venv) if venv else default_venv()
        self.image = image.IMAGE_TAG
        self.container_volumes: list[str] = image.container_volumes(venv=self.venv)
        self.nodes: list[SimNode] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge: str | None = None
        self.timings: dict[str, float] = {}
        self._popens: list[subprocess.Popen] = []
        self._state_lock = threading.Lock()
        self._is_up = False
        self._detached = False
        self._owns_state_dir = False
        self.forward_rule: list[str] | None = None
        # Daemons of the controller's side (Slurm mode: munged, slurmctld), killed at tear-down.
        self.host_pids: dict[str, ProcessId] = {}

    # -- paths -----------------------------------------------------------------------------

    @property
    def key_path(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def known_hosts_path(self) -> Path:
        return self.state_dir / "known_hosts"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def fabric_config_path(self) -> Path:
        return self.state_dir / "fabric.yaml"

    @property
    def hosts(self) -> list[str]:
        return [node.address for node in self.nodes]

    @property
    def slurm_layout(self) -> slurm_module.SlurmLayout:
        """Paths of this cluster's Slurm (slurm.conf, munge socket, logs); see docs/SLURM.md."""
        return slurm_module.SlurmLayout(self.state_dir / "slurm")

    @property
    def slurm_env(self) -> dict[str, str]:
        """What a Slurm client tool needs to talk to this cluster: SLURM_CONF."""
        return {"SLURM_CONF": str(self.slurm_layout.conf)}

    @property
    def up_seconds(self) -> float | None:
        return self.timings.get("total")

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> "SimCluster":
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def up(self) -> "SimCluster":
        """Brings every node up (no-op when this object is already up). Raises SimClusterError."""
        if self._is_up:
            return self
        reason = missing_capability(docker=self.docker)
        if reason is None and self.slurm:
            reason = slurm_module.missing_capability(accounting=self.slurm_accounting)
        if reason:
            raise SimClusterError(f"cannot start cluster {self.name!r}: {reason}")
        started = time.monotonic()
        atexit.register(self.down)
        try:
            self._create_network_and_state()
            self.timings["network"] = time.monotonic() - started
            self._start_nodes()
            self.timings["nodes"] = time.monotonic() - started
            self._wait_ssh()
            self.timings["ssh"] = time.monotonic() - started
            if self.docker:
                self._start_docker_images()
                self.timings["docker"] = time.monotonic() - started
            if self.slurm:
                slurm_module.start(self)
                self.timings["slurm"] = time.monotonic() - started
            self.write_fabric_config()
        except BaseException:
            self.down()
            raise
        self._is_up = True
        self.timings["total"] = time.monotonic() - started
        return self

    def down(self) -> None:
        """Ends every recorded pid and removes netns, veths, bridge, cgroups, mounts and dirs."""
        atexit.unregister(self.down)
        self._is_up = False
        if self._owns_state_dir and self.nodes and self.state_file.exists():
            self._save_state()  # pids recorded in memory since the last save (failed bring-up)
        if self.state_file.exists():
            teardown(self.state_dir, popens=self._popens)
        elif self.state_dir.exists() and self._owns_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        for popen in self._popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)
        self._popens.clear()

    @classmethod
    def attach(cls, name: str, state_root: str | Path | None = None) -> "SimCluster":
        """A handle on a running cluster from its state file (e.g. one `sim-cluster up` made).

        Its `down()` tears the cluster down; dropping the handle leaves it running.
        """
        root = Path(state_root) if state_root else default_state_root()
        state_file = root / naming.validate_name(name) / "state.json"
        if not state_file.exists():
            raise SimClusterError(f"no cluster named {name!r} under {root} "
                                  "(see `scripts/sim-cluster status`)")
        state = json.loads(state_file.read_text())
        cluster = cls(name=name, nodes=state["nodes"], docker=state["docker"],
                      shared_fs=state["shared_fs"], slurm=state.get("slurm", False),
                      slurm_accounting=state.get("slurm_accounting", False),
                      ifnames=[node["ifname"] for node in state["node"]] or None,
                      workdir=state["workdir"], state_root=root)
        cluster.subnet = ipaddress.ip_network(state["subnet"])
        cluster.bridge = state["bridge"]
        cluster.nodes = [SimNode.from_json(node) for node in state["node"]]
        cluster.host_pids = {role: ProcessId.from_json(value)
                             for role, value in (state.get("host_pids") or {}).items()}
        cluster._detached = state.get("owner") is None
        cluster._is_up = True
        return cluster

    def detach(self) -> None:
        """Leaves the cluster running after this process exits (the CLI's `up`)."""
        atexit.unregister(self.down)
        self._detached = True
        self._save_state()

    # -- bring-up steps --------------------------------------------------------------------

    def _create_network_and_state(self) -> None:
        self.state_root.mkdir(parents=True, exist_ok=True)
        with state_root_lock(self.state_root):
            if self.state_dir.exists():
                # A leftover of a killed run (or of another process using the same name).
                teardown(self.state_dir)
            taken = _host_networks() + [
                ipaddress.ip_network(state["subnet"])
                for _, state in list_states(self.state_root) if state.get("subnet")
            ]
            self.subnet = naming.pick_subnet(self.name, taken)
            self.bridge = naming.bridge_name(self.subnet)
            self.state_dir.mkdir(mode=0o700)
            self._owns_state_dir = True
            self.nodes = [self._plan_node(i) for i in range(self.node_count)]
            self._save_state()  # before the first link exists, so a crash is cleanable
            gateway = naming.gateway_address(self.subnet)
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "-b", "-"], input=(
            f"addr add {gateway}/{self.subnet.prefixlen} dev {self.bridge}\n"
            f"link set {self.bridge} up\n"
        ))
        self.forward_rule = bridge_forward_rule(self.bridge, self.name)
        if self.forward_rule:
            self._save_state()

    def _plan_node(self, index: int) -> SimNode:
        assert self.subnet is not None
        node_dir = self.state_dir / "nodes" / str(index)
        srv_dir = self.state_dir / "shared-srv" if self.shared_fs else node_dir / "srv"
        return SimNode(
            index=index, name=f"node{index}", hostname=naming.node_hostname(self.name, index),
            address=naming.node_address(self.subnet, index), ifname=self.ifnames[index],
            netns=naming.netns_name(self.name, index),
            host_veth=naming.host_veth_name(self.subnet, index), dir=node_dir, srv_dir=srv_dir,
            cgroup_parent=naming.cgroup_parent(self.name, index),
        )

    def _start_nodes(self) -> None:
        self._write_keys_and_files()
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.node_count) as pool:
            for future in [pool.submit(self._start_node, node) for node in self.nodes]:
                future.result()

    def _write_keys_and_files(self) -> None:
        keygen = [
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sim-cluster-{self.name}",
             "-f", str(self.key_path)]
        ]
        for node in self.nodes:
            for sub in ("run", "tmp", "etc-docker"):
                (node.dir / sub).mkdir(parents=True, exist_ok=True)
            node.tmp_dir.chmod(0o1777)
            (node.run_dir / "sshd").mkdir(mode=0o755)  # sshd's privilege-separation directory
            node.srv_dir.mkdir(parents=True, exist_ok=True)
            keygen.append(["ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                           "-C", node.hostname, "-f", str(node.dir / "ssh_host_ed25519_key")])
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(_run, keygen))
        shutil.copyfile(self.key_path.with_suffix(".pub"), self.state_dir / "authorized_keys")
        known_hosts = [
            naming.known_hosts_line(
                node.address, (node.dir / "ssh_host_ed25519_key.pub").read_text(),
                node.hostname)
            for node in self.nodes
        ]
        _write_private(self.known_hosts_path, "\n".join(known_hosts) + "\n")
        _write_private(self.state_dir / "ssh_config", naming.render_ssh_client_config(
            key_path=str(self.key_path), known_hosts_path=str(self.known_hosts_path)))
        _write_private(self.state_dir / "hosts", naming.render_hosts_file(
            (node.address, node.hostname) for node in self.nodes))
        # No name server: the host's is unreachable from the nodes' network, and every reverse
        # lookup (c10d does them for peer addresses) would wait for its timeout. Without a
        # nameserver line glibc asks 127.0.0.1, which refuses at once; /etc/hosts names the nodes.
        _write_private(self.state_dir / "resolv.conf", "options timeout:1 attempts:1\n")
        sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server")
                     if os.path.exists(p)), "internal-sftp")
        for node in self.nodes:
            _write_private(node.dir / "sshd_config", naming.render_sshd_config(
                address=node.address, host_key=str(node.dir / "ssh_host_ed25519_key"),
                authorized_keys=str(self.state_dir / "authorized_keys"), sftp_server=sftp))

    def _start_node(self, node: SimNode) -> None:
        assert self.subnet is not None and self.bridge is not None
        _run(["ip", "netns", "add", node.netns])
        _run(["ip", "-b", "-"], input=(
            f"link add {node.host_veth} type veth peer name {node.ifname} netns {node.netns}\n"
            f"link set {node.host_veth} master {self.bridge} up\n"
        ))
        _run(["ip", "-n", node.netns, "-b", "-"], input=(
            "link set lo up\n"
            f"addr add {node.address}/{self.subnet.prefixlen} dev {node.ifname}\n"
            f"link set {node.ifname} up\n"
            f"route add default via {naming.gateway_address(self.subnet)}\n"
        ))
        self._start_holder(node)
        self.exec(node.index, f"exec /usr/sbin/sshd -f {node.dir}/sshd_config "
                              f"-E {node.dir}/sshd.log", timeout=15)
        if self.docker:
            self._start_docker_daemons(node)

    def _paths_under_tmp(self) -> list[Path]:
        paths = [image.repo_root().resolve(), Path(sys.base_prefix).resolve()]
        if self.venv is not None:
            paths.append(self.venv.resolve())
        under = [p for p in paths if p.is_relative_to("/tmp") and p != Path("/tmp")]
        # The venv inside the checkout comes with it.
        return [p for p in under if not any(p != q and p.is_relative_to(q) for q in under)]

    def _start_holder(self, node: SimNode) -> None:
        script = "\n".join([
            "set -e",
            # /run first: mount(8) keeps its bookkeeping under /run, which must be the node's.
            f"mount --bind {node.run_dir} /run",
            "if mount -t sysfs -o nosuid,nodev,noexec sysfs /sys; then",
            *("  " + cmd for cmd in naming.cgroup_mount_commands(
                Path("/proc/self/mountinfo").read_text())),
            "fi",
            # A checkout (or venv) under /tmp must stay visible on the nodes, like the rest of
            # the host's files: bind it into the node's own /tmp before that covers the host's.
            *(f"mkdir -p {node.tmp_dir}/{path.relative_to('/tmp')} && "
              f"mount --bind {path} {node.tmp_dir}/{path.relative_to('/tmp')}"
              for path in self._paths_under_tmp()),
            f"mount --rbind {node.tmp_dir} /tmp",
            f"mount --bind {node.srv_dir} /srv",
            "mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm",
            f"mount --bind {self.state_dir}/hosts /etc/hosts",
            f"if [ -f /etc/resolv.conf ]; then "
            f"mount --bind {self.state_dir}/resolv.conf /etc/resolv.conf; fi",
            f"if [ -f /etc/ssh/ssh_config ]; then "
            f"mount --bind {self.state_dir}/ssh_config /etc/ssh/ssh_config; fi",
            # dockerd writes /etc/docker/key.json: each node keeps its own.
            f"if [ -d /etc/docker ]; then mount --bind {node.dir}/etc-docker /etc/docker; fi",
            f"exec {sys.executable} -I -S {NODE_INIT} {node.hostname}",
        ])
        argv = ["nsenter", f"--net=/run/netns/{node.netns}", "--",
                "unshare", "--uts", "--ipc", "--pid", "--kill-child", "--mount-proc",
                "--propagation", "private", "--", "/bin/sh", str(node.dir / "setup.sh")]
        _write_private(node.dir / "setup.sh", script + "\n")
        with open(node.dir / "holder.log", "ab") as log:
            holder = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                env=NODE_ENV, start_new_session=True)
        self._popens.append(holder)
        self._record_pid(node, "holder", ProcessId(holder.pid, procs.process_id(holder.pid).start))
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], READY_TIMEOUT_S)
        line = holder.stdout.readline() if ready else b""
        holder.stdout.close()
        if line.strip() != b"ready":
            log_tail = (node.dir / "holder.log").read_text(errors="replace").strip()[-500:]
            raise SimClusterError(f"{node.name}: namespaces did not come up: {log_tail}")
        init_pids = procs.children(holder.pid)
        if len(init_pids) != 1:
            raise SimClusterError(f"{node.name}: expected one init under {holder.pid}")
        self._record_pid(node, "init", procs.process_id(init_pids[0]))
        node.pid_ns = procs.namespace_inode(init_pids[0], "pid")
        self._save_state()

    def _start_docker_daemons(self, node: SimNode) -> None:
        containerd_dir = node.dir / "containerd"
        containerd_dir.mkdir(exist_ok=True)
        # Our own containerd, because the one dockerd would start writes /opt/containerd.
        _write_private(node.dir / "containerd.toml", "\n".join([
            "version = 2",
            f'root = "{containerd_dir}/root"',
            'state = "/run/containerd"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            '  address = "/run/containerd/containerd.sock"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{containerd_dir}/opt"',
            "",
        ]))
        _write_private(node.dir / "daemon.json", "{}\n")
        self.exec(node.index, f"setsid containerd --config {node.dir}/containerd.toml "
                              f"</dev/null >>{node.dir}/containerd.log 2>&1 & "
                              "echo $! >/run/containerd.pid")
        _wait_for(lambda: (node.run_dir / "containerd" / "containerd.sock").exists(),
                  DOCKER_READY_TIMEOUT_S, f"{node.name}: containerd did not start "
                  f"(see {node.dir}/containerd.log)")
        dockerd = " ".join([
            "setsid dockerd", f"--config-file={node.dir}/daemon.json",
            f"--data-root={node.dir}/docker", "--exec-root=/run/docker",
            "--pidfile=/run/docker.pid", "--host=unix:///run/docker.sock",
            "--containerd=/run/containerd/containerd.sock",
            "--storage-driver=vfs", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--bridge=none", "--userland-proxy=false", f"--cgroup-parent=/{node.cgroup_parent}",
            "--log-level=warn",
        ])
        self.exec(node.index, f"{dockerd} </dev/null >>{node.dir}/dockerd.log 2>&1 &")

    def _wait_ssh(self) -> None:
        deadline = time.monotonic() + SSH_READY_TIMEOUT_S
        for node in self.nodes:
            while not _ssh_banner(node.address, node.ssh_port):
                if time.monotonic() > deadline:
                    raise SimClusterError(f"{node.name}: sshd not answering on "
                                          f"{node.address}:22 (see {node.dir}/sshd.log)")
                time.sleep(0.02)
            self._record_daemon(node, "sshd", node.run_dir / "sshd.pid")
        self._save_state()

    def _start_docker_images(self) -> None:
        tar = image.cached_rootfs_tar(self.state_root / ".cache")

        def ready_and_import(node: SimNode) -> None:
            socket_path = node.run_dir / "docker.sock"
            _wait_for(lambda: _docker_ping(socket_path), DOCKER_READY_TIMEOUT_S,
                      f"{node.name}: dockerd did not start (see {node.dir}/dockerd.log)")
            self._record_daemon(node, "containerd", node.run_dir / "containerd.pid")
            self._record_daemon(node, "dockerd", node.run_dir / "docker.pid")
            subprocess.run(["docker", "import", str(tar), self.image], check=True,
                           capture_output=True, env={**NODE_ENV, "DOCKER_HOST": node.docker_host},
                           timeout=DOCKER_READY_TIMEOUT_S)

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.node_count) as pool:
            for future in [pool.submit(ready_and_import, node) for node in self.nodes]:
                future.result()
        self._save_state()

    def _record_daemon(self, node: SimNode, role: str, pidfile: Path) -> None:
        """Maps a daemon's pid file (a pid inside the node) to its host pid and records it."""
        assert node.pid_ns is not None
        deadline = time.monotonic() + 5
        while True:
            # IndexError: the daemon created its pid file and has not written it yet.
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                host = procs.host_pid(int(pidfile.read_text().split()[0]), node.pid_ns)
                if host is not None:
                    self._record_pid(node, role, procs.process_id(host))
                    return
            if time.monotonic() > deadline:
                raise SimClusterError(f"{node.name}: {role} wrote no usable pid file {pidfile}")
            time.sleep(0.02)

    def _start_host_daemon(self, role: str, argv: Sequence[str], log: Path,
                           env: dict[str, str] | None = None) -> ProcessId:
        """Starts a foreground daemon on the controller's side, recorded for tear-down."""
        with open(log, "ab") as out:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env or NODE_ENV, cwd="/",
                                     start_new_session=True)
        self._popens.append(popen)
        pid = procs.process_id(popen.pid)
        with self._state_lock:
            self.host_pids[role] = pid
        self._save_state()
        return pid

    def _record_pid(self, node: SimNode, role: str, pid: ProcessId) -> None:
        with self._state_lock:
            node.pids[role] = pid

    # -- state -----------------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "version": STATE_VERSION, "name": self.name, "nodes": self.node_count,
            "docker": self.docker, "shared_fs": self.shared_fs, "workdir": self.workdir,
            "slurm": self.slurm, "slurm_accounting": self.slurm_accounting,
            "host_pids": {role: pid.to_json() for role, pid in self.host_pids.items()},
            "subnet": str(self.subnet), "bridge": self.bridge, "forward_rule": self.forward_rule,
            "owner": None if self._detached else procs.process_id(os.getpid()).to_json(),
            "created": time.time(), "key_path": str(self.key_path),
            "known_hosts": str(self.known_hosts_path),
            "fabric_config": str(self.fabric_config_path),
            "node": [node.to_json() for node in self.nodes],
        }

    def _save_state(self) -> None:
        with self._state_lock:
            _write_private(self.state_file, json.dumps(self._state(), indent=1), 0o600)

    # -- use -------------------------------------------------------------------------------

    def nsenter_argv(self, index: int) -> list[str]:
        """argv prefix that runs a program inside node `index` (all its namespaces, as root)."""
        if not 0 <= index < len(self.nodes):
            raise SimClusterError(f"cluster {self.name!r} has no node {index} "
                                  f"({len(self.nodes)} nodes; is it up?)")
        node = self.nodes[index]
        if node.init is None or not procs.is_running(node.init):
            raise SimClusterError(f"{node.name} of cluster {self.name!r} is not running")
        return ["nsenter", f"--target={node.init.pid}", "--net", "--uts", "--mount", "--ipc",
                "--pid", "--wd=/"]

    def ssh_argv(self, index: int) -> list[str]:
        """argv prefix of an OpenSSH client session to node `index` (host key checked)."""
        node = self.nodes[index]
        return ["ssh", "-i", str(self.key_path),
                "-o", f"UserKnownHostsFile={self.known_hosts_path}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-p", str(node.ssh_port), f"root@{node.address}"]

    def exec(self, index: int, command: str, *, check: bool = True, timeout: float = 60,
             env: dict[str, str] | None = None, input: str | None = None,
             ) -> subprocess.CompletedProcess[str]:
        """Runs `bash -c command` inside node `index` as root, without SSH.

        The environment is a plain root login's (PATH standard, HOME=/root) plus `env`; the
        working directory is /. On timeout the command and its process group are killed.
        """
        argv = self.nsenter_argv(index) + ["/bin/bash", "-c", command]
        popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**NODE_ENV, **(env or {})}, cwd="/", start_new_session=True)
        try:
            stdout, stderr = popen.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise SimClusterError(
                f"{self.nodes[index].name}: `{command}` timed out after {timeout} s") from None
        result = subprocess.CompletedProcess(argv, popen.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise NodeCommandError(self.nodes[index].name, result.returncode, command,
                                   stdout, stderr)
        return result

    def slurm_run(self, argv: Sequence[str], *, user: str | None = None, check: bool = True,
                  timeout: float = 60, cwd: str = "/tmp",
                  ) -> subprocess.CompletedProcess[str]:
        """Runs a Slurm client tool (srun, sbatch, squeue, ...) on the controller's side, as
        root or as `user` (e.g. slurm.OTHER_USER). `cwd` is also the tasks' working directory
        on the nodes (srun's default --chdir), so it must exist there: /tmp does."""
        if not self.slurm:
            raise SimClusterError(f"cluster {self.name!r} runs no Slurm (SimCluster(slurm=True))")
        argv = slurm_module.client_argv(self.slurm_layout, argv, user=user)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                env=NODE_ENV, cwd=cwd)
        if check and result.returncode != 0:
            raise NodeCommandError("controller", result.returncode, " ".join(argv),
                                   result.stdout, result.stderr)
        return result

    def write_fabric_config(self, path: str | Path | None = None) -> Path:
        """Writes the runtime config for `fab -f FILE task`; returns its path."""
        target = Path(path) if path else self.fabric_config_path
        config = naming.fabric_config(
            key_path=str(self.key_path), known_hosts_path=str(self.known_hosts_path),
            hosts=self.hosts, workdir=self.workdir, venv=str(self.venv) if self.venv else None,
            docker=self.docker, image=self.image, container_volumes=self.container_volumes)
        header = (f"# Runtime config of sim-cluster {self.name!r}: fab -f {target} <task>\n"
                  f"# Written by tests/simcluster; removed by `scripts/sim-cluster down`.\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_private(target, header + yaml.safe_dump(config, sort_keys=False))
        return target

    def recorded_pids(self) -> list[ProcessId]:
        return [pid for node in self.nodes for pid in node.pids.values()] + \
            list(self.host_pids.values())

    def __repr__(self) -> str:
        state = "up" if self._is_up else "down"
        return f"SimCluster(name={self.name!r}, nodes={self.node_count}, {state})"


# -- module-level helpers (also used by the CLI on state files) --------------------------------


@contextlib.contextmanager
def state_root_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _host_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for line in _run(["ip", "-4", "-o", "addr"]).stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            networks.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in _run(["ip", "-4", "route"]).stdout.splitlines():
        destination = line.split()[0]
        if destination != "default":
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.ip_network(destination, strict=False))
    return networks


def bridge_forward_rule(bridge: str, cluster: str) -> list[str] | None:
    """Lets node-to-node traffic through a FORWARD chain whose policy is DROP.

    With br_netfilter loaded, bridged packets traverse iptables' FORWARD chain; a host dockerd
    started with iptables enabled sets its policy to DROP and would cut the nodes off from each
    other (not from the controller). Returns the rule added (for tear-down) or None.
    """
    call_iptables = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if _tool("iptables") is None or not call_iptables.exists() \
            or call_iptables.read_text().strip() != "1":
        return None
    policy = _run(["iptables", "-S", "FORWARD"], check=False).stdout.splitlines()
    if not policy or policy[0].strip() == "-P FORWARD ACCEPT":
        return None
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment",
            "--comment", f"sim-cluster {cluster}", "-j", "ACCEPT"]
    _run(["iptables", "-I", *rule])
    return rule


def _wait_for(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SimClusterError(message)
        time.sleep(0.05)


def _ssh_banner(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5) as conn:
            return conn.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _docker_ping(socket_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(2)
            conn.connect(str(socket_path))
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in conn.recv(64)
    except OSError:
        return False


def list_states(root: Path | None = None) -> list[tuple[Path, dict]]:
    """(state dir, state) of every cluster recorded under the state root."""
    root = root or default_state_root()
    found = []
    if root.is_dir():
        for state_file in sorted(root.glob("*/state.json")):
            with contextlib.suppress(OSError, ValueError):
                found.append((state_file.parent, json.loads(state_file.read_text())))
    return found


def is_stale(state: dict) -> bool:
    """True for a cluster whose owning process died without tearing it down."""
    owner = state.get("owner")
    return owner is not None and not procs.is_running(ProcessId.from_json(owner))


def _cgroup_mount_points() -> list[Path]:
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2"):
            points.append(Path(fields[1]))
    return points


def _remove_cgroup_tree(top: Path, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while top.exists():
        directories = sorted((p for p in top.rglob("*") if p.is_dir()),
                             key=lambda p: len(p.parts), reverse=True) + [top]
        try:
            for directory in directories:
                directory.rmdir()
        except OSError:  # EBUSY while the last killed task is being released
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def teardown(state_dir: Path, popens: Sequence[subprocess.Popen] = ()) -> None:
    """Destroys everything the state file records; safe to run twice or on a partial bring-up."""
    if not (state_dir / "state.json").exists():  # died before anything was created
        shutil.rmtree(state_dir, ignore_errors=True)
        return
    state = json.loads((state_dir / "state.json").read_text())
    nodes = [SimNode.from_json(data) for data in state.get("node", [])]
    recorded = [pid for node in nodes for pid in node.pids.values()]
    # Killing a node's init makes the kernel kill every process of its pid namespace
    # (daemons, ssh sessions, detached jobs, containers); the rest are killed by pid.
    for node in nodes:
        if "init" in node.pids:
            procs.kill(node.pids["init"])
    # The holder (unshare) reaps its init and exits by itself; killing it first would leave the
    # init a zombie of whoever adopts it.
    holders = [node.pids["holder"] for node in nodes if "holder" in node.pids]
    procs.wait_gone(holders, timeout=5)
    # Controller-side daemons (Slurm mode) after the nodes, so no slurmd sees its controller go.
    recorded += slurm_module.kill_host_daemons(state)
    for pid in recorded:
        procs.kill(pid)
    for popen in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)
    leftover = procs.wait_gone(recorded, timeout=10)
    if leftover:
        raise SimClusterError(f"cluster {state['name']!r}: pids still running after SIGKILL: "
                              f"{[p.pid for p in leftover]}")
    existing_netns = set(_run(["ip", "netns", "list"], check=False).stdout.split())
    for node in nodes:
        if node.netns in existing_netns:
            _run(["ip", "netns", "delete", node.netns], check=False)
        # Deleting the netns deletes its veth end and so the pair; this covers a half-made node.
        if Path(f"/sys/class/net/{node.host_veth}").exists():
            _run(["ip", "link", "delete", node.host_veth], check=False)
    if state.get("forward_rule"):
        _run(["iptables", "-D", *state["forward_rule"]], check=False)
    bridge = state.get("bridge")
    if bridge and Path(f"/sys/class/net/{bridge}").exists():
        _run(["ip", "link", "delete", bridge], check=False)
    for node in nodes:
        for point in _cgroup_mount_points():
            _remove_cgroup_tree(point / node.cgroup_parent)
    shutil.rmtree(state_dir)
