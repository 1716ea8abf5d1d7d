"""EMA update vs hand-computed float64 values; EMAUpdater over modules (grouped, buffers)."""
import pytest
import torch

from fastcl.kernels import EMAUpdater, ema_update_

cuda = torch.cuda.is_available()
DEV = "cuda" if cuda else "cpu"


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("tensor_momentum", [False, True])
def test_ema_update_hand_computed(backend, dtype, atol, tensor_momentum):
    shapes = [(3, 5), (7,), (2, 3, 4), (1,), (130,)]  # weird shapes
    tgt = [torch.randn(s).to(DEV, dtype) for s in shapes]
    onl = [torch.randn(s).to(DEV, dtype) for s in shapes]
    m = 0.9
    expected = [0.9 * t.double() + 0.1 * o.double() for t, o in zip(tgt, onl)]
    mom = torch.tensor(m, device=DEV) if tensor_momentum else m
    ema_update_(tgt, onl, mom)
    for t, e in zip(tgt, expected):
        torch.testing.assert_close(t.double(), e, atol=atol, rtol=0)


def test_ema_exact_values():
    t, o = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    ema_update_(t, o, 0.75)  # 0.75*1 + 0.25*3 = 1.5 ; 0.75*2 - 0.25*2 = 1.0
    assert t[0].tolist() == [1.5, 1.0]


def _net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Flatten(),
                               torch.nn.Linear(5 * 4 * 4, 7))


@pytest.mark.parametrize("copy_buffers", [False, True])
def test_ema_updater_modules(backend, copy_buffers):
    online, target = _net().to(DEV), _net().to(DEV)
    online(torch.randn(4, 3, 6, 6, device=DEV))  # move BN running stats
    online_before = [p.detach().clone() for p in online.parameters()]
    expected = [0.99 * t.detach().double() + 0.01 * o.detach().double()
                for t, o in zip(target.parameters(), online.parameters())]
    upd = EMAUpdater(online, target, copy_buffers=copy_buffers)
    upd.update(0.99)
    assert (upd._tables is not None) == (backend == "triton")  # the Triton path really ran
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t.detach().double(), e, atol=1e-6, rtol=0)
    for p, b in zip(online.parameters(), online_before):
        assert torch.equal(p, b) and p.is_leaf and p._base is None  # online untouched, no views
    for bo, bt in zip(online.buffers(), target.buffers()):
        assert torch.equal(bo, bt) == copy_buffers or bo.dtype == torch.long and bo.item() == bt.item() == 1
    # the target stays usable: forward works, and a second update composes
    upd.update(torch.tensor(0.5, device=DEV))
    target(torch.randn(2, 3, 6, 6, device=DEV))


def test_ema_updater_mixed_dtypes(backend):
    online = torch.nn.ModuleList([torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).half()]).to(DEV)
    target = torch.nn.ModuleList([torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).half()]).to(DEV)
    expected = [0.8 * t.detach().double() + 0.2 * o.detach().double()
                for t, o in zip(target.parameters(), online.parameters())]
    EMAUpdater(online, target).update(0.8)
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t.detach().double(), e, atol=2e-3 if t.dtype == torch.half else 1e-6, rtol=0)


def test_ema_updater_rebuilds_after_pointer_change(backend):
    online, target = torch.nn.Linear(6, 5).to(DEV), torch.nn.Linear(6, 5).to(DEV)
    upd = EMAUpdater(online, target)
    upd.update(0.5)
    online.weight.data = torch.randn(5, 6, device=DEV)  # new storage: the pointer tables must follow it
    expected = 0.5 * target.weight.detach().double() + 0.5 * online.weight.detach().double()
    upd.update(0.5)
    torch.testing.assert_close(target.weight.detach().double(), expected, atol=1e-6, rtol=0)


def test_ema_updater_copies_buffers_after_module_to(backend):
    """Module.to() replaces buffer tensors: the updater must copy into the new ones, not the old."""
    online, target = _net(), _net()
    upd = EMAUpdater(online, target, copy_buffers=True)  # built before the move, as methods do
    online, target = online.to(DEV, torch.float64), target.to(DEV, torch.float64)
    online(torch.randn(4, 3, 6, 6, device=DEV, dtype=torch.float64))  # move BN running stats
    upd.update(0.9)
    for bo, bt in zip(online.buffers(), target.buffers()):
        assert torch.equal(bo, bt)


def _expected(tgt, onl, m):
    return [m * t.detach().double() + (1 - m) * o.detach().double() for t, o in zip(tgt, onl)]


def test_dense_non_contiguous_layouts_take_the_kernel(backend, monkeypatch):
    """channels_last conv weights (every 3x3/7x7 conv on CUDA) and other permuted dense tensors are updated by
    the kernel in memory order, as long as target and online share strides; a strided view is not dense."""
    import fastcl.kernels.ema as ema

    conv_t = torch.randn(8, 3, 3, 3).to(DEV).contiguous(memory_format=torch.channels_last)
    conv_o = torch.randn(8, 3, 3, 3).to(DEV).contiguous(memory_format=torch.channels_last)
    perm_t, perm_o = torch.randn(5, 6).to(DEV).t(), torch.randn(5, 6).to(DEV).t()  # (6, 5), strides (1, 6)
    view_t, view_o = torch.randn(6, 8).to(DEV)[:, ::2], torch.randn(6, 8).to(DEV)[:, ::2]  # not dense
    tgt, onl = [conv_t, perm_t, view_t], [conv_o, perm_o, view_o]
    groups, rest_t, _ = ema._group(tgt, onl)
    assert [t for g in groups.values() for t in g[0]] == [conv_t, perm_t] and rest_t == [view_t]
    expected = _expected(tgt, onl, 0.7)
    ema_update_(tgt, onl, 0.7)
    for t, e in zip(tgt, expected):
        torch.testing.assert_close(t.double(), e, atol=1e-6, rtol=0)
    assert conv_t.is_contiguous(memory_format=torch.channels_last)  # layout kept


def test_mismatched_strides_are_not_paired_in_memory_order(backend):
    t = torch.randn(4, 3, 3, 3).to(DEV).contiguous(memory_format=torch.channels_last)
    o = torch.randn(4, 3, 3, 3).to(DEV)  # contiguous: same shape, other memory order
    expected = _expected([t], [o], 0.5)
    ema_update_([t], [o], 0.5)
    torch.testing.assert_close(t.double(), expected[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("t_dtype,o_dtype", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float32)])
def test_mixed_dtype_pairs_update(backend, t_dtype, o_dtype):
    """An fp32 EMA of half-precision weights (and the reverse) updates instead of raising in _foreach_lerp_."""
    tgt, onl = [torch.zeros(4, device=DEV, dtype=t_dtype)], [torch.ones(4, device=DEV, dtype=o_dtype)]
    ema_update_(tgt, onl, 0.996)
    torch.testing.assert_close(tgt[0].double(), torch.full((4,), 0.004, dtype=torch.float64, device=DEV),
                               atol=1e-5 if t_dtype == torch.float32 else 2e-5, rtol=1e-3)


def test_updater_decides_once_not_per_step(backend, monkeypatch):
    """Steady-state updates inspect no tensor in Python (no use_triton over every parameter, no regrouping);
    only a pointer change or a backend switch makes the updater look again."""
    import fastcl.kernels.ema as ema

    calls = {"use_triton": 0, "group": 0}
    real_use, real_group = ema.use_triton, ema._group

    def use(*ts):
        calls["use_triton"] += 1
        return real_use(*ts)

    def group(*a):
        calls["group"] += 1
        return real_group(*a)

    monkeypatch.setattr(ema, "use_triton", use)
    monkeypatch.setattr(ema, "_group", group)
    online, target = _net().to(DEV), _net().to(DEV)
    upd = EMAUpdater(online, target)
    for _ in range(5):
        upd.update(0.9)
    assert calls["use_triton"] == 1 and calls["group"] <= 1
    online[0].weight.data = torch.randn_like(online[0].weight)  # a moved tensor is noticed
    expected = _expected(target.parameters(), online.parameters(), 0.9)
    upd.update(0.9)
    assert calls["use_triton"] == 2
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t.detach().double(), e, atol=1e-6, rtol=0)
