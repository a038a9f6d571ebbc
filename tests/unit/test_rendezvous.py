"""The rendezvous path check: the node script run for real on this machine (listener and
connector over loopback, through `sh -c` as a node runs them), its parsing and its judgement.
The firewalled node itself is tests/cluster/test_startup.py's (iptables in a node's namespace)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import replace

import pytest

from tasks.lib.probe import HostFacts
from tasks.lib.quoting import FedCommand
from tasks.lib.rendezvous import (
    SOCKET_PATH,
    STORE_PATH,
    ReachPath,
    connect_command,
    describe_failure,
    expected_hellos,
    judge_reach,
    listen_command,
    master_address,
    parse_first_line,
    parse_report,
    reach_cell,
    reach_paths,
    stop_command,
)


def run_sh(call: FedCommand, env: dict[str, str] | None = None) -> str:
    """A node command as a node runs it: the command, its arguments on stdin."""
    return subprocess.run(["/bin/sh", "-c", call.command], input=call.stdin, capture_output=True,
                          text=True, timeout=30, env=env, check=True).stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def facts(index: int, address: str | None, ifname: str | None,
          interfaces: tuple[tuple[str, str], ...] = ()) -> HostFacts:
    return HostFacts(node_index=index, label=f"h{index}", hostname=f"h{index}", address=address,
                     ifname=ifname, gpu_vendor="none", gpu_count=0, gpu_names=(), branch=None,
                     commit=None, dirty=None, tree_hash=None, docker_engine=None,
                     container_state=None, shm_bytes=None, tools=frozenset(), port_free=True,
                     interfaces=interfaces or (((ifname, address),) if ifname and address else ()))


LOOP = [ReachPath(STORE_PATH, "lo", "127.0.0.1")]


def start_listener(port: int, token: str, expect: list[str], window_s: float
                   ) -> tuple[subprocess.Popen, dict]:
    """Node 0's listener, as the check starts it: its first line says it listens."""
    call = listen_command(port, token, expect, window_s=window_s)
    read_end, write_end = os.pipe()
    os.write(write_end, call.stdin.encode())  # a few bytes: the pipe holds them
    os.close(write_end)
    proc = subprocess.Popen(["/bin/sh", "-c", call.command], stdin=read_end,
                            stdout=subprocess.PIPE, text=True)
    os.close(read_end)
    assert proc.stdout is not None
    return proc, parse_first_line(proc.stdout.readline())


def listen_and_connect(port: int, paths: list[ReachPath], *, master: str = "127.0.0.1",
                       window_s: float = 2.0) -> tuple[dict, dict]:
    """Node 0's listener, then (once it listens) node 1's connector, as the check runs them."""
    token = "t0k3n"
    proc, first = start_listener(port, token, expected_hellos({1: paths}), window_s + 1)
    assert first == {"mode": "listen", "bound": True, "ready": True}
    connected = parse_report(run_sh(connect_command(master, port, token, 1, paths,
                                                    window_s=window_s)))
    out, _ = proc.communicate(timeout=30)
    return parse_report(out), connected


def test_a_worker_reaches_the_listener_and_the_listener_ends_at_once():
    port = free_port()
    listened, connected = listen_and_connect(port, LOOP)
    assert listened["bound"] is True
    assert [s["who"] for s in listened["seen"]] == ["1/store"]
    assert connected["paths"][0]["ok"] is True, connected
    assert judge_reach(listened, {1: ("h1", connected)}, master="127.0.0.1", master_label="h0",
                       port=port) == []
    assert reach_cell(connected, 1, port) == "ok (lo)"
    assert reach_cell(listened, 0, port) == f"listening {port}"


def test_refused_port_is_retried_then_named_with_its_cause():
    port = free_port()  # nobody listens there
    report = parse_report(run_sh(connect_command("127.0.0.1", port, "t", 1, LOOP, window_s=0.6)))
    result = report["paths"][0]
    assert result["ok"] is False and result["error"] == "ECONNREFUSED" and result["attempts"] > 1
    [finding] = judge_reach({"bound": True, "seen": []}, {1: ("h1", report)}, master="127.0.0.1",
                            master_label="h0", port=port)
    assert finding.is_error and finding.node_index == 1
    assert f"cannot reach 127.0.0.1:{port}" in finding.message
    assert "from lo (127.0.0.1)" in finding.message
    assert "firewall rejects port" in finding.message


def test_a_source_address_not_on_this_host_is_named_at_bind():
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
    paths = [ReachPath(STORE_PATH, "eth9", "192.0.2.7")]
    report = parse_report(run_sh(connect_command("127.0.0.1", free_port(), "t", 1, paths,
                                                 window_s=0.5)))
    result = report["paths"][0]
    assert (result["stage"], result["error"]) == ("bind", "EADDRNOTAVAIL")
    assert describe_failure(result, master="127.0.0.1", port=1) == \
        "address 192.0.2.7 of eth9 is not on this host"


def test_another_program_on_the_port_is_not_taken_for_our_listener():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        report = parse_report(run_sh(connect_command("127.0.0.1", port, "t", 1, LOOP,
                                                     window_s=2)))
    finally:
        thread.join(10)
        server.close()
    assert report["paths"][0]["error"] == "EFOREIGN"
    [finding] = judge_reach({"bound": True}, {1: ("h1", report)}, master="127.0.0.1",
                            master_label="h0", port=port)
    assert "something else answered" in finding.message


def test_a_busy_port_stops_the_listener_and_is_an_error():
    holder = socket.create_server(("0.0.0.0", 0))
    port = holder.getsockname()[1]
    try:
        listened = parse_report(run_sh(listen_command(port, "t", ["1/store"], window_s=1)))
    finally:
        holder.close()
    assert listened["bound"] is False and listened["error"] == "EADDRINUSE"
    [finding] = judge_reach(listened, {1: ("h1", {"paths": []})}, master="127.0.0.1",
                            master_label="h0", port=port)
    assert finding.is_error and finding.node_index == 0
    assert f"cannot listen on the master port {port} (EADDRINUSE" in finding.message


def test_without_python3_the_check_says_it_did_not_run():
    out = run_sh(connect_command("127.0.0.1", 1, "t", 1, LOOP), env={"PATH": "/nonexistent"})
    report = parse_report(out)
    assert report == {"error": "no python3 on this host"}
    [finding] = judge_reach({"bound": True}, {1: ("h1", report)}, master="127.0.0.1",
                            master_label="h0", port=1)
    assert finding.severity == "warning" and "not checked: no python3" in finding.message
    assert "or in its container" in connect_command("a", 1, "t", 1, LOOP, container="c").command


def test_the_port_travels_on_stdin_never_in_the_command_line():
    """The command text is a shell's argv on the node (ps shows it to every user); the master
    port is what a squatter needs (issue 26, finding 1)."""
    port = 29745
    for call in (listen_command(port, "tok", ["1/store"], container="c"),
                 connect_command("10.0.0.1", port, "tok", 1, LOOP, container="c"),
                 stop_command(port, "tok", container="c")):
        assert str(port) not in call.command
        assert json.loads(call.stdin)["port"] == port


def test_judgement_names_each_cause():
    def failed(error: str, name: str = STORE_PATH, ifname: str = "eth0") -> dict:
        return {"name": name, "ifname": ifname, "source": "10.0.0.2", "ok": False,
                "stage": "connect", "error": error}

    cases = {
        "ETIMEDOUT": "packets to port 29500 are dropped (a firewall DROP rule",
        "EHOSTUNREACH": "host unreachable from eth0",
        "ENETUNREACH": "no route from eth0 to 10.0.0.1's network",
        "ECONNRESET": "reset before our listener answered",
    }
    for error, words in cases.items():
        [finding] = judge_reach({"bound": True}, {2: ("h2", {"paths": [failed(error)]})},
                                master="10.0.0.1", master_label="h0", port=29500)
        assert words in finding.message, (error, finding.message)
        assert finding.line().startswith("error: node 2 (h2): cannot reach 10.0.0.1:29500 "
                                         "(node 0, h0) for the store (torchrun's rendezvous) "
                                         "from eth0 (10.0.0.2)")
    # The Gloo/NCCL interface fails where the store's route works: a wrong interface.
    report = {"paths": [{"name": STORE_PATH, "ifname": "eth0", "source": "10.0.0.2", "ok": True},
                        failed("ETIMEDOUT", SOCKET_PATH, "ib0")]}
    [finding] = judge_reach({"bound": True}, {1: ("h1", report)}, master="10.0.0.1",
                            master_label="h0", port=29500)
    assert "for Gloo/NCCL's socket interface from ib0" in finding.message
    assert "wrong interface? set cluster.socket_ifname to eth0" in finding.message
    # A node that could not be asked: a warning, never a blocked launch.
    [finding] = judge_reach({"bound": True}, {1: ("h1", RuntimeError("ssh: timed out"))},
                            master="10.0.0.1", master_label="h0", port=29500)
    assert finding.severity == "warning" and "ssh: timed out" in finding.message


def test_paths_follow_the_interfaces_the_ranks_use():
    worker = facts(1, "10.0.0.2", "eth0", (("eth0", "10.0.0.2"), ("ib0", "10.1.0.2")))
    assert reach_paths(worker, None) == [ReachPath(STORE_PATH, "eth0", "10.0.0.2")]
    assert reach_paths(worker, "eth0") == [ReachPath(STORE_PATH, "eth0", "10.0.0.2")]
    assert reach_paths(worker, "ib0") == [ReachPath(STORE_PATH, "eth0", "10.0.0.2"),
                                          ReachPath(SOCKET_PATH, "ib0", "10.1.0.2")]
    # An interface without an address is the probe's error already; nothing to connect from.
    assert reach_paths(worker, "ib9") == [ReachPath(STORE_PATH, "eth0", "10.0.0.2")]
    assert reach_paths(replace(worker, address=None), None) == []
    master = facts(0, "10.0.0.1", "eth0", (("eth0", "10.0.0.1"), ("ib0", "10.1.0.1")))
    assert master_address([master, worker], None) == "10.0.0.1"
    assert master_address([master, worker], "ib0") == "10.1.0.1"
    assert expected_hellos({1: reach_paths(worker, "ib0"), 2: []}) == ["1/store", "1/socket"]


def test_report_parsing_survives_noise():
    assert parse_report("motd\n{\"mode\": \"connect\", \"paths\": []}\n") == {
        "mode": "connect", "paths": []}
    assert "no report" in parse_report("bash: python3: oops\n")["error"]
    assert "no report" in parse_report("[1, 2]\n")["error"]


@pytest.mark.parametrize("window", [1.0])
def test_the_listener_gives_up_after_its_window(window):
    port = free_port()
    listened = parse_report(run_sh(listen_command(port, "t", ["1/store"], window_s=window)))
    assert listened == {"mode": "listen", "bound": True, "seen": []}


def test_the_controllers_stop_ends_the_listener_before_its_deadline():
    port = free_port()
    proc, first = start_listener(port, "tok", ["1/store"], window_s=60)
    assert first["bound"] is True
    started = time.monotonic()
    assert parse_report(run_sh(stop_command(port, "tok"))) == {"mode": "stop", "ok": True}
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5
    assert parse_report(out) == {"mode": "listen", "bound": True, "seen": []}
