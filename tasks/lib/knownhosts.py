"""known_hosts files read as OpenSSH reads them (sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT").

No SSH library here: a line is a marker, a host-pattern field, a key type and the key's bytes;
`KnownHosts.check` gives OpenSSH's verdict on the key a host presented (hostfile.c). Where
paramiko's HostKeys differs (it raises on markers, matches names literally):

- `@revoked` lines: that key is refused for the hosts the line covers, even where another line
  accepts it. `@cert-authority` lines are kept apart (nothing here verifies host certificates).
- Host patterns: comma lists with `*` / `?` wildcards and `!` negations (a matching negation
  excludes the host whatever else matches), case-insensitive; hashed names (`|1|salt|hmac`).
- A line that does not parse is skipped, never an error (OpenSSH says so only in debug output).
- Any line with the presented key accepts it: the user's file and the global one are one list.
"""
from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"
_FIELD_SEPARATOR = re.compile(r"[ \t]+")


@dataclass(frozen=True)
class KnownHostLine:
    """One key line: `marker` is "", REVOKED or CERT_AUTHORITY; `hosts` the field as written."""

    source: str  # the file, as named in messages
    lineno: int
    marker: str
    hosts: str
    key_type: str
    key_blob: bytes

    @property
    def where(self) -> str:
        return f"{self.source}:{self.lineno}"

    def matches(self, name: str) -> bool:
        return host_matches(self.hosts, name)


@dataclass(frozen=True)
class SkippedLine:
    source: str
    lineno: int
    reason: str


@dataclass(frozen=True)
class ParsedFile:
    lines: tuple[KnownHostLine, ...]  # plain and @revoked lines
    authorities: tuple[KnownHostLine, ...]  # @cert-authority lines
    skipped: tuple[SkippedLine, ...]


class Status(enum.Enum):
    OK = "ok"  # a plain line has this key
    NEW = "new"  # no plain line covers the host
    CHANGED = "changed"  # plain lines cover the host, none with this key
    REVOKED = "revoked"  # a @revoked line covering the host has this key


@dataclass(frozen=True)
class Verdict:
    """`line`: the accepting line (OK), one with another key (CHANGED), the @revoked line."""

    status: Status
    line: KnownHostLine | None = None


def known_hosts_name(host: str, port: int | None) -> str:
    """The name OpenSSH (and paramiko) look a host up by: "[host]:port" off port 22."""
    return host if port in (None, 22) else f"[{host}]:{port}"


def parse_known_hosts(text: str, source: str) -> ParsedFile:
    lines: list[KnownHostLine] = []
    authorities: list[KnownHostLine] = []
    skipped: list[SkippedLine] = []
    for lineno, raw in enumerate(text.split("\n"), 1):  # OpenSSH ends lines at \n only
        parsed = parse_line(raw, source, lineno)
        if isinstance(parsed, SkippedLine):
            skipped.append(parsed)
        elif parsed is not None:
            (authorities if parsed.marker == CERT_AUTHORITY else lines).append(parsed)
    return ParsedFile(tuple(lines), tuple(authorities), tuple(skipped))


def parse_line(raw: str, source: str, lineno: int) -> KnownHostLine | SkippedLine | None:
    """A key line, the reason a line is skipped, or None for a blank line or a comment."""
    text = raw.strip(" \t\r\n")
    if not text or text.startswith("#"):
        return None
    fields = _FIELD_SEPARATOR.split(text)

    def skip(reason: str) -> SkippedLine:
        return SkippedLine(source, lineno, reason)

    marker = ""
    if fields[0].startswith("@"):
        marker = fields.pop(0)
        if marker not in (REVOKED, CERT_AUTHORITY):
            return skip(f"unknown marker {marker!r}")
        if fields and fields[0].startswith("@"):
            return skip("more than one marker")
    if len(fields) < 3:
        return skip("expected host names, key type and key")
    hosts, key_type, key_text = fields[:3]  # anything after the key is a comment
    try:
        blob = base64.b64decode(key_text, validate=True)
    except (binascii.Error, ValueError):
        return skip("the key is not base64")
    if _blob_type(blob) != key_type:
        return skip(f"the key is not a {key_type} key")
    return KnownHostLine(source, lineno, marker, hosts, key_type, blob)


def host_matches(hosts: str, name: str) -> bool:
    """Whether a host-pattern field covers `name` (a host, or "[host]:port")."""
    name = name.lower()
    if hosts.startswith("|"):
        return _hashed_name_matches(hosts, name)
    matched = False
    for pattern in hosts.split(","):
        negated = pattern.startswith("!")
        if _pattern_matches(pattern[1:] if negated else pattern, name):
            if negated:
                return False
            matched = True
    return matched


class KnownHosts:
    """The lines of several files in order (the user's first, then the global ones)."""

    def __init__(self, lines: Iterable[KnownHostLine] = ()):
        self._lines = list(lines)

    def add(self, line: KnownHostLine) -> None:
        self._lines.append(line)

    def lines_for(self, name: str) -> list[KnownHostLine]:
        # A snapshot: other threads append keys they record.
        return [line for line in list(self._lines) if line.matches(name)]

    def check(self, name: str, key_type: str, key_blob: bytes) -> Verdict:
        """OpenSSH's verdict on a presented key (hostfile.c check_hostkeys_by_key_or_type)."""
        covering = self.lines_for(name)
        for line in covering:
            if line.marker == REVOKED and line.key_blob == key_blob:
                return Verdict(Status.REVOKED, line)
        plain = [line for line in covering if not line.marker]
        for line in plain:
            if line.key_blob == key_blob:
                return Verdict(Status.OK, line)
        if plain:
            # Of the same type when there is one: that is the key the host was expected to show.
            same_type = [line for line in plain if line.key_type == key_type]
            return Verdict(Status.CHANGED, (same_type or plain)[0])
        return Verdict(Status.NEW)


def _pattern_matches(pattern: str, name: str) -> bool:
    if "*" not in pattern and "?" not in pattern:
        return pattern.lower() == name
    return _wildcard_regex(pattern).fullmatch(name) is not None


@functools.lru_cache(maxsize=4096)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    # OpenSSH's match_pattern: only `*` and `?` are special (no [] classes, unlike fnmatch).
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.compile("".join(parts), re.DOTALL)


def _hashed_name_matches(hosts: str, name: str) -> bool:
    parts = hosts.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False  # OpenSSH drops such a line as unparsable
    try:
        salt = base64.b64decode(parts[2], validate=True)
        expected = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(salt) != hashlib.sha1().digest_size:
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), expected)


def _blob_type(blob: bytes) -> str | None:
    """The key type a public-key blob names first (RFC 4253 string), None if it has none."""
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length == 0 or len(blob) < 4 + length:
        return None
    try:
        return blob[4:4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None
