"""Pure helpers of the simulated cluster: names, addresses and the files rendered for nodes.

Nothing here touches the system, so everything is unit-tested in tests/unit.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
MAX_NODES = 64
FIRST_NODE_HOST = 10  # node i gets .(10 + i); .1 is the bridge (the controller's side)
# 10.224.0.0/12 holds 4096 /24s: room for many clusters without touching usual private ranges.
SUBNET_POOL = ipaddress.ip_network("10.224.0.0/12")
IFNAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
SSHD_PATH_DEFAULT = "/usr/sbin/sshd"


def validate_name(name: str) -> str:
    """Cluster names become hostnames, netns names and a state directory: keep them tame."""
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"cluster name {name!r} is invalid: use 1-40 of a-z, 0-9 and '-', starting with a "
            "letter or digit"
        )
    return name


def parse_ifnames(spec: str | Sequence[str] | None, nodes: int) -> list[str]:
    """Per-node interface names: None means eth0 everywhere; a short list repeats its last."""
    if spec is None or spec == "" or spec == []:
        names = ["eth0"]
    elif isinstance(spec, str):
        names = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        names = [str(part) for part in spec]
    for ifname in names:
        if not IFNAME_PATTERN.match(ifname) or ifname == "lo":
            raise ValueError(
                f"interface name {ifname!r} is invalid: 1-15 of letters, digits, '_', '.', '-' "
                "and not 'lo'"
            )
    if len(names) > nodes:
        raise ValueError(f"{len(names)} interface names given for {nodes} nodes")
    return names + [names[-1]] * (nodes - len(names))


def validate_node_count(nodes: int) -> int:
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"node count {nodes} is out of range: use 1..{MAX_NODES}")
    return nodes


def subnet_candidates(name: str) -> Iterator[ipaddress.IPv4Network]:
    """Every /24 of the pool, starting at the one the name hashes to (deterministic per name)."""
    subnets = list(SUBNET_POOL.subnets(new_prefix=24))
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % len(subnets)
    for offset in range(len(subnets)):
        yield subnets[(start + offset) % len(subnets)]


def pick_subnet(name: str, taken: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    taken = list(taken)
    for subnet in subnet_candidates(name):
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise RuntimeError(f"no free /24 left in {SUBNET_POOL}; run `scripts/sim-cluster down --all`")


def link_prefix(subnet: ipaddress.IPv4Network) -> str:
    """Bridge and veth names come from the subnet, which is unique on the host by construction.

    Interface names are limited to 15 characters, too short for the cluster name itself.
    """
    octets = subnet.network_address.packed
    return f"sc{octets[1]:02x}{octets[2]:02x}"


def bridge_name(subnet: ipaddress.IPv4Network) -> str:
    return f"{link_prefix(subnet)}br"


def host_veth_name(subnet: ipaddress.IPv4Network, index: int) -> str:
    return f"{link_prefix(subnet)}v{index}"


def gateway_address(subnet: ipaddress.IPv4Network) -> str:
    return str(subnet.network_address + 1)


def node_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    return str(subnet.network_address + FIRST_NODE_HOST + index)


def netns_name(cluster: str, index: int) -> str:
    return f"simc-{cluster}-n{index}"


def node_hostname(cluster: str, index: int) -> str:
    return f"{cluster}-node{index}"


def cgroup_parent(cluster: str, index: int) -> str:
    return f"simc-{cluster}-n{index}"


def render_sshd_config(
    *, address: str, host_key: str, authorized_keys: str, log_level: str = "INFO",
    sftp_server: str = "/usr/lib/openssh/sftp-server",
) -> str:
    # AcceptEnv and PermitUserEnvironment are left at OpenSSH's compiled defaults (none / no):
    # the task library must pass everything through its env script, as on a real cluster.
    return "\n".join([
        "Port 22",
        f"ListenAddress {address}",
        f"HostKey {host_key}",
        "PidFile /run/sshd.pid",
        f"AuthorizedKeysFile {authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "UseDNS no",
        # Tests open many sessions at once (ThreadingGroup, asynchronous runs).
        "MaxStartups 100",
        "MaxSessions 100",
        f"LogLevel {log_level}",
        f"Subsystem sftp {sftp_server}",
        "",
    ])


def render_hosts_file(entries: Iterable[tuple[str, str]]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{hostname}" for address, hostname in entries]
    return "\n".join(lines) + "\n"


def known_hosts_line(address: str, public_key_line: str, *aliases: str) -> str:
    """One known_hosts entry from an OpenSSH .pub line ('type base64 [comment]')."""
    key_type, key_b64 = public_key_line.split()[:2]
    return f"{','.join((address, *aliases))} {key_type} {key_b64}"


def render_ssh_client_config(*, key_path: str, known_hosts_path: str) -> str:
    """/etc/ssh/ssh_config inside nodes: node-to-node SSH works like on a prepared cluster."""
    return "\n".join([
        "Host *",
        f"    IdentityFile {key_path}",
        f"    UserKnownHostsFile {known_hosts_path}",
        "    StrictHostKeyChecking yes",
        "",
    ])


def fabric_config(
    *, key_path: str, known_hosts_path: str, hosts: Sequence[str], workdir: str, venv: str | None,
    docker: bool, image: str, container_volumes: Sequence[str],
    registry_dir: str | None = None,
) -> dict:
    """The runtime config for `fab -f FILE task` (Fabric's keys plus the project's).

    venv None leaves cluster.venv out: the task library then looks for <workdir>/.venv.
    registry_dir None leaves cluster.registry_dir out: the per-user default, as for a user.
    """
    config = {
        "user": "root",
        "connect_kwargs": {
            "key_filename": [key_path],
            # Only the cluster's key: a test must not pass thanks to someone's agent or ~/.ssh.
            "look_for_keys": False,
            "allow_agent": False,
        },
        "timeouts": {"connect": 5},
        "cluster": {
            "hosts": list(hosts),
            "known_hosts": known_hosts_path,
            "host_key_policy": "reject",
            "workdir": workdir,
            "venv": venv,
            "registry_dir": registry_dir,
        },
        "docker": {
            "enabled": docker,
            "image": image,
            "platform": "cpu",
            "volumes": list(container_volumes),
            # The sandbox lacks CAP_SYS_RESOURCE: memlock cannot be raised to unlimited here.
            "ulimits": {"memlock": None},
        },
    }
    for key, value in (("venv", venv), ("registry_dir", registry_dir)):
        if value is None:
            del config["cluster"][key]
    return config


def cgroup_mount_commands(mountinfo: str) -> list[str]:
    """Shell commands that rebuild the host's cgroup mounts under a freshly mounted /sys.

    A node mounts its own sysfs (so /sys/class/net shows the node's interfaces), which hides the
    host's cgroup mounts; dockerd needs them back. Mirrors the host (v1, hybrid or v2); mounts
    cgroup2 when the host has none.
    """
    commands: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        mount_point, fstype, super_options = fields[4], fields[sep + 1], fields[sep + 3]
        if mount_point == "/sys/fs/cgroup" and fstype == "tmpfs":
            commands.append("mount -t tmpfs -o nosuid,nodev,noexec,mode=755 tmpfs /sys/fs/cgroup")
        elif mount_point.startswith("/sys/fs/cgroup") and fstype in ("cgroup", "cgroup2"):
            commands.append(f"mkdir -p {mount_point}")
            commands.append(f"mount -t {fstype} -o {super_options} {fstype} {mount_point}")
    if not commands:
        commands.append("mount -t cgroup2 cgroup2 /sys/fs/cgroup")
    return commands
