"""The start-up scan (diagnostics_node, mode "phases") on real processes of this machine: a
torchrun-like agent connected to a 'master port', a rank that joined the store and connected to
a peer, one still importing, one stopped with SIGSTOP; the scan is run as a node runs it (the
controller's command through sh) and read back into phases."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tasks.lib.diagnostics import node_phases_command, parse_node_report
from tasks.lib.diagnostics_node import hex_address
from tasks.lib.startwatch import StartupWatch, parse_node_phases, rank_phase, phase_index
from tests.helpers import wait_until

CLIENT = textwrap.dedent("""\
    import os, socket, sys, time
    from pathlib import Path
    held = []
    for port in sys.argv[1:]:
        s = socket.create_connection(("127.0.0.1", int(port)))
        held.append(s)
    Path(os.environ["READY"]).touch()
    while True:
        time.sleep(0.05)
""")


@pytest.fixture
def run(tmp_path):
    master = socket.create_server(("127.0.0.1", 0), backlog=16)
    peer = socket.create_server(("127.0.0.1", 0), backlog=16)
    run_id = f"multinode_28ch_256th_scan_{uuid.uuid4().hex[:8]}"
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "rank_01_metrics.jsonl").write_text(json.dumps({"rank": 1, "step": 1}) + "\n")
    marker = {"PATH": os.environ["PATH"], "GEMM_RUN_ID": run_id, "GEMM_NODE_RANK": "0"}
    procs = {}

    def start(name, argv0, ports, **env):
        procs[name] = subprocess.Popen(
            ["bash", "-c", f'exec -a {argv0} {sys.executable} -c "$CLIENT" "$@"', "x",
             *map(str, ports)],
            env={**marker, **env, "CLIENT": CLIENT, "READY": str(tmp_path / name)})

    m, p = master.getsockname()[1], peer.getsockname()[1]
    start("agent", "torchrun", [m])
    start("joined", "python3", [m, p], RANK="1", LOCAL_RANK="1")
    start("importing", "python3", [], RANK="0", LOCAL_RANK="0")
    start("stopped", "python3", [], RANK="2", LOCAL_RANK="2")
    start("other", "python3", [m], RANK="3", LOCAL_RANK="0", GEMM_RUN_ID=run_id + "x")
    try:
        wait_until(lambda: all((tmp_path / n).exists() for n in procs), timeout=30,
                   what="fake processes not ready")
        os.kill(procs["stopped"].pid, signal.SIGSTOP)
        yield {"run_id": run_id, "master_port": m, "peer_port": p, "procs": procs,
               "output_dir": output_dir, "registry": tmp_path / "registry"}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        master.close()
        peer.close()


def test_the_scan_sees_processes_states_and_sockets(run):
    command = node_phases_command(run["run_id"], 0, str(run["registry"]),
                                  master_port=run["master_port"], output_dir=str(run["output_dir"]))
    assert str(run["master_port"]) not in command.command  # stdin only: no argv shows the port
    done = subprocess.run(["/bin/sh", "-c", command.command], input=command.stdin,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = parse_node_report(done.stdout, 0, "here").data
    by_pid = {p["pid"]: p for p in data["processes"]}
    procs = run["procs"]
    assert set(by_pid) == {procs[n].pid for n in ("agent", "joined", "importing", "stopped")}
    agent = by_pid[procs["agent"].pid]
    assert (agent["role"], agent["store"]) == ("torchrun", "established")
    joined = by_pid[procs["joined"].pid]
    assert (joined["rank"], joined["store"], joined["peers"]) == (1, "established", 1)
    assert any(port.startswith("127.0.0.1:") for port in joined["ports"])
    assert by_pid[procs["stopped"].pid]["state"] == "T"
    assert by_pid[procs["importing"].pid]["store"] is None
    assert data["progress"]["1"]["lines"] == 1

    phases = parse_node_phases(data, 0, [0, 1, 2])
    assert [rank_phase(phases, r) for r in (0, 1, 2)] == [
        phase_index("worker"), phase_index("step"), phase_index("worker")]
    watch = StartupWatch(nnodes=1, nproc=3, started_at=0.0)
    watch.observe(phases, 1.0)
    watch.observe(phases, 6.0)
    stall = watch.check(6.0)
    assert stall is None  # one rank made a step: the start-up is over, steps are watched
    phases.progress.clear()
    fresh = StartupWatch(nnodes=1, nproc=3, started_at=0.0)
    fresh.observe(phases, 1.0)
    fresh.observe(phases, 6.0)
    stall = fresh.check(6.0)
    assert stall.rule == "stopped" and stall.ranks == (2,) and stall.phase == "worker"


def test_proc_net_addresses():
    assert hex_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert hex_address("0000000000000000FFFF00000B38EC0A:74B9") == ("10.236.56.11", 29881)
    assert hex_address("00000000000000000000000001000000:0016")[1] == 22


def test_the_scan_of_a_run_that_is_not_here_is_empty(tmp_path):
    command = node_phases_command("multinode_1ch_64th_none", 3, str(tmp_path), master_port=1,
                                  output_dir=str(tmp_path / "nothing"))
    done = subprocess.run(["/bin/sh", "-c", command.command], input=command.stdin,
                          capture_output=True, text=True, timeout=60)
    data = parse_node_report(done.stdout, 3, "here").data
    assert (data["processes"], data["registry"], data["progress"]) == ([], [], {})
    assert Path(tmp_path).exists()
