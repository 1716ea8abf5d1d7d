"""Peak tensor memory of one training step (forward + loss + backward of the method) per config, on the CPU.

    python benchmarks/mem_table.py                       # the README's memory table (a few minutes on 2 cores)
    python benchmarks/mem_table.py --res 224 --batch 64  # other sizes (mind the host memory)
    python benchmarks/mem_table.py --device cuda --out mem_gpu.json   # on a GPU: bf16, batch 64 at 224, S/B/L

Measured with ``fastcl.engine.memory.peak_cpu_memory``: the PyTorch profiler's allocator records (every CPU
tensor allocation and free, what ``torch.cuda.max_memory_allocated`` sees on a GPU). Reported per config:
``held`` = bytes held after the step (parameters, EMA teacher, gradients, buffers, inputs), ``peak`` = the most
held at once during the step, ``act`` = peak - held (activations and the backward's transients), fp32, one
process. Optimizer state is not included (AdamW adds 2 x the trainable parameters; ZeRO-1/2 divide it, and
ZeRO-2 the gradients, by the number of processes).
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
    a = p.parse_args(argv)
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


if __name__ == "__main__":
    main()
