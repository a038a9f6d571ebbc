"""docker-up / docker-status / docker-down through `fab`, on the simulated cluster's own dockerds.

Each node of `cluster_docker` runs its own Docker engine; `fab` runs as a subprocess with a
runtime config derived from the one the cluster writes. The workdir is this checkout, which
every node sees at the same path (the shared-filesystem case), so the checkout check passes
without a sync.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.helpers import REPO, docker_config, registry_dir_for, run_fab
from tests.simcluster import SimCluster

pytestmark = [pytest.mark.cluster, pytest.mark.docker]

HOSTILE_VALUE = "$(touch /tmp/pwned) 'single' \"double\" `tick` \\ * ${HOME} ünï\nsecond line"


def container_field(cluster: SimCluster, index: int, container: str, template: str) -> str:
    result = cluster.exec(index, f"docker inspect -f '{template}' {container}", check=False)
    return result.stdout.strip() if result.returncode == 0 else "absent"


def clean_nodes(cluster: SimCluster, container: str, config: Path) -> None:
    """The shared cluster is left as found: no container, no compose file of ours."""
    for index in range(len(cluster.nodes)):
        cluster.exec(index, f"docker rm -f {container} >/dev/null 2>&1; "
                     f"rm -rf {registry_dir_for(config)}", check=False)


def test_docker_up_status_down(cluster_docker: SimCluster, image: str, tmp_path: Path) -> None:
    container = f"dk-{uuid.uuid4().hex[:8]}"
    config = docker_config(cluster_docker, tmp_path / "cycle.yaml", image, container=container,
                          env={"HOSTILE": HOSTILE_VALUE, "yes": "no"})
    count = len(cluster_docker.nodes)
    nodes = range(count)
    try:
        up = run_fab(config, "docker-up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert up.stdout.count("created") == count, up.stdout
        ids = [container_field(cluster_docker, i, container, "{{.Id}}") for i in nodes]
        for index in nodes:
            assert container_field(cluster_docker, index, container, "{{.State.Running}}") == "true"
            inside = cluster_docker.exec(index, f"docker exec {container} sh -c "
                                         "'printenv HOSTILE; printf x; printenv yes; pwd; "
                                         "ls /tmp/pwned 2>&1 || true'")
            expected = f"{HOSTILE_VALUE}\nxno\n{REPO}\n"
            assert inside.stdout.startswith(expected), inside.stdout
            # Neither compose on the node nor a shell in the container ran the `$(touch ...)`.
            assert "No such file" in inside.stdout
            assert cluster_docker.exec(index, "test ! -e /tmp/pwned", check=False).returncode == 0
            # The workdir is the node's (here: this checkout), mounted at the same path.
            assert cluster_docker.exec(index, f"docker exec {container} test -f "
                                       f"{REPO}/fabfile.py", check=False).returncode == 0

        again = run_fab(config, "docker-up")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("already running") == count, again.stdout
        assert [container_field(cluster_docker, i, container, "{{.Id}}") for i in nodes] == ids

        status = run_fab(config, "docker-status")
        assert status.returncode == 0, status.stdout + status.stderr
        rows = [line for line in status.stdout.splitlines() if image in line]
        assert len(rows) == count, status.stdout
        for node, row in zip(cluster_docker.nodes, rows):
            assert node.address in row and "running" in row and ("v1" in row or "v2" in row)
        assert f"running on {count} of {count}" in status.stdout

        down = run_fab(config, "docker-down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert down.stdout.count("removed") == count, down.stdout
        ids_after = [container_field(cluster_docker, i, container, "{{.Id}}") for i in nodes]
        assert ids_after == ["absent"] * count

        after = run_fab(config, "docker-status")
        assert after.returncode == 0, after.stdout + after.stderr
        assert after.stdout.count("absent") == count, after.stdout
        assert run_fab(config, "docker-down").stdout.count("not present") == count
    finally:
        clean_nodes(cluster_docker, container, config)


def test_docker_up_with_a_missing_image_names_every_host(cluster_docker: SimCluster,
                                                         tmp_path: Path) -> None:
    container = f"dk-{uuid.uuid4().hex[:8]}"
    # A registry that refuses at once (port 1): the pull fails without waiting for DNS.
    bad_image = "localhost:1/gemm-sim:no-such-tag"
    config = docker_config(cluster_docker, tmp_path / "badimage.yaml", bad_image, container=container)
    try:
        up = run_fab(config, "docker-up")
        assert up.returncode == 1, up.stdout + up.stderr
        count = len(cluster_docker.nodes)
        assert f"docker-up failed on {count} of {count} host(s)" in up.stderr
        for node in cluster_docker.nodes:
            line = next(line for line in up.stderr.splitlines() if f"({node.address})" in line)
            assert f"cannot pull image {bad_image}: " in line, line
        assert "Traceback" not in up.stderr
    finally:
        clean_nodes(cluster_docker, container, config)


def test_docker_up_fails_only_on_the_host_with_a_conflicting_container(
        cluster_docker: SimCluster, image: str, tmp_path: Path) -> None:
    """A container of the same name that compose does not own (started by hand) on node 1."""
    container = f"dk-{uuid.uuid4().hex[:8]}"
    config = docker_config(cluster_docker, tmp_path / "conflict.yaml", image, container=container)
    try:
        cluster_docker.exec(1, f"docker create --name {container} {image} sleep 1")
        up = run_fab(config, "docker-up")
        assert up.returncode == 1, up.stdout + up.stderr
        assert f"docker-up failed on 1 of {len(cluster_docker.nodes)} host(s)" in up.stderr, up.stderr
        failing = [line for line in up.stderr.splitlines() if line.strip().startswith("node ")]
        assert len(failing) == 1 and f"node 1 ({cluster_docker.nodes[1].address})" in failing[0]
        assert "already in use" in failing[0] or "Conflict" in failing[0], failing[0]
        assert container_field(cluster_docker, 0, container, "{{.State.Running}}") == "true"
        # docker-down removes both: compose's on node 0 and the stray one on node 1.
        down = run_fab(config, "docker-down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert down.stdout.count("removed") == len(cluster_docker.nodes), down.stdout
    finally:
        clean_nodes(cluster_docker, container, config)


@pytest.mark.parametrize("image_name, docker, message", [
    (None, {}, "config error: docker.image is not set"),
    ("x", {"enabled": False}, "docker.enabled is false"),
    ("x", {"volumes": ["/data"]}, "docker.volumes"),
    ("x", {"ulimits": {"memlock": "lots"}}, "docker.ulimits.memlock"),
])
def test_docker_up_config_errors_touch_no_host(cluster_docker: SimCluster, tmp_path: Path,
                                               image_name: str | None, docker: dict,
                                               message: str) -> None:
    config = docker_config(cluster_docker, tmp_path / "configerror.yaml", image_name, **docker)
    up = run_fab(config, "docker-up")
    assert up.returncode == 2, up.stdout + up.stderr
    assert message in up.stderr and "Traceback" not in up.stderr
    assert len(up.stderr.strip().splitlines()) == 1
    for index in range(len(cluster_docker.nodes)):
        assert cluster_docker.exec(index, f"ls {registry_dir_for(config)}", check=False).returncode != 0
