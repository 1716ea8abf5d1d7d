"""Backbone export: round trips into torchvision ResNets (missing exactly fc.*) and timm ViTs (strict)."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from fastcl.eval.export import backbone_state_dict, export_backbone, load_into_reference, main, read_checkpoint


def resnet_backbone(arch: str) -> nn.Module:
    """Built directly (not through fastcl.models), as the backbones module documents them."""
    net = getattr(torchvision.models, arch.removesuffix("_cifar"))(weights=None)
    if arch.endswith("_cifar"):
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class ToyMethod(nn.Module):
    """Stands in for a method: a backbone plus other modules whose keys must not leak into the export."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Linear(dim, 8)
        self.backbone_k = nn.Linear(3, 3)  # a momentum encoder: prefix "backbone_k." is not "backbone."


def perturb_bn(net: nn.Module) -> nn.Module:
    """Non-default BN statistics, so a dropped buffer would show up in the outputs."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


@pytest.mark.parametrize("arch, size", [("resnet18", 32), ("resnet18_cifar", 16)])  # small inputs: speed
def test_training_checkpoint_to_torchvision(tmp_path, arch, size):
    torch.manual_seed(0)
    method = ToyMethod(perturb_bn(resnet_backbone(arch)), 512)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": method.state_dict(), "optimizer": {}, "args": {"arch": arch}}, ckpt)
    out = tmp_path / "backbone.pth"
    main(["--checkpoint", str(ckpt), "--out", str(out)])

    obj = torch.load(out, map_location="cpu")
    assert obj["arch"] == arch and set(obj) == {"backbone", "arch", "model_kwargs"} and obj["model_kwargs"] == {}
    sd = obj["backbone"]
    net = torchvision.models.resnet18()
    if arch.endswith("_cifar"):
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = nn.Identity()
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(net.eval()(x), method.backbone.eval()(x), rtol=0, atol=0)


def test_bare_torchvision_format_and_prefixes(tmp_path):
    backbone = resnet_backbone("resnet18")
    # a DDP-wrapped, torch.compile'd method as saved by some trainers
    model_sd = {f"module._orig_mod.{k}": v for k, v in ToyMethod(backbone, 512).state_dict().items()}
    out = tmp_path / "r18.pth"
    export_backbone({"model": model_sd, "config": {"extra": {"arch": "resnet18"}}}, None, out, fmt="torchvision")
    sd = torch.load(out, map_location="cpu")
    assert set(sd) == set(backbone.state_dict())
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    # a bare file reads back as a backbone (arch then has to come from the caller)
    assert backbone_state_dict(read_checkpoint(out))[1] is None


def test_vit_to_timm_strict(tmp_path):
    arch = "vit_tiny_patch16_224"
    vit = timm.create_model(arch, num_classes=0, pretrained=False)
    src = tmp_path / "exported.pth"
    torch.save({"backbone": vit.state_dict(), "arch": arch}, src)
    out = tmp_path / "vit.pth"
    main(["--checkpoint", str(src), "--out", str(out), "--format", "timm"])
    sd = torch.load(out, map_location="cpu")
    ref = timm.create_model(arch, num_classes=0, pretrained=False)
    ref.load_state_dict(sd, strict=True)
    # equal weights is what strict loading guarantees; a 224px forward would cost seconds on 2 cores
    for (k, a), (k2, b) in zip(ref.state_dict().items(), vit.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_vit_other_resolution():
    """A ViT trained at 64px (4x4 patch grid): load_into_reference reads img_size off pos_embed."""
    arch = "vit_tiny_patch16_224"
    vit = timm.create_model(arch, num_classes=0, pretrained=False, img_size=64).eval()
    obj = export_backbone({"backbone": vit.state_dict(), "arch": arch}, fmt="timm")  # verify=True loads it
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(load_into_reference(obj, arch).eval()(x), vit(x), rtol=0, atol=0)


def test_vit_head_count_travels_with_the_weights(tmp_path):
    """MoCo v3's ViT-S has 12 heads, timm's 6: the qkv weights fit both, so only the recorded num_heads keeps the
    exported / probed model the trained function (here vit_tiny, 3 heads by default, trained with 6)."""
    from fastcl.eval.linear import load_backbone
    from fastcl.models import build_backbone

    arch = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    vit, _ = build_backbone(arch, img_size=32, patch_size=8, num_heads=6)
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    ckpt = {"model": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "args": {"arch": arch, "num_heads": 6}}
    obj = export_backbone(ckpt, fmt="fastcl", out_path=tmp_path / "vit.pth")
    assert obj["model_kwargs"] == {"num_heads": 6}
    torch.testing.assert_close(load_into_reference(obj["backbone"], arch, **obj["model_kwargs"]).eval()(x), vit(x))
    net, _, _ = load_backbone(tmp_path / "vit.pth", n_last_blocks=1)  # the linear probe's loader reads them too
    torch.testing.assert_close(net(x), vit(x))
    wrong = load_into_reference(obj["backbone"], arch).eval()(x)  # timm's default 3 heads: loads, computes else
    assert (wrong - vit(x)).abs().max() > 1e-3


def test_dino_checkpoint_exports_the_teacher(tmp_path):
    """DINO evaluates (and so exports) its teacher, kept under "teacher_backbone.", not "backbone."."""
    from fastcl.methods.dino import DINO
    from fastcl.models import build_backbone

    arch = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    student, dim = build_backbone(arch, img_size=32, patch_size=8)
    dino = DINO(student, dim, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    with torch.no_grad():  # a teacher that differs from the student, so exporting the wrong one shows
        for p in dino.teacher_backbone.parameters():
            p.add_(0.01)
    for extra in ({}, {"backbone_prefix": "teacher_backbone."}):  # old checkpoints, and ones naming the prefix
        obj = export_backbone({"model": dino.state_dict(), "args": {"arch": arch}, **extra}, fmt="fastcl")
        assert set(obj["backbone"]) == set(dino.teacher_backbone.state_dict())
        for k, v in dino.teacher_backbone.state_dict().items():
            assert torch.equal(obj["backbone"][k], v), k


def test_errors_name_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        export_backbone(missing, "resnet18")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pth"):
        export_backbone(garbage, "resnet18")
    neither = tmp_path / "neither.pth"
    torch.save({"epoch": 3, "state": {"a": 1}}, neither)
    with pytest.raises(ValueError, match="neither.pth.*no 'backbone' or 'model'"):
        export_backbone(neither, "resnet18")
    with pytest.raises(SystemExit):  # the CLI turns it into one line on stderr and exit status 1
        main(["--checkpoint", str(missing), "--out", str(tmp_path / "o.pth")])
    assert "nope.pth" in capsys.readouterr().err


def test_an_out_that_cannot_be_written_is_one_error_line(tmp_path, capsys):
    """--out under a file, or at a folder: one error line naming --out, before the checkpoint is read (was:
    "error: [Errno 17] File exists: ..." naming no flag; an unwritable --out raised an OSError traceback)."""
    (tmp_path / "afile").write_text("x")
    missing = tmp_path / "not_read.pth"  # never read: the --out check comes first
    for out, said in ((tmp_path / "afile" / "x.pth", "cannot write there"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(missing), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(f"error: --out {out}") and said in err, err


def test_arch_checks():
    sd = resnet_backbone("resnet18").state_dict()
    with pytest.raises(ValueError, match="pass --arch"):
        export_backbone({"backbone": sd})
    with pytest.raises(ValueError, match="trained with resnet18"):
        export_backbone({"backbone": sd, "arch": "resnet18"}, "resnet50")
    with pytest.raises(ValueError, match="--format timm is for ViTs"):
        export_backbone({"backbone": sd, "arch": "resnet18"}, fmt="timm")
    with pytest.raises(ValueError, match="do not match torchvision"):  # wrong-width keys caught by verify
        export_backbone({"backbone": {**sd, "extra.weight": torch.zeros(1)}, "arch": "resnet18"})


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_load_backbone_rebuilds_the_cifar_stem(tmp_path, source):
    """fastcl.models.load_backbone: the default CIFAR run's ResNet-18 (3x3 stem, no max-pool) comes back as
    that module from the training checkpoint or its export, the same function as the trained backbone."""
    from fastcl.models import load_backbone

    torch.manual_seed(0)
    method = ToyMethod(perturb_bn(resnet_backbone("resnet18_cifar")), 512)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": method.state_dict(), "args": {"arch": "resnet18_cifar"}}, ckpt)
    path = ckpt
    if source == "export":
        path = tmp_path / "resnet18_cifar.pth"
        main(["--checkpoint", str(ckpt), "--out", str(path)])
    net = load_backbone(path)
    assert net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, nn.Identity) and not net.training
    assert net.fastcl_arch == "resnet18_cifar"
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), method.backbone.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="resnet50 .*given but the checkpoint was trained with resnet18_cifar"):
        load_backbone(path, arch="resnet50")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone(tmp_path / "nope.pth")
