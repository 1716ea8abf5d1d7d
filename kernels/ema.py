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
from .utils import cdiv, interpreting, nvtx, tl, triton

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
                       O_REF_ptr, MOM_IS_TENSOR: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Program p updates elements [start, start + BLOCK_SIZE) of tensor BLK_TENSOR[p]:
        t ← o + m·(t − o)  (= m·t + (1 − m)·o), in fp32, stored back in the target's dtype.
    Elements are addressed in memory order from each tensor's data pointer: any dense layout works as long
    as target and online share strides (channels_last conv weights included). The online tensors may have
    another dtype than the targets (O_REF_ptr's), e.g. an fp32 EMA of bf16 weights."""
    pid = tl.program_id(0)
    idx = tl.load(BLK_TENSOR_ptr + pid)
    start = tl.load(BLK_START_ptr + pid)  # int64: one ViT-g tensor can pass 2^31 elements
    n = tl.load(NUMEL_ptr + idx)
    t_ptr = tl.load(T_PTRS + idx).to(tl.pointer_type(REF_ptr.dtype.element_ty))
    o_ptr = tl.load(O_PTRS + idx).to(tl.pointer_type(O_REF_ptr.dtype.element_ty))
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
    """Device tables for one (device, target dtype, online dtype) group of dense (target, online) pairs with
    equal strides."""

    def __init__(self, targets, onlines, block_size):
        self.targets, self.onlines, self.block_size = targets, onlines, block_size
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
        ref, o_ref = self.targets[0], self.onlines[0]
        is_t = isinstance(momentum, torch.Tensor)
        mom_t = momentum.to(ref.device, torch.float32) if is_t else ref
        _ema_update_kernel[(self.n_blocks,)](
            self.t_ptrs, self.o_ptrs, self.numel, self.blk_tensor, self.blk_start, mom_t,
            0.0 if is_t else float(momentum), ref, o_ref,
            MOM_IS_TENSOR=is_t, BLOCK_SIZE=self.block_size, num_warps=1 if interpreting() else 8)


def _ptr_key(targets, onlines):
    # sizes too: a freed tensor's address can be reused by one of another size
    return (tuple((t.data_ptr(), t.numel()) for t in targets), tuple(o.data_ptr() for o in onlines))


def _dense(t: torch.Tensor) -> bool:
    """True if ``t``'s elements fill ``numel`` consecutive memory slots from its data pointer, in some order of
    dimensions (contiguous, channels_last, any permutation of a contiguous tensor)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _group(target_params, online_params):
    """Split pairs into Triton groups by (device, target dtype, online dtype) and a torch remainder (different
    devices or strides, a non-dense layout, empty tensors, other dtypes)."""
    groups, rest_t, rest_o = {}, [], []
    for t, o in zip(target_params, online_params):
        if (t.device == o.device and t.numel() > 0 and t.dtype in _KERNEL_DTYPES and o.dtype in _KERNEL_DTYPES
                and t.stride() == o.stride() and _dense(t)):
            g = groups.setdefault((t.device, t.dtype, o.dtype), ([], []))
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
    """``torch._foreach_lerp_`` per (target dtype, online dtype) group; an online tensor of another dtype is
    cast to the target's first (``_foreach_lerp_`` refuses mixed dtypes)."""
    if isinstance(momentum, torch.Tensor):
        weight = 1.0 - momentum.to(torch.float32)
    else:
        weight = 1.0 - float(momentum)
    _reference_apply(_reference_plan(target_params, online_params), weight)


def _reference_plan(target_params, online_params):
    """((targets, onlines) of equal dtypes, (targets, onlines) whose online dtype differs)."""
    same = [(t, o) for t, o in zip(target_params, online_params) if t.dtype == o.dtype]
    mixed = [(t, o) for t, o in zip(target_params, online_params) if t.dtype != o.dtype]
    return ([t for t, _ in same], [o for _, o in same]), ([t for t, _ in mixed], [o for _, o in mixed])


def _reference_apply(plan, weight) -> None:
    (ts, os_), (mt, mo) = plan
    if ts:
        torch._foreach_lerp_(ts, os_, weight)
    if mt:  # (``_foreach_lerp_`` refuses mixed dtypes: cast the online tensors first)
        torch._foreach_lerp_(mt, [o.to(t.dtype) for t, o in zip(mt, mo)], weight)


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
        self._all = self.target_params + self.online_params
        self._tables = None  # built lazily on the first Triton update
        self._ptrs = None  # the data pointers the tables (and the cached decision) were made for
        self._plan = None  # (kernels backend, use_triton) of the last update

    def _pointers(self) -> list[int]:
        """Every tensor's data pointer, read in C (``map``): a ``.to()``, ``p.data = ...`` or a new storage
        shows up here, and nothing else is inspected per step."""
        return list(map(torch.Tensor.data_ptr, self._all))

    def _build(self, ptrs):
        groups, self._rest_t, self._rest_o = _group([p.data for p in self.target_params],
                                                    [p.data for p in self.online_params])
        self._tables = [_PointerTable(ts, os_, _block_size()) for ts, os_ in groups.values()]
        self._ptrs = ptrs

    @torch.no_grad()
    def update(self, momentum) -> None:
        """target ← momentum·target + (1 − momentum)·online; one launch per (device, dtypes) group."""
        with nvtx("ema"):
            self._update(momentum)

    def _update(self, momentum) -> None:
        from . import get_backend

        ptrs = self._pointers()
        if self._plan is None or self._plan[0] != get_backend() or ptrs != self._ptrs:
            # tensors moved or the backend changed: decide again (a walk over the tensors, rare)
            self._plan = (get_backend(), use_triton(*self._all),
                          _reference_plan([p.data for p in self.target_params], [p.data for p in self.online_params]))
            self._tables = None
            self._ptrs = ptrs
        if self._plan[1]:
            if self._tables is None:
                self._build(ptrs)
            for table in self._tables:
                table.launch(momentum)
            if self._rest_t:
                ema_update_reference(self._rest_t, self._rest_o, momentum)
        else:
            weight = 1.0 - (momentum.to(torch.float32) if isinstance(momentum, torch.Tensor) else float(momentum))
            _reference_apply(self._plan[2], weight)
        if self.copy_buffers:
            torch._foreach_copy_(list(self._target.buffers()), list(self._online.buffers()))


__all__ = ["ema_update_", "ema_update_reference", "EMAUpdater"]
