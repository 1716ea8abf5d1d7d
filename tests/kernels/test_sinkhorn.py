"""Fused Sinkhorn-Knopp vs a float64 transcription of SwAV distributed_sinkhorn."""
import pytest
import torch

import fastcl.kernels as K
from fastcl.kernels import sinkhorn

cuda = torch.cuda.is_available()
DEV = "cuda" if cuda else "cpu"


def ref_sinkhorn(out, epsilon=0.05, iters=3, world_size=1, all_reduce=lambda t: None):
    Q = torch.exp(out.double() / epsilon).t()
    B = Q.shape[1] * world_size
    K_ = Q.shape[0]
    sum_Q = torch.sum(Q)
    all_reduce(sum_Q)
    Q /= sum_Q
    for it in range(iters):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        all_reduce(sum_of_rows)
        Q /= sum_of_rows
        Q /= K_
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float16, 1e-4)])
@pytest.mark.parametrize("B,Kp", [(32, 100), (7, 45)])  # second: weird shapes
def test_sinkhorn(backend, dtype, rtol, B, Kp):
    scores = torch.randn(B, Kp, generator=torch.Generator().manual_seed(0)).tanh().to(DEV, dtype)
    q = sinkhorn(scores)
    ref = ref_sinkhorn(scores)
    assert q.dtype == torch.float32 and q.shape == (B, Kp)
    torch.testing.assert_close(q.double(), ref, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(q.sum(1).double(), torch.ones(B, dtype=torch.float64, device=DEV), rtol=1e-5, atol=1e-5)


def test_sinkhorn_all_reduce_hook(backend):
    """Two simulated ranks: a hook that doubles the prototype sums = two identical ranks."""
    scores = torch.randn(6, 20, device=DEV).tanh()
    calls = []

    def fake_all_reduce(t):  # both ranks hold the same local scores
        calls.append(t.numel())
        t.mul_(2)

    q = sinkhorn(scores, all_reduce=fake_all_reduce, world_size=2)
    ref = ref_sinkhorn(torch.cat([scores, scores]))[:6]
    torch.testing.assert_close(q.double(), ref, rtol=1e-4, atol=1e-7)
    assert len(calls) >= 3  # one per iteration at least


def test_sinkhorn_large_scores_shift(backend):
    """Scores near 5 overflow exp(s/0.05) = e^100 in fp32 unshifted; the default max shift cancels exactly."""
    scores = 5 + 0.5 * torch.randn(8, 30, device=DEV).tanh()
    q = sinkhorn(scores)
    ref = ref_sinkhorn(scores)  # float64 does not overflow at exp(200)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), ref, rtol=1e-4, atol=1e-7)


def test_backends_agree():
    s = torch.randn(9, 33, device=DEV).tanh()
    old = K.get_backend()
    try:
        K.set_backend("torch")
        a = sinkhorn(s)
        K.set_backend("triton")
        b = sinkhorn(s)
    finally:
        K.set_backend(old)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
