"""GPU correctness: every backend usable on CUDA (triton, cuda) against the reference backend, on
fresh random inputs, for each family's public ops — forward values and input gradients, fp32 /
bf16 / fp16, contiguous, channels_last and strided layouts. Auto-skipped without a GPU; run by
scripts/gpu_check.sh on the GPU box."""
import contextlib

import pytest
import torch

import acq_kernels
from acq_kernels import _backend

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")
GPU_BACKENDS = ("triton", "cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "channels_last", "strided")
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


@contextlib.contextmanager
def use(backend):
    """Process-wide choice: CUDA backwards run on autograd's own threads."""
    before = _backend._global_choice
    acq_kernels.set_backend(backend)
    try:
        yield
    finally:
        _backend._global_choice = before


def run(backend, fn, inputs, leaves):
    """fn(**clones of inputs) on `backend` -> (flat outputs, grads of leaves) with fixed random
    output gradients; skips when the backend does not implement the op for these inputs."""
    args = {k: _clone(v) for k, v in inputs.items()}
    leaf_args = [args[k] for k in leaves]
    with use(backend):
        try:
            out = fn(**args)
        except RuntimeError as exc:
            if "does not implement" in str(exc) or "cannot run" in str(exc):
                pytest.skip(f"{backend}: {exc}")
            raise
        flat = _flat(out)
        diff = [o for o in flat if o.requires_grad]
        grads = []
        if diff and leaf_args:
            gen = torch.Generator(device=DEV).manual_seed(1)
            gouts = [torch.randn(o.shape, generator=gen, device=DEV, dtype=o.dtype) for o in diff]
            flat_leaves = [t for v in leaf_args for t in (v if isinstance(v, list) else [v])]
            grads = torch.autograd.grad(diff, flat_leaves, gouts, allow_unused=True)
    torch.cuda.synchronize()
    return [o.detach() for o in flat], list(grads), args


def _clone(v):
    if isinstance(v, torch.Tensor):
        c = v.detach().clone(memory_format=torch.preserve_format)
        if v.stride() != c.stride():  # keep strided views strided
            c = torch.empty_strided(v.size(), v.stride(), device=v.device, dtype=v.dtype).copy_(v)
        return c.requires_grad_(v.requires_grad)
    if isinstance(v, list):
        return [_clone(t) for t in v]
    return v


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


def close(got, ref, dtype, what):
    rtol, atol = TOL[dtype]
    assert len(got) == len(ref), what
    for i, (g, r) in enumerate(zip(got, ref)):
        if g is None or r is None:
            assert g is None and r is None, f"{what}[{i}]: gradient present on one side only"
            continue
        assert g.shape == r.shape and g.dtype == r.dtype, f"{what}[{i}]: {g.shape}/{g.dtype} vs {r.shape}/{r.dtype}"
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")


def close_quantized(got, ref, step, what, max_frac=1e-3):
    """Fake-quantized tensors: equal except on rare rounding ties, which move one step."""
    diff = (got.float() - ref.float()).abs()
    bad = diff > 1e-6 + 1e-3 * step
    assert bad.float().mean().item() <= max_frac, f"{what}: {bad.sum().item()} of {bad.numel()} elements differ"
    assert diff.max().item() <= step * 1.01 + 1e-6, f"{what}: max diff {diff.max().item()} > one step {step}"


def feature(shape, dtype, layout, scale=1.0):
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        n, c, h, w = shape
        return (torch.randn(n, c, h, 2 * w, device=DEV, dtype=dtype) * scale)[..., ::2]
    t = torch.randn(shape, device=DEV, dtype=dtype) * scale
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def backends_or_skip(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _backend.backend_usable(backend, DEV):
        pytest.skip(f"backend {backend} is not usable on CUDA here")


# ---------------------------------------------------------------------------------------------
# Fake quantization
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ste", ("clipped", "pure"))
@pytest.mark.parametrize("per_channel", (False, True), ids=("per_tensor", "per_channel"))
def test_fake_quantize(backend, dtype, layout, ste, per_channel):
    backends_or_skip(backend)
    x = feature((3, 7, 17, 19), dtype, layout).requires_grad_(True)
    if per_channel:
        scale = torch.rand(7, device=DEV) * 0.05 + 0.01
        zp = torch.randint(0, 16, (7,), device=DEV, dtype=torch.int32)
        axis = 1
    else:
        scale = torch.tensor(0.037, device=DEV)
        zp = torch.tensor(5, device=DEV, dtype=torch.int32)
        axis = None

    def fn(x, scale, zp):
        return acq_kernels.fake_quantize(x, scale, zp, 0, 15, axis=axis, ste=ste)

    inputs = dict(x=x, scale=scale, zp=zp)
    ref, gref, _ = run("reference", fn, inputs, ["x"])
    got, ggot, _ = run(backend, fn, inputs, ["x"])
    step = float(scale.max())
    close_quantized(got[0], ref[0], step, "out")
    assert got[0].dtype == dtype and got[0].shape == x.shape
    # STE gradients: g or 0; a rounding tie can move an element across the clip boundary.
    close_quantized(ggot[0], gref[0], float(gref[0].float().abs().max()) + 1e-6, "grad x")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_fake_quantize_learnable(backend, dtype, layout):
    backends_or_skip(backend)
    x = feature((4, 6, 15, 13), dtype, layout).requires_grad_(True)
    scale = torch.tensor([0.041], device=DEV, requires_grad=True)
    zp = torch.tensor([6.3], device=DEV, requires_grad=True)

    def fn(x, scale, zp):
        return acq_kernels.fake_quantize_learnable(x, scale, zp, 0, 15, grad_factor=0.5)

    inputs = dict(x=x, scale=scale, zp=zp)
    ref, gref, _ = run("reference", fn, inputs, ["x", "scale", "zp"])
    got, ggot, _ = run(backend, fn, inputs, ["x", "scale", "zp"])
    close_quantized(got[0], ref[0], 0.041, "out")
    close_quantized(ggot[0], gref[0], float(gref[0].float().abs().max()) + 1e-6, "grad x")
    # scale / zero-point gradients are sums over every element: compare relatively.
    for i, name in ((1, "grad scale"), (2, "grad zp")):
        torch.testing.assert_close(ggot[i].float(), gref[i].float(), rtol=2e-2, atol=1e-2 * x.numel() ** 0.5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", (None, 0), ids=("per_tensor", "per_channel"))
@pytest.mark.parametrize("symmetric", (False, True))
def test_fake_quantize_minmax(backend, dtype, axis, symmetric):
    backends_or_skip(backend)
    w = (torch.randn(33, 17, 3, 3, device=DEV, dtype=dtype) * 0.05).requires_grad_(True)

    def fn(w):
        return acq_kernels.fake_quantize_minmax(w, -8, 7, axis=axis, symmetric=symmetric)

    ref, gref, _ = run("reference", fn, dict(w=w), ["w"])
    got, ggot, _ = run(backend, fn, dict(w=w), ["w"])
    torch.testing.assert_close(got[1].float(), ref[1].float(), rtol=1e-6, atol=1e-9)  # scale
    torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=0, atol=0)        # zero point
    close_quantized(got[0], ref[0], float(ref[1].max()), "out")
    close_quantized(ggot[0], gref[0], float(gref[0].float().abs().max()) + 1e-6, "grad w")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_quantize_moving_average(backend, dtype, layout):
    backends_or_skip(backend)
    x = feature((5, 8, 11, 9), dtype, layout, scale=2.0).requires_grad_(True)
    state = dict(min_val=torch.tensor([-1.0], device=DEV), max_val=torch.tensor([1.5], device=DEV),
                 scale=torch.tensor([0.1], device=DEV), zero_point=torch.tensor([8], device=DEV, dtype=torch.int32))

    def fn(x, min_val, max_val, scale, zero_point):
        return acq_kernels.fake_quantize_moving_average(x, min_val, max_val, scale, zero_point, 0, 15,
                                                        averaging_constant=0.1)

    ref, gref, sref = run("reference", fn, dict(x=x, **state), ["x"])
    got, ggot, sgot = run(backend, fn, dict(x=x, **state), ["x"])
    for k in ("min_val", "max_val", "scale"):
        torch.testing.assert_close(sgot[k], sref[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert torch.equal(sgot["zero_point"], sref["zero_point"])
    out_ref = ref[0] if ref[0].shape == x.shape else next(t for t in ref if t.shape == x.shape)
    out_got = got[0] if got[0].shape == x.shape else next(t for t in got if t.shape == x.shape)
    close_quantized(out_got, out_ref, float(sref["scale"]), "out")
    close_quantized(ggot[0], gref[0], float(gref[0].float().abs().max()) + 1e-6, "grad x")


# Layouts of the per-channel reductions (CUDA: channel-innermost tiles, run tiles, several
# block rows + a finishing pass): (shape, memory format, axis). Odd channel counts and odd
# runs take the scalar paths, even ones the 128-bit ones; 70000 channels > one grid row's
# 65535; the large ones give several block rows per channel.
REDUCTION_LAYOUTS = {
    "nhwc_axis1": ((4, 48, 7, 9), "channels_last", 1),
    "nhwc_axis1_odd": ((3, 37, 5, 7), "channels_last", 1),
    "nhwc_axis1_tall": ((32, 64, 28, 28), "channels_last", 1),
    "nchw_axis1": ((4, 24, 12, 12), "contiguous", 1),
    "nchw_axis1_odd": ((5, 11, 7, 7), "contiguous", 1),
    "nchw_axis1_tall": ((256, 16, 14, 14), "contiguous", 1),
    "nchw_axis1_one_sample": ((1, 8, 96, 96), "contiguous", 1),  # long runs split across blocks
    "last_axis": ((6, 5, 40), "contiguous", 2),
    "huge_channels": ((3, 70000), "contiguous", 1),
    "huge_channels_rows": ((2, 70000, 3), "contiguous", 1),
}


def reduction_input(key, dtype, scale=1.0):
    shape, fmt, axis = REDUCTION_LAYOUTS[key]
    t = torch.randn(shape, device=DEV, dtype=dtype) * scale
    if fmt == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t, axis


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", sorted(REDUCTION_LAYOUTS))
def test_fake_quantize_minmax_per_channel_layouts(backend, dtype, key):
    """Per-channel observer on every reduction layout: the qparams exactly as the reference's
    (min/max are exact in any order), the output within rounding ties."""
    backends_or_skip(backend)
    w, axis = reduction_input(key, dtype, 0.05)
    w.requires_grad_(True)

    def fn(w):
        return acq_kernels.fake_quantize_minmax(w, -8, 7, axis=axis)

    ref, gref, _ = run("reference", fn, dict(w=w), ["w"])
    got, ggot, _ = run(backend, fn, dict(w=w), ["w"])
    torch.testing.assert_close(got[1].float(), ref[1].float(), rtol=1e-6, atol=1e-9)  # scale
    torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=0, atol=0)        # zero point
    assert got[0].stride() == w.stride()
    close_quantized(got[0], ref[0], float(ref[1].max()), "out")
    close_quantized(ggot[0], gref[0], float(gref[0].float().abs().max()) + 1e-6, "grad w")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", sorted(REDUCTION_LAYOUTS))
def test_fake_quantize_learnable_per_channel_layouts(backend, dtype, key):
    backends_or_skip(backend)
    x, axis = reduction_input(key, dtype, 2.0)
    x.requires_grad_(True)
    c = x.shape[axis]
    scale = (torch.rand(c, device=DEV) * 0.2 + 0.05).requires_grad_(True)
    zp = (torch.randn(c, device=DEV) * 2).requires_grad_(True)

    def fn(x, scale, zp):
        return acq_kernels.fake_quantize_learnable(x, scale, zp, -8, 7, axis=axis, grad_factor=0.5)

    inputs = dict(x=x, scale=scale, zp=zp)
    ref, gref, _ = run("reference", fn, inputs, ["x", "scale", "zp"])
    got, ggot, _ = run(backend, fn, inputs, ["x", "scale", "zp"])
    close_quantized(got[0], ref[0], float(scale.detach().max()), "out")
    close_quantized(ggot[0], gref[0], float(gref[0].float().abs().max()) + 1e-6, "grad x")
    per_channel = x.numel() // c
    for i, name in ((1, "grad scale"), (2, "grad zp")):
        torch.testing.assert_close(ggot[i].float(), gref[i].float(), rtol=2e-2, atol=1e-2 * per_channel ** 0.5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", (1, 4093, 1 << 20, (1 << 20) + 5))
def test_per_tensor_reductions_odd_sizes(backend, dtype, numel):
    """Per-tensor min/max and LSQ on sizes with a scalar tail after the 128-bit bulk (and one
    large enough for every pass-1 block), including an unaligned view."""
    backends_or_skip(backend)
    base = torch.randn(numel + 1, device=DEV, dtype=dtype) * 3
    for x in (base[:numel], base[1:]):  # base[1:] is not 16-byte aligned
        ref, _, _ = run("reference", lambda x: acq_kernels.fake_quantize_minmax(x, 0, 255), dict(x=x), [])
        got, _, _ = run(backend, lambda x: acq_kernels.fake_quantize_minmax(x, 0, 255), dict(x=x), [])
        torch.testing.assert_close(got[1].float(), ref[1].float(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=0, atol=0)
        close_quantized(got[0], ref[0], float(ref[1].max()), "minmax out")
        xl = x.detach().clone().requires_grad_(True)
        inputs = dict(x=xl, scale=torch.tensor([0.05], device=DEV, requires_grad=True),
                      zp=torch.tensor([100.3], device=DEV, requires_grad=True))
        fn = lambda x, scale, zp: acq_kernels.fake_quantize_learnable(x, scale, zp, 0, 255)  # noqa: E731
        ref, gref, _ = run("reference", fn, inputs, ["x", "scale", "zp"])
        got, ggot, _ = run(backend, fn, inputs, ["x", "scale", "zp"])
        close_quantized(ggot[0], gref[0], float(gref[0].float().abs().max()) + 1e-6, "lsq grad x")
        for i in (1, 2):
            torch.testing.assert_close(ggot[i].float(), gref[i].float(), rtol=2e-2, atol=1e-2 * numel ** 0.5)


# ---------------------------------------------------------------------------------------------
# Attention maps and their losses
# ---------------------------------------------------------------------------------------------
# Map shapes: odd maps and channel counts (scalar paths), 14x14 / 8-channel multiples (vector
# paths), a 3-channel input, a wide 512-channel one and a 56x56 map (several pixel blocks).
ATTENTION_SHAPES = ((6, 37, 9, 11), (4, 64, 14, 14), (3, 3, 7, 7), (2, 512, 7, 7), (2, 16, 56, 56))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", (2, 1))
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_spatial_attention(backend, dtype, layout, p, shape):
    backends_or_skip(backend)
    feat = feature(shape, dtype, layout).requires_grad_(True)
    fn = lambda feat: acq_kernels.spatial_attention(feat, p=p)  # noqa: E731
    ref, gref, _ = run("reference", fn, dict(feat=feat), ["feat"])
    got, ggot, _ = run(backend, fn, dict(feat=feat), ["feat"])
    close(got, ref, dtype, "amap/anorm/center")
    close(ggot, gref, dtype, "grad feat")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_losses(backend, dtype):
    backends_or_skip(backend)
    n, hw = 10, 63
    a = torch.nn.functional.normalize(torch.rand(2 * n, hw, device=DEV), dim=1).to(dtype).requires_grad_(True)
    center = (torch.rand(n, 2, device=DEV) * 2 - 1).to(dtype).requires_grad_(True)
    target = torch.rand(n, 2, device=DEV) * 2 - 1

    def fn(a, center, target):
        return (acq_kernels.attention_sq_distance(a[:n], a[n:]),
                acq_kernels.attention_sq_distance(a),  # stacked form
                acq_kernels.attention_pair_hinge(a[:n], a[n:], margin=0.5),
                acq_kernels.attention_center_loss(center, target.to(center.dtype)))

    inputs = dict(a=a, center=center, target=target)
    ref, gref, _ = run("reference", fn, inputs, ["a", "center"])
    got, ggot, _ = run(backend, fn, inputs, ["a", "center"])
    close(got, ref, dtype, "losses")
    close(ggot, gref, dtype, "grads")


# ---------------------------------------------------------------------------------------------
# BN statistics
# ---------------------------------------------------------------------------------------------
def _bn_inputs(dtype):
    return [feature((4, 16, 9, 9), dtype, "contiguous", 2.0).add_(0.5).requires_grad_(True),
            feature((4, 33, 5, 7), dtype, "channels_last").requires_grad_(True),
            feature((4, 8, 6, 5), dtype, "strided").requires_grad_(True)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats(backend, dtype):
    backends_or_skip(backend)
    xs = _bn_inputs(dtype)
    ref, gref, _ = run("reference", lambda xs: acq_kernels.bn_stats(xs), dict(xs=xs), ["xs"])
    got, ggot, _ = run(backend, lambda xs: acq_kernels.bn_stats(xs), dict(xs=xs), ["xs"])
    close(got, ref, torch.float32 if dtype == torch.float32 else torch.float16, "mean/var")
    close(ggot, gref, dtype, "grads")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bn_stats_many_partials(backend):
    """Layers with hundreds of partials per channel (the combine's tree over partial rows) and
    channel counts that straddle the combine's 32-channel blocks."""
    backends_or_skip(backend)
    xs = [(torch.randn(32, 40, 56, 56, device=DEV) * 2 + 3).contiguous(memory_format=torch.channels_last),
          torch.randn(64, 7, 30, 30, device=DEV) - 1,
          torch.randn(4096, 35, device=DEV)]
    for x in xs:
        x.requires_grad_(True)
    ref, gref, _ = run("reference", lambda xs: acq_kernels.bn_stats(xs), dict(xs=xs), ["xs"])
    got, ggot, _ = run(backend, lambda xs: acq_kernels.bn_stats(xs), dict(xs=xs), ["xs"])
    close(got, ref, torch.float32, "mean/var")
    close(ggot, gref, torch.float32, "grads")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bns_loss(backend, dtype):
    backends_or_skip(backend)
    xs = _bn_inputs(dtype)
    rms = [torch.randn(x.shape[1], device=DEV) * 0.1 for x in xs]
    rvs = [torch.rand(x.shape[1], device=DEV) + 0.5 for x in xs]
    fn = lambda tensors, running_means, running_vars: acq_kernels.bns_loss(tensors, running_means, running_vars)  # noqa: E731
    inputs = dict(tensors=xs, running_means=rms, running_vars=rvs)
    ref, gref, _ = run("reference", fn, inputs, ["tensors"])
    got, ggot, _ = run(backend, fn, inputs, ["tensors"])
    close(got, ref, torch.float32 if dtype == torch.float32 else torch.float16, "loss/per_layer")
    close(ggot, gref, dtype, "grads")


def test_benchmark_contenders_agree_on_cuda():
    """The benchmark's eager baselines compute what the library computes, on the GPU too."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import cases as C
    from bench import harness as H
    cfg = C.Config(DEV, torch.float32, "tiny")
    checked = 0
    for case in C.all_cases(["fake_quant", "attention", "bn_stats"]):
        if not case.acq_available():
            continue
        torch.manual_seed(0)
        a = H.flat_tensors(case.baseline(**case.make(cfg).kwargs))
        torch.manual_seed(0)
        wl = case.make(cfg)
        with H.backend_in_force("auto"):
            b = H.flat_tensors(case.acq(**wl.kwargs))
        assert len(a) == len(b), case.id
        for x, y in zip(a, b):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{case.id}: {m}")
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_acq_training_step_on_cuda(precision):
    """The whole ACQ step (the benchmark's fast loop: channels-last, optional bf16 autocast) on CUDA
    follows the reference backend's losses on its first step, stays finite, and syncs nothing."""
    from acqtrain.config import demo_defaults, make_config
    from acqtrain.models import digits_net
    from acqtrain.trainer import Trainer
    state = digits_net().state_dict()
    out = []
    for backend in ("reference", "auto"):
        cfg = make_config(**demo_defaults(device="cuda", batch_size=32, progress=False, seed=1,
                                          channels_last=True, precision=precision))
        teacher = digits_net()
        teacher.load_state_dict(state)
        with use(backend):
            t = Trainer(cfg, teacher)
            t.epoch = max(cfg.warmup_epochs, cfg.range_epochs) - 1  # observing, and G and Q train
            first = t.step()
            t.epoch += 1
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # a host sync inside the step raises
            try:
                later = [t.step() for _ in range(3)]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out.append(first)
        assert all(torch.isfinite(v).all() for s in later for v in s.values())
    tol = dict(rtol=1e-3, atol=1e-4) if precision == "fp32" else dict(rtol=0.05, atol=0.02)
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_cuda_graph_step_replays_the_eager_step():
    """--cuda-graphs: after its eager warm-up the main-phase step is captured once and replayed.
    Replays follow an eager twin on the same seed (CUDA graphs replay the RNG stream eager would
    draw), losses stay finite, parameters move, an LR milestone re-captures, and the non-finite
    check still sees the graph's iterations."""
    from acqtrain.config import demo_defaults, make_config
    from acqtrain.models import digits_net
    from acqtrain.trainer import GRAPH_WARMUP_STEPS, Trainer
    state = digits_net().state_dict()
    runs = []
    for graphs in (False, True):
        cfg = make_config(**demo_defaults(device="cuda", batch_size=32, progress=False, seed=2, cuda_graphs=graphs,
                                          warmup_epochs=0, range_epochs=1, q_milestones=[1]))
        teacher = digits_net()
        teacher.load_state_dict(state)
        with use("auto"):
            t = Trainer(cfg, teacher)
            t.epoch = 1  # main phase, ranges frozen (as they start)
            before = [p.detach().clone() for p in t.student.parameters()]
            losses = [{k: v.detach().clone() for k, v in t.step().items()} for _ in range(GRAPH_WARMUP_STEPS + 3)]
            assert (t._graph is not None) == graphs
            first_graph = t._graph
            t.sched_q.step()  # milestone 1: lr_q x 0.1
            losses.append({k: v.detach().clone() for k, v in t.step().items()})
            assert graphs is False or t._graph is not first_graph  # re-captured with the new LR
            torch.cuda.synchronize()
        assert int(t._iter_t) == t.iteration == GRAPH_WARMUP_STEPS + 4
        assert any(not torch.equal(a, b) for a, b in zip(before, t.student.parameters()))
        t._check_nonfinite()
        runs.append(losses)
    for step, (a, b) in enumerate(zip(*runs)):
        for k in a:
            assert torch.isfinite(b[k]), (step, k)
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=lambda m, s=step, k=k: f"step {s} {k}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bn_stats_replay_in_a_cuda_graph(backend):
    """The batched BN statistics upload a per-call table of data pointers; captured in a CUDA
    graph, replays must reread the same host table: new values in the same input tensors give
    the eager result."""
    if not _backend.backend_usable(backend, DEV):
        pytest.skip(f"{backend} not usable")
    gen = torch.Generator(device=DEV).manual_seed(0)
    shapes = [(4, 8, 6, 6), (4, 16, 3, 3), (4, 5, 7, 7)]
    xs = [torch.randn(s, device=DEV, generator=gen).requires_grad_(True) for s in shapes]
    rms = [torch.randn(s[1], device=DEV, generator=gen) for s in shapes]
    rvs = [torch.rand(s[1], device=DEV, generator=gen) + 0.5 for s in shapes]

    def loss_and_grads():
        loss, _ = acq_kernels.bns_loss(xs, rms, rvs)
        return [loss] + list(torch.autograd.grad(loss, xs))

    with use(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: plans, caches, JIT
                loss_and_grads()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = loss_and_grads()
        for trial in range(2):
            with torch.no_grad():
                for x in xs:
                    x.copy_(torch.randn(x.shape, device=DEV, generator=gen) * (trial + 1))
            graph.replay()
            want = loss_and_grads()
            for got, ref in zip(static_out, want):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# fq_observe_forward on CUDA: observer step + qparams + fake quant in one kernel launch,
# bitwise against torch.ao's observers and torch's fake quant run on the GPU
# ---------------------------------------------------------------------------------------------
from torch.ao.quantization import observer as tq_obs  # noqa: E402

OBSERVE_RANGES = ((-128, 127), (0, 255), (-8, 7), (0, 15))
# (name, shape, memory format, axis or -1). Sizes above 2^15 elements take the multi-block
# cooperative grid (grid-wide barriers); odd channel counts / runs take the scalar variants.
OBSERVE_LAYOUTS = (
    ("t_one", (1,), "contiguous", -1),
    ("t_odd", (4099,), "contiguous", -1),
    ("t_unaligned", (4101,), "unaligned", -1),
    ("t_nhwc", (4, 12, 9, 11), "channels_last", -1),
    ("t_large", ((1 << 22) + 3,), "contiguous", -1),
    ("t_large_nhwc", (32, 64, 28, 28), "channels_last", -1),
    ("c_weight_axis0", (64, 32, 3, 3), "contiguous", 0),
    ("c_weight_axis0_odd", (37, 5, 3, 3), "contiguous", 0),
    ("c_linear_axis0", (300, 129), "contiguous", 0),
    ("c_last_axis", (6, 5, 40), "contiguous", 2),
    ("c_nchw_axis1", (4, 24, 12, 12), "contiguous", 1),
    ("c_nhwc_axis1", (4, 48, 7, 9), "channels_last", 1),     # channels innermost
    ("c_nhwc_axis1_odd", (3, 37, 5, 7), "channels_last", 1),
    ("c_nhwc_axis2", (4, 8, 6, 10), "channels_last", 2),
    ("c_unaligned", (8, 33), "unaligned", 0),
    ("c_huge_channels", (3, 70000), "contiguous", 1),
    ("c_large_nchw", (64, 64, 32, 32), "contiguous", 1),     # multi-block, runs
    ("c_large_nhwc", (64, 64, 32, 32), "channels_last", 1),  # multi-block, columns
    ("c_large_one_sample", (1, 16, 256, 256), "contiguous", 1),
    ("c_large_axis0", (512, 1024), "contiguous", 0),
)
OBSERVER_KINDS = ("minmax", "moving_average")


def _observe_input(shape, fmt, dtype, step, gen):
    numel = 1
    for s in shape:
        numel *= s
    base = torch.randn(numel + 1, device=DEV, generator=gen) * (1 + step) + 0.3 * step
    if fmt == "unaligned":  # a view whose data pointer is not 16-byte aligned
        return base.to(dtype)[1:].reshape(shape)
    t = base[:numel].reshape(shape).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else t


def _torch_observer(kind, axis, qmin, qmax, symmetric, c):
    dtype = torch.qint8 if qmin < 0 else torch.quint8
    if axis < 0:
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        cls = tq_obs.MovingAverageMinMaxObserver if kind == "moving_average" else tq_obs.MinMaxObserver
        kw = {}
    else:
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        cls = (tq_obs.MovingAveragePerChannelMinMaxObserver if kind == "moving_average"
               else tq_obs.PerChannelMinMaxObserver)
        kw = {"ch_axis": axis}
    if kind == "moving_average":
        kw["averaging_constant"] = c
    return cls(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax, **kw).to(DEV)


def _symmetric_zero_point(qmin, qmax):
    return (qmin + qmax) // 2 if qmin >= 0 else 0  # torch's rule for a customised range


def _fresh_state(channels):
    return [torch.full((channels,), float("inf"), device=DEV),
            torch.full((channels,), float("-inf"), device=DEV),
            torch.ones(channels, device=DEV), torch.zeros(channels, device=DEV, dtype=torch.int32)]


def _observe_cuda(x, state, axis, kind, c, qmin, qmax, symmetric, eps, quantize=True, save_mask=True):
    return torch.ops.acq_kernels_C.fq_observe_forward(
        x, *state, axis, c, kind == "moving_average", qmin, qmax, symmetric,
        _symmetric_zero_point(qmin, qmax), eps, quantize, save_mask)


def _same_bits(got, want, what):
    got, want = got.reshape(-1), want.reshape(-1).to(got.dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), what
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)), what


def _torch_fake_quant(x, scale, zp, axis, qmin, qmax):
    """torch's CUDA fake quant (what FakeQuantize runs) and its in-range mask, laid out as x.
    Where torch's kernel lacks x's dtype it runs on x.float(), the same fp32 arithmetic its
    fp16/bf16 kernels do, rounded to x's dtype once at the end."""
    def call(t):
        if axis < 0:
            return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
                t, scale.reshape(1), zp.reshape(1).to(torch.int32),
                torch.ones(1, device=DEV, dtype=torch.long), qmin, qmax)
        return torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            t, scale, zp.to(torch.int32), axis, qmin, qmax)
    try:
        return call(x)
    except (RuntimeError, NotImplementedError) as exc:
        if "not implemented for" not in str(exc) or x.dtype == torch.float32:
            raise
        out, keep = call(x.float())
        return out.to(x.dtype), keep


def _cuda_observe_ready():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _backend.backend_usable("cuda", DEV):
        pytest.skip("extension built without CUDA kernels")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("acq_kernels_C::fq_observe_forward", "CUDA"):
        pytest.skip("extension has no CUDA fq_observe_forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", OBSERVER_KINDS)
@pytest.mark.parametrize("symmetric", (False, True), ids=("affine", "symmetric"))
def test_observe_forward_matches_torch_ao_on_cuda(dtype, kind, symmetric):
    """Three observer steps per layout and range: min_val/max_val/scale/zero_point bitwise
    torch.ao's observer + calculate_qparams on CUDA, out bitwise torch's CUDA fake quant with
    those qparams, the packed mask its in-range mask; x is left untouched."""
    _cuda_observe_ready()
    from acq_kernels.fake_quant import reference
    gen = torch.Generator(device=DEV).manual_seed(11)
    c, eps = 0.05, torch.finfo(torch.float32).eps
    for li, (name, shape, fmt, axis) in enumerate(OBSERVE_LAYOUTS):
        qmin, qmax = OBSERVE_RANGES[li % len(OBSERVE_RANGES)]
        channels = 1 if axis < 0 else shape[axis]
        obs = _torch_observer(kind, axis, qmin, qmax, symmetric, c)
        state = _fresh_state(channels)
        for step in range(3):
            x = _observe_input(shape, fmt, dtype, step, gen)
            x_before = x.clone()
            out, mask = _observe_cuda(x, state, axis, kind, c, qmin, qmax, symmetric, eps)
            obs(x)
            rs, rz = obs.calculate_qparams()
            what = f"{name} step {step} [{qmin}, {qmax}]"
            _same_bits(state[0], obs.min_val, what + " min_val")
            _same_bits(state[1], obs.max_val, what + " max_val")
            _same_bits(state[2], rs.float(), what + " scale")
            assert torch.equal(state[3], rz.reshape(-1).to(torch.int32)), what + " zero_point"
            ref_out, keep = _torch_fake_quant(x, rs.float().reshape(-1), rz.reshape(-1), axis, qmin, qmax)
            assert out.stride() == x.stride(), what
            _same_bits(out, ref_out, what + " out")
            assert torch.equal(reference.unpack_mask(mask, x), keep), what + " mask"
            assert torch.equal(x, x_before), what + " x"


@pytest.mark.parametrize("kind", OBSERVER_KINDS)
def test_observe_forward_state_only_empty_input_and_determinism(kind):
    """quantize=False updates only the state; an empty x leaves it untouched; a repeated call
    on the same input and state is bitwise the same (also on the multi-block grid)."""
    _cuda_observe_ready()
    args = (kind, 0.1, -8, 7, False, 1e-6)
    for shape, axis in (((3000,), -1), ((1 << 21,), -1), ((64, 64, 32, 32), 1), ((5, 0, 3), 0)):
        x = torch.randn(shape, device=DEV) * 3
        channels = 1 if axis < 0 else shape[axis]
        s1, s2 = _fresh_state(channels), _fresh_state(channels)
        out, mask = _observe_cuda(x, s1, axis, *args, quantize=False)
        assert out.numel() == 0 and mask.numel() == 0
        _observe_cuda(x, s2, axis, *args)
        for a, b in zip(s1, s2):
            assert torch.equal(a, b)
        if x.numel() == 0:
            for a, b in zip(s1, _fresh_state(channels)):
                assert torch.equal(a, b)  # untouched
            continue
        o1, m1 = _observe_cuda(x, s1, axis, *args)
        o2, m2 = _observe_cuda(x, s2, axis, *args)
        assert torch.equal(o1, o2) and torch.equal(m1, m2)
        for a, b in zip(s1, s2):
            assert torch.equal(a, b)


def test_observe_forward_never_seen_rule_and_nan():
    """A per-tensor range at +inf/-inf after observing (all-inf input keeps it finite-free)
    follows the reference; NaN and inf inputs propagate as torch's observers do."""
    _cuda_observe_ready()
    x = torch.randn(50000, device=DEV)
    x[::997] = float("inf")
    x[5::1009] = float("-inf")
    for kind in OBSERVER_KINDS:
        obs = _torch_observer(kind, -1, 0, 255, False, 0.1)
        state = _fresh_state(1)
        for step in range(2):
            xs = x * (step + 1)
            out, _ = _observe_cuda(xs, state, -1, kind, 0.1, 0, 255, False, float(obs.eps))
            obs(xs)
            rs, rz = obs.calculate_qparams()
            _same_bits(state[0], obs.min_val, "min_val")
            _same_bits(state[1], obs.max_val, "max_val")
            _same_bits(state[2], rs.float(), "scale")
            assert torch.equal(state[3], rz.reshape(-1).to(torch.int32))
    xn = torch.randn(4096, device=DEV)
    xn[7] = float("nan")
    state = _fresh_state(1)
    _observe_cuda(xn, state, -1, "minmax", 0.1, 0, 255, False, 1e-6)
    assert torch.isnan(state[0]).all() and torch.isnan(state[1]).all()


@pytest.mark.parametrize("shape,axis", (((4099,), -1), ((1 << 22,), -1), ((64, 32, 3, 3), 0),
                                        ((64, 64, 32, 32), 1)), ids=str)
def test_observe_forward_replays_in_a_cuda_graph(shape, axis):
    """Captured once (single block and the cooperative multi-block grid alike), each replay
    with new values in the static input updates the state and the output as eager does."""
    _cuda_observe_ready()
    gen = torch.Generator(device=DEV).manual_seed(3)
    channels = 1 if axis < 0 else shape[axis]
    args = (axis, "moving_average", 0.1, 0, 255, False, 1e-6)
    x = torch.randn(shape, device=DEV, generator=gen)
    state = _fresh_state(channels)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _observe_cuda(x, state, *args)  # warm-up (occupancy queries are cached here)
    torch.cuda.current_stream().wait_stream(side)
    eager_state = [t.clone() for t in state]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_mask = _observe_cuda(x, state, *args)
    for trial in range(3):
        with torch.no_grad():
            x.copy_(torch.randn(shape, device=DEV, generator=gen) * (trial + 2))
        graph.replay()
        want_out, want_mask = _observe_cuda(x, eager_state, *args)
        torch.cuda.synchronize()
        assert torch.equal(static_out, want_out) and torch.equal(static_mask, want_mask), trial
        for a, b in zip(state, eager_state):
            assert torch.equal(a, b), trial


def test_observe_forward_on_a_non_current_device():
    """x on cuda:1 while cuda:0 is current: the op runs on x's device (CUDAGuard; the SM count
    and occupancy are those of x's device) and matches the same call made current there."""
    _cuda_observe_ready()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    d1 = torch.device("cuda", 1)
    for shape, axis in (((4099,), -1), ((1 << 22,), -1), ((64, 64, 32, 32), 1)):
        x = torch.randn(shape, device=d1)
        channels = 1 if axis < 0 else shape[axis]
        s_a = [t.to(d1) for t in _fresh_state(channels)]
        s_b = [t.clone() for t in s_a]
        with torch.cuda.device(0):
            out_a, mask_a = _observe_cuda(x, s_a, axis, "minmax", 0.1, -8, 7, True, 1e-6)
        with torch.cuda.device(1):
            out_b, mask_b = _observe_cuda(x, s_b, axis, "minmax", 0.1, -8, 7, True, 1e-6)
        torch.cuda.synchronize(d1)
        assert out_a.device == d1 and torch.equal(out_a, out_b) and torch.equal(mask_a, mask_b)
        for a, b in zip(s_a, s_b):
            assert torch.equal(a, b)


def test_observe_auto_backend_is_the_single_launch_op():
    """On CUDA "auto" gives fq_observe_forward to the extension; "triton" stays selectable and
    agrees with it."""
    _cuda_observe_ready()
    from acq_kernels.fake_quant import ops as fq_ops
    x = torch.randn(8, 16, 5, 5, device=DEV)
    with use("auto"):
        assert fq_ops._observe_impl(x) is torch.ops.acq_kernels_C.fq_observe_forward
        # the module's eager hot path (C++ autograd op) then redispatches to the CUDA kernel
        assert fq_ops.observe_train_op(x) is not None
    if _backend.backend_usable("triton", DEV):
        s_c, s_t = _fresh_state(16), _fresh_state(16)
        with use("cuda"):
            oc, mc = fq_ops._observe_impl(x)(x, *s_c, 1, 0.1, True, 0, 255, False, 128, 1e-6, True, True)
        with use("triton"):
            ot, mt = fq_ops._observe_impl(x)(x, *s_t, 1, 0.1, True, 0, 255, False, 128, 1e-6, True, True)
        assert torch.equal(oc, ot) and torch.equal(mc, mt)
        for a, b in zip(s_c, s_t):
            assert torch.equal(a, b)
