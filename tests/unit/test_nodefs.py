"""tasks/lib/nodefs.py's node-side checks, run for real with bash on this machine.

Every case is a place another user of a shared node could prepare for us: a directory they can
write on the way, a symlink, a directory of theirs, a mode that lets them in. Other owners need
root to arrange (chown); those cases skip without it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tasks.lib.nodefs import (
    checked_file_command,
    registry_for_uid,
    safe_dirs_command,
)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def sh(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    # pytest's tmp dirs may sit under a group-writable parent on some machines: start from ours.
    root = tmp_path / "b"
    root.mkdir(mode=0o755)
    return root


def test_missing_levels_are_created_0700_one_at_a_time(base: Path) -> None:
    target = base / "x" / "y" / "z"
    result = sh(safe_dirs_command([str(target)]))
    assert result.returncode == 0, result.stderr
    for path in (base / "x", base / "x" / "y", target):
        assert path.is_dir() and path.stat().st_mode & 0o777 == 0o700


def test_an_existing_private_dir_of_ours_is_accepted_and_left_as_is(base: Path) -> None:
    target = base / "reg"
    target.mkdir(mode=0o700)
    (target / "keep").write_text("x")
    assert sh(safe_dirs_command([str(target)])).returncode == 0
    assert (target / "keep").read_text() == "x"


def test_a_world_writable_directory_on_the_way_is_refused_before_anything_is_created(
        base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = sh(safe_dirs_command([str(shared / "reg" / "docker")], what="the run registry"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"refusing the run registry {shared}/reg/docker: {shared} is writable by other users "
        "(mode 777); another user could replace what we write there. Fix the owner or mode, or "
        "choose another path")
    assert list(shared.iterdir()) == []


def test_a_sticky_world_writable_directory_is_fine(base: Path) -> None:
    tmp = base / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)  # like /tmp: others cannot rename or remove what is ours in it
    assert sh(safe_dirs_command([str(tmp / "reg")])).returncode == 0


def test_a_symlink_as_the_directory_itself_is_refused(base: Path) -> None:
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = base / "reg"
    link.symlink_to(elsewhere)
    result = sh(safe_dirs_command([str(link)]))
    assert result.returncode == 1 and "it is a symlink or not a directory" in result.stderr
    # One of ours on the way (a scratch dir linked from elsewhere) is judged by where it leads.
    assert sh(safe_dirs_command([str(link / "docker")])).returncode == 0
    assert (elsewhere / "docker").is_dir()


def test_private_means_mode_0700(base: Path) -> None:
    target = base / "reg"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    result = sh(safe_dirs_command([str(target)], private=True))
    assert result.returncode == 1
    assert "mode 755 lets other users in (want 700): chmod 700 it" in result.stderr
    assert sh(safe_dirs_command([str(target)], private=False)).returncode == 0


def test_a_relative_path_is_refused(base: Path) -> None:
    result = sh(safe_dirs_command(["rel/dir"]))
    assert result.returncode == 1 and "not an absolute path" in result.stderr


@needs_root
def test_a_directory_of_another_user_is_refused(base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, -1)
    result = sh(safe_dirs_command([str(theirs)], private=False))
    assert result.returncode == 1
    assert f"{theirs} is owned by" in result.stderr and "not by root" in result.stderr


@needs_root
def test_a_symlink_of_another_user_to_our_directory_is_refused(base: Path) -> None:
    ours = base / "ours"
    ours.mkdir(mode=0o700)
    link = base / "reg"
    link.symlink_to(ours)
    os.lchown(link, NOBODY, -1)
    result = sh(safe_dirs_command([str(link / "docker")]))
    assert result.returncode == 1 and f"{link} is owned by" in result.stderr
    assert not (ours / "docker").exists()


def test_checked_file_command_runs_only_a_file_nobody_else_can_write(base: Path) -> None:
    compose = base / "compose.yaml"
    compose.write_text("x")
    compose.chmod(0o644)
    ran = base / "ran"
    command = checked_file_command(str(compose), "the compose file", ["touch", str(ran)])
    assert sh(command).returncode == 0 and ran.exists()
    ran.unlink()
    compose.chmod(0o666)
    result = sh(command)
    assert result.returncode == 1 and not ran.exists()
    assert "refusing the compose file" in result.stderr and "mode 666" in result.stderr
    compose.unlink()
    compose.symlink_to(base / "elsewhere.yaml")
    (base / "elsewhere.yaml").write_text("x")
    result = sh(command)
    assert result.returncode == 1 and "a symlink or not a regular file" in result.stderr
    assert not ran.exists()


def test_registry_defaults_are_per_user() -> None:
    assert registry_for_uid(None, 1234) == "/tmp/gemm-runs-1234"
    assert registry_for_uid("/scratch/reg", 1234) == "/scratch/reg"
