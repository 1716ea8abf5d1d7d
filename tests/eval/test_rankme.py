"""The label-free monitor (fastcl.eval.rankme): RankMe against a float64 transcription of Garrido et al. 2023, eq. 1,
and the monitor's reading of a collapsed vs a full-rank embedding."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.eval.rankme import RANKME_EPS, embedding_std, label_free_eval, rankme


def rankme_reference(z: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe(Z) = exp(-sum_k p_k log p_k), p_k = sigma_k(Z) / ||sigma(Z)||_1 + eps, in float64 (the paper's eq. 1)."""
    sigma = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = sigma / np.abs(sigma).sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


@pytest.mark.parametrize("shape", [(300, 64), (40, 128), (512, 512)])
def test_rankme_equals_the_float64_transcription(shape):
    g = torch.Generator().manual_seed(0)
    # an anisotropic spectrum (singular values spread over 3 decades), as trained embeddings have
    z = torch.randn(*shape, generator=g) * torch.logspace(0, -3, shape[1])
    assert RANKME_EPS == 1e-7
    assert rankme(z) == pytest.approx(rankme_reference(z.numpy()), rel=1e-5)
    assert rankme(z.double()) == pytest.approx(rankme_reference(z.numpy()), rel=1e-12)


def test_collapsed_vs_full_rank_embedding():
    g = torch.Generator().manual_seed(1)
    n, d = 1000, 64
    collapsed = torch.randn(n, 1, generator=g) * torch.randn(1, d, generator=g) + 1e-6 * torch.randn(n, d, generator=g)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))  # orthonormal columns: equal sigmas
    gauss = torch.randn(n, d, generator=g)
    assert rankme(collapsed) < 1.01  # one direction
    assert rankme(q) == pytest.approx(d, rel=1e-4)  # the largest possible value, min(n, d) (up to eps)
    assert 0.9 * d < rankme(gauss) < d
    assert rankme(gauss[:, :16] @ torch.randn(16, d, generator=g)) < 16.01  # rank 16
    # the embedding's std: 0 when every image points one way, ~1/sqrt(d) when they spread over the sphere
    same = torch.randn(1, d, generator=g).expand(n, d)
    assert embedding_std(same) < 1e-6
    assert embedding_std(gauss) == pytest.approx(1 / math.sqrt(d), rel=0.05)


def test_label_free_eval_reads_the_backbone_over_the_loader():
    g = torch.Generator().manual_seed(2)
    images = torch.randn(70, 3, 4, 4, generator=g)
    loader = [(images[i:i + 32], torch.full((len(images[i:i + 32]),), -1), torch.arange(i, min(i + 32, 70)))
              for i in range(0, 70, 32)]
    full = nn.Flatten()  # 48-d features of random images: full rank
    res = label_free_eval(full, loader, torch.device("cpu"))
    assert res["rankme_max"] == 48 and res["rankme"] > 0.8 * 48
    assert res["rankme"] == pytest.approx(rankme_reference(images.flatten(1).numpy()), rel=1e-5)
    assert res["emb_std_ref"] == pytest.approx(1 / math.sqrt(48))
    collapsed = nn.Sequential(nn.Flatten(), nn.Linear(48, 48))
    with torch.no_grad():
        collapsed[1].weight.zero_()
        collapsed[1].bias.normal_()
    res = label_free_eval(collapsed, loader, torch.device("cpu"))
    assert res["rankme"] < 1.01 and res["emb_std"] < 1e-6
