"""One subprocess of a benchmark, its output in a log file, one torch thread (two run side by side
on the 2-core machine); a failure stops the benchmark and names the log."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_logged(cmd: list[str], log: Path) -> float:
    """Seconds the command took."""
    t0 = time.time()
    with log.open("w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t0
