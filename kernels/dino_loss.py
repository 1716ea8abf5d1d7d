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

from . import use_triton

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
    if use_triton(student_out, teacher_out, center) and _triton_dino is not None:
        return _triton_dino(student_out, teacher_out, center, student_temp, teacher_temp, n_global_crops)
    return dino_loss_reference(student_out, teacher_out, center, student_temp, teacher_temp, n_global_crops)


_triton_dino = None

__all__ = ["dino_loss", "dino_loss_reference"]
