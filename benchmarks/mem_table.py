"""Peak tensor memory of one training step (forward + loss + backward of the method) per config, on the CPU.

    python benchmarks/mem_table.py                       # the README's memory table (a few minutes on 2 cores)
    python benchmarks/mem_table.py --res 224 --batch 64  # other sizes (mind the host memory)

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

ARCHS = {"ViT-S/16": ("vit_small_patch16_224", 12), "ViT-B/16": ("vit_base_patch16_224", 12)}


def build(method: str, arch: str, heads: int, res: int):
    if method == "MoCo v3":
        net, d = build_backbone(arch, img_size=res, num_heads=heads)
        return MoCoV3(vit_init_(net), d, sync_bn=False, decay_all=True)
    student, d = build_backbone(arch, img_size=res, drop_path_rate=0.1)
    teacher, _ = build_backbone(arch, img_size=res)
    return DINO(student, d, teacher_backbone=teacher, freeze_last_layer=0)


def views(method: str, batch: int, res: int):
    g = torch.Generator().manual_seed(0)
    n_glob, n_loc = (2, 0) if method == "MoCo v3" else (2, 4)
    local = max(16, (res * 96 // 224) // 16 * 16)
    return [torch.rand(batch, 3, res, res, generator=g) for _ in range(n_glob)] + \
        [torch.rand(batch, 3, local, local, generator=g) for _ in range(n_loc)]


def measure(method: str, arch_name: str, ckpt: bool, batch: int, res: int) -> dict:
    arch, heads = ARCHS[arch_name]
    torch.manual_seed(0)
    m = build(method, arch, heads, res).train()
    if ckpt:
        enable_grad_checkpointing(m)
    x = views(method, batch, res)
    info = Step(0, 0, 1, 1, {"momentum": 0.99, "teacher_temp": 0.04})

    def step():
        m(x, info)["loss"].backward()

    step()  # gradients allocated, as in every later step
    peak, held = peak_cpu_memory(step)
    mib = 2 ** 20
    return {"method": method, "arch": arch_name, "grad_ckpt": ckpt, "batch": batch, "res": res,
            "crops": [tuple(v.shape[-2:]) for v in x], "held_mib": held / mib, "peak_mib": peak / mib,
            "act_mib": (peak - held) / mib}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=112)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    print("| method | backbone | crops | batch | --grad-ckpt | held MiB | peak MiB | activations MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ("MoCo v3", "DINO"):
        for arch in ARCHS:
            for ckpt in (False, True):
                r = measure(method, arch, ckpt, a.batch, a.res)
                rows.append(r)
                crops = "2×%d" % a.res + ("" if method == "MoCo v3" else " + 4×%d" % r["crops"][-1][0])
                print(f"| {method} | {arch} | {crops} | {a.batch} | {'yes' if ckpt else 'no'} | {r['held_mib']:.0f} | "
                      f"{r['peak_mib']:.0f} | {r['act_mib']:.0f} |", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
