"""The ViT-B/L recipes (mocov3_vitb16, mocov3_vitl16, dino_vitb16): their presets are the papers' / released runs'
settings, their models have the sizes the names say (built on the meta device: no memory, no time), and each
recipe trains two steps on real CIFAR-10 images on the CPU, one of them with --grad-ckpt."""
import json
import math

import pytest
import torch

from fastcl import cli
from recipe_loader import load_recipe

SMOKE = ["--train-samples", "16", "--batch-size", "8", "--max-steps", "2", "--no-knn", "--workers", "0",
         "--data-backend", "torch", "--log-every", "1"]


def _args(name, argv=()):
    r = load_recipe(name)
    parser = r.get_args_parser() if hasattr(r, "get_args_parser") else r.dino.get_args_parser()
    return r, cli.parse_args(parser, r.PRESETS, list(argv))


@pytest.mark.parametrize("name, arch, heads, blocks, width, params_m", [
    ("mocov3_vitb16", "vit_base_patch16_224", 12, 12, 768, 85.8),
    ("mocov3_vitl16", "vit_large_patch16_224", 16, 24, 1024, 303.3),
    ("dino_vitb16", "vit_base_patch16_224", 12, 12, 768, 85.8),
])
def test_imagenet_presets_and_model_sizes(name, arch, heads, blocks, width, params_m):
    r, a = _args(name, ["--data", "/imagenet"])
    assert a.arch == arch
    with torch.device("meta"):
        m = (r.build_method if hasattr(r, "build_method") else r.dino.build_method)(a)
    vit = m.student_backbone if name.startswith("dino") else m.backbone
    assert len(vit.blocks) == blocks and vit.embed_dim == width and vit.blocks[0].attn.num_heads == heads
    n = sum(p.numel() for p in vit.parameters())
    assert n / 1e6 == pytest.approx(params_m, abs=0.1)
    if name.startswith("mocov3"):  # moco-v3 CONFIG.md: -b 4096 --lr=1.5e-4 --weight-decay=.1 --epochs=300
        assert (a.batch_size, a.lr, a.wd, a.epochs, a.warmup_epochs, a.optimizer) == (4096, 1.5e-4, 0.1, 300, 40, "adamw")
        assert (a.moco_t, a.moco_m, a.moco_m_end, a.patch_size, a.mlp_dim, a.dim) == (0.2, 0.99, 1.0, 16, 4096, 256)
        assert not any(p.requires_grad for p in vit.patch_embed.parameters())  # frozen random patch projection
    else:  # dino_vitbase16_pretrain args.txt
        assert (a.batch_size, a.lr, a.min_lr, a.epochs, a.warmup_epochs, a.clip_grad_param) == (
            1024, 0.00075, 2e-6, 400, 10, 0.3)
        assert (a.freeze_last_layer, a.warmup_teacher_temp_epochs, a.teacher_temp, a.norm_last_layer) == (3, 50, 0.07, True)
        assert (tuple(a.global_crops_scale), tuple(a.local_crops_scale), a.local_crops_number, a.out_dim) == (
            (0.25, 1.0), (0.05, 0.25), 10, 65536)
        assert (a.wd, a.wd_end, a.drop_path, a.momentum_teacher) == (0.04, 0.4, 0.1, 0.996)


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("mocov3_vitb16", ["--grad-ckpt"]),
    ("mocov3_vitl16", ["--arch", "vit_base_patch16_224"]),  # (the recipe's code path; ViT-L's 300 M weights x 4
    #                                                          copies would not fit the 2-core test box's share)
    ("dino_vitb16", ["--local-crops-number", "2"]),
])
def test_recipe_trains_two_steps_on_cifar10(name, extra, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        res = load_recipe(name).main([*SMOKE, "--out", str(tmp_path), *extra])
    finally:
        torch.set_num_threads(threads)
    assert res["step"] == 2
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False, map_location="cpu")
    assert ckpt["args"]["grad_ckpt"] == ("--grad-ckpt" in extra)
    assert (tmp_path / "backbone.pth").exists()
