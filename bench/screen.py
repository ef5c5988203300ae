"""One row of a post-processing screen (issue #13): the evaluate command's downstream accuracy and
diversity ratio of a synthetic set (no FID, to save time), printed and appended as JSON."""
from __future__ import annotations

import json
import time

from dpaf_ray.evaluation.diversity import diversity_ratio
from dpaf_ray.evaluation.downstream import downstream_accuracy


def score_and_log(synthetic, test, train, started: float, out: str | None, **fields) -> dict:
    row = {**fields, "downstream_accuracy": downstream_accuracy(synthetic, test),
           "diversity_ratio": diversity_ratio(synthetic, train), "seconds": round(time.time() - started)}
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row
