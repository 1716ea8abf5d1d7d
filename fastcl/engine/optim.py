"""Optimizers (torch-native foreach/fused; LARS written here) and per-step schedules.

Every schedule is precomputed as an array of length epochs x iters_per_epoch and indexed by the global
step (as in dino utils.cosine_scheduler), so the hot loop holds no schedule logic.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: float = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then half-cosine from ``base`` to ``final``."""
    total = epochs * iters_per_epoch
    warmup = min(int(round(warmup_epochs * iters_per_epoch)), total)
    warm = np.linspace(warmup_start, base, warmup, endpoint=False) if warmup else np.zeros(0)
    t = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t / max(len(t), 1)))
    out = np.concatenate([warm, cos])
    assert len(out) == total
    return out


def step_schedule(peak: float, epochs: int, iters_per_epoch: int, milestones=(0.6, 0.8),
                  gamma: float = 0.1) -> np.ndarray:
    """Per-step lr of the step schedules (MoCo v1, InstDisc, InvaSpread, CMC): ``peak`` times ``gamma`` for
    every milestone (a fraction of training) passed."""
    t = np.arange(epochs * iters_per_epoch) / (epochs * iters_per_epoch)
    return peak * gamma ** np.searchsorted(np.asarray(sorted(milestones)), t, side="right")


def param_groups(model: nn.Module, weight_decay: float, *, exclude_bias_and_norm: bool = True,
                 **group_kw) -> list[dict]:
    """Split trainable parameters into a decayed group and a no-decay group (biases, norm weights).

    The no-decay group is also excluded from LARS adaptation (``lars_exclude``), as in SimCLR/BYOL.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_and_norm and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, **group_kw)]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0, lars_exclude=True, **group_kw))
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as used by SimCLR, BYOL, MoCo v3.

    For each parameter p (unless its group has ``lars_exclude``): g <- g + wd*p; g <- g * eta*||p||/||g||
    (1 where either norm is 0); then heavy-ball momentum. Groups flagged ``lars_exclude`` get plain SGD
    with momentum and their own (usually zero) weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))
        # ZeRO 1/2 (fastcl.engine.zero): a group's params are one flat shard holding fragments of many parameters;
        # id(shard) -> (segment id of every shard element: its parameter's index, or n for padding; n). The
        # per-parameter squared norms are summed per segment and all-reduced, so every fragment gets its whole
        # parameter's trust ratio.
        self.zero_segments: dict[int, tuple[torch.Tensor, int]] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            seg = self.zero_segments.get(id(params[0])) if len(params) == 1 else None
            if seg is not None and not group["lars_exclude"]:
                grads = [grads[0] * self._sharded_trust(params[0], grads[0], *seg, group["trust_coefficient"])]
            elif not group["lars_exclude"]:
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((p_norm > 0) & (g_norm > 0),
                                    group["trust_coefficient"] * p_norm / g_norm, torch.ones_like(p_norm))
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                    bufs.append(None)
                else:
                    bufs.append(state["momentum_buffer"])
            existing = [(b, g) for b, g in zip(bufs, grads) if b is not None]
            if existing:
                b_list, g_list = zip(*existing)
                torch._foreach_mul_(list(b_list), group["momentum"])
                torch._foreach_add_(list(b_list), list(g_list))
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
        return loss

    @staticmethod
    def _sharded_trust(flat: torch.Tensor, grad: torch.Tensor, seg: torch.Tensor, n: int, eta: float) -> torch.Tensor:
        """Each element's trust ratio eta * ||w|| / ||g|| of the parameter it belongs to, from a ZeRO shard: squared
        norms summed per parameter fragment (one index_add each), then over the ranks (one all-reduce of 2 x (n+1)
        floats), no host sync."""
        import torch.distributed as dist

        sq = torch.zeros(2, n + 1, dtype=torch.float32, device=flat.device)
        sq[0].index_add_(0, seg, flat.detach().float().square())
        sq[1].index_add_(0, seg, grad.float().square())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
        p_norm, g_norm = sq.sqrt().unbind()
        trust = torch.where((p_norm > 0) & (g_norm > 0), eta * p_norm / g_norm, torch.ones_like(p_norm))
        return trust[seg].to(grad.dtype)


def build_optimizer(name: str, groups: list[dict], *, lr: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), device: torch.device | None = None):
    """``sgd`` | ``lars`` | ``adamw``; fused kernels on CUDA, foreach on CPU."""
    on_cuda = device is not None and device.type == "cuda"
    for g in groups:  # torch's optimizers reject unknown-but-harmless keys only on construction of defaults
        g.setdefault("lr", lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=on_cuda or None,
                               foreach=None if on_cuda else True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None,
                                 foreach=None if on_cuda else True)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}: choose sgd, lars or adamw")
