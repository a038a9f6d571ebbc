"""Host-key policies (reject / accept-new / auto-add) against the real sshd of simulated nodes.

The pure parts (known_hosts names, messages) run anywhere; the rest needs the cluster.
"""

from __future__ import annotations

import base64
import socket
import subprocess
from pathlib import Path

import paramiko
import pytest
import yaml
from fabric import Config, Connection

from tasks.lib.inventory import Inventory, parse_host_entry
from tasks.lib.settings import ClusterSettings
from tasks.nodes import RecordNewHostKeyPolicy, SshNode, describe_error, on_each, open_nodes


def fresh_public_key(tmp_path: Path) -> str:
    """'ssh-ed25519 BASE64' of a new key: what a reinstalled node would offer."""
    key = tmp_path / f"key{len(list(tmp_path.glob('key*')))}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return " ".join(key.with_suffix(".pub").read_text().split()[:2])


def fresh_key(tmp_path: Path) -> paramiko.PKey:
    key_type, key_b64 = fresh_public_key(tmp_path).split()
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))


def test_known_hosts_name_and_recorded_format_off_port_22(tmp_path):
    node = SshNode(
        0, parse_host_entry("gpu01:2222"), Connection("gpu01", port=2222), tmp_path / "kh"
    )
    assert node.known_hosts_name == "[gpu01]:2222"
    assert SshNode(0, parse_host_entry("gpu01"), Connection("gpu01")).known_hosts_name == "gpu01"
    key = fresh_key(tmp_path)
    client = paramiko.SSHClient()
    RecordNewHostKeyPolicy(tmp_path / "sub" / "kh").missing_host_key(client, "[gpu01]:2222", key)
    line = (tmp_path / "sub" / "kh").read_text()
    assert line == f"[gpu01]:2222 ssh-ed25519 {key.get_base64()}\n"
    assert client.get_host_keys().lookup("[gpu01]:2222") is not None
    # What paramiko reads back is what we wrote (so the next connection finds the key).
    assert (
        paramiko.HostKeys(str(tmp_path / "sub" / "kh")).lookup("[gpu01]:2222")["ssh-ed25519"] == key
    )


def test_messages_name_the_file_and_the_fix(tmp_path):
    known_hosts = tmp_path / "my known_hosts"
    node = SshNode(
        1, parse_host_entry("10.1.2.3:2200"), Connection("10.1.2.3", port=2200), known_hosts
    )
    offered = fresh_key(tmp_path)
    changed = describe_error(paramiko.BadHostKeyException("10.1.2.3", offered, offered), node)
    assert "host key CHANGED for [10.1.2.3]:2200" in changed
    assert f"ssh-keygen -R '[10.1.2.3]:2200' -f '{known_hosts}'" in changed
    unknown = describe_error(
        paramiko.SSHException("Server '[10.1.2.3]:2200' not found in known_hosts"), node
    )
    assert (
        f"not in {known_hosts}" in unknown
        and f"ssh-keyscan -p 2200 10.1.2.3 >> '{known_hosts}'" in unknown
    )


# -- against real sshd ----------------------------------------------------------------------------


def cluster_config(cluster) -> Config:
    data = yaml.safe_load(Path(cluster.fabric_config_path).read_text())
    return Config(overrides={key: data[key] for key in ("user", "connect_kwargs", "timeouts")})


def connect_all(cluster, known_hosts: Path, policy: str):
    """`hostname` on every node under `policy`: ({index: hostname}, {index: (node, error)})."""
    settings = ClusterSettings(known_hosts=str(known_hosts), host_key_policy=policy)
    inventory = Inventory(tuple(parse_host_entry(h) for h in cluster.hosts), "test")
    nodes = open_nodes(cluster_config(cluster), inventory, settings)
    try:
        results = on_each(nodes, lambda node: node.run("hostname").stdout.strip())
    finally:
        for node in nodes:
            node.close()
    return (
        {n.index: v for n, v in results.ok.items()},
        {n.index: (n, e) for n, e in results.failed.items()},
    )


def with_changed_key(cluster, tmp_path: Path, index: int) -> Path:
    lines = Path(cluster.known_hosts_path).read_text().splitlines()
    address = cluster.nodes[index].address
    lines = [
        f"{address} {fresh_public_key(tmp_path)}" if address in line.split()[0].split(",") else line
        for line in lines
    ]
    path = tmp_path / "known_hosts_changed"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.cluster
def test_reject_refuses_unknown_and_accepts_known(cluster3, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ok, failed = connect_all(cluster3, empty, "reject")
    assert ok == {} and sorted(failed) == [0, 1, 2]
    node, error = failed[1]
    message = describe_error(error, node)
    assert message.startswith(f"unknown host key: {cluster3.nodes[1].address} is not in {empty}")
    assert empty.read_text() == ""
    ok, failed = connect_all(cluster3, Path(cluster3.known_hosts_path), "reject")
    assert failed == {} and ok == {n.index: n.hostname for n in cluster3.nodes}


@pytest.mark.cluster
def test_accept_new_records_unknown_keys_once(cluster3, tmp_path):
    known_hosts = tmp_path / "new" / "known_hosts"
    ok, failed = connect_all(cluster3, known_hosts, "accept-new")
    assert failed == {} and len(ok) == 3
    recorded = known_hosts.read_text()
    assert len(recorded.splitlines()) == 3
    expected, written = (
        paramiko.HostKeys(str(cluster3.known_hosts_path)),
        paramiko.HostKeys(str(known_hosts)),
    )
    for node in cluster3.nodes:
        assert dict(written.lookup(node.address)) == dict(expected.lookup(node.address))
    ok, failed = connect_all(cluster3, known_hosts, "accept-new")
    assert failed == {} and known_hosts.read_text() == recorded


@pytest.mark.cluster
@pytest.mark.parametrize("policy", ["accept-new", "reject"])
def test_changed_key_is_refused_naming_host_and_file(cluster3, tmp_path, policy):
    known_hosts = with_changed_key(cluster3, tmp_path, 1)
    before = known_hosts.read_text()
    ok, failed = connect_all(cluster3, known_hosts, policy)
    assert sorted(ok) == [0, 2] and sorted(failed) == [1]
    node, error = failed[1]
    assert isinstance(error, paramiko.BadHostKeyException)
    message = describe_error(error, node)
    address = cluster3.nodes[1].address
    assert f"host key CHANGED for {address}" in message
    assert f"ssh-keygen -R {address} -f {known_hosts}" in message
    assert known_hosts.read_text() == before


@pytest.mark.cluster
def test_auto_add_is_the_explicit_opt_out(cluster3, tmp_path):
    known_hosts = with_changed_key(cluster3, tmp_path, 1)
    before = known_hosts.read_text()
    ok, failed = connect_all(cluster3, known_hosts, "auto-add")
    assert failed == {} and len(ok) == 3
    assert known_hosts.read_text() == before  # nothing recorded, nothing checked


def test_unreachable_message_says_why():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    node = SshNode(
        0,
        parse_host_entry(f"127.0.0.1:{port}"),
        Connection("127.0.0.1", port=port, connect_timeout=3),
    )
    with pytest.raises(Exception) as raised:
        node.run("true")
    assert describe_error(raised.value, node) == (
        f"unreachable: cannot connect to port {port}: Connection refused"
    )


def jump_connect(cluster, known_hosts: Path, policy: str):
    """`hostname` on node 1 through node 0 as its ProxyJump host: (node, hostname or error)."""
    jump, target = cluster.nodes[0], cluster.nodes[1]
    config = cluster_config(cluster)
    config.set_runtime_ssh_path(None)
    config.base_ssh_config = paramiko.SSHConfig.from_text(
        f"Host {target.address}\n  ProxyJump {config.user}@{jump.address}\n"
    )
    settings = ClusterSettings(known_hosts=str(known_hosts), host_key_policy=policy)
    inventory = Inventory((parse_host_entry(target.address),), "test")
    [node] = open_nodes(config, inventory, settings)
    gateway = node.connection.gateway
    assert isinstance(gateway, Connection) and gateway.host == jump.address
    try:
        return node, node.run("hostname").stdout.strip()
    except Exception as error:  # noqa: BLE001 - the error is what the test looks at
        return node, error
    finally:
        node.close()
        assert not gateway.is_connected  # close() closed the jump host's connection too


@pytest.mark.cluster
def test_proxyjump_host_key_is_checked(cluster3, tmp_path):
    node, hostname = jump_connect(cluster3, Path(cluster3.known_hosts_path), "reject")
    assert hostname == cluster3.nodes[1].hostname
    known_hosts = with_changed_key(cluster3, tmp_path, 0)  # only the jump host's key is wrong
    before = known_hosts.read_text()
    for policy in ("accept-new", "reject"):
        node, error = jump_connect(cluster3, known_hosts, policy)
        assert isinstance(error, paramiko.BadHostKeyException), error
        jump = cluster3.nodes[0].address
        assert describe_error(error, node).startswith(f"host key CHANGED for jump host {jump} ")
    assert known_hosts.read_text() == before
