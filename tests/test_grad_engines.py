"""`grad_engine="opacus"` with DPAF's label-classifier phase (issue #36): G's steps pass through the
frozen classifier, whose module still carries Opacus' hooks; they must not break those steps, and
the per-record gradients must still be the ones functorch computes."""
from __future__ import annotations

import torch

from dpaf_ray.config import TrainConfig
from dpaf_ray.privacy.randomness import RunSecret
from dpaf_ray.training.label_teacher import record_loss
from dpaf_ray.training.loop import make_trainer


def _trainer(engine: str):
    from dpaf_ray.data import load_dataset

    data = load_dataset("mnist-5k", "train")
    cfg = TrainConfig(model="dpaf", batch_size=64, group_size=32, feature_channels=8, seed=0, classifier_steps=2,
                      classifier_batch=64, grad_engine=engine).validate()
    return make_trainer(cfg, data, len(data), 0, None, "cpu", RunSecret.from_public_seed(5)), data


def test_opacus_runs_the_classifier_phase_and_the_generator_steps_after_it():
    tr, data = _trainer("opacus")
    for t in range(4):  # two classifier steps, then DPAF iterations with G steps through the frozen classifier
        tr.d_iteration(t)
        if tr.g_step_after(t):
            tr.g_step(t)
    assert all(torch.isfinite(p).all() for p in tr.generator.parameters())
    # after all that, the classifier's per-record gradients (its own Opacus wrapper) are still functorch's
    ref, _ = _trainer("functorch")
    ref.teacher.model.load_state_dict(tr.teacher.model.state_dict())
    for m in (ref.teacher.model, tr.teacher.model):
        m.requires_grad_(True)
    x, y = data.as_float(torch.arange(12)), data.labels[:12]
    o = tr.teacher.per_record((x,), record_loss, (y,))
    f = ref.teacher.per_record((x,), record_loss, (y,))
    assert len(o) == len(f) > 0
    for go, gf in zip(o, f):
        torch.testing.assert_close(go, gf, atol=1e-4, rtol=1e-4)
