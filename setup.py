"""fastcl: performance-engineered self-supervised / contrastive vision pretraining.

The Triton kernels live in the top-level folder ``kernels/`` but install as ``fastcl.kernels``
(``package_dir`` below), so no bare ``kernels`` module can collide with other packages.
"""
import platform
import sys

from setuptools import setup

packages = ["fastcl", "fastcl.data", "fastcl.engine", "fastcl.eval", "fastcl.methods", "fastcl.models",
            "fastcl.viz", "fastcl.kernels"]
# lower bounds only (the versions this project is tested with: DALI 2.4.0, DeepSpeed 0.19.8, torch 2.14.1)
dali = "nvidia-dali-cuda130>=2.4; platform_system == 'Linux' and platform_machine == 'x86_64'"

setup(
    name="fastcl",
    version="0.1.0",
    description="Fast contrastive / self-supervised vision pretraining: Triton kernels, DALI, DDP, ZeRO",
    packages=packages,
    package_dir={"fastcl": "fastcl", "fastcl.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # tested up to 2.14.1 (CPU) / 2.11 (GPU); nothing newer is required
        "torchvision>=0.19",
        "timm>=1.0",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
        "nvtx",
        dali,
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.19"],
        "viz": ["matplotlib>=3.5"],  # python -m fastcl.viz (attention maps, neighbours, curves, bench bars)
        "dev": ["deepspeed>=0.19", "matplotlib>=3.5", "pytest>=8", "pytest-benchmark>=4", "pytest-timeout"],
    },
)
