"""KeyQueue ring buffer vs hand-computed expected queues (wrap-around, normalization, checkpoint)."""
import pytest
import torch
import torch.nn.functional as F

from fastcl.kernels import KeyQueue

cuda = torch.cuda.is_available()
DEV = "cuda" if cuda else "cpu"


def test_init_buffers():
    q = KeyQueue(16, 50)
    assert q.queue.shape == (50, 16) and q.ptr.dtype == torch.long and q.ptr.shape == (1,)
    assert torch.allclose(q.queue.norm(dim=1), torch.ones(50), atol=1e-5)
    assert set(q.state_dict()) == {"queue", "ptr"}


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_wraparound_non_dividing_batch(backend, dtype, atol):
    """K=10, batches of 4 (4 does not divide 10): slots 0-3, 4-7, then 8,9,0,1, then 2-5."""
    size, dim = 10, 6
    q = KeyQueue(dim, size).to(DEV)
    q.queue = q.queue.to(dtype)
    expected = q.queue.clone().double()
    batches = [torch.randn(4, dim, device=DEV, dtype=dtype) * 3 for _ in range(4)]
    slots = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    for b, s in zip(batches, slots):
        q.enqueue(b)
        expected[s] = F.normalize(b.double(), dim=1)
    assert q.ptr.item() == 6
    torch.testing.assert_close(q.queue.double(), expected, atol=atol, rtol=0)


def test_full_size_batch_and_no_normalize(backend):
    size, dim = 7, 5  # weird shapes
    q = KeyQueue(dim, size, normalize=False).to(DEV)
    q.enqueue(torch.randn(3, dim, device=DEV))
    b = torch.randn(7, dim, device=DEV)
    q.enqueue(b)  # whole queue, starting at slot 3
    expected = torch.cat([b[4:], b[:4]])
    torch.testing.assert_close(q.queue, expected)
    assert q.ptr.item() == 3


def test_backends_agree():
    import fastcl.kernels as K

    a, b = KeyQueue(24, 40).to(DEV), KeyQueue(24, 40).to(DEV)
    b.load_state_dict(a.state_dict())
    x = torch.randn(29, 24, device=DEV) * 4
    old = K.get_backend()
    try:
        K.set_backend("torch")
        a.enqueue(x)
        a.enqueue(x[:17])
        K.set_backend("triton")
        b.enqueue(x)
        b.enqueue(x[:17])
    finally:
        K.set_backend(old)
    torch.testing.assert_close(a.queue, b.queue, atol=1e-6, rtol=0)
    assert a.ptr.item() == b.ptr.item() == 6


def test_too_large_batch_raises():
    with pytest.raises(ValueError):
        KeyQueue(4, 3).enqueue(torch.randn(4, 4))


def test_state_dict_roundtrip(backend):
    a = KeyQueue(8, 12).to(DEV)
    a.enqueue(torch.randn(5, 8, device=DEV))
    b = KeyQueue(8, 12).to(DEV)
    b.load_state_dict(a.state_dict())
    x = torch.randn(9, 8, device=DEV)
    a.enqueue(x)
    b.enqueue(x)
    torch.testing.assert_close(a.queue, b.queue)
    assert a.ptr.item() == b.ptr.item() == 2
