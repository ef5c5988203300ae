#!/usr/bin/env python3
"""Check what the Ray dashboard shows of a submitted search, through the HTTP API its pages read.

    python clusters/local/check_dashboard.py [--job SUBMISSION_ID] [--address http://127.0.0.1:8265]

Run it against the head started by `clusters/local/start_head.sh`, after (or while) a search
submitted with `clusters/local/submit.sh` runs. It stands in for a screenshot test: the Jobs page,
the Actors page and Train's state API read the same endpoints. It checks that

* the job's log (Jobs page) has per-trial progress lines with ε executed, each printed once;
* every trial named in those lines has an actor whose repr is `dpaf_trial[<trial>]` (Actors page);
* the failed tasks are the normal ones (Tune's `_QueueActor.get*` polling), listing any others;
* the Train runs endpoint (`/api/train/v2/runs/v1`) answers.

It reads only; exit 1 when a check fails or an endpoint answers an HTTP error. Standard library only, so it runs outside the venv too.
The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

PROGRESS = re.compile(r"(dpaf_trial_[0-9a-f]+)(?:-train)?: iter (\d+)/(\d+) \| ε executed ([0-9.]+)")
ACTOR = re.compile(r"^dpaf_trial\[(dpaf_trial_[0-9a-f]+)\]$")
NORMAL_FAILED_TASKS = ("_QueueActor.get", "_QueueActor.get_nowait")
TRAIN_RUNS = "/api/train/v2/runs/v1"  # Train V2 runs in Ray 2.60


def _token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


def _default_address() -> str:
    head_env = Path(os.environ.get("DPAF_RAY_STATE_DIR", f"/tmp/dpaf-ray-{os.getuid()}")) / "head.env"
    if not os.environ.get("RAY_API_SERVER_ADDRESS") and head_env.is_file():
        for line in head_env.read_text().splitlines():
            if line.startswith("RAY_API_SERVER_ADDRESS="):
                return line.split("=", 1)[1].strip()
    return os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")


class Dashboard:
    def __init__(self, address: str, token: str | None):
        self.address = address.rstrip("/")
        self.token = token

    def get(self, path: str, **params: object) -> object:
        url = self.address + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        req = urllib.request.Request(url)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            hint = " (no or wrong token: see RAY_AUTH_TOKEN_PATH)" if e.code in (401, 403) else ""
            raise SystemExit(f"error: GET {url} answered {e.code}{hint}") from None
        except urllib.error.URLError as e:
            raise SystemExit(f"error: cannot reach the dashboard at {self.address} ({e.reason}); "
                             "start a head with clusters/local/start_head.sh or pass --address") from None

    def state(self, resource: str, **params: object) -> list[dict]:
        """The state API (`/api/v0/...`): the Actors and Tasks pages read it."""
        body = self.get(f"/api/v0/{resource}", limit=10000, detail=1, **params)
        data = body.get("data", {}).get("result", {}) if isinstance(body, dict) else {}
        return list(data.get("result", []) if isinstance(data, dict) else data)


def check(dash: Dashboard, job: str | None) -> list[str]:
    problems: list[str] = []
    jobs = dash.get("/api/jobs/")
    jobs = [j for j in jobs if j.get("submission_id")] if isinstance(jobs, list) else []
    if not jobs:
        return ["no submitted job on this head: submit one with clusters/local/submit.sh"]
    chosen = next((j for j in jobs if j["submission_id"] == job), None) if job else \
        max(jobs, key=lambda j: j.get("start_time") or 0)
    if chosen is None:
        return [f"no job {job!r}; jobs: {', '.join(j['submission_id'] for j in jobs)}"]
    sid = chosen["submission_id"]
    print(f"job {sid}: {chosen.get('status')}  ({' '.join(str(chosen.get('entrypoint', '')).split()[:6])} ...)")

    logs = dash.get(f"/api/jobs/{sid}/logs").get("logs", "")
    lines = [m.group(0) for m in PROGRESS.finditer(logs)]
    trials = sorted({m.group(1) for m in PROGRESS.finditer(logs)})
    doubled = [ln for ln, n in Counter(lines).items() if n > 1]
    print(f"Jobs page log: {len(lines)} progress lines from {len(trials)} trial(s), {len(doubled)} printed twice")
    for m in list(PROGRESS.finditer(logs))[-3:]:
        print(f"  {m.group(0)}")
    if not lines:
        problems.append("the job's log has no per-trial progress line (`<trial>: iter t/T | ε executed ...`)")
    if doubled:
        problems.append(f"{len(doubled)} progress lines printed more than once, e.g. {doubled[0]!r}")

    actors = dash.state("actors")
    # Tune's trial actors are unnamed; the trial name is their repr (the Actors page's "Repr" column,
    # and the prefix of their log lines), which the state API returns as `repr_name`
    named = {m.group(1): a.get("state") for a in actors
             for field in ("repr_name", "name") if (m := ACTOR.match(str(a.get(field) or "")))}
    kinds = Counter(str(a.get("class_name")) for a in actors)
    print(f"Actors page: {len(actors)} actors; trial actors: "
          + (", ".join(f"dpaf_trial[{t}] ({s})" for t, s in sorted(named.items())) or "none"))
    print("  by class: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    missing = [t for t in trials if t not in named]
    if missing:
        problems.append(f"trials without an actor named after them: {', '.join(missing)}")
    if not named:
        problems.append("no actor named dpaf_trial[...]: the dashboard cannot tell the trials apart")

    failed = Counter(str(t.get("name")) for t in dash.state("tasks", filter_keys="state",
                                                                filter_predicates="=", filter_values="FAILED"))
    normal = sum(n for name, n in failed.items() if name in NORMAL_FAILED_TASKS)
    other = {name: n for name, n in failed.items() if name not in NORMAL_FAILED_TASKS}
    print(f"failed tasks: {normal} normal (Tune polling its result queue: {', '.join(NORMAL_FAILED_TASKS)})"
          + (f"; others: {other}" if other else "; no others"))
    if other and chosen.get("status") == "SUCCEEDED":
        problems.append(f"failed tasks other than Tune's queue polling in a job that succeeded: {other}")

    # Ray 2.60 serves Train V2 runs (what TorchTrainer builds by default) at /api/train/v2/runs/v1;
    # /api/train/v2/runs is the Train V1 API and answers 500 for them (dashboard/modules/train/train_head.py).
    try:
        runs = dash.get(TRAIN_RUNS)
        names = [r.get("name") for r in (runs.get("train_runs") or [])] if isinstance(runs, dict) else []
        print(f"Train runs ({TRAIN_RUNS}): {len(names)} " + (f"e.g. {names[0]}" if names else ""))
    except SystemExit as e:
        problems.append(f"the Train runs endpoint failed: {e}; it needs RAY_TRAIN_ENABLE_STATE_TRACKING=1 where "
                        "the trainer is built (clusters/runtime_env.yaml sets it)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=_default_address(), help="dashboard URL (default: the recipe head's)")
    ap.add_argument("--job", default=None, help="submission id (default: the latest job)")
    args = ap.parse_args()
    problems = check(Dashboard(args.address, _token()), args.job)
    for p in problems:
        print(f"FAIL: {p}")
    print("dashboard check: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
