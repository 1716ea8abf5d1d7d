"""Fused DINO loss vs a literal transcription of facebookresearch/dino DINOLoss.forward."""
import pytest
import torch
import torch.nn.functional as F

import fastcl.kernels as K
from fastcl.kernels import dino_loss

cuda = torch.cuda.is_available()
DEV = "cuda" if cuda else "cpu"


def ref_dino(student_output, teacher_output, center, student_temp, temp, ncrops, n_global=2):
    """main_dino.py DINOLoss.forward (float64), minus the center EMA, which the caller owns."""
    student_out = student_output.double() / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher_output.double() - center.double()) / temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(n_global)  # (dino has 2; a 1-global variant is exercised too)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = torch.sum(teacher_output.double(), dim=0, keepdim=True) / len(teacher_output)
    return total_loss, batch_center


DTYPES = [
    (torch.float32, 1e-4, 1e-5),
    (torch.float16, 1e-2, 1e-3),  # fp16 grads are stored in fp16
    pytest.param(torch.bfloat16, 5e-2, 1e-2, marks=pytest.mark.skipif(not cuda, reason="bf16 needs a GPU")),
]


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("B,Kd,ncrops", [(4, 64, 4), (3, 37, 3), (2, 300, 12)])  # weird shapes; 2+10 crops, K splits
def test_dino_loss(backend, dtype, rtol, atol, B, Kd, ncrops):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(ncrops * B, Kd, generator=g) * 3).to(DEV, dtype)
    t = (torch.randn(2 * B, Kd, generator=g) * 3).to(DEV, dtype)
    c = (torch.randn(1, Kd, generator=g) * 0.1).to(DEV)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss, bc = dino_loss(s1, t, c, 0.1, 0.04)
    rl, rbc = ref_dino(s2, t, c, 0.1, 0.04, ncrops)
    assert loss.dim() == 0 and bc.shape == (1, Kd)
    torch.testing.assert_close(loss.double(), rl, rtol=rtol, atol=atol)
    torch.testing.assert_close(bc.double(), rbc, rtol=rtol, atol=atol)
    gout = torch.tensor(1.3, device=DEV)
    (loss * gout.to(loss)).backward()
    (rl * gout.double()).backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad.double(), rtol=rtol, atol=atol)


def test_dino_loss_only_globals(backend):
    B, Kd = 2, 16
    s = torch.randn(2 * B, Kd, device=DEV, requires_grad=True)
    t = torch.randn(2 * B, Kd, device=DEV)
    c = torch.zeros(1, Kd, device=DEV)
    loss, _ = dino_loss(s, t, c, 0.1, 0.07)  # 2 student crops = the 2 globals: 2 pairs
    rl, _ = ref_dino(s, t, c, 0.1, 0.07, 2)
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-6)


def test_dino_loss_one_global(backend):
    B, Kd, ncrops = 3, 40, 4  # 1 teacher crop against the student's other 3: 3 pairs
    s1 = torch.randn(ncrops * B, Kd, device=DEV, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_()
    t, c = torch.randn(B, Kd, device=DEV), torch.randn(1, Kd, device=DEV) * 0.1
    loss, bc = dino_loss(s1, t, c, 0.1, 0.04, n_global_crops=1)
    rl, rbc = ref_dino(s2, t, c, 0.1, 0.04, ncrops, n_global=1)
    torch.testing.assert_close(loss.double(), rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bc.double(), rbc, rtol=1e-5, atol=1e-6)
    loss.backward()
    rl.backward()
    assert s1.grad[:B].abs().max() == 0  # the teacher's own crop is never a student term
    torch.testing.assert_close(s1.grad.double(), s2.grad.double(), rtol=1e-5, atol=1e-6)


def test_backends_agree():
    s = torch.randn(10, 40, device=DEV)
    t = torch.randn(4, 40, device=DEV)
    c = torch.randn(1, 40, device=DEV)
    old = K.get_backend()
    try:
        K.set_backend("torch")
        a = dino_loss(s, t, c, 0.1, 0.04)
        K.set_backend("triton")
        b = dino_loss(s.requires_grad_(), t, c, 0.1, 0.04)
        assert "fastcl_dino_loss" in type(b[0].grad_fn).__name__  # really ran the Triton op
    finally:
        K.set_backend(old)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
