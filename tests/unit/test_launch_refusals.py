"""launch refuses what `fab check` calls an error (tasks.run.startup.launch_refusals, pure)."""

from __future__ import annotations

from dataclasses import replace

from tasks.run.startup import launch_refusals
from tasks.lib.probe import CheckoutState, HostFacts, judge_cluster, judge_host


def facts(index: int = 0, **overrides) -> HostFacts:
    base = HostFacts(
        node_index=index, label=f"n{index}", hostname=f"host{index}",
        address=f"10.0.0.{10 + index}", ifname="eth0", gpu_vendor="nvidia", gpu_count=2,
        gpu_names=("H100", "H100"), branch="main", commit="a" * 40, dirty=False, tree_hash=None,
        docker_engine="27.0", container_state="running", shm_bytes=8 << 30,
        tools=frozenset(), port_free=None, master_ip="10.0.0.10",
        interfaces=(("lo", "127.0.0.1"), ("eth0", f"10.0.0.{10 + index}")), has_git=True,
    )
    return replace(base, **overrides)


def refusals(hosts: list[HostFacts], *, docker: bool = False,
             socket_ifname: str | None = None) -> list[str]:
    return launch_refusals(hosts, workdir="/w", socket_ifname=socket_ifname, docker=docker,
                           container="gemm")


def check_errors(hosts: list[HostFacts], *, docker: bool = False,
                 socket_ifname: str | None = None) -> list[str]:
    """What `fab check` would print as errors for the same facts (checkout matching)."""
    local = CheckoutState("main", "a" * 40, False, None)
    found = [f for h in hosts for f in judge_host(h, local=local, workdir="/w", nproc="auto",
                                                  docker_enabled=docker,
                                                  socket_ifname=socket_ifname)]
    return [f.message for f in found + judge_cluster(hosts) if f.is_error]


def test_a_healthy_cluster_is_not_refused():
    assert refusals([facts(0), facts(1)], docker=True) == []


def test_mixed_gpu_vendors_are_refused_as_check_refuses_them():
    hosts = [facts(0), facts(1, gpu_vendor="amd", gpu_names=("MI300X", "MI300X"))]
    assert any("mixed GPU vendors" in m for m in check_errors(hosts))
    assert refusals(hosts) == ["cluster: mixed GPU vendors (amd, nvidia): one collective "
                               "library cannot span them"]


def test_gpu_and_gpuless_nodes_are_refused():
    hosts = [facts(0), facts(1, gpu_vendor="none", gpu_count=0, gpu_names=())]
    assert len(refusals(hosts)) == 1 and "nodes 1 have no GPU" in refusals(hosts)[0]


def test_every_check_error_is_a_launch_refusal():
    hosts = [facts(0, ifname=None), facts(1, docker_engine=None, docker_error="denied"),
             facts(2, gpu_vendor="amd")]
    expected = check_errors(hosts, docker=True)
    got = refusals(hosts, docker=True)
    assert len(expected) == 3
    assert all(any(message in line for line in got) for message in expected), got
    assert got[0].startswith("node 0 (n0): no route to the master")


def test_missing_socket_interface_names_the_host():
    assert refusals([facts(0), facts(1)], socket_ifname="ib0") == [
        f"node {i} (n{i}): cluster.socket_ifname 'ib0' has no IPv4 address on this host "
        "(has: eth0, lo)" for i in (0, 1)]


def test_a_stopped_container_is_refused_though_check_only_warns():
    hosts = [facts(0), facts(1, container_state="exited")]
    assert check_errors(hosts, docker=True) == []
    assert refusals(hosts, docker=True) == [
        "node 1 (n1): container gemm is exited; run `fab docker-up`"]
    assert refusals(hosts, docker=False) == []


def test_the_checkout_is_left_to_require_matching_checkout():
    # A host on another commit is require_matching_checkout's to name (before this runs).
    assert refusals([facts(0), facts(1, commit="b" * 40, branch="dev")]) == []


def test_a_checkout_without_git_or_sync_record_is_no_launch_refusal():
    """An unpacked release archive (no .git, never synced): launch compares checkouts in
    require_matching_checkout (skipped on this machine alone), not here."""
    unpacked = facts(0, branch=None, commit=None, tree_hash=None, has_git=False)
    assert refusals([unpacked]) == []
