"""Export a pretrained backbone so the public model classes load it.

Launch:

    python -m fastcl.eval.export --checkpoint runs/mocov2_r50/checkpoint.pth --out r50_mocov2.pth
    python -m fastcl.eval.export --checkpoint runs/dino_vits16/checkpoint.pth --out vits16.pth --format timm

Input: a fastcl training checkpoint (``"model"``: the method's state_dict, backbone keys prefixed
``backbone.``; the arch from ``"args"["arch"]`` or ``"config"["extra"]["arch"]``), an already exported
``{"backbone": sd, "arch": name}`` file, or a bare backbone state_dict. ``module.`` (DDP) and
``_orig_mod.`` (torch.compile) prefixes are stripped.

Output (``--format fastcl``, the default): ``{"backbone": sd, "arch": name, "model_kwargs": {...}}``
(``model_kwargs``: what the weights cannot tell, e.g. MoCo v3's ``num_heads=12`` ViT-S); ``--format torchvision`` or
``--format timm``: the bare ``sd``. Loading it:

    # ResNets: everything but the classifier, which the backbone replaced by Identity
    sd = torch.load("r50_mocov2.pth")["backbone"]
    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    # resnet*_cifar: first net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = nn.Identity()

    # ViTs: strict (the head is absent on both sides). A ViT trained at another resolution or patch size
    # needs img_size=<that size>, patch_size=<that patch>; reference_model() reads both off the weights.
    # The head count is not in the weights: pass the recorded model_kwargs (MoCo v3 ViT-S: num_heads=12).
    net = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False)
    net.load_state_dict(torch.load("vits16.pth"))

``export_backbone`` checks exactly this (``verify=True``) before writing.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["read_checkpoint", "backbone_state_dict", "model_kwargs_of", "reference_model", "load_into_reference",
           "export_backbone", "get_args_parser"]

# Constructor arguments of a backbone that its state_dict does not determine (a ViT's attention head count:
# the qkv weights have the same shape for 6 or 12 heads, so a wrong count loads strictly and computes garbage).
MODEL_KWARGS = ("num_heads",)

FORMATS = ("fastcl", "torchvision", "timm")
_RESNET_HEAD = {"fc.weight", "fc.bias"}


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` on the CPU; FileNotFoundError / ValueError naming ``path`` if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torn, foreign or not a torch file: say which
        raise ValueError(f"checkpoint {path}: cannot be read by torch.load ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return dict(ckpt)


def _clean_key(k: str) -> str:
    k = k.replace("_orig_mod.", "")  # torch.compile wrappers, at any depth
    return k.removeprefix("module.")  # DistributedDataParallel


def _arch_of(ckpt: Mapping) -> str | None:
    if isinstance(ckpt.get("arch"), str):
        return ckpt["arch"]
    args = ckpt.get("args")
    if args is not None:
        arch = args.get("arch") if isinstance(args, Mapping) else getattr(args, "arch", None)
        if arch:
            return arch
    cfg = ckpt.get("config")
    if isinstance(cfg, Mapping):
        extra = cfg.get("extra")
        return cfg.get("arch") or (extra.get("arch") if isinstance(extra, Mapping) else None)
    return None


def model_kwargs_of(ckpt: Mapping) -> dict:
    """The recorded ``MODEL_KWARGS`` (``"model_kwargs"`` of an export / backbone.pth, else the recipe's args)."""
    if isinstance(ckpt.get("model_kwargs"), Mapping):
        return dict(ckpt["model_kwargs"])
    args = ckpt.get("args")
    if isinstance(args, Mapping):
        return {k: args[k] for k in MODEL_KWARGS if args.get(k) is not None}
    return {}


def check_public_backbone(ckpt: Mapping, source: str) -> None:
    """Export and the linear probe rebuild torchvision ResNets and timm ViTs; a method-specific encoder
    (CMC's two half-width Lab encoders, CPC v2's patch-grid encoder) has no such counterpart: say so."""
    cls = ckpt.get("backbone_class")
    if isinstance(cls, str) and cls.startswith("fastcl."):
        raise ValueError(f"{source}: the backbone is {cls}, a fastcl encoder with no torchvision/timm "
                         "counterpart; export and the linear probe take ResNet and ViT backbones (evaluate it "
                         "with the kNN monitor, or load the checkpoint's 'model' into the method)")


def backbone_state_dict(ckpt: Mapping, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str | None]:
    """Pull ``(backbone_sd, arch or None)`` out of any supported checkpoint dict.

    Raises:
        ValueError naming ``source`` when the dict has neither ``"backbone"`` nor ``"model"`` and is not a
        bare state_dict, or when ``"model"`` holds no backbone keys (under ``"backbone_prefix"``, default
        ``backbone.`` or DINO's ``teacher_backbone.``).
    """
    if "backbone" in ckpt and isinstance(ckpt["backbone"], Mapping):
        sd = ckpt["backbone"]
    elif "model" in ckpt and isinstance(ckpt["model"], Mapping):
        model = {_clean_key(k): v for k, v in ckpt["model"].items()}
        # The trainer records where the method keeps its backbone (DINO: the teacher's, "teacher_backbone.");
        # older checkpoints lack the key and use "backbone." or DINO's teacher.
        prefixes = [ckpt["backbone_prefix"]] if ckpt.get("backbone_prefix") else ["backbone.", "teacher_backbone."]
        sd = {}
        for prefix in prefixes:
            sd = {k.removeprefix(prefix): v for k, v in model.items() if k.startswith(prefix)}
            if sd:
                break
        if not sd:
            raise ValueError(f"{source}: 'model' has no {' or '.join(f'{p}*' for p in prefixes)} keys "
                             f"(found e.g. {sorted(model)[:3]})")
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt  # a bare state_dict (--format torchvision / timm)
    else:
        raise ValueError(f"{source}: no 'backbone' or 'model' key (keys: {sorted(map(str, ckpt))[:8]}); "
                         "expected a fastcl training checkpoint or an exported backbone")
    return {_clean_key(k): v for k, v in sd.items()}, _arch_of(ckpt)


def _is_resnet(arch: str) -> bool:
    """A torchvision CNN (ResNet or RegNetY): loads with fc.weight / fc.bias missing."""
    from ..models.backbones import is_torchvision_cnn

    return is_torchvision_cnn(arch) or arch.removesuffix("_cifar").startswith("resnet")


def reference_model(arch: str, sd: Mapping[str, torch.Tensor] | None = None, **model_kwargs) -> nn.Module:
    """The public model an exported backbone loads into (the recipe in the module docstring).

    ``resnet*``: ``torchvision.models.<arch>()`` (with the 3x3 stem / no max-pool for ``*_cifar``);
    ViTs: ``timm.create_model(arch, num_classes=0, pretrained=False)``, with ``img_size`` and ``patch_size``
    read off ``sd["pos_embed"]`` and ``sd["patch_embed.proj.weight"]`` (other resolutions, CIFAR patches)
    and ``model_kwargs`` (``num_heads``) passed on.
    """
    if _is_resnet(arch):
        import torchvision

        from ..models.backbones import is_torchvision_cnn, torchvision_cnn

        base = arch.removesuffix("_cifar")
        if not is_torchvision_cnn(arch) and not hasattr(torchvision.models, base):
            raise ValueError(f"unknown ResNet {arch!r}")
        return torchvision_cnn(arch) if is_torchvision_cnn(arch) else getattr(torchvision.models, base)(weights=None)
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"unknown architecture {arch!r}: neither a torchvision ResNet nor a timm model")
    kw = {}
    if sd is not None and "pos_embed" in sd and "patch_embed.proj.weight" in sd:
        patch = sd["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)  # minus the class token
        if grid * grid == sd["pos_embed"].shape[1] - 1:
            kw["img_size"] = grid * patch
        kw["patch_size"] = patch  # the CIFAR presets train e.g. vit_small_patch8_224 with 4px patches
    return timm.create_model(arch, num_classes=0, pretrained=False, **kw, **model_kwargs)


def load_into_reference(sd: Mapping[str, torch.Tensor], arch: str, **model_kwargs) -> nn.Module:
    """Build ``reference_model(arch)`` and load ``sd`` the documented way; raise if any key is off.

    ResNets load with ``strict=False`` and must miss exactly ``fc.weight, fc.bias`` (the head is then
    replaced by Identity, so the returned module maps images to (B, ``net.num_features``) features); ViTs
    load strictly. The model
    is built on the meta device and takes ``sd``'s tensors (``assign=True``): no random init to pay for.
    """
    with torch.device("meta"):
        net = reference_model(arch, sd, **model_kwargs)
    if _is_resnet(arch):
        missing, unexpected = net.load_state_dict(sd, strict=False, assign=True)
        if set(missing) != _RESNET_HEAD or unexpected:
            raise ValueError(f"{arch}: backbone keys do not match torchvision: missing "
                             f"{sorted(set(missing) - _RESNET_HEAD)}, unexpected {sorted(unexpected)}")
        net.num_features = net.fc.in_features  # the feature width, as timm models expose it
        net.fc = nn.Identity()
    else:
        net.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if t.is_meta]
    if left:  # non-persistent buffers a state_dict cannot carry
        raise ValueError(f"{arch}: {left[:4]} not set by the state_dict")
    return net


def export_backbone(checkpoint: str | Path | Mapping, arch: str | None = None, out_path: str | Path | None = None,
                    fmt: str = "fastcl", verify: bool = True) -> dict:
    """Extract the backbone from ``checkpoint`` (a path or an in-memory checkpoint / state_dict).

    Args:
        arch: backbone name; default: the one recorded in the checkpoint. Must agree with it if both exist.
        out_path: where to write (atomically); ``None`` only returns the object.
        fmt: ``"fastcl"`` -> ``{"backbone": sd, "arch": arch, "model_kwargs": kw}``; ``"torchvision"`` /
            ``"timm"`` -> bare sd (build the model with ``model_kwargs_of(checkpoint)`` yourself).
        verify: load into ``reference_model(arch)`` first (see module docstring) and raise on mismatch.

    Returns:
        The object written.

    >>> export_backbone("runs/moco/checkpoint.pth", out_path="r50.pth")  # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if out_path is not None:  # before the checkpoint is read and verified (was: "[Errno 17] File exists: 'X'")
        out_path = Path(out_path)
        if out_path.is_dir():
            raise ValueError(f"--out {out_path} is a folder; name the file to write")
        from ..cli import make_dir

        make_dir(out_path.parent, f"--out {out_path}")
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "checkpoint"
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    check_public_backbone(ckpt, source)
    sd, found = backbone_state_dict(ckpt, source)
    if arch and found and arch != found:
        raise ValueError(f"{source}: --arch {arch} but the checkpoint was trained with {found}")
    arch = arch or found
    if not arch:
        raise ValueError(f"{source}: no arch recorded in the checkpoint; pass --arch")
    if fmt == "torchvision" and not _is_resnet(arch):
        raise ValueError(f"--format torchvision is for ResNets; {arch} loads into timm (--format timm)")
    if fmt == "timm" and _is_resnet(arch):
        raise ValueError(f"--format timm is for ViTs; {arch} loads into torchvision (--format torchvision)")
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    model_kwargs = model_kwargs_of(ckpt)
    if verify:
        load_into_reference(sd, arch, **model_kwargs)
    obj = {"backbone": sd, "arch": arch, "model_kwargs": model_kwargs} if fmt == "fastcl" else sd
    if out_path is not None:
        from ..engine.checkpoint import save_atomic

        save_atomic(obj, out_path)
    return obj


# ============ command line ============
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastcl backbone export", add_help=False)
    p.add_argument("--checkpoint", required=True, help="training checkpoint or exported backbone file")
    p.add_argument("--out", required=True, help="output file (written atomically)")
    p.add_argument("--arch", default=None, help="backbone name (default: the one recorded in the checkpoint)")
    p.add_argument("--format", default="fastcl", choices=FORMATS,
                   help="fastcl: {'backbone': sd, 'arch': name} (default); torchvision / timm: the bare "
                        "state_dict for torchvision.models.<resnet>() / timm.create_model(num_classes=0)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the weights into the torchvision / timm model before writing")
    return p


def main(argv: list[str] | None = None) -> None:
    from ..cli import ArgumentParser

    args = ArgumentParser("python -m fastcl.eval.export", parents=[get_args_parser()]).parse_args(argv)
    try:
        obj = export_backbone(args.checkpoint, args.arch, args.out, args.format, verify=not args.no_verify)
    except (ValueError, OSError) as e:  # (OSError: a missing file, an --out that cannot be written, a full disk)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sd = obj["backbone"] if args.format == "fastcl" else obj
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {n / 1e6:.2f}M values, format {args.format}")
    kw = model_kwargs_of(read_checkpoint(args.checkpoint))
    if kw and args.format != "fastcl":
        print(f"note: build the model with {', '.join(f'{k}={v!r}' for k, v in kw.items())} (not in the weights)")


if __name__ == "__main__":
    main()
