"""Config input: runtime and project files that are missing or broken, wrong types, the same
node listed twice, IPv6. Each stops `fab` with one line and exit 2 before any host is contacted.

The `fab` runs are real (subprocess), from a project directory of the test's own: fabfile.py
and tasks/ linked from this checkout, its own fabric.yaml. The hosts point at a TCP listener
that must see no connection.
"""
from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fabric import Config
from invoke import Context
from invoke.exceptions import Exit

from tasks.cluster.fab_hooks import check_shape, describe_load_error, runtime_file_problem, yaml_line
from tasks.lib.settings import Settings, default_config
from tasks.cluster.session import load_inventory, load_settings
from tests.helpers import FAB, REPO, fab_env


class Listener:
    """A TCP port that counts the connections made to it (none is ever answered)."""

    def __init__(self, family: int = socket.AF_INET, address: str = "127.0.0.1"):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    item = Listener()
    yield item
    item.close()


def make_project(root: Path, fabric_yaml: object) -> Path:
    """A project dir running this checkout's tasks with its own fabric.yaml (text or data)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "fabfile.py").symlink_to(REPO / "fabfile.py")
    (root / "tasks").symlink_to(REPO / "tasks")
    text = fabric_yaml if isinstance(fabric_yaml, str) else yaml.safe_dump(fabric_yaml)
    (root / "fabric.yaml").write_text(text)
    return root


def fab(project: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FAB, *args], cwd=project, capture_output=True, text=True,
                          timeout=timeout, env=fab_env(), stdin=subprocess.DEVNULL)


def project_on(tmp_path: Path, listener: Listener, **extra: object) -> Path:
    """A project whose inventory is the listener (a dead-end sshd: nothing answers)."""
    config = {"cluster": {"hosts": [f"127.0.0.1:{listener.port}"],
                          "known_hosts": str(tmp_path / "known_hosts")},
              "timeouts": {"connect": 2}, **extra}
    return make_project(tmp_path / "project", config)


def assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, one line on stderr containing every `expected`, no traceback, nothing on stdout."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, result.stderr
    for text in expected:
        assert text in line, line
    assert result.stdout == ""
    return line


# -- the runtime file (-f) -------------------------------------------------------------------------


@pytest.mark.parametrize("task", [["status"], ["emergency-stop"], ["check"],
                                  ["launch", "--dry-run"]])
def test_missing_runtime_file_stops_before_any_host(tmp_path, listener, task):
    project = project_on(tmp_path, listener)
    missing = tmp_path / "missing.yaml"
    result = fab(project, "-f", str(missing), *task)
    assert_refused(result, f"config error: {missing}: no such file; check the path given to -f")
    assert listener.connections() == 0


def test_missing_runtime_file_leaves_list_and_help_alone(tmp_path, listener):
    project = project_on(tmp_path, listener)
    missing = str(tmp_path / "missing.yaml")
    listed = fab(project, "-f", missing, "--list")
    assert listed.returncode == 0 and "launch" in listed.stdout and listed.stderr == ""
    helped = fab(project, "-f", missing, "--help", "launch")
    assert helped.returncode == 0 and "--channels" in helped.stdout


BAD_FILES = [
    # (file name, content, what the one line says)
    ("syntax.yaml", "cluster:\n  hosts: [a\n  b: c\n",
     "syntax.yaml:3:4: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow "
     "sequence at line 2)"),
    ("tab.yaml", "cluster:\n\thosts: []\n", "tab.yaml:2:1: invalid YAML: found character '\\t'"),
    ("list.yaml", "- a\n- b\n",
     "list.yaml: expected a mapping of settings (key: value lines), got a list"),
    ("cluster.yaml", "cluster: [1, 2]\n",
     "cluster.yaml:1: cluster: expected a mapping (key: value lines), got a list"),
    ("launch.yaml", "# comment\nlaunch: 5\n", "launch.yaml:2: launch: expected a mapping"),
    ("timeouts.yaml", "timeouts:\n  connect:\n    seconds: 3\n",
     "timeouts.yaml:2: timeouts.connect: expected a single value, got a mapping"),
    ("env.yaml", "docker:\n  env: [A=1]\n", "env.yaml:2: docker.env: expected a mapping"),
    ("binary.yaml", b"cluster:\n  hosts: [\xff]\n",
     "binary.yaml: not UTF-8 text (byte 19 is 0xff)"),
    ("bad.json", '{"cluster": ', "bad.json:1:13: invalid JSON: Expecting value"),
    ("notes.txt", "cluster: {}\n", "notes.txt: not a config file: name it *.yaml"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_broken_runtime_file_is_one_line_naming_file_and_line(tmp_path, listener, name, content,
                                                              message):
    project = project_on(tmp_path, listener)
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    result = fab(project, "-f", str(path), "status")
    assert_refused(result, f"config error: {tmp_path}/{message}")
    assert listener.connections() == 0


def test_unreadable_runtime_path_is_refused(tmp_path, listener):
    project = project_on(tmp_path, listener)
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    assert_refused(fab(project, "-f", str(directory), "status"),
                   f"config error: {directory}: is a directory, not a config file")
    assert listener.connections() == 0


@pytest.mark.parametrize("content,message", [
    ("docker:\n  volumes: 3\n", "config error: docker.volumes: expected a list, got 3"),
    ("launch:\n  channels: many\n",
     "config error: launch.channels: expected an integer, got 'many'"),
    ("docker:\n  enabled: maybe\n", "config error: docker.enabled: expected true or false"),
    ("cluster:\n  hosts: [1, 2]\n", "inventory error: cluster.hosts: entry 1 is neither a string"),
    ("port: 'x'\n", "config error: port: expected an SSH port number (1-65535), got 'x'"),
    ("user: 5\n", "config error: user: expected a string (the SSH login name), got 5"),
    ("timeouts:\n  connect: soon\n", "config error: timeouts.connect: expected seconds"),
    ("connect_kwargs:\n  key_filename: 5\n",
     "config error: connect_kwargs.key_filename: expected a path or a list of paths, got 5"),
])
def test_wrong_types_are_one_line_naming_the_key(tmp_path, listener, content, message):
    project = project_on(tmp_path, listener)
    runtime = tmp_path / "runtime.yaml"
    runtime.write_text(content)
    assert_refused(fab(project, "-f", str(runtime), "status"), message)
    assert listener.connections() == 0


def test_empty_sections_and_files_are_no_settings(tmp_path, listener):
    project = project_on(tmp_path, listener)
    runtime = tmp_path / "runtime.yaml"
    runtime.write_text("cluster:\n  # hosts: [a, b]\ndocker:\n")
    result = fab(project, "-f", str(runtime), "check", timeout=120)
    # Not a config error: the check goes on to the inventory of fabric.yaml, the listener.
    assert "config error" not in result.stderr and "Traceback" not in result.stderr
    assert listener.connections() == 1


# -- the project file (fabric.yaml) ----------------------------------------------------------------


def test_broken_project_file_stops_tasks_but_not_list_or_help(tmp_path):
    project = make_project(tmp_path / "project", "cluster:\n  hosts: [a, b\n")
    assert_refused(fab(project, "status"),
                   f"config error: {project}/fabric.yaml:3:1: invalid YAML: expected ',' or ']'")
    listed = fab(project, "--list")
    assert listed.returncode == 0 and "emergency-stop" in listed.stdout
    assert fab(project, "--help", "status").returncode == 0


def test_project_and_runtime_files_disagreeing_on_an_unknown_key_is_one_line(tmp_path):
    project = make_project(tmp_path / "project", "extra: {a: 1}\n")
    runtime = tmp_path / "runtime.yaml"
    runtime.write_text("extra: 1\n")
    assert_refused(fab(project, "-f", str(runtime), "status"), "config error: Can't cleanly merge")


# -- duplicates and IPv6, through fab --------------------------------------------------------------


@pytest.mark.parametrize("hosts,message", [
    (["127.0.0.1:{port}", "localhost:{port}"],
     "host 'localhost:{port}' is listed twice (as '127.0.0.1:{port}': both are 127.0.0.1, "
     "port {port})"),
    (["127.0.0.1:{port}", "root@127.0.0.1:{port}"],
     "host 'root@127.0.0.1:{port}' is listed twice (as '127.0.0.1:{port}': same host"),
])
def test_the_same_node_twice_is_refused_before_any_host(tmp_path, listener, hosts, message):
    port = listener.port
    project = project_on(tmp_path, listener)
    runtime = tmp_path / "runtime.yaml"
    runtime.write_text(yaml.safe_dump({"cluster": {"hosts": [h.format(port=port) for h in hosts]}}))
    assert_refused(fab(project, "-f", str(runtime), "status"),
                   "inventory error: cluster.hosts: " + message.format(port=port))
    assert listener.connections() == 0


def test_ipv6_hosts_are_refused_before_any_host(tmp_path):
    try:
        v6 = Listener(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        project = make_project(tmp_path / "project", {"cluster": {"hosts": [f"[::1]:{v6.port}"]}})
        assert_refused(fab(project, "status"),
                       f"inventory error: cluster.hosts: '[::1]:{v6.port}' is an IPv6 address: "
                       "not supported, as check and launch reach the master over IPv4; give the "
                       "node's IPv4 address or a hostname")
        assert_refused(fab(project, "status", "--hosts", "::1"),
                       "'::1' is an IPv6 address: not supported")
        assert v6.connections() == 0
    finally:
        v6.close()


# -- the same node, in process ---------------------------------------------------------------------


def _config(ssh_config: str = "", **values: object) -> Config:
    import paramiko

    config = Config(overrides=values)
    config.base_ssh_config = paramiko.SSHConfig.from_text(ssh_config)
    return config


def test_a_name_and_its_address_are_one_node():
    settings = Settings.from_config({})
    with pytest.raises(Exit) as raised:
        load_inventory(settings, ["localhost:2200,127.0.0.1:2200"], _config())
    assert raised.value.code == 2
    assert ("host '127.0.0.1:2200' is listed twice (as 'localhost:2200': both are 127.0.0.1, "
            "port 2200)") in raised.value.message
    # A name that does not resolve is not a duplicate here (the probe reports it later).
    assert len(load_inventory(settings, ["nonexistent.invalid,127.0.0.1"], _config()).hosts) == 2


def test_a_host_without_port_gets_the_port_connection_would_use():
    settings = Settings.from_config({})
    with pytest.raises(Exit, match="listed twice"):
        load_inventory(settings, ["10.0.0.1,10.0.0.1:22"], _config())
    with pytest.raises(Exit, match="listed twice"):
        load_inventory(settings, ["10.0.0.1,10.0.0.1:2222"], _config(port=2222))
    with pytest.raises(Exit, match="listed twice"):
        load_inventory(settings, ["10.0.0.1,10.0.0.1:2200"],
                       _config("Host 10.0.0.1\n  Port 2200\n"))
    assert len(load_inventory(settings, ["10.0.0.1,10.0.0.1:22"],
                              _config("Host 10.0.0.1\n  Port 2200\n")).hosts) == 2


# -- the pure parts ----------------------------------------------------------------------------


def test_check_shape_mirrors_invokes_merge():
    reference = {"cluster": {"hosts": []}, "timeouts": {"connect": 10}, "user": "me"}
    assert check_shape(None, reference) == ({}, None, ())
    assert check_shape({"cluster": None, "user": "x"}, reference) == ({"user": "x"}, None, ())
    assert check_shape({"cluster": {"hosts": None}, "other": [1]}, reference)[1] is None
    assert check_shape({"timeouts": {"connect": {"s": 1}}}, reference)[1:] == (
        "timeouts.connect: expected a single value, got a mapping", ("timeouts", "connect"))
    assert check_shape({"user": {"name": "x"}}, reference)[1] == (
        "user: expected a single value, got a mapping")
    assert check_shape({"cluster": "a,b"}, reference)[1] == (
        "cluster: expected a mapping (key: value lines), got the string 'a,b'")


def test_yaml_line_finds_nested_keys():
    text = "# c\ncluster:\n  hosts: []\ndocker:\n  env:\n    A: 1\n"
    assert yaml_line(text, ("cluster",)) == 2
    assert yaml_line(text, ("docker", "env")) == 5
    assert yaml_line(text, ("docker", "missing")) is None
    assert yaml_line("a: [", ("a",)) is None


def test_describe_load_error_is_one_line(tmp_path):
    path = str(tmp_path / "x.yaml")
    assert describe_load_error(path, PermissionError(13, "Permission denied")) == (
        f"{path}: cannot read: Permission denied")
    assert describe_load_error(path, RuntimeError("a\nb")) == f"{path}: RuntimeError: a b"
    assert runtime_file_problem(path) == f"{path}: no such file; check the path given to -f"


def test_ulimits_as_soft_and_hard_merge_through_the_config_files(tmp_path):
    # Invoke refused a mapping over the built-in number (memlock: -1): the documented form crashed.
    runtime = tmp_path / "runtime.yaml"
    runtime.write_text("docker:\n  ulimits:\n    memlock: {soft: 1024, hard: 2048}\n"
                       "    nofile: 4096\n")
    config = Config(lazy=True)
    config.load_collection(default_config())
    config.set_runtime_path(str(runtime))
    config.load_runtime()
    settings = load_settings(Context(config))
    assert settings.docker.ulimits == {"memlock": {"soft": 1024, "hard": 2048}, "nofile": 4096,
                                       "stack": 67108864}
