"""Host-key policies (reject / accept-new / auto-add) against the real sshd of simulated nodes.

The pure parts (known_hosts parsing and names, messages) run anywhere; the rest needs the
cluster. known_hosts as OpenSSH reads it: where it can, a test asks OpenSSH itself (ssh-keygen -F,
ssh) for the expected answer. No test reads the real global file (see `no_global_known_hosts`).
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

import tasks.cluster.hostkeys
from tasks.cluster.hostkeys import RecordNewHostKeyPolicy
from tasks.lib.inventory import Inventory, parse_host_entry
from tasks.lib.knownhosts import (
    KnownHosts,
    Status,
    host_matches,
    known_hosts_name,
    parse_known_hosts,
)
from tasks.lib.settings import ClusterSettings
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import SshNode, on_each, open_nodes


@pytest.fixture(autouse=True)
def no_global_known_hosts(tmp_path, monkeypatch):
    """The global files of each test are its own (none unless it writes them)."""
    files = (tmp_path / "global" / "ssh_known_hosts", tmp_path / "global" / "ssh_known_hosts2")
    monkeypatch.setattr(tasks.cluster.hostkeys, "GLOBAL_KNOWN_HOSTS_FILES", files, raising=False)
    return files


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


# -- known_hosts as OpenSSH reads it (no server) --------------------------------------------------


def openssh_finds(known_hosts: Path, name: str) -> bool:
    """Whether OpenSSH finds a valid line (any marker) covering `name` (ssh-keygen -l -F)."""
    found = subprocess.run(["ssh-keygen", "-l", "-F", name, "-f", str(known_hosts)],
                           capture_output=True, timeout=30)
    return found.returncode == 0


PATTERNS = ["gpu01,10.1.0.1", "10.1.*,!10.1.0.2", "!10.1.0.2,10.1.*", "gpu0?", "[gpu*]:2222",
            "[gpu01]:2222", "Mixed.Case", "*,!*.example", "gpu[1]", "|1|bad|hash"]
NAMES = ["gpu01", "gpu1", "gpu10", "10.1.0.1", "10.1.0.2", "10.2.0.1", "[gpu01]:2222",
         "[gpu01]:22", "[10.1.0.1]:2222", "mixed.case", "MIXED.case", "a.example", "gpu[1]"]


def test_host_patterns_match_as_openssh_matches_them(tmp_path):
    key = fresh_public_key(tmp_path)
    ours, openssh = {}, {}
    for index, hosts in enumerate(PATTERNS):
        path = tmp_path / f"known_hosts{index}"
        path.write_text(f"{hosts} {key}\n")
        for name in NAMES:
            ours[hosts, name] = host_matches(hosts, name)
            openssh[hosts, name] = openssh_finds(path, name)
    assert ours == openssh
    assert 10 < sum(ours.values()) < len(ours) - 10  # both answers occur, often


def test_hashed_names_match_their_host_only(tmp_path):
    key = fresh_public_key(tmp_path)
    path = tmp_path / "known_hosts"
    path.write_text(f"gpu01 {key}\n[gpu02]:2222 {key}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
    hashed = [line.split()[0] for line in path.read_text().splitlines()]
    assert len(hashed) == 2 and all(name.startswith("|1|") for name in hashed)
    for name in ["gpu01", "gpu02", "[gpu02]:2222", "[gpu01]:2222", "[gpu02]:22"]:
        assert any(host_matches(h, name) for h in hashed) == openssh_finds(path, name), name
    assert host_matches(hashed[1], known_hosts_name("gpu02", 2222))
    assert known_hosts_name("gpu02", 22) == known_hosts_name("gpu02", None) == "gpu02"


def test_lines_openssh_skips_are_skipped_not_raised(tmp_path):
    key = fresh_public_key(tmp_path)
    key_type, key_b64 = key.split()
    lines = [
        "# a comment", "", "   ",
        f"gpu01 {key} a comment",
        f"gpu02\t {key_type}   {key_b64}\r",
        f"@revoked gpu08 {key}",
        f"@cert-authority gpu09 {key}",
        f"@foo gpu03 {key}",
        f"@revoked @cert-authority gpu10 {key}",
        f"gpu04 {key_type}",
        f"gpu05 {key_type} not-base64!!",
        f"gpu06 ssh-rsa {key_b64}",
        f"gpu07 {key_type} QUJD",
    ]
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(lines) + "\n")
    parsed = parse_known_hosts(path.read_text(), str(path))
    assert [(line.lineno, line.marker, line.hosts) for line in parsed.lines] == [
        (4, "", "gpu01"), (5, "", "gpu02"), (6, "@revoked", "gpu08")]
    assert [(line.lineno, line.hosts) for line in parsed.authorities] == [(7, "gpu09")]
    assert [skipped.lineno for skipped in parsed.skipped] == [8, 9, 10, 11, 12, 13]
    for index in range(1, 11):
        name = f"gpu{index:02d}"
        ours = any(line.matches(name) for line in parsed.lines + parsed.authorities)
        assert ours == openssh_finds(path, name), name
    # paramiko's own loader raises on such a file (InvalidHostKey, a traceback for the user).
    with pytest.raises(Exception):
        paramiko.HostKeys(str(path))


def test_verdicts_revoked_wins_and_any_matching_line_accepts(tmp_path):
    a, b, c = (fresh_public_key(tmp_path) for _ in range(3))
    user = parse_known_hosts(f"gpu01 {a}\ngpu02 {a}\ngpu03 {b}\n", "user").lines
    global_ = parse_known_hosts(f"@revoked gpu02 {a}\ngpu03 {c}\n@revoked *,!gpu05 {c}\n"
                                f"gpu05 {c}\n", "global").lines
    known = KnownHosts(user + global_)

    def check(name, key):
        key_type, key_b64 = key.split()
        verdict = known.check(name, key_type, base64.b64decode(key_b64))
        return verdict.status, verdict.line and verdict.line.where

    assert check("gpu01", a) == (Status.OK, "user:1")
    assert check("gpu01", b) == (Status.CHANGED, "user:1")
    assert check("gpu02", a) == (Status.REVOKED, "global:1")  # although user:2 accepts it
    assert check("gpu03", c) == (Status.REVOKED, "global:3")
    assert check("gpu03", b) == (Status.OK, "user:3")
    assert check("gpu05", c) == (Status.OK, "global:4")  # the negation exempts it
    assert check("gpu09", a) == (Status.NEW, None)


def test_cert_authority_lines_get_one_note_per_file(tmp_path, capsys):
    key = fresh_public_key(tmp_path)
    user, global_ = tmp_path / "known_hosts", tmp_path / "ssh_known_hosts"
    user.write_text(f"gpu01 {key}\n@cert-authority *.a {key}\n@cert-authority *.b {key}\n")
    global_.write_text(f"@cert-authority * {key}\n")
    for _ in range(2):
        known = tasks.cluster.hostkeys.load_known_hosts(user, [global_])
    assert capsys.readouterr().err.splitlines() == [
        f"note: {user}:2: @cert-authority line (and 1 more) ignored: host certificates are not "
        f"verified here, so a host it covers also needs a plain key line",
        f"note: {global_}:1: @cert-authority line ignored: host certificates are not verified "
        f"here, so a host it covers also needs a plain key line",
    ]
    assert [key.get_name() for key in known.keys_for("gpu01")] == ["ssh-ed25519"]
    assert known.keys_for("x.a") == []


def test_unreadable_known_hosts_is_one_line(tmp_path):
    from invoke.exceptions import Exit

    with pytest.raises(Exit) as raised:
        tasks.cluster.hostkeys.load_known_hosts(tmp_path)  # a directory
    assert raised.value.code == 2
    assert str(raised.value.message).startswith(f"cannot read cluster.known_hosts {tmp_path}: ")
    assert "\n" not in raised.value.message


def test_recording_after_a_last_line_without_newline(tmp_path):
    known_hosts = tmp_path / "known_hosts"
    old = fresh_key(tmp_path)
    known_hosts.write_text(f"gpu01 ssh-ed25519 {old.get_base64()}")  # as an editor may leave it
    new = fresh_key(tmp_path)
    RecordNewHostKeyPolicy(known_hosts).missing_host_key(paramiko.SSHClient(), "gpu02", new)
    read_back = paramiko.HostKeys(str(known_hosts))
    assert read_back.lookup("gpu01")["ssh-ed25519"] == old
    assert read_back.lookup("gpu02")["ssh-ed25519"] == new


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


# -- known_hosts lines paramiko alone gets wrong, against real sshd -------------------------------


def host_key(cluster, index: int) -> str:
    """'ssh-ed25519 BASE64' of node `index`'s host key."""
    public = (cluster.nodes[index].dir / "ssh_host_ed25519_key.pub").read_text()
    return " ".join(public.split()[:2])


def openssh_connects(cluster, known_hosts: Path, global_file: Path | None = None) -> list[bool]:
    """Per node: does OpenSSH's ssh (StrictHostKeyChecking=yes) connect with these files?"""
    results = []
    for node in cluster.nodes:
        argv = ["ssh", "-F", "/dev/null", "-i", str(cluster.key_path), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", "ConnectTimeout=5", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", f"GlobalKnownHostsFile={global_file or '/dev/null'}",
                f"root@{node.address}", "true"]
        results.append(subprocess.run(argv, capture_output=True, timeout=30).returncode == 0)
    return results


def cluster_lines(cluster) -> str:
    return Path(cluster.known_hosts_path).read_text()


@pytest.mark.cluster
@pytest.mark.parametrize("policy", ["accept-new", "reject"])
def test_revoked_key_is_refused_even_where_a_line_accepts_it(cluster3, tmp_path, policy):
    address = [node.address for node in cluster3.nodes]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        cluster_lines(cluster3)  # plain lines accepting every node's key
        + f"@revoked * {host_key(cluster3, 1)}\n"
        + f"@revoked *,!{address[2]} {host_key(cluster3, 2)}\n"  # revoked for all but node 2
    )
    before = known_hosts.read_text()
    ok, failed = connect_all(cluster3, known_hosts, policy)
    assert sorted(ok) == [0, 2] and sorted(failed) == [1]
    node, error = failed[1]
    message = describe_error(error, node)
    assert message.startswith(f"host key REVOKED for {address[1]}: it offered ssh-ed25519 SHA256:")
    assert f"marked @revoked at {known_hosts}:4;" in message and "\n" not in message
    assert known_hosts.read_text() == before
    assert openssh_connects(cluster3, known_hosts) == [True, False, True]


@pytest.mark.cluster
def test_accept_new_never_records_a_revoked_key(cluster3, tmp_path):
    lines = cluster_lines(cluster3).splitlines()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{lines[0]}\n{lines[2]}\n@revoked * {host_key(cluster3, 1)}\n")
    before = known_hosts.read_text()
    ok, failed = connect_all(cluster3, known_hosts, "accept-new")
    assert sorted(ok) == [0, 2] and sorted(failed) == [1]
    node, error = failed[1]
    assert describe_error(error, node).startswith(f"host key REVOKED for {node.label}: ")
    assert known_hosts.read_text() == before


@pytest.mark.cluster
def test_cert_authority_lines_are_skipped_with_one_note(cluster3, tmp_path, capsys):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"@cert-authority * {fresh_public_key(tmp_path)}\n"
                           f"@cert-authority *.example {fresh_public_key(tmp_path)}\n"
                           + cluster_lines(cluster3))
    for _ in range(2):
        ok, failed = connect_all(cluster3, known_hosts, "reject")
        assert failed == {} and ok == {n.index: n.hostname for n in cluster3.nodes}
    notes = capsys.readouterr().err.splitlines()
    assert notes == [f"note: {known_hosts}:1: @cert-authority line (and 1 more) ignored: host "
                     f"certificates are not verified here, so a host it covers also needs a "
                     f"plain key line"]


@pytest.mark.cluster
@pytest.mark.parametrize("policy", ["accept-new", "reject"])
def test_global_known_hosts_are_read_and_never_written(cluster3, tmp_path, no_global_known_hosts,
                                                       policy):
    """Node 0's key only in ssh_known_hosts, node 1 with a stale key in ssh_known_hosts2."""
    first, second = no_global_known_hosts
    first.parent.mkdir()
    address = [node.address for node in cluster3.nodes]
    first.write_text(f"{address[0]} {host_key(cluster3, 0)}\n")
    second.write_text(f"{address[1]} {fresh_public_key(tmp_path)}\n")
    global_before = first.read_text(), second.read_text()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    ok, failed = connect_all(cluster3, known_hosts, policy)
    assert 0 in ok
    node, error = failed[1]
    assert describe_error(error, node).startswith(f"host key CHANGED for {address[1]} ")
    assert f"ssh-keygen -R {address[1]} -f {second}, then retry" in describe_error(error, node)
    if policy == "reject":
        assert sorted(failed) == [1, 2]
        node, error = failed[2]
        assert describe_error(error, node).startswith(f"unknown host key: {address[2]} is not in")
        assert known_hosts.read_text() == ""
        # (OpenSSH takes one GlobalKnownHostsFile option with both names.)
        assert openssh_connects(cluster3, known_hosts, f"{first} {second}") == [True, False, False]
    else:
        assert sorted(ok) == [0, 2]
        assert known_hosts.read_text() == f"{address[2]} {host_key(cluster3, 2)}\n"
    assert (first.read_text(), second.read_text()) == global_before


@pytest.mark.cluster
def test_hashed_names_lists_and_wildcards_work_as_in_openssh(cluster3, tmp_path):
    address = [node.address for node in cluster3.nodes]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{address[0]} {host_key(cluster3, 0)}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    assert known_hosts.read_text().startswith("|1|")
    prefix = address[2].rsplit(".", 1)[0]
    with known_hosts.open("a") as handle:
        handle.write(f"other.example,{address[1]} {host_key(cluster3, 1)}\n"
                     f"{prefix}.*,!{address[0]},!{address[1]} {host_key(cluster3, 2)}\n")
    ok, failed = connect_all(cluster3, known_hosts, "reject")
    assert failed == {} and ok == {n.index: n.hostname for n in cluster3.nodes}
    assert openssh_connects(cluster3, known_hosts) == [True, True, True]


@pytest.mark.cluster
def test_malformed_lines_are_skipped(cluster3, tmp_path):
    key_type, key_b64 = host_key(cluster3, 0).split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        f"@foo {cluster3.nodes[0].address} {key_type} {key_b64}\n"
        f"{cluster3.nodes[0].address} {key_type} not-base64!!\n"
        f"{cluster3.nodes[1].address} {key_type}\n"
        f"|1|bad|hash {key_type} {key_b64}\n"
        f"{cluster3.nodes[0].address}\t{key_type}  {key_b64}  spaced and tabbed\n"
        + "\n".join(cluster_lines(cluster3).splitlines()[1:]) + "\n"
    )
    ok, failed = connect_all(cluster3, known_hosts, "reject")
    assert failed == {} and ok == {n.index: n.hostname for n in cluster3.nodes}
    assert openssh_connects(cluster3, known_hosts) == [True, True, True]
