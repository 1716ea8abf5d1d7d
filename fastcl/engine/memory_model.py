"""Memory of one training step per GPU, computed from counts: parameters, optimizer state, gradients under DDP /
ZeRO-1 / ZeRO-2, and the activations a ViT step saves for its backward -- for sizes no test machine can run.

The activation counts follow the ops of a timm ``Block`` (pre-norm, ``F.scaled_dot_product_attention``) one saved
tensor at a time, per token, for a width ``h``, MLP ratio ``m`` and ``a`` heads (``b`` = bytes per element):

========================  ===============================  =====================================
saved for the backward    fp32                             bf16 autocast
========================  ===============================  =====================================
norm1 input (residual)    4h                               4h (the residual stream stays fp32)
qkv input (norm1 out)     4h                               2h (autocast's bf16 copy)
q, k, v (qkv out)         12h                              6h
attention out = proj in   4h (a view: SDPA's output is     2h
                          laid out (B, N, heads, d))
norm2 input, fc1 input    4h + 4h                          4h + 2h
GELU input, fc2 input     4mh + 4mh                        2mh + 2mh
norm mean / rstd          16                               16
attention logsumexp       4a                               4a
========================  ===============================  =====================================

i.e. (32 + 8m)h (fp32) and (20 + 4m)h (bf16) bytes per token and block: 64h and 36h at m = 4. Fused (flash /
memory-efficient) attention saves no tokens x tokens matrix. With ``--grad-ckpt`` a block keeps only its input
(4h per token) and its activations exist again, one block at a time, while the backward replays it.
``tests/engine/test_memory_model.py`` checks these counts, and the peak built from them, against the allocator's
records of a real step on the CPU (fp32 and bf16 autocast, with and without checkpointing).

State per GPU, ``P`` trainable parameters, ``W`` data-parallel processes (DeepSpeed with fp32 parameters, as
``fastcl.engine.zero`` configures it): the model and its EMA teacher are whole on every GPU; gradients are 4P under
DDP (``p.grad`` is a view into DDP's all-reduce buckets: ``gradient_as_bucket_view``), 4P under ZeRO-1 (whole
gradients, partitioned only at the step) and 4P/W under ZeRO-2, both ZeRO stages plus DeepSpeed's reduce bucket
(``min(5e8, P)`` elements as ``fastcl.engine.zero`` sizes it); AdamW's two moments are 8P, or 8P/W under ZeRO-1/2,
which also keep an fp32 master copy of their partition (4P/W). Under bf16 autocast the forward keeps a bf16 copy of
every trained weight matrix for its backward (2 bytes per weight).
"""
from __future__ import annotations

from dataclasses import dataclass

from .zero import DS_BUCKET  # the reduce bucket's cap, as ZeroEngine configures DeepSpeed

MIB = 2 ** 20
GIB = 2 ** 30


@dataclass(frozen=True)
class ViTShape:
    dim: int
    depth: int
    heads: int
    patch: int
    mlp_ratio: float = 4.0
    prefix_tokens: int = 1  # the class token

    def tokens(self, res: int) -> int:
        return (res // self.patch) ** 2 + self.prefix_tokens


# the timm / DeiT / MoCo v3 shapes (ViT-H/14 as in MoCo v3's and DINOv2's tables)
VIT_SHAPES = {"ViT-S/16": ViTShape(384, 12, 6, 16), "ViT-B/16": ViTShape(768, 12, 12, 16),
              "ViT-L/16": ViTShape(1024, 24, 16, 16), "ViT-H/14": ViTShape(1280, 32, 16, 14),
              "ViT-S/8": ViTShape(384, 12, 6, 8), "ViT-B/8": ViTShape(768, 12, 12, 8)}


def block_bytes_per_token(v: ViTShape, amp: bool) -> float:
    """Bytes one transformer block saves for its backward per token (the table above)."""
    h, m = v.dim, v.mlp_ratio
    return ((20 + 4 * m) if amp else (32 + 8 * m)) * h + 16 + 4 * v.heads


def block_backward_bytes_per_token(v: ViTShape, amp: bool) -> float:
    """What one block's backward holds on top of the saved tensors, per token: the residual stream's gradient
    (fp32) and one MLP-wide gradient (fc2's saved input is released as GELU's input gradient appears)."""
    return 4 * v.dim + (2 if amp else 4) * v.mlp_ratio * v.dim


def vit_activations(v: ViTShape, forwards: list[tuple[int, int]], *, amp: bool, ckpt: bool,
                    patch_trainable: bool = True) -> dict[str, float]:
    """Bytes a trained ViT keeps for its backward over ``forwards`` = [(images, resolution), ...], one entry per
    backbone call (MoCo v3: one per view; DINO: one per resolution, its crops concatenated), and the most its
    backward adds on top at one moment.

    Returns ``saved`` (all blocks; the final norm's input; the patch projection's input -- the images, or their
    bf16 copy -- when that projection is trained: MoCo v3 freezes it) and ``backward`` (one block's gradients;
    with checkpointing also that block's replayed activations, for the largest call)."""
    b = 2 if amp else 4
    tokens = sum(n * v.tokens(r) for n, r in forwards)
    stem = sum(n * 3 * r * r for n, r in forwards) * b if patch_trainable else 0
    # final norm: its input (fp32) and mean/rstd; in fp32 the head's input is a view of the norm's output
    final = tokens * (4 * v.dim + 8 + (0 if amp else 4 * v.dim))
    per_block = block_bytes_per_token(v, amp)
    largest = max(n * v.tokens(r) for n, r in forwards)  # a backward runs one call's block at a time
    if ckpt:
        saved = stem + final + v.depth * tokens * 4 * v.dim  # each block's input
        backward = largest * (per_block + block_backward_bytes_per_token(v, amp))
    else:
        saved = stem + final + v.depth * tokens * per_block
        backward = largest * block_backward_bytes_per_token(v, amp)
    return {"saved": saved, "backward": backward}


def vit_params(v: ViTShape, res: int) -> int:
    """Parameters of a timm ViT without classifier (patch projection, cls token, position embedding, blocks,
    final norm)."""
    h, f = v.dim, int(v.dim * v.mlp_ratio)
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)  # 2 norms, qkv, proj, fc1, fc2
    return 3 * v.patch ** 2 * h + h + h + v.tokens(res) * h + v.depth * block + 2 * h


def vit_matrix_params(v: ViTShape) -> int:
    """Weights autocast copies to bf16 for the forward (the linear layers and the patch projection)."""
    h, f = v.dim, int(v.dim * v.mlp_ratio)
    return 3 * v.patch ** 2 * h + v.depth * (4 * h * h + 2 * h * f)


def state_bytes(*, trainable: int, frozen: int, zero_stage: int, world: int, optimizer_slots: int = 2,
                bucket: int = DS_BUCKET) -> dict[str, float]:
    """Bytes per GPU of the fp32 model state: ``trainable`` parameters (with gradients and optimizer state),
    ``frozen`` ones (EMA teachers, frozen patch projection: weights only). ``optimizer_slots`` = state tensors
    per parameter (AdamW 2, SGD with momentum 1, LARS 1). DDP (stage 0) counts ``p.grad``, which is a view
    into its buckets (``gradient_as_bucket_view=True``, as the Trainer wraps it); ZeRO-1 whole gradients,
    ZeRO-2 their partition, both plus one reduce bucket of ``min(bucket, trainable)`` elements."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    P = trainable
    out = {"params": 4.0 * (P + frozen)}
    if zero_stage == 0:
        out["grads"] = 4.0 * P
        out["optimizer"] = 4.0 * optimizer_slots * P
    else:
        shard = P / world
        out["grads"] = 4.0 * ((P if zero_stage == 1 else shard) + min(bucket, P))
        out["optimizer"] = 4.0 * (optimizer_slots + 1) * shard  # moments + the fp32 master partition
    return out
