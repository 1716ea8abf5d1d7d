"""Flash-style fused InfoNCE: L2-normalize + q·kᵀ/T + online log-sum-exp over key tiles.

Provenance: the online-softmax recurrence is Milakov & Gimelshein 2018 ("Online normalizer
calculation for softmax", arXiv:1805.02867) as used by FlashAttention (Dao et al. 2022,
arXiv:2205.14135) and the Triton tutorial 06-fused-attention; the split over key chunks with a
log-sum-exp merge is flash-decoding. The losses are MoCo (He et al. 2019, arXiv:1911.05722),
MoCo v3's in-batch InfoNCE (Chen et al. 2021, arXiv:2104.02057) and SimCLR's NT-Xent (Chen et al.
2020, arXiv:2002.05709). No code was copied.

All three losses are one core, ``contrastive_lse``: for every query row i

    s_ij   = q̂_i · k̂_j / T                       (j over the shared keys, self column excluded)
    s_i+   = q̂_i · p̂_i / T                       (the positive: a key of its own, or keys[pos_i])
    loss_i = logsumexp({s_ij} ∪ {s_i+ if the positive is not among the keys}) − s_i+

The N×K logits are never materialized: the forward keeps a running (max m, sum l) per row while it
streams key tiles, the backward recomputes each tile from the saved log-sum-exp.
``normalize`` never writes normalized copies either: the dot is taken on the raw rows in fp32 and
scaled by the inverse row norms 1/max(‖x‖, 1e-12) (as ``F.normalize``).

Precision: tiles are multiplied in the input dtype with fp32 accumulation (fp32 inputs use
``tf32x3``, ~fp32 accurate); softmax statistics, norms and the partial gradients are fp32; the
probability tile fed to the backward dot is rounded to the input dtype, as in FlashAttention.
Queries and keys may differ in dtype (bf16 queries vs an fp32 queue): key tiles are cast to the
query dtype in registers. Feature widths C <= 1024 (16-bit queries) or C <= 256 (fp32 queries) run
in Triton (a whole row per tile); wider ones fall back to the torch reference: an fp32 row of 512
under tf32x3 spills 3-12 KB of registers per thread on sm_90a whatever the tile (aot_check), and
training runs its loss in bf16 under autocast anyway.

Parallelism: the forward and dq kernels split the keys into chunks when there are too few query
row blocks to fill the GPU (MoCo: N=256 queries vs 65536 keys), writing fp32 partials that a small
kernel merges; dk splits over query rows the same way. No atomics, deterministic results.

Backend: ``fastcl.kernels.use_triton`` (Triton for CUDA tensors by default, the torch reference
otherwise). The torch reference materializes the logits and is meant for CPU and for checking.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import use_triton
from .utils import cdiv, interpreting, next_power_of_2, num_sms, nvtx, tl, triton

# ======================================================================================
# constants
# ======================================================================================

LOG2E = 1.4426950408889634  # 1/ln(2): the kernels work in base 2 (exp2 is the native instruction)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
NORM_EPS = 1e-12  # as F.normalize: x / max(‖x‖, eps)
MAX_C = 1024  # a whole feature row lives in one tile; wider features fall back to torch
MAX_C_FP32 = 256  # fp32 (tf32x3) rows wider than this spill kilobytes per thread: torch reference instead
NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)  # finite running-max init: a fully masked tile gives exp2(-inf - m) = 0, not NaN
PARTIAL_BYTES_CAP = 32 << 20  # cap on the fp32 split partials of dq / dk


# ======================================================================================
# kernels
# ======================================================================================


@triton.jit
def _inv_norm_kernel(X_ptr, X_row_stride, R_ptr, n_rows, n_cols,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """R[r] = 1 / max(‖X[r]‖₂, eps) in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X_ptr + rows[:, None] * X_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
    tl.store(R_ptr + rows, r, mask=rows < n_rows)


@triton.jit
def _dot_rows(A_ptr, a_rows, a_stride, a_mask, B_ptr, b_rows, b_stride, b_mask, n_cols, like,
              BLOCK_C: tl.constexpr, CHUNK_C: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """A[a_rows]·B[b_rows]ᵀ (fp32) summed over CHUNK_C-wide feature chunks loaded from memory (B transposed
    there) in ``like``'s dtype: a whole-row dot of 16-row tiles holds full-width operand fragments in every
    warp and transposes the streamed tile in registers, which spills for wide rows on sm_90a (aot_check)."""
    acc = tl.zeros([a_rows.shape[0], b_rows.shape[0]], dtype=tl.float32)
    for c0 in tl.static_range(0, BLOCK_C, CHUNK_C):
        cc = c0 + tl.arange(0, CHUNK_C)
        a = tl.load(A_ptr + a_rows.to(tl.int64)[:, None] * a_stride + cc[None, :],
                    mask=a_mask[:, None] & (cc[None, :] < n_cols), other=0.0).to(like.dtype)
        b = tl.load(B_ptr + b_rows.to(tl.int64)[None, :] * b_stride + cc[:, None],
                    mask=b_mask[None, :] & (cc[:, None] < n_cols), other=0.0).to(like.dtype)
        if FP32_PRECISION:
            acc += tl.dot(a, b, input_precision="tf32x3")
        else:
            acc += tl.dot(a, b)
    return acc


@triton.jit
def _logits_tile(q, Q_ptr, Q_row_stride, rows, rmask, K_ptr, K_row_stride, RK_ptr, qscale, self_idx, cols,
                 n_keys, n_cols, key_end, NORM_K: tl.constexpr, HAS_SELF: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_C: tl.constexpr, CHUNK_C: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of base-2 logits s2 = (q·kᵀ)·rq·rk·log2(e)/T, masked to -inf
    outside [.., key_end) and on each row's self column. Returns (s2, k tile)."""
    ccols = tl.arange(0, BLOCK_C)
    kmask = (cols[:, None] < key_end) & (ccols[None, :] < n_cols)
    k = tl.load(K_ptr + cols.to(tl.int64)[:, None] * K_row_stride + ccols[None, :], mask=kmask, other=0.0)
    k = k.to(q.dtype)  # mixed precision (e.g. bf16 queries under autocast, fp32 queue): cast in registers
    if CHUNK_C < BLOCK_C:
        s = _dot_rows(Q_ptr, rows, Q_row_stride, rmask, K_ptr, cols, K_row_stride, cols < key_end, n_cols, q,
                      BLOCK_C, CHUNK_C, FP32_PRECISION)
    elif FP32_PRECISION:
        s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qscale[:, None]
    if NORM_K:
        rk = tl.load(RK_ptr + cols, mask=cols < key_end, other=0.0)
        s = s * rk[None, :]
    valid = cols[None, :] < key_end
    if HAS_SELF:
        valid = valid & (cols[None, :] != self_idx[:, None])
    s = tl.where(valid, s, float("-inf"))
    return s, k


@triton.jit
def _infonce_forward_kernel(
    Q_ptr, Q_row_stride, K_ptr, K_row_stride, RK_ptr, SELF_ptr, M_ptr, L_ptr,
    n_rows, n_keys, n_cols, keys_per_split, scale,
    NORM_Q: tl.constexpr, NORM_K: tl.constexpr, HAS_SELF: tl.constexpr, UPCAST: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (row block, key split): running (m, l) of the base-2 logits over its key chunk.

    Online softmax (Milakov & Gimelshein 2018): for each tile with row max t,
        m' = max(m, t);  l' = l·2^(m − m') + Σ_j 2^(s_j − m');  m = m'
    The splits are merged by the combine kernel with the same recurrence.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64: row * stride overflows int32 for e.g. 2^17 rows × 2^14 features
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ccols = tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    q = tl.load(Q_ptr + rows[:, None] * Q_row_stride + ccols[None, :],
                mask=rmask[:, None] & (ccols[None, :] < n_cols), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # 1. fold 1/‖q‖ and log2(e)/T into one per-row factor applied to the fp32 dot
    qscale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale
    if NORM_Q:
        qf = q.to(tl.float32)
        qscale = qscale / tl.maximum(tl.sqrt(tl.sum(qf * qf, axis=1)), 1e-12)
    self_idx = tl.zeros([BLOCK_M], dtype=tl.int64) - 1
    if HAS_SELF:
        self_idx = tl.load(SELF_ptr + rows, mask=rmask, other=-1)
    # 2. stream the key tiles of this split
    key_start = pid_s * keys_per_split
    key_end = tl.minimum(key_start + keys_per_split, n_keys)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_INIT
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(key_start, key_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s, k = _logits_tile(q, Q_ptr, Q_row_stride, rows, rmask, K_ptr, K_row_stride, RK_ptr, qscale, self_idx,
                            cols, n_keys, n_cols, key_end, NORM_K, HAS_SELF, UPCAST, BLOCK_C, BLOCK_C, FP32_PRECISION)
        # -- update m_i and l_i
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(M_ptr + pid_s * n_rows + rows, m_i, mask=rmask)
    tl.store(L_ptr + pid_s * n_rows + rows, l_i, mask=rmask)


@triton.jit
def _infonce_combine_kernel(
    Q_ptr, Q_row_stride, P_ptr, P_row_stride, POS_ptr, M_ptr, L_ptr,
    LOSS_ptr, LSE_ptr, PPOS_ptr,
    n_rows, n_cols, n_splits, scale,
    NORM_Q: tl.constexpr, NORM_P: tl.constexpr, POS_IN_KEYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the split (m, l) partials, add the positive logit, write per-row loss and base-2 lse.

    The positive row is P[i] (MoCo: its own key, added to the softmax here) or keys[pos[i]]
    (in-batch / NT-Xent: already among the streamed keys). loss_i = (lse2_i − s2_i+)·ln 2.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    ccols = tl.arange(0, BLOCK_C)
    mask2 = rmask[:, None] & (ccols[None, :] < n_cols)
    # 1. merge the key splits
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_INIT
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for sp in range(0, n_splits):
        m_s = tl.load(M_ptr + sp * n_rows + rows, mask=rmask, other=NEG_INIT)
        l_s = tl.load(L_ptr + sp * n_rows + rows, mask=rmask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        l_i = l_i * tl.exp2(m_i - m_new) + l_s * tl.exp2(m_s - m_new)
        m_i = m_new
    # 2. positive logit s2+ = q̂·p̂ · log2(e)/T (fp32 row dot)
    q = tl.load(Q_ptr + rows[:, None] * Q_row_stride + ccols[None, :], mask=mask2, other=0.0).to(tl.float32)
    if POS_IN_KEYS:
        prow = tl.load(POS_ptr + rows, mask=rmask, other=0)
    else:
        prow = rows
    p = tl.load(P_ptr + prow[:, None] * P_row_stride + ccols[None, :], mask=mask2, other=0.0).to(tl.float32)
    s_pos = tl.sum(q * p, axis=1) * scale
    if NORM_Q:
        s_pos = s_pos / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)
    if NORM_P:
        s_pos = s_pos / tl.maximum(tl.sqrt(tl.sum(p * p, axis=1)), 1e-12)
    if not POS_IN_KEYS:
        m_new = tl.maximum(m_i, s_pos)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.exp2(s_pos - m_new)
        m_i = m_new
    lse = m_i + tl.log2(tl.where(rmask, l_i, 1.0))  # masked tail rows have l = 0
    tl.store(LOSS_ptr + rows, (lse - s_pos) * LN2, mask=rmask)
    tl.store(LSE_ptr + rows, lse, mask=rmask)
    tl.store(PPOS_ptr + rows, tl.exp2(tl.where(rmask, s_pos - lse, 0.0)), mask=rmask)  # softmax prob of the positive


@triton.jit
def _infonce_backward_dq_kernel(
    Q_ptr, Q_row_stride, K_ptr, K_row_stride, RK_ptr, SELF_ptr, POS_ptr, LSE_ptr, DQ_ptr,
    n_rows, n_keys, n_cols, keys_per_split, scale,
    NORM_Q: tl.constexpr, NORM_K: tl.constexpr, HAS_SELF: tl.constexpr, POS_IN_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, SCALE_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK_C: tl.constexpr,
):
    """Program (row block, key split): partial Σ_j (P_ij − [j = pos_i]) k̂_j over its key chunk.

    With dS_ij = g_i (P_ij − [j = pos_i]), ∂loss/∂q̂_i = (1/T) Σ_j dS_ij k̂_j. The per-row g_i/T is
    applied by the finalize kernel, so the tile fed to tl.dot is P − onehot ∈ [−1, 1] (no fp16
    underflow from a 1/N loss scale). Written to the fp32 partial DQ[split] without atomics.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ccols = tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    mask2 = rmask[:, None] & (ccols[None, :] < n_cols)
    q = tl.load(Q_ptr + rows[:, None] * Q_row_stride + ccols[None, :], mask=mask2, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qscale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale
    if NORM_Q:
        qf = q.to(tl.float32)
        qscale = qscale / tl.maximum(tl.sqrt(tl.sum(qf * qf, axis=1)), 1e-12)
    self_idx = tl.zeros([BLOCK_M], dtype=tl.int64) - 1
    if HAS_SELF:
        self_idx = tl.load(SELF_ptr + rows, mask=rmask, other=-1)
    pos_idx = tl.zeros([BLOCK_M], dtype=tl.int64) - 1
    if POS_IN_KEYS:
        pos_idx = tl.load(POS_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(LSE_ptr + rows, mask=rmask, other=0.0)
    key_start = pid_s * keys_per_split
    key_end = tl.minimum(key_start + keys_per_split, n_keys)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for n0 in range(key_start, key_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s, k = _logits_tile(q, Q_ptr, Q_row_stride, rows, rmask, K_ptr, K_row_stride, RK_ptr, qscale, self_idx,
                            cols, n_keys, n_cols, key_end, NORM_K, HAS_SELF, UPCAST, BLOCK_C, CHUNK_C, FP32_PRECISION)
        # -- recompute P from the saved lse, subtract the positive's one-hot
        ds = tl.exp2(s - lse[:, None])
        if POS_IN_KEYS:
            ds = ds - tl.where(cols[None, :] == pos_idx[:, None], 1.0, 0.0)
        if NORM_K:
            rk = tl.load(RK_ptr + cols, mask=cols < key_end, other=0.0)
            if SCALE_TILE:
                # fp16: k̂ = k·rk in registers; dS·rk would push fp16 values into subnormals
                k = (k.to(tl.float32) * rk[:, None]).to(k.dtype)
            else:
                # bf16 / fp32 have fp32's range: scale the small dS tile, not the (BLOCK_N, C) k tile
                ds = ds * rk[None, :]
        if FP32_PRECISION:
            acc += tl.dot(ds.to(k.dtype), k, input_precision="tf32x3")
        else:
            acc += tl.dot(ds.to(k.dtype), k)
    offs = pid_s.to(tl.int64) * n_rows * n_cols + rows[:, None] * n_cols + ccols[None, :]
    tl.store(DQ_ptr + offs, acc, mask=mask2)


@triton.jit
def _infonce_backward_dk_kernel(
    Q_ptr, Q_row_stride, K_ptr, K_row_stride, RQ_ptr, RK_ptr, G_ptr, SELF_ptr, POS_ptr, LSE_ptr, DK_ptr,
    n_rows, n_keys, n_cols, rows_per_split, scale, g_scale,
    NORM_Q: tl.constexpr, NORM_K: tl.constexpr, HAS_SELF: tl.constexpr, POS_IN_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, SCALE_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK_C: tl.constexpr,
):
    """Program (key block, query split): partial Σ_i g_i·N (P_ij − [j = pos_i]) q̂_i for its keys
    (without POS_IN_KEYS the positives are separate ``pos_keys``: no key is anyone's positive).

    ∂loss/∂k̂_j = (1/T) Σ_i dS_ij q̂_i; the factor 1/(N·T) is applied by the finalize kernel and
    g_i·N (= 1 for a mean loss) keeps the fp16 dot operand O(1). Keys own their rows: no atomics.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ccols = tl.arange(0, BLOCK_C)
    cmask = cols < n_keys
    kmask = cmask[:, None] & (ccols[None, :] < n_cols)
    k = tl.load(K_ptr + cols[:, None] * K_row_stride + ccols[None, :], mask=kmask, other=0.0)
    k = k.to(Q_ptr.dtype.element_ty)
    if UPCAST:
        k = k.to(tl.float32)
    rk = tl.zeros([BLOCK_N], dtype=tl.float32) + 1.0
    if NORM_K:
        rk = tl.load(RK_ptr + cols, mask=cmask, other=0.0)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        q = tl.load(Q_ptr + rows.to(tl.int64)[:, None] * Q_row_stride + ccols[None, :],
                    mask=rmask[:, None] & (ccols[None, :] < n_cols), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        rq = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        if NORM_Q:
            rq = tl.load(RQ_ptr + rows, mask=rmask, other=0.0)
        lse = tl.load(LSE_ptr + rows, mask=rmask, other=0.0)
        g = tl.load(G_ptr + rows, mask=rmask, other=0.0) * g_scale
        pos_idx = tl.zeros([BLOCK_M], dtype=tl.int64) - 1
        if POS_IN_KEYS:
            pos_idx = tl.load(POS_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        # s2ᵀ tile (BLOCK_N, BLOCK_M)
        if CHUNK_C < BLOCK_C:
            st = _dot_rows(K_ptr, cols, K_row_stride, cmask, Q_ptr, rows, Q_row_stride, rmask, n_cols, q,
                           BLOCK_C, CHUNK_C, FP32_PRECISION)
        elif FP32_PRECISION:
            st = tl.dot(k, tl.trans(q), input_precision="tf32x3")
        else:
            st = tl.dot(k, tl.trans(q))
        st = st * rk[:, None] * (rq * scale)[None, :]
        valid = rmask[None, :] & cmask[:, None]
        if HAS_SELF:
            self_idx = tl.load(SELF_ptr + rows, mask=rmask, other=-1)
            valid = valid & (cols[:, None] != self_idx[None, :])
        p = tl.exp2(tl.where(valid, st - lse[None, :], float("-inf")))
        ds = (p - tl.where(cols[:, None] == pos_idx[None, :], 1.0, 0.0)) * g[None, :]
        if SCALE_TILE:
            q = (q.to(tl.float32) * rq[:, None]).to(q.dtype)  # fp16: q̂ in registers (see the dq kernel)
        else:
            ds = ds * rq[None, :]
        if FP32_PRECISION:
            acc += tl.dot(ds.to(q.dtype), q, input_precision="tf32x3")
        else:
            acc += tl.dot(ds.to(q.dtype), q)
    offs = pid_s.to(tl.int64) * n_keys * n_cols + cols[:, None] * n_cols + ccols[None, :]
    tl.store(DK_ptr + offs, acc, mask=kmask)


@triton.jit
def _l2norm_backward(x, dxh, NORM: tl.constexpr):
    """Backward of x̂ = x / max(‖x‖, eps): dx = (dx̂ − x̂ (x̂·dx̂)) / ‖x‖, or dx̂/eps when ‖x‖ < eps."""
    if NORM:
        nrm = tl.sqrt(tl.sum(x * x, axis=1))
        r = 1.0 / tl.maximum(nrm, 1e-12)
        xh = x * r[:, None]
        proj = tl.where(nrm > 1e-12, tl.sum(xh * dxh, axis=1), 0.0)
        dxh = (dxh - xh * proj[:, None]) * r[:, None]
    return dxh


@triton.jit
def _infonce_finalize_kernel(
    X_ptr, PART_ptr, n_parts, COEF_ptr, coef_scale, Y_ptr, PPOS_ptr, G_ptr, DX_ptr, DY_ptr,
    n_rows, n_cols, y_scale,
    HAS_PART: tl.constexpr, HAS_COEF: tl.constexpr, HAS_Y: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr, NORM_X: tl.constexpr, NORM_Y: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Finish the gradients of contiguous rows X (and of their MoCo positives Y):

        dx̂ = coef_r·Σ_split PART[split, r] + c_r·ŷ_r        dŷ = c_r·x̂_r
        c_r = g_r (P_r+ − 1)/T   (the MoCo positive's own term; P_r+ its softmax probability)

    then the L2-normalize backward of each, the cast to the input dtype, and the store. For MoCo one
    launch writes both dq (X = q) and dk (Y = k); for in-batch keys X = keys and there is no Y.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    ccols = tl.arange(0, BLOCK_C)
    mask2 = rmask[:, None] & (ccols[None, :] < n_cols)
    offs = rows[:, None] * n_cols + ccols[None, :]
    x = tl.load(X_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
    dxh = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    if HAS_PART:
        for sp in range(0, n_parts):
            dxh += tl.load(PART_ptr + sp * n_rows * n_cols + offs, mask=mask2, other=0.0)
        coef = tl.zeros([BLOCK_M], dtype=tl.float32) + coef_scale
        if HAS_COEF:
            coef = coef * tl.load(COEF_ptr + rows, mask=rmask, other=0.0)
        dxh = dxh * coef[:, None]
    if HAS_Y:
        y = tl.load(Y_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
        yh = y
        if NORM_Y:
            yh = y / tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), 1e-12)[:, None]
        g = tl.load(G_ptr + rows, mask=rmask, other=0.0)
        c = g * (tl.load(PPOS_ptr + rows, mask=rmask, other=0.0) - 1.0) * y_scale
        dxh += c[:, None] * yh
        if WRITE_DY:
            xh = x
            if NORM_X:
                xh = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
            dyh = _l2norm_backward(y, c[:, None] * xh, NORM_Y)
            tl.store(DY_ptr + offs, dyh.to(DY_ptr.dtype.element_ty), mask=mask2)
    if WRITE_DX:
        dxh = _l2norm_backward(x, dxh, NORM_X)
        tl.store(DX_ptr + offs, dxh.to(DX_ptr.dtype.element_ty), mask=mask2)


# ======================================================================================
# host functions
# ======================================================================================


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_supported(q, keys):
    max_c = MAX_C_FP32 if q.dtype == torch.float32 else MAX_C
    return q.shape[1] <= max_c and q.dtype in _DTYPES and keys.dtype in _DTYPES


def _settings(C, dtype, device, kernel):
    """Tile shape per kernel ("fwd", "dq", "dk"), picked so that none spills registers on sm_90a
    (ptxas 12.x, checked by ``python -m fastcl.kernels.aot_check``). Each launch computes its own
    key/query splits from its own tiles, so the three kernels need not share a shape. The rows carry
    a whole feature row per tile: wide rows leave few registers for the accumulators, hence the small
    tiles at C >= 512 (16-bit) and C = 256 (fp32's tf32x3 holds three operand splits). Two launches
    spilled in every tile (BLOCK_M/N 16-128, 2-16 warps, 1/2 stages): fp32 dq at C = 256 (20 B per
    thread, 255 registers) and fp16 dk at C = 1024 (36 B); their logits dot runs in CHUNK_C-wide
    feature chunks (``_dot_rows``) instead: dq 16x16, 8 warps, chunks of 32: 128 registers; dk 16x16,
    16 warps, chunks of 64: 128 registers (16 resident warps per SM for both, 8 before). Chosen by
    ptxas's counts, not yet timed on a GPU. The interpreter runs 16x16 tiles with the same chunking."""
    block_c = max(16, next_power_of_2(C))
    chunk, fp16 = block_c, dtype == torch.float16
    if dtype == torch.float32:  # 4-byte tiles: stay under 228 KB smem, one stage
        if block_c >= 256:
            bm, bn, nw = {"fwd": (64, 32, 8), "dq": (16, 16, 8), "dk": (16, 16, 8)}[kernel]
            chunk = 32 if kernel == "dq" else block_c
        elif block_c >= 128:
            bm, bn, nw = {"fwd": (64, 32, 4), "dq": (16, 64, 8), "dk": (64, 16, 8)}[kernel]
        else:
            bm, bn, nw = 64, 32, 4
        stages = 1
    elif block_c >= 512:  # fp16 scales the k / q operand tile in the backward (SCALE_TILE): one more live tile
        bm, bn, nw, stages = {"fwd": (32, 32, 8, 2), "dq": (16, 16, 8, 1),
                              "dk": ((16, 16, 16, 1) if block_c >= 1024 else (16, 16, 8, 1)) if fp16
                              else (32, 16, 8, 1)}[kernel]
        chunk = 64 if fp16 and kernel == "dk" and block_c >= 1024 else block_c
    elif block_c >= 256:
        bm, bn, nw, stages = {"fwd": (64, 64, 8, 2), "dq": (32, 64, 8, 1) if fp16 else (64, 64, 8, 1),
                              "dk": (32, 64, 8, 1)}[kernel]
    elif block_c >= 128:
        bm, bn, nw, stages = {"fwd": (128, 64, 8, 2), "dq": (64, 64, 8, 1), "dk": (64, 64, 8, 1)}[kernel]
    elif fp16 and kernel == "dk":
        bm, bn, nw, stages = 64, 64, 8, 2
    else:
        bm, bn, nw, stages = 128, 64, 8, 2
    if interpreting():
        bm, bn, nw, stages = 16, 16, 1, 1
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=block_c, CHUNK_C=chunk, num_warps=nw, num_stages=stages)


def _row_block(block_c):
    """Rows per program of the row-wise combine/finalize kernels: (rows, BLOCK_C) fp32 tiles of 4096
    elements, 16 registers per thread each at 8 warps, so the 3-4 live tiles do not spill."""
    return 16 if interpreting() else max(2, 4096 // block_c)


def _split(n_blocks, work_len, block, bytes_per_split, device):
    """Pick how many chunks to split the streamed dimension into so that there are ~2 programs per
    SM, each chunk a multiple of ``block`` with at least 2 tiles, and the partials stay under cap."""
    target = 2 * num_sms(device)
    n_tiles = cdiv(work_len, block)
    s = max(1, min(cdiv(target, n_blocks), n_tiles // 2 if n_tiles >= 4 else 1,
                   max(1, PARTIAL_BYTES_CAP // max(bytes_per_split, 1))))
    if interpreting():
        s = max(1, min(cdiv(target, n_blocks), n_tiles))  # exercise the multi-split path on CPU
    per = cdiv(n_tiles, s) * block
    return cdiv(work_len, per), per


def _inv_norms(x):
    n, c = x.shape
    r = torch.empty(n, dtype=torch.float32, device=x.device)
    block_c = max(16, next_power_of_2(c))
    block_r = max(1, min(64, 4096 // block_c))
    _inv_norm_kernel[(cdiv(n, block_r),)](x, x.stride(0), r, n, c, BLOCK_R=block_r, BLOCK_C=block_c)
    return r


def infonce_forward(q, keys, pos_keys, pos_index, self_index, temperature, norm_q, norm_k, norm_p):
    N, C = q.shape
    M = keys.shape[0]
    cfg = _settings(C, q.dtype, q.device, "fwd")
    BM, BN, BC = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_C"]
    # the interpreter's bf16 tl.dot is wrong: run the dots in fp32 there
    upcast = torch.bfloat16 in (q.dtype, keys.dtype) and interpreting()
    fp32 = q.dtype == torch.float32 and not interpreting()
    scale = LOG2E / temperature
    rk = _inv_norms(keys) if norm_k else q
    n_rb = cdiv(N, BM)
    n_split, per = _split(n_rb, M, BN, N * C * 4, q.device)
    m_part = torch.empty(n_split, N, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    has_self = self_index is not None
    _infonce_forward_kernel[(n_rb, n_split)](
        q, q.stride(0), keys, keys.stride(0), rk, self_index if has_self else q, m_part, l_part,
        N, M, C, per, scale,
        NORM_Q=norm_q, NORM_K=norm_k, HAS_SELF=has_self, UPCAST=upcast, FP32_PRECISION=fp32,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_C=BC, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    loss = torch.empty(N, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(loss)
    ppos = torch.empty_like(loss)
    pos_in_keys = pos_keys is None
    P = keys if pos_in_keys else pos_keys
    cbm = _row_block(BC)
    _infonce_combine_kernel[(cdiv(N, cbm),)](
        q, q.stride(0), P, P.stride(0), pos_index if pos_in_keys else q, m_part, l_part, loss, lse, ppos,
        N, C, n_split, scale,
        NORM_Q=norm_q, NORM_P=(norm_k if pos_in_keys else norm_p), POS_IN_KEYS=pos_in_keys,
        BLOCK_M=cbm, BLOCK_C=BC, num_warps=1 if interpreting() else 8)
    return loss, lse, ppos, rk


def infonce_backward(grad_loss, q, keys, pos_keys, pos_index, self_index, lse, ppos, rk, temperature,
                     norm_q, norm_k, norm_p, need_dq, need_dk, need_dp):
    N, C = q.shape
    M = keys.shape[0]
    BC = max(16, next_power_of_2(C))
    upcast = torch.bfloat16 in (q.dtype, keys.dtype) and interpreting()
    fp32 = q.dtype == torch.float32 and not interpreting()
    scale_tile = q.dtype == torch.float16
    scale = LOG2E / temperature
    g = grad_loss.float().contiguous()
    has_self = self_index is not None
    pos_in_keys = pos_keys is None
    fin_bm = _row_block(BC)
    dq = dk = dp = None
    if need_dq or need_dp:
        n_split, part = 0, q
        if need_dq:
            cfg = _settings(C, q.dtype, q.device, "dq")
            BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
            n_rb = cdiv(N, BM)
            n_split, per = _split(n_rb, M, BN, N * C * 4, q.device)
            part = torch.empty(n_split, N, C, dtype=torch.float32, device=q.device)
            _infonce_backward_dq_kernel[(n_rb, n_split)](
                q, q.stride(0), keys, keys.stride(0), rk, self_index if has_self else q,
                pos_index if pos_in_keys else q, lse, part, N, M, C, per, scale,
                NORM_Q=norm_q, NORM_K=norm_k, HAS_SELF=has_self, POS_IN_KEYS=pos_in_keys, UPCAST=upcast,
                FP32_PRECISION=fp32, SCALE_TILE=scale_tile, BLOCK_M=BM, BLOCK_N=BN, BLOCK_C=BC,
                CHUNK_C=cfg["CHUNK_C"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            dq = torch.empty_like(q)
        if need_dp:  # MoCo positive key, same launch: dp̂_i = c_i q̂_i
            dp = torch.empty_like(pos_keys)
        _infonce_finalize_kernel[(cdiv(N, fin_bm),)](
            q, part, n_split, g, 1.0 / temperature, q if pos_in_keys else pos_keys, ppos, g,
            dq if need_dq else q, dp if need_dp else q, N, C, 1.0 / temperature,
            HAS_PART=need_dq, HAS_COEF=True, HAS_Y=not pos_in_keys, WRITE_DX=need_dq, WRITE_DY=need_dp,
            NORM_X=norm_q, NORM_Y=norm_p, BLOCK_M=fin_bm, BLOCK_C=BC, num_warps=1 if interpreting() else 8)
        del part
    if need_dk:
        cfg = _settings(C, q.dtype, q.device, "dk")
        BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
        rq = _inv_norms(q) if norm_q else q
        n_kb = cdiv(M, BN)
        n_split, per = _split(n_kb, N, BM, M * C * 4, q.device)
        part = torch.empty(n_split, M, C, dtype=torch.float32, device=q.device)
        _infonce_backward_dk_kernel[(n_kb, n_split)](
            q, q.stride(0), keys, keys.stride(0), rq, rk, g, self_index if has_self else q,
            pos_index if pos_in_keys else q, lse, part, N, M, C, per, scale, float(N),
            NORM_Q=norm_q, NORM_K=norm_k, HAS_SELF=has_self, POS_IN_KEYS=pos_in_keys, UPCAST=upcast,
            FP32_PRECISION=fp32,
            SCALE_TILE=scale_tile, BLOCK_M=BM, BLOCK_N=BN, BLOCK_C=BC, CHUNK_C=cfg["CHUNK_C"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        dk = torch.empty_like(keys)
        _infonce_finalize_kernel[(cdiv(M, fin_bm),)](
            keys, part, n_split, g, 1.0 / (N * temperature), keys, ppos, g, dk, dk, M, C, 0.0,
            HAS_PART=True, HAS_COEF=False, HAS_Y=False, WRITE_DX=True, WRITE_DY=False,
            NORM_X=norm_k, NORM_Y=False, BLOCK_M=fin_bm, BLOCK_C=BC, num_warps=1 if interpreting() else 8)
    return dq, dk, dp


# ======================================================================================
# autograd
# ======================================================================================


# One torch.library op per direction: torch.compile sees each as a single opaque node with a fake (meta)
# implementation, so a compiled method does not break its graph at the loss, and AOTAutograd traces the
# backward through the second op. Outputs never alias inputs (the unused ``rk`` is an empty tensor).
@torch.library.custom_op("fastcl::contrastive_lse", mutates_args=())
def contrastive_lse_op(q: Tensor, keys: Tensor, pos_keys: Optional[Tensor], pos_index: Optional[Tensor],
                       self_index: Optional[Tensor], temperature: float, norm_q: bool, norm_k: bool,
                       norm_p: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-row loss (N,), lse (N,), positive probability (N,), 1/|k| (M,) or empty), all fp32."""
    q, keys = q.contiguous(), keys.contiguous()
    pos_keys = pos_keys.contiguous() if pos_keys is not None else None
    with nvtx("infonce.forward"):
        loss, lse, ppos, rk = infonce_forward(q, keys, pos_keys, pos_index, self_index, temperature,
                                              norm_q, norm_k, norm_p)
    return loss, lse, ppos, rk if norm_k else q.new_empty(0, dtype=torch.float32)


@contrastive_lse_op.register_fake
def _(q, keys, pos_keys, pos_index, self_index, temperature, norm_q, norm_k, norm_p):
    row = q.new_empty(q.shape[0], dtype=torch.float32)
    return row, torch.empty_like(row), torch.empty_like(row), q.new_empty(keys.shape[0] if norm_k else 0,
                                                                           dtype=torch.float32)


@torch.library.custom_op("fastcl::contrastive_lse_backward", mutates_args=())
def contrastive_lse_backward_op(grad_loss: Tensor, q: Tensor, keys: Tensor, pos_keys: Optional[Tensor],
                                pos_index: Optional[Tensor], self_index: Optional[Tensor], lse: Tensor,
                                ppos: Tensor, rk: Tensor, temperature: float, norm_q: bool, norm_k: bool,
                                norm_p: bool, need_dq: bool, need_dk: bool,
                                need_dp: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dp); an empty tensor where that gradient is not needed."""
    q, keys = q.contiguous(), keys.contiguous()
    pos_keys = pos_keys.contiguous() if pos_keys is not None else None
    with nvtx("infonce.backward"):
        dq, dk, dp = infonce_backward(grad_loss, q, keys, pos_keys, pos_index, self_index, lse, ppos,
                                      rk if norm_k else q, temperature, norm_q, norm_k, norm_p, need_dq, need_dk,
                                      need_dp)
    return tuple(g if g is not None else q.new_empty(0) for g in (dq, dk, dp))


@contrastive_lse_backward_op.register_fake
def _(grad_loss, q, keys, pos_keys, pos_index, self_index, lse, ppos, rk, temperature, norm_q, norm_k, norm_p,
      need_dq, need_dk, need_dp):
    return (torch.empty_like(q) if need_dq else q.new_empty(0), torch.empty_like(keys) if need_dk else q.new_empty(0),
            torch.empty_like(pos_keys) if need_dp else q.new_empty(0))


def _lse_setup(ctx, inputs, output):
    q, keys, pos_keys, pos_index, self_index, temperature, norm_q, norm_k, norm_p = inputs
    _, lse, ppos, rk = output
    ctx.save_for_backward(q, keys, pos_keys, pos_index, self_index, lse, ppos, rk)
    ctx.cfg = (temperature, norm_q, norm_k, norm_p)
    ctx.mark_non_differentiable(lse, ppos, rk)


def _lse_backward(ctx, grad_loss, _g_lse, _g_ppos, _g_rk):
    q, keys, pos_keys, pos_index, self_index, lse, ppos, rk = ctx.saved_tensors
    need_dq, need_dk, need_dp = ctx.needs_input_grad[:3]
    dq, dk, dp = torch.ops.fastcl.contrastive_lse_backward(
        grad_loss.float().contiguous(), q, keys, pos_keys, pos_index, self_index, lse, ppos, rk, *ctx.cfg,
        need_dq, need_dk, need_dp and pos_keys is not None)
    return (dq if need_dq else None, dk if need_dk else None, dp if need_dp else None,
            None, None, None, None, None, None)


contrastive_lse_op.register_autograd(_lse_backward, setup_context=_lse_setup)


# ======================================================================================
# torch reference (also the CPU path)
# ======================================================================================


def contrastive_lse_reference(q, keys, temperature, pos_index=None, pos_keys=None, self_index=None,
                              normalize_q=True, normalize_keys=True, normalize_pos=True):
    """Per-row InfoNCE losses (N,) in fp32 (float64 for float64 inputs); see the module docstring for the math.

    16-bit inputs are upcast; float64 stays float64: a cast down and back would lose the precision that float64
    checks rely on, and torch 2.11's inductor fails on that f64 -> f32 -> f64 round trip in the backward
    ("expected m1 and m2 to have the same dtype")."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc)
    kf = keys.to(acc)
    if normalize_q:
        qf = F.normalize(qf, dim=1)
    if normalize_keys:
        kf = F.normalize(kf, dim=1)
    logits = qf @ kf.t()  # N x K
    if self_index is not None:
        logits = logits.scatter(1, self_index.view(-1, 1), float("-inf"))
    if pos_keys is not None:
        pf = pos_keys.to(acc)
        if normalize_pos:
            pf = F.normalize(pf, dim=1)
        l_pos = (qf * pf).sum(1, keepdim=True)  # N x 1
        logits = torch.cat([l_pos, logits], dim=1) / temperature  # N x (1+K)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        logits = logits / temperature
        target = pos_index
    return F.cross_entropy(logits, target, reduction="none")


# ======================================================================================
# core dispatch
# ======================================================================================


def contrastive_lse(q, keys, temperature, pos_index=None, pos_keys=None, self_index=None,
                    normalize_q=True, normalize_keys=True, normalize_pos=True):
    """Per-row InfoNCE losses (N,) fp32 (float64 for float64 inputs). Exactly one of ``pos_index`` (positive = keys[pos_index[i]])
    or ``pos_keys`` (positive = pos_keys[i], an (N, C) tensor not among ``keys``) must be given.
    ``self_index`` (N,) int64 excludes column self_index[i] from row i's softmax."""
    if (pos_index is None) == (pos_keys is None):
        raise ValueError("give exactly one of pos_index or pos_keys")
    if q.dim() != 2 or keys.dim() != 2 or q.shape[1] != keys.shape[1]:
        raise ValueError(f"q (N,C) and keys (K,C) must agree on C, got {tuple(q.shape)} and {tuple(keys.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tensors = [t for t in (q, keys, pos_keys) if t is not None]
    if use_triton(*tensors) and _triton_supported(q, keys):
        return torch.ops.fastcl.contrastive_lse(q, keys, pos_keys, pos_index, self_index, float(temperature),
                                                normalize_q, normalize_keys, normalize_pos)[0]
    return contrastive_lse_reference(q, keys, temperature, pos_index, pos_keys, self_index,
                                     normalize_q, normalize_keys, normalize_pos)


# ======================================================================================
# public API
# ======================================================================================


_INDEX_CACHE: dict = {}


def _indices(kind, n, offset, device):
    """Cached positive / self index vectors, so a training step launches no arange/mod kernels."""
    key = (kind, n, offset, device)
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if len(_INDEX_CACHE) > 64:
            _INDEX_CACHE.clear()
        a = torch.arange(n, device=device)
        if kind == "inbatch":
            idx = a + offset
        elif kind == "ntxent_self":
            idx = a + offset
        else:  # ntxent_pos: the other view of the same image
            idx = (a + n // 2) % n + offset
        _INDEX_CACHE[key] = idx
    return idx


def moco_infonce(q, k, queue, temperature, normalize=True):
    """MoCo InfoNCE: mean_i CE([q̂_i·k̂_i, q̂_i·queue_j]/T, target 0).

    Args:
        q: (N, C) queries. k: (N, C) positive keys (grad flows if it requires grad).
        queue: (K, C) negatives, rows already L2-normalized, no grad.
        normalize: L2-normalize q and k inside the kernel (the queue is used as is).

    >>> loss = moco_infonce(torch.randn(8, 16), torch.randn(8, 16), F.normalize(torch.randn(32, 16), dim=1), 0.2)
    """
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    return contrastive_lse(q, queue.detach(), temperature, pos_keys=k, normalize_q=normalize,
                           normalize_keys=False, normalize_pos=normalize).mean()


def inbatch_infonce(q, k, temperature, pos_offset=0, normalize=True):
    """In-batch InfoNCE (MoCo v3): mean_i CE(q̂_i·k̂ᵀ/T, i + pos_offset).

    q: (N, C) local queries; k: (M, C) keys with M >= N (e.g. all-gathered, then
    pos_offset = rank * N). Grads flow to q and k. MoCo v3 multiplies the result by 2T itself.

    >>> loss = inbatch_infonce(torch.randn(8, 16), torch.randn(8, 16), 0.2)
    """
    n, m = q.shape[0], k.shape[0]
    if not 0 <= pos_offset <= m - n:
        raise ValueError(f"pos_offset={pos_offset} puts positives outside the {m} keys for {n} queries")
    pos = _indices("inbatch", n, pos_offset, q.device)
    return contrastive_lse(q, k, temperature, pos_index=pos, normalize_q=normalize,
                           normalize_keys=normalize).mean()


def ntxent(z1, z2, temperature, normalize=True, z_all=None, offset=0):
    """SimCLR NT-Xent over the 2N anchors of ``z = cat([z1, z2])``: each anchor's positive is its
    other view, the 2N-2 (or, with ``z_all``, all other gathered) rows are negatives, self excluded.

    DDP layout: ``z_all`` is the all-gather over ranks, in rank order, of each rank's
    ``cat([z1_r, z2_r])`` ((2N·world, C)), and ``offset`` is where this rank's block starts
    (``rank * 2N``). Local anchor a (0 <= a < 2N) then has self column offset + a and positive
    column offset + (a + N) mod 2N. Gradients flow to z1 and z2 through the anchors, and through
    the keys too if ``z_all`` requires grad (a differentiable all-gather routes them back);
    with a plain (no-grad) all-gather only the anchor side contributes. Loss = mean over 2N anchors.

    >>> loss = ntxent(torch.randn(8, 16), torch.randn(8, 16), 0.5)
    """
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)  # 2N x C
    keys = z if z_all is None else z_all
    if z_all is None and offset != 0:
        raise ValueError("offset is only meaningful with z_all")
    if not 0 <= offset <= keys.shape[0] - 2 * n:
        raise ValueError(f"offset={offset} puts the local block outside the {keys.shape[0]} gathered rows")
    self_index = _indices("ntxent_self", 2 * n, offset, z.device)
    pos_index = _indices("ntxent_pos", 2 * n, offset, z.device)
    return contrastive_lse(z, keys, temperature, pos_index=pos_index, self_index=self_index,
                           normalize_q=normalize, normalize_keys=normalize).mean()


__all__ = ["moco_infonce", "inbatch_infonce", "ntxent", "contrastive_lse", "contrastive_lse_reference"]
