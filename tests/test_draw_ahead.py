"""Draws made ahead (issue #36): the label-classifier phase is drawn ahead too, more than one iteration
can be in flight, and either way the run computes exactly what it computes drawing on demand."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dpaf_ray.config import TrainConfig
from dpaf_ray.privacy.randomness import RunSecret
from dpaf_ray.training import label_teacher
from dpaf_ray.training.draw_ahead import DEPTH_ENV, DrawAhead, DrawPlan, default_max_depth
from dpaf_ray.training.loop import make_trainer


def _run(ahead: bool, iterations: int, max_depth: int = 1, depth: int | None = None):
    from dpaf_ray.data import load_dataset

    data = load_dataset("mnist-5k", "train")
    cfg = TrainConfig(model="dpaf", batch_size=64, group_size=32, feature_channels=8, seed=0, classifier_steps=3,
                      classifier_batch=64, sgd_every=2).validate()
    tr = make_trainer(cfg, data, len(data), 0, None, "cpu", RunSecret.from_public_seed(5))
    tr.draw_ahead = DrawAhead(tr, ahead, max_depth=max_depth)
    if depth is not None:  # as if the draws took `depth` steps: `depth` iterations in flight
        tr.draw_ahead.depth = depth
        tr.draw_ahead._adapt_depth = lambda: None
    hits_by_t = []
    tr.in_flight = 0
    for t in range(iterations):
        tr.in_flight = max(tr.in_flight, len(tr.draw_ahead._pending))
        tr.d_iteration(t)
        if tr.g_step_after(t):
            tr.g_step(t)
        hits_by_t.append(tr.draw_ahead.hits)
    tr.draw_ahead.close()
    return tr, hits_by_t


def _assert_same_parameters(a, b) -> None:
    for k, m in a.modules().items():
        for p, q in zip(m.parameters(), b.modules()[k].parameters()):
            assert torch.equal(p, q), k


def test_the_classifier_phase_is_drawn_ahead_and_draws_the_same():
    on_demand, _ = _run(False, 5)
    ahead, hits = _run(True, 5)
    _assert_same_parameters(on_demand, ahead)
    # iteration 2 is a classifier step: its Poisson sample and its noise came from ahead (iteration 1's
    # noise could not: its size was learnt at iteration 0, after iteration 1 was scheduled)
    assert hits[2] - hits[1] == 2, hits
    assert ahead.draw_plan(0).sample_stream == label_teacher.POISSON_STREAM
    assert ahead.draw_plan(0).noise == [label_teacher.NOISE_RELEASE]


def test_several_iterations_in_flight_draw_the_same():
    on_demand, _ = _run(False, 6)
    deep, hits = _run(True, 6, max_depth=3, depth=3)
    _assert_same_parameters(on_demand, deep)
    assert deep.in_flight == 3 and hits[-1] > 0


class _SlowTrainer:
    """Just enough of a trainer for DrawAhead: public codes only."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.collective = SimpleNamespace(rank=0)
        self.calls: list[int] = []

    def draw_plan(self, t: int) -> DrawPlan:
        return DrawPlan(codes=["z"])

    def host_codes(self, t: int, name: str):
        self.calls.append(t)
        return (torch.tensor([t]),) * 3


def test_depth_follows_draw_time_over_step_time_up_to_the_maximum():
    tr = _SlowTrainer()
    ahead = DrawAhead(tr, True, max_depth=4)
    ahead._timed_compute = ahead._compute  # the times below stand; no measurement overwrites them
    ahead.draws(0)
    assert sorted(ahead._pending) == [1]  # one ahead until there is a measurement
    ahead.draw_seconds, ahead.step_seconds = 2.5, 1.0
    ahead._last = None  # keep the fixed step time
    d = ahead.draws(1)
    assert d.t == 1 and d.codes["z"][0].item() == 1
    assert ahead.depth == 3 and sorted(ahead._pending) == [2, 3, 4]
    ahead.draw_seconds = 100.0
    ahead._last = None
    ahead.draws(2)
    assert ahead.depth == 4 and sorted(ahead._pending) == [3, 4, 5, 6]
    for t in range(3, 7):
        ahead._last = None
        assert ahead.draws(t).codes["z"][0].item() == t  # each iteration gets its own draws
    ahead.close()
    assert set(range(1, 7)) <= set(tr.calls) and len(tr.calls) == len(set(tr.calls))  # each drawn once


def test_a_restart_discards_draws_made_for_other_iterations():
    tr = _SlowTrainer()
    ahead = DrawAhead(tr, True, max_depth=2)
    ahead.draws(0)
    ahead.draws(10)  # a resumed run: iteration 1's draws are never used
    assert 1 not in ahead._pending and ahead._current.t == 10 and not ahead._current.codes
    ahead.close()


def test_depth_setting_is_checked(monkeypatch):
    monkeypatch.setenv(DEPTH_ENV, "0")
    with pytest.raises(ValueError, match=DEPTH_ENV):
        default_max_depth()
    monkeypatch.setenv(DEPTH_ENV, "2")
    assert default_max_depth() == 2
