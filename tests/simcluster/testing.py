"""pytest helpers for the simulated cluster (the fixtures themselves are in tests/conftest.py).

    from tests.simcluster.testing import make_sim_cluster

    @pytest.mark.cluster
    def test_shared(tmp_path):
        with make_sim_cluster(nodes=2, shared_fs=True) as c:
            ...

Without root or namespaces the test is skipped with a one-line reason, except under CI
(CI=true), where a cluster test that cannot run is a failure: CI runs as root here.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from . import cluster as cluster_module
from . import slurm as slurm_module
from .cluster import SimCluster

_counter = itertools.count()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_cluster(docker: bool = False, slurm: bool = False) -> None:
    """Skips (fails under CI) the calling test when this machine cannot run a cluster."""
    reason = cluster_module.missing_capability(docker=docker)
    if reason is None and slurm:
        reason = slurm_module.missing_capability(accounting=True)
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"sim-cluster unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"sim-cluster: {reason}")


def unique_name(prefix: str) -> str:
    """Names carry the pid: two pytest runs at once (two engineers) never share a cluster."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def install_sigterm_handler() -> None:
    """Turns SIGTERM into KeyboardInterrupt so fixtures' tear-down still runs when killed."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")
        try:
            signal.signal(signal.SIGTERM, interrupt)
        except ValueError:  # not the main thread
            pass


def reap_stale_clusters() -> list[str]:
    """Tears down clusters whose owning process died (a killed test run); returns their names."""
    reaped = []
    # Under the state root's lock: two pytest runs starting together must not both tear down.
    with cluster_module.state_root_lock(cluster_module.default_state_root()):
        for state_dir, state in cluster_module.list_states():
            if cluster_module.is_stale(state) and state_dir.exists():
                cluster_module.teardown(state_dir)
                reaped.append(state.get("name", state_dir.name))
    return reaped


@contextmanager
def make_sim_cluster(
    *, name: str | None = None, prefix: str = "t", **kwargs
) -> Iterator[SimCluster]:
    """A cluster that is up inside the block and torn down after it, also on failure."""
    require_cluster(docker=kwargs.get("docker", False), slurm=kwargs.get("slurm", False))
    install_sigterm_handler()
    cluster = SimCluster(name=name or unique_name(prefix), **kwargs)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
