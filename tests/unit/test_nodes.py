"""Nodes without a network: ProxyJump hops get our host-key policy, uploads time out."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import paramiko
import pytest
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut

from tasks.cluster.hostkeys import RecordNewHostKeyPolicy
from tasks.lib.inventory import Inventory, parse_host_entry
from tasks.lib.settings import ClusterSettings
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import (
    CHANNEL_OPEN_TIMEOUT_S,
    SFTP_STALL_TIMEOUT_S,
    LocalNode,
    SshNode,
    connection_chain,
    open_nodes,
)


def public_key(tmp_path: Path, name: str) -> paramiko.PKey:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.Ed25519Key(filename=str(path))


def jump_config(ssh_config_text: str) -> Config:
    return Config(ssh_config=paramiko.SSHConfig.from_text(ssh_config_text))


def open_one(config: Config, host: str, known_hosts: Path, policy: str) -> SshNode:
    settings = ClusterSettings(known_hosts=str(known_hosts), host_key_policy=policy)
    [node] = open_nodes(config, Inventory((parse_host_entry(host),), "test"), settings)
    assert isinstance(node, SshNode)
    return node


@pytest.mark.parametrize("policy, policy_type", [
    ("accept-new", RecordNewHostKeyPolicy),
    ("reject", paramiko.RejectPolicy),
])
def test_every_proxyjump_hop_gets_the_policy_and_the_known_hosts(tmp_path, policy, policy_type):
    known_hosts = tmp_path / "known_hosts"
    outer, inner = public_key(tmp_path, "outer"), public_key(tmp_path, "inner")
    known_hosts.write_text(f"[outer.example]:2200 ssh-ed25519 {outer.get_base64()}\n"
                           f"inner.example ssh-ed25519 {inner.get_base64()}\n")
    config = jump_config("Host gpu01\n  ProxyJump jump@outer.example:2200,inner.example\n")
    node = open_one(config, "gpu01", known_hosts, policy)
    chain = connection_chain(node.connection)
    # (Fabric nests the hops the other way round from OpenSSH: the last one is dialled first.)
    assert [(hop.host, hop.port) for hop in chain] == [
        ("gpu01", 22), ("outer.example", 2200), ("inner.example", 22)]
    for hop in chain:
        assert isinstance(hop.client._policy, policy_type), hop
    outer_hop, inner_hop = chain[1], chain[2]
    assert inner_hop.client.get_host_keys().lookup("inner.example")["ssh-ed25519"] == inner
    assert outer_hop.client.get_host_keys().lookup("[outer.example]:2200")["ssh-ed25519"] == outer


def test_chain_follows_explicit_gateways_and_skips_proxycommand(tmp_path):
    inner = Connection("inner", port=2022)
    outer = Connection("outer", gateway=inner)
    target = Connection("gpu01", gateway=outer)
    assert connection_chain(target) == [target, outer, inner]
    # A ProxyCommand is a local program (ssh -W checks its own keys): no client of ours.
    config = jump_config("Host gpu01\n  ProxyCommand ssh -W %h:%p bastion\n")
    node = open_one(config, "gpu01", tmp_path / "kh", "reject")
    assert connection_chain(node.connection) == [node.connection]


def test_host_key_errors_of_a_jump_host_name_the_jump_host(tmp_path):
    known_hosts = tmp_path / "known_hosts"
    config = jump_config("Host gpu01\n  ProxyJump jump@bastion:2200\n")
    node = open_one(config, "gpu01", known_hosts, "reject")
    offered = public_key(tmp_path, "offered")
    changed = describe_error(paramiko.BadHostKeyException("[bastion]:2200", offered, offered), node)
    assert changed.startswith("host key CHANGED for jump host [bastion]:2200 ")
    assert f"ssh-keygen -R '[bastion]:2200' -f {known_hosts}" in changed
    unknown = describe_error(
        paramiko.SSHException("Server '[bastion]:2200' not found in known_hosts"), node)
    assert unknown.startswith(f"unknown host key: jump host [bastion]:2200 is not in {known_hosts}")
    assert f"ssh-keyscan -p 2200 bastion >> {known_hosts}" in unknown
    # The node's own key is still named as the node's.
    own = describe_error(paramiko.SSHException("Server 'gpu01' not found in known_hosts"), node)
    assert own.startswith("unknown host key: gpu01 is not in") and "ssh-keyscan gpu01 >>" in own


def local_node() -> LocalNode:
    return LocalNode(0, parse_host_entry("localhost"), Config())


def test_local_run_with_input_is_binary_safe_and_reports_failure():
    data = bytes(range(256)) * 100
    result = local_node().run_with_input("cat", data, timeout=10)
    assert result.exited == 0
    counted = local_node().run_with_input("wc -c", data, timeout=10)
    assert counted.stdout.strip() == str(len(data))
    failed = local_node().run_with_input("echo oops; exit 3", b"", warn=True, timeout=10)
    assert failed.exited == 3 and failed.stdout == "oops\n"


@pytest.mark.timeout(20)
def test_local_run_with_input_times_out_and_kills_the_command():
    started = time.monotonic()
    # `; true` keeps the shell alive, so sleep is its child holding the output pipe: killing
    # only the shell would leave the read waiting for the full 30 s.
    with pytest.raises(CommandTimedOut) as raised:
        local_node().run_with_input("echo started; sleep 30; true", b"x" * 1000, timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert raised.value.timeout == 0.5 and raised.value.result.stdout == "started\n"
    assert describe_error(raised.value) == "command timed out after 0.5s"


@pytest.mark.cluster
@pytest.mark.timeout(60)
@pytest.mark.parametrize("command, size", [
    ("cat >/dev/null; echo read; sleep 30", 1000),  # reads everything, then stalls
    ("sleep 30", 16 << 20),  # never reads: the upload itself blocks on a full window
])
def test_ssh_run_with_input_times_out_on_a_stalled_host(cluster3, tmp_path, command, size):
    from tests.unit.test_hostkeys import cluster_config

    node = open_one(cluster_config(cluster3), cluster3.hosts[0],
                    Path(cluster3.known_hosts_path), "reject")
    try:
        assert node.run_with_input("wc -c", b"y" * size, timeout=30).stdout.strip() == str(size)
        started = time.monotonic()
        with pytest.raises(CommandTimedOut) as raised:
            node.run_with_input(command, b"x" * size, timeout=1.5)
        assert time.monotonic() - started < 6
        assert raised.value.timeout == 1.5
        assert describe_error(raised.value, node) == "command timed out after 1.5s"
    finally:
        node.close()


@pytest.mark.cluster
def test_ssh_channel_opens_and_sftp_stalls_are_bounded(cluster3):
    """Paramiko's defaults (an hour per channel open, no SFTP timeout) would let one silent host
    block the controller; the end-to-end case is test_launch's silent-node test."""
    from tests.unit.test_hostkeys import cluster_config

    node = open_one(cluster_config(cluster3), cluster3.hosts[0],
                    Path(cluster3.known_hosts_path), "reject")
    try:
        assert node.run("echo ok").stdout == "ok\n"
        transport = node.connection.client.get_transport()
        assert transport.channel_timeout == max(node.connection.connect_timeout or 0,
                                                CHANNEL_OPEN_TIMEOUT_S) < 60
        assert node.sftp().get_channel().gettimeout() == SFTP_STALL_TIMEOUT_S
    finally:
        node.close()
