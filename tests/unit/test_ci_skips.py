"""Under CI=true a skipped test fails the session (tests/conftest.py): CI has every capability,
so a skip there can only hide breakage. Checked by running pytest on a two-test file that skips."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SKIPPING_TESTS = '''
import pytest

@pytest.mark.cluster
def test_needs_namespaces():
    pytest.skip("no network namespaces here")

def test_runs():
    assert True
'''


@pytest.mark.parametrize("ci, code", [("true", 1), ("", 0)])
def test_a_skip_fails_the_session_only_under_ci(tmp_path: Path, ci: str, code: int) -> None:
    # The project's own hooks, not a copy: the throwaway conftest imports them.
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_logreport, pytest_sessionfinish  # noqa\n")
    (tmp_path / "test_skipping.py").write_text(SKIPPING_TESTS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": ci}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed, 1 skipped" in done.stdout
    assert ("CI=true but 1 test(s) were skipped: test_skipping.py::test_needs_namespaces"
            in done.stdout) is (ci == "true")
