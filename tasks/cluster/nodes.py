"""Talking to the nodes: one `Node` per host, SSH through Fabric or this machine without SSH.

Everything that touches more than one host goes through `on_each`, which runs one call per node
concurrently (commands often differ per node: rank, interface), collects per-host results and
errors, and never lets one dead host stall the others (connect timeouts come from the config).
"""
from __future__ import annotations

import io
import os
import posixpath
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

import paramiko
from fabric import Config, Connection
from invoke import Context
from invoke.exceptions import CommandTimedOut, Exit, UnexpectedExit
from invoke.runners import Result

from tasks.cluster.hostkeys import (
    apply_host_key_policy,
    connection_chain,
    known_hosts_path,
    load_known_hosts,
)
from tasks.lib.inventory import HostSpec, Inventory
from tasks.lib.knownhosts import known_hosts_name
from tasks.lib.nodefs import registry_for_uid, safe_dirs_command
from tasks.lib.quoting import FedCommand
from tasks.lib.settings import ClusterSettings
from tasks.cluster.node_errors import NodeError, describe_error

T = TypeVar("T")

# An archive upload to one host: generous for a slow link, but a stalled host must not hang
# `fab sync` (and every other host's result with it) forever.
UPLOAD_TIMEOUT_S = 600.0
# Paramiko waits up to an hour for a host to answer a channel-open request. A host that went
# silent (powered off, cable pulled: no RST ever comes) would block every later command, and the
# heartbeat, stop and collect with it. Channel opens wait this long (or the connect timeout when
# that is longer): long enough for a loaded sshd, far shorter than any NCCL timeout.
CHANNEL_OPEN_TIMEOUT_S = 15.0
# An SFTP transfer that receives nothing for this long is dead, not slow.
SFTP_STALL_TIMEOUT_S = 120.0
# Node output is read in chunks of up to this size (paramiko hands over what has arrived).
STREAM_CHUNK_BYTES = 1024 * 1024
# Of a streamed command's stderr only the end is kept: it says why the command failed.
STREAM_STDERR_KEEP = 4096


@dataclass(frozen=True)
class StreamEnd:
    """How a streamed command ended: its exit status and the end of its stderr."""

    exited: int
    stderr: str

    def as_result(self, command: str) -> Result:
        """An invoke Result (no stdout: it went to the stream) for UnexpectedExit."""
        return Result(stdout="", stderr=self.stderr, command=command, exited=self.exited,
                      hide=("stdout", "stderr"))


class Node:
    """One host of the cluster, addressed by its position in the inventory (node rank)."""

    def __init__(self, index: int, spec: HostSpec):
        self.index = index
        self.spec = spec
        self._uid: int | None = None

    def uid(self) -> int:
        """Our uid on this host (asked once): where our per-user run registry is."""
        if self._uid is None:
            text = self.run("id -u", timeout=30).stdout.strip()
            if not text.isdigit():
                raise NodeError(f"`id -u` printed {text[:80]!r}, not a uid")
            self._uid = int(text)
        return self._uid

    def registry(self, registry_dir: str | None) -> str:
        """This host's run registry: cluster.registry_dir, or our per-user default there."""
        return registry_dir or registry_for_uid(None, self.uid())

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def is_local(self) -> bool:
        return self.spec.local

    def run(self, command: str, *, warn: bool = False, timeout: float | None = None, **kwargs) -> Result:
        raise NotImplementedError

    def run_fed(self, call: FedCommand, **kwargs) -> Result:
        """Run `call.command` with `call.stdin` on its stdin, closed after it. The command
        must read its stdin to the end (or Invoke may write to, or close, a finished channel)."""
        return self.run(call.command, in_stream=_WholeStdin(call.stdin), **kwargs)

    def stream(self, command: str, on_data: Callable[[bytes], None]) -> StreamEnd:
        """Run `command`, handing its stdout to `on_data` chunk by chunk as it arrives; no
        timeout (a follower ends with the command or the connection).

        Node output is not handed to Invoke's out_stream: Invoke keeps every chunk and re-joins
        the whole buffer per chunk (quadratic in the output a node sends). Here nothing is kept
        but the last STREAM_STDERR_KEEP bytes of stderr. Raises NodeError when the command ended
        without an exit status (the connection broke).
        """
        raise NotImplementedError

    def put_files(self, files: Mapping[str, str | bytes], mode: int = 0o600,
                  dirs: Iterable[str] = ()) -> None:
        """Write each remote path with its content (mode: only us, by default).

        Parent directories and `dirs` are created 0700 and checked beyond other users' reach in
        one round trip first (tasks/lib/nodefs.py: a directory someone else can change is
        refused, never written into). Each file is written beside its target and renamed over
        it: on a shared filesystem every node writes the same paths at once, and a reader never
        sees a half-written file.
        """
        raise NotImplementedError

    def prepare_dirs(self, files: Mapping[str, str | bytes], dirs: Iterable[str]) -> None:
        parents = sorted(({posixpath.dirname(path) for path in files} | set(dirs)) - {""})
        if parents:
            self.run(safe_dirs_command(parents, private=True))

    def get_file(self, remote_path: str, into: BinaryIO) -> None:
        """Copy the file at `remote_path` into the open binary handle `into`. Where the copy
        lands is the caller's (tasks.lib.localfs.write_beneath): a path is never opened here."""
        raise NotImplementedError

    def run_with_input(self, command: str, data: bytes, *, warn: bool = False,
                       timeout: float | None = UPLOAD_TIMEOUT_S) -> Result:
        """Run `command` with `data` (binary-safe) as its stdin; stdout+stderr come back combined.

        For streaming an archive in one round trip: invoke's in_stream decodes stdin as text
        and sends it in 1000-byte chunks, which corrupts binary data. Past `timeout` seconds
        (None: no limit) it raises invoke's CommandTimedOut with the output so far.
        """
        raise NotImplementedError

    def ssh_hops(self) -> list[Connection]:
        """The SSH clients this node is reached through, the node's own first (none locally)."""
        return []

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"Node({self.index}, {self.label})"


class _WholeStdin(io.StringIO):
    """Stdin that Invoke takes in one read: it reads a stream that is not a terminal one byte per
    10 ms (invoke.terminals.bytes_to_read), 4 s for a 400-byte argument line."""

    def read(self, size: int | None = -1) -> str:
        return super().read()


class LocalNode(Node):
    """The embedded default: this machine, commands through a local shell, no SSH."""

    def __init__(self, index: int, spec: HostSpec, config: Config):
        super().__init__(index, spec)
        self._context = Context(config=config)

    def run(self, command: str, *, warn: bool = False, timeout: float | None = None, **kwargs) -> Result:
        kwargs.setdefault("hide", True)
        kwargs.setdefault("in_stream", False)
        return self._context.run(command, warn=warn, timeout=timeout, **kwargs)

    def wrap(self, command: str, stdin: bool = False) -> str:
        """The shell command that runs `command` on this node (srun wraps it in a step)."""
        return command

    def stream(self, command: str, on_data: Callable[[bytes], None]) -> StreamEnd:
        with subprocess.Popen(["/bin/sh", "-c", self.wrap(command)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
            assert process.stdout is not None and process.stderr is not None
            stderr = _StderrTail(process.stderr.read1)
            fd = process.stdout.fileno()
            try:
                while chunk := os.read(fd, STREAM_CHUNK_BYTES):
                    on_data(chunk)
            except BaseException:
                process.kill()  # a follower (tail -F) would never end by itself
                raise
            status = process.wait()
        return StreamEnd(status, stderr.text())

    def put_files(self, files: Mapping[str, str | bytes], mode: int = 0o600,
                  dirs: Iterable[str] = ()) -> None:
        self.prepare_dirs(files, dirs)
        for path, content in files.items():
            target = Path(path)
            partial = target.with_name(_partial_name(target.name))
            partial.write_bytes(content.encode() if isinstance(content, str) else content)
            partial.chmod(mode)
            partial.replace(target)

    def get_file(self, remote_path: str, into: BinaryIO) -> None:
        # O_NOFOLLOW: a symlink swapped in after the listing is not read through.
        fd = os.open(remote_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as source:
            shutil.copyfileobj(source, into)

    def run_with_input(self, command: str, data: bytes, *, warn: bool = False,
                       timeout: float | None = UPLOAD_TIMEOUT_S) -> Result:
        # Its own session, so a timeout kills the whole group: subprocess.run kills only the
        # shell, then waits for the pipe that the shell's children still hold open.
        with subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True) as process:
            try:
                output, _ = process.communicate(data, timeout=timeout)
            except subprocess.TimeoutExpired:
                partial = _kill_group(process)
                raise CommandTimedOut(_result(command, partial, -1), timeout) from None
        return _finish(command, output, process.returncode, warn)


class SshNode(Node):
    """A remote host through a Fabric Connection whose host keys are checked (see `host_key_policy`)."""

    def __init__(self, index: int, spec: HostSpec, connection: Connection,
                 known_hosts: Path | None = None):
        super().__init__(index, spec)
        self.connection = connection
        self.known_hosts = known_hosts  # named in host-key errors: the file the user must fix

    def transport(self) -> paramiko.Transport:
        """The open connection's transport, its channel opens bounded (CHANNEL_OPEN_TIMEOUT_S)."""
        self.connection.open()
        transport = self.connection.client.get_transport()
        transport.channel_timeout = max(self.connection.connect_timeout or 0,
                                        CHANNEL_OPEN_TIMEOUT_S)
        return transport

    def sftp(self) -> paramiko.SFTPClient:
        self.transport()
        sftp = self.connection.sftp()
        sftp.get_channel().settimeout(SFTP_STALL_TIMEOUT_S)
        return sftp

    def run(self, command: str, *, warn: bool = False, timeout: float | None = None, **kwargs) -> Result:
        kwargs.setdefault("hide", True)
        kwargs.setdefault("in_stream", False)
        self.transport()
        return self.connection.run(command, warn=warn, timeout=timeout, **kwargs)

    def stream(self, command: str, on_data: Callable[[bytes], None]) -> StreamEnd:
        channel = self.transport().open_session()
        try:
            channel.exec_command(command)
            # Read aside: unread stderr would hold the channel's window, and stdout with it.
            stderr = _StderrTail(channel.recv_stderr)
            while chunk := channel.recv(STREAM_CHUNK_BYTES):
                on_data(chunk)
            channel.status_event.wait()
            status = channel.exit_status
        finally:
            channel.close()
        text = stderr.text()
        if status < 0:
            raise NodeError("the SSH channel closed before the command ended"
                            + (f": {text.strip()[-200:]}" if text.strip() else ""))
        return StreamEnd(status, text)

    def put_files(self, files: Mapping[str, str | bytes], mode: int = 0o600,
                  dirs: Iterable[str] = ()) -> None:
        # Connection.put neither creates directories nor expands "~": one round trip first.
        self.prepare_dirs(files, dirs)
        sftp = self.sftp()
        for path, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            partial = posixpath.join(posixpath.dirname(path), _partial_name(posixpath.basename(path)))
            sftp.putfo(io.BytesIO(data), partial)
            sftp.chmod(partial, mode)
            sftp.posix_rename(partial, path)

    def get_file(self, remote_path: str, into: BinaryIO) -> None:
        self.sftp().getfo(remote_path, into)

    def run_with_input(self, command: str, data: bytes, *, warn: bool = False,
                       timeout: float | None = UPLOAD_TIMEOUT_S) -> Result:
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self.transport().open_session()
        output = bytearray()
        # Read while writing: a command that fails early may fill the window and stop reading.
        reader = threading.Thread(target=lambda: _drain(channel, output), daemon=True)
        try:
            # Bounds each blocking send/recv: a host that stops reading must not block sendall.
            channel.settimeout(timeout)
            channel.set_combine_stderr(True)
            channel.exec_command(command)
            reader.start()
            try:
                channel.sendall(data)
                channel.shutdown_write()
            except TimeoutError:
                raise CommandTimedOut(_result(command, bytes(output), -1), timeout) from None
            except OSError:
                pass  # the command exited without reading all of it: its status says why
            if not channel.status_event.wait(_remaining(deadline)):
                raise CommandTimedOut(_result(command, bytes(output), -1), timeout)
            status = channel.recv_exit_status()
            reader.join(_remaining(deadline))
        finally:
            channel.close()
        return _finish(command, bytes(output), status, warn)

    @property
    def known_hosts_name(self) -> str:
        """This host's name in known_hosts (OpenSSH writes "[host]:port" off port 22)."""
        return known_hosts_name(self.connection.host, self.connection.port)

    def ssh_hops(self) -> list[Connection]:
        return connection_chain(self.connection)

    def close(self) -> None:
        """Close the connection, then its ProxyJump hops (Connection.close leaves them open)."""
        for hop in connection_chain(self.connection):
            hop.close()


# -- helpers (host keys are checked in tasks/cluster/hostkeys.py) -----------------------------------------


def _partial_name(name: str) -> str:
    return f".{name}.part-{uuid.uuid4().hex[:12]}"


class _StderrTail:
    """Reads a command's stderr in a thread of its own to the end, keeping only its end."""

    def __init__(self, read: Callable[[int], bytes]):
        self._read = read
        self._kept = b""
        self._thread = threading.Thread(target=self._run, daemon=True, name="stderr")
        self._thread.start()

    def _run(self) -> None:
        try:
            while chunk := self._read(65536):
                self._kept = (self._kept + chunk)[-STREAM_STDERR_KEEP:]
        except (OSError, ValueError, EOFError):
            pass

    def text(self, wait_s: float = 5.0) -> str:
        self._thread.join(wait_s)
        return self._kept.decode("utf-8", "replace")


def _drain(channel: paramiko.Channel, into: bytearray) -> None:
    try:
        while chunk := channel.recv(65536):
            into.extend(chunk)
    except TimeoutError:
        pass  # quiet past the timeout: the caller's deadline decides, not this thread


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _kill_group(process: subprocess.Popen) -> bytes:
    """Kill the process and its children; the output it wrote before."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    output, _ = process.communicate()
    return output or b""


def _result(command: str, output: bytes, status: int) -> Result:
    return Result(stdout=output.decode(errors="replace"), command=command, exited=status,
                  hide=("stdout", "stderr"))


def _finish(command: str, output: bytes, status: int, warn: bool) -> Result:
    result = _result(command, output, status)
    if status != 0 and not warn:
        raise UnexpectedExit(result)
    return result


# -- opening and fanning out ----------------------------------------------------------------------

def open_nodes(config: Config, inventory: Inventory, cluster: ClusterSettings) -> list[Node]:
    """One Node per inventory host; SSH connections open lazily, on each node's first call."""
    if inventory.is_local:
        return [LocalNode(0, inventory.master, config)]
    known_hosts = known_hosts_path(cluster)
    # Read once for all clients: a key one of them records, the others find.
    known = None if cluster.host_key_policy == "auto-add" else load_known_hosts(known_hosts)
    nodes: list[Node] = []
    for index, spec in enumerate(inventory.hosts):
        connection = Connection(spec.host, user=spec.user, port=spec.port, config=config)
        # Fabric gives every ProxyJump hop a client of its own that accepts any key: a spoofed
        # jump host would see the traffic of every node behind it.
        for hop in connection_chain(connection):
            apply_host_key_policy(hop.client, cluster.host_key_policy, known_hosts, known)
        nodes.append(SshNode(index, spec, connection, known_hosts))
    return nodes


@dataclass
class NodeResults(Generic[T]):
    """Per-node outcomes of one fan-out, in node order."""

    ok: dict[Node, T] = field(default_factory=dict)
    failed: dict[Node, BaseException] = field(default_factory=dict)

    def raise_if_failed(self, action: str, code: int = 1, hint: str = "") -> None:
        """Raise Exit with one line per failing host (no traceback for an expected error)."""
        if not self.failed:
            return
        total = len(self.ok) + len(self.failed)
        lines = [f"{action} failed on {len(self.failed)} of {total} host(s):"]
        for node in sorted(self.failed, key=lambda n: n.index):
            reason = describe_error(self.failed[node], node)
            lines.append(f"  node {node.index} ({node.label}): {reason}")
        if hint:
            lines.append(hint)
        raise Exit("\n".join(lines), code=code)


def on_each(nodes: Iterable[Node], call: Callable[[Node], T]) -> NodeResults[T]:
    """Run `call(node)` for every node at once; exceptions are collected per node, not raised.

    KeyboardInterrupt and SystemExit are not collected: they propagate after the threads end.
    """
    nodes = list(nodes)
    results: NodeResults[T] = NodeResults()
    if not nodes:
        return results
    with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="node") as pool:
        futures = {node: pool.submit(call, node) for node in nodes}
        for node, future in futures.items():
            error = future.exception()
            if error is None:
                results.ok[node] = future.result()
            elif isinstance(error, Exception):
                results.failed[node] = error
            else:
                raise error
    return results


def close_all(nodes: Iterable[Node]) -> None:
    for node in nodes:
        try:
            node.close()
        except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
            pass
