"""The test image: a tiny root filesystem imported with `docker import` (no registry needed).

The image holds only directories, a few /etc files and the merged-/usr symlinks; the toolchain
(python, torch in the venv, coreutils, iproute2) comes from the host through read-only bind
mounts (`container_volumes`). vfs copies every layer for every container, so the image stays
a few kB and a container starts in well under a second.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

IMAGE_TAG = "gemm-sim:latest"

_DIRECTORIES = {
    "dev": 0o755, "proc": 0o555, "sys": 0o555, "etc": 0o755, "root": 0o700, "run": 0o755,
    "srv": 0o755, "tmp": 0o1777, "var": 0o755, "var/tmp": 0o1777, "usr": 0o755, "work": 0o755,
    "home": 0o755, "opt": 0o755, "mnt": 0o755,
}
_ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/bash\n"
                  "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    "etc/os-release": 'NAME="gemm-sim"\nID=gemm-sim\nPRETTY_NAME="gemm-sim test image"\n',
}
# Copied from the host when present: the loader cache makes /usr/lib/<triplet> libraries load
# exactly as on the host.
_HOST_ETC_COPIES = ("etc/ld.so.cache", "etc/ld.so.conf")
_TOP_LEVEL_TOOLCHAIN = ("/usr", "/bin", "/lib", "/lib64", "/sbin")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def container_volumes(repo: Path | None = None, venv: Path | None = None) -> list[str]:
    """Read-only binds giving a container the host's toolchain and this checkout (with its venv).

    On a merged-/usr host /bin, /lib, /lib64 and /sbin are symlinks into /usr: the image carries
    the same symlinks and only /usr is mounted. An interpreter installed elsewhere (pyenv, a
    python.org build under /opt) is mounted from sys.base_prefix.
    """
    repo = repo or repo_root()
    volumes = []
    for path in _TOP_LEVEL_TOOLCHAIN:
        if os.path.isdir(path) and not os.path.islink(path):
            volumes.append(f"{path}:{path}:ro")
    # A venv's python is a symlink to the base interpreter: a container needs that too.
    base = Path(sys.base_prefix).resolve()
    if not base.is_relative_to("/usr"):
        volumes.append(f"{base}:{base}:ro")
    volumes.append(f"{repo}:{repo}:ro")
    if venv is not None and venv.exists() and not venv.resolve().is_relative_to(repo):
        volumes.append(f"{venv}:{venv}:ro")
    return volumes


def _add(tar: tarfile.TarFile, name: str, *, kind: bytes, mode: int, data: bytes = b"",
         link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uid, info.gid = kind, mode, 0, 0, 0
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def rootfs_tar_bytes(host_root: Path = Path("/")) -> bytes:
    """A deterministic tar (fixed mtimes, sorted entries) so its digest names the cached file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, mode in sorted(_DIRECTORIES.items()):
            _add(tar, name, kind=tarfile.DIRTYPE, mode=mode)
        for top in _TOP_LEVEL_TOOLCHAIN[1:]:
            host_path = host_root / top.lstrip("/")
            if top == "/sbin":
                # A real directory: docker mounts its init at /sbin/docker-init (compose `init:
                # true`), which cannot be created through a symlink into the read-only /usr.
                _add(tar, "sbin", kind=tarfile.DIRTYPE, mode=0o755)
            elif host_path.is_symlink():
                _add(tar, top.lstrip("/"), kind=tarfile.SYMTYPE, mode=0o777,
                     link=os.readlink(host_path))
        files = dict(_ETC_FILES)
        for name in _HOST_ETC_COPIES:
            host_file = host_root / name
            if host_file.is_file():
                files[name] = host_file.read_bytes()
        for name, content in sorted(files.items()):
            data = content if isinstance(content, bytes) else content.encode()
            _add(tar, name, kind=tarfile.REGTYPE, mode=0o644, data=data)
    return buffer.getvalue()


def cached_rootfs_tar(cache_dir: Path) -> Path:
    """Writes the rootfs tar once per content; returns its path."""
    data = rootfs_tar_bytes()
    path = cache_dir / f"gemm-sim-rootfs-{hashlib.sha256(data).hexdigest()[:16]}.tar"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        partial.write_bytes(data)
        partial.replace(path)
    return path


def docker_run_volume_args(volumes: Sequence[str]) -> list[str]:
    args: list[str] = []
    for volume in volumes:
        args += ["-v", volume]
    return args
