"""Node-side rendezvous path check: a standalone script (standard library only, no torch).

The controller sends this file's source as `python3 -c SOURCE ARGS_JSON`
(tasks/lib/rendezvous.py builds the command), so nothing is installed or written on the node.

- mode "listen" (node 0): binds the run's master port on every address, as torchrun's store
  will, and prints a first JSON line at once (bound or why not: the controller starts the
  workers' connects on it); answers each worker's hello, and ends once every expected hello
  came, a "stop" hello came (the controller's, once the workers are done) or its deadline
  passed. Prints a last JSON line: the hellos it answered.
- mode "connect" (every other node): for each path (the store's route; the Gloo/NCCL socket
  interface where it differs), binds the interface's address as the source and connects to the
  master's address and port within the window (a refusal is retried briefly: SYN races). Prints
  one JSON line: one result per path, with errno's name.
- mode "stop" (node 0): the stop hello, to 127.0.0.1.

It never signals or stops any process and holds the port only while it runs (a few seconds).
"""
from __future__ import annotations

import errno
import json
import select
import socket
import sys
import threading
import time
from typing import Any

HELLO = "gemm-reach"
REPLY = "gemm-reach-ok"
REFUSED_RETRY_S = 0.1
REFUSED_FOR_S = 0.5  # the listener is up before any connect starts: a refusal this long is final
REPLY_TIMEOUT_S = 2.0
MAX_LINE = 256


def errno_name(err: OSError) -> str:
    if isinstance(err, socket.timeout):
        return "ETIMEDOUT"
    return errno.errorcode.get(err.errno or 0, type(err).__name__)


def listen(args: dict[str, Any]) -> dict[str, Any]:
    port, token = int(args["port"]), str(args["token"])
    expect = {str(item) for item in args.get("expect", [])}
    deadline = time.monotonic() + float(args.get("window_s", 5.0))
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # torch's TCPStore sets it too: our short-lived socket must not keep the port from it.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("0.0.0.0", port))
        server.listen(64)
    except OSError as err:
        server.close()
        return {"mode": "listen", "bound": False, "error": errno_name(err), "detail": str(err)[:200]}
    sys.stdout.write(json.dumps({"mode": "listen", "bound": True, "ready": True}) + "\n")
    sys.stdout.flush()
    seen: list[dict[str, Any]] = []
    stopped = False
    try:
        while time.monotonic() < deadline and not stopped and not expect <= {s["who"] for s in seen}:
            ready, _, _ = select.select([server], [], [], max(0.0, min(0.2, deadline - time.monotonic())))
            if not ready:
                continue
            conn, peer = server.accept()
            with conn:
                conn.settimeout(REPLY_TIMEOUT_S)
                try:
                    line = conn.recv(MAX_LINE).decode("ascii", "replace").split("\n", 1)[0].split()
                except OSError:
                    continue
                if len(line) == 4 and line[0] == HELLO and line[1] == token:
                    if line[2] == "stop":
                        stopped = True
                        continue
                    who = f"{line[2]}/{line[3]}"
                    try:
                        conn.sendall(f"{REPLY} {token}\n".encode())
                        conn.recv(1)  # the worker closes first: its side keeps TIME_WAIT
                    except OSError:
                        pass
                    seen.append({"who": who, "peer": peer[0]})
    finally:
        server.close()
    return {"mode": "listen", "bound": True, "seen": seen}


def connect_path(master: str, port: int, token: str, node: int, path: dict[str, Any],
                 window_s: float, refused_for_s: float = REFUSED_FOR_S) -> dict[str, Any]:
    """One path: bind the source address, connect, say hello, read the reply."""
    started = time.monotonic()
    deadline = started + window_s
    result: dict[str, Any] = {"name": path["name"], "ifname": path.get("ifname"),
                              "source": path.get("source")}
    attempts = 0
    while True:
        attempts += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if path.get("source"):
                try:
                    sock.bind((path["source"], 0))
                except OSError as err:
                    return dict(result, ok=False, stage="bind", error=errno_name(err),
                                seconds=round(time.monotonic() - started, 3), attempts=attempts)
            remaining = deadline - time.monotonic()
            sock.settimeout(max(0.05, remaining))
            try:
                sock.connect((master, port))
            except OSError as err:
                name = errno_name(err)
                if name == "ECONNREFUSED" and time.monotonic() - started < refused_for_s \
                        and time.monotonic() + REFUSED_RETRY_S < deadline:
                    time.sleep(REFUSED_RETRY_S)
                    continue
                return dict(result, ok=False, stage="connect", error=name,
                            seconds=round(time.monotonic() - started, 3), attempts=attempts)
            sock.settimeout(REPLY_TIMEOUT_S)
            try:
                sock.sendall(f"{HELLO} {token} {node} {path['name']}\n".encode())
                reply = sock.recv(MAX_LINE).decode("ascii", "replace").split()
            except OSError as err:
                return dict(result, ok=False, stage="hello", error=errno_name(err),
                            seconds=round(time.monotonic() - started, 3), attempts=attempts)
            if reply[:2] != [REPLY, token]:
                return dict(result, ok=False, stage="hello", error="EFOREIGN",
                            seconds=round(time.monotonic() - started, 3), attempts=attempts)
            return dict(result, ok=True, seconds=round(time.monotonic() - started, 3),
                        attempts=attempts)
        finally:
            sock.close()


def connect(args: dict[str, Any]) -> dict[str, Any]:
    master, port, token = str(args["master"]), int(args["port"]), str(args["token"])
    node, window_s = int(args["node"]), float(args.get("window_s", 4.0))
    paths = list(args.get("paths", []))
    results: list[dict[str, Any] | None] = [None] * len(paths)

    refused_for_s = float(args.get("refused_for_s", REFUSED_FOR_S))

    def run(index: int) -> None:
        results[index] = connect_path(master, port, token, node, paths[index], window_s,
                                      refused_for_s)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(window_s + REPLY_TIMEOUT_S + 1)
    return {"mode": "connect", "node": node, "paths": [r for r in results if r is not None]}


def stop(args: dict[str, Any]) -> dict[str, Any]:
    try:
        with socket.create_connection(("127.0.0.1", int(args["port"])), timeout=2) as sock:
            sock.sendall(f"{HELLO} {args['token']} stop stop\n".encode())
        return {"mode": "stop", "ok": True}
    except OSError as err:
        return {"mode": "stop", "ok": False, "error": errno_name(err)}


def main(argv: list[str]) -> int:
    # The arguments come on stdin (tasks/lib/rendezvous.py): the port stays out of our argv.
    line = argv[1] if len(argv) > 1 else (sys.stdin.read().splitlines() or [""])[0]
    args = json.loads(line) if line.strip() else {}
    modes = {"listen": listen, "connect": connect, "stop": stop}
    if args.get("mode") not in modes:
        print("usage: echo '{\"mode\": \"listen\"|\"connect\"|\"stop\", ...}' | rendezvous_node.py",
              file=sys.stderr)
        return 2
    report = modes[args["mode"]](args)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
