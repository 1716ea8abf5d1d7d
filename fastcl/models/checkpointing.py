"""Activation checkpointing (``--grad-ckpt``): keep only each ViT block's / each ResNet or RegNet stage's input
during the forward and recompute the rest in the backward, trading one extra forward of the trained network for
the activation memory that limits large-ViT SSL batches.

``enable_grad_checkpointing(method)`` walks the method once and checkpoints every backbone that has trainable
parameters (the student / online network); EMA teachers and momentum encoders (``requires_grad=False``, run under
``no_grad``) are left alone, they store no activations anyway. The checkpointed modules keep their class (a
subclass is swapped in), names and ``state_dict`` keys, so checkpoints, export and ``load_backbone`` see no
difference; under ``no_grad`` (kNN, teachers) they run their plain forward.

Exactness: ``torch.utils.checkpoint`` with ``use_reentrant=False`` and ``preserve_rng_state=True`` replays the
forward with the RNG state it first ran with (dropout / drop-path masks are the same) and under the same autocast
state. Batch norm would update its running statistics twice (forward and recompute): the recompute runs with the
stage's BN buffers copied before and restored after it (a few KB per stage, on the device), so running statistics
equal the run without checkpointing. Under ``torch.compile`` the recompute is the partitioner's
(buffer updates happen once in the compiled graph) and the BN switch is not used.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

_SUBCLASSES: dict[type, type] = {}


@contextmanager
def _bn_without_running_update(bns: tuple[nn.Module, ...]):
    """The recompute leaves BN buffers as the forward left them (its own update is undone on the device)."""
    with torch.no_grad():
        saved = [(t, t.clone()) for m in bns for t in (m.running_mean, m.running_var, m.num_batches_tracked)
                 if t is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)


def _checkpointed_forward(self, *args, **kwargs):
    plain = self._fastcl_plain_forward  # (bound: the class's own forward)
    if not torch.is_grad_enabled():  # kNN, a teacher pass: nothing is saved for a backward
        return plain(*args, **kwargs)
    bns = self._fastcl_bns
    if bns and not torch.compiler.is_compiling():
        return checkpoint(plain, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _bn_without_running_update(bns)), **kwargs)
    return checkpoint(plain, *args, use_reentrant=False, **kwargs)


def _subclass(cls: type) -> type:
    """``cls`` with a checkpointed forward; registered in this module so instances still pickle."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        name = f"GradCkpt{cls.__name__}_{len(_SUBCLASSES)}"
        sub = type(name, (cls,), {"forward": _checkpointed_forward, "_fastcl_plain_forward": cls.forward,
                                  "__module__": __name__, "__qualname__": name})
        _SUBCLASSES[cls] = sub
        globals()[name] = sub
    return sub


def checkpoint_module(m: nn.Module) -> None:
    """Make ``m``'s forward a checkpointed one (idempotent)."""
    if type(m) in _SUBCLASSES.values():
        return
    m._fastcl_bns = tuple(b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)
                          and b.track_running_stats)
    m.__class__ = _subclass(type(m))


def is_checkpointed(m: nn.Module) -> bool:
    return type(m) in _SUBCLASSES.values()


def _units(net: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The checkpoint units of a backbone: ViT blocks, ResNet / RegNet stages; None for anything else."""
    import torchvision

    if isinstance(net, torchvision.models.ResNet):
        return [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    if isinstance(net, torchvision.models.RegNet):
        return [(f"trunk_output.{n}", s) for n, s in net.trunk_output.named_children()]
    blocks = getattr(net, "blocks", None)
    if hasattr(net, "patch_embed") and isinstance(blocks, nn.Sequential):  # timm VisionTransformer
        return [(f"blocks.{n}", b) for n, b in blocks.named_children()]
    return None


def enable_grad_checkpointing(method: nn.Module) -> list[str]:
    """Checkpoint every trainable backbone inside ``method``; returns the names of the checkpointed modules.

    Raises ValueError if the method has no trainable ViT / ResNet / RegNet backbone (CMC's and CPC v2's own
    encoders), naming what was found."""
    done: list[str] = []
    for name, mod in method.named_modules():  # (each module once)
        units = _units(mod)
        if units is None or not any(p.requires_grad for p in mod.parameters()):
            continue  # not a backbone, or a frozen teacher / momentum encoder
        for uname, unit in units:
            if any(p.requires_grad for p in unit.parameters()):
                checkpoint_module(unit)
                done.append(f"{name}.{uname}" if name else uname)
    if not done:
        raise ValueError(f"--grad-ckpt: {type(method).__name__} has no trainable timm ViT, torchvision ResNet or "
                         "RegNet backbone to checkpoint (per ViT block / per stage); drop --grad-ckpt")
    return done

