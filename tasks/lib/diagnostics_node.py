"""Node-side diagnostics collector: a standalone script (standard library only).

The controller sends this file's source as `python3 -c SOURCE ARGS_JSON` (see
`tasks.lib.diagnostics.node_diagnostics_command`), so nothing has to be installed or synced on the
node, and the same text runs inside a container when the host cannot see the run's processes.
It prints one JSON document on stdout and never stops or signals any process.

Two modes: the full collection (stacks, GPU state, log tail: `fab diagnose`, the hang
watchdog), and "phases" (`"mode": "phases"`): the start-up watch's poll, cheap enough for every
few seconds: the run's processes with their states and TCP sockets (store connection, peer
connections), and the ranks' metrics progress. No py-spy, no GPU tools.

Which processes: every process whose environment carries GEMM_RUN_ID=<run id> (and
GEMM_NODE_RANK=<rank> when given) -- the markers the node launcher exports -- plus, where the
environment cannot be read, the sessions/process groups recorded in the run registry.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from typing import Any

ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "RCCL_", "GLOO_", "HSA_", "TORCH_DISTRIBUTED_", "GEMM_")
ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
             "TORCHELASTIC_RESTART_COUNT", "OMP_NUM_THREADS")
MAX_DUMP_CHARS = 200_000
MAX_CMD_CHARS = 100_000
# py-spy cannot ptrace-suspend a process that is already stopped; --nonblocking reads its memory.
STOPPED_STATES = ("T", "t")
SOURCE_ENV = "GEMM_DIAG_SOURCE"


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def read_text(path: str) -> str | None:
    data = read_bytes(path)
    return None if data is None else data.decode("utf-8", "replace")


def parse_environ(data: bytes) -> dict[str, str]:
    env = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def parse_stat(text: str) -> dict[str, Any]:
    """Fields of /proc/<pid>/stat that matter here (comm may hold spaces and parentheses)."""
    head, _, rest = text.rpartition(")")
    comm = head.partition("(")[2]
    fields = rest.split()
    return {"comm": comm, "state": fields[0], "ppid": int(fields[1]), "pgrp": int(fields[2]),
            "session": int(fields[3])}


def ns_pid(status_text: str | None) -> int | None:
    """The pid in the innermost pid namespace (the container's view), from /proc/<pid>/status."""
    for line in (status_text or "").splitlines():
        if line.startswith("NSpid:"):
            values = line.split()[1:]
            return int(values[-1]) if values else None
    return None


def keep_env(env: dict[str, str]) -> dict[str, str]:
    # The launch's env.sh names the variables whose values are secrets: kept as *** only.
    masked = set(env.get("GEMM_MASKED_VARS", "").split())
    return {k: "***" if k in masked else env[k] for k in sorted(env)
            if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def role_of(info: dict[str, Any]) -> str:
    argv = info["cmdline"]
    names = " ".join(os.path.basename(a) for a in argv[:3])
    if "RANK" in info["env"] and "LOCAL_RANK" in info["env"] and info["python"]:
        return "rank"
    if "torchrun" in names or "torch.distributed.run" in " ".join(argv[:4]):
        return "torchrun"
    if argv and os.path.basename(argv[0]) in ("docker", "docker.io"):
        return "docker-exec"
    if argv and os.path.basename(argv[0]) in ("rocprofv3", "nsys"):
        return "profiler"
    if info["comm"] in ("bash", "sh") and any("node_launcher" in a for a in argv):
        return "launcher"
    return "other"


def is_python(exe: str | None, argv: list[str]) -> bool:
    candidates = [os.path.basename(exe or "")] + [os.path.basename(a) for a in argv[:1]]
    return any(c.startswith("python") or c == "torchrun" for c in candidates)


def registry_entries(registry_dir: str, run_id: str, node_rank: int | None) -> list[dict[str, Any]]:
    pattern = f"node_{node_rank}" if node_rank is not None else "node_*"
    entries = []
    for path in sorted(glob.glob(os.path.join(registry_dir, run_id, pattern))):
        meta_text = read_text(os.path.join(path, "meta.json"))
        try:
            meta = json.loads(meta_text) if meta_text else {}
        except ValueError:
            meta = {}
        ids = {}
        for name in ("launcher.pid", "container.pid"):
            # "pid start-time" (older launchers wrote the pid alone)
            fields = (read_text(os.path.join(path, name)) or "").split()
            if fields and fields[0].isdigit():
                ids[name] = int(fields[0])
        entries.append({"dir": path, "meta": meta, "ids": ids,
                        "state": (read_text(os.path.join(path, "state")) or "").strip() or None})
    return entries


def owner_uid(proc: str) -> int | None:
    try:
        return os.stat(proc).st_uid
    except OSError:
        return None


def scan_processes(run_id: str, node_rank: int | None, sessions: set[int],
                   inside_container: bool = False) -> tuple[list[dict], int]:
    """The run's processes on this machine (ours: our uid, or the container's), and how many
    environments could not be read."""
    found, unreadable = [], 0
    me = os.getpid()
    for proc in glob.glob("/proc/[0-9]*"):
        pid = int(proc.rsplit("/", 1)[1])
        if pid == me:
            continue
        stat_text = read_text(f"{proc}/stat")
        if not stat_text:
            continue
        try:
            stat = parse_stat(stat_text)
        except (IndexError, ValueError):
            continue
        environ = read_bytes(f"{proc}/environ")
        env = parse_environ(environ) if environ is not None else {}
        if environ is None:
            unreadable += 1
        # Another user can copy our markers into their environment, not our uid: theirs are not
        # ours to dump (inside the container everything runs as the container's user).
        if not inside_container and owner_uid(proc) != os.getuid():
            continue
        marked = env.get("GEMM_RUN_ID") == run_id and (
            node_rank is None or env.get("GEMM_NODE_RANK") in (None, str(node_rank)))
        by_registry = environ is None and (stat["session"] in sessions or stat["pgrp"] in sessions)
        if not (marked or by_registry):
            continue
        argv = [a.decode("utf-8", "replace") for a in (read_bytes(f"{proc}/cmdline") or b"").split(b"\0") if a]
        try:
            exe = os.readlink(f"{proc}/exe")
        except OSError:
            exe = None
        info = {"pid": pid, "ns_pid": ns_pid(read_text(f"{proc}/status")), "ppid": stat["ppid"],
                "pgrp": stat["pgrp"], "session": stat["session"], "state": stat["state"],
                "comm": stat["comm"], "exe": exe, "cmdline": argv, "env": keep_env(env),
                "matched_by": "marker" if marked else "registry"}
        info["python"] = is_python(exe, argv)
        info["role"] = role_of(info)
        rank = info["env"].get("RANK")
        info["rank"] = int(rank) if rank is not None and rank.isdigit() and info["role"] == "rank" else None
        found.append(info)
    found.sort(key=lambda p: (p["rank"] is None, p["rank"] if p["rank"] is not None else 0, p["pid"]))
    return found, unreadable


def run_command(argv: list[str], timeout: float, stdin: str | None = None) -> dict[str, Any]:
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                              **({"input": stdin} if stdin is not None
                                 else {"stdin": subprocess.DEVNULL}))
        out = {"argv": argv, "rc": done.returncode, "stdout": done.stdout[-MAX_CMD_CHARS:],
               "stderr": done.stderr[-4000:]}
    except subprocess.TimeoutExpired as err:
        out = {"argv": argv, "rc": None, "stdout": (err.stdout or "")[-MAX_CMD_CHARS:] if isinstance(err.stdout, str) else "",
               "stderr": f"timed out after {timeout}s"}
    except OSError as err:
        out = {"argv": argv, "rc": None, "stdout": "", "stderr": str(err)}
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def untrusted_because(path: str) -> str | None:
    """Why a user other than root or us could change the program at `path` (None: nobody can).

    This collector runs as root where py-spy needs it: a py-spy in a venv another user can
    write would run their code as root. Every entry from / down to the file is judged, on its
    own path and on the path its symlinks lead to, as tasks/lib/nodefs.py does on the shell side.
    """
    uid = os.getuid()
    for full in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        current = "/"
        for part in [""] + [p for p in full.split("/") if p]:
            current = os.path.join(current, part) if part else "/"
            try:
                info = os.lstat(current)
            except OSError as err:
                return f"{current}: {err.strerror}"
            if info.st_uid not in (0, uid):
                return f"{current} is owned by uid {info.st_uid}"
            if stat.S_ISLNK(info.st_mode):
                continue
            sticky_dir = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
            if info.st_mode & 0o022 and not sticky_dir:
                return f"{current} is writable by other users (mode {info.st_mode & 0o7777:o})"
    return None


def find_pyspy(candidates: list[str]) -> tuple[str | None, list[str]]:
    """The first candidate that exists, is executable and nobody else can change; and why any
    that exist were refused."""
    refused = []
    for candidate in candidates:
        found = candidate if os.sep in candidate else shutil.which(candidate)
        if not found or not os.access(found, os.X_OK):
            continue
        why = untrusted_because(found)
        if why is None:
            return found, refused
        refused.append(f"{found}: not run ({why})")
    return None, refused


def dump_stack(proc: dict[str, Any], pyspy: str | None, container: str | None, native: bool,
               timeout: float) -> dict[str, Any]:
    """py-spy dump of one process, trying the most informative mode first.

    From the host (root) py-spy reads container processes too; when that fails and the process is
    in the run's container, py-spy inside the container is tried with the container's pid.
    """
    attempts: list[list[str]] = []
    if pyspy:
        base = [pyspy, "dump", "--pid", str(proc["pid"])]
        if proc["state"] in STOPPED_STATES:
            attempts.append(base + ["--nonblocking"])
        else:
            if native:
                attempts.append(base + ["--native"])
            attempts += [base, base + ["--nonblocking"]]
    if container and proc.get("ns_pid") and proc["ns_pid"] != proc["pid"]:
        inner = ["docker", "exec", container, "py-spy", "dump", "--pid", str(proc["ns_pid"])]
        attempts += [inner + ["--nonblocking"]] if proc["state"] in STOPPED_STATES else [inner, inner + ["--nonblocking"]]
    errors = []
    for argv in attempts:
        result = run_command(argv, timeout)
        if result["rc"] == 0 and result["stdout"].strip():
            return {"ok": True, "command": argv, "text": result["stdout"][:MAX_DUMP_CHARS],
                    "errors": errors}
        errors.append(f"{' '.join(argv)}: rc={result['rc']}: {last_line(result['stderr'])}")
    if not attempts:
        errors.append("py-spy not found on this host (pip install py-spy, or put it in the image)")
    return {"ok": False, "command": None, "text": "", "errors": errors}


def last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip() and not l.startswith(" ")]
    for line in lines:
        if line.startswith("Error:"):
            return line
    return lines[-1] if lines else ""


def gpu_state(timeout: float) -> list[dict[str, Any]]:
    commands = []
    if shutil.which("nvidia-smi"):
        commands += [["nvidia-smi"],
                     ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv"]]
    if shutil.which("rocm-smi"):
        commands += [["rocm-smi"], ["rocm-smi", "--showpids"]]
    if shutil.which("amd-smi"):
        commands += [["amd-smi", "process"]]
    return [run_command(argv, timeout) for argv in commands]


def tail_lines(path: str | None, count: int) -> dict[str, Any]:
    if not path:
        return {"path": None, "lines": [], "error": "no output log known for this node"}
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except OSError as err:
        return {"path": path, "lines": [], "error": str(err)}
    lines = data.decode("utf-8", "replace").splitlines()
    return {"path": path, "lines": lines[-count:], "error": None}


def metrics_progress(output_dir: str | None) -> dict[str, dict[str, Any]]:
    """{rank: {lines, step, mtime}} from the rank_XX_metrics.jsonl files of the node's output dir."""
    progress: dict[str, dict[str, Any]] = {}
    if not output_dir:
        return progress
    for path in sorted(glob.glob(os.path.join(output_dir, "rank_*_metrics.jsonl"))):
        digits = os.path.basename(path)[len("rank_"):].split("_", 1)[0]
        if not digits.isdigit():
            continue
        data = read_bytes(path) or b""
        lines = data.split(b"\n")
        complete = lines[:-1]  # the part after the last newline is still being written
        step = None
        for raw in reversed(complete[-3:]):
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                step = record["step"]
                break
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            mtime = None
        progress[str(int(digits))] = {"lines": len(complete), "step": step, "mtime": mtime}
    return progress


def collect(args: dict[str, Any]) -> dict[str, Any]:
    run_id = args["run_id"]
    node_rank = args.get("node_rank")
    timeout = float(args.get("timeout", 20))
    # The registry's default is per user (tasks/lib/nodefs.py DEFAULT_REGISTRY_PREFIX).
    registry_dir = args.get("registry_dir") or f"/tmp/gemm-runs-{os.getuid()}"
    entries = registry_entries(registry_dir, run_id, node_rank)
    meta = entries[0]["meta"] if entries else {}
    # The registry says whether this node's run is dockerized (null: bare); the argument is only
    # a fallback for a node without a registry entry.
    container = meta["container"] if "container" in meta else args.get("container")
    output_log = args.get("output_log") or meta.get("output_log")
    output_dir = (args.get("output_dir") or meta.get("output_dir")
                  or (os.path.dirname(output_log) if output_log else None))
    sessions = {i for e in entries for name, i in e["ids"].items() if name == "launcher.pid"}
    if args.get("inside_container"):
        sessions |= {i for e in entries for name, i in e["ids"].items() if name == "container.pid"}
    processes, unreadable = scan_processes(run_id, node_rank, sessions,
                                           inside_container=bool(args.get("inside_container")))
    pyspy, pyspy_refused = find_pyspy(list(args.get("pyspy") or []) + ["py-spy"])
    for proc in processes:
        if proc["python"]:
            proc["stack"] = dump_stack(proc, pyspy, None if args.get("inside_container") else container,
                                       bool(args.get("native", True)), timeout)
            if not proc["stack"]["ok"]:
                proc["stack"]["errors"] = pyspy_refused + proc["stack"]["errors"]
    report = {
        "format": 1,
        "hostname": os.uname().nodename,
        "collected_at": time.time(),
        "run_id": run_id,
        "node_rank": node_rank,
        "uid": os.getuid(),
        "inside_container": bool(args.get("inside_container")),
        "registry": [{"dir": e["dir"], "state": e["state"], "ids": e["ids"]} for e in entries],
        "container": container,
        "pyspy": pyspy,
        "pyspy_refused": pyspy_refused,
        "processes": processes,
        "unreadable_environments": unreadable,
        "gpu": gpu_state(timeout),
        "log_tail": tail_lines(output_log, int(args.get("log_lines", 200))),
        "progress": metrics_progress(output_dir),
    }
    # A non-root host user cannot read the container's process environments: look from inside.
    if container and not args.get("inside_container") and not any(p["role"] == "rank" for p in processes):
        inner_args = dict(args, inside_container=True, container=container)
        # Under `python3 -c` there is no file to re-read: the controller's command exports the
        # source as SOURCE_ENV for this hop.
        source = os.environ.get(SOURCE_ENV)
        if not source and "__file__" in globals():
            source = read_text(os.path.abspath(__file__))
        if source:
            result = run_command(["docker", "exec", "-i", container, "python3", "-c", source],
                                 timeout * 4, stdin=json.dumps(inner_args) + "\n")
            try:
                report["container_report"] = json.loads(result["stdout"])
            except ValueError:
                report["container_error"] = f"rc={result['rc']}: {last_line(result['stderr']) or 'no output'}"
    return report


# -- the start-up watch's poll --------------------------------------------------------------------

TCP_STATES = {"01": "established", "02": "syn_sent", "03": "syn_recv", "0A": "listen"}
MAX_PORTS = 64  # per process: enough to map a peer's address:port to its rank


def hex_address(text: str) -> tuple[str, int]:
    """(address, port) of a /proc/net/tcp{,6} field: little-endian 32-bit words, port as is."""
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        address = ".".join(str(b) for b in words)
    elif words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped: the address torch's sockets show
        address = ".".join(str(b) for b in words[12:])
    else:
        address = ":".join(words[i:i + 2].hex() for i in range(0, 16, 2))
    return address, int(port, 16)


def tcp_table(pid: int) -> dict[int, dict[str, Any]]:
    """inode -> socket of the network namespace `pid` lives in (/proc/PID/net/tcp and tcp6)."""
    table: dict[int, dict[str, Any]] = {}
    for name in ("tcp", "tcp6"):
        for line in (read_text(f"/proc/{pid}/net/{name}") or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or not fields[9].isdigit():
                continue
            try:
                local, remote = hex_address(fields[1]), hex_address(fields[2])
            except ValueError:
                continue
            table[int(fields[9])] = {"local": local, "remote": remote,
                                     "state": TCP_STATES.get(fields[3], fields[3])}
    return table


def socket_inodes(pid: int) -> set[int]:
    found = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def process_sockets(pid: int, master_port: int | None,
                    tables: dict[int, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """What a process's TCP sockets say about its start-up: its store connection (to or on the
    master port), how many established connections to peers, how many listening sockets."""
    try:
        netns = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        netns = -pid
    if netns not in tables:
        tables[netns] = tcp_table(pid)
    table = tables[netns]
    store = None
    peers = listening = 0
    ports: list[str] = []
    rank_order = {"established": 0, "listen": 1, "syn_sent": 2, "syn_recv": 3}
    for inode in sorted(socket_inodes(pid)):
        sock = table.get(inode)
        if sock is None:
            continue
        state = sock["state"]
        to_master = master_port is not None and sock["remote"][1] == master_port
        on_master = master_port is not None and sock["local"][1] == master_port
        if to_master or (on_master and state == "listen"):
            word = "listen" if on_master and state == "listen" else state
            if store is None or rank_order.get(word, 9) < rank_order.get(store, 9):
                store = word
            continue
        if on_master:
            continue  # the store server's side of a client's connection
        if state == "established":
            peers += 1
        elif state == "listen":
            listening += 1
        if state in ("established", "listen") and len(ports) < MAX_PORTS:
            ports.append(f"{sock['local'][0]}:{sock['local'][1]}")
    return {"store": store, "peers": peers, "listening": listening, "ports": ports}


def phases_report(args: dict[str, Any]) -> dict[str, Any]:
    """The start-up watch's view of this node: launcher state, the run's processes (role, rank,
    process state, store connection, peer connections) and the ranks' metrics progress."""
    run_id = args["run_id"]
    node_rank = args.get("node_rank")
    registry_dir = args.get("registry_dir") or f"/tmp/gemm-runs-{os.getuid()}"
    entries = registry_entries(registry_dir, run_id, node_rank)
    meta = entries[0]["meta"] if entries else {}
    container = meta["container"] if "container" in meta else args.get("container")
    output_dir = args.get("output_dir") or meta.get("output_dir")
    sessions = {i for e in entries for name, i in e["ids"].items() if name == "launcher.pid"}
    inside = bool(args.get("inside_container"))
    if inside:
        sessions |= {i for e in entries for name, i in e["ids"].items() if name == "container.pid"}
    processes, unreadable = scan_processes(run_id, node_rank, sessions, inside_container=inside)
    master_port = args.get("master_port")
    tables: dict[int, dict[int, dict[str, Any]]] = {}
    found = []
    for proc in processes:
        if proc["role"] not in ("rank", "torchrun"):
            continue
        entry = {"pid": proc["pid"], "role": proc["role"], "rank": proc["rank"],
                 "state": proc["state"]}
        entry.update(process_sockets(proc["pid"], master_port, tables))
        found.append(entry)
    report = {"format": 1, "mode": "phases", "node_rank": node_rank, "collected_at": time.time(),
              "registry": [{"state": e["state"]} for e in entries], "processes": found,
              "unreadable_environments": unreadable, "progress": metrics_progress(output_dir)}
    # As in collect: a host user that cannot read the container's environments looks inside.
    if container and not inside and unreadable and not any(p["role"] == "rank" for p in found):
        source = os.environ.get(SOURCE_ENV)
        if source:
            result = run_command(["docker", "exec", "-i", "-e", f"{SOURCE_ENV}", container,
                                  "python3", "-c", source], float(args.get("timeout", 10)),
                                 stdin=json.dumps(dict(args, inside_container=True)) + "\n")
            try:
                inner = json.loads(result["stdout"])
                report["processes"] += inner.get("processes", [])
            except ValueError:
                report["container_error"] = f"rc={result['rc']}: {last_line(result['stderr'])}"
    return report


def main(argv: list[str]) -> int:
    # The arguments come on stdin (tasks/lib/diagnostics.py): the master port stays out of argv.
    # All of it (a second line is for the container's copy): the sender closes stdin after it.
    line = argv[1] if len(argv) > 1 else (sys.stdin.read().splitlines() or [""])[0]
    args = json.loads(line) if line.strip() else {}
    if "run_id" not in args:
        print("usage: echo '{\"run_id\": ..., \"node_rank\": ...}' | diagnostics_node.py",
              file=sys.stderr)
        return 2
    if args.get("mode") == "phases":
        json.dump(phases_report(args), sys.stdout)
        sys.stdout.write("\n")
        return 0
    json.dump(collect(args), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
