"""Session hooks for the whole suite.

Several slow tests start and stop Ray inside the pytest process (`ray.init` / `ray.shutdown`,
`ray.cluster_utils.Cluster`, an in-process Tune search). After such cycles, Ray's core worker can
crash the interpreter while it finalizes: objects and background threads left from an earlier
session touch structures that `ray.shutdown` already freed (ray-project/ray#31145). Stop 31's CI
run ended that way: `659 passed`, then `Segmentation fault` (exit 139), so a green suite read as a
failure. By the time `pytest_unconfigure` runs, every test has run and the summary is printed, so
once Ray has been imported the process leaves with pytest's own exit status and skips the
interpreter's finalization. A failing test still fails the run (tests/test_session_exit.py).
Set DPAF_TEST_FINALIZE=1 to finalize normally (e.g. to look for such a crash).
"""

from __future__ import annotations

import os
import sys

import pytest

_exit_status: int | None = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _exit_status is None or "ray" not in sys.modules or os.environ.get("DPAF_TEST_FINALIZE") == "1":
        return
    ray = sys.modules["ray"]
    if ray.is_initialized():
        ray.shutdown()  # a test that left Ray running still has its processes stopped
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
