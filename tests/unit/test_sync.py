"""`fab sync`'s pure parts, with its scripts run by a real sh against temporary directories."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tasks.lib import sync as s
from tasks.lib.probe import SYNC_FILES, SYNC_RECORD, parse_probe_output, probe_script

ODD_NAMES = [
    "plain.py",
    "dir with space/file.txt",
    "-leading-dash",
    "uni/ünï.txt",
    "new\nline.txt",
    "deep/a/b/c.sh",
]


def sh(command: str, data: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], input=data, capture_output=True, check=False)


def make_tree(root: Path, names=ODD_NAMES) -> list[str]:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"content of {name!r}\n".encode())
    (root / "deep/a/b/c.sh").chmod(0o755)
    return sorted(names, key=str.encode)


def test_select_sync_files_excludes_outputs_venvs_and_bookkeeping():
    paths = [
        "a.py",
        "experiments/run/x.json",
        "experiments",
        "out/y",
        ".venv/bin/python",
        "sub/venv/lib/x.py",
        "myenv/pyvenv.cfg",
        "myenv/bin/python",
        ".gemm-sync.json",
        ".gemm-sync-probe-abc-c",
        "src/venv.py",
        "a.py",
        "",
        "b/c.txt",
    ]
    assert s.select_sync_files(paths, ["experiments", "out/"]) == ["a.py", "b/c.txt", "src/venv.py"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "a\0b", ""])
def test_paths_that_escape_the_workdir_are_refused(bad):
    with pytest.raises(s.SyncError):
        s.check_relative(bad)
    with pytest.raises(s.SyncError):
        s.stale_files([bad], [])


def test_tree_hash_matches_the_coreutils_recomputation(tmp_path):
    files = make_tree(tmp_path)
    (tmp_path / SYNC_FILES).write_bytes(s.files_list_bytes(files))
    shell = sh(f"cd {tmp_path} && xargs -0 -r sha256sum -z -- < {SYNC_FILES} | sha256sum")
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split()[0].decode() == s.tree_hash(tmp_path, files)
    before = s.tree_hash(tmp_path, files)
    (tmp_path / "plain.py").write_text("changed\n")
    assert s.tree_hash(tmp_path, files) != before
    assert s.tree_hash(tmp_path, files[1:]) != s.tree_hash(tmp_path, files)


def test_files_list_round_trip():
    assert s.parse_files_list(s.files_list_bytes(["b", "a\nb", "ü"])) == ["a\nb", "b", "ü"]


def _sync_into(source: Path, workdir: Path, files: list[str], previous: list[str]) -> None:
    stale = s.stale_files(previous, files)
    tarball = s.build_tarball(
        source,
        files,
        {
            SYNC_FILES: s.files_list_bytes(files),
            SYNC_RECORD: s.sync_record(
                tree=s.tree_hash(source, files),
                branch="main",
                commit="c" * 40,
                dirty=False,
                files=len(files),
                source="test",
            ),
        },
    )
    result = sh(s.extract_script(str(workdir), "tok", stale), tarball)
    assert result.returncode == 0, result.stdout + result.stderr


def test_extract_writes_the_tree_and_deletes_only_what_sync_wrote(tmp_path):
    source, workdir = tmp_path / "src", tmp_path / "node w'dir"
    files = make_tree(source)
    os.symlink("plain.py", source / "link.py")
    files = sorted(files + ["link.py"], key=str.encode)
    _sync_into(source, workdir, files, [])
    for name in files:
        assert (workdir / name).read_bytes() == (source / name).read_bytes()
    assert os.access(workdir / "deep/a/b/c.sh", os.X_OK)
    assert os.readlink(workdir / "link.py") == "plain.py"
    # The probe recomputes the same hash from what was written: the node counts as synced.
    probe = sh(probe_script("localhost", str(workdir), check_port=False, container=None,
                            venv=None))
    facts = parse_probe_output(0, "n", probe.stdout.decode())
    assert (
        facts.synced and facts.tree_hash == s.tree_hash(source, files) and facts.commit == "c" * 40
    )

    # Next sync: deep/a/b/c.sh gone, a file becomes a directory; node-local files survive.
    (workdir / "experiments").mkdir()
    (workdir / "experiments/result.json").write_text("{}")
    (workdir / "local-notes.txt").write_text("mine")
    (source / "deep/a/b/c.sh").unlink()
    (source / "link.py").unlink()
    (source / "plain.py").unlink()
    (source / "plain.py").mkdir()
    (source / "plain.py/inner.py").write_text("x")
    previous = s.parse_files_list((workdir / SYNC_FILES).read_bytes())
    new_files = sorted(
        [f for f in files if f not in ("deep/a/b/c.sh", "plain.py", "link.py")]
        + ["plain.py/inner.py"],
        key=str.encode,
    )
    _sync_into(source, workdir, new_files, previous)
    assert not (workdir / "deep").exists()  # emptied directories go too
    assert (workdir / "plain.py/inner.py").read_text() == "x" and not (
        workdir / "link.py"
    ).is_symlink()
    assert (workdir / "experiments/result.json").exists() and (workdir / "local-notes.txt").exists()
    assert s.parse_files_list((workdir / SYNC_FILES).read_bytes()) == new_files


def test_failed_extract_exits_non_zero(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    assert sh(s.extract_script(str(blocker / "sub"), "tok", []), b"garbage").returncode != 0


def test_markers_find_shared_workdirs(tmp_path):
    shared, alone, controller = tmp_path / "shared", tmp_path / "alone", tmp_path / "ctl"
    workdirs = {0: alone, 1: shared, 2: shared, 3: controller}
    controller.mkdir()
    (controller / s.marker_name("tok", s.CONTROLLER_MARK)).touch()
    for index, workdir in workdirs.items():
        assert sh(s.mark_script(str(workdir), "tok", index)).returncode == 0
    (shared / SYNC_FILES).write_bytes(s.files_list_bytes(["x", "y z"]))
    seen = {}
    previous = {}
    for index, workdir in workdirs.items():
        result = sh(s.seen_script(str(workdir), "tok", len(workdirs)))
        assert result.returncode == 0
        seen[index], previous[index] = s.parse_seen(result.stdout.decode())
    assert seen[1] == seen[2] == {"1", "2"} and seen[0] == {"0"} and seen[3] == {"c", "3"}
    assert previous[1] == ["x", "y z"] and previous[0] == []
    with_controller, groups = s.filesystem_groups(seen)
    assert with_controller == {3} and groups == {0: [0], 1: [1, 2]}
    # The leader's extract removes every marker of the run from the shared directory.
    assert (
        sh(s.extract_script(str(shared), "tok", []), s.build_tarball(tmp_path, [], {})).returncode
        == 0
    )
    assert not list(shared.glob(s.MARKER_PREFIX + "*"))


def test_a_node_that_misses_its_own_marker_is_its_own_group():
    with_controller, groups = s.filesystem_groups({0: {"0", "1"}, 1: {"0", "1"}, 2: set()})
    assert with_controller == set() and groups == {0: [0, 1], 2: [2]}
