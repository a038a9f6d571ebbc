"""`fab check`, `fab setup` and `fab sync` as a user runs them, against the simulated cluster.

Each test drives `fab` in a subprocess from a SNAPSHOT of the task library: a fresh git repo
under /var/tmp (visible to the nodes, unlike /tmp) holding the controller side only. Engineers
edit /work/main while tests run; a snapshot keeps commits, hashes and imports stable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.helpers import FAB, REPO, run_fab

pytestmark = pytest.mark.cluster

SNAPSHOT_PARTS = [
    "fabfile.py",
    "fabric.yaml",
    ".gitignore",
    "tasks",  # all of it: fabfile.py imports every task module
]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def snapshot() -> Path:
    root = Path(tempfile.mkdtemp(prefix="gemm-snap-", dir="/var/tmp"))
    for part in SNAPSHOT_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, root / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / part)
    (root / "extra").mkdir()
    (root / "extra" / "old.txt").write_text("removed later\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "snapshot")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def runtime_config(cluster, path: Path, **cluster_keys) -> Path:
    """The cluster's own fab config with some cluster.* keys replaced (None deletes a key)."""
    data = yaml.safe_load(Path(cluster.fabric_config_path).read_text())
    for key, value in cluster_keys.items():
        if value is None:
            data["cluster"].pop(key, None)
        else:
            data["cluster"][key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fab(
    snapshot: Path, config: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`fab` run from the snapshot (its fabfile and tasks), not from this checkout."""
    return run_fab(config, *args, cwd=snapshot, timeout=timeout)


def rows(output: str) -> dict[int, list[str]]:
    """Table rows by node index (rich draws cells between '│')."""
    table = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0].isdigit():
            table[int(cells[0])] = cells
    return table


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")
    ]


@pytest.fixture
def node_workdir(cluster3):
    """A per-test workdir under each node's private /srv, removed afterwards."""
    workdir = f"/srv/gemm-{uuid.uuid4().hex[:8]}"
    yield workdir
    for index in range(len(cluster3.nodes)):
        cluster3.exec(index, f"rm -rf {workdir}", check=False)


def test_check_passes_and_resolves_the_interface_per_host(cluster3, snapshot, tmp_path):
    config = runtime_config(cluster3, tmp_path / "rt.yaml", workdir=str(snapshot))
    started = time.monotonic()
    result = fab(snapshot, config, "check")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    commit = git(snapshot, "rev-parse", "HEAD")[:12]
    for node in cluster3.nodes:
        cells = table[node.index]
        assert cells[1:6] == [node.address, "yes", node.hostname, node.address, node.ifname]
        assert f"main @ {commit}" in cells[7] and "none (cpu/gloo)" in cells[6]
    assert "check passed on 3 node(s)" in result.stdout
    print(f"fab check on 3 nodes: {elapsed:.2f}s wall (subprocess, incl. imports)")


def test_check_names_hosts_on_another_branch_or_commit_and_sync_fixes_it(
    cluster3, snapshot, tmp_path, node_workdir
):
    for node in cluster3.nodes:
        cluster3.exec(node.index, f"git clone -q {snapshot} {node_workdir}")
    cluster3.exec(1, f"git -C {node_workdir} checkout -q -b feature")
    cluster3.exec(
        2,
        f"cd {node_workdir} && echo x > n2.txt && git add n2.txt && "
        "git -c user.name=n -c user.email=n@n commit -q -m node2",
    )
    config = runtime_config(cluster3, tmp_path / "rt.yaml", workdir=node_workdir)
    result = fab(snapshot, config, "check")
    assert result.returncode == 1
    errors = error_lines(result)
    addresses = [node.address for node in cluster3.nodes]
    assert len(errors) == 2, errors
    assert errors[0].startswith(
        f"error: node 1 ({addresses[1]}): checkout differs from this one "
        "(branch feature != main): run `fab sync`"
    )
    assert errors[1].startswith(
        f"error: node 2 ({addresses[2]}): checkout differs from this one (commit "
    )
    assert "check failed: 2 problem(s)" in result.stderr

    assert fab(snapshot, config, "sync").returncode == 0
    result = fab(snapshot, config, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    commit = git(snapshot, "rev-parse", "HEAD")[:12]
    assert all(f"main @ {commit}" in cells[7] for cells in rows(result.stdout).values())


def test_check_fails_on_an_unreachable_host_without_stalling_the_others(
    cluster3, snapshot, tmp_path
):
    bogus = cluster3.nodes[0].address.rsplit(".", 1)[0] + ".250"
    config = runtime_config(
        cluster3, tmp_path / "rt.yaml", workdir=str(snapshot), hosts=[*cluster3.hosts, bogus]
    )
    started = time.monotonic()
    result = fab(snapshot, config, "check")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    table = rows(result.stdout)
    assert [table[i][2] for i in range(3)] == ["yes"] * 3 and table[3][2] == "no"
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith(f"error: node 3 ({bogus}): unreachable"), (
        errors
    )
    assert elapsed < 5 + 6  # timeouts.connect is 5 s in the cluster's config; nothing waits twice


def test_check_fails_on_a_changed_host_key_naming_host_and_file(cluster3, snapshot, tmp_path):
    key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    changed = cluster3.nodes[2].address
    lines = [
        f"{changed} {' '.join(key.with_suffix('.pub').read_text().split()[:2])}"
        if changed in line.split()[0].split(",")
        else line
        for line in Path(cluster3.known_hosts_path).read_text().splitlines()
    ]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("\n".join(lines) + "\n")
    config = runtime_config(
        cluster3,
        tmp_path / "rt.yaml",
        workdir=str(snapshot),
        known_hosts=str(known_hosts),
        host_key_policy="accept-new",
    )
    result = fab(snapshot, config, "check")
    assert result.returncode == 1
    errors = error_lines(result)
    assert len(errors) == 1
    assert errors[0].startswith(f"error: node 2 ({changed}): host key CHANGED for {changed}")
    assert f"ssh-keygen -R {changed} -f {known_hosts}" in errors[0]
    assert known_hosts.read_text() == "\n".join(lines) + "\n"


def setup_config(cluster, snapshot, tmp_path):
    """A runtime config with no hosts, pointing setup at a hosts file of its own."""
    hosts_file = tmp_path / "nodes.txt"
    config = runtime_config(cluster, tmp_path / "rt.yaml", workdir=str(snapshot), hosts=None,
                            hosts_file=str(hosts_file))
    return hosts_file, config


def test_setup_writes_a_usable_inventory(cluster3, snapshot, tmp_path):
    hosts_file, config = setup_config(cluster3, snapshot, tmp_path)
    refused = fab(snapshot, config, "setup", "--hosts", ",".join(cluster3.hosts))
    assert refused.returncode == 2 and "no terminal" in refused.stderr and not hosts_file.exists()

    result = fab(snapshot, config, "setup", "--hosts", ",".join(cluster3.hosts), "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [
        line for line in hosts_file.read_text().splitlines() if not line.startswith("#")
    ] == cluster3.hosts
    assert "Next steps" in result.stdout and "fab launch" in result.stdout
    check = fab(snapshot, config, "check")
    assert check.returncode == 0 and f"3 node(s) from {hosts_file}" in check.stdout

    # An interface that some hosts lack is refused, naming them; nothing is written.
    bad = fab(
        snapshot, config, "setup", "--hosts", ",".join(cluster3.hosts), "--iface", "eth0", "--yes"
    )
    assert bad.returncode == 1
    assert f"node 1 ({cluster3.hosts[1]}), node 2 ({cluster3.hosts[2]})" in bad.stderr
    assert "socket_ifname" not in config.read_text()


def test_setup_updates_cluster_hosts_where_the_config_sets_them(cluster3, snapshot, tmp_path):
    config = runtime_config(cluster3, tmp_path / "rt.yaml", workdir=str(snapshot))
    reordered = [cluster3.hosts[1], cluster3.hosts[0]]
    result = fab(
        snapshot, config, "setup", "--hosts", ",".join(reordered), "--iface", "lo", "--yes"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written = yaml.safe_load(config.read_text())["cluster"]
    assert written["hosts"] == reordered and written["socket_ifname"] == "lo"
    assert not (snapshot / "node_ip_list.txt").exists()


def test_sync_to_separate_filesystems_then_check_agrees(cluster3, snapshot, tmp_path, node_workdir):
    config = runtime_config(cluster3, tmp_path / "rt.yaml", workdir=node_workdir)
    missing = fab(snapshot, config, "check")
    assert missing.returncode == 1 and len(error_lines(missing)) == 3
    assert "does not exist: run `fab sync`" in error_lines(missing)[0]

    result = fab(snapshot, config, "sync")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(cells[2].startswith("wrote ") for cells in rows(result.stdout).values())
    for node in cluster3.nodes:
        assert (
            cluster3.exec(node.index, f"cat {node_workdir}/tasks/check.py").stdout
            == (snapshot / "tasks/check.py").read_text()
        )
    check = fab(snapshot, config, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    commit = git(snapshot, "rev-parse", "HEAD")[:12]
    assert all(
        f"main @ {commit}" in cells[7] and "(synced)" in cells[7]
        for cells in rows(check.stdout).values()
    )

    # A file removed from the checkout goes; what the node made itself stays.
    cluster3.exec(
        1,
        f"mkdir -p {node_workdir}/experiments && echo 1 > {node_workdir}/experiments/r.json"
        f" && echo mine > {node_workdir}/local.txt",
    )
    git(snapshot, "rm", "-q", "extra/old.txt")
    git(snapshot, "commit", "-q", "-m", "drop old")
    result = fab(snapshot, config, "sync")
    assert result.returncode == 0 and "deleted 1 stale" in rows(result.stdout)[1][2]
    listing = cluster3.exec(
        1, f"cd {node_workdir} && ls -d extra experiments/r.json local.txt 2>&1", check=False
    ).stdout
    assert (
        "'extra': No such file" in listing
        and "experiments/r.json" in listing
        and "local.txt" in listing
    )

    # Editing a synced file on a node is caught, naming that node only.
    cluster3.exec(2, f"echo '# edited' >> {node_workdir}/fabfile.py")
    edited = fab(snapshot, config, "check")
    assert edited.returncode == 1
    errors = error_lines(edited)
    assert len(errors) == 1 and errors[0].startswith(
        f"error: node 2 ({cluster3.hosts[2]}): checkout differs"
    )
    assert "changed since the last sync" in errors[0]


def test_sync_skips_nodes_that_share_this_checkout(cluster3, snapshot, tmp_path):
    config = runtime_config(cluster3, tmp_path / "rt.yaml", workdir=str(snapshot))
    result = fab(snapshot, config, "sync")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(
        "skipped: its workdir is this checkout" in cells[2]
        for cells in rows(result.stdout).values()
    )
    assert not list(snapshot.glob(".gemm-sync*"))


def test_sync_writes_once_to_nodes_sharing_a_filesystem(sim_cluster, snapshot, tmp_path):
    cluster = sim_cluster(nodes=2, shared_fs=True, ifnames=["eth0", "ens7"])
    config = runtime_config(cluster, tmp_path / "rt.yaml")
    result = fab(snapshot, config, "sync")
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    assert (
        table[0][2].startswith("wrote ")
        and table[1][2] == "skipped: shares its workdir with node 0"
    )
    check = fab(snapshot, config, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert (
        cluster.exec(
            1, f"ls -a {cluster.workdir} | grep -c gemm-sync-probe", check=False
        ).stdout.strip()
        == "0"
    )


def test_setup_asks_in_a_terminal(cluster3, snapshot, tmp_path):
    hosts_file, config = setup_config(cluster3, snapshot, tmp_path)
    leader, follower = os.openpty()
    process = subprocess.Popen(
        [FAB, "-f", str(config), "setup"],
        cwd=snapshot,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child side closed
                return
            if not chunk:
                return
            output.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Answers typed ahead: the hosts (space-separated, as people type them), then "yes".
    os.write(leader, (" ".join(cluster3.hosts[:2]) + "\ny\n").encode())
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")
    reader.join(timeout=5)
    os.close(leader)
    text = output.decode(errors="replace")
    assert "master first" in text and "Write these?" in text
    assert [
        line for line in hosts_file.read_text().splitlines() if not line.startswith("#")
    ] == cluster3.hosts[:2]


def test_require_matching_checkout_for_other_tasks(cluster3, snapshot, tmp_path, node_workdir):
    """In-process, as docker-up and launch call it (the controller checkout is this repo)."""
    from fabric import Config
    from invoke import Context
    from invoke.exceptions import Exit

    from tasks.cluster.preflight import require_matching_checkout
    from tasks.cluster.session import ClusterSession

    def session_for(workdir: str) -> ClusterSession:
        config = Config(
            runtime_path=str(runtime_config(cluster3, tmp_path / "rt.yaml", workdir=workdir))
        )
        config.load_runtime()
        return ClusterSession(Context(config=config))

    with session_for(str(REPO)) as session:  # the nodes see this very checkout
        require_matching_checkout(session)
    cluster3.exec(1, f"git clone -q {snapshot} {node_workdir}")
    for index in (0, 2):
        cluster3.exec(index, f"git clone -q {REPO} {node_workdir}")
    with session_for(node_workdir) as session, pytest.raises(Exit) as raised:
        require_matching_checkout(session)
    message = str(raised.value.message)
    assert f"node 1 ({cluster3.hosts[1]}): commit " in message and "run `fab sync`" in message
    assert "node 0" not in message and "node 2" not in message


@pytest.mark.docker
def test_check_reports_docker_engine_and_container(cluster_docker, snapshot, tmp_path):
    container = f"probe-{uuid.uuid4().hex[:8]}"
    config = runtime_config(cluster_docker, tmp_path / "rt.yaml", workdir=str(snapshot))
    data = yaml.safe_load(config.read_text())
    data["docker"].update(enabled=True, container=container)
    config.write_text(yaml.safe_dump(data))
    cluster_docker.exec(1, f"docker create --name {container} {cluster_docker.image} true")
    try:
        result = fab(snapshot, config, "check")
    finally:
        cluster_docker.exec(1, f"docker rm -f {container}", check=False)
    assert result.returncode == 0, result.stdout + result.stderr  # a missing container only warns
    table = rows(result.stdout)
    assert table[0][8].endswith("/ absent") and table[1][8].endswith("/ created")
    version = table[0][8].split(" / ")[0]
    assert version[0].isdigit()
    assert "warning: node 0" in result.stdout and "run `fab docker-up`" in result.stdout
