"""Peak tensor memory of one training step (forward + loss + backward of the method) per config, on the CPU.

    python benchmarks/mem_table.py                       # the README's memory table (a few minutes on 2 cores)
    python benchmarks/mem_table.py --res 224 --batch 64  # other sizes (mind the host memory)
    python benchmarks/mem_table.py --device cuda --out mem_gpu.json   # on a GPU: bf16, batch 64 at 224, S/B/L
    python benchmarks/mem_table.py --computed          # per GPU from counts: ViT-S/B/L/H, ZeRO 0/1/2, 8 GPUs

Measured with ``fastcl.engine.memory.peak_cpu_memory``: the PyTorch profiler's allocator records (every CPU
tensor allocation and free, what ``torch.cuda.max_memory_allocated`` sees on a GPU). Reported per config:
``held`` = bytes held after the step (parameters, EMA teacher, gradients, buffers, inputs), ``peak`` = the most
held at once during the step, ``act`` = peak - held (activations and the backward's transients), fp32, one
process. Optimizer state is not included (AdamW adds 2 x the trainable parameters; ZeRO-1/2 divide it, and
ZeRO-2 the gradients, by the number of processes).

``--computed`` prints the same step per GPU for sizes no test machine runs, from counts (``computed`` below,
``fastcl.engine.memory_model``): bf16 autocast, batch 64 per GPU, AdamW, ``--world`` GPUs, under DDP / ZeRO-1 /
ZeRO-2, with and without ``--grad-ckpt``; ``tests/engine/test_memory_model.py`` checks the counts against the
allocator on the CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcl.engine.memory import peak_cpu_memory  # noqa: E402
from fastcl.methods.base import Step  # noqa: E402
from fastcl.methods.dino import DINO  # noqa: E402
from fastcl.methods.mocov3 import MoCoV3, vit_init_  # noqa: E402
from fastcl.models import build_backbone  # noqa: E402
from fastcl.models.checkpointing import enable_grad_checkpointing  # noqa: E402

ARCHS = {"ViT-S/16": ("vit_small_patch16_224", 12), "ViT-B/16": ("vit_base_patch16_224", 12),
         "ViT-L/16": ("vit_large_patch16_224", 16)}


def build(method: str, arch: str, heads: int, res: int):
    if method == "MoCo v3":
        net, d = build_backbone(arch, img_size=res, num_heads=heads)
        return MoCoV3(vit_init_(net), d, sync_bn=False, decay_all=True)
    student, d = build_backbone(arch, img_size=res, drop_path_rate=0.1)
    teacher, _ = build_backbone(arch, img_size=res)
    return DINO(student, d, teacher_backbone=teacher, freeze_last_layer=0)


def views(method: str, batch: int, res: int, device="cpu"):
    g = torch.Generator().manual_seed(0)
    n_glob, n_loc = (2, 0) if method == "MoCo v3" else (2, 4)
    local = max(16, (res * 96 // 224) // 16 * 16)
    return [torch.rand(batch, 3, res, res, generator=g).to(device) for _ in range(n_glob)] + \
        [torch.rand(batch, 3, local, local, generator=g).to(device) for _ in range(n_loc)]


# ---- computed: the same step from counts (fastcl.engine.memory_model), for sizes no test machine runs ----------

def head_activation_bytes(method: str, *, feat: int, rows: int, batch: int, n_global: int, amp: bool,
                          mlp_dim: int = 4096, dim: int = 256, K: int = 65536, hidden: int = 2048,
                          bottleneck: int = 256, fused_loss: bool | None = None) -> float:
    """Bytes the heads and the loss save for the backward over ``rows`` backbone outputs (every crop's images).

    The MLP parts are counted at 4 bytes per element in both precisions (each Linear's output and its BN / GELU
    output; under autocast the CPU casts BN inputs back to fp32, CUDA keeps them bf16: an upper bound there).
    DINO's K-wide terms are counted exactly: the last layer's weight W = g v / ||v|| (fp32, or its bf16 copy under
    autocast), and the loss -- the fused kernel keeps the student and teacher logits (bf16 under autocast), the
    torch reference one fp32 log-softmax per (teacher crop, student crop) pair and the teacher's softmax."""
    b = 2 if amp else 4
    fused = amp if fused_loss is None else fused_loss
    if method == "MoCo v3":  # projector [feat, mlp, mlp, dim] + BN everywhere, predictor [dim, mlp, dim]
        per_row = 4 * 2 * (mlp_dim + mlp_dim + dim) + 4 * 2 * mlp_dim + 4 * dim
        per_row += 4 * (2 * dim + 2 * rows // 2)  # the loss: unit queries / keys, a row of logits (both terms)
        return rows * per_row
    # DINO head [feat, hidden, hidden, bottleneck] with GELU, normalize, weight-normed last layer to K
    per_row = 4 * 2 * (hidden + hidden) + 4 * 2 * bottleneck + 4 * bottleneck
    out = rows * per_row + K * bottleneck * b
    n_crops = rows // batch
    if fused:
        out += (rows + n_global * batch) * K * b + 4 * rows
    else:
        pairs = n_global * n_crops - min(n_global, n_crops)
        out += (pairs + n_global) * batch * K * 4
    return out


def computed(method: str, arch_name: str, *, batch: int, res: int, amp: bool, ckpt: bool, zero_stage: int = 0,
             world: int = 1, n_local: int | None = None, local_res: int = 96, head_kw: dict | None = None,
             fused_loss: bool | None = None) -> dict:
    """One step's memory per GPU from counts. Parameters are counted on a meta-device build of the method (exact,
    no memory); activations from ``memory_model``'s per-token table and ``head_activation_bytes``."""
    from fastcl.engine.memory_model import (VIT_SHAPES, state_bytes, vit_activations,
                                            vit_matrix_params)
    v = VIT_SHAPES[arch_name] if isinstance(arch_name, str) else arch_name
    n_local = (0 if method == "MoCo v3" else 10) if n_local is None else n_local
    # backbone calls: MoCo v3 one per view, DINO one per resolution (its multi-crop wrapper)
    crops = [(batch, res)] * 2 if method == "MoCo v3" else \
        [(2 * batch, res)] + ([(n_local * batch, local_res)] if n_local else [])
    with torch.device("meta"):
        m = build_counting(method, v, res, head_kw or {})
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    patch_trainable = method != "MoCo v3"  # MoCo v3 freezes the patch projection (vit_init_)
    acts = vit_activations(v, crops, amp=amp, ckpt=ckpt, patch_trainable=patch_trainable)
    rows = sum(n for n, _ in crops)
    heads = head_activation_bytes(method, feat=v.dim, rows=rows, batch=batch, n_global=2, amp=amp,
                                  fused_loss=fused_loss, **(head_kw or {}))
    # autocast's bf16 copies of the trained weight matrices, kept for the backward (inside a checkpointed block
    # they are made again by the replay, one block at a time)
    copies = 0
    if amp:
        patch = 3 * v.patch ** 2 * v.dim
        mats = (0 if ckpt else vit_matrix_params(v) - patch) + (patch if patch_trainable else 0)
        head_mats = sum(mod.weight.numel() for name, mod in m.named_modules()
                        if isinstance(mod, torch.nn.Linear) and ("projector" in name or "predictor" in name
                                                                or name.startswith("student_head.mlp"))
                        and not name.startswith(("projector_k", "teacher")))
        copies = 2 * (mats + head_mats)
    state = state_bytes(trainable=trainable, frozen=frozen, zero_stage=zero_stage, world=world)
    act = acts["saved"] + acts["backward"] + heads + copies
    return {"method": method, "arch": str(arch_name), "batch": batch, "res": res, "amp": "bf16" if amp else "none",
            "grad_ckpt": ckpt, "zero_stage": zero_stage, "world": world, "crops": crops,
            "trainable": trainable, "frozen": frozen, **state, "activations": act,
            "saved": acts["saved"] + heads + copies, "backward_est": acts["backward"],
            "total": sum(state.values()) + act}


def build_counting(method: str, v, res: int, head_kw: dict):
    """The method with a ViT of shape ``v`` (a timm VisionTransformer), to count its parameters."""
    from timm.models.vision_transformer import VisionTransformer
    kw = dict(img_size=res, patch_size=v.patch, embed_dim=v.dim, depth=v.depth, num_heads=v.heads,
              mlp_ratio=v.mlp_ratio, num_classes=0, dynamic_img_size=True)
    if method == "MoCo v3":
        mk = {k: head_kw[k] for k in ("mlp_dim", "dim") if k in head_kw}
        return MoCoV3(vit_init_(VisionTransformer(**kw)), v.dim, sync_bn=False, decay_all=True, **mk)
    dk = {{"K": "out_dim", "hidden": "hidden_dim", "bottleneck": "bottleneck_dim"}[k]: x for k, x in head_kw.items()}
    return DINO(VisionTransformer(**kw), v.dim, teacher_backbone=VisionTransformer(**kw), freeze_last_layer=0, **dk)


def peak_cuda_memory(fn) -> tuple[int, int]:
    """(peak bytes, bytes held at the end) of CUDA tensors during ``fn``: torch.cuda.max_memory_allocated."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()


def measure(method: str, arch_name: str, ckpt: bool, batch: int, res: int, device: str = "cpu") -> dict:
    arch, heads = ARCHS[arch_name]
    torch.manual_seed(0)
    m = build(method, arch, heads, res).to(device).train()
    if ckpt:
        enable_grad_checkpointing(m)
    x = views(method, batch, res, device)
    info = Step(0, 0, 1, 1, {"momentum": 0.99, "teacher_temp": 0.04})
    cuda = device == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # (the engine's CUDA default)
            loss = m(x, info)["loss"]
        loss.backward()

    step()  # gradients allocated, as in every later step
    peak, held = peak_cuda_memory(step) if cuda else peak_cpu_memory(step)
    mib = 2 ** 20
    crops = [tuple(v.shape[-2:]) for v in x]
    del m, x
    if cuda:
        torch.cuda.empty_cache()
    return {"method": method, "arch": arch_name, "grad_ckpt": ckpt, "batch": batch, "res": res, "device": device,
            "amp": "bf16" if cuda else "none",
            "crops": crops, "held_mib": held / mib, "peak_mib": peak / mib,
            "act_mib": (peak - held) / mib}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: fp32, the profiler's allocator records; cuda: bf16 autocast, max_memory_allocated "
                        "(default: cpu)")
    p.add_argument("--batch", type=int, default=None, help="images per crop (default: 8 on cpu, 64 on cuda)")
    p.add_argument("--res", type=int, default=None, help="global crop size (default: 112 on cpu, 224 on cuda)")
    p.add_argument("--archs", default=None, help="comma list of " + ", ".join(ARCHS) +
                   " (default: ViT-S/16,ViT-B/16 on cpu, all on cuda)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--computed", action="store_true",
                   help="print the per-GPU table computed from counts (bf16, ViT-S/B/L/H, ZeRO 0/1/2) and exit")
    p.add_argument("--world", type=int, default=8, help="--computed: data-parallel GPUs (default: 8)")
    p.add_argument("--gpu-gib", type=float, default=79.2,
                   help="--computed: memory of one GPU, for the fit mark (default: 79.2, an 80 GB H100)")
    a = p.parse_args(argv)
    if a.computed:
        return print_computed(a.batch or 64, a.res or 224, a.world, a.gpu_gib, a.out)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    gpu = a.device == "cuda"
    a.batch = a.batch or (64 if gpu else 8)
    a.res = a.res or (224 if gpu else 112)
    archs = a.archs.split(",") if a.archs else (list(ARCHS) if gpu else ["ViT-S/16", "ViT-B/16"])
    bad = [x for x in archs if x not in ARCHS]
    if bad:
        p.error(f"--archs: unknown {bad} (have {list(ARCHS)})")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    print("| method | backbone | crops | batch | --grad-ckpt | held MiB | peak MiB | activations MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ("MoCo v3", "DINO"):
        for arch in archs:
            for ckpt in (False, True):
                try:
                    r = measure(method, arch, ckpt, a.batch, a.res, a.device)
                except torch.OutOfMemoryError:
                    print(f"| {method} | {arch} | | {a.batch} | {'yes' if ckpt else 'no'} | out of memory | | |",
                          flush=True)
                    torch.cuda.empty_cache()
                    continue
                rows.append(r)
                crops = "2×%d" % a.res + ("" if method == "MoCo v3" else " + 4×%d" % r["crops"][-1][0])
                print(f"| {method} | {arch} | {crops} | {a.batch} | {'yes' if ckpt else 'no'} | {r['held_mib']:.0f} | "
                      f"{r['peak_mib']:.0f} | {r['act_mib']:.0f} |", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))


def print_computed(batch: int, res: int, world: int, gpu_gib: float, out: str | None) -> None:
    G = 2 ** 30
    rows = []
    print(f"| method | backbone | crops | trained / EMA params | `--grad-ckpt` | activations GiB | "
          f"DDP GiB | ZeRO-1 GiB | ZeRO-2 GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in ("MoCo v3", "DINO"):
        archs = ("ViT-S/16", "ViT-B/16", "ViT-L/16", "ViT-H/14") + (("ViT-S/8", "ViT-B/8") if method == "DINO" else ())
        for arch in archs:
            for ckpt in (False, True):
                rs = [computed(method, arch, batch=batch, res=res, amp=True, ckpt=ckpt, zero_stage=z, world=world)
                      for z in (0, 1, 2)]
                rows += rs
                r = rs[0]
                crops = f"2×{res}" + ("" if method == "MoCo v3" else " + 10×96")
                cells = " | ".join(f"{x['total'] / G:.1f}" + ("" if x["total"] / G <= gpu_gib else " ✗") for x in rs)
                print(f"| {method} | {arch} | {crops} | {r['trainable'] / 1e6:.0f} M / {r['frozen'] / 1e6:.0f} M | "
                      f"{'yes' if ckpt else 'no'} | {r['activations'] / G:.1f} | {cells} |", flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
