"""Pure helpers of the simulated cluster (tests/simcluster/naming.py, image.py)."""

from __future__ import annotations

import io
import ipaddress
import tarfile

import pytest

from tests.simcluster import image, naming

HYBRID_MOUNTINFO = """\
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


@pytest.mark.parametrize("name", ["t", "c3-1234-0", "a" * 40])
def test_valid_names(name):
    assert naming.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "Upper", "a_b", "a" * 41, ".cache", "a/b"])
def test_invalid_names_are_refused_with_the_rule(name):
    with pytest.raises(ValueError, match="a-z, 0-9"):
        naming.validate_name(name)


def test_ifnames_default_repeat_and_errors():
    assert naming.parse_ifnames(None, 3) == ["eth0", "eth0", "eth0"]
    assert naming.parse_ifnames("eth0,ens5", 4) == ["eth0", "ens5", "ens5", "ens5"]
    assert naming.parse_ifnames(["eth0", "ens5", "eth1"], 3) == ["eth0", "ens5", "eth1"]
    with pytest.raises(ValueError, match="3 interface names given for 2 nodes"):
        naming.parse_ifnames("a,b,c", 2)
    with pytest.raises(ValueError, match="invalid"):
        naming.parse_ifnames("lo", 1)
    with pytest.raises(ValueError, match="invalid"):
        naming.parse_ifnames("x" * 16, 1)


def test_node_count_bounds():
    assert naming.validate_node_count(64) == 64
    for bad in (0, 65):
        with pytest.raises(ValueError, match="1..64"):
            naming.validate_node_count(bad)


def test_subnet_is_deterministic_per_name_and_avoids_taken_ones():
    first = naming.pick_subnet("alpha", [])
    assert first == naming.pick_subnet("alpha", [])
    assert first.prefixlen == 24 and first.subnet_of(naming.SUBNET_POOL)
    assert naming.pick_subnet("beta", []) != first  # different names spread out
    second = naming.pick_subnet("alpha", [first])
    assert second != first
    # A wider network that covers the candidate counts as taken too.
    assert not naming.pick_subnet("alpha", [first.supernet(8)]).overlaps(first.supernet(8))


def test_link_names_fit_the_kernel_limit_and_differ_per_subnet():
    subnet = ipaddress.ip_network("10.239.255.0/24")
    names = [naming.bridge_name(subnet)] + [naming.host_veth_name(subnet, i) for i in range(64)]
    assert max(len(n) for n in names) <= 15
    assert len(set(names)) == len(names)
    assert naming.bridge_name(ipaddress.ip_network("10.224.1.0/24")) != naming.bridge_name(
        ipaddress.ip_network("10.224.2.0/24"))


def test_addresses():
    subnet = ipaddress.ip_network("10.230.7.0/24")
    assert naming.gateway_address(subnet) == "10.230.7.1"
    assert naming.node_address(subnet, 0) == "10.230.7.10"
    assert naming.node_address(subnet, 63) == "10.230.7.73"


def test_sshd_config_is_key_only_and_allows_many_sessions():
    config = naming.render_sshd_config(address="10.1.2.3", host_key="/k", authorized_keys="/a")
    lines = set(config.splitlines())
    for expected in ("ListenAddress 10.1.2.3", "HostKey /k", "AuthorizedKeysFile /a",
                     "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                     "PermitRootLogin prohibit-password", "MaxStartups 100", "MaxSessions 100",
                     "PidFile /run/sshd.pid"):
        assert expected in lines
    assert not any(line.startswith(("AcceptEnv", "PermitUserEnvironment")) for line in lines)


def test_known_hosts_line_drops_the_comment():
    line = naming.known_hosts_line("10.0.0.1", "ssh-ed25519 AAAAC3Nza host-comment\n")
    assert line == "10.0.0.1 ssh-ed25519 AAAAC3Nza"
    aliased = naming.known_hosts_line("10.0.0.1", "ssh-ed25519 AAAAC3Nza c", "t-node0")
    assert aliased == "10.0.0.1,t-node0 ssh-ed25519 AAAAC3Nza"


def test_node_ssh_client_config_uses_the_cluster_key_and_checks_host_keys():
    config = naming.render_ssh_client_config(key_path="/k", known_hosts_path="/kh")
    assert "IdentityFile /k" in config and "UserKnownHostsFile /kh" in config
    assert "StrictHostKeyChecking yes" in config


def test_fabric_config_has_the_contract_keys():
    config = naming.fabric_config(
        key_path="/k", known_hosts_path="/kh", hosts=["10.0.0.10", "10.0.0.11"],
        workdir="/srv/gemm", venv="/work/main/.venv", docker=True, image="gemm-sim:latest",
        container_volumes=["/usr:/usr:ro"])
    assert config["user"] == "root"
    assert config["connect_kwargs"]["key_filename"] == ["/k"]
    assert config["timeouts"] == {"connect": 5}
    assert config["cluster"] == {
        "hosts": ["10.0.0.10", "10.0.0.11"], "known_hosts": "/kh", "host_key_policy": "reject",
        "workdir": "/srv/gemm", "venv": "/work/main/.venv"}
    assert config["docker"] == {"enabled": True, "image": "gemm-sim:latest", "platform": "cpu",
                                "volumes": ["/usr:/usr:ro"], "ulimits": {"memlock": None}}


def test_cgroup_mounts_mirror_a_hybrid_host():
    assert naming.cgroup_mount_commands(HYBRID_MOUNTINFO) == [
        "mount -t tmpfs -o nosuid,nodev,noexec,mode=755 tmpfs /sys/fs/cgroup",
        "mkdir -p /sys/fs/cgroup/cpu",
        "mount -t cgroup -o rw,cpu cgroup /sys/fs/cgroup/cpu",
        "mkdir -p /sys/fs/cgroup/systemd",
        "mount -t cgroup -o rw,name=systemd cgroup /sys/fs/cgroup/systemd",
        "mkdir -p /sys/fs/cgroup/unified",
        "mount -t cgroup2 -o rw cgroup2 /sys/fs/cgroup/unified",
    ]


def test_cgroup2_is_mounted_when_the_host_has_none():
    assert naming.cgroup_mount_commands("23 27 0:22 / /sys rw - sysfs sysfs rw\n") == [
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup"]


def test_rootfs_tar_is_tiny_deterministic_and_has_the_basics(tmp_path):
    data = image.rootfs_tar_bytes()
    assert data == image.rootfs_tar_bytes()
    assert len(data) < 200_000
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = set(tar.getnames())
        tmp = tar.getmember("tmp")
    assert {"etc/passwd", "etc/group", "etc/hosts", "etc/nsswitch.conf", "usr"} <= names
    assert tmp.mode == 0o1777
    cached = image.cached_rootfs_tar(tmp_path)
    assert cached.read_bytes() == data and image.cached_rootfs_tar(tmp_path) == cached


def test_container_volumes_are_read_only_and_include_the_checkout(tmp_path):
    volumes = image.container_volumes(repo=tmp_path)
    assert f"{tmp_path}:{tmp_path}:ro" in volumes
    assert all(v.endswith(":ro") for v in volumes)
    assert "/usr:/usr:ro" in volumes
    assert image.docker_run_volume_args(["/a:/a:ro"]) == ["-v", "/a:/a:ro"]
