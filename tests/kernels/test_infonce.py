"""InfoNCE kernels vs float64 references written out here (MoCo, MoCo v3 in-batch, SimCLR NT-Xent)."""
import pytest
import torch
import torch.nn.functional as F

import fastcl.kernels as K
from fastcl.kernels import inbatch_infonce, moco_infonce, ntxent

cuda = torch.cuda.is_available()
DEV = "cuda" if cuda else "cpu"


def assert_verbose_allclose(a, b, rtol, atol, name=""):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    bad = ~torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    nan_mismatch = (a.isnan() != b.isnan()).sum().item() + (a.isinf() != b.isinf()).sum().item()
    if bad.any() or nan_mismatch:
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {bad.sum().item()}/{a.numel()} mismatches, {nan_mismatch} nan/inf "
                             f"disagreements, max abs diff {(a - b).abs().nan_to_num().max().item():.3g}, first {idx}")


# ---- float64 references (literal transcriptions) ----------------------------------------------
def ref_moco(q, k, queue, T, normalize=True):
    q, k, queue = q.double(), k.double(), queue.double()
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # Nx1
    l_neg = torch.einsum("nc,ck->nk", q, queue.t())  # NxK
    logits = torch.cat([l_pos, l_neg], dim=1) / T  # Nx(1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels.to(logits.device))


def ref_inbatch(q, k, T, pos_offset=0, normalize=True):
    q, k = q.double(), k.double()
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.t() / T
    labels = torch.arange(q.shape[0], device=q.device) + pos_offset
    return F.cross_entropy(logits, labels)


def ref_ntxent(z1, z2, T, normalize=True):
    z = torch.cat([z1, z2]).double()
    if normalize:
        z = F.normalize(z, dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / T
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, labels)


# fp32 compares to 1e-4; fp16 inputs are rounded to fp16 before both paths, so only the kernel's
# fp16 dot inputs (dS cast to fp16 in the backward) and fp16 grad outputs loosen it.
DTYPES = [
    (torch.float32, 1e-4, 1e-5),
    (torch.float16, 2e-2, 2e-3),
    pytest.param(torch.bfloat16, 5e-2, 1e-2, marks=pytest.mark.skipif(not cuda, reason="bf16 tl.dot needs a GPU (interpreter gives garbage)")),
]


def _leaves(shape, dtype, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEV, dtype)
    return x.clone().requires_grad_(requires_grad), x.clone().requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("N,C,Kq", [(8, 32, 64), (13, 24, 37)])  # second: weird shapes
def test_moco_infonce(backend, dtype, rtol, atol, N, C, Kq):
    q1, q2 = _leaves((N, C), dtype, 1)
    k1, k2 = _leaves((N, C), dtype, 2)
    queue = F.normalize(torch.randn(Kq, C, generator=torch.Generator().manual_seed(3)), dim=1).to(DEV, dtype)
    out = moco_infonce(q1, k1, queue, 0.2)
    ref = ref_moco(q2, k2, queue, 0.2)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert_verbose_allclose(out, ref, rtol, atol, "loss")
    (out * 1.7).backward()
    (ref * 1.7).backward()
    assert_verbose_allclose(q1.grad, q2.grad, rtol, atol, "dq")
    assert_verbose_allclose(k1.grad, k2.grad, rtol, atol, "dk")


def test_moco_mixed_dtypes(backend):
    """fp16 q/k (autocast) against an fp32 queue buffer: the kernel casts queue tiles in registers."""
    q1, q2 = _leaves((10, 32), torch.float16, 11)
    k1, k2 = _leaves((10, 32), torch.float16, 12)
    queue = F.normalize(torch.randn(50, 32), dim=1).to(DEV)
    out = moco_infonce(q1, k1, queue, 0.2)
    ref = ref_moco(q2, k2, queue.half(), 0.2)  # the fp16 tiles see the queue rounded to fp16
    assert_verbose_allclose(out, ref, 2e-2, 2e-3, "loss")
    out.backward()
    ref.backward()
    assert_verbose_allclose(q1.grad, q2.grad, 2e-2, 2e-3, "dq")
    assert_verbose_allclose(k1.grad, k2.grad, 2e-2, 2e-3, "dk")


def test_float64_inputs_are_computed_in_float64(backend):
    """float64 in, float64 out, equal to the float64 formula to 1e-12 (the kernels take 16/32-bit rows; float64
    goes to the reference, which computed in fp32 before: 1e-7 off, and torch 2.11's inductor failed on its
    f64 -> f32 -> f64 round trip in the compiled backward)."""
    q1, q2 = _leaves((9, 16), torch.float64, 21)
    k1, k2 = _leaves((9, 16), torch.float64, 22)
    queue = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(23), dtype=torch.float64),
                        dim=1).to(DEV)
    out = moco_infonce(q1, k1, queue, 0.2)
    ref = ref_moco(q2, k2, queue, 0.2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    out.backward()
    ref.backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(k1.grad, k2.grad, rtol=1e-12, atol=1e-15)


def test_moco_no_normalize_and_no_key_grad(backend):
    q1, q2 = _leaves((9, 16), torch.float32, 4)
    k = torch.randn(9, 16, device=DEV)
    queue = F.normalize(torch.randn(40, 16, device=DEV), dim=1)
    out = moco_infonce(q1, k, queue, 0.07, normalize=False)
    ref = ref_moco(q2, k, queue, 0.07, normalize=False)
    assert_verbose_allclose(out, ref, 1e-4, 1e-5, "loss")
    out.backward()
    ref.backward()
    assert_verbose_allclose(q1.grad, q2.grad, 1e-4, 1e-5, "dq")


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_separate_positives_with_key_gradients(backend, dtype, rtol, atol):
    """pos_keys (positives outside the key set) and keys that need gradients too (a trainable memory, not a
    queue): every key is a pure negative, so dk has no positive term."""
    q1, q2 = _leaves((13, 24), dtype, 21)
    p1, p2 = _leaves((13, 24), dtype, 22)
    k1, k2 = _leaves((37, 24), dtype, 23)  # weird shapes
    out = K.contrastive_lse(q1, k1, 0.2, pos_keys=p1).mean()
    ref = ref_moco(q2, p2, F.normalize(k2, dim=1), 0.2)  # normalized keys = the op's normalize_keys=True
    assert_verbose_allclose(out, ref, rtol, atol, "loss")
    out.backward()
    ref.backward()
    for name, a, b in (("dq", q1, q2), ("dp", p1, p2), ("dk", k1, k2)):
        assert_verbose_allclose(a.grad, b.grad, rtol, atol, name)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("N,M,C,off", [(16, 16, 32, 0), (11, 45, 20, 17)])  # second: weird shapes, DDP offset
def test_inbatch_infonce(backend, dtype, rtol, atol, N, M, C, off):
    q1, q2 = _leaves((N, C), dtype, 5)
    k1, k2 = _leaves((M, C), dtype, 6)
    out = inbatch_infonce(q1, k1, 0.2, pos_offset=off)
    ref = ref_inbatch(q2, k2, 0.2, pos_offset=off)
    assert_verbose_allclose(out, ref, rtol, atol, "loss")
    out.backward()
    ref.backward()
    assert_verbose_allclose(q1.grad, q2.grad, rtol, atol, "dq")
    assert_verbose_allclose(k1.grad, k2.grad, rtol, atol, "dk")


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("N,C", [(8, 32), (7, 19)])  # second: weird shapes
def test_ntxent(backend, dtype, rtol, atol, N, C):
    a1, a2 = _leaves((N, C), dtype, 7)
    b1, b2 = _leaves((N, C), dtype, 8)
    out = ntxent(a1, b1, 0.5)
    ref = ref_ntxent(a2, b2, 0.5)
    assert_verbose_allclose(out, ref, rtol, atol, "loss")
    out.backward()
    ref.backward()
    assert_verbose_allclose(a1.grad, a2.grad, rtol, atol, "dz1")
    assert_verbose_allclose(b1.grad, b2.grad, rtol, atol, "dz2")


def test_ntxent_ddp_layout_matches_single_device(backend):
    """Two simulated ranks: the mean of the per-rank losses over the gathered rows equals the
    single-device loss on the global batch, and with a differentiable gather the grads match too."""
    n, c, world = 5, 12, 2
    z1s = [torch.randn(n, c, device=DEV, requires_grad=True) for _ in range(world)]
    z2s = [torch.randn(n, c, device=DEV, requires_grad=True) for _ in range(world)]
    z_all = torch.cat([torch.cat([z1s[r], z2s[r]]) for r in range(world)])
    losses = [ntxent(z1s[r], z2s[r], 0.3, z_all=z_all, offset=r * 2 * n) for r in range(world)]
    total = sum(losses) / world
    # single device on the same 2·n·world anchors, re-ordered as [all view1; all view2]
    Z1 = torch.cat([z.detach() for z in z1s]).requires_grad_()
    Z2 = torch.cat([z.detach() for z in z2s]).requires_grad_()
    ref = ref_ntxent(Z1, Z2, 0.3)
    assert_verbose_allclose(total, ref, 1e-4, 1e-5, "loss")
    total.backward()
    ref.backward()
    assert_verbose_allclose(torch.cat([z.grad for z in z1s]), Z1.grad, 1e-4, 1e-6, "dz1")
    assert_verbose_allclose(torch.cat([z.grad for z in z2s]), Z2.grad, 1e-4, 1e-6, "dz2")


def test_closed_form_uniform():
    """q equal to its positive and orthogonal to 4 queue rows: loss = log(e^{1/T} + 4) - 1/T."""
    C, T = 8, 0.5
    q = torch.eye(C)[:2]
    k = q.clone()
    queue = torch.eye(C)[2:6]  # orthogonal to q: logits 0
    loss = moco_infonce(q, k, queue, T)
    expect = torch.log(torch.exp(torch.tensor(1 / T)) + 4) - 1 / T
    assert torch.allclose(loss, expect, atol=1e-6)


def test_backends_agree():
    q = torch.randn(10, 24, device=DEV)
    k = torch.randn(30, 24, device=DEV)
    old = K.get_backend()
    try:
        K.set_backend("torch")
        a = inbatch_infonce(q, k, 0.1, pos_offset=10)
        K.set_backend("triton")
        b = inbatch_infonce(q, k, 0.1, pos_offset=10)
        per_row = K.contrastive_lse(q.requires_grad_(), k, 0.1, pos_index=torch.arange(10, device=DEV) + 10)
        assert "fastcl_contrastive_lse" in type(per_row.grad_fn).__name__  # really ran the Triton op
    finally:
        K.set_backend(old)
    assert_verbose_allclose(a, b, 1e-5, 1e-6, "backends")


@pytest.mark.parametrize("dtype,C,fused", [(torch.float32, 256, True), (torch.float32, 257, False),
                                           (torch.float32, 512, False), (torch.float16, 512, True),
                                           (torch.float16, 1025, False)])
def test_width_limits_choose_triton_or_the_reference(dtype, C, fused):
    """fp32 rows wider than 256 spill kilobytes of registers in every tile shape (aot_check): they take the
    torch reference, 16-bit rows up to 1024 stay fused; either way the loss is the float64 formula's."""
    old = K.get_backend()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, C, generator=g).to(DEV, dtype).requires_grad_()
    k = torch.randn(6, C, generator=g).to(DEV, dtype)
    try:
        K.set_backend("triton")
        per_row = K.contrastive_lse(q, k, 0.2, pos_index=torch.arange(6, device=DEV))
    finally:
        K.set_backend(old)
    assert ("fastcl_contrastive_lse" in type(per_row.grad_fn).__name__) == fused
    assert_verbose_allclose(per_row.mean(), ref_inbatch(q, k, 0.2), 2e-2 if dtype == torch.float16 else 1e-5, 1e-4,
                            "loss")


# The launches whose logits dot runs in feature chunks (CHUNK_C < BLOCK_C): with whole-row dots they were the two
# that spilled registers on sm_90a in every tile (aot_check). The interpreter runs them at the same 16x16 tiles and
# chunking (only num_warps, and fp32's tf32x3 precision, are GPU-only).
CHUNKED = [("dq", torch.float32, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=256, CHUNK_C=32, num_warps=8, num_stages=1)),
           ("dk", torch.float16, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=1024, CHUNK_C=64, num_warps=16, num_stages=1))]


@pytest.mark.parametrize("kernel,dtype,shipped", CHUNKED)
@pytest.mark.parametrize("ragged", [False, True])  # True: weird shapes, C not a multiple of the chunk
def test_feature_chunked_launches(monkeypatch, kernel, dtype, shipped, ragged):
    import fastcl.kernels.infonce as I

    C = shipped["BLOCK_C"] - (56 if ragged else 0)
    with monkeypatch.context() as m:
        m.setattr(I, "interpreting", lambda: False)
        assert I._settings(C, dtype, DEV, kernel) == shipped  # the GPU tile
    fn = getattr(I, f"_infonce_backward_{kernel}_kernel")
    launches, run = [], fn.run
    monkeypatch.setattr(fn, "run", lambda *a, **kw: launches.append(kw) or run(*a, **kw))
    g = torch.Generator().manual_seed(31)
    q = torch.randn(20, C, generator=g) / C ** 0.5
    k = torch.randn(37, C, generator=g) / C ** 0.5
    k[9:29] += 0.5 * q  # positives stand out: the softmax (and so the gradients) depends on every logit's chunks
    q1, q2 = (q.to(DEV, dtype).clone().requires_grad_() for _ in range(2))
    k1, k2 = (k.to(DEV, dtype).clone().requires_grad_() for _ in range(2))
    with K.backend("triton"):
        out = inbatch_infonce(q1, k1, 0.1, pos_offset=9)
        (out * 50).backward()  # O(0.1-1) gradients: meaningful against fp16's atol
    ref = ref_inbatch(q2, k2, 0.1, pos_offset=9)
    (ref * 50).backward()
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-3)
    assert_verbose_allclose(out, ref, rtol, atol, "loss")
    assert_verbose_allclose(q1.grad, q2.grad, rtol, atol, "dq")
    assert_verbose_allclose(k1.grad, k2.grad, rtol, atol, "dk")
    tile = ("BLOCK_M", "BLOCK_N", "BLOCK_C", "CHUNK_C") + (("num_warps",) if cuda else ())
    assert [{t: kw[t] for t in tile} for kw in launches] == [{t: shipped[t] for t in tile}]
    assert launches[0]["SCALE_TILE"] == (dtype == torch.float16) and launches[0]["NORM_K"]


def _train(backend_name, steps=8):
    """A tiny MoCo-style run: linear encoder, fixed queue, SGD; returns the loss trajectory."""
    old = K.get_backend()
    K.set_backend(backend_name)
    try:
        g = torch.Generator().manual_seed(0)
        enc = torch.nn.Linear(12, 16).to(DEV)
        with torch.no_grad():
            enc.weight.copy_(torch.randn(16, 12, generator=g))
            enc.bias.zero_()
        x = torch.randn(8, 12, generator=g).to(DEV)
        queue = F.normalize(torch.randn(40, 16, generator=g), dim=1).to(DEV)
        opt = torch.optim.SGD(enc.parameters(), lr=0.5)
        losses = []
        for _ in range(steps):
            q = enc(x + 0.1 * torch.randn(8, 12, generator=g).to(DEV))
            k = enc(x + 0.1 * torch.randn(8, 12, generator=g).to(DEV)).detach()
            loss = moco_infonce(q, k, queue, 0.2) + inbatch_infonce(q, k, 0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses
    finally:
        K.set_backend(old)


def test_convergence_with_and_without_kernels():
    ref, fused = _train("torch"), _train("triton")
    assert fused[-1] < fused[0]  # it learns
    # same trajectory up to fp32 reassociation, compounded over the SGD steps
    assert max(abs(a - b) for a, b in zip(ref, fused)) < 1e-4, (ref, fused)


def test_backend_context_restores_the_previous_backend_even_on_error():
    old = K.get_backend()
    with pytest.raises(KeyError):
        with K.backend("torch"):
            assert K.get_backend() == "torch"
            raise KeyError("inside")
    assert K.get_backend() == old
    with pytest.raises(ValueError, match="must be one of"):
        with K.backend("cuda"):
            pass
    assert K.get_backend() == old
