"""Carry CIFAR-10 to a GPU machine that reaches no registry, in two device calls instead of three.

The lent device machine cannot fetch CIFAR-10, and one call carries at most 64 MiB. The ``.npy`` cache is
184 MB of uint8 (zstd: 165-179 MB, three calls); WebP lossless packs it into 113 MB, so two calls carry it.
Each block of 10,000 images is one 1024 x 10,000 RGB picture (row i = image i, HWC), as in the npm source.

    python benchmarks/stage_cifar10.py pack                  # here: writes .devdata1/ .devdata2/ (git-ignored)
    # device call 1, carry [".devdata1"]: mkdir -p /tmp/dd && cp .devdata1/* /tmp/dd/ && ...
    # device call 2, carry [".devdata2"]: cp .devdata2/* /tmp/dd/ &&
    python3 benchmarks/stage_cifar10.py unpack /tmp/dd --root /tmp/fdata   # then FASTCL_DATA=/tmp/fdata

``unpack`` checks every array against the SHA-256 recorded by ``pack`` and publishes the cache atomically
in fastcl's layout (``<root>/cifar10/npy``), so ``load_cifar10`` finds it as if it had built it.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

BLOCK = 10_000  # images per WebP picture (WebP's side limit is 16383 px)
CHUNK_BYTES = 60_000_000  # per device call, leaving room for the working tree in the 64 MiB


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def pack(root: str | None, dest: Path, block: int = BLOCK) -> list[Path]:
    from PIL import Image

    from fastcl.data.cifar10 import load_cifar10, prepare_cifar10

    npy = prepare_cifar10(root) / "npy"
    src = json.loads((npy / "source.json").read_text()) if (npy / "source.json").exists() else {}
    files: dict[str, bytes] = {}
    manifest = {"source": src, "block": block, "splits": {}}
    for split in ("train", "test"):
        x, y = load_cifar10(root, split=split)
        names = []
        for b in range(0, len(x), block):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(x[b:b + block]).reshape(-1, 32 * 32, 3)).save(
                buf, format="WEBP", lossless=True, quality=100, method=4)
            names.append(f"{split}_{b // block}.webp")
            files[names[-1]] = buf.getvalue()
        lab = io.BytesIO()
        np.save(lab, y)
        files[f"{split}_labels.npy"] = lab.getvalue()
        manifest["splits"][split] = {"n": len(x), "blocks": names, "images_sha256": _sha(x),
                                     "labels_sha256": _sha(y)}
    # first-fit into folders of at most CHUNK_BYTES; the manifest goes with the last one
    folders: list[dict[str, bytes]] = [{}]
    for name, data in sorted(files.items(), key=lambda kv: -len(kv[1])):
        for f in folders:
            if sum(map(len, f.values())) + len(data) <= CHUNK_BYTES:
                f[name] = data
                break
        else:
            folders.append({name: data})
    folders[-1]["manifest.json"] = json.dumps(manifest, indent=1).encode()
    for old in dest.glob(".devdata*"):
        for p in old.iterdir():
            p.unlink()
        old.rmdir()
    out = []
    for i, f in enumerate(folders, 1):
        d = dest / f".devdata{i}"
        d.mkdir()
        for name, data in f.items():
            (d / name).write_bytes(data)
        out.append(d)
        print(f"{d}: {len(f)} files, {sum(map(len, f.values())) / 1e6:.1f} MB")
    return out


def unpack(src: Path, root: Path) -> Path:
    from PIL import Image

    manifest = json.loads((src / "manifest.json").read_text())
    npy = root / "cifar10" / "npy"
    if npy.is_dir():
        print(f"{npy} exists: kept")
        return npy
    npy.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=npy.parent, prefix=".stage-") as tmp:
        tmp = Path(tmp)
        for split, m in manifest["splits"].items():
            missing = [b for b in m["blocks"] + [f"{split}_labels.npy"] if not (src / b).exists()]
            if missing:
                raise SystemExit(f"error: {src} lacks {missing}: copy every .devdataN folder there first")
            x = np.concatenate([np.asarray(Image.open(src / b).convert("RGB")).reshape(-1, 32, 32, 3)
                                for b in m["blocks"]])
            y = np.load(src / f"{split}_labels.npy")
            if len(x) != m["n"] or _sha(x) != m["images_sha256"] or _sha(y) != m["labels_sha256"]:
                raise SystemExit(f"error: staged CIFAR-10 {split} does not match its SHA-256 in the manifest")
            np.save(tmp / f"{split}_images.npy", x)
            np.save(tmp / f"{split}_labels.npy", y)
        (tmp / "source.json").write_text(json.dumps({**manifest["source"], "staged": "webp lossless"}) + "\n")
        os.rename(tmp, npy)
        os.chmod(npy, 0o755)  # (mkdtemp made it private)
        tmp.mkdir()  # (for the context manager's cleanup)
    print(f"CIFAR-10 unpacked to {npy} (SHA-256 checked)")
    return npy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="write .devdata1/ .devdata2/ in the repository root")
    a.add_argument("--root", default=None, help="CIFAR-10 cache root (default: $FASTCL_DATA or ~/.cache/fastcl)")
    a.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1],
                   help="where the .devdataN folders go (default: the repository root)")
    b = sub.add_parser("unpack", help="decode the staged files into <root>/cifar10/npy")
    b.add_argument("src", type=Path, help="folder holding the contents of every .devdataN")
    b.add_argument("--root", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.root, args.dest)
    else:
        unpack(args.src, args.root)


if __name__ == "__main__":
    main()
