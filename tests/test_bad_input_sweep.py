"""Property-based sweep over the whole public API (issue #7, item 5).

Two properties, on every backend usable on CPU here (Triton through the interpreter that
conftest.py enables, the C++ extension where it provides the op):

1. Invalid arguments - wrong Python types, integer/bool/complex tensors, wrong ranks and
   shapes, mismatched lengths, out-of-range axes and integer ranges, non-positive/NaN/Inf
   scales, bad strings, tensors on another ("meta") device - raise ValueError or TypeError whose
   message names the offending argument, and nothing reaches the dispatch seam
   (`_backend.select`), i.e. no kernel is launched and no buffer is touched.
2. Valid arguments drawn at random (shapes, dtypes, layouts, ranges) give the reference
   backend's result on every other backend, forward and backward (catches silent wrong answers).

Tensors are tiny (the Triton interpreter is slow); examples are few but fresh every run
(hypothesis draws, seeded per test by conftest for the torch parts it does not draw).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import acq_kernels as ak
from acq_kernels import _backend

# NaN/Inf inputs are part of the valid sweep; numpy under the Triton interpreter warns on them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

CPU = torch.device("cpu")
BACKENDS = _backend.usable_backends(CPU)
OTHER_BACKENDS = [b for b in BACKENDS if b != "reference"]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

SWEEP = settings(max_examples=80, deadline=None, derandomize=False,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow, HealthCheck.data_too_large])
VALID = settings(SWEEP, max_examples=40)


# ============================================================================ helpers
class Launched(BaseException):
    """Raised by the patched dispatch seam; a BaseException so no `except Exception` hides it."""


@contextmanager
def no_launch():
    """Any backend selection inside the block means validation let bad input through."""
    def launched(device, supported=(), op="op"):
        raise Launched(f"{op} reached the dispatch seam (a kernel would have launched)")
    with mock.patch.object(_backend, "select", launched):
        yield


def expect_rejected(fn, arg: str, what: str):
    """fn() raises ValueError/TypeError naming `arg`, launches nothing, raises nothing else."""
    with no_launch():
        try:
            fn()
        except (ValueError, TypeError) as e:
            msg = str(e)
            assert re.search(rf"\b{re.escape(arg)}\b", msg), \
                f"{what}: message does not name {arg!r}: {msg!r}"
            return msg
        except Launched as e:
            pytest.fail(f"{what}: accepted, {e}")
        except Exception as e:  # noqa: BLE001 - any other type is the failure being tested
            pytest.fail(f"{what}: raised {type(e).__name__} instead of ValueError/TypeError: {e}")
    pytest.fail(f"{what}: no exception for invalid {arg}")


META = torch.device("meta")


def bad_tensor_types(shape=(4, 6)):
    """Non-floating tensors and non-tensors standing where a floating tensor goes."""
    return [
        ("list", lambda: [[1.0] * shape[-1]] * shape[0]),
        ("None", lambda: None),
        ("str", lambda: "x"),
        ("int", lambda: 3),
        ("float", lambda: 1.5),
        ("int64 tensor", lambda: torch.ones(shape, dtype=torch.int64)),
        ("int32 tensor", lambda: torch.ones(shape, dtype=torch.int32)),
        ("bool tensor", lambda: torch.ones(shape, dtype=torch.bool)),
        ("complex tensor", lambda: torch.ones(shape, dtype=torch.complex64)),
        ("uint8 tensor", lambda: torch.ones(shape, dtype=torch.uint8)),
    ]


def rand(shape, dtype=torch.float32, layout="contiguous", scale=1.0, offset=0.0):
    """A fresh random tensor of `shape` with the given memory layout."""
    if layout == "channels_last" and len(shape) == 4:
        return (torch.randn(shape) * scale + offset).to(dtype).contiguous(
            memory_format=torch.channels_last)
    if layout == "strided" and len(shape) >= 1:  # every other element: non-contiguous
        wide = list(shape)
        wide[-1] *= 2
        return (torch.randn(wide) * scale + offset).to(dtype)[..., ::2]
    if layout == "expanded" and len(shape) >= 1:  # stride 0 along dim 0 (broadcast view)
        return (torch.randn((1,) + tuple(shape[1:])) * scale + offset).to(dtype).expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        t = (torch.randn(*shape[:-2], shape[-1], shape[-2]) * scale + offset).to(dtype)
        return t.transpose(-1, -2)
    return (torch.randn(shape) * scale + offset).to(dtype)


def leaf_view(x):
    """(leaf requiring grad, view of it with x's exact strides): `clone()` would make strided
    and expanded views contiguous, hiding the layouts under test from the kernels."""
    base = x if x._base is None else x._base
    leaf = base.detach().clone().requires_grad_()
    if x._base is None and leaf.stride() == x.stride():
        return leaf, leaf
    return leaf, leaf.as_strided(x.shape, x.stride(), x.storage_offset())


def layouts(ndim):
    return st.sampled_from(["contiguous"] + (["strided", "expanded"] if ndim >= 1 else [])
                           + (["transposed"] if ndim >= 2 else [])
                           + (["channels_last"] if ndim == 4 else []))


def shapes(min_dims=1, max_dims=4, max_side=5, empty=False):
    """Small shapes with odd sides; `empty` lets a side be 0 now and then."""
    side = st.integers(1, max_side)
    if empty:
        side = st.one_of(side, side, side, st.just(0))
    return st.lists(side, min_size=min_dims, max_size=max_dims).map(tuple)


def dtypes_for(backend):
    return FLOATS + ((torch.float64,) if backend in ("reference", "cpu") else ())


@contextmanager
def on_backend(backend):
    """set_backend(backend); an extension that lacks this op (still being built) skips it."""
    with ak.set_backend(backend):
        try:
            yield
        except RuntimeError as e:
            if "does not implement this op" in str(e):
                pytest.skip(f"{backend} backend lacks this op: {e}")
            raise


TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (1.6e-2, 1e-2), torch.float64: (1e-10, 1e-10)}


def close(got, want, dtype, what, scale=None):
    """Equal up to rounding of the output dtype from fp32 math with another summation order."""
    atol, rtol = TOL.get(dtype, TOL[torch.float32])
    if scale is None:
        finite = want.detach().double().abs().nan_to_num(0.0, 0.0, 0.0)
        scale = max(float(finite.max()), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().double(), want.detach().double(), atol=atol * scale,
                               rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


# ============================================================================ fake quant: bad input
X = torch.randn(4, 6)
RANGE = (-8, 7)


def fq_args(**kw):
    args = dict(x=X, scale=0.1, zero_point=0, quant_min=RANGE[0], quant_max=RANGE[1], axis=None,
                ste="clipped")
    args.update(kw)
    return args


def per_channel(**kw):
    args = dict(scale=torch.full((6,), 0.1), zero_point=torch.zeros(6, dtype=torch.int32), axis=1)
    args.update(kw)
    return fq_args(**args)


def qrange_mutations():
    """(argument named, kwargs) for bad quant_min/quant_max pairs."""
    return [
        ("quant_min", dict(quant_min=7, quant_max=-8)),
        ("quant_min", dict(quant_min=3, quant_max=3)),
        ("quant_min", dict(quant_min=1.5)),
        ("quant_min", dict(quant_min=None)),
        ("quant_min", dict(quant_min="0")),
        ("quant_min", dict(quant_min=True)),
        ("quant_min", dict(quant_min=torch.tensor(0))),
        ("quant_max", dict(quant_max=7.0)),
        ("quant_max", dict(quant_max=None)),
        ("quant_max", dict(quant_max=False)),
        ("quant_min", dict(quant_min=-40000, quant_max=0)),
        ("quant_max", dict(quant_min=0, quant_max=70000)),
        ("quant_max", dict(quant_min=-1, quant_max=40000)),
    ]


def axis_mutations(ndim=2):
    return [("axis", dict(axis=ndim)), ("axis", dict(axis=-ndim - 1)), ("axis", dict(axis=1.0)),
            ("axis", dict(axis="1")), ("axis", dict(axis=[1])), ("axis", dict(axis=True))]


def scale_value_mutations():
    return [("scale", dict(scale=v)) for v in
            (0, 0.0, -0.1, float("nan"), float("inf"), -float("inf"), "0.1", None, [0.1], True,
             1 + 2j, torch.tensor([0.0]), torch.tensor(-1.0), torch.tensor([float("nan")]),
             torch.tensor([float("inf")]), torch.tensor([1], dtype=torch.int32),
             torch.tensor([True]), torch.tensor([1 + 0j]), torch.ones(2), torch.ones(1, 1),
             torch.tensor([0.1], device=META))]


FAKE_QUANTIZE_BAD = (
    [("x", fq_args(x=f())) for _, f in bad_tensor_types()]
    + [(n, fq_args(**kw)) for n, kw in qrange_mutations()]
    + [(n, fq_args(**kw)) for n, kw in axis_mutations()]
    + [(n, fq_args(**kw)) for n, kw in scale_value_mutations()]
    + [("zero_point", fq_args(zero_point=v)) for v in
       (8, -9, 1.5, None, "0", True, torch.tensor([8]), torch.tensor([-9.0]),
        torch.tensor([float("nan")]), torch.tensor([True]), torch.tensor([0j]),
        torch.zeros(2, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32, device=META))]
    + [("ste", fq_args(ste=v)) for v in ("straight", "", None, 1, "CLIPPED")]
    # per channel: one qparam per x.size(axis), tensors only, values checked per channel
    + [("scale", per_channel(scale=0.1))]
    + [("zero_point", fq_args(scale=torch.full((6,), 0.1), axis=1, zero_point=0))]
    + [("scale", per_channel(scale=torch.full((4,), 0.1)))]
    + [("scale", per_channel(scale=torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, float("inf")])))]
    + [("scale", per_channel(scale=torch.tensor([0.1, 0.1, 0.1, -0.1, 0.1, 0.1])))]
    + [("zero_point", per_channel(zero_point=torch.tensor([0, 0, 0, 0, 0, 99])))]
    + [("zero_point", per_channel(zero_point=torch.zeros(5, dtype=torch.int32)))]
    + [("scale", per_channel(scale=torch.full((6,), 0.1, device=META)))]
)


@SWEEP
@given(case=st.sampled_from(FAKE_QUANTIZE_BAD))
def test_fake_quantize_rejects(case):
    arg, kw = case
    expect_rejected(lambda: ak.fake_quantize(**kw), arg, f"fake_quantize({arg}=...)")


def lsq_args(**kw):
    args = dict(x=X, scale=torch.tensor([0.1]), zero_point=torch.tensor([0.0]),
                quant_min=RANGE[0], quant_max=RANGE[1], axis=None, grad_factor=1.0)
    args.update(kw)
    return args


LEARNABLE_BAD = (
    [("x", lsq_args(x=f())) for _, f in bad_tensor_types()]
    + [(n, lsq_args(**kw)) for n, kw in qrange_mutations()]
    + [(n, lsq_args(**kw)) for n, kw in axis_mutations()]
    # learnable qparams are floating tensors (torch's learnable ops require that too)
    + [("scale", lsq_args(scale=v)) for v in
       (0.1, None, torch.tensor([1]), torch.tensor([0.0]), torch.tensor([-1.0]),
        torch.tensor([float("nan")]), torch.tensor([float("inf")]), torch.ones(2),
        torch.ones(1, 1), torch.tensor([0.1], device=META))]
    + [("zero_point", lsq_args(zero_point=v)) for v in
       (0, 0.0, None, torch.tensor([0]), torch.tensor([True]), torch.zeros(2),
        torch.zeros(1, 1), torch.zeros(1, device=META))]
    + [("scale", lsq_args(axis=1, scale=torch.full((4,), 0.1), zero_point=torch.zeros(6)))]
    + [("zero_point", lsq_args(axis=1, scale=torch.full((6,), 0.1), zero_point=torch.zeros(4)))]
    + [("grad_factor", lsq_args(grad_factor=v)) for v in ("1", None, True, torch.tensor(1.0),
                                                          float("nan"), float("inf"))]
)


@SWEEP
@given(case=st.sampled_from(LEARNABLE_BAD))
def test_fake_quantize_learnable_rejects(case):
    arg, kw = case
    expect_rejected(lambda: ak.fake_quantize_learnable(**kw), arg,
                    f"fake_quantize_learnable({arg}=...)")


def minmax_args(**kw):
    args = dict(x=X, quant_min=RANGE[0], quant_max=RANGE[1], axis=None, symmetric=False,
                eps=1e-6, ste="clipped")
    args.update(kw)
    return args


MINMAX_BAD = (
    [("x", minmax_args(x=f())) for _, f in bad_tensor_types()]
    + [(n, minmax_args(**kw)) for n, kw in qrange_mutations()]
    + [(n, minmax_args(**kw)) for n, kw in axis_mutations()]
    + [("symmetric", minmax_args(symmetric=v)) for v in (1, 0, "yes", None, torch.tensor(True))]
    + [("eps", minmax_args(eps=v)) for v in (0, 0.0, -1e-6, float("nan"), float("inf"), "1e-6",
                                             None, True)]
    + [("ste", minmax_args(ste=v)) for v in ("none", None, 0)]
)


@SWEEP
@given(case=st.sampled_from(MINMAX_BAD))
def test_fake_quantize_minmax_rejects(case):
    arg, kw = case
    expect_rejected(lambda: ak.fake_quantize_minmax(**kw), arg, f"fake_quantize_minmax({arg}=...)")


def ma_buffers():
    return dict(min_val=torch.tensor([-1.0]), max_val=torch.tensor([1.0]),
                scale=torch.tensor([0.1]), zero_point=torch.tensor([0], dtype=torch.int32))


def bad_buffer_values(name):
    dtype = torch.int32 if name == "zero_point" else torch.float32
    other = torch.float32 if name == "zero_point" else torch.float64
    return [None, 0.5, [0.5], torch.zeros(1, dtype=other), torch.zeros(1, dtype=torch.bool),
            torch.zeros(2, dtype=dtype), torch.zeros(0, dtype=dtype),
            torch.zeros(1, 1, dtype=dtype), torch.zeros(1, dtype=dtype, device=META)]


MOVING_AVERAGE_BAD = (
    [("x", dict(x=f())) for _, f in bad_tensor_types()]
    + [(n, kw) for n, kw in qrange_mutations()]
    + [(name, {name: v}) for name in ("min_val", "max_val", "scale", "zero_point")
       for v in bad_buffer_values(name)]
    + [("averaging_constant", dict(averaging_constant=v))
       for v in (-0.1, 1.5, float("nan"), float("inf"), "0.1", None, True)]
    + [("symmetric", dict(symmetric=v)) for v in (1, "no", None)]
    + [("eps", dict(eps=v)) for v in (0.0, -1.0, float("nan"), "x")]
    + [("observe", dict(observe=v)) for v in (1, "yes", None)]
    + [("ste", dict(ste=v)) for v in ("clip", None)]
    # read-only use (observe=False) checks the stored qparams' values
    + [("scale", dict(observe=False, scale=torch.tensor([0.0])))]
    + [("scale", dict(observe=False, scale=torch.tensor([float("nan")])))]
    + [("zero_point", dict(observe=False, zero_point=torch.tensor([100], dtype=torch.int32)))]
)


@SWEEP
@given(case=st.sampled_from(MOVING_AVERAGE_BAD))
def test_fake_quantize_moving_average_rejects(case):
    arg, kw = case
    args = dict(x=X, **ma_buffers(), quant_min=RANGE[0], quant_max=RANGE[1],
                averaging_constant=0.01, symmetric=False, eps=1e-6, observe=True, ste="clipped")
    args.update(kw)
    before = {k: v.clone() for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.device.type == "cpu" and k != "x"}
    expect_rejected(lambda: ak.fake_quantize_moving_average(**args), arg,
                    f"fake_quantize_moving_average({arg}=...)")
    for k, v in before.items():  # a rejected call leaves the observer state alone
        torch.testing.assert_close(args[k], v, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{k} was modified by a rejected call")


# ============================================================================ modules: bad input
MODULE_BAD = [
    ("ste", lambda: ak.FakeQuant(ste="straight")),
    ("ste", lambda: ak.FakeQuant(ste=None)),
    ("range_mode", lambda: ak.FakeQuant(range_mode="ema")),
    ("range_mode", lambda: ak.FakeQuant(range_mode=1)),
    ("quant_min", lambda: ak.LearnableFakeQuant(quant_min=1.5)),
    ("quant_max", lambda: ak.LearnableFakeQuant(quant_max="255")),
    ("quant_min", lambda: ak.LearnableFakeQuant(quant_min=255, quant_max=0)),
    ("channel_len", lambda: ak.LearnableFakeQuant(channel_len=0)),
    ("channel_len", lambda: ak.LearnableFakeQuant(channel_len=2.5)),
    ("backend", lambda: ak.set_backend("gpu")),
    ("backend", lambda: ak.set_backend(None)),
    ("backend", lambda: ak.set_backend(1)),
]


@SWEEP
@given(case=st.sampled_from(MODULE_BAD))
def test_module_constructors_reject(case):
    arg, make = case
    before = _backend._global_choice
    expect_rejected(make, arg, f"constructor({arg}=...)")
    assert _backend._global_choice == before


# The modules' forward hands X to acq_kernels' ops (after torch's observer in some modes), so a
# non-floating X must be rejected naming x, by either torch's observer or our op.


@SWEEP
@given(kind=st.sampled_from(["observer", "minmax", "frozen", "minmax_observer", "learnable",
                             "learnable_static"]),
       bad=st.sampled_from(bad_tensor_types()[1:]))
def test_module_forward_rejects_non_float_input(kind, bad):
    if kind.startswith("learnable"):
        m = ak.LearnableFakeQuant()
        if kind == "learnable":
            m.toggle_observer_update(False)
        else:
            m.enable_static_estimate()  # torch's observer runs first on this path
    elif kind == "minmax_observer":  # not the fused moving average: torch's observer, then ours
        from torch.ao.quantization.observer import MinMaxObserver
        m = ak.FakeQuant(observer=MinMaxObserver)
    else:
        m = ak.FakeQuant(range_mode="minmax" if kind == "minmax" else "observer")
        if kind == "frozen":
            m.disable_observer()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    expect_rejected(lambda: m(bad[1]()), "x", f"{kind} module forward({bad[0]})")
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed on a rejected forward"


# ============================================================================ attention: bad input
FEAT = torch.randn(2, 3, 4, 5)
A = torch.randn(4, 6)
CENTER = torch.randn(3, 2)


def bad_rank_feats():
    return [torch.randn(3, 4, 5), torch.randn(2, 3, 4, 5, 1), torch.randn(6), torch.tensor(1.0),
            torch.randn(2, 0, 4, 5), torch.randn(2, 3, 0, 5), torch.randn(2, 3, 4, 0)]


SPATIAL_BAD = (
    [("feat", dict(feat=f())) for _, f in bad_tensor_types((2, 3, 4, 5))]
    + [("feat", dict(feat=f)) for f in bad_rank_feats()]
    + [("p", dict(p=v)) for v in (0, 0.0, -1, -2.5, float("nan"), float("inf"), "2", None, True,
                                  [2], 2 + 0j)]
)


@SWEEP
@given(case=st.sampled_from(SPATIAL_BAD))
def test_spatial_attention_rejects(case):
    arg, kw = case
    args = dict(feat=FEAT, p=2)
    args.update(kw)
    expect_rejected(lambda: ak.spatial_attention(**args), arg, f"spatial_attention({arg}=...)")


REDUCTION_BAD = [("reduction", dict(reduction=v))
                 for v in ("avg", "", None, 1, "MEAN", "batchmean")]


def pair_bad(a_name="a", b_name="b", with_b_none=True):
    cases = (
        [(a_name, {a_name: f()}) for _, f in bad_tensor_types()]
        + [(a_name, {a_name: torch.randn(6)}), (a_name, {a_name: torch.tensor(1.0)})]
        + [(b_name, {b_name: f()}) for _, f in bad_tensor_types() if f() is not None]
        + [(b_name, {b_name: torch.randn(4, 5)}), (b_name, {b_name: torch.randn(3, 6)}),
           (b_name, {b_name: torch.randn(4, 6, 1)}),
           (b_name, {b_name: torch.randn(4, 6, device=META)})]
        + REDUCTION_BAD)
    if with_b_none:  # stacked halves need an even batch
        cases.append((a_name, {a_name: torch.randn(5, 6), b_name: None}))
    return cases


PAIR_OPS = ["attention_sq_distance", "attention_pair_distance", "attention_pair_hinge"]
PAIR_BAD = pair_bad() + [("margin", dict(margin=v)) for v in
                         (float("nan"), float("inf"), "1", None, True, torch.tensor(1.0))]


@SWEEP
@given(op=st.sampled_from(PAIR_OPS), case=st.sampled_from(PAIR_BAD))
def test_pair_losses_reject(op, case):
    arg, kw = case
    if arg == "margin" and op != "attention_pair_hinge":
        op = "attention_pair_hinge"
    args = dict(a=A, b=torch.randn(4, 6))
    args.update(kw)
    fn = getattr(ak, op)
    expect_rejected(lambda: fn(**args), arg, f"{op}({arg}=...)")


CENTER_BAD = (
    [("center", dict(center=f())) for _, f in bad_tensor_types((3, 2))]
    + [("center", dict(center=torch.randn(3, 3), target=torch.randn(3, 3))),
       ("center", dict(center=torch.randn(6), target=torch.randn(6))),
       ("center", dict(center=torch.randn(3, 2, 1), target=torch.randn(3, 2, 1)))]
    + [("target", dict(target=f())) for _, f in bad_tensor_types((3, 2))]
    + [("target", dict(target=torch.randn(4, 2))), ("target", dict(target=torch.randn(3, 3))),
       ("target", dict(target=torch.randn(3, 2, device=META)))]
    + REDUCTION_BAD)


@SWEEP
@given(case=st.sampled_from(CENTER_BAD))
def test_attention_center_loss_rejects(case):
    arg, kw = case
    args = dict(center=CENTER, target=torch.randn(3, 2))
    args.update(kw)
    expect_rejected(lambda: ak.attention_center_loss(**args), arg,
                    f"attention_center_loss({arg}=...)")


# ============================================================================ bn_stats: bad input
XS = [torch.randn(4, 3, 2, 2), torch.randn(4, 5)]
CH = [3, 5]


def list_bad(name, good, per_layer=True):
    """Bad per-layer lists (tensors, or per-channel vectors that must match the layers)."""
    return [
        (name, torch.randn(4, 3)),               # a tensor, not a list
        (name, "x"), (name, 3),
        (name, []),
    ] + ([(name, [good[0]]),                     # one layer short
          (name, list(good) + [good[0]])]        # one layer long
         if per_layer else []) + [
        (name, [None, good[1]]), (name, [good[0], "x"]), (name, [good[0], 1.0]),
        (name, [good[0].to(torch.int64), good[1]]),
        (name, [good[0], good[1].to(torch.bool)]),
        (name, [good[0], good[1].to(torch.complex64)]),
        (name, [good[0], good[1].to(META)]),
    ]


def vec_bad(name):
    good = [torch.rand(3), torch.rand(5)]
    return list_bad(name, good) + ([] if name == "shifts" else [(name, None)]) + [
        (name, [torch.rand(4), good[1]]), (name, [good[0], torch.rand(5, 1)]),
        (name, [good[0], torch.tensor(1.0)])]


TENSORS_BAD = list_bad("tensors", XS, per_layer=False) + [
    ("tensors", None),
    ("tensors", [XS[0], torch.randn(5)]), ("tensors", [torch.tensor(1.0)]),
    ("tensors", [torch.randn(0, 3)]), ("tensors", [torch.randn(4, 0, 2)]),
    ("tensors", (torch.randn(2, 3) for _ in range(2)))]


BN_BAD = TENSORS_BAD + vec_bad("running_means") + vec_bad("running_vars") + vec_bad("shifts")


@SWEEP
@given(op=st.sampled_from(["bn_stats", "bns_loss", "bn_stats_flat"]),
       case=st.sampled_from(BN_BAD))
def test_bn_stats_rejects(op, case):
    arg, value = case
    if op == "bn_stats" and arg != "tensors":
        op = "bns_loss" if arg.startswith("running") else "bn_stats_flat"
    if op == "bn_stats_flat" and arg.startswith("running"):
        op = "bns_loss"
    if op == "bns_loss" and arg == "shifts":
        op = "bn_stats_flat"
    args = {"tensors": XS}
    if op == "bns_loss":
        args.update(running_means=[torch.zeros(3), torch.zeros(5)],
                    running_vars=[torch.ones(3), torch.ones(5)])
    if op == "bn_stats_flat":
        args["shifts"] = None
    if arg in args or arg == "shifts":
        args[arg] = value
    fn = getattr(ak, op)
    expect_rejected(lambda: fn(**args), arg, f"{op}({arg}=...)")


FLAT = torch.rand(3 * sum(CH)) + 1.0

FLAT_BAD = (
    [("flat", f()) for _, f in bad_tensor_types((3 * sum(CH),))]
    + [("flat", torch.rand(3 * sum(CH) - 1)), ("flat", torch.rand(3, sum(CH))),
       ("flat", torch.rand(0))]
    + [("channels", v) for v in ([], None, 8, "35", [3, 0], [3, -5], [3.0, 5], [3, "5"],
                                 [3, True, 4], torch.tensor(CH), [3, 6])]
)


FLAT_ALL_BAD = FLAT_BAD + vec_bad("running_means") + vec_bad("shifts")


@SWEEP
@given(op=st.sampled_from(["bn_stats_from_flat", "bns_loss_from_flat"]),
       case=st.sampled_from(FLAT_ALL_BAD))
def test_flat_buffers_reject(op, case):
    arg, value = case
    if arg.startswith("running"):
        op = "bns_loss_from_flat"
    args = dict(flat=FLAT, channels=CH, shifts=None)
    if op == "bns_loss_from_flat":
        args.update(running_means=[torch.zeros(3), torch.zeros(5)],
                    running_vars=[torch.ones(3), torch.ones(5)])
    args[arg] = value
    fn = getattr(ak, op)
    expect_rejected(lambda: fn(**args), arg, f"{op}({arg}=...)")


MERGE_BAD = (
    [("a", dict(a=f())) for _, f in bad_tensor_types((3 * sum(CH),))]
    + [("b", dict(b=f())) for _, f in bad_tensor_types((3 * sum(CH),))]
    + [("b", dict(b=torch.rand(3 * sum(CH) - 3))), ("b", dict(b=torch.rand(3, sum(CH)))),
       ("b", dict(b=torch.rand(3 * sum(CH), device=META))),
       ("b", dict(b=torch.rand(3 * sum(CH), dtype=torch.float64)))])


@SWEEP
@given(case=st.sampled_from(MERGE_BAD))
def test_merge_bn_stats_rejects(case):
    arg, kw = case
    args = dict(a=FLAT, b=FLAT.clone())
    args.update(kw)
    expect_rejected(lambda: ak.merge_bn_stats(**args), arg, f"merge_bn_stats({arg}=...)")


COLLECTOR_BAD = [None, "resnet", torch.randn(2), [torch.nn.BatchNorm2d(3)], 3]


@SWEEP
@given(model=st.sampled_from(COLLECTOR_BAD))
def test_bn_stat_collector_rejects(model):
    expect_rejected(lambda: ak.BNStatCollector(model), "model", "BNStatCollector(model=...)")


def test_bn_stat_collector_loss_without_forward():
    bns = ak.BNStatCollector(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    with bns:
        expect_rejected(bns.loss, "tensors", "BNStatCollector.loss() before a forward")


# ============================================================================ valid: fake quant
QRANGES = [(-2, 1), (0, 3), (-8, 7), (0, 15), (-128, 127), (0, 255)]


@st.composite
def fq_problem(draw, backend):
    dtype = draw(st.sampled_from(dtypes_for(backend)))
    shape = draw(shapes(0, 4, 6, empty=True))
    layout = draw(layouts(len(shape)))
    qmin, qmax = draw(st.sampled_from(QRANGES))
    axis = draw(st.sampled_from([None] + list(range(-len(shape), len(shape)))))
    return dtype, shape, layout, qmin, qmax, axis


def qparams(shape, axis, qmin, qmax, learnable=False):
    n = 1 if axis is None else shape[axis]
    scale = torch.rand(n) * 0.2 + 0.01
    zp = torch.randint(qmin, qmax + 1, (n,))
    zp = zp.float() + (torch.rand(n) - 0.5) * 0.8 if learnable else zp.to(torch.int32)
    if axis is None and not learnable and bool(torch.rand(()) < 0.5):
        return float(scale), int(zp)  # Python numbers take their own path
    return scale, zp


def run_fq(backend, fn, x, grad, **kw):
    leaf, xr = leaf_view(x)
    with on_backend(backend):
        out = fn(xr, **kw)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad)
    return out, leaf.grad


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@VALID
@given(data=st.data())
def test_fake_quantize_matches_reference(backend, data):
    dtype, shape, layout, qmin, qmax, axis = data.draw(fq_problem(backend))
    ste = data.draw(st.sampled_from(["clipped", "pure"]))
    x = rand(shape, dtype, layout, scale=data.draw(st.sampled_from([0.1, 1.0, 10.0])))
    if x.numel() and data.draw(st.booleans()):  # NaN propagates, +-Inf clamp (documented)
        flat = x.view(-1) if x.is_contiguous() else None
        if flat is not None:
            for v in (float("nan"), float("inf"), -float("inf")):
                flat[int(torch.randint(x.numel(), ()))] = v
    scale, zp = qparams(shape, axis, qmin, qmax)
    g = torch.randn(shape).to(dtype)
    kw = dict(scale=scale, zero_point=zp, quant_min=qmin, quant_max=qmax, axis=axis, ste=ste)
    got, gx = run_fq(backend, ak.fake_quantize, x, g, **kw)
    want, wx = run_fq("reference", ak.fake_quantize, x, g, **kw)
    # Same fp32 math everywhere, rounded once: bitwise (the family's contract), NaN where NaN.
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{backend} {dtype} {shape} {layout} {axis}: {m}")
    torch.testing.assert_close(gx, wx, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"grad {backend} {dtype} {shape} {axis} {ste}: {m}")
    assert torch.isnan(got).eq(torch.isnan(x)).all()


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@VALID
@given(data=st.data())
def test_fake_quantize_learnable_matches_reference(backend, data):
    dtype, shape, layout, qmin, qmax, axis = data.draw(fq_problem(backend))
    x = rand(shape, dtype, layout)
    scale, zp = qparams(shape, axis, qmin, qmax, learnable=True)
    grad_factor = data.draw(st.sampled_from([1.0, 0.5, 1e-2]))
    g = torch.randn(shape).to(dtype)
    res = {}
    for b in (backend, "reference"):
        s, z = scale.clone().requires_grad_(), zp.clone().requires_grad_()
        out, gx = run_fq(b, ak.fake_quantize_learnable, x, g, scale=s, zero_point=z,
                         quant_min=qmin, quant_max=qmax, axis=axis, grad_factor=grad_factor)
        res[b] = (out, gx, s.grad, z.grad)
    (out, gx, gs, gz), (wout, wx, ws, wz) = res[backend], res["reference"]
    assert torch.equal(out, wout) and torch.equal(gx, wx), (backend, dtype, shape, axis)
    # dscale/dzero_point are sums over x: another summation order, fp32 accumulation
    n = x.numel() if axis is None else x.numel() // max(shape[axis], 1)

    def mag(t):
        return max(1.0, float(t.abs().max()) if t.numel() else 0.0) * max(n, 1) * 0.1
    close(gs, ws, torch.float32, "dscale", scale=mag(ws))
    close(gz, wz, torch.float32, "dzero_point", scale=mag(wz))


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@VALID
@given(data=st.data())
def test_fake_quantize_minmax_matches_reference(backend, data):
    dtype, shape, layout, qmin, qmax, axis = data.draw(fq_problem(backend))
    symmetric = data.draw(st.booleans())
    x = rand(shape, dtype, layout, offset=data.draw(st.sampled_from([0.0, 0.5, -3.0])))
    g = torch.randn(shape).to(dtype)
    kw = dict(quant_min=qmin, quant_max=qmax, axis=axis, symmetric=symmetric)
    (out, s, z), gx = run_fq(backend, ak.fake_quantize_minmax, x, g, **kw)
    (wout, ws, wz), wx = run_fq("reference", ak.fake_quantize_minmax, x, g, **kw)
    assert torch.equal(s, ws) and torch.equal(z, wz), (backend, dtype, shape, axis, symmetric)
    assert torch.equal(out, wout) and torch.equal(gx, wx), (backend, dtype, shape, axis)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@VALID
@given(data=st.data())
def test_fake_quantize_moving_average_matches_reference(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)))
    shape = data.draw(shapes(1, 4, 6))
    layout = data.draw(layouts(len(shape)))
    qmin, qmax = data.draw(st.sampled_from(QRANGES))
    symmetric = data.draw(st.booleans())
    c = data.draw(st.sampled_from([0.01, 0.5, 1.0]))
    steps = [rand(shape, dtype, layout, offset=o) for o in (0.0, 1.0)]
    res = {}
    for b in (backend, "reference"):
        bufs = dict(min_val=torch.tensor([float("inf")]), max_val=torch.tensor([-float("inf")]),
                    scale=torch.tensor([1.0]), zero_point=torch.tensor([0], dtype=torch.int32))
        outs = []
        for i, x in enumerate(steps):
            out, _ = run_fq(b, ak.fake_quantize_moving_average, x, torch.ones(shape, dtype=dtype),
                            **bufs, quant_min=qmin, quant_max=qmax, averaging_constant=c,
                            symmetric=symmetric, observe=i == 0 or c != 1.0)
            outs.append(out)
        res[b] = outs, bufs
    (outs, bufs), (wouts, wbufs) = res[backend], res["reference"]
    for k in bufs:
        assert torch.equal(bufs[k], wbufs[k]), (k, backend, dtype, shape, c, symmetric)
    for o, w in zip(outs, wouts):
        assert torch.equal(o, w), (backend, dtype, shape, c, symmetric)


@VALID
@given(data=st.data())
def test_fake_quant_module_matches_reference(data):
    """The modules on the default (auto) backend equal themselves on the reference backend."""
    kind = data.draw(st.sampled_from(["observer", "minmax", "learnable"]))
    shape = data.draw(shapes(2, 4, 5))
    x = rand(shape, torch.float32, data.draw(layouts(len(shape))))
    per_channel = data.draw(st.booleans())
    kw = dict(qscheme=torch.per_channel_affine if per_channel else torch.per_tensor_affine)
    if per_channel:
        from torch.ao.quantization.observer import MovingAveragePerChannelMinMaxObserver
        kw.update(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=1)
    res = {}
    for b in ("auto", "reference"):
        torch.manual_seed(0)
        if kind == "learnable":
            m = ak.LearnableFakeQuant(quant_min=0, quant_max=15, **(
                dict(channel_len=shape[1], **kw) if per_channel else kw))
        else:
            m = ak.FakeQuant(quant_min=0, quant_max=15, range_mode=kind, **kw)
        with ak.set_backend(b):
            ys = [m(x), m(x * 2)]
        res[b] = ys, m.state_dict()
    (ys, st_), (wys, wst) = res["auto"], res["reference"]
    for y, w in zip(ys, wys):
        assert torch.equal(y, w), kind
    for k in st_:
        assert torch.equal(st_[k], wst[k]), k


# ============================================================================ valid: attention
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@VALID
@given(data=st.data())
def test_spatial_attention_matches_reference(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)))
    shape = data.draw(st.tuples(st.integers(0, 3), st.integers(1, 5), st.integers(1, 6),
                                st.integers(1, 6)))
    x = rand(shape, dtype, data.draw(layouts(4)))
    if data.draw(st.booleans()):  # ReLU features: zeros and an all-zero map happen in practice
        x = x.clamp_min(0)
        x[:1] = 0
    p = data.draw(st.sampled_from([2, 1, 3, 1.5, 0.5, np.int64(2), np.float32(1.5)]))
    grads = [torch.randn(o) for o in ((shape[0], shape[2], shape[3]),
                                      (shape[0], shape[2] * shape[3]), (shape[0], 2))]
    res = {}
    for b in (backend, "reference"):
        leaf, xr = leaf_view(x)
        with on_backend(b):
            outs = ak.spatial_attention(xr, p=p)
            sum((o.float() * g).sum() for o, g in zip(outs, grads)).backward()
        res[b] = outs, leaf.grad
    (outs, gx), (wouts, wx) = res[backend], res["reference"]
    for name, o, w in zip(("amap", "anorm", "center"), outs, wouts):
        assert o.dtype == dtype and o.shape == w.shape
        close(o, w, dtype, f"{name} {backend} {dtype} {shape} p={p}")
    close(gx, wx, dtype, f"dfeat {backend} {dtype} {shape} p={p}")


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@VALID
@given(data=st.data())
def test_pair_losses_match_reference(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)))
    n = data.draw(st.integers(0, 4))  # an empty batch is valid (mean over it is NaN, as torch's)
    rest = data.draw(shapes(1, 2, 6))
    stacked = data.draw(st.booleans())
    a = rand((2 * n if stacked else n,) + rest, dtype, data.draw(layouts(1 + len(rest))))
    b = None if stacked else rand((n,) + rest, dtype)
    op = data.draw(st.sampled_from(["attention_sq_distance", "attention_pair_distance",
                                    "attention_pair_hinge", "attention_center_loss"]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    kw = dict(reduction=reduction)
    if op == "attention_pair_hinge":
        kw["margin"] = data.draw(st.sampled_from([0.0, 0.5, 2.0, 100.0, -1.0, np.float32(1.0)]))
    if op == "attention_center_loss":
        a, b = rand((n, 2), dtype), rand((n, 2), dtype)
    res = {}
    for bk in (backend, "reference"):
        la, ar = leaf_view(a)
        lb, br = (None, None) if b is None else leaf_view(b)
        with on_backend(bk):
            out = getattr(ak, op)(ar, br, **kw)
            (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)).sum().backward()
        res[bk] = out, la.grad, None if lb is None else lb.grad
    (out, ga, gb), (wout, wa, wb) = res[backend], res["reference"]
    close(out, wout, dtype, f"{op} {backend} {dtype}")
    close(ga, wa, dtype, f"d{op}/da {backend} {dtype}")
    if gb is not None or wb is not None:
        close(gb, wb, dtype, f"d{op}/db {backend} {dtype}")


# ============================================================================ valid: bn_stats
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@VALID
@given(data=st.data())
def test_bn_stats_match_reference(backend, data):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)))
    xs = []
    for _ in range(data.draw(st.integers(1, 3))):
        shape = data.draw(st.sampled_from([
            (data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))),
            (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5)),
             data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))]))
        xs.append(rand(shape, dtype, data.draw(layouts(len(shape))),
                       offset=data.draw(st.sampled_from([0.0, 3.0]))))
    rms = [torch.randn(x.shape[1]) for x in xs]
    rvs = [torch.rand(x.shape[1]) + 0.5 for x in xs]
    res = {}
    for b in (backend, "reference"):
        leaves, xr = zip(*[leaf_view(x) for x in xs])
        with on_backend(b):
            stats = ak.bn_stats(list(xr))
            loss, per_layer = ak.bns_loss(list(xr), rms, rvs)
            loss.backward()
            flat = ak.bn_stats_flat([x.detach() for x in xs], shifts=rms)
        res[b] = stats, loss, per_layer, [x.grad for x in leaves], flat
    got, want = res[backend], res["reference"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for (m, v), (wm, wv) in zip(got[0], want[0]):
        close(m, wm, acc, f"mean {backend} {dtype}", scale=10.0)
        close(v, wv, acc, f"var {backend} {dtype}", scale=10.0)
    close(got[1], want[1], acc, "bns_loss", scale=100.0)
    close(got[2], want[2], acc, "per_layer", scale=100.0)
    for g, w in zip(got[3], want[3]):
        close(g, w, dtype, f"dx {backend} {dtype}")
    close(got[4], want[4], acc, "bn_stats_flat", scale=100.0)


@VALID
@given(data=st.data())
def test_flat_buffers_merge_to_the_union(data):
    """merge(flat(part1), flat(part2)) holds the statistics of the whole batch, with shifts."""
    c = data.draw(st.integers(1, 5))
    n1, n2 = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    whole = rand((n1 + n2, c, 2, 3), torch.float64, offset=data.draw(st.sampled_from([0., 50.])))
    shifts = [torch.randn(c, dtype=torch.float64)] if data.draw(st.booleans()) else None
    merged = ak.merge_bn_stats(ak.bn_stats_flat([whole[:n1]], shifts),
                               ak.bn_stats_flat([whole[n1:]], shifts))
    (m, v), = ak.bn_stats_from_flat(merged, [c], shifts)
    dims = (0, 2, 3)
    close(m, whole.mean(dims), torch.float32, "merged mean", scale=50.0)
    close(v, whole.var(dims, unbiased=False), torch.float32, "merged var", scale=10.0)
    rm, rv = [torch.randn(c, dtype=torch.float64)], [torch.rand(c, dtype=torch.float64) + .5]
    loss, _ = ak.bns_loss_from_flat(merged, [c], rm, rv, shifts)
    want, _ = ak.bns_loss([whole], rm, rv)
    close(loss, want, torch.float32, "bns_loss_from_flat", scale=100.0)


# ============================================================================ every listed case
def _inner(test):
    return test.hypothesis.inner_test  # the undecorated body of a @given test


def test_every_listed_bad_case_is_rejected():
    """Hypothesis samples the tables above; this walks all of them once per run (milliseconds
    each), so no listed case can go unchecked."""
    for fn, table in ((test_fake_quantize_rejects, FAKE_QUANTIZE_BAD),
                      (test_fake_quantize_learnable_rejects, LEARNABLE_BAD),
                      (test_fake_quantize_minmax_rejects, MINMAX_BAD),
                      (test_fake_quantize_moving_average_rejects, MOVING_AVERAGE_BAD),
                      (test_module_constructors_reject, MODULE_BAD),
                      (test_spatial_attention_rejects, SPATIAL_BAD),
                      (test_attention_center_loss_rejects, CENTER_BAD),
                      (test_merge_bn_stats_rejects, MERGE_BAD)):
        for case in table:
            _inner(fn)(case=case)
    for op in PAIR_OPS:
        for case in PAIR_BAD:
            _inner(test_pair_losses_reject)(op=op, case=case)
    for op in ("bn_stats", "bns_loss", "bn_stats_flat"):
        for case in BN_BAD:
            _inner(test_bn_stats_rejects)(op=op, case=case)
    for op in ("bn_stats_from_flat", "bns_loss_from_flat"):
        for case in FLAT_ALL_BAD:
            _inner(test_flat_buffers_reject)(op=op, case=case)
    for model in COLLECTOR_BAD:
        _inner(test_bn_stat_collector_rejects)(model=model)
