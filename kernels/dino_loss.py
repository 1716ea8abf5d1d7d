"""Fused DINO cross-entropy between teacher and student crops.

Provenance: DINO (Caron et al. 2021, arXiv:2104.14294), facebookresearch/dino main_dino.py
``DINOLoss.forward``. With s = student/τ_s and p_t = softmax((t − c)/τ_t), and using Σ_k p_t = 1,

    Σ_k −p_t,k · log_softmax(s)_k = lse(s) − p_t · s

so for student crop v and batch row b, summing over the teacher crops iq ≠ v,

    ℓ_vb = c_v · lse(s_vb) − W_vb · s_vb,   W_vb = Σ_iq p_t[iq,b] − [v < n_g] p_t[v,b],
    c_v  = n_g − [v < n_g]

and loss = Σ_vb ℓ_vb / (B · n_pairs), ∂loss/∂s_vb = (c_v softmax(s_vb) − W_vb) / (B · n_pairs).
The kernels never form log_softmax or the per-pair products. No code was copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import use_triton
from .utils import cdiv, interpreting, next_power_of_2, num_sms, nvtx, tl, triton

# ======================================================================================
# constants
# ======================================================================================

LOG2E = 1.4426950408889634  # 1/ln(2): softmaxes are taken in base 2 (exp2 is the native op)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)  # finite "-inf": masked lanes give exp2(...) = 0, never NaN
MAX_CROPS = 64

# ======================================================================================
# kernels
# ======================================================================================


@triton.jit
def _dino_teacher_kernel(T_ptr, T_row_stride, C_ptr, TM_ptr, TL_ptr, BC_ptr,
                         n_rows, n_k, t_scale2, inv_rows,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program = one column block of the teacher logits, all n_g·B rows:
    1. per-row partial softmax stats of z = (t − c)·log2(e)/τ_t over these columns (max, Σ 2^(z−max)),
       merged across column blocks by the student kernels;
    2. the complete column sums → batch_center[cols] = mean over rows (the DINO batch statistics)."""
    kb = tl.program_id(0)
    cols = kb.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cm = cols < n_k
    c = tl.load(C_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    colsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rm = rows < n_rows
        mask = rm[:, None] & cm[None, :]
        t = tl.load(T_ptr + rows.to(tl.int64)[:, None] * T_row_stride + cols[None, :], mask=mask, other=0.0)
        t = t.to(tl.float32)
        colsum += tl.sum(t, axis=0)
        z = tl.where(mask, (t - c[None, :]) * t_scale2, NEG_INIT)
        mz = tl.max(z, axis=1)
        lz = tl.sum(tl.exp2(z - mz[:, None]), axis=1)
        tl.store(TM_ptr + kb * n_rows + rows, mz, mask=rm)
        tl.store(TL_ptr + kb * n_rows + rows, lz, mask=rm)
    tl.store(BC_ptr + cols, colsum * inv_rows, mask=cm)


@triton.jit
def _teacher_lse(TM_ptr, TL_ptr, b, v, n_batch, n_global, n_kb, BLOCK_KB: tl.constexpr):
    """Base-2 log-sum-exp of teacher rows v·B + b (v < n_g), merged over the column-block partials:
    lse = M + log2 Σ_kb l_kb 2^(m_kb − M). Rows v >= n_g get 0."""
    kb = tl.arange(0, BLOCK_KB)
    trow = v * n_batch + b
    tmask = v < n_global
    n_rows = n_global * n_batch
    pm = tmask[:, None] & (kb[None, :] < n_kb)
    mt = tl.load(TM_ptr + kb[None, :] * n_rows + trow[:, None], mask=pm, other=NEG_INIT)
    lt = tl.load(TL_ptr + kb[None, :] * n_rows + trow[:, None], mask=pm, other=0.0)
    mmax = tl.max(mt, axis=1)
    tot = tl.sum(lt * tl.exp2(mt - mmax[:, None]), axis=1)
    return tl.where(tmask, mmax + tl.log2(tl.where(tmask, tot, 1.0)), 0.0)


@triton.jit
def _teacher_weights(T_ptr, T_row_stride, c, lse_t, b, v, cols, cm, n_batch, n_global, t_scale2):
    """W (PAD, BLOCK_K): row v = Σ_{iq ≠ v} p_t[iq, b] over this column tile, i.e. the total
    teacher probability minus the crop's own teacher view when v < n_g."""
    tmask = v < n_global
    trow = (v * n_batch + b).to(tl.int64)
    mask = tmask[:, None] & cm[None, :]
    t = tl.load(T_ptr + trow[:, None] * T_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.where(mask, (t - c[None, :]) * t_scale2 - lse_t[:, None], NEG_INIT)
    pt = tl.exp2(z)
    return tl.sum(pt, axis=0)[None, :] - pt


@triton.jit
def _dino_forward_kernel(S_ptr, S_row_stride, T_ptr, T_row_stride, C_ptr, TM_ptr, TL_ptr, LSET_ptr,
                         PM_ptr, PL_ptr, PX_ptr,
                         n_batch, n_k, n_crops, n_global, n_kb, k_per_split, s_scale2, inv_s, t_scale2,
                         PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KB: tl.constexpr):
    """Program (batch row b, K split): for every student crop v at once ((PAD, BLOCK_K) tiles),
    the running base-2 softmax stats of s_vb over the split and the cross term Σ_k W_vb,k · s_vb,k.

    Online softmax: m' = max(m, max_k x), l' = l·2^(m − m') + Σ_k 2^(x − m')."""
    b = tl.program_id(0)
    sp = tl.program_id(1)
    v = tl.arange(0, PAD)
    lse_t = _teacher_lse(TM_ptr, TL_ptr, b, v, n_batch, n_global, n_kb, BLOCK_KB)
    if sp == 0:
        tl.store(LSET_ptr + v * n_batch + b, lse_t, mask=v < n_global)
    smask = v < n_crops
    srow = (v * n_batch + b).to(tl.int64)
    m_i = tl.zeros([PAD], dtype=tl.float32) + NEG_INIT
    l_i = tl.zeros([PAD], dtype=tl.float32)
    cross = tl.zeros([PAD], dtype=tl.float32)
    start = sp * k_per_split
    end = tl.minimum(start + k_per_split, n_k)
    for k0 in range(start, end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cm = cols < end
        c = tl.load(C_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        w = _teacher_weights(T_ptr, T_row_stride, c, lse_t, b, v, cols, cm, n_batch, n_global, t_scale2)
        mask = smask[:, None] & cm[None, :]
        s = tl.load(S_ptr + srow[:, None] * S_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, s * s_scale2, NEG_INIT)
        # -- update m_i and l_i
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
        m_i = m_new
        cross += tl.sum(w * s, axis=1) * inv_s
    offs = (sp * n_batch + b) * PAD + v
    tl.store(PM_ptr + offs, m_i)
    tl.store(PL_ptr + offs, l_i)
    tl.store(PX_ptr + offs, cross)


@triton.jit
def _dino_combine_kernel(PM_ptr, PL_ptr, PX_ptr, LSES_ptr, ROWLOSS_ptr, n_batch, n_crops, n_global, n_splits,
                         PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program b: merge the K splits; ℓ_b = Σ_v c_v·lse(s_vb) − cross_vb with c_v = n_g − [v < n_g]."""
    b = tl.program_id(0)
    v = tl.arange(0, PAD)
    sp = tl.arange(0, BLOCK_S)
    offs = (sp[:, None] * n_batch + b) * PAD + v[None, :]
    pmask = (sp[:, None] < n_splits) & (v[None, :] < PAD)
    pm = tl.load(PM_ptr + offs, mask=pmask, other=NEG_INIT)
    pl = tl.load(PL_ptr + offs, mask=pmask, other=0.0)
    px = tl.load(PX_ptr + offs, mask=pmask, other=0.0)
    m = tl.max(pm, axis=0)
    smask = v < n_crops
    lse2 = m + tl.log2(tl.where(smask, tl.sum(pl * tl.exp2(pm - m[None, :]), axis=0), 1.0))
    tl.store(LSES_ptr + b * PAD + v, lse2)
    cnt = n_global - tl.where(v < n_global, 1.0, 0.0)
    row = tl.where(smask, cnt * lse2 * LN2 - tl.sum(px, axis=0), 0.0)
    tl.store(ROWLOSS_ptr + b, tl.sum(row, axis=0))


@triton.jit
def _dino_backward_kernel(S_ptr, S_row_stride, T_ptr, T_row_stride, C_ptr, LSET_ptr, LSES_ptr, G_ptr, DS_ptr,
                          n_batch, n_k, n_crops, n_global, k_per_split, s_scale2, inv_s, t_scale2, g_scale,
                          PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """∂loss/∂student_vb = g/(B·n_pairs) · (c_v·softmax(s_vb) − W_vb) / τ_s, recomputed per tile."""
    b = tl.program_id(0)
    sp = tl.program_id(1)
    v = tl.arange(0, PAD)
    lse_t = tl.load(LSET_ptr + v * n_batch + b, mask=v < n_global, other=0.0)
    lse_s = tl.load(LSES_ptr + b * PAD + v)
    smask = v < n_crops
    srow = (v * n_batch + b).to(tl.int64)
    coef = (n_global - tl.where(v < n_global, 1.0, 0.0))
    gs = tl.load(G_ptr).to(tl.float32) * g_scale * inv_s
    start = sp * k_per_split
    end = tl.minimum(start + k_per_split, n_k)
    for k0 in range(start, end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cm = cols < end
        c = tl.load(C_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        w = _teacher_weights(T_ptr, T_row_stride, c, lse_t, b, v, cols, cm, n_batch, n_global, t_scale2)
        mask = smask[:, None] & cm[None, :]
        s = tl.load(S_ptr + srow[:, None] * S_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, s * s_scale2 - lse_s[:, None], NEG_INIT)
        ds = gs * (coef[:, None] * tl.exp2(x) - w)
        tl.store(DS_ptr + srow[:, None] * S_row_stride + cols[None, :], ds.to(DS_ptr.dtype.element_ty), mask=mask)


# ======================================================================================
# host functions
# ======================================================================================


def _k_split(n_batch, n_k, block_k, device):
    """Split K so there are ~2 programs per SM (B alone is only 64 programs at DINO's shapes)."""
    n_tiles = cdiv(n_k, block_k)
    s = max(1, min(cdiv(2 * num_sms(device), n_batch), n_tiles, 64))
    per = cdiv(n_tiles, s) * block_k
    return cdiv(n_k, per), per


def _blocks(pad):
    if interpreting():
        return 64, 16
    # (PAD, BLOCK_K) fp32 tiles of 4096 elements: 16 registers per thread each at 8 warps, and
    # ~5 of them live (s, x, t, p_t, W) without spilling
    return max(128, 4096 // pad), 16  # (BLOCK_K for the student tiles, BLOCK_R for the teacher pass)


def dino_forward(student_out, teacher_out, center, student_temp, teacher_temp, n_global):
    R, K = teacher_out.shape
    B = R // n_global
    n_crops = student_out.shape[0] // B
    pad = max(2, next_power_of_2(max(n_crops, n_global)))
    dev = student_out.device
    block_k, block_r = _blocks(pad)
    t_scale2 = LOG2E / teacher_temp
    s_scale2 = LOG2E / student_temp
    # 1. teacher softmax stats (per column block) + batch center
    block_kt = 64 if interpreting() else 512
    n_kb = cdiv(K, block_kt)
    tm = torch.empty(n_kb, R, dtype=torch.float32, device=dev)
    tl_ = torch.empty_like(tm)
    batch_center = torch.empty(1, K, dtype=torch.float32, device=dev)
    _dino_teacher_kernel[(n_kb,)](teacher_out, teacher_out.stride(0), center, tm, tl_, batch_center,
                                  R, K, t_scale2, 1.0 / R, BLOCK_R=block_r, BLOCK_K=block_kt,
                                  num_warps=1 if interpreting() else 4)
    # 2. student stats and cross terms, all crops of a batch row per program
    n_split, per = _k_split(B, K, block_k, dev)
    pm = torch.empty(n_split, B, pad, dtype=torch.float32, device=dev)
    pl, px = torch.empty_like(pm), torch.empty_like(pm)
    lse_t = torch.empty(R, dtype=torch.float32, device=dev)
    nw = 1 if interpreting() else 8
    _dino_forward_kernel[(B, n_split)](
        student_out, student_out.stride(0), teacher_out, teacher_out.stride(0), center, tm, tl_, lse_t,
        pm, pl, px, B, K, n_crops, n_global, n_kb, per, s_scale2, 1.0 / student_temp, t_scale2,
        PAD=pad, BLOCK_K=block_k, BLOCK_KB=max(2, next_power_of_2(n_kb)), num_warps=nw)
    # 3. merge splits, per-row losses
    lse_s = torch.empty(B, pad, dtype=torch.float32, device=dev)
    row_loss = torch.empty(B, dtype=torch.float32, device=dev)
    _dino_combine_kernel[(B,)](pm, pl, px, lse_s, row_loss, B, n_crops, n_global, n_split,
                               PAD=pad, BLOCK_S=max(2, next_power_of_2(n_split)), num_warps=1 if interpreting() else 2)
    n_pairs = n_global * n_crops - min(n_global, n_crops)
    loss = row_loss.sum() / (B * n_pairs)
    return loss, batch_center, lse_t, lse_s, (n_split, per, pad, block_k, n_pairs)


def dino_backward(grad_loss, student_out, teacher_out, center, lse_t, lse_s, student_temp, teacher_temp,
                  n_global, meta):
    n_split, per, pad, block_k, n_pairs = meta
    R, K = teacher_out.shape
    B = R // n_global
    n_crops = student_out.shape[0] // B
    ds = torch.empty_like(student_out)
    _dino_backward_kernel[(B, n_split)](
        student_out, student_out.stride(0), teacher_out, teacher_out.stride(0), center, lse_t, lse_s,
        grad_loss.float().contiguous(), ds, B, K, n_crops, n_global, per, LOG2E / student_temp,
        1.0 / student_temp, LOG2E / teacher_temp, 1.0 / (B * n_pairs),
        PAD=pad, BLOCK_K=block_k, num_warps=1 if interpreting() else 8)
    return ds


# ======================================================================================
# autograd
# ======================================================================================


# torch.library ops (one per direction): torch.compile sees the loss as one opaque node with a fake
# implementation, so a compiled DINO step keeps one graph; the launch settings are recomputed from the shapes.
def _pad(n_crops, n_global):
    return max(2, next_power_of_2(max(n_crops, n_global)))


@torch.library.custom_op("fastcl::dino_loss", mutates_args=())
def dino_loss_op(student_out: Tensor, teacher_out: Tensor, center: Tensor, student_temp: float,
                 teacher_temp: float, n_global: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss (), batch center (1, K), teacher lse (R,), student lse (B, pad)), all fp32."""
    with nvtx("dino_loss.forward"):
        loss, batch_center, lse_t, lse_s, _ = dino_forward(student_out.contiguous(), teacher_out.contiguous(),
                                                           center.reshape(-1).contiguous(), student_temp,
                                                           teacher_temp, n_global)
    return loss, batch_center, lse_t, lse_s


@dino_loss_op.register_fake
def _(student_out, teacher_out, center, student_temp, teacher_temp, n_global):
    R, K = teacher_out.shape
    B = R // n_global
    f32 = dict(dtype=torch.float32)
    return (student_out.new_empty((), **f32), student_out.new_empty(1, K, **f32), student_out.new_empty(R, **f32),
            student_out.new_empty(B, _pad(student_out.shape[0] // B, n_global), **f32))


@torch.library.custom_op("fastcl::dino_loss_backward", mutates_args=())
def dino_loss_backward_op(grad_loss: Tensor, student_out: Tensor, teacher_out: Tensor, center: Tensor,
                          lse_t: Tensor, lse_s: Tensor, student_temp: float, teacher_temp: float,
                          n_global: int) -> Tensor:
    student_out, teacher_out = student_out.contiguous(), teacher_out.contiguous()
    R, K = teacher_out.shape
    B = R // n_global
    n_crops = student_out.shape[0] // B
    pad = _pad(n_crops, n_global)
    block_k, _ = _blocks(pad)
    n_split, per = _k_split(B, K, block_k, student_out.device)
    meta = (n_split, per, pad, block_k, n_global * n_crops - min(n_global, n_crops))
    with nvtx("dino_loss.backward"):
        return dino_backward(grad_loss, student_out, teacher_out, center.reshape(-1).contiguous(), lse_t, lse_s,
                             student_temp, teacher_temp, n_global, meta)


@dino_loss_backward_op.register_fake
def _(grad_loss, student_out, teacher_out, center, lse_t, lse_s, student_temp, teacher_temp, n_global):
    return torch.empty_like(student_out, memory_format=torch.contiguous_format)


def _dino_setup(ctx, inputs, output):
    student_out, teacher_out, center, student_temp, teacher_temp, n_global = inputs
    _, batch_center, lse_t, lse_s = output
    ctx.save_for_backward(student_out, teacher_out, center, lse_t, lse_s)
    ctx.cfg = (student_temp, teacher_temp, n_global)
    ctx.mark_non_differentiable(batch_center, lse_t, lse_s)


def _dino_backward(ctx, grad_loss, _g_center, _g_lse_t, _g_lse_s):
    student_out, teacher_out, center, lse_t, lse_s = ctx.saved_tensors
    ds = torch.ops.fastcl.dino_loss_backward(grad_loss, student_out, teacher_out, center, lse_t, lse_s, *ctx.cfg)
    return ds, None, None, None, None, None


dino_loss_op.register_autograd(_dino_backward, setup_context=_dino_setup)

# ======================================================================================
# torch reference
# ======================================================================================


def dino_loss_reference(student_out, teacher_out, center, student_temp, teacher_temp, n_global_crops=2):
    n_crops = student_out.shape[0] // (teacher_out.shape[0] // n_global_crops)
    s = (student_out.float() / student_temp).chunk(n_crops)
    t = F.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1).detach().chunk(n_global_crops)
    total, n_terms = 0.0, 0
    for iq, p in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-p * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n_terms += 1
    batch_center = teacher_out.detach().float().mean(0, keepdim=True)
    return total / n_terms, batch_center


def dino_loss(student_out, teacher_out, center, student_temp, teacher_temp, n_global_crops=2):
    """DINO loss and the teacher batch center.

    Args:
        student_out: (n_crops·B, K) raw student logits, crop-major (as ``torch.cat`` of crops).
        teacher_out: (n_global_crops·B, K) raw teacher logits (no grad).
        center: (1, K) running center. student_temp, teacher_temp: floats.
    Returns:
        (loss, batch_center): scalar fp32 loss; batch_center = teacher_out.mean(0, keepdim=True)
        in fp32 (the caller all-reduces it and applies the center momentum).

    >>> loss, bc = dino_loss(torch.randn(8, 32), torch.randn(4, 32), torch.zeros(1, 32), 0.1, 0.04)
    """
    if teacher_out.dim() != 2 or student_out.dim() != 2 or teacher_out.shape[1] != student_out.shape[1]:
        raise ValueError("student_out and teacher_out must be 2-D with the same K")
    if teacher_out.shape[0] % n_global_crops:
        raise ValueError(f"teacher rows {teacher_out.shape[0]} not divisible by n_global_crops={n_global_crops}")
    b = teacher_out.shape[0] // n_global_crops
    if student_out.shape[0] % b or student_out.shape[0] // b < 1:
        raise ValueError(f"student rows {student_out.shape[0]} not a multiple of the batch {b}")
    n_crops = student_out.shape[0] // b
    if n_crops == 1 and n_global_crops == 1:
        raise ValueError("need at least one cross-view pair")
    if use_triton(student_out, teacher_out, center) and max(n_crops, n_global_crops) <= MAX_CROPS:
        loss, batch_center, _, _ = torch.ops.fastcl.dino_loss(student_out, teacher_out.detach(), center.detach(),
                                                               float(student_temp), float(teacher_temp),
                                                               int(n_global_crops))
        return loss, batch_center
    return dino_loss_reference(student_out, teacher_out, center, student_temp, teacher_temp, n_global_crops)

__all__ = ["dino_loss", "dino_loss_reference"]
