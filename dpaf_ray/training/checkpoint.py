"""Where training state goes: a local directory, or Ray Train checkpoints.

A checkpoint holds models, optimisers, the iteration and the ledger; the ledger is
also written as JSON beside it (docs/design.md rule 11).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from ..run_dir import private_dir, private_file, write_private_text

STATE_FILE = "state.pt"
LEDGER_FILE = "ledger.json"


class CheckpointSink(Protocol):
    def latest(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any], metrics: dict[str, Any]) -> None: ...

    def report(self, metrics: dict[str, Any]) -> None: ...


def write_checkpoint_dir(directory: Path, state: dict[str, Any]) -> None:
    """The state holds the run secret: a 0700 folder, 0600 files, each replaced atomically (rule 18)."""
    private_dir(directory)
    with private_file(directory / STATE_FILE) as f:
        torch.save(state, f)
    write_private_text(directory / LEDGER_FILE, json.dumps(state["ledger"], indent=1))


def read_checkpoint_dir(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class LocalCheckpointSink:
    """`OUT/checkpoint/`: replaced atomically, so an interrupted save keeps the previous one."""

    def __init__(self, out_dir: str | Path, resume: bool = True) -> None:
        self.dir = Path(out_dir) / "checkpoint"
        self.resume = resume

    def latest(self) -> dict[str, Any] | None:
        return read_checkpoint_dir(self.dir) if self.resume else None

    def save(self, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        write_checkpoint_dir(self.dir, state)

    def report(self, metrics: dict[str, Any]) -> None:
        pass


class RayTrainCheckpointSink:
    """Ray Train: every rank calls `ray.train.report`; only rank 0 attaches the checkpoint."""

    def __init__(self, rank: int, defaults: dict[str, Any] | None = None) -> None:
        self.rank = rank
        # Keys every report must carry (e.g. Tune's metric, NaN until the trial is scored).
        self.defaults = defaults or {}

    def latest(self) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return read_checkpoint_dir(Path(d))

    def save(self, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                write_checkpoint_dir(Path(d), state)
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report({**self.defaults, **metrics}, checkpoint=checkpoint)

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report({**self.defaults, **metrics})


def cpu_state(obj: Any) -> Any:
    """Tensors to CPU so a checkpoint written on GPU restores anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_state(v) for v in obj]
    return obj

