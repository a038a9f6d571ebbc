"""tasks/lib/localfs.py: a node's names become files under our directory, or nothing at all."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tasks.lib.localfs import RefusedName, name_problem, regular_file_size, write_beneath


def tree(root: Path) -> dict[str, str]:
    """Every entry under root: its kind and content (or link target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = path.read_text()
    return found


def test_a_plain_name_is_written_in_private_directories(tmp_path):
    root = tmp_path / "run" / "out"
    with write_beneath(root, "torch_profiler/deep/trace.json") as handle:
        handle.write(b"{}")
    assert (root / "torch_profiler" / "deep" / "trace.json").read_bytes() == b"{}"
    for directory in (root, root / "torch_profiler", root / "torch_profiler" / "deep"):
        assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0
    with write_beneath(root, "torch_profiler/deep/trace.json") as handle:
        handle.write(b"[]")  # written again: replaced
    assert (root / "torch_profiler" / "deep" / "trace.json").read_bytes() == b"[]"
    assert sorted(p.name for p in (root / "torch_profiler" / "deep").iterdir()) == ["trace.json"]


def test_a_symlink_planted_at_the_name_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "victim.txt"
    outside.write_text("precious")
    root = tmp_path / "out"
    root.mkdir()
    (root / "summary.json").symlink_to(outside)
    with write_beneath(root, "summary.json") as handle:
        handle.write(b"node data")
    assert outside.read_text() == "precious"
    assert not (root / "summary.json").is_symlink()
    assert (root / "summary.json").read_text() == "node data"


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_directory_component_that_is_no_directory_is_refused(tmp_path, planted):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "out"
    root.mkdir()
    if planted == "symlink":
        (root / "sub").symlink_to(elsewhere)
    else:
        (root / "sub").write_text("a file")
    before = tree(tmp_path)
    with pytest.raises(RefusedName) as refused:
        with write_beneath(root, "sub/evil.txt") as handle:
            handle.write(b"x")
    assert refused.value.why.startswith("cannot be created here")
    assert tree(tmp_path) == before


def test_a_name_that_is_a_directory_here_is_refused_and_nothing_is_left(tmp_path):
    root = tmp_path / "out"
    (root / "taken").mkdir(parents=True)
    with pytest.raises(RefusedName):
        with write_beneath(root, "taken") as handle:
            handle.write(b"x")
    assert tree(root) == {"taken": "dir"}


def test_a_failed_copy_leaves_nothing_behind(tmp_path):
    root = tmp_path / "out"
    with pytest.raises(OSError, match="link dropped"):
        with write_beneath(root, "a/b.txt") as handle:
            handle.write(b"half")
            raise OSError("link dropped")
    assert tree(root) == {"a": "dir"}


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc/passwd", "a\nb", "t\tab",
                                  "", "a//b", "./a", "bad\ufffd"])
def test_names_that_are_no_plain_relative_path_create_nothing(tmp_path, name):
    root = tmp_path / "run" / "out"
    root.mkdir(parents=True)
    assert name_problem(name) is not None
    with pytest.raises(RefusedName) as refused:
        with write_beneath(root, name) as handle:
            handle.write(b"x")
    assert refused.value.shown.isprintable()
    assert tree(tmp_path) == {"run": "dir", "run/out": "dir"}


def test_regular_file_size_never_follows_a_symlink(tmp_path):
    root = tmp_path / "out"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("12345")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text("123")
    (root / "link").symlink_to(tmp_path / "outside" / "f")
    (root / "dlink").symlink_to(tmp_path / "outside")
    assert regular_file_size(root, "d/f") == 5
    assert regular_file_size(root, "link") is None
    assert regular_file_size(root, "dlink/f") is None
    assert regular_file_size(root, "d") is None
    assert regular_file_size(root, "missing") is None
    assert regular_file_size(tmp_path / "no root", "f") is None
