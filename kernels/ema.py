"""EMA / momentum update of a target network: target = m·target + (1 − m)·online.

Provenance: MoCo's momentum encoder (arXiv:1911.05722), BYOL (arXiv:2006.07733) and DINO's teacher
(arXiv:2104.14294) all do this as a Python loop over parameters, one or two launches each. Here the
parameters of each (device, dtype) group are reached in place through two device tables of data
pointers, one for the target and one for the online tensors (the pointer-table idiom of the
Triton grouped-GEMM tutorial), plus a block table mapping each program to (tensor, offset). A whole
group is one launch that reads 2 and writes 1 bytes per parameter byte: the memory floor.
Neither module is re-laid out (no flat buffers, no views), so DDP, optimizers, ``.to()`` and
state_dict are unaffected; the tables are rebuilt if a data pointer changes. ``momentum`` may be a
0-dim device tensor, so a cosine schedule neither recompiles nor syncs. No code was copied.
"""
from __future__ import annotations

import torch

from . import use_triton
from .utils import cdiv, interpreting, tl, triton

# ======================================================================================
# constants
# ======================================================================================

# 4096 elements per program: 16 KB of fp32 per operand, enough bytes in flight per SM to saturate
# HBM with 8 warps, while the tail waste on the many tiny BN/bias tensors stays small.
BLOCK_SIZE_GPU = 4096
BLOCK_SIZE_INTERP = 128  # the interpreter's cost is per op: small blocks keep CPU tests fast

# ======================================================================================
# kernel
# ======================================================================================


@triton.jit
def _ema_update_kernel(T_PTRS, O_PTRS, NUMEL_ptr, BLK_TENSOR_ptr, BLK_START_ptr, MOM_ptr, momentum, REF_ptr,
                       MOM_IS_TENSOR: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Program p updates elements [start, start + BLOCK_SIZE) of tensor BLK_TENSOR[p]:
        t ← o + m·(t − o)  (= m·t + (1 − m)·o), in fp32, stored back in the tensor's dtype."""
    pid = tl.program_id(0)
    idx = tl.load(BLK_TENSOR_ptr + pid)
    start = tl.load(BLK_START_ptr + pid)  # int64: one ViT-g tensor can pass 2^31 elements
    n = tl.load(NUMEL_ptr + idx)
    t_ptr = tl.load(T_PTRS + idx).to(tl.pointer_type(REF_ptr.dtype.element_ty))
    o_ptr = tl.load(O_PTRS + idx).to(tl.pointer_type(REF_ptr.dtype.element_ty))
    offs = start + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    if MOM_IS_TENSOR:
        m = tl.load(MOM_ptr).to(tl.float32)
    else:
        m = momentum
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(t_ptr + offs, (o + m * (t - o)).to(REF_ptr.dtype.element_ty), mask=mask)


# ======================================================================================
# host
# ======================================================================================


class _PointerTable:
    """Device tables for one (device, dtype) group of contiguous (target, online) pairs."""

    def __init__(self, targets, onlines, block_size):
        self.targets, self.onlines, self.block_size = targets, onlines, block_size
        self.key = _ptr_key(targets, onlines)
        dev = targets[0].device
        blk_tensor, blk_start = [], []
        for i, t in enumerate(targets):
            nb = cdiv(t.numel(), block_size)
            blk_tensor += [i] * nb
            blk_start += range(0, nb * block_size, block_size)
        self.n_blocks = len(blk_tensor)
        self.t_ptrs = torch.tensor([t.data_ptr() for t in targets], dtype=torch.int64).to(dev)
        self.o_ptrs = torch.tensor([o.data_ptr() for o in onlines], dtype=torch.int64).to(dev)
        self.numel = torch.tensor([t.numel() for t in targets], dtype=torch.int64).to(dev)
        self.blk_tensor = torch.tensor(blk_tensor, dtype=torch.int32).to(dev)
        self.blk_start = torch.tensor(blk_start, dtype=torch.int64).to(dev)

    def launch(self, momentum):
        ref = self.targets[0]
        is_t = isinstance(momentum, torch.Tensor)
        mom_t = momentum.to(ref.device, torch.float32) if is_t else ref
        _ema_update_kernel[(self.n_blocks,)](
            self.t_ptrs, self.o_ptrs, self.numel, self.blk_tensor, self.blk_start, mom_t,
            0.0 if is_t else float(momentum), ref,
            MOM_IS_TENSOR=is_t, BLOCK_SIZE=self.block_size, num_warps=1 if interpreting() else 8)


def _ptr_key(targets, onlines):
    # sizes too: a freed tensor's address can be reused by one of another size
    return (tuple((t.data_ptr(), t.numel()) for t in targets), tuple(o.data_ptr() for o in onlines))


def _group(target_params, online_params):
    """Split pairs into Triton groups by (device, dtype) and a torch remainder (dtype mismatch,
    non-contiguous, empty)."""
    groups, rest_t, rest_o = {}, [], []
    for t, o in zip(target_params, online_params):
        if (t.dtype == o.dtype and t.device == o.device and t.is_contiguous() and o.is_contiguous()
                and t.numel() > 0 and t.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            g = groups.setdefault((t.device, t.dtype), ([], []))
            g[0].append(t)
            g[1].append(o)
        else:
            rest_t.append(t)
            rest_o.append(o)
    return groups, rest_t, rest_o


_TABLE_CACHE: dict = {}  # ptr key -> _PointerTable, for the functional ema_update_


def _block_size():
    return BLOCK_SIZE_INTERP if interpreting() else BLOCK_SIZE_GPU


def ema_update_triton(target_params, online_params, momentum, tables=None) -> None:
    groups, rest_t, rest_o = _group(target_params, online_params)
    for ts, os_ in groups.values():
        key = _ptr_key(ts, os_)
        table = _TABLE_CACHE.get(key)
        if table is None:
            if len(_TABLE_CACHE) > 16:
                _TABLE_CACHE.clear()
            table = _TABLE_CACHE[key] = _PointerTable(ts, os_, _block_size())
        table.launch(momentum)
    if rest_t:
        ema_update_reference(rest_t, rest_o, momentum)

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
    if use_triton(*target_params, *online_params):
        ema_update_triton(target_params, online_params, momentum)
    else:
        ema_update_reference(target_params, online_params, momentum)


class EMAUpdater:
    """Momentum-updates ``target`` from ``online`` (same architecture).

    Args:
        online: the trained module (left untouched).
        target: the EMA copy (same parameter order and shapes); updated in place.
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
        # buffers are looked up at every update: Module.to() replaces buffer tensors (parameters it keeps)
        self._online, self._target = online, target
        if copy_buffers and len(list(online.buffers())) != len(list(target.buffers())):
            raise ValueError("online and target modules have different buffer lists")

        for t, o in zip(self.target_params, self.online_params):
            if t.shape != o.shape:
                raise ValueError(f"shape mismatch {tuple(t.shape)} vs {tuple(o.shape)}")
        self._tables = None  # built lazily on the first Triton update

    def _build(self):
        groups, self._rest_t, self._rest_o = _group([p.data for p in self.target_params],
                                                    [p.data for p in self.online_params])
        self._tables = [_PointerTable(ts, os_, _block_size()) for ts, os_ in groups.values()]
        self._key = _ptr_key([p.data for p in self.target_params], [p.data for p in self.online_params])

    @torch.no_grad()
    def update(self, momentum) -> None:
        """target ← momentum·target + (1 − momentum)·online; one launch per (device, dtype) group."""
        if use_triton(*self.target_params, *self.online_params):
            # a pointer moved (``.to()``, ``p.data = ...``): rebuild the tables (a host-side check only)
            if self._tables is None or _ptr_key(self.target_params, self.online_params) != self._key:
                self._build()
            for table in self._tables:
                table.launch(momentum)
            if self._rest_t:
                ema_update_reference(self._rest_t, self._rest_o, momentum)
        else:
            ema_update_reference([p.data for p in self.target_params], [p.data for p in self.online_params],
                                 momentum)
        if self.copy_buffers:
            torch._foreach_copy_(list(self._target.buffers()), list(self._online.buffers()))


__all__ = ["ema_update_", "ema_update_reference", "EMAUpdater"]
