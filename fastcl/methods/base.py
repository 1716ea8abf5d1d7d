"""The contract between a method and the engine.

A method is one ``nn.Module`` that owns its networks, its loss and its state (queues, centers, momentum
encoders as buffers/submodules, so they are checkpointed with it). The engine calls, per step:

    out = method(views, step)           # dict with "loss" (scalar) and any extra scalars to log
    loss.backward()
    method.before_optimizer_step(step)  # e.g. freeze DINO's last layer / SwAV prototypes early on
    optimizer.step()
    method.after_optimizer_step(step)   # e.g. EMA of the momentum encoder

``step`` carries the global step, the epoch and this step's value of every schedule the method asked
for in ``schedules()`` (momentum, temperature, ...), precomputed by the engine as arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn


@dataclass
class Step:
    step: int  # global optimizer step, 0-based
    epoch: int
    steps_per_epoch: int
    total_steps: int
    values: dict[str, float] = field(default_factory=dict)  # scheduled values at this step
    indices: torch.Tensor | None = None  # dataset indices of the batch, for methods with needs_indices

    def __getitem__(self, name: str) -> float:
        return self.values[name]


class Method(nn.Module):
    """Base class: subclasses set ``self.backbone`` (used for kNN / export) and implement ``forward``."""

    backbone: nn.Module
    needs_indices: bool = False  # True: the engine puts the batch's dataset indices in step.indices
    decay_bias_and_norm: bool = False  # True: weight decay on every parameter (the official code's plain SGD)
    # a recipe's own lr, (epochs, steps_per_epoch) -> per-step array, replacing the engine's cosine (the step
    # schedules of MoCo v1, InstDisc, InvaSpread and CMC); None: the engine's
    lr_schedule = None

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Per-step schedules (length epochs*steps_per_epoch) this method reads from ``step.values``."""
        return {}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups; default: everything trainable, no decay / no LARS on biases and norms
        (SimCLR, BYOL, DINO), or decay on all of them with ``decay_bias_and_norm`` (MoCo, InstDisc, ...).
        A group may set ``fixed_lr=True`` to keep its base lr (SimSiam's predictor)."""
        from ..engine.optim import param_groups  # (the engine imports this module: no top-level import)

        return param_groups(self, weight_decay, exclude_bias_and_norm=not self.decay_bias_and_norm)

    def skippable_parameters(self) -> list[nn.Parameter]:
        """Parameters whose update ``before_optimizer_step`` may skip by setting their ``grad`` to None (DINO's
        last layer, SwAV's prototypes while frozen). Under ZeRO they get optimizer groups of their own, so that a
        skip leaves whole flat shards untouched (``fastcl.engine.zero``); elsewhere this changes nothing."""
        return []

    def before_optimizer_step(self, step: Step) -> None:
        pass

    def after_optimizer_step(self, step: Step) -> None:
        pass
