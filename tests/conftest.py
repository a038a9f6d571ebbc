"""Shared fixtures: the simulated multi-node cluster (tests/simcluster, docs/SIM_CLUSTER.md).

- cluster3: session-wide, 3 nodes, separate /srv per node, interfaces eth0/ens5/eth1, no docker.
- cluster_docker: session-wide, 2 nodes, each with its own dockerd and the gemm-sim image;
  `image` is that image's tag.
- cluster_slurm: session-wide, 2 nodes sharing one /srv, with a real Slurm (slurmctld on the
  controller's side, a slurmd per node; docs/SLURM.md). Client tools need `cluster_slurm.slurm_env`
  (SLURM_CONF) or `cluster_slurm.slurm_run([...])`. Opt-in: only tests asking for it start it.
- sim_cluster: a factory for one test: `c = sim_cluster(nodes=2, shared_fs=True)`; torn down
  when the test ends.
- make_sim_cluster(**kw): context manager for anything else (tests.simcluster.testing).

Plain helpers (run_fab, wait_until, the fake rank process, clean-up) are in tests/helpers.py.

Session clusters are shared by every test that asks for them: don't leave state behind that
another test could trip over (use your own workdir or registry dir, clean up your containers).
Without root/namespaces these skip; with CI=true they fail instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.simcluster import SimCluster
from tests.simcluster.testing import (
    in_ci,
    make_sim_cluster,
    reap_stale_clusters,
    require_cluster,
    unique_name,
)

__all__ = ["make_sim_cluster"]

_stale_reaped = False


def _prepare(docker: bool = False, slurm: bool = False) -> None:
    global _stale_reaped
    require_cluster(docker=docker, slurm=slurm)
    if not _stale_reaped:
        _stale_reaped = True
        reap_stale_clusters()


@pytest.fixture(scope="session")
def cluster3() -> Iterator[SimCluster]:
    _prepare()
    with make_sim_cluster(prefix="c3", nodes=3, ifnames=["eth0", "ens5", "eth1"]) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_docker() -> Iterator[SimCluster]:
    _prepare(docker=True)
    with make_sim_cluster(prefix="cd", nodes=2, docker=True, ifnames=["eth0", "ens5"]) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_slurm() -> Iterator[SimCluster]:
    _prepare(slurm=True)
    with make_sim_cluster(prefix="cs", nodes=2, shared_fs=True, slurm=True) as cluster:
        yield cluster


@pytest.fixture
def image(cluster_docker: SimCluster) -> str:
    """The image on cluster_docker's nodes (one docker-up can start with `init: true`)."""
    return cluster_docker.image


@pytest.fixture
def sim_cluster() -> Iterator[Callable[..., SimCluster]]:
    """Factory: each call brings up one more cluster; all are torn down after the test."""
    made: list[SimCluster] = []

    def factory(**kwargs) -> SimCluster:
        _prepare(docker=kwargs.get("docker", False), slurm=kwargs.get("slurm", False))
        cluster = SimCluster(name=kwargs.pop("name", None) or unique_name("f"), **kwargs)
        made.append(cluster)
        return cluster.up()

    yield factory
    for cluster in made:
        cluster.down()


_skipped_tests: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is no skipped capability
        _skipped_tests.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # CI runs as root with everything installed (cluster, docker, docker-compose, the CPU torch):
    # a skipped test there hides breakage, whichever capability it skipped for.
    if in_ci() and _skipped_tests:
        print(f"\nCI=true but {len(_skipped_tests)} test(s) were skipped: "
              + ", ".join(_skipped_tests[:5]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
