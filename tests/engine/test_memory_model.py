"""The computed memory model (``fastcl.engine.memory_model``, ``benchmarks/mem_table.py --computed``) against a real
step on the CPU: MoCo v3 and DINO on a small ViT, fp32 and bf16 autocast, with and without ``--grad-ckpt``.

Two measurements: the bytes autograd saves for the backward (distinct storages, parameters and inputs excluded),
which the per-token table must give to within a few percent, and the peak of the allocator's records over forward
+ backward above what the step holds anyway (parameters, EMA teacher, inputs), which the model's activations plus
one block's backward -- or, once activations are small, the gradients plus the replayed block -- must give to within
15 %. The sizes are chosen so that activations, not the CPU's conv workspaces, make the peak. ZeRO's state per rank
is checked against DeepSpeed's own buffers in ``test_zero.py``."""
import importlib.util
from pathlib import Path

import pytest
import torch

from fastcl.engine.memory import peak_cpu_memory, saved_activation_bytes
from fastcl.engine.memory_model import VIT_SHAPES, ViTShape, state_bytes, vit_params
from fastcl.methods.base import Step
from fastcl.models.checkpointing import enable_grad_checkpointing

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mem_table", ROOT / "benchmarks" / "mem_table.py")
mem_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mem_table)

SHAPE = ViTShape(192, 4, 3, 16)
HEADS = {"MoCo v3": dict(mlp_dim=512, dim=64), "DINO": dict(K=4096, hidden=512, bottleneck=64)}
INFO = Step(0, 0, 1, 1, {"momentum": 0.99, "teacher_temp": 0.04})


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "grad_ckpt"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["MoCo v3", "DINO"])
def test_computed_step_memory_matches_the_allocator(method, amp, ckpt):
    batch, res, n_local, local_res = 16, 128, (0 if method == "MoCo v3" else 4), 64
    torch.manual_seed(0)
    m = mem_table.build_counting(method, SHAPE, res, HEADS[method]).train()
    if ckpt:
        enable_grad_checkpointing(m)
    g = torch.Generator().manual_seed(0)
    x = [torch.rand(batch, 3, res, res, generator=g) for _ in range(2)] + \
        [torch.rand(batch, 3, local_res, local_res, generator=g) for _ in range(n_local)]

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return m(x, INFO)["loss"]

    forward().backward()  # (first-step allocations out of the way)
    saved = saved_activation_bytes(forward, exclude=[*m.parameters(), *m.buffers(), *x])
    for p in m.parameters():
        p.grad = None  # the engine's zero_grad(set_to_none=True)
    peak, end = peak_cpu_memory(lambda: forward().backward())
    grads = sum(4 * p.grad.numel() for p in m.parameters() if p.grad is not None)
    above_static = peak - (end - grads)

    c = mem_table.computed(method, SHAPE, batch=batch, res=res, amp=amp, ckpt=ckpt, n_local=n_local,
                           local_res=local_res, head_kw=HEADS[method], fused_loss=False)
    assert c["trainable"] * 4 == grads
    assert abs(c["saved"] / saved - 1) < 0.10, (saved, c["saved"])
    est = max(c["activations"], grads + c["backward_est"])
    assert abs(est / above_static - 1) < 0.15, (above_static, est)


@pytest.mark.parametrize("name", ["ViT-S/16", "ViT-B/16", "ViT-L/16", "ViT-H/14"])
def test_vit_parameter_count_is_timm_s(name):
    from timm.models.vision_transformer import VisionTransformer
    v = VIT_SHAPES[name]
    with torch.device("meta"):
        net = VisionTransformer(img_size=224, patch_size=v.patch, embed_dim=v.dim, depth=v.depth, num_heads=v.heads,
                                num_classes=0)
    assert vit_params(v, 224) == sum(p.numel() for p in net.parameters())


def test_state_bytes_per_stage():
    P, F = 1000, 300
    ddp = state_bytes(trainable=P, frozen=F, zero_stage=0, world=8)
    assert ddp == {"params": 4 * 1300, "grads": 4 * P, "optimizer": 8 * P}  # p.grad = DDP bucket views; AdamW 2
    z1 = state_bytes(trainable=P, frozen=F, zero_stage=1, world=8)
    z2 = state_bytes(trainable=P, frozen=F, zero_stage=2, world=8)
    assert z1["optimizer"] == z2["optimizer"] == 4 * 3 * P / 8  # moments + fp32 master partition
    assert z1["grads"] == 4 * (P + P) and z2["grads"] == 4 * (P / 8 + P)  # + the reduce bucket, min(5e8, P)
    with pytest.raises(ValueError, match="zero_stage"):
        state_bytes(trainable=P, frozen=F, zero_stage=3, world=8)
