"""Bad input to the fake-quant ops raises ValueError/TypeError naming the argument, before any
kernel launch or buffer update."""
import pytest
import torch

import acq_kernels as ak
from acq_kernels.fake_quant import ops


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Any backend dispatch here means validation let bad input through."""
    def launched(x, name):
        raise AssertionError(f"kernel {name} launched despite invalid arguments")
    monkeypatch.setattr(ops, "_impl", launched)


X = torch.randn(4, 6)


def fq(**kw):
    args = dict(x=X, scale=0.1, zero_point=0, quant_min=-8, quant_max=7)
    args.update(kw)
    return ak.fake_quantize(**args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(quant_min=5, quant_max=3), ValueError,
     r"fake_quantize: quant_min \(5\) must be < quant_max \(3\)"),
    (dict(quant_min=3, quant_max=3), ValueError, r"quant_min \(3\) must be < quant_max \(3\)"),
    (dict(quant_min=-40000, quant_max=0), ValueError, "16-bit"),
    (dict(quant_min=0, quant_max=70000), ValueError, "16-bit"),
    (dict(quant_min=-1, quant_max=40000), ValueError, "16-bit"),
    (dict(quant_min=1.5), TypeError, "quant_min must be an int"),
    (dict(quant_max=True), TypeError, "quant_max must be an int"),
    (dict(scale=0.0), ValueError, r"scale \(0.0\) must be positive"),
    (dict(scale=-1), ValueError, "scale"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale="0.1"), TypeError, "scale"),
    (dict(scale=torch.tensor([0.0])), ValueError, "scale must be positive and finite"),
    (dict(scale=torch.tensor(float("nan"))), ValueError, "scale"),
    (dict(scale=torch.tensor([1], dtype=torch.int32)), TypeError, "scale must be a floating"),
    (dict(scale=torch.ones(2)), ValueError, "scale has 2 elements"),
    (dict(zero_point=9), ValueError, r"zero_point \(9\) must be within \[quant_min, quant_max\]"),
    (dict(zero_point=-9), ValueError, "zero_point"),
    (dict(zero_point=1.5), TypeError, "zero_point must be an int"),
    (dict(zero_point=torch.tensor([100])), ValueError, "zero_point"),
    (dict(zero_point=torch.tensor([True])), TypeError, "zero_point"),
    (dict(ste="straight"), ValueError, "ste must be 'clipped' or 'pure'"),
    (dict(x=torch.arange(6)), TypeError, "x must have a floating dtype"),
    (dict(x=torch.ones(3, dtype=torch.bool)), TypeError, "x must have a floating dtype"),
    (dict(x=torch.ones(3, dtype=torch.complex64)), TypeError, "x must have a floating dtype"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_fake_quantize_per_tensor_bad_args(kw, exc, match):
    with pytest.raises(exc, match=match):
        fq(**kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(axis=2), ValueError, r"axis \(2\) is out of range"),
    (dict(axis=-3), ValueError, r"axis \(-3\) is out of range"),
    (dict(axis=1.0), TypeError, "axis must be an int"),
    (dict(axis=1, scale=torch.ones(5)), ValueError, r"scale has 5 elements but x.size\(1\)"),
    (dict(axis=1, zero_point=torch.zeros(4, dtype=torch.int32)), ValueError,
     "zero_point has 4 elements"),
    (dict(axis=1, scale=torch.ones(6, 1)), ValueError, "scale must be 0-d or 1-d"),
    (dict(axis=1, scale=0.1), TypeError, "scale must be a tensor"),
    (dict(axis=0, scale=torch.tensor([1.0, 1.0, -1.0, 1.0])), ValueError, "scale"),
    (dict(axis=0, zero_point=torch.tensor([0, 0, 8, 0])), ValueError, "zero_point"),
    (dict(axis=1, scale=torch.ones(6, device="meta")), ValueError,
     "scale is on meta but x is on cpu"),
    (dict(axis=1, zero_point=torch.zeros(6, device="meta")), ValueError, "zero_point is on meta"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_fake_quantize_per_channel_bad_args(kw, exc, match):
    c = 4 if kw.get("axis") == 0 else 6   # X is [4, 6]
    args = dict(scale=torch.ones(c), zero_point=torch.zeros(c, dtype=torch.int32))
    args.update(kw)
    with pytest.raises(exc, match=match):
        fq(**args)


def test_learnable_bad_args():
    s, z = torch.ones(1), torch.zeros(1)
    with pytest.raises(TypeError, match="fake_quantize_learnable: scale must be a floating"):
        ak.fake_quantize_learnable(X, 0.1, z, -8, 7)
    with pytest.raises(TypeError, match="zero_point must be a floating tensor"):
        ak.fake_quantize_learnable(X, s, torch.zeros(1, dtype=torch.int32), -8, 7)
    with pytest.raises(ValueError, match="scale has 1 elements but x.size"):
        ak.fake_quantize_learnable(X, s, z, -8, 7, axis=1)
    with pytest.raises(ValueError, match="scale must be positive"):
        ak.fake_quantize_learnable(X, -s, z, -8, 7)
    with pytest.raises(TypeError, match="grad_factor must be a real number"):
        ak.fake_quantize_learnable(X, s, z, -8, 7, grad_factor="1")
    with pytest.raises(ValueError, match=r"quant_min \(7\) must be < quant_max \(-8\)"):
        ak.fake_quantize_learnable(X, s, z, 7, -8)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        ak.fake_quantize_learnable(X.long(), s, z, -8, 7)


def test_minmax_bad_args():
    with pytest.raises(ValueError, match=r"fake_quantize_minmax: eps \(0.0\) must be positive"):
        ak.fake_quantize_minmax(X, -8, 7, eps=0.0)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        ak.fake_quantize_minmax(X, -8, 7, symmetric=1)
    with pytest.raises(ValueError, match=r"axis \(5\) is out of range"):
        ak.fake_quantize_minmax(X, -8, 7, axis=5)
    with pytest.raises(ValueError, match="ste must be"):
        ak.fake_quantize_minmax(X, -8, 7, ste="none")
    with pytest.raises(ValueError, match="16-bit"):
        ak.fake_quantize_minmax(X, 0, 1 << 17)


def _buffers():
    return [torch.tensor(float("inf")), torch.tensor(float("-inf")), torch.ones(1),
            torch.zeros(1, dtype=torch.int32)]


@pytest.mark.parametrize("index,bad,exc,match", [
    (0, torch.zeros(1, dtype=torch.float64), TypeError, "min_val must be a torch.float32"),
    (1, torch.zeros(2), ValueError, r"max_val must hold one value"),
    (2, 1.0, TypeError, "scale must be a torch.Tensor"),
    (3, torch.zeros(1), TypeError, "zero_point must be a torch.int32"),
    (2, torch.ones(1, device="meta"), ValueError, "scale is on meta"),
])
def test_moving_average_bad_buffers(index, bad, exc, match):
    bufs = _buffers()
    bufs[index] = bad
    with pytest.raises(exc, match=match):
        ak.fake_quantize_moving_average(X, *bufs, 0, 255)


def test_moving_average_bad_args_leave_buffers_untouched():
    bufs = _buffers()
    before = [b.clone() for b in bufs]
    for kw, exc, match in [(dict(averaging_constant=1.5), ValueError, "averaging_constant"),
                           (dict(averaging_constant="x"), TypeError, "averaging_constant"),
                           (dict(observe=1), TypeError, "observe must be a bool"),
                           (dict(eps=-1.0), ValueError, "eps"),
                           (dict(ste="x"), ValueError, "ste"),
                           (dict(quant_min=255, quant_max=0), ValueError, "quant_min")]:
        args = dict(quant_min=0, quant_max=255)
        args.update(kw)
        with pytest.raises(exc, match=match):
            ak.fake_quantize_moving_average(X, *bufs, **args)
    for a, b in zip(bufs, before):
        assert torch.equal(a, b)
    # observe=False reads the qparam buffers: their values are checked (CPU)
    bufs[2].fill_(0.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        ak.fake_quantize_moving_average(X, *bufs, 0, 255, observe=False)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(quant_min=5, quant_max=2), ValueError, r"quant_min \(5\) must be <= quant_max \(2\)"),
    (dict(quant_min=0, quant_max=300), ValueError, r"torch.quint8's range \[0, 255\]"),
    (dict(quant_min=-200, quant_max=7, dtype=torch.qint8), ValueError, r"torch.qint8.s range"),
    (dict(quant_min=0.5, quant_max=3), TypeError, "quant_min must be an int"),
    (dict(quant_min=0, quant_max=True), TypeError, "quant_max must be an int"),
])
def test_fake_quant_range_errors_name_the_argument(kwargs, exc, match):
    """torch.ao's FakeQuantize asserts these (AssertionError); FakeQuant says what is wrong."""
    with pytest.raises(exc, match=match):
        ak.FakeQuant(**kwargs)
    with pytest.raises(exc, match=match):  # the qconfig way: dtype inside with_args
        ak.FakeQuant.with_args(**kwargs)()


def test_fake_quant_range_checks_accept_what_torch_accepts():
    import numpy as np
    from torch.ao.quantization import FakeQuantize
    for kwargs in (dict(quant_min=0, quant_max=255), dict(quant_min=np.int64(0), quant_max=15),
                   dict(quant_min=-128, quant_max=127, dtype=torch.qint8), dict(quant_min=None)):
        FakeQuantize(**kwargs)
        ak.FakeQuant(**kwargs)
