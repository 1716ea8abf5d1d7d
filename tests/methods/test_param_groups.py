"""Weight decay per method, as each official code sets it: MoCo, InstDisc, InvaSpread and CMC decay every
parameter (plain SGD over model.parameters()); SimCLR, BYOL and DINO exclude biases and norms (and LARS
adaptation of them)."""
import pytest
import torch.nn as nn

from fastcl.methods.byol import BYOL
from fastcl.methods.cmc import CMC
from fastcl.methods.dino import DINO
from fastcl.methods.instdisc import InstDisc
from fastcl.methods.invaspread import InvaSpread
from fastcl.methods.moco import MoCo
from fastcl.methods.simclr import SimCLR


def net(c_in=3, d=16):
    return nn.Sequential(nn.Conv2d(c_in, d, 3), nn.BatchNorm2d(d), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


DECAY_ALL = {
    "moco": lambda: MoCo(net(), 16, dim=8, K=32),
    "instdisc": lambda: InstDisc(net(), 16, 20, dim=8, K=4),
    "invaspread": lambda: InvaSpread(net(), 16, dim=8),
    "cmc": lambda: CMC(net(1), net(2), 16, 20, (0.5,) * 3, (0.25,) * 3, dim=8, K=4),
}
EXCLUDE = {
    "simclr": lambda: SimCLR(net(), 16, dim=8, hidden_dim=16, sync_bn=False),
    "byol": lambda: BYOL(net(), 16, proj_hidden=16, dim=8, pred_hidden=16),
    "dino": lambda: DINO(net(), 16, out_dim=16, hidden_dim=8, bottleneck_dim=4),
}


def _trainable(m):
    return {id(p) for p in m.parameters() if p.requires_grad}


@pytest.mark.parametrize("name", sorted(DECAY_ALL))
def test_decay_on_every_parameter(name):
    m = DECAY_ALL[name]()
    groups = m.param_groups(1e-4)
    assert {id(p) for g in groups for p in g["params"]} == _trainable(m)
    assert all(g["weight_decay"] == 1e-4 for g in groups)


@pytest.mark.parametrize("name", sorted(EXCLUDE))
def test_no_decay_on_biases_and_norms(name):
    m = EXCLUDE[name]()
    groups = m.param_groups(1e-4)
    assert {id(p) for g in groups for p in g["params"]} == _trainable(m)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    flat = {id(p) for n, p in m.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}
    assert flat and no_decay == flat
    assert all(g.get("lars_exclude") for g in groups if g["weight_decay"] == 0.0)
