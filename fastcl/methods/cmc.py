"""CMC: Contrastive Multiview Coding, with the L and ab channels of Lab as the two views.

Tian, Krishnan, Isola, "Contrastive Multiview Coding", ECCV 2020 (https://arxiv.org/abs/1906.05849).
Follows HobbitLong/CMC (train_CMC.py, models/resnet.py ResNetV1, NCE/NCEAverage.py) with the softmax
(InfoNCE) form of the contrastive loss, the paper's eq. 2.

An image is converted to Lab; v1 = L (1 channel) and v2 = ab (2 channels) go through their own encoders
f_θ1, f_θ2 (a half-width ResNet each), a linear 128-d embedding and L2 normalization: z1 = f_θ1(v1),
z2 = f_θ2(v2). With memory banks M1, M2 holding one slot per training image (n x 128, unit rows),

    L(V1, V2) = −log  exp(z1_i·M2[i]/T) / (exp(z1_i·M2[i]/T) + Σ_{j ∈ neg} exp(z1_i·M2[j]/T))

(anchor from view 1, its positive and K negatives from view 2's bank) and the loss is L(V1, V2) + L(V2, V1),
T = 0.07. After the step the banks move: M1[i] ← normalize(m·M1[i] + (1 − m)·z1_i) (m = 0.5), same for M2.
The K negative slots are drawn uniformly once per batch and shared by its anchors (a MoCo-queue-like
estimator that lets the fused ``moco_infonce`` kernel run; CMC draws K per anchor). The representation
(``self.backbone``) is the concatenation [f_θ1(L), f_θ2(ab)] of RGB input, as in CMC's linear evaluation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.distributed import all_gather_nograd
from ..kernels.infonce import moco_infonce
from .base import Method, Step

# CMC's Lab normalization (train_CMC.py): L in [0, 100], a in [-86.183, 98.233], b in [-107.857, 94.478]
# mapped to [-1, 1]
LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)
# sRGB (D65) -> XYZ, and the D65 white point (as skimage.color.rgb2lab)
_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)


_LAB_CONSTANTS: dict = {}


def _lab_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The RGB->XYZ matrix and the white point on ``device``, made once per device: a per-step
    ``torch.tensor(..., device=cuda)`` would be a host->device copy, i.e. a sync, every step."""
    c = _LAB_CONSTANTS.get(device)
    if c is None:
        c = _LAB_CONSTANTS[device] = (torch.tensor(_RGB2XYZ, device=device),
                                      torch.tensor(_WHITE, device=device).view(1, 3, 1, 1))
    return c


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (B, 3, H, W) -> CIE Lab (L in [0, 100]), computed in fp32 on the input's device."""
    rgb = rgb.float().clamp(0, 1)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)  # undo the sRGB gamma
    rgb2xyz, white = _lab_constants(rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", rgb2xyz, lin) / white
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], 1)


class HalfWidthResNet(nn.Module):
    """A ResNet with every width halved (CMC's ``is_half``: stem 32, stages of 32/64/128/256 planes) on
    ``in_chans`` input channels, built from torchvision's blocks; (B, in_chans, H, W) -> (B, 8·32·expansion).
    ``cifar_stem``: 3x3 stride-1 stem and no max-pool for small images (as fastcl's *_cifar ResNets)."""

    def __init__(self, block, layers, in_chans: int, cifar_stem: bool = False, width: int = 32):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False) if cifar_stem else \
            nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.num_features = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # B x num_features


def half_width_resnet(depth: int, in_chans: int, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """Half-width ResNet-``depth`` on ``in_chans`` channels; returns (module, feature dim): 1024 for
    depth 50, 256 for depth 18."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    layers = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
              101: (Bottleneck, [3, 4, 23, 3])}
    if depth not in layers:
        raise ValueError(f"half_width_resnet depth must be one of {sorted(layers)}, got {depth}")
    net = HalfWidthResNet(*layers[depth], in_chans=in_chans, cifar_stem=cifar_stem)
    return net, net.num_features


class LabEncoders(nn.Module):
    """Normalized RGB -> Lab -> (f_θ1(L), f_θ2(ab)); ``forward`` returns their concatenation (kNN/export).

    Args:
        enc_l, enc_ab: the two encoders (1- and 2-channel input). mean, std: the RGB normalization of the
            input (undone before the Lab conversion).
    """

    def __init__(self, enc_l: nn.Module, enc_ab: nn.Module, mean, std):
        super().__init__()
        self.enc_l, self.enc_ab = enc_l, enc_ab
        self.register_buffer("rgb_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_mean", torch.tensor(LAB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_std", torch.tensor(LAB_STD).view(1, 3, 1, 1), persistent=False)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # the color conversion in fp32
            lab = (rgb_to_lab(x.float() * self.rgb_std + self.rgb_mean) - self.lab_mean) / self.lab_std
        lab = lab.to(x.dtype)
        return lab[:, :1], lab[:, 1:]  # v1 = L: B x 1 x H x W, v2 = ab: B x 2 x H x W

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v2 = self.views(x)
        return self.enc_l(v1), self.enc_ab(v2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.encode(x), 1)  # B x (D1 + D2)


class CMC(Method):
    """
    Args:
        enc_l, enc_ab: encoders of the L and ab views, (B, 1 | 2, H, W) -> (B, feat_dim).
        feat_dim: each encoder's output width.
        num_samples: n, training-set size (one bank slot per image; dataset indices must be < n).
        mean, std: the RGB normalization of the incoming views.
        dim: embedding / bank width (default 128). K: negatives (default 4096, CMC's nce_k).
        T: temperature (default 0.07). bank_momentum: m of the bank update (default 0.5).
    Raises:
        ValueError: on a non-positive n, K or T, or a bank momentum outside [0, 1).
    >>> l, d = half_width_resnet(18, 1, cifar_stem=True); ab, _ = half_width_resnet(18, 2, cifar_stem=True)
    >>> cmc = CMC(l, ab, d, num_samples=50000, mean=(0.5,) * 3, std=(0.25,) * 3)
    """

    decay_bias_and_norm = True  # HobbitLong/CMC train_CMC.py: SGD(model.parameters(), weight_decay=...)
    needs_indices = True

    def __init__(self, enc_l: nn.Module, enc_ab: nn.Module, feat_dim: int, num_samples: int, mean, std,
                 dim: int = 128, K: int = 4096, T: float = 0.07, bank_momentum: float = 0.5):
        super().__init__()
        if num_samples <= 0:
            raise ValueError(f"CMC num_samples must be > 0, got {num_samples}")
        if K <= 0:
            raise ValueError(f"CMC K (negatives) must be > 0, got {K}")
        if T <= 0:
            raise ValueError(f"CMC temperature T must be > 0, got {T}")
        if not 0.0 <= bank_momentum < 1.0:
            raise ValueError(f"CMC bank_momentum must be in [0, 1), got {bank_momentum}")
        self.n, self.K, self.T, self.m = num_samples, K, T, bank_momentum
        self.backbone = LabEncoders(enc_l, enc_ab, mean, std)
        self.embed_l, self.embed_ab = nn.Linear(feat_dim, dim), nn.Linear(feat_dim, dim)
        stdv = 1.0 / math.sqrt(dim / 3)  # NCEAverage's uniform(-stdv, stdv) init, then unit rows
        self.register_buffer("memory_l", F.normalize(torch.rand(num_samples, dim) * 2 * stdv - stdv, dim=1))
        self.register_buffer("memory_ab", F.normalize(torch.rand(num_samples, dim) * 2 * stdv - stdv, dim=1))
        self._to_write: tuple[torch.Tensor, ...] | None = None

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        idx = step.indices
        if idx is None:
            raise ValueError("CMC needs the batch's dataset indices in step.indices (needs_indices=True)")
        h_l, h_ab = self.backbone.encode(views[0])
        z_l, z_ab = self.embed_l(h_l), self.embed_ab(h_ab)  # B x dim each (normalized in the loss)
        neg = torch.randint(0, self.n, (self.K,), device=z_l.device)  # K shared negative slots
        loss_l = moco_infonce(z_l, self.memory_ab[idx], self.memory_ab[neg], self.T)  # L(V1, V2): anchor L
        loss_ab = moco_infonce(z_ab, self.memory_l[idx], self.memory_l[neg], self.T)  # L(V2, V1): anchor ab
        with torch.no_grad():
            self._to_write = (F.normalize(z_l.float(), dim=1), F.normalize(z_ab.float(), dim=1), idx)
        return {"loss": loss_l + loss_ab, "loss_l": loss_l.detach(), "loss_ab": loss_ab.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        if self._to_write is None:
            return
        z_l, z_ab, idx = (all_gather_nograd(t) for t in self._to_write)  # every rank writes every slot
        for memory, z in ((self.memory_l, z_l), (self.memory_ab, z_ab)):
            v = memory[idx] * self.m + z * (1 - self.m)
            memory.index_copy_(0, idx, F.normalize(v, dim=1))
        self._to_write = None
