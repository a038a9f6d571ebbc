"""Writing what a node sends back into a directory of ours on the controller.

A node is not trusted: the names of the files it lists are its own choice. A name is used on the
controller only when it is a plain relative path (no `..`, no absolute path, no control
character), and the file is then created one directory at a time from the target directory
down, through file descriptors that never follow a symlink: even a symlink that appeared in our
run directory after the check cannot send the write elsewhere.
"""
from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class RefusedName(ValueError):
    """A name from a node that is not created on the controller: `shown` (printable), `why`."""

    def __init__(self, name: str, why: str):
        self.shown = shown_name(name)
        self.why = why
        super().__init__(f"{self.shown}: {why}")


def name_problem(name: str) -> str | None:
    """Why `name` is no plain relative path to create under a directory of ours; None if it is.

    Control characters (C0, DEL, C1) are refused too: in a terminal or a line-based record they
    fake other lines or escape sequences. U+FFFD is what an undecodable byte became in transit.
    """
    if not name:
        return "empty name"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        return "control character in the name"
    if "\ufffd" in name:
        return "not valid UTF-8"
    if name.startswith("/"):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' component"
    if any(part in ("", ".") for part in parts):
        return "not a plain relative path (empty or '.' component)"
    return None


def shown_name(name: str, limit: int = 80) -> str:
    """A node's name as it may be printed: quoted, control characters escaped, bounded."""
    text = repr(name[:limit])
    return text + ("..." if len(name) > limit else "")


def regular_file_size(root: Path, relative: str) -> int | None:
    """The size of root/relative when it is a regular file reached without following any
    symlink below `root`; None otherwise (missing, a symlink, a directory, ...)."""
    parts = _checked_parts(relative)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            try:
                inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                return None
            os.close(fd)
            fd = inner
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None
    finally:
        os.close(fd)


@contextmanager
def write_beneath(root: Path, relative: str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A handle to write root/relative through; the file takes that name when the block ends
    without an error (nothing is left behind otherwise).

    `root` is ours (created if missing); every directory below it is created mode 0700 or
    opened without following a symlink, and the content goes to a new file (O_EXCL, O_NOFOLLOW)
    renamed over the name, so a symlink or a file planted there is replaced, never written
    through. RefusedName when the name is no plain relative path or cannot be created here (a
    component is a file or a symlink, the name is a directory); errors of the block pass as is.
    """
    parts = _checked_parts(relative)
    fd = -1
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            inner = os.open(part, _DIR_FLAGS, dir_fd=fd)  # ELOOP/ENOTDIR: a symlink or a file
            os.close(fd)
            fd = inner
        # Short and fixed: the final name may already be as long as a name can be.
        temporary = f".gemm-part-{uuid.uuid4().hex[:16]}"
        handle = os.fdopen(os.open(temporary, _NEW_FILE_FLAGS, mode, dir_fd=fd), "wb")
    except OSError as err:
        if fd >= 0:
            os.close(fd)
        raise RefusedName(relative, f"cannot be created here: {err.strerror or err}") from None
    try:
        with handle:
            yield handle
        try:
            os.replace(temporary, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as err:
            raise RefusedName(relative, f"cannot be created here: {err.strerror or err}") from None
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=fd)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


def _checked_parts(relative: str) -> list[str]:
    problem = name_problem(relative)
    if problem:
        raise RefusedName(relative, problem)
    return relative.split("/")


__all__ = ["RefusedName", "name_problem", "shown_name", "regular_file_size", "write_beneath"]
