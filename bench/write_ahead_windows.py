"""The cost of short write-ahead windows (issue #38): the same short run with the default windows
(1, 1, 2, 4, ... up to 5 % of T, each charged to ledger.json and checkpointed before it runs) and
with one window of --checkpoint-every 500 (the old default), side by side.

    python bench/write_ahead_windows.py [--iterations 200] [--threads 1] [--dataset mnist-5k]

Prints, per variant: windows (= ledger commits and checkpoints), seconds spent in them, the
checkpoint's bytes, and the training time; then the ratio of the training times.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dpaf_ray.config import TrainConfig
from dpaf_ray.run import train_private
from dpaf_ray.training import loop


def run(iterations: int, threads: int, dataset: str, every: int | None) -> dict[str, float]:
    spent = {"saves": 0, "save_s": 0.0, "commits": 0, "commit_s": 0.0}
    save, commit = loop.save, loop.WriteAheadLedger.commit

    def timed_save(*a, **k):
        t = time.perf_counter()
        save(*a, **k)
        spent["saves"] += 1
        spent["save_s"] += time.perf_counter() - t

    def timed_commit(self, ledger):
        t = time.perf_counter()
        commit(self, ledger)
        spent["commits"] += 1
        spent["commit_s"] += time.perf_counter() - t

    loop.save, loop.WriteAheadLedger.commit = timed_save, timed_commit
    try:
        with tempfile.TemporaryDirectory() as d:
            cfg = TrainConfig(dataset=dataset, epsilon=10, iterations=iterations, seed=0, num_threads=threads,
                              checkpoint_every=every, log_every=10 ** 6)
            result, _ = train_private(cfg, d, progress=None)
            state = Path(d) / "checkpoint" / "state.pt"
            return {**spent, "train_s": result.seconds, "checkpoint_bytes": state.stat().st_size,
                    "ledger_bytes": (Path(d) / "ledger.json").stat().st_size}
    finally:
        loop.save, loop.WriteAheadLedger.commit = save, commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default="mnist-5k")
    args = ap.parse_args()
    rows = {}
    for name, every in (("short windows (default)", None), ("--checkpoint-every 500", 500)):
        r = rows[name] = run(args.iterations, args.threads, args.dataset, every)
        print(f"{name}: {r['commits']} ledger commits ({r['commit_s']:.2f} s), {r['saves']} checkpoints "
              f"({r['save_s']:.2f} s, {r['checkpoint_bytes'] / 1e6:.1f} MB each, overwritten), "
              f"ledger.json {r['ledger_bytes']} B; training {r['train_s']:.1f} s")
    short, long = rows["short windows (default)"], rows["--checkpoint-every 500"]
    print(f"ratio of training times (short / one window): {short['train_s'] / long['train_s']:.3f}; "
          f"extra seconds in saves and commits: {short['save_s'] + short['commit_s'] - long['save_s'] - long['commit_s']:.2f}")


if __name__ == "__main__":
    main()
