"""What `fab sync` sends and how nodes sharing a filesystem are found (no network here).

Semantics: the synced area is the controller's tracked + untracked-not-ignored files
(`git ls-files -co --exclude-standard`) minus experiments/ and virtualenvs. A node's copy is
made equal to that area; files that an EARLIER sync wrote and that are gone from the checkout
are deleted (rsync --delete, restricted to what sync itself wrote: the node's own files such as
experiment outputs, logs or a venv are never touched). The list of written files and a content
hash are recorded in the workdir (`.gemm-sync.files`, `.gemm-sync.json`), so `fab check` can
recompute the hash on a node whose workdir has no .git.

Tree hash: sha256 over the `sha256sum -z` lines ("<hex>  <path>\\0") of the files in byte order,
so a node recomputes it with coreutils alone.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tasks.lib.nodefs import with_safe_fs
from tasks.lib.probe import SYNC_FILES, SYNC_RECORD
from tasks.lib.quoting import sh_quote

VENV_DIR_NAMES = frozenset({".venv", "venv"})
MARKER_PREFIX = ".gemm-sync-probe-"
CONTROLLER_MARK = "c"


class SyncError(ValueError):
    """A path that sync must not write or delete."""


def select_sync_files(
    paths: Iterable[str], excluded_dirs: Sequence[str] = ("experiments",)
) -> list[str]:
    """The checkout's files that a node needs, sorted in byte order, without duplicates.

    Drops experiments (and any configured output dir), virtualenvs (by name, or any directory
    holding a pyvenv.cfg), and sync's own bookkeeping files.
    """
    paths = sorted(set(p for p in paths if p))
    venv_roots = {posixpath.dirname(p) for p in paths if posixpath.basename(p) == "pyvenv.cfg"}
    excluded = {d.strip("/") for d in excluded_dirs if d.strip("/")} | {r for r in venv_roots if r}
    selected = []
    for path in paths:
        check_relative(path)
        parts = path.split("/")
        if any(part in VENV_DIR_NAMES for part in parts[:-1]):
            continue
        if any(path == d or path.startswith(d + "/") for d in excluded):
            continue
        if parts[0].startswith(".gemm-sync"):
            continue
        selected.append(path)
    return sorted(selected, key=lambda p: p.encode())


def check_relative(path: str) -> str:
    """Refuse paths that would escape the workdir (sync writes and deletes under it only)."""
    if not path or path.startswith("/") or ".." in path.split("/") or "\0" in path:
        raise SyncError(f"refusing to sync path {path!r}: not a plain relative path")
    return path


def tree_hash(root: Path, files: Sequence[str]) -> str:
    """The content hash of `files` under root (see the module doc for the exact definition)."""
    outer = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.encode()):
        inner = hashlib.sha256()
        with open(root / path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{inner.hexdigest()}  {path}\0".encode())
    return outer.hexdigest()


def files_list_bytes(files: Sequence[str]) -> bytes:
    return b"".join(path.encode() + b"\0" for path in sorted(files, key=lambda p: p.encode()))


def parse_files_list(data: bytes) -> list[str]:
    return [item.decode(errors="surrogateescape") for item in data.split(b"\0") if item]


def sync_record(
    *,
    tree: str,
    branch: str | None,
    commit: str | None,
    dirty: bool | None,
    files: int,
    source: str,
) -> bytes:
    return (
        json.dumps(
            {
                "tree_hash": tree,
                "branch": branch,
                "commit": commit,
                "dirty": dirty,
                "files": files,
                "source": source,
            },
            indent=2,
        ).encode()
        + b"\n"
    )


def build_tarball(root: Path, files: Sequence[str], extra: Mapping[str, bytes]) -> bytes:
    """A gzipped tar of `files` (symlinks kept as links) plus in-memory `extra` files, last.

    Owners are zeroed: the node's user owns what it extracts.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for path in files:
            info = tar.gettarinfo(str(root / path), arcname=path)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                with open(root / path, "rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
        for name, data in extra.items():
            info = tarfile.TarInfo(check_relative(name))
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def stale_files(previous: Iterable[str], current: Iterable[str]) -> list[str]:
    """Files an earlier sync wrote that the checkout no longer has (to delete on the node)."""
    keep = set(current)
    return sorted({check_relative(p) for p in previous if p not in keep}, key=lambda p: p.encode())


# -- remote scripts -------------------------------------------------------------------------------


def marker_name(token: str, who: str) -> str:
    return f"{MARKER_PREFIX}{token}-{who}"


# The workdir holds the code every rank imports: a directory another user could change (or
# planted on the way to it) is refused before anything is written there (tasks/lib/nodefs.py).
def _workdir_check(workdir: str) -> str:
    return f"gemm_safe_dir {sh_quote(workdir)} 'the workdir (cluster.workdir)' || exit 1\n"


def mark_script(workdir: str, token: str, index: int) -> str:
    """Round 1: create the workdir and drop this node's marker in it (a command line)."""
    marker = sh_quote(posixpath.join(workdir, marker_name(token, str(index))))
    return with_safe_fs(_workdir_check(workdir) + f": > {marker}\n")


def seen_script(workdir: str, token: str, node_count: int) -> str:
    """Round 2: which markers (the controller's, each node's) this node sees, and the file list
    the previous sync wrote (base64, since paths may hold any byte but NUL)."""
    names = [CONTROLLER_MARK] + [str(i) for i in range(node_count)]
    tests = "; ".join(
        f"[ -e {sh_quote(posixpath.join(workdir, marker_name(token, who)))} ] && echo seen={who}"
        for who in names
    )
    files = sh_quote(posixpath.join(workdir, SYNC_FILES))
    return f"{tests}; [ -f {files} ] && echo previous=$(base64 -w0 < {files}); exit 0"


def parse_seen(text: str) -> tuple[set[str], list[str]]:
    seen: set[str] = set()
    previous: list[str] = []
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "seen":
            seen.add(value)
        elif key == "previous" and value:
            previous = parse_files_list(base64.b64decode(value))
    return seen, previous


def filesystem_groups(seen: Mapping[int, set[str]]) -> tuple[set[int], dict[int, list[int]]]:
    """(nodes whose workdir is the controller's checkout, {leader: [nodes sharing its workdir]}).

    Nodes that see the same markers share one filesystem: sync writes once, to the lowest index.
    """
    with_controller = {i for i, marks in seen.items() if CONTROLLER_MARK in marks}
    groups: dict[frozenset[str], list[int]] = {}
    for index in sorted(seen):
        if index in with_controller:
            continue
        marks = seen[index]
        key = frozenset(marks) if str(index) in marks else frozenset({f"alone-{index}"})
        groups.setdefault(key, []).append(index)
    return with_controller, {members[0]: members for members in groups.values()}


def extract_script(workdir: str, token: str, stale: Sequence[str]) -> str:
    """Round 3 on a group leader: drop the markers, delete stale files, unpack stdin (a command
    line; stdin reaches tar)."""
    w = sh_quote(workdir)
    lines = [
        _workdir_check(workdir).rstrip("\n"),
        "set -e",
        f"cd -- {w}",
        f"rm -f -- {sh_quote(MARKER_PREFIX + token)}-*",
    ]
    if stale:
        lines.append("rm -f -- " + " ".join(sh_quote(check_relative(p)) for p in stale))
        parents = sorted({posixpath.dirname(p) for p in stale} - {""}, key=len, reverse=True)
        if parents:
            lines.append(
                "rmdir -p --ignore-fail-on-non-empty -- "
                + " ".join(sh_quote(p) for p in parents)
                + " 2>/dev/null || true"
            )
    lines.append("tar -xzf - --no-same-owner")
    return with_safe_fs("\n".join(lines) + "\n")


__all__ = [
    "select_sync_files",
    "tree_hash",
    "files_list_bytes",
    "parse_files_list",
    "sync_record",
    "build_tarball",
    "stale_files",
    "mark_script",
    "seen_script",
    "parse_seen",
    "filesystem_groups",
    "extract_script",
    "SyncError",
    "SYNC_FILES",
    "SYNC_RECORD",
]
