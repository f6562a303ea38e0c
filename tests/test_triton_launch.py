"""Triton launchers, checked on CPU without running kernels where that is what matters: every
launch grid stays inside CUDA's limits for huge shapes (recorded on meta tensors), every launch
sets FP fusion explicitly, every launcher runs under a device guard, "auto" sends tensors beyond
the Triton kernels' 32-bit offsets to the next backend; and the Triton qparams follow torch.ao's
formula as torch computes it on each device."""
import inspect

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import acq_kernels as ak  # noqa: E402
from acq_kernels import _backend  # noqa: E402
from acq_kernels._launch_guard import triton_launcher  # noqa: E402
from acq_kernels.attention import triton_kernels as AK, triton_launch as AL  # noqa: E402
from acq_kernels.bn_stats import ops as bn_ops, triton_kernels as BK  # noqa: E402
from acq_kernels.fake_quant import triton_kernels as FK, triton_launch as FL  # noqa: E402

KERNEL_MODULES = (FK, AK, BK)
LAUNCHER_MODULES = (FL, AL, bn_ops)
GRID_MAX = (2 ** 31 - 1, 65535, 65535)


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            self.log.append((self.name, tuple(int(v) for v in g), kwargs))
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel of every family replaced by a recorder; yields the launch log."""
    log = []
    for mod in KERNEL_MODULES:
        for name, obj in vars(mod).items():
            # JITFunction, or the interpreter's InterpretedFunction (not a KernelInterface
            # in every Triton version)
            if isinstance(obj, triton.runtime.jit.KernelInterface) or \
                    type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                monkeypatch.setattr(mod, name, _Recorder(name, log))
    return log


def _check_grids(log):
    assert log, "nothing was launched"
    for name, grid, kwargs in log:
        assert 1 <= len(grid) <= 3, (name, grid)
        for axis, (v, vmax) in enumerate(zip(grid, GRID_MAX)):
            assert 1 <= v <= vmax, f"{name}: grid axis {axis} = {v} > {vmax} (grid {grid})"
        assert "enable_fp_fusion" in kwargs, f"{name} launched without explicit enable_fp_fusion"


def _meta(shape, dtype=torch.bfloat16, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@pytest.mark.parametrize("shape,axis,channels_last", [
    ((1, 3, 8192, 8192), 0, False),   # a size-1 channel axis: one channel of 201 M elements
    ((1, 3, 8192, 8192), 1, False),   # three channel runs of 67 M elements
    ((4, 64, 2048, 2048), 1, True),   # channels_last, per channel (channel innermost)
    ((2 ** 31 - 2 ** 17,), -1, False),  # per tensor, just under the size limit
])
def test_fake_quant_grids_within_cuda_limits(launches, shape, axis, channels_last):
    x = _meta(shape, channels_last=channels_last)
    c = 1 if axis < 0 else x.size(axis)
    scale = torch.ones(c, device="meta")
    zp = torch.zeros(c, dtype=torch.int32, device="meta")
    FL.fq_forward(x, scale, zp, -8, 7, axis, True)
    FL.fq_mask_backward(x, torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device="meta"))
    FL.fq_learnable_backward(x, x, scale, zp.float(), -8, 7, axis, 1.0)
    FL.fq_minmax_forward(x, axis, -8, 7, False, 1e-7, True)
    bufs = [torch.empty(1, device="meta") for _ in range(3)] + [zp[:1]]
    FL.fq_moving_average_forward(x, *bufs, 0.01, 0, 255, False, 1e-7, True, True)
    _check_grids(launches)
    names = {n for n, _, _ in launches}
    assert {"fq_mask_backward_kernel", "minmax_partials_kernel", "minmax_qparams_kernel"} <= names
    assert any(n.startswith("fq_lsq_backward") for n in names)
    if channels_last:  # the channel-innermost paths
        assert {"fq_forward_period_kernel", "fq_lsq_backward_cinner_kernel",
                "minmax_cinner_partials_kernel", "minmax_part_qparams_kernel"} <= names


@pytest.mark.parametrize("shape,channels_last", [((4096, 64, 112, 112), False),
                                                 ((4096, 64, 112, 112), True),
                                                 ((70000, 512, 7, 7), False)])
def test_attention_grids_within_cuda_limits(launches, shape, channels_last):
    x = _meta(shape, channels_last=channels_last)
    n, c, h, w = shape
    amap, anorm, center, a32, stats = AL.map_forward(x, 2.0)
    AL.map_grad(a32, stats, h, w, amap, anorm, center)
    AL.feat_backward(x, a32, 2.0, torch.empty_like(x))
    flat = torch.empty(2 * n, h * w, device="meta")
    AL.pair_sq_dist(flat, None)
    AL.pair_sq_dist_backward(flat, None, torch.empty(n, device="meta"), False)
    _check_grids(launches)


def test_bn_stats_grids_within_cuda_limits(launches):
    xs = [_meta((32, 64, 112, 112), torch.float32),
          _meta((256, 512, 28, 28), torch.float32, channels_last=True)]
    bn_ops._triton_forward(xs)
    bn_ops._triton_grad(xs, torch.empty(3, 64 + 512, device="meta"))
    _check_grids(launches)


def test_every_aot_spec_sets_fp_fusion():
    from acq_kernels._aot import all_specs
    missing = [s.name for s in all_specs() if "enable_fp_fusion" not in s.options]
    assert not missing, f"AOT specs without explicit enable_fp_fusion: {missing}"


# --- device guard ---------------------------------------------------------------------------

class _OnCuda1(torch.Tensor):
    """A meta tensor that reports cuda:1 (no GPU needed)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launcher_guard_makes_the_tensors_device_current(monkeypatch):
    entered = []

    class FakeDeviceCtx:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceCtx)
    seen = []

    @triton_launcher
    def launch(xs, k=1):
        seen.append(list(entered))
        return k

    x = torch.empty(2, device="meta").as_subclass(_OnCuda1)
    assert launch([x], k=3) == 3
    assert seen == [[torch.device("cuda", 1)]] and entered[-1] == "exit"
    entered.clear()
    launch([torch.empty(2)])  # CPU tensors (the interpreter): no CUDA device touched
    assert entered == []


def test_every_triton_launcher_is_device_guarded():
    """Any function of a launcher module that launches a kernel (`..._kernel[grid](...)`)
    carries the guard; helpers it calls run inside a guarded caller."""
    unguarded = []
    for mod in LAUNCHER_MODULES:
        for name, fn in vars(mod).items():
            if not inspect.isfunction(fn) or fn.__module__ != mod.__name__:
                continue
            src = inspect.getsource(inspect.unwrap(fn))
            if "_kernel[" not in src or getattr(fn, "device_guarded", False):
                continue
            callers = [n for n, f in vars(mod).items() if inspect.isfunction(f)
                       and getattr(f, "device_guarded", False)
                       and f"{name}(" in inspect.getsource(inspect.unwrap(f))]
            if not name.startswith("_") or not callers:
                unguarded.append(f"{mod.__name__}.{name}")
    assert not unguarded, f"Triton launches without a device guard: {unguarded}"


# --- huge tensors in "auto" mode --------------------------------------------------------------

def test_auto_sends_tensors_beyond_int32_offsets_to_the_cuda_extension(monkeypatch):
    monkeypatch.setattr(_backend, "backend_usable", lambda name, dev: name != "cpu")
    cuda = torch.device("cuda")
    assert _backend.select(cuda, numel=2 ** 20) == "triton"
    assert _backend.select(cuda, numel=2 ** 31 + 5) == "cuda"
    assert _backend.select(cuda, ("reference", "triton"), numel=2 ** 31) == "reference"
    assert _backend.TRITON_MAX_NUMEL <= FL.MAX_NUMEL  # what "auto" sends is within the check
    with ak.set_backend("triton"):  # an explicit choice is kept; the launcher refuses clearly
        assert _backend.select(cuda, numel=2 ** 31 + 5) == "triton"
    with pytest.raises(ValueError, match="triton backend"):
        FL._check_size(2 ** 31 + 5)


def test_fake_quant_dispatch_passes_the_tensor_size(monkeypatch):
    sizes = []
    real = _backend.select

    def spy(device, supported=_backend.BACKENDS, op="op", numel=0):
        sizes.append(numel)
        return real(device, supported, op, numel)

    monkeypatch.setattr(_backend, "select", spy)
    ak.fake_quantize(torch.randn(3, 5), torch.ones(1), torch.zeros(1, dtype=torch.int32), -8, 7)
    assert sizes and all(n == 15 for n in sizes)


# --- qparams: torch.ao's formula per device -----------------------------------------------------

def qparams_as_cuda(mn, mx, qmin, qmax, symmetric, eps):
    """torch.ao _calculate_qparams as torch computes it on CUDA: `t / python_float` there is
    `t * fp32(1 / fp32(python_float))` (div_true_kernel_cuda's CPU-scalar path); the
    tensor-by-tensor min_neg / scale stays a true division. On CPU torch divides, which is what
    reference.calculate_qparams computes there."""
    f32 = np.float32
    min_neg = torch.minimum(mn, torch.zeros_like(mn))
    max_pos = torch.maximum(mx, torch.zeros_like(mx))
    eps_t = torch.tensor(eps, dtype=torch.float32)
    if symmetric:
        max_pos = torch.maximum(-min_neg, max_pos)
        inv = float(f32(1.0) / f32(float(qmax - qmin) / 2))
        scale = torch.maximum(max_pos * inv, eps_t)
        zp = torch.full_like(mn, (qmin + qmax) // 2 if qmin >= 0 else 0, dtype=torch.int32)
    else:
        inv = float(f32(1.0) / f32(float(qmax - qmin)))
        scale = torch.maximum((max_pos - min_neg) * inv, eps_t)
        zp = torch.clamp(qmin - torch.round(min_neg / scale).to(torch.int32), qmin, qmax)
    return scale, zp.to(torch.int32)


def test_cuda_formula_emulation_differs_from_true_division():
    """The emulation has teeth: the reciprocal product and the division disagree on a large
    share of random ranges (so a test comparing the wrong formula fails)."""
    from acq_kernels.fake_quant import reference
    mn, mx = -torch.rand(4096) * 3, torch.rand(4096) * 5
    s_cuda, _ = qparams_as_cuda(mn, mx, 0, 255, False, 1e-7)
    s_cpu, _ = reference.calculate_qparams(mn, mx, 0, 255, False, 1e-7)
    assert (s_cuda != s_cpu).float().mean() > 0.2
    assert torch.allclose(s_cuda, s_cpu, rtol=2e-7, atol=0)  # one ulp apart at most


@pytest.mark.skipif("triton" not in _backend.usable_backends(torch.device("cpu")),
                    reason="Triton is not usable on CPU here")
@pytest.mark.parametrize("symmetric,qrange", [(False, (0, 255)), (False, (-8, 7)),
                                              (True, (-128, 127)), (True, (0, 15))])
def test_triton_qparams_with_cuda_formula_match_emulation(monkeypatch, symmetric, qrange):
    """The Triton kernels as launched for CUDA tensors (RECIP=True), run by the interpreter,
    give exactly the emulated CUDA formula: per tensor, per channel, moving average."""
    monkeypatch.setattr(FL, "_recip", lambda device: True)
    qmin, qmax = qrange
    x = torch.randn(48, 37) * torch.rand(48, 1) * 4 + torch.randn(48, 1)
    with ak.set_backend("triton"):
        for axis in (0, None):
            out, scale, zp = ak.fake_quantize_minmax(x, qmin, qmax, axis=axis,
                                                     symmetric=symmetric)
            if axis is None:
                mn, mx = torch.aminmax(x)
                mn, mx = mn.reshape(1), mx.reshape(1)
            else:
                mn, mx = torch.aminmax(x, dim=1)
            want_s, want_z = qparams_as_cuda(mn, mx, qmin, qmax, symmetric, 1e-7)
            assert torch.equal(scale, want_s) and torch.equal(zp, want_z), axis
            want = (torch.fake_quantize_per_tensor_affine(x, want_s, want_z, qmin, qmax)
                    if axis is None else
                    torch.fake_quantize_per_channel_affine(x, want_s, want_z, 0, qmin, qmax))
            assert torch.equal(out, want)
        mn, mx = torch.tensor(float("inf")), torch.tensor(float("-inf"))
        scale, zp = torch.ones(1), torch.zeros(1, dtype=torch.int32)
        ema_min, ema_max = None, None
        for step in range(3):
            xs = x * (step + 1) + step
            ak.fake_quantize_moving_average(xs, mn, mx, scale, zp, qmin, qmax,
                                            averaging_constant=0.1, symmetric=symmetric)
            bmin, bmax = torch.aminmax(xs)
            ema_min = bmin if ema_min is None else ema_min + 0.1 * (bmin - ema_min)
            ema_max = bmax if ema_max is None else ema_max + 0.1 * (bmax - ema_max)
            assert torch.equal(mn, ema_min) and torch.equal(mx, ema_max)
            want_s, want_z = qparams_as_cuda(ema_min.reshape(1), ema_max.reshape(1), qmin, qmax,
                                             symmetric, 1e-7)
            assert torch.equal(scale, want_s) and torch.equal(zp, want_z), step


@pytest.mark.cuda
def test_cuda_formula_emulation_matches_torch_on_cuda():
    """The emulation is what torch.ao computes on a GPU (the oracle of the CUDA tests)."""
    from acq_kernels.fake_quant import reference
    mn, mx = -torch.rand(4096) * 3, torch.rand(4096) * 5
    for symmetric, (qmin, qmax) in ((False, (0, 255)), (True, (-128, 127))):
        got = reference.calculate_qparams(mn.cuda(), mx.cuda(), qmin, qmax, symmetric, 1e-7)
        want = qparams_as_cuda(mn, mx, qmin, qmax, symmetric, 1e-7)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b)


@pytest.mark.skipif("triton" not in _backend.usable_backends(torch.device("cpu")),
                    reason="Triton is not usable on CPU here")
def test_channel_innermost_and_period_paths_match_reference(monkeypatch):
    """channels_last / [N, C] per-channel paths (coalesced partials over several channel blocks
    and grid-stride row steps, [rows, period] fake-quant tiles) against the reference."""
    monkeypatch.setattr(FK, "CI_BLOCK_R", 8)
    monkeypatch.setattr(FK, "MAX_PARTIALS", 4)
    monkeypatch.setattr(FK, "PERIOD_BLOCK_W", 32)
    xs = [(torch.randn(3, 72, 5, 7) * 2 + 0.2).contiguous(memory_format=torch.channels_last),
          torch.randn(45, 72) * 3]
    results = {}
    for b in ("reference", "triton"):
        r = []
        with ak.set_backend(b):
            for x in xs:
                c = x.size(1)
                g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
                xx = x.clone().requires_grad_()
                out, s, z = ak.fake_quantize_minmax(xx, -8, 7, axis=1)
                out.backward(g)
                r += [out, s, z, xx.grad]
                scale = torch.rand(c, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.05
                zp = torch.randn(c, generator=torch.Generator().manual_seed(3)) * 2
                xx, ss, zz = (t.clone().requires_grad_() for t in (x, scale, zp))
                y = ak.fake_quantize_learnable(xx, ss, zz, -8, 7, axis=1)
                y.backward(g)
                r += [y, xx.grad, ss.grad, zz.grad]
        results[b] = r
    for i, (a, b) in enumerate(zip(results["reference"], results["triton"])):
        if i % 8 in (6, 7):  # LSQ scale / zero-point grads: sums in another order
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b), i


@pytest.mark.skipif("triton" not in _backend.usable_backends(torch.device("cpu")),
                    reason="Triton is not usable on CPU here")
@pytest.mark.parametrize("red_block", [64, 2048], ids=["tiny_tiles", "default"])
def test_per_channel_plane_paths_match_reference(monkeypatch, red_block):
    """Per-channel min/max and LSQ backward over [outer, C, run] planes (NCHW axis 1 with odd
    runs: 7x7, 5x5, 3x3, 14x14; a middle axis of a 3-D tensor; axis 0 with an odd row, which
    is not fused with a mask): [rows, run] tiles of each channel, split over rows and column
    blocks, or rows of G channels where G divides C (8 x 7x7, 12 x 5x5, 4 x 3x3, 6 x 3x6),
    against the reference. Tiny tiles force the multi-program and masked-tail paths."""
    monkeypatch.setattr(FK, "RED_BLOCK", red_block)
    monkeypatch.setattr(FK, "MAX_PARTIALS", 64)
    from acq_kernels.fake_quant import reference
    monkeypatch.setattr(reference, "lsq_uses_fma", lambda device: False)  # like forms
    cases = [(torch.randn(3, 5, 7, 7) * 2, 1), (torch.randn(3, 5, 5, 5), 1),
             (torch.randn(2, 3, 3, 3), 1), (torch.randn(2, 4, 14, 14) * 3, 1),
             (torch.randn(5, 3, 11), 1), (torch.randn(3, 203) * 2, 0),
             (torch.randn(2, 6, 10, 13)[:, 1:6], 1),
             # channel-group rows (G = 4 channels of an odd run; 2 of a run of 2 mod 4)
             (torch.randn(3, 8, 7, 7) * 2, 1), (torch.randn(2, 12, 5, 5), 1),
             (torch.randn(37, 4, 3, 3), 1), (torch.randn(2, 6, 3, 6), 1)]
    results = {}
    for b in ("reference", "triton"):
        r = []
        with ak.set_backend(b):
            for x, axis in cases:
                c = x.size(axis)
                g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
                xx = x.clone().requires_grad_()
                out, s, z = ak.fake_quantize_minmax(xx, -8, 7, axis=axis)
                out.backward(g)
                r += [out, s, z, xx.grad]
                scale = torch.rand(c, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.05
                zp = torch.randn(c, generator=torch.Generator().manual_seed(3)) * 2
                xx, ss, zz = (t.clone().requires_grad_() for t in (x, scale, zp))
                y = ak.fake_quantize_learnable(xx, ss, zz, -8, 7, axis=axis)
                y.backward(g)
                r += [y, xx.grad, ss.grad, zz.grad]
        results[b] = r
    for i, (a, b) in enumerate(zip(results["reference"], results["triton"])):
        if i % 8 in (6, 7):  # LSQ scale / zero-point grads: sums in another order
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b), i


@pytest.mark.skipif("triton" not in _backend.usable_backends(torch.device("cpu")),
                    reason="Triton is not usable on CPU here")
@pytest.mark.parametrize("channels", [6, 20, 24, 72, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_innermost_row_lengths_in_vector_units_match_reference(channels, dtype):
    """The channel-innermost and period kernels take C (W) in units of VEC (the widest
    vector dividing it: 2, 4, 8 or 1 for 13 channels): channels_last and [N, C] per-channel
    min/max, fake quant and LSQ backward against the reference."""
    from acq_kernels.fake_quant import reference
    xs = [(torch.randn(3, channels, 5, 7) * 2).to(dtype).contiguous(
              memory_format=torch.channels_last),
          (torch.randn(37, channels) * 3).to(dtype)]
    results = {}
    for b in ("reference", "triton"):
        r = []
        with ak.set_backend(b):
            for x in xs:
                out, s, z = ak.fake_quantize_minmax(x, -8, 7, axis=1)
                r += [out, s, z]
                if dtype == torch.float32:
                    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
                    sc = torch.rand(channels, generator=torch.Generator().manual_seed(2)) + 0.05
                    zp = torch.randn(channels, generator=torch.Generator().manual_seed(3)) * 2
                    xx, ss, zz = (t.clone().requires_grad_() for t in (x, sc, zp))
                    with pytest.MonkeyPatch.context() as mp:
                        mp.setattr(reference, "lsq_uses_fma", lambda device: False)
                        y = ak.fake_quantize_learnable(xx, ss, zz, -8, 7, axis=1)
                        y.backward(g)
                    r += [y, xx.grad, ss.grad, zz.grad]
        results[b] = r
    for i, (a, b) in enumerate(zip(results["reference"], results["triton"])):
        if a.dim() == 1 and a.dtype == torch.float32 and i % 7 in (5, 6):  # LSQ sums
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b), i
