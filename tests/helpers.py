"""Helpers shared by test modules: running `fab`, polling, a fake rank process, clean-up.

    from tests.helpers import FAB, run_fab, wait_until
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

from tests.simcluster import SimCluster
from tests.simcluster.image import repo_root

REPO = repo_root()
# The fab of the interpreter running the tests: the venv may live anywhere.
FAB = str(Path(sys.executable).parent / "fab")
FAB_TIMEOUT_S = 300.0

T = TypeVar("T")


# -- fab ---------------------------------------------------------------------------------------

def fab_env() -> dict[str, str]:
    """This environment without DOCKER_* (fab must reach the nodes' engines, not one named
    here) and with COLUMNS=200 (one table row per line, whatever the terminal)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DOCKER_")}
    env["COLUMNS"] = "200"
    return env


def run_fab(config: str | Path, *args: str, cwd: str | Path = REPO,
            timeout: float = FAB_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`fab -f CONFIG ARGS...` as a user runs it, output captured, stdin closed."""
    return subprocess.run([FAB, "-f", str(config), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=fab_env(), stdin=subprocess.DEVNULL)


# -- polling -----------------------------------------------------------------------------------

def assert_imports_none_of(heavy: tuple[str, ...], code: str) -> None:
    """Run `code` in a fresh interpreter, then fail if it imported any of the `heavy` packages
    (the controller never imports torch; `fab --list` must stay light)."""
    check = (f"{code}\nimport sys\n"
             f"found = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})\n"
             "assert not found, found[:10]\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def wait_until(condition: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Polls until `condition()` is truthy and returns it; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s: {what}")
        time.sleep(interval)


# -- a rank-like process waiting forever in train code -----------------------------------------

FAKE_STEPPER = """\
import os
import time
from pathlib import Path


def wait_for_peers():
    Path(f"ready_rank{os.environ.get('RANK', 'x')}").touch()
    while True:
        time.sleep(0.05)


def train_step():
    wait_for_peers()
"""
# The innermost train frame of a ready fake: the sleep of its wait loop.
FAKE_STEPPER_WAIT_FRAME = "wait_for_peers (train/fake_stepper.py:{})".format(
    FAKE_STEPPER.splitlines().index("        time.sleep(0.05)") + 1)


def fake_stepper_files() -> dict[str, str]:
    """A `train` package (relative paths) whose `python -m train` runs the fake stepper.

    Started in some directory, a fake touches `ready_rank<RANK>` there once it is about to
    enter its wait loop: wait for that file instead of sleeping before freezing it.
    """
    return {
        "train/__init__.py": "",
        "train/fake_stepper.py": FAKE_STEPPER,
        "train/__main__.py": "from train.fake_stepper import train_step\ntrain_step()\n",
    }


def ready_file(rank: int) -> str:
    """The file (relative to its working directory) a fake of `rank` touches when ready."""
    return f"ready_rank{rank}"


# -- clean-up of what the nodes write into a shared checkout -----------------------------------

def remove_node_run_dirs(experiments: Path, workdir: Path = REPO) -> list[Path]:
    """Removes <workdir>/experiments/<run> for every run the controller recorded under
    `experiments` (a test's own tmp dir), when the node side's run.json names that very
    controller run dir: a run of the same id from another test or person stays."""
    removed = []
    for run_dir in sorted(experiments.glob("multinode_*")):
        node_dir = workdir / "experiments" / run_dir.name
        try:
            record = json.loads((node_dir / "run.json").read_text())
        except (OSError, ValueError):
            continue
        if Path(record.get("run_dir", "")) == run_dir:
            shutil.rmtree(node_dir, ignore_errors=True)
            removed.append(node_dir)
    return removed


# -- docker runtime config ---------------------------------------------------------------------

def registry_dir_for(config: Path) -> str:
    """A node registry dir of the config's own (node-private /tmp): clear of other tests' runs."""
    return f"/tmp/gemm-runs-{config.stem}"


def docker_config(cluster: SimCluster, path: Path, image: str | None, **docker: object) -> Path:
    """The cluster's runtime config for the docker tasks: workdir this checkout, image `image`,
    a registry dir of its own, and docker.* keys replaced by `docker`."""
    config = yaml.safe_load(cluster.write_fabric_config().read_text())
    config["docker"]["image"] = image
    config["cluster"]["workdir"] = str(REPO)
    config["cluster"]["registry_dir"] = registry_dir_for(path)
    # The workdir is mounted read-write by the compose file itself: a second mount of the same
    # path would be refused (by render_compose, and by Docker).
    config["docker"]["volumes"] = [volume for volume in config["docker"]["volumes"]
                                   if volume.split(":")[1] != str(REPO)]
    config["docker"].update(docker)
    path.write_text(yaml.safe_dump(config))
    return path


# -- ports -------------------------------------------------------------------------------------

def free_port(cluster: SimCluster, index: int) -> int:
    """A TCP port free on node `index` right now, chosen by its kernel (bind to port 0): unlike
    a random pick it cannot collide with a port in use there."""
    script = ("import socket; s = socket.socket(); s.bind(('', 0)); "
              "print(s.getsockname()[1]); s.close()")
    out = cluster.exec(index, f"{sys.executable} -c \"{script}\"").stdout
    return int(out.strip())
