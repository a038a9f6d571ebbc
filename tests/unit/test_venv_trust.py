"""The venv the ranks run from, and the py-spy diagnose runs (as root), must be beyond other
users' reach (issue 26, finding 7): the node-side checks run for real with bash and Python on
this machine, files of another user made with chown (root only; skipped without it).

A venv is activated by sourcing its bin/activate: whoever can write that file, bin/ (torchrun,
python) or site-packages runs their code as us; a py-spy another user can replace runs as root.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.lib.diagnostics_node import find_pyspy, untrusted_because
from tasks.lib.nodefs import SAFE_FS_SH
from tests.unit.test_registry import LocalNode, make_node, run_id  # noqa: F401 - fixtures

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def fake_venv(root: Path, marker: Path | None = None) -> Path:
    """A venv's shape: bin/activate (touches `marker` when sourced), bin/python -> this
    interpreter, lib/python3.X/site-packages."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True, mode=0o755)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages"
    site.mkdir(parents=True, mode=0o755)
    for path in (venv, venv / "lib", site.parent, site):
        path.chmod(0o755)
    touch = f"touch {marker}\n" if marker else ""
    (venv / "bin" / "activate").write_text(f"{touch}PATH={venv}/bin:$PATH\n")
    (venv / "bin" / "activate").chmod(0o644)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    return venv


def safe_venv(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", SAFE_FS_SH + 'gemm_safe_venv "$1"', "check", str(venv)],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    root = tmp_path / "b"
    root.mkdir(mode=0o755)
    return root


def test_a_venv_of_ours_passes(base: Path) -> None:
    result = safe_venv(fake_venv(base))
    assert result.returncode == 0 and result.stderr == ""


def test_files_python_never_reads_at_the_top_of_a_venv_are_not_judged(base: Path) -> None:
    """uv's .lock, world-writable in the H100 image's /opt/torch/.venv, refused every launch
    there; it is neither run nor read by Python (pyvenv.cfg is, and stays judged)."""
    venv = fake_venv(base)
    (venv / ".lock").write_text("")
    (venv / ".lock").chmod(0o666)
    result = safe_venv(venv)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("change, named", [
    ("activate owned by another user", "bin/activate is owned by nobody with mode 644"),
    ("bin/ group-writable", "bin is writable by other users (mode 775)"),
    ("python a symlink to another user's file", "bin/python is owned by nobody with mode 755"),
    ("site-packages world-writable", "site-packages is owned by root with mode 777"),
    ("the venv another user's", "venv is owned by nobody, not by root"),
    ("pyvenv.cfg world-writable", "pyvenv.cfg is owned by root with mode 666"),
])
def test_a_venv_others_can_change_is_refused_naming_what_and_why(base: Path, change: str,
                                                                 named: str) -> None:
    venv = fake_venv(base)
    if change == "activate owned by another user":
        os.chown(venv / "bin" / "activate", NOBODY, NOBODY)
    elif change == "bin/ group-writable":
        (venv / "bin").chmod(0o775)
    elif change == "python a symlink to another user's file":
        theirs = base / "their-python"
        theirs.write_text("#!/bin/sh\n")
        theirs.chmod(0o755)
        os.chown(theirs, NOBODY, NOBODY)
        (venv / "bin" / "python").unlink()
        (venv / "bin" / "python").symlink_to(theirs)
    elif change == "pyvenv.cfg world-writable":
        (venv / "pyvenv.cfg").chmod(0o666)
    elif change == "site-packages world-writable":
        next(venv.glob("lib/python*/site-packages")).chmod(0o777)
    else:
        os.chown(venv, NOBODY, NOBODY)
    result = safe_venv(venv)
    assert result.returncode == 1
    assert result.stderr.startswith(f"refusing the venv (cluster.venv) {venv}: "), result.stderr
    assert named in result.stderr, result.stderr


def test_the_launcher_never_activates_a_venv_another_user_can_change(
        make_node: Callable[..., LocalNode], tmp_path: Path) -> None:
    """A real node launcher (tests/unit/test_registry.py): the activate script another user owns
    is not sourced (the marker it would touch stays absent) and the node's output says why."""
    marker = tmp_path / "activated-by-them"
    venv = fake_venv(tmp_path / "v", marker)
    (tmp_path / "v").chmod(0o755)
    os.chown(venv / "bin" / "activate", NOBODY, NOBODY)
    node = make_node(venv=str(venv))
    node.start()
    [record] = node.wait_for(lambda records: bool(records) and records[0].state == "exited")
    assert record.exit_code == 1
    assert not marker.exists(), "their activate script ran as us"
    log = (node.output_dir / "node_0_output.log").read_text()
    assert f"refusing the venv (cluster.venv) {venv}: {venv}/bin/activate is owned by nobody" \
        in log, log


def test_the_launcher_activates_a_venv_of_ours(make_node: Callable[..., LocalNode],
                                               tmp_path: Path) -> None:
    marker = tmp_path / "activated"
    venv = fake_venv(tmp_path / "v", marker)
    (tmp_path / "v").chmod(0o755)
    node = make_node(venv=str(venv))
    node.start()
    node.wait_for(lambda records: bool(records) and (records[0].steps_done or 0) >= 1)
    assert marker.exists()


def test_diagnose_runs_only_a_py_spy_nobody_else_can_change(base: Path) -> None:
    def program(path: Path, owner: int = 0) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        os.chown(path, owner, owner)
        return str(path)

    theirs = program(base / "theirs" / "py-spy", NOBODY)
    shared = base / "shared"
    writable = program(shared / "py-spy")
    shared.chmod(0o777)
    link = base / "link" / "py-spy"
    link.parent.mkdir()
    link.symlink_to(theirs)
    ours = program(base / "ours" / "py-spy")

    found, refused = find_pyspy([theirs, writable, str(link), ours, "py-spy"])
    assert found == ours
    assert refused == [
        f"{theirs}: not run ({theirs} is owned by uid {NOBODY})",
        f"{writable}: not run ({shared} is writable by other users (mode 777))",
        f"{link}: not run ({theirs} is owned by uid {NOBODY})",
    ]
    assert untrusted_because(ours) is None
    assert find_pyspy([theirs]) == (None, [f"{theirs}: not run ({theirs} is owned by uid "
                                           f"{NOBODY})"])
