"""Host-key checks for the SSH client of every node and jump host, the way OpenSSH checks them.

paramiko's own known_hosts support (HostKeys.load) stops with a traceback on `@cert-authority`
and `@revoked` lines and on some malformed ones, matches names literally (no wildcards, no `!`),
knows no revocation and reads no global file. Here tasks.lib.knownhosts parses the files and the
client's host-key table answers from them: cluster.known_hosts (where accept-new appends) and,
read-only, the global files (OpenSSH's GlobalKnownHostsFile default).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import paramiko
from fabric import Connection
from invoke.exceptions import Exit

from tasks.lib.knownhosts import (
    KnownHostLine,
    KnownHosts,
    Status,
    Verdict,
    parse_known_hosts,
)
from tasks.lib.settings import ClusterSettings

# OpenSSH's GlobalKnownHostsFile default. Read per load (tests point it at their own files).
GLOBAL_KNOWN_HOSTS_FILES: tuple[Path, ...] = (
    Path("/etc/ssh/ssh_known_hosts"),
    Path("/etc/ssh/ssh_known_hosts2"),
)

_log = logging.getLogger(__name__)
# One process checks and records for many threads (one per node; a jump host may serve several).
_lock = threading.Lock()
_noted: set[str] = set()  # files whose @cert-authority note was printed


class HostKeyRevoked(paramiko.SSHException):
    """The host presented a key that a `@revoked` line covering it lists."""

    def __init__(self, hostname: str, key: paramiko.PKey, line: KnownHostLine):
        super().__init__(f"host key of {hostname} is revoked by {line.where}")
        self.hostname = hostname
        self.key = key
        self.line = line


class HostKeyChanged(paramiko.BadHostKeyException):
    """BadHostKeyException that knows the line with the other key (maybe in the global file)."""

    def __init__(self, hostname: str, got_key: paramiko.PKey, expected_key: paramiko.PKey,
                 line: KnownHostLine):
        super().__init__(hostname, got_key, expected_key)
        self.line = line


class KnownHostKeys:
    """The known_hosts lines of one session; new keys are appended to `user_file` only.

    Shared by the clients of all nodes: a key one thread records, the others find.
    """

    def __init__(self, user_file: Path, lines: Iterable[KnownHostLine] = ()):
        self.user_file = user_file
        self._table = KnownHosts()
        self._keys: dict[KnownHostLine, paramiko.PKey] = {}
        for line in lines:
            key = _public_key(line)
            if key is None:
                # As paramiko's loader: a key type it cannot use is never presented to it.
                _log.debug("%s: skipped: paramiko cannot use %s keys", line.where, line.key_type)
                continue
            self._add(line, key)

    def check(self, name: str, key: paramiko.PKey) -> Verdict:
        return self._table.check(name, key.get_name(), key.asbytes())

    def verify(self, name: str, key: paramiko.PKey) -> Status:
        """OK or NEW; a revoked key raises HostKeyRevoked, a changed one HostKeyChanged."""
        verdict = self.check(name, key)
        if verdict.status is Status.REVOKED:
            raise HostKeyRevoked(name, key, verdict.line)
        if verdict.status is Status.CHANGED:
            raise HostKeyChanged(name, key, self._keys[verdict.line], verdict.line)
        return verdict.status

    def keys_for(self, name: str) -> list[paramiko.PKey]:
        """The keys of the plain lines covering `name`, in file order."""
        return [self._keys[line] for line in self._table.lines_for(name) if not line.marker]

    def record(self, name: str, key: paramiko.PKey) -> None:
        """Append `name key` to the user's file, unless a line accepts the key by now."""
        with _lock:
            if self.check(name, key).status is Status.OK:
                return  # another thread recorded it (a jump host in front of several nodes)
            text = f"{name} {key.get_name()} {key.get_base64()}"
            lineno = _append_line(self.user_file, text)
            self._add(KnownHostLine(str(self.user_file), lineno, "", name, key.get_name(),
                                    key.asbytes()), key)

    def remember(self, name: str, key: paramiko.PKey) -> None:
        """Accept `key` for `name` from now on, without writing it anywhere."""
        with _lock:
            if self.check(name, key).status is not Status.OK:
                self._add(KnownHostLine("<added>", 0, "", name, key.get_name(), key.asbytes()),
                          key)

    def _add(self, line: KnownHostLine, key: paramiko.PKey) -> None:
        self._keys[line] = key
        self._table.add(line)


def load_known_hosts(user_file: Path,
                     global_files: Sequence[Path] | None = None) -> KnownHostKeys:
    """The user's file, then the global ones (GLOBAL_KNOWN_HOSTS_FILES unless given).

    Missing files count as empty. Lines that do not parse are skipped, as OpenSSH does, and
    logged at debug level (`fab -d`); `@cert-authority` lines get one note per file.
    """
    files = [user_file, *(GLOBAL_KNOWN_HOSTS_FILES if global_files is None else global_files)]
    lines: list[KnownHostLine] = []
    for index, path in enumerate(files):
        text = _read(path, required=index == 0)
        if text is None:
            continue
        parsed = parse_known_hosts(text, str(path))
        for skipped in parsed.skipped:
            _log.debug("%s:%d: skipped: %s", skipped.source, skipped.lineno, skipped.reason)
        if parsed.authorities:
            first = parsed.authorities[0]
            more = len(parsed.authorities) - 1
            _note_once(str(path), (
                f"{first.where}: @cert-authority line{f' (and {more} more)' if more else ''} "
                f"ignored: host certificates are not verified here, so a host it covers "
                f"also needs a plain key line"))
        lines.extend(parsed.lines)
    return KnownHostKeys(user_file, lines)


class RecordNewHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """OpenSSH's StrictHostKeyChecking=accept-new: record unknown keys, refuse changed ones.

    Only hosts no plain line covers reach a policy (see _ClientHostKeys). Appending, rather than
    paramiko's save_host_keys, keeps the user's file as it was (comments, hashed names) and is
    safe with many threads. A revoked key is refused, never recorded.
    """

    def __init__(self, known_hosts: Path, known: KnownHostKeys | None = None):
        self.known_hosts = known_hosts
        self.known = known if known is not None else KnownHostKeys(known_hosts)

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        if self.known.verify(hostname, key) is Status.NEW:
            self.known.record(hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)


class RejectNewHostKeyPolicy(paramiko.RejectPolicy):
    """reject: an unknown host fails with paramiko's message; a revoked key says it is revoked."""

    def __init__(self, known: KnownHostKeys):
        self.known = known

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        if self.known.verify(hostname, key) is not Status.OK:
            super().missing_host_key(client, hostname, key)


def apply_host_key_policy(client: paramiko.SSHClient, policy: str, known_hosts: Path,
                          known: KnownHostKeys | None = None) -> None:
    """Replace Fabric's accept-everything default with the configured policy.

    `known`: the files as loaded once for all clients (load_known_hosts(known_hosts) if None).
    """
    if policy == "auto-add":
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        return
    if known is None:
        known = load_known_hosts(known_hosts)
    # No setter: SSHClient.connect reads this attribute (client.load_host_keys would also make
    # paramiko rewrite the file).
    client._host_keys = _ClientHostKeys(known, client)
    if policy == "reject":
        client.set_missing_host_key_policy(RejectNewHostKeyPolicy(known))
    else:
        client.set_missing_host_key_policy(RecordNewHostKeyPolicy(known_hosts, known))


def connection_chain(connection: Connection) -> list[Connection]:
    """The connection, its gateway, that gateway's gateway, ...: every SSH client it uses.

    Fabric builds the hops from ~/.ssh/config (ProxyJump) or a `gateway=` Connection. A
    ProxyCommand gateway (a string) is a local command that checks its own host keys.
    """
    chain = [connection]
    gateway = connection.gateway
    while isinstance(gateway, Connection) and gateway not in chain:
        chain.append(gateway)
        gateway = gateway.gateway
    return chain


def known_hosts_path(cluster: ClusterSettings) -> Path:
    return Path(os.path.expanduser(cluster.known_hosts))


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's fingerprint format (what `ssh-keygen -lf` prints), to compare by eye."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return base64.b64encode(digest).decode().rstrip("=")


class _ClientHostKeys(paramiko.HostKeys):
    """An SSHClient's host-key table, answered from KnownHostKeys.

    SSHClient.connect looks the host up before the handshake, for the key type to ask for first
    (a known one, as OpenSSH does), and after it for the known key of the presented key's type,
    which must equal the presented key. paramiko keeps one key per name and type and knows no
    revocation, so that second answer is OpenSSH's verdict: the presented key when a line
    accepts it, else HostKeyRevoked or HostKeyChanged, raised before any authentication.
    A host that no plain line covers is not found: the policy decides.
    """

    def __init__(self, known: KnownHostKeys, client: paramiko.SSHClient):
        super().__init__()
        self._known = known
        self._client = client

    def lookup(self, hostname: str) -> Mapping[str, paramiko.PKey] | None:
        keys = self._known.keys_for(hostname)
        if not keys:
            return None
        return _KeysOfHost(hostname, keys, self._known, self._presented_key)

    def add(self, hostname: str, keytype: str, key: paramiko.PKey) -> None:
        self._known.remember(hostname, key)

    def _presented_key(self) -> paramiko.PKey | None:
        transport = self._client.get_transport()
        if transport is None:
            return None
        try:
            return transport.get_remote_server_key()
        except paramiko.SSHException:  # no handshake yet
            return None


class _KeysOfHost(Mapping[str, paramiko.PKey]):
    """One host's known keys by type, as paramiko's HostKeys.lookup returns them."""

    def __init__(self, name: str, keys: list[paramiko.PKey], known: KnownHostKeys,
                 presented: Callable[[], paramiko.PKey | None]):
        self._name = name
        self._keys = keys
        self._known = known
        self._presented = presented

    def keys(self) -> list[str]:  # type: ignore[override] - paramiko indexes it: keys()[0]
        return list(dict.fromkeys(key.get_name() for key in self._keys))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __getitem__(self, key_type: str) -> paramiko.PKey:
        presented = self._presented()
        if presented is not None and presented.get_name() == key_type:
            self._known.verify(self._name, presented)  # lookup found plain lines: OK or raises
            return presented
        for key in self._keys:
            if key.get_name() == key_type:
                return key
        raise KeyError(key_type)


def _public_key(line: KnownHostLine) -> paramiko.PKey | None:
    try:
        return paramiko.PKey.from_type_string(line.key_type, line.key_blob)
    except Exception:  # noqa: BLE001 - paramiko raises several types for keys it cannot load
        return None


def _read(path: Path, required: bool) -> str | None:
    """The file's text, None if it does not exist (or, for a global file, cannot be read)."""
    try:
        # Bytes, then decode: a stray byte must make one line unparsable, not the whole file.
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as error:
        if not required:
            _log.debug("%s: not read: %s", path, error.strerror or error)
            return None
        raise Exit(f"cannot read cluster.known_hosts {path}: {error.strerror or error}; fix "
                   f"its permissions or point cluster.known_hosts at a readable file",
                   code=2) from None


def _append_line(path: Path, text: str) -> int:
    """Append one line to `path` and return its line number.

    A last line without its newline is ended first: appended to it, the new entry would turn
    both into one unparsable line.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        handle.seek(0)
        before = handle.read()
        ending = b"\n" if before and not before.endswith(b"\n") else b""
        handle.write(ending + text.encode() + b"\n")
    return before.count(b"\n") + len(ending) + 1


def _note_once(key: str, text: str) -> None:
    with _lock:
        if key in _noted:
            return
        _noted.add(key)
    print(f"note: {text}", file=sys.stderr)
