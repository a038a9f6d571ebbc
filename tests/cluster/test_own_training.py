"""Running a training of the user's own with `fab launch`, as a new user would.

- The embedded default (this machine alone) on a checkout that is no git repository (an unpacked
  release archive): `fab check` passes and `fab launch` runs, since the only node's checkout is
  this one.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO

FAB = str(Path(sys.executable).parent / "fab")
FAST = ["--override", "training.max_steps=4", "--override", "calibration.compute_steps=1",
        "--override", "calibration.comm_steps=1"]


def unpacked_copy(dest: Path) -> Path:
    """This checkout's files (tracked and untracked-not-ignored) without .git, as a release
    archive unpacks."""
    listing = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard",
                              "-z"], capture_output=True, check=True).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


def fab_here(cwd: Path, config: Path, *args: str, timeout: float = 180):
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("CHANNELS", "THREADS", "NPROC_PER_NODE", "CONFIG_FILE", "MASTER_PORT")
           and not k.startswith(("SLURM_", "DOCKER_"))}
    env["COLUMNS"] = "250"
    return subprocess.run([FAB, "-f", str(config), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_embedded_default_runs_a_checkout_that_is_no_git_repository(tmp_path):
    checkout = unpacked_copy(tmp_path / "release")
    assert not (checkout / ".git").exists()
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump({"cluster": {
        "hosts_file": str(tmp_path / "no_hosts.txt"), "experiments_dir": str(tmp_path / "exp")}}))
    check = fab_here(checkout, config, "check", timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "neither a git checkout" not in check.stdout + check.stderr
    assert "this one (no git)" in check.stdout
    result = fab_here(checkout, config, "launch", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    (run_dir,) = (tmp_path / "exp").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded"
    assert record["nodes"][0]["commit"] is None  # no git: nothing recorded, nothing compared
