"""Start-up failures on the simulated cluster, as a user meets them (issue 27).

- A node firewalled off the master port (iptables in node 1's namespace, SSH still allowed):
  `fab check` names it within 10 s, `fab launch` (no check first) refuses within 60 s, with the
  address, port, interface and cause; nothing is started.
- A rank frozen (SIGSTOP) while it starts: the launch names node, rank and phase and takes every
  rank's stacks within 60 s, then stops the run.
- A rank that dies during init after its peers already failed waiting for it: the first failure
  is that rank, the waiting ranks' errors are its consequences.
- A rank frozen while it starts, watchdog off: the waiting ranks' store timeouts blame it by the
  store key it never set.

One 2-node cluster of its own (its firewall rules must not reach other tests' nodes); launches
run with workdir = this checkout, bare, 2 gloo ranks per node, cpu_tiny.yaml
(distributed.timeout_s 60: the derived hang timeout is 48 s).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.lib.rendezvous import CONNECT_WINDOW_S
from tests.helpers import FAB, REPO, fab_env, remove_node_run_dirs, run_fab
from tests.simcluster import SimCluster
from tests.simcluster.testing import make_sim_cluster

pytestmark = [pytest.mark.cluster]

DIES_IN_INIT = """\
# Rank 3 destroys its process group right after init_process_group (its peers lose their pairs
# at once) and raises 4 s later: the victims fail first, the cause after them.
import os, time
if os.environ.get("RANK") == "3" and "LOCAL_RANK" in os.environ:
    import torch.distributed as dist
    _real = dist.init_process_group
    def _init_then_die(*args, **kwargs):
        _real(*args, **kwargs)
        dist.destroy_process_group()
        time.sleep(4)
        raise RuntimeError("injected: rank 3 died during init")
    dist.init_process_group = _init_then_die
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Iterator[SimCluster]:
    with make_sim_cluster(prefix="su", nodes=2, ifnames=["eth0", "ens5"]) as cluster:
        yield cluster


@pytest.fixture
def config(sim: SimCluster, tmp_path: Path) -> Iterator[Path]:
    data = yaml.safe_load(sim.write_fabric_config().read_text())
    data["cluster"]["workdir"] = str(REPO)
    data["cluster"]["registry_dir"] = f"/tmp/gemm-runs-su{uuid.uuid4().hex[:6]}"
    data["cluster"]["experiments_dir"] = str(tmp_path / "experiments")
    data.setdefault("docker", {}).update(enabled=False, platform="cpu")
    data.setdefault("launch", {})["nproc"] = 2
    path = tmp_path / "startup.yaml"
    path.write_text(yaml.safe_dump(data))
    yield path
    remove_node_run_dirs(tmp_path / "experiments")
    for node in sim.nodes:  # whatever a failed test left running
        sim.exec(node.index, "for f in $(grep -lzs '^GEMM_RUN_ID=' /proc/[0-9]*/environ); do "
                             "p=${f#/proc/}; kill -9 ${p%/environ} 2>/dev/null; done; true",
                 check=False)


@pytest.fixture
def firewall(sim: SimCluster) -> Iterator[callable]:
    """firewall(target): node 1 cut off from node 0 for every TCP port but SSH's, both ways."""
    master = sim.nodes[0].address

    def apply(target: str = "DROP") -> None:
        sim.exec(1, f"iptables -A OUTPUT -d {master} -p tcp -m multiport ! --ports 22 -j {target} && "
                    f"iptables -A INPUT -s {master} -p tcp -m multiport ! --ports 22 -j {target}")

    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed (scripts/install-system-deps installs it)")
    yield apply
    sim.exec(1, "iptables -F INPUT; iptables -F OUTPUT", check=False)


def run_dirs(config: Path) -> list[Path]:
    experiments = Path(yaml.safe_load(config.read_text())["cluster"]["experiments_dir"])
    return sorted(experiments.glob("multinode_*")) if experiments.exists() else []


# -- a node cut off from the master port ----------------------------------------------------------

@pytest.mark.parametrize("target, cause", [("DROP", "ETIMEDOUT: no answer in 3 s: packets to port"),
                                           ("REJECT", "ECONNREFUSED: connection refused while our "
                                                      "listener was up")])
def test_check_names_a_node_firewalled_off_the_master_port(sim, config, firewall, target, cause):
    started = time.monotonic()
    ok = run_fab(config, "check")
    baseline = time.monotonic() - started
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr
    firewall(target)
    started = time.monotonic()
    result = run_fab(config, "check")
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    # The firewall costs the connect window (3 s) on top of a check that passes: within 10 s on
    # an idle machine (docs/PERFORMANCE.md); a loaded one slows both alike.
    assert elapsed < max(10.0, baseline + CONNECT_WINDOW_S + 6), (elapsed, baseline)
    [line] = [line for line in result.stdout.splitlines() if "cannot reach" in line]
    master, worker = sim.nodes[0].address, sim.nodes[1].address
    assert line.startswith(f"error: node 1 ({worker}): cannot reach {master}:"), line
    assert f"for the store (torchrun's rendezvous) from ens5 ({worker})" in line, line
    assert cause in line, line
    port = re.search(rf"{re.escape(master)}:(\d+)", line).group(1)
    assert f"listening {port}" in result.stdout
    # Before the firewall: node 0 listened and node 1 reached it over its interface.
    assert re.search(r"│ listening \d+ ", ok.stdout) and "ok (ens5)" in ok.stdout, ok.stdout


def test_launch_refuses_a_firewalled_node_before_starting_anything(sim, config, firewall):
    firewall("DROP")
    started = time.monotonic()
    result = run_fab(config, "launch", "--override", "training.max_steps=4", timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr
    assert elapsed < 60, f"fab launch took {elapsed:.1f} s to refuse"
    assert "the rendezvous path is broken" in result.stderr, result.stderr
    master, worker = sim.nodes[0].address, sim.nodes[1].address
    assert re.search(rf"node 1 \({re.escape(worker)}\): cannot reach {re.escape(master)}:\d+ "
                     rf"\(node 0, {re.escape(master)}\) for the store \(torchrun's rendezvous\) "
                     rf"from ens5 \({re.escape(worker)}\): ETIMEDOUT", result.stderr), result.stderr
    assert run_dirs(config) == []  # refused before any run directory or node launcher
    registry = yaml.safe_load(config.read_text())["cluster"]["registry_dir"]
    for node in sim.nodes:
        assert sim.exec(node.index, f"ls {registry} 2>/dev/null | wc -l").stdout.strip() == "0"


# -- a rank stuck or dying while it starts -------------------------------------------------------

class Freezer:
    """SIGSTOPs rank 3 (node 1) of any run of ours the moment its process appears there."""

    SCRIPT = ("while :; do for f in /proc/[0-9]*/environ; do "
              "grep -qz '^GEMM_RUN_ID=' $f 2>/dev/null && grep -qzx 'RANK=3' $f 2>/dev/null && "
              "grep -qz '^LOCAL_RANK=' $f 2>/dev/null || continue; "
              "p=${f#/proc/}; p=${p%/environ}; kill -STOP $p && echo $p && exit 0; done; "
              "sleep 0.05; done")

    def __init__(self, sim: SimCluster):
        self.proc = subprocess.Popen([*sim.nsenter_argv(1), "/bin/bash", "-c", self.SCRIPT],
                                     stdout=subprocess.PIPE, text=True)
        self.frozen_at: float | None = None
        self.pid: int | None = None
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line.isdigit():
            self.pid, self.frozen_at = int(line), time.monotonic()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def launch_in_background(config: Path, output: Path, *args: str) -> subprocess.Popen:
    with open(output, "w") as sink:
        return subprocess.Popen([FAB, "-f", str(config), "launch", *args], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                env=fab_env())


@pytest.mark.slow
def test_a_rank_frozen_in_start_up_is_named_with_its_phase_and_stacks(sim, config, tmp_path):
    freezer = Freezer(sim)
    output = tmp_path / "launch.txt"
    proc = launch_in_background(config, output, "--override", "training.max_steps=4")
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        freezer.stop()
    text = output.read_text()
    assert freezer.frozen_at is not None, "rank 3 never appeared on node 1:\n" + text[-3000:]
    assert proc.returncode == 4, text[-4000:]  # hung
    [run_dir] = run_dirs(config)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "hung"
    startup = record["hang"]["startup"]
    assert (startup["ranks"], startup["nodes"], startup["rule"]) == ([3], [1], "stopped"), startup
    assert startup["phase"] in ("worker", "store"), startup
    failure = record["first_failure"]
    assert (failure["node_rank"], failure["ranks"]) == (1, [3]), failure
    assert f"stuck in start-up phase '{startup['phase']}'" in failure["reason"]
    # Named, with every rank's stacks on disk, within 60 s of the freeze.
    named = re.search(r"launch: start-up stuck: rank 3 \(node 1\) stuck in start-up phase "
                      r"'(\w+)'", text)
    assert named and named.group(1) == startup["phase"], text[-4000:]
    summary_path = run_dir / "hang" / "summary.json"
    stacks_after = summary_path.stat().st_mtime - (time.time() - (time.monotonic()
                                                                  - freezer.frozen_at))
    assert stacks_after <= 60, f"stacks written {stacks_after:.0f} s after the freeze"
    summary = json.loads(summary_path.read_text())
    ranks = {r["rank"]: r for r in summary["ranks"]}
    assert sorted(ranks) == [0, 1, 2, 3] and ranks[3]["state"] == "T"
    for rank in (0, 1, 2):  # the waiting ranks: inside init_process_group
        dump = (run_dir / "hang" / ranks[rank]["dump_file"]).read_text()
        assert "init_process_group" in dump, dump[-2000:]
    assert "STUCK IN START-UP" in text and "run stuck in start-up" in text


@pytest.mark.slow
def test_a_rank_that_dies_during_init_is_blamed_not_the_ranks_that_waited(sim, config, tmp_path):
    inject = REPO / "experiments" / f"_inject_{uuid.uuid4().hex[:8]}"
    inject.mkdir(parents=True)
    (inject / "sitecustomize.py").write_text(DIES_IN_INIT)
    try:
        result = run_fab(config, "launch", "--override", "training.max_steps=4",
                         "--env", f"PYTHONPATH={inject}", timeout=240)
    finally:
        shutil.rmtree(inject, ignore_errors=True)
    text = result.stdout + result.stderr
    assert result.returncode == 1, text[-4000:]
    [run_dir] = run_dirs(config)
    failure = json.loads((run_dir / "run.json").read_text())["first_failure"]
    assert (failure["node_rank"], failure["ranks"]) == (1, [3]), failure
    assert failure["basis"] in ("own failure", "peer address"), failure
    # The ranks that lost their pairs first are kept, as consequences.
    waited = {int(line.split(":")[0].split()[1]) for line in failure["consequences"]
              if line.startswith("rank ")}
    assert waited and 3 not in waited and waited <= {0, 1, 2}, failure
    assert all("Connection closed by peer" in line or "Read error" in line
               for line in failure["consequences"]), failure
    assert re.search(r"launch: node 1 \([0-9.]+\) failed first: rank 3", text), text[-4000:]


@pytest.mark.slow
def test_store_timeouts_blame_the_rank_that_never_joined(sim, config, tmp_path):
    """The watchdog off: the waiting ranks time out in the store (60 s) and name its key."""
    freezer = Freezer(sim)
    try:
        result = run_fab(config, "launch", "--override", "training.max_steps=4",
                         "--hang-timeout", "0", timeout=300)
    finally:
        freezer.stop()
    text = result.stdout + result.stderr
    assert freezer.frozen_at is not None and result.returncode == 1, text[-4000:]
    [run_dir] = run_dirs(config)
    failure = json.loads((run_dir / "run.json").read_text())["first_failure"]
    assert (failure["node_rank"], failure["ranks"]) == (1, [3]), failure
    assert failure.get("basis") == "store keys", failure
    # The key torch's own message names: /default_pg/... when the group makes its store, as
    # here before the rendezvous check handed init_process_group the store it verified.
    assert len(failure["evidence"]) == 1, failure
    assert re.fullmatch(r"missing: (/default_pg)?/0//cpu//0/3", failure["evidence"][0]), failure
    assert {line.split(":")[0] for line in failure["consequences"]} == {"rank 0", "rank 1",
                                                                        "rank 2"}
    assert "first failure: node 1" in text and "blamed by store keys" in text
