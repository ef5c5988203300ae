"""Per-record gradients, through `torch.func` (vmap ∘ grad) or Opacus' GradSampleModule.

Both compute, for a module f with trainable parameters θ and a per-record loss
ℓ_i = record_loss(f(x_i), extras_i), the stack of ∇_θ ℓ_i. Which is faster is measured
in `bench/step_time.py`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

RecordLoss = Callable[..., torch.Tensor]  # (outputs of one record batch, *extras) -> per-record losses (n,)


class PerRecordGradients:
    def __init__(self, module: nn.Module, engine: str = "functorch") -> None:
        self.module = module
        self.engine = engine
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._gsm = None
        if engine == "opacus":
            from opacus import GradSampleModule

            self._gsm = GradSampleModule(module, batch_first=True, loss_reduction="sum", strict=False)
            # Its hooks run only inside `_opacus`: every other pass through the module (generated
            # records, a G step through the frozen label classifier) is an ordinary autograd pass.
            # Left on, a backward pass through a frozen module finds no activations (IndexError).
            self._gsm.disable_hooks()
        elif engine != "functorch":
            raise ValueError(f"unknown per-record gradient engine {engine!r}; use 'functorch' or 'opacus'")

    def __call__(self, inputs: Sequence[torch.Tensor], record_loss: RecordLoss,
                 extras: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Gradients of each record's loss: one tensor (n, *p.shape) per trainable parameter."""
        n = inputs[0].shape[0]
        if n == 0:
            return [torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        if self.engine == "functorch":
            return self._functorch(inputs, record_loss, extras)
        return self._opacus(inputs, record_loss, extras)

    def _functorch(self, inputs, record_loss, extras):
        params = {k: p.detach() for k, p in zip(self.names, self.params)}
        buffers = {k: b for k, b in self.module.named_buffers()}
        frozen = {k: p.detach() for k, p in self.module.named_parameters() if not p.requires_grad}

        def one(params, *args):
            k = len(inputs)
            batch = [a.unsqueeze(0) for a in args[:k]]
            ex = [a.unsqueeze(0) for a in args[k:]]
            out = functional_call(self.module, {**params, **frozen, **buffers}, tuple(batch))
            return record_loss(out, *ex).sum()

        g = vmap(grad(one), in_dims=(None,) + (0,) * (len(inputs) + len(extras)))(params, *inputs, *extras)
        return [g[k] for k in self.names]

    def _opacus(self, inputs, record_loss, extras):
        gsm = self._gsm
        for p in self.params:
            p.grad_sample = None
            p.grad = None
        gsm.enable_hooks()
        try:
            out = gsm(*inputs)
            record_loss(out, *extras).sum().backward()
        finally:
            gsm.disable_hooks()
        # A parameter the loss does not reach (the head of `PrivateFeatures`) has per-record gradient 0, as torch.func gives it.
        n = inputs[0].shape[0]
        grads = [p.grad_sample.detach().clone() if p.grad_sample is not None else p.new_zeros((n, *p.shape))
                 for p in self.params]
        for p in self.params:
            p.grad_sample = None
            p.grad = None
        return grads
