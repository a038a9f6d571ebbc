"""Another user's run registry on a shared node, from root's side and from ours (issue 26).

- Root's `fab emergency-stop --all-users` reaches every user's registry. Their registry is
  theirs: between root's look at an entry and its writes, the owner can swap the entry for a
  symlink to any directory, and root's writes (state, ended_at, exit_code) would replace
  root-owned files there. Root signals their processes and writes nothing there.
- A default registry (/tmp/gemm-runs-<uid>) made first by someone else blocks us: the refusal
  names who squats it and the fix, and that fix works.

The attacker is a real Unix user (`gemm-attacker`, tests/cluster/test_shared_node.py) acting
through `runuser` on a node of this module's own cluster; we are root.
"""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster.test_shared_node import (  # noqa: F401 - `attacker` is a fixture
    ATTACKER,
    as_attacker,
    attacker,
    listing,
    q,
    run_pids,
    start_attackers_run,
)
from tests.helpers import run_fab
from tests.simcluster import SimCluster
from tests.simcluster.testing import make_sim_cluster

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[tuple[SimCluster, Path]]:
    """One node of our own (its /tmp private), reached over SSH as root."""
    with make_sim_cluster(prefix="ou", nodes=1) as sim:
        tmp = tmp_path_factory.mktemp("others")
        data = yaml.safe_load(sim.write_fabric_config(tmp / "sim.yaml").read_text())
        data["cluster"]["experiments_dir"] = str(tmp / "experiments")
        config = tmp / "others.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        yield sim, config


def wait_for_pids(sim: SimCluster, run_id: str, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while len(run_pids(sim, 0, run_id)) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    found = run_pids(sim, 0, run_id)
    assert len(found) >= count, found
    return found


def root_owned_victim(sim: SimCluster) -> str:
    """A root-owned directory holding files named as registry values: what root's writes
    through a swapped-in symlink would replace."""
    victim = f"/tmp/victim-{uuid.uuid4().hex[:6]}"
    names = ("state", "ended_at", "exit_code", "stop_requested", "run_id", "node_rank")
    sim.exec(0, f"mkdir -m 755 {victim} && for f in {' '.join(names)}; do "
                f"echo \"root's $f\" > {victim}/$f; chmod 644 {victim}/$f; done")
    return victim


def test_roots_all_users_stop_writes_nothing_through_a_symlink_swapped_into_their_registry(
        node, attacker):
    sim, config = node
    name, uid = attacker
    run_id, workdir = start_attackers_run(sim, 0, uid)
    entry = f"/tmp/gemm-runs-{uid}/{run_id}/node_0"
    victim = root_owned_victim(sim)
    swapped = f"/tmp/swapped-{uuid.uuid4().hex[:6]}"
    try:
        theirs = wait_for_pids(sim, run_id, 4)  # launcher, fake torchrun and its 2 workers
        before = listing(sim, 0, victim)
        # The attacker's watcher (no markers: root's stop does not signal it): as soon as root's
        # SIGKILL has taken their launcher, the entry becomes a symlink to root's directory, and
        # a marked process keeps root's confirm loop (and the writes after it) busy a while.
        watcher = (f"e={q(entry)}; lp=$(cut -d' ' -f1 \"$e/launcher.pid\"); "
                   "while kill -0 \"$lp\" 2>/dev/null; do :; done; "
                   f"mv -- \"$e\" \"$e.moved\" && ln -s {victim} \"$e\" && date +%s.%N > {swapped}; "
                   f"GEMM_RUN_ID={run_id} GEMM_NODE_RANK=0 exec sleep 30")
        as_attacker(sim, 0, f"setsid bash -c {q(watcher)} </dev/null >/dev/null 2>&1 &")
        time.sleep(0.5)  # the watcher is spinning on the launcher's pid

        stopped = run_fab(config, "emergency-stop", "--all-users", timeout=120)
        out = stopped.stdout + stopped.stderr
        assert stopped.returncode == 0, out
        # The swap happened while root's stop ran: the attack was really made.
        assert sim.exec(0, f"cat {swapped}", check=False).returncode == 0, out
        assert sim.exec(0, f"readlink {q(entry)}").stdout.strip() == victim
        # Root's files are as they were: nothing replaced, nothing added (no mktemp leftovers).
        assert listing(sim, 0, victim) == before, out
        for f in ("state", "ended_at", "exit_code", "stop_requested"):
            assert sim.exec(0, f"cat {victim}/{f}").stdout == f"root's {f}\n"
        # ... and their run was killed all the same, and said so.
        assert re.search(rf"run {run_id} of user {name} node 0 killed: killed, exit code 137 "
                         r"\(not recorded: root writes nothing into another user's registry\)",
                         stopped.stdout), out
        # (The watcher's own marked process may have come after root's last look.)
        deadline = time.monotonic() + 10
        while set(theirs) & set(run_pids(sim, 0, run_id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not set(theirs) & set(run_pids(sim, 0, run_id))
        # Their moved-away entry was not written by root either (their launcher could not).
        moved_state = sim.exec(0, f"cat {q(entry)}.moved/state").stdout.strip()
        assert moved_state == "running", moved_state
        assert sim.exec(0, f"ls {q(entry)}.moved/stop_requested", check=False).returncode != 0
    finally:
        for pid in run_pids(sim, 0, run_id):
            sim.exec(0, f"kill -9 {pid.split('/')[2]}", check=False)
        sim.exec(0, f"rm -rf {workdir} /tmp/gemm-runs-{uid} {victim} {swapped}", check=False)


def test_a_fifo_in_another_users_registry_does_not_stall_roots_all_users_stop(node, attacker):
    """A FIFO where a value file belongs would block root's read for ever (no writer), and with
    it the stop of every registry after theirs."""
    sim, config = node
    name, uid = attacker
    run_id, workdir = start_attackers_run(sim, 0, uid)
    fake = f"/tmp/gemm-runs-{uid}/multinode_28ch_256th_20990101_000000_fifo00/node_0"
    try:
        wait_for_pids(sim, run_id, 4)
        as_attacker(sim, 0, f"mkdir -p {fake} && echo x > {fake}/run_id && mkfifo {fake}/host "
                            f"{fake}/state {fake}/node_rank")
        started = time.monotonic()
        stopped = run_fab(config, "emergency-stop", "--all-users", timeout=200)
        took = time.monotonic() - started
        out = stopped.stdout + stopped.stderr
        assert stopped.returncode == 0, out
        assert f"run {run_id} of user {name} node 0 killed" in stopped.stdout, out
        assert took < 60, f"{took:.0f} s: {out}"
        deadline = time.monotonic() + 10
        while run_pids(sim, 0, run_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run_pids(sim, 0, run_id) == []
    finally:
        for pid in run_pids(sim, 0, run_id):
            sim.exec(0, f"kill -9 {pid.split('/')[2]}", check=False)
        sim.exec(0, f"rm -rf {workdir} /tmp/gemm-runs-{uid}", check=False)


def test_a_squatted_default_registry_names_the_squatter_and_a_fix_that_works(node, attacker,
                                                                              tmp_path):
    sim, config = node
    name, _ = attacker
    ours = "/tmp/gemm-runs-0"
    sim.exec(0, f"rm -rf {ours}")
    as_attacker(sim, 0, f"mkdir -m 755 {ours}")
    try:
        refused = run_fab(config, "status", timeout=60)
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0, out
        line = next((line for line in out.splitlines() if "squatted" in line), "")
        assert f"{ours} is squatted by {name}: ask them or root to remove it" in line, out
        fix = re.search(r"set cluster\.registry_dir to a directory of yours, e\.g\. "
                        r"(/tmp/gemm-runs-0-[0-9a-f]{8}), in fabric\.yaml or your fab -f file",
                        line)
        assert fix, out
        # The fix, as told: the suggested registry in the config, and fab works again.
        data = yaml.safe_load(config.read_text())
        data["cluster"]["registry_dir"] = fix.group(1)
        fixed = tmp_path / "fixed.yaml"
        fixed.write_text(yaml.safe_dump(data, sort_keys=False))
        status = run_fab(fixed, "status", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        sim.exec(0, f"rm -rf {ours} /tmp/gemm-runs-0-*", check=False)


__all__ = ["ATTACKER"]
