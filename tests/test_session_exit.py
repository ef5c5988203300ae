"""The suite's exit hook (tests/conftest.py) must not change what a run reports: a failing test
still exits 1, a passing run exits 0, and the summary line still reaches the console."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

_TEST = """
import ray  # the hook acts only once Ray is imported


def test_one():
    assert {ok}
"""


@pytest.mark.parametrize("ok, status", [(True, 0), (False, 1)])
def test_exit_status_and_summary_survive_the_hard_exit(tmp_path, ok, status):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(_TEST.format(ok=ok))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == status, r.stdout[-2000:] + r.stderr[-2000:]
    assert ("1 passed" if ok else "1 failed") in r.stdout
