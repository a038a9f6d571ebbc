"""The command surface as a new user meets it: tables without a terminal, a reader that goes
away (`fab --list | head -1`), and `fab check` judging the embedded default as `fab launch` runs
it. Real `fab` runs (subprocess) where the behaviour is the process's."""
from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import pytest
from rich.table import Table

from tasks.lib.console import NO_TERMINAL_WIDTH, make_console
from tests.helpers import FAB, REPO, fab_env
from tests.unit.report_fixtures import make_run

LONG_RUN_ID = "multinode_28ch_256th_20250101_120000_a1b2c3"


def fab(*args: str, cwd: Path = REPO, stdout=subprocess.PIPE, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FAB, *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, env=env or fab_env(),
                          stdin=subprocess.DEVNULL)


# -- tables without a terminal ---------------------------------------------------------------------


def test_without_a_terminal_tables_print_every_value_in_full(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # what rich would otherwise fit the table into
    out = io.StringIO()
    table = Table()
    for column in ("host", "run", "node", "state", "exit", "steps", "procs", "started"):
        table.add_column(column)
    table.add_row("user@gpu-node-017.cluster.example.org:2222", LONG_RUN_ID, "0", "running",
                  "-", "1234", "8", "01-01 12:00:00")
    make_console(file=out).print(table)
    lines = out.getvalue().splitlines()
    row = next(line for line in lines if "running" in line)
    for value in ("user@gpu-node-017.cluster.example.org:2222", LONG_RUN_ID, "1234",
                  "01-01 12:00:00"):
        assert value in row
    assert "…" not in out.getvalue() and len(lines) == 5  # top, header, rule, the row, bottom


def test_a_terminal_keeps_its_width():
    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as terminal:
            assert make_console(file=terminal).width != NO_TERMINAL_WIDTH
        assert make_console(file=io.StringIO()).width == NO_TERMINAL_WIDTH
    finally:
        os.close(primary)
        os.close(secondary)


def test_fab_report_piped_under_a_narrow_columns_prints_full_values(tmp_path):
    run_dir = make_run(tmp_path, 28, 256, status="failed")
    env = {**fab_env(), "COLUMNS": "60"}
    result = fab("report", str(run_dir), "--no-plots", env=env)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "failed" in line and "256" in line)
    # The interval's half-width stands where p90 was: a failed run has none.
    assert row.split() == ["28", "256", "2/4", "failed", "6", "100.25", "-", "1.5", "5.0",
                           "%", "10.0", "%", "10"]
    assert "…" not in result.stdout


# -- a reader that goes away -----------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--list"],                           # Invoke's own print()
    ["--help", "launch"],
    ["sync"],                             # print() buffered until the interpreter's exit
    ["report", "{run}", "--no-plots"],    # rich's Console
    ["check"],                            # rich, inside a ClusterSession (the embedded default)
], ids=["list", "help", "sync", "report", "check"])
def test_a_closed_stdout_ends_fab_as_sigpipe_without_a_traceback(tmp_path, args):
    run_dir = make_run(tmp_path, 28, 256)
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before fab writes a byte: every write fails
    try:
        result = fab(*[a.format(run=run_dir) for a in args], stdout=writer)
    finally:
        os.close(writer)
    assert result.returncode == -signal.SIGPIPE, result.stderr
    assert result.stderr == ""


# -- check judges the plan launch runs -------------------------------------------------------------


def test_check_on_the_embedded_default_judges_docker_as_launch_runs_it(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("fabfile.py", "tasks", "train", "config", "templates"):
        (project / name).symlink_to(REPO / name)
    # No inventory anywhere: this machine alone, with docker.enabled at its default (true) and
    # an engine that cannot be reached.
    (project / "fabric.yaml").write_text(f"cluster:\n  hosts_file: {tmp_path}/no_hosts_file\n")
    env = {key: value for key, value in fab_env().items() if key != "SLURM_JOB_NODELIST"}
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    launch = fab("launch", "--dry-run", cwd=project, env=env)
    assert launch.returncode == 0, launch.stderr
    assert "docker: off" in launch.stdout
    check = fab("check", cwd=project, env=env)
    output = check.stdout + check.stderr
    assert "from local" in output
    assert "Docker" not in output, output
    row = next(line for line in check.stdout.splitlines() if line.startswith("│ 0 "))
    assert "│ off " in row
