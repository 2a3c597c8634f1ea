"""Test helper: record every DP-SGD step of a Linear module (inputs, parameters, per-sample
gradients as Opacus saw them, and the clipped sum it accumulated)."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn


def record_dp_steps(module: nn.Linear, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Hook ``module`` and Opacus' ``DPOptimizer``; returns the list each step is appended to.

    Each entry holds ``x`` (the batch), ``w`` and ``b`` (the parameters it was computed with),
    ``samples`` (the per-sample gradients before clipping) and ``summed`` (the clipped sum).
    """
    steps: list[dict[str, object]] = []

    def forward_hook(layer: nn.Module, args: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        steps.append(
            {"x": args[0].detach().clone(), "w": layer.weight.detach().clone(), "b": layer.bias.detach().clone()}
        )

    original = DPOptimizer.clip_and_accumulate

    def recording(self: DPOptimizer) -> None:
        steps[-1]["samples"] = [g.detach().clone() for g in self.grad_samples]
        original(self)
        steps[-1]["summed"] = [p.summed_grad.detach().clone() for p in self.params]

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", recording)
    module.register_forward_hook(forward_hook)
    return steps
