"""Batched BN statistics: every backend vs float64 per-layer x.mean / x.var(unbiased=False)."""
import pytest
import torch

import acq_kernels
from acq_kernels.bn_stats.reference import bn_stats_reference, bns_loss_reference
from conftest import cpu_backends

BACKENDS = cpu_backends()
FP64_BACKENDS = [b for b in BACKENDS if b in ("reference", "cpu")]


def _inventory(name, res):
    """Per-layer BN input shapes [C, H, W] of a torchvision ResNet at resolution `res`."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None).eval()
    shapes = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, a: shapes.append(tuple(a[0].shape[1:])))
    model(torch.empty(1, 3, res, res, device="meta"))
    return shapes


def _resnet20_inventory():
    """CIFAR ResNet-20 (16/32/64 channels at 32/16/8, 1x1-conv+BN downsampling): 21 BN inputs."""
    shapes = [(16, 32, 32)] * 7
    for c, s in ((32, 16), (64, 8)):
        shapes += [(c, s, s)] * 6 + [(c, s, s)]  # 3 blocks x 2 BNs + the downsample BN
    return shapes


def _make(shapes, batch, dtype=torch.float32, channels_last=False, scale=1.0, loc=0.0):
    xs = []
    for i, sh in enumerate(shapes):
        # Per-channel offsets and scales so that a mix-up of channels would show.
        c = sh[0]
        mu = loc + torch.randn(c)
        sd = scale * (0.5 + torch.rand(c))
        view = (1, c) + (1,) * (len(sh) - 1)
        x = torch.randn(batch, *sh).mul_(sd.view(view)).add_(mu.view(view)).to(dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        xs.append(x)
    return xs


def _oracle(xs):
    out = []
    for x in xs:
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        out.append((xd.mean(dims), xd.var(dims, unbiased=False)))
    return out


def _check(stats, xs, rtol=2e-5):
    ref = _oracle(xs)
    assert len(stats) == len(ref)
    for i, ((m, v), (rm, rv)) in enumerate(zip(stats, ref)):
        assert m.shape == rm.shape and v.shape == rv.shape, i
        assert m.dtype in (torch.float32, torch.float64)
        scale_m = rv.sqrt().max().item() + rm.abs().max().item()
        assert (m.double() - rm).abs().max().item() <= rtol * scale_m + 1e-12, f"layer {i} mean"
        assert torch.allclose(v.double(), rv, rtol=rtol, atol=rtol * rv.max().item()), f"layer {i} var"


def _run(backend, fn, *args, **kw):
    with acq_kernels.set_backend(backend):
        return fn(*args, **kw)


# ----------------------------------------------------------------------------- inventories
def _batch(backend, full, interp):
    return interp if backend == "triton" else full


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_resnet20_inventory(backend, channels_last):
    xs = _make(_resnet20_inventory(), _batch(backend, 200, 8), channels_last=channels_last)
    _check(_run(backend, acq_kernels.bn_stats, xs), xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resnet18_inventory(backend):
    res, batch = (224, 16) if backend != "triton" else (64, 2)
    xs = _make(_inventory("resnet18", res), batch)
    _check(_run(backend, acq_kernels.bn_stats, xs), xs)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b != "triton" else b
                                     for b in BACKENDS])
def test_resnet50_inventory(backend):
    # Full size (batch 16, 224^2: 178 M elements) on reference/cpu; shrunk under the interpreter.
    res, batch = (224, 16) if backend != "triton" else (32, 2)
    xs = _make(_inventory("resnet50", res), batch, channels_last=backend == "triton")
    _check(_run(backend, acq_kernels.bn_stats, xs), xs)
    del xs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_inputs(backend, dtype):
    shapes = [(16, 9, 7), (24, 5, 5), (40,)]
    for cl in (False, True):
        xs = _make(shapes, 6, dtype=dtype, channels_last=cl)
        stats = _run(backend, acq_kernels.bn_stats, xs)
        assert all(m.dtype == torch.float32 and v.dtype == torch.float32 for m, v in stats)
        _check(stats, xs, rtol=1e-5)  # fp32 accumulation of exactly representable inputs


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_float64(backend):
    xs = _make([(5, 4, 3), (7,)], 3, dtype=torch.float64)
    stats = _run(backend, acq_kernels.bn_stats, xs)
    assert stats[0][0].dtype == torch.float64
    _check(stats, xs, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_and_layouts(backend):
    base = torch.randn(5, 13, 7, 3)
    wide = torch.randn(9, 70)
    xs = [
        base,                                            # NCHW, odd everything
        base.contiguous(memory_format=torch.channels_last),
        base[:, 1:12],                                   # channel slice: not dense -> copied
        base.permute(0, 1, 3, 2),                        # spatial transpose: not dense
        wide,                                            # [N, C]
        wide.t().contiguous().t(),                       # [N, C] with channels strided
        wide[::2],                                       # strided rows
        torch.randn(3, 6, 1, 11),                        # a size-1 spatial dim
        torch.randn(2, 3, 4, 5, 6),                      # BatchNorm3d-style input
        torch.randn(1, 130, 1, 1).contiguous(memory_format=torch.channels_last),
    ]
    _check(_run(backend, acq_kernels.bn_stats, xs), xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_keep_layer_order(backend):
    xs = [torch.randn(4, 8, 3, 3), torch.randn(4, 5).half(), torch.randn(2, 6, 4, 4).bfloat16(),
          torch.randn(3, 7)]
    stats = _run(backend, acq_kernels.bn_stats, xs)
    assert [m.shape[0] for m, _ in stats] == [8, 5, 6, 7]
    _check(stats, xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_is_stable(backend):
    """Per-channel mean 1e4, std 1: a naive E[x^2] - E[x]^2 in fp32 loses every digit."""
    batch = 4 if backend == "triton" else 32
    for cl in (False, True):
        xs = [(1e4 + torch.randn(batch, 8, 12, 12)), 1e4 + torch.randn(batch * 50, 24)]
        if cl:
            xs[0] = xs[0].contiguous(memory_format=torch.channels_last)
        stats = _run(backend, acq_kernels.bn_stats, xs)
        for (m, v), (rm, rv) in zip(stats, _oracle(xs)):
            assert torch.allclose(v.double(), rv, rtol=1e-4, atol=0), (v, rv)
            assert torch.allclose(m.double(), rm, rtol=3e-7, atol=0)  # ~2 fp32 ulps


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_element_per_channel(backend):
    xs = [torch.randn(1, 9), torch.randn(1, 70, 1, 1), 5.0 + torch.randn(1, 3, 1)]
    stats = _run(backend, acq_kernels.bn_stats, xs)
    for (m, v), x in zip(stats, xs):
        assert torch.equal(v, torch.zeros_like(v))
        assert torch.allclose(m, x.reshape(-1).float(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- loss + backward
def _targets(xs, dtype=torch.float32):
    return ([torch.randn(x.shape[1], dtype=dtype) for x in xs],
            [torch.rand(x.shape[1], dtype=dtype) + 0.5 for x in xs])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_bns_loss_forward_backward(backend, dtype):
    shapes = [(16, 6, 5), (12, 4, 4), (33,), (8, 3, 3)]
    xs = _make(shapes, 5, dtype=dtype)
    xs[1] = xs[1].contiguous(memory_format=torch.channels_last)
    rms, rvs = _targets(xs)
    xk = [x.detach().clone().requires_grad_() for x in xs]
    loss, per_layer = _run(backend, acq_kernels.bns_loss, xk, rms, rvs)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert per_layer.shape == (len(xs),) and not per_layer.requires_grad
    g = torch.randn(())
    (loss * g).backward()

    xr = [x.detach().double().requires_grad_() for x in xs]
    lr, pr = bns_loss_reference(xr, [r.double() for r in rms], [r.double() for r in rvs])
    (lr * g.double()).backward()
    assert torch.allclose(loss.double(), lr, rtol=1e-5)
    assert torch.allclose(per_layer.double(), pr, rtol=1e-5)
    gtol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(xk, xr):
        assert a.grad.dtype == a.dtype and a.grad.stride() == a.stride()
        scale = b.grad.abs().max().item()
        assert (a.grad.double() - b.grad).abs().max().item() <= gtol * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_stats_backward_matches_autograd(backend):
    xs = [torch.randn(3, 10, 4, 5), torch.randn(7, 6), torch.randn(2, 4, 3, 3)]
    xs[2] = xs[2].contiguous(memory_format=torch.channels_last)
    gm = [torch.randn(x.shape[1]) for x in xs]
    gv = [torch.randn(x.shape[1]) for x in xs]
    xk = [x.clone().requires_grad_() for x in xs]
    stats = _run(backend, acq_kernels.bn_stats, xk)
    sum(((m * a).sum() + (v * b).sum()) for (m, v), a, b in zip(stats, gm, gv)).backward()
    xr = [x.double().requires_grad_() for x in xs]
    ref = bn_stats_reference(xr)
    sum(((m * a.double()).sum() + (v * b.double()).sum()) for (m, v), a, b in zip(ref, gm, gv)).backward()
    for a, b in zip(xk, xr):
        assert torch.allclose(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_gradcheck_float64(backend):
    xs = [torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(5, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 3, 2, 2, dtype=torch.float64).contiguous(
              memory_format=torch.channels_last).requires_grad_()]
    rms, rvs = _targets(xs, torch.float64)

    def f(*ts):
        with acq_kernels.set_backend(backend):
            loss, _ = acq_kernels.bns_loss(list(ts), rms, rvs)
            stats = acq_kernels.bn_stats(list(ts))
        return (loss,) + tuple(t for mv in stats for t in mv)

    assert torch.autograd.gradcheck(f, xs)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (interpreter)")
def test_launches_do_not_grow_with_layers(monkeypatch):
    """Triton: one reduction + one combine launch forward, one launch backward, any L."""
    backend = "triton"
    from acq_kernels.bn_stats import triton_kernels as tk
    counts = {}

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            counts[self.name] = counts.get(self.name, 0) + 1
            return self.kernel[grid]

    for name in ("bn_partial_kernel", "bn_combine_kernel", "bn_backward_kernel"):
        monkeypatch.setattr(tk, name, Counting(name, getattr(tk, name)))
    for n_layers in (1, 9):
        counts.clear()
        xs = [torch.randn(2, 4 + i, 3, 3, requires_grad=True) for i in range(n_layers)]
        rms, rvs = _targets(xs)
        loss, _ = _run(backend, acq_kernels.bns_loss, xs, rms, rvs)
        with acq_kernels.set_backend(backend):
            loss.backward()
        assert counts == {"bn_partial_kernel": 1, "bn_combine_kernel": 1, "bn_backward_kernel": 1}
        assert all(x.grad is not None for x in xs)
    # Layers whose addresses allow 128-bit loads get their own launch; still not per layer.
    counts.clear()
    xs = [torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 3, 3, requires_grad=True),
          torch.randn(4, 16, requires_grad=True), torch.randn(3, 5, 7, 7, requires_grad=True)]
    rms, rvs = _targets(xs)
    loss, _ = _run(backend, acq_kernels.bns_loss, xs, rms, rvs)
    with acq_kernels.set_backend(backend):
        loss.backward()
    assert counts == {"bn_partial_kernel": 2, "bn_combine_kernel": 1, "bn_backward_kernel": 2}
    lr, _ = bns_loss_reference([x.detach().double() for x in xs], [r.double() for r in rms],
                               [r.double() for r in rvs])
    assert torch.allclose(loss.double(), lr, rtol=1e-5)


# ----------------------------------------------------------------------------- flat buffers
@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_merge_equals_whole_batch(backend):
    shapes = [(6, 5, 5), (10,), (4, 3, 7)]
    whole = _make(shapes, 9, loc=50.0)
    a = [x[:4] for x in whole]
    b = [x[4:] for x in whole]
    shifts = [torch.full((s[0],), 50.0) for s in shapes]
    channels = [s[0] for s in shapes]
    with acq_kernels.set_backend(backend):
        fa = acq_kernels.bn_stats_flat(a, shifts)
        fb = acq_kernels.bn_stats_flat(b, shifts)
    assert fa.shape == (3 * sum(channels),) and fa.dtype == torch.float32
    merged = acq_kernels.merge_bn_stats(fa, fb)
    stats = acq_kernels.bn_stats_from_flat(merged, channels, shifts)
    _check(stats, whole, rtol=1e-5)
    # Without shifts (k = 0) the format still round-trips for data near zero.
    with acq_kernels.set_backend(backend):
        f0 = acq_kernels.bn_stats_flat([x - 50.0 for x in whole])
    _check(acq_kernels.bn_stats_from_flat(f0, channels), [x - 50.0 for x in whole], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_loss_gradient_through_simulated_allreduce(backend):
    """Two 'ranks' in one process: the loss on merged statistics, with the straight-through
    all-reduce of all_reduce_flat, gives each part the gradient of the whole-batch loss."""
    shapes = [(6, 4, 4), (5,)]
    whole = _make(shapes, 8, loc=3.0)
    rms, rvs = _targets(whole)
    channels = [s[0] for s in shapes]
    parts = [[x[:3].clone().requires_grad_() for x in whole],
             [x[3:].clone().requires_grad_() for x in whole]]
    with acq_kernels.set_backend(backend):
        flats = [acq_kernels.bn_stats_flat(p, rms) for p in parts]
    total = (flats[0] + flats[1]).detach()
    for r in range(2):
        glob = flats[r] + (total - flats[r].detach())  # what all_reduce_flat does on rank r
        loss, _ = acq_kernels.bns_loss_from_flat(glob, channels, rms, rvs, shifts=rms)
        with acq_kernels.set_backend(backend):
            loss.backward()
    xw = [x.clone().double().requires_grad_() for x in whole]
    lw, _ = bns_loss_reference(xw, [r.double() for r in rms], [r.double() for r in rvs])
    lw.backward()
    assert torch.allclose(loss.double(), lw, rtol=1e-5)
    for i in range(len(shapes)):
        g = torch.cat([parts[0][i].grad, parts[1][i].grad]).double()
        assert torch.allclose(g, xw[i].grad, rtol=1e-4, atol=1e-6)
    # all_reduce_flat without a process group is the identity
    assert acq_kernels.all_reduce_flat(flats[0]) is flats[0]


# ----------------------------------------------------------------------------- collector
class _TinyResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU())
        self.c1 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b1 = torch.nn.BatchNorm2d(16)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.b2 = torch.nn.BatchNorm2d(16)
        self.down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2), torch.nn.BatchNorm2d(16))
        self.fc = torch.nn.Linear(16, 12)
        self.bfc = torch.nn.BatchNorm1d(12)
        self.untracked = torch.nn.BatchNorm1d(12, track_running_stats=False)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        x = torch.relu(y + self.down(x))
        x = self.bfc(self.fc(x.mean((2, 3))))
        return self.head(self.untracked(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_collector_matches_gdfq_hooks(backend):
    model = _TinyResNet().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) and m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.requires_grad_(False)
    # The GDFQ pattern: a hook per BN layer computing mean/var of its input.
    gdfq = []

    def hook(mod, inp, out):
        x = inp[0]
        dims = [0] + list(range(2, x.dim()))
        gdfq.append(torch.mean((x.mean(dims) - mod.running_mean) ** 2)
                    + torch.mean((x.var(dims, unbiased=False) - mod.running_var) ** 2))

    collector = acq_kernels.BNStatCollector(model)
    assert len(collector.modules) == 5  # the untracked BN has no running statistics
    for step in range(2):  # usable repeatedly
        x = torch.randn(4, 3, 10, 10, requires_grad=True)
        conv_out = []
        h = model.stem[0].register_forward_hook(lambda mod, i, o: conv_out.append(o))
        with acq_kernels.set_backend(backend):
            with collector as bns:
                model(x)
                loss, per_layer = bns.loss()
            h.remove()
            assert len(bns.tensors) == 5 and len(bns.layers) == 5
            assert bns.tensors[0] is conv_out[0]  # a reference to the BN input, not a copy
            (gx,) = torch.autograd.grad(loss, x)
        handles = [m.register_forward_hook(hook) for m in collector.modules]
        gdfq.clear()
        model(x)
        for h in handles:
            h.remove()
        ref = torch.stack(gdfq).mean()
        (gr,) = torch.autograd.grad(ref, x)
        assert torch.allclose(loss, ref, rtol=1e-4)
        assert torch.allclose(per_layer, torch.stack(gdfq).detach(), rtol=1e-4)
        assert torch.allclose(gx, gr, rtol=1e-3, atol=1e-6)
    # hooks are gone after exit: a forward records nothing
    n = len(collector.tensors)
    model(torch.randn(2, 3, 10, 10))
    assert len(collector.tensors) == n


def test_collector_keeps_references_not_copies():
    bn = torch.nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3)
    with acq_kernels.BNStatCollector(bn) as bns:
        bn(x)
    assert bns.tensors[0] is x
    with pytest.raises(ValueError, match="tensors"):
        acq_kernels.BNStatCollector(bn).loss()
    with pytest.raises(TypeError, match="model"):
        acq_kernels.BNStatCollector("not a model")


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_naming_the_argument():
    x = torch.randn(4, 3, 2, 2)
    rm, rv = [torch.zeros(3)], [torch.ones(3)]
    with pytest.raises(ValueError, match="tensors"):
        acq_kernels.bn_stats([])
    with pytest.raises(TypeError, match="tensors"):
        acq_kernels.bn_stats(x)
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        acq_kernels.bn_stats([x, torch.randn(5)])
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        acq_kernels.bn_stats([torch.ones(3, 4, dtype=torch.int32)])
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        acq_kernels.bn_stats([x, "x"])
    with pytest.raises(ValueError, match=r"tensors\[0\]"):
        acq_kernels.bn_stats([torch.randn(0, 3)])
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        acq_kernels.bn_stats([x, torch.randn(2, 3, device="meta")])
    with pytest.raises(ValueError, match="running_means"):
        acq_kernels.bns_loss([x, x], rm, rv + rv)
    with pytest.raises(ValueError, match="running_vars"):
        acq_kernels.bns_loss([x], rm, [torch.ones(4)])
    with pytest.raises(ValueError, match="running_means"):
        acq_kernels.bns_loss([x], [torch.zeros(3, 1)], rv)
    with pytest.raises(TypeError, match="running_vars"):
        acq_kernels.bns_loss([x], rm, [None])
    with pytest.raises(ValueError, match="tensors"):
        acq_kernels.bns_loss([], [], [])
    with pytest.raises(ValueError, match="shifts"):
        acq_kernels.bn_stats_flat([x], [torch.zeros(2)])
    with pytest.raises(ValueError, match="flat"):
        acq_kernels.bn_stats_from_flat(torch.zeros(8), [3])
    with pytest.raises(ValueError, match="channels"):
        acq_kernels.bn_stats_from_flat(torch.zeros(9), [])
    with pytest.raises(ValueError, match="a and b"):
        acq_kernels.merge_bn_stats(torch.zeros(9), torch.zeros(6))


def test_custom_ops_pass_opcheck():
    from acq_kernels.bn_stats import ops
    xs = [torch.randn(3, 4, 2, 2), torch.randn(5, 6).t().contiguous().t()]
    torch.library.opcheck(ops.bn_stats_packed, (xs,))
    coef = torch.randn(3, 10)
    torch.library.opcheck(ops.bn_stats_grad, (xs, coef))


def test_bns_loss_compiles_without_graph_breaks():
    xs = [torch.randn(4, 8, 5, 5, requires_grad=True), torch.randn(6, 3, requires_grad=True)]
    rms, rvs = _targets(xs)

    def f(ts):
        return acq_kernels.bns_loss(ts, rms, rvs)[0]

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(xs)
    (g,) = torch.autograd.grad(loss, xs[0])
    ref = f(xs)
    (gr,) = torch.autograd.grad(ref, xs[0])
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert torch.allclose(g, gr, rtol=1e-5, atol=1e-8)


def test_compiled_backward_leaves_no_traced_tensor_in_the_vector_cache():
    """Compiling bns_loss traces the custom op's backward, which asks for the per-channel vectors.
    On torch <= 2.11 torch.compiler.is_compiling() is False there, and the traced (functional)
    tensors used to land in the cache: the next eager bns_loss of the same shapes then failed with
    "Attempting to use FunctionalTensor on its own"."""
    from acq_kernels.bn_stats import ops
    xs = [torch.randn(3, 7, 4, 4, requires_grad=True), torch.randn(5, 9, requires_grad=True)]
    rms, rvs = _targets(xs)

    def f(ts):
        return acq_kernels.bns_loss(ts, rms, rvs)[0]

    torch._dynamo.reset()
    ops._vec_cache.clear()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(xs)
    torch.autograd.grad(loss, xs)
    assert all(type(t) is torch.Tensor and not torch._is_functional_tensor(t)
               for v in ops._vec_cache.values() for t in v)
    ref = f(xs)  # eager, same shapes: reads the cache
    g_eager = torch.autograd.grad(ref, xs)
    assert torch.allclose(loss, ref, rtol=1e-6)
    lr, _ = bns_loss_reference([x.double() for x in xs], [r.double() for r in rms], [r.double() for r in rvs])
    assert torch.allclose(ref.double(), lr, rtol=1e-5)
    assert all(torch.isfinite(g).all() for g in g_eager)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (interpreter)")
def test_gpu_tile_sizes_under_interpreter(monkeypatch):
    """The GPU block/tile sizes (not the interpreter's bigger ones): channel folding for small
    C, channel blocks for large C, long rows split into column ranges, odd tails."""
    from acq_kernels.bn_stats import plan as plan_mod
    from acq_kernels.bn_stats import triton_kernels as tk
    monkeypatch.setattr(tk, "BLOCK_R_INTERPRET", tk.BLOCK_R)
    monkeypatch.setattr(tk, "BLOCK_I_INTERPRET", tk.BLOCK_I)
    monkeypatch.setattr(plan_mod, "TILE_ELEMS_INTERPRET", plan_mod.TILE_ELEMS)
    monkeypatch.setattr(plan_mod, "_cache", {})
    xs = [torch.randn(3, 16, 9, 9).contiguous(memory_format=torch.channels_last),   # fold 4
          torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last),   # fold 2 + tail
          torch.randn(5, 200),                                                       # 64-ch blocks
          torch.randn(2, 3, 40, 41),                                                 # 2 col ranges
          torch.randn(70, 6, 3, 3)]                                                  # many rows
    xk = [x.clone().requires_grad_() for x in xs]
    rms, rvs = _targets(xs)
    with acq_kernels.set_backend("triton"):
        stats = acq_kernels.bn_stats(xk)
        loss, _ = acq_kernels.bns_loss(xk, rms, rvs)
        loss.backward()
    _check(stats, xs)
    xr = [x.double().requires_grad_() for x in xs]
    lr, _ = bns_loss_reference(xr, [r.double() for r in rms], [r.double() for r in rvs])
    lr.backward()
    for a, b in zip(xk, xr):
        assert torch.allclose(a.grad.double(), b.grad, rtol=1e-4, atol=1e-7)
