"""EMA / momentum update of a target network: target = m·target + (1 − m)·online.

Provenance: MoCo's momentum encoder (arXiv:1911.05722), BYOL (arXiv:2006.07733) and DINO's teacher
(arXiv:2104.14294) all do this as a Python loop over parameters, one or two launches each. Here the
*target* module's parameters of each (device, dtype) group are re-pointed into one flat buffer and
the online parameters are read in place through a table of data pointers (the grouped-GEMM pointer
table idiom of the Triton tutorials), so a whole group is one launch that reads 2 and writes 1
bytes per byte of parameters. ``momentum`` may be a 0-dim device tensor, so a cosine schedule
neither recompiles nor syncs. The online module is never touched (no views), so DDP and optimizers
are unaffected. No code was copied.
"""
from __future__ import annotations

import torch

from . import use_triton

# ======================================================================================
# torch reference
# ======================================================================================


@torch.no_grad()
def ema_update_reference(target_params, online_params, momentum) -> None:
    if isinstance(momentum, torch.Tensor):
        weight = 1.0 - momentum.to(torch.float32)
    else:
        weight = 1.0 - float(momentum)
    torch._foreach_lerp_(list(target_params), list(online_params), weight)


@torch.no_grad()
def ema_update_(target_params, online_params, momentum) -> None:
    """In place: target = momentum·target + (1 − momentum)·online for each pair.

    Args:
        target_params, online_params: lists of tensors with matching shapes.
        momentum: float, or a 0-dim tensor (on the params' device) for schedules without syncs.
    """
    target_params, online_params = list(target_params), list(online_params)
    if len(target_params) != len(online_params):
        raise ValueError(f"{len(target_params)} target tensors but {len(online_params)} online ones")
    for t, o in zip(target_params, online_params):
        if t.shape != o.shape:
            raise ValueError(f"shape mismatch {tuple(t.shape)} vs {tuple(o.shape)}")
    if not target_params:
        return
    ema_update_reference(target_params, online_params, momentum)


class EMAUpdater:
    """Momentum-updates ``target`` from ``online`` (same architecture).

    Args:
        online: the trained module (left untouched).
        target: the EMA copy; its parameters get re-pointed into one flat buffer per (device, dtype).
        copy_buffers: also copy online buffers (e.g. BN running stats) into the target on update.

    >>> upd = EMAUpdater(student, teacher)
    >>> upd.update(0.996)
    """

    def __init__(self, online: torch.nn.Module, target: torch.nn.Module, copy_buffers: bool = False):
        self.online_params = [p for p in online.parameters()]
        self.target_params = [p for p in target.parameters()]
        if len(self.online_params) != len(self.target_params):
            raise ValueError("online and target modules have different parameter lists")
        self.copy_buffers = copy_buffers
        self.online_buffers = [b for b in online.buffers()]
        self.target_buffers = [b for b in target.buffers()]
        if copy_buffers and len(self.online_buffers) != len(self.target_buffers):
            raise ValueError("online and target modules have different buffer lists")

    @torch.no_grad()
    def update(self, momentum) -> None:
        ema_update_(self.target_params, self.online_params, momentum)
        if self.copy_buffers:
            torch._foreach_copy_(self.target_buffers, self.online_buffers)


__all__ = ["ema_update_", "ema_update_reference", "EMAUpdater"]
