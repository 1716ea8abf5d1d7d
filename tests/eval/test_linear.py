"""Linear probe: convergence on cached toy features, independent lr heads, the command end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from fastcl.eval.linear import LinearHeads, cached_batches, load_backbone, main, train_linear


def clusters(n_per_class, num_classes=10, dim=32, noise=0.5, seed=0):
    centres = F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)), dim=1) * 2
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + noise * torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed + 1)), y


def test_probe_on_cached_features_converges():
    x, y = clusters(100)
    xv, yv = clusters(30, seed=1)
    bs, epochs = 64, 10
    res = train_linear(cached_batches(x, y, bs), -(-len(x) // bs), xv, yv, 32, 10, [1.0, 10.0], epochs, bs,
                       log=None)
    assert res["best_top1"] >= 0.95 and res["best_lr"] in (1.0, 10.0)
    assert len(res["history"]) == epochs and len(res["top1"]) == 2
    assert res["history"][-1]["loss"][0] < res["history"][0]["loss"][0]
    json.dumps(res)  # the result is plain JSON


def test_heads_are_independent():
    """Training lrs [a, b] together gives head a exactly what training [a] alone gives."""
    x, y = clusters(20, num_classes=5, dim=8, noise=2.0)
    xv, yv = clusters(10, num_classes=5, dim=8, noise=2.0, seed=1)
    kw = dict(dim=8, num_classes=5, epochs=3, batch_size=16, log=None)
    both = train_linear(cached_batches(x, y, 16), 7, xv, yv, lrs=[0.5, 20.0], **kw)
    alone = train_linear(cached_batches(x, y, 16), 7, xv, yv, lrs=[0.5], **kw)
    for hb, ha in zip(both["history"], alone["history"]):
        assert hb["top1"][0] == ha["top1"][0]
        assert hb["loss"][0] == pytest.approx(ha["loss"][0], rel=1e-6)  # same rows, same order: fp-exact bar sums


def test_train_linear_rejects_bad_arguments():
    x, y = clusters(2)
    with pytest.raises(ValueError, match="learning rates"):
        train_linear(cached_batches(x, y, 8), 3, x, y, 32, 10, [0.0], 1, 8)
    with pytest.raises(ValueError, match="more than steps_per_epoch"):
        train_linear(cached_batches(x, y, 8), 1, x, y, 32, 10, [1.0], 1, 8, log=None)


def test_linear_heads_shape_and_init():
    h = LinearHeads(16, 7, 3)
    assert h(torch.randn(5, 16)).shape == (3, 5, 7)
    assert all(float(m.bias.detach().abs().max()) == 0 and float(m.weight.detach().std()) < 0.02 for m in h.heads)


def r18_backbone():
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    return net


def test_load_backbone_from_training_checkpoint(tmp_path):
    method = nn.Module()
    method.backbone, method.projector = r18_backbone(), nn.Linear(512, 4)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": method.state_dict(), "args": {"arch": "resnet18"}}, ckpt)
    net, arch, dim = load_backbone(ckpt)
    assert (arch, dim) == ("resnet18", 512) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(net(x), method.backbone.eval()(x), rtol=0, atol=0)


def test_bad_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_ckpt.pth"):
        main(["--checkpoint", str(tmp_path / "missing_ckpt.pth"), "--data", "cifar10"])
    bad = tmp_path / "weird.pth"
    torch.save({"epoch": 1}, bad)
    with pytest.raises(ValueError, match="weird.pth"):
        load_backbone(bad)


def colour_folder(root):
    """A 2-class ImageFolder (red vs blue squares): 8 train and 4 val images per class."""
    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("fastcl.data.imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, colour in enumerate(("red", "blue")):
            d = root / split / colour
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                img[..., 0 if c == 0 else 2] += 180
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_command_on_tiny_imagefolder(tmp_path):
    """--cache-features end to end on a 2-class ImageFolder (red vs blue squares), then the feature cache."""
    colour_folder(tmp_path / "data")
    ckpt = tmp_path / "backbone.pth"
    torch.save({"backbone": r18_backbone().state_dict(), "arch": "resnet18"}, ckpt)
    out, cache = tmp_path / "linear.json", tmp_path / "feats.pt"
    argv = ["--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--size", "16", "--epochs", "5",
            "--batch-size", "4", "--lr", "0.1", "1", "--workers", "0", "--device", "cpu", "--cache-features",
            "--feature-cache", str(cache), "--output", str(out)]
    res = main(argv)
    saved = json.loads(out.read_text())
    assert saved["best_top1"] == res["best_top1"] and saved["arch"] == "resnet18" and len(saved["history"]) == 5
    assert res["best_top1"] == 1.0  # colour is linearly separable even through a random ResNet
    assert cache.is_file()
    again = main(argv)  # second run reads the cached features: same result
    assert again["top1"] == res["top1"]
    # the augmented-images path (backbone in the loop, RandomResizedCrop + flip)
    argv = [a for a in argv if a not in ("--cache-features", "--feature-cache", str(cache))]
    aug = main([*argv[:argv.index("--epochs") + 1], "2", *argv[argv.index("--epochs") + 2:]])
    assert len(aug["history"]) == 2 and not aug["cached_features"] and 0 <= aug["best_top1"] <= 1


def test_a_training_set_smaller_than_one_batch_is_named_before_extraction(tmp_path, capsys):
    """The augmented-images path drops the last partial batch: 16 training images and --batch-size 32 is refused
    before any feature is extracted, naming the flags (was: "epochs and steps_per_epoch must be >= 1, got 1, 0"
    after the val features)."""
    colour_folder(tmp_path / "data")
    ckpt = tmp_path / "backbone.pth"
    torch.save({"backbone": r18_backbone().state_dict(), "arch": "resnet18"}, ckpt)
    with pytest.raises(ValueError, match=r"the training set has 16 images, fewer than one --batch-size 32: lower "
                                         r"--batch-size, or pass --cache-features"):
        main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--size", "16", "--epochs", "1",
              "--batch-size", "32", "--workers", "0", "--device", "cpu", "--output", str(tmp_path / "o.json")])
    assert "val features" not in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    """--output under a file: refused naming --output before the backbone is loaded (was: "[Errno 17] File
    exists" after the whole probe had trained, its result lost)."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"--output .*afile/o.json: cannot write there"):
        main(["--checkpoint", str(tmp_path / "never_read.pth"), "--data", "cifar10",
              "--output", str(tmp_path / "afile" / "o.json")])


def test_vit_features_follow_dinos_eval_linear(tmp_path):
    """ViT-S and smaller: CLS tokens of the last 4 blocks, each through the final norm; n=1 is timm's output."""
    import timm

    from fastcl.eval.export import export_backbone
    from fastcl.eval.linear import ViTLinearFeatures, load_backbone

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False, img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ViTLinearFeatures(vit, 1)(x), vit(x))
        ref = []  # the same by hand: run the blocks, keep the normed CLS of the last 4
        h = vit._pos_embed(vit.patch_embed(x))
        for i, blk in enumerate(vit.blocks):
            h = blk(h)
            if i >= len(vit.blocks) - 4:
                ref.append(vit.norm(h)[:, 0])
        avg = vit.norm(h)[:, 1:].mean(1)
        torch.testing.assert_close(ViTLinearFeatures(vit, 4)(x), torch.cat(ref, 1))
        torch.testing.assert_close(ViTLinearFeatures(vit, 4, True)(x), torch.cat(ref + [avg], 1))
    export_backbone({"backbone": vit.state_dict(), "arch": "vit_tiny_patch16_224"}, out_path=tmp_path / "v.pth")
    net, _, dim = load_backbone(tmp_path / "v.pth")
    assert isinstance(net, ViTLinearFeatures) and dim == 4 * 192  # DINO's default for the small ViTs
    net, _, dim = load_backbone(tmp_path / "v.pth", n_last_blocks=1, avgpool_patchtokens=False)
    assert dim == 192 and not isinstance(net, ViTLinearFeatures)


def test_train_and_val_subsets(tmp_path, capsys):
    """--train-samples / --val-samples: fixed random subsets of the asked size (the same on a rerun), a
    progress bar per extraction, and a feature cache keyed by the subset."""
    colour_folder(tmp_path / "data")
    ckpt = tmp_path / "backbone.pth"
    torch.save({"backbone": r18_backbone().state_dict(), "arch": "resnet18"}, ckpt)
    from fastcl.eval.linear import build_dataset, subset

    full = build_dataset(str(tmp_path / "data"), "train", None)
    a, b = subset(full, 6, seed=3), subset(full, 6, seed=3)
    assert len(a) == 6 and list(a.indices) == list(b.indices) and a.num_classes == 2
    assert list(subset(full, 6, seed=4).indices) != list(a.indices) or len(full) < 8
    assert subset(full, 0, 0) is full and subset(full, 100, 0) is full
    argv = ["--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--size", "16", "--epochs", "1",
            "--batch-size", "4", "--lr", "1", "--workers", "0", "--device", "cpu", "--cache-features",
            "--train-samples", "6", "--val-samples", "3", "--feature-cache", str(tmp_path / "f.pt"),
            "--output", str(tmp_path / "o.json")]
    main(argv)
    stored = torch.load(tmp_path / "f.pt")
    assert len(stored["train"][0]) == 6 and len(stored["val"][0]) == 3
    assert stored["key"]["train_samples"] == 6 and stored["key"]["val_samples"] == 3
    err = capsys.readouterr().err
    assert "linear: val features" in err and "linear: train features" in err
    with pytest.raises(ValueError, match="--feature-cache"):  # the same cache for another subset is refused
        main([*argv[:argv.index("--train-samples") + 1], "5", *argv[argv.index("--train-samples") + 2:]])
    with pytest.raises(ValueError, match="--train-samples must be >= 0"):
        main([*argv, "--train-samples", "-1"])
