"""Host->device uploads of the BN-statistics ops are CUDA-graph safe: torch refuses a copy from
pageable host memory during a capture, so every table the ops send to the device must come from
pinned memory (acq_kernels._upload.to_device), asynchronously, and be kept alive when captured.

No GPU here, so in two steps: (1) to_device itself, for a CUDA destination, with torch's copy,
pinning and capture status patched; (2) every transfer to the inputs' device that the ops make
(run on CPU, where the same code paths run) goes through to_device, and on the cached path the
only upload left is the per-call pointer/offset table."""
import traceback

import pytest
import torch

import acq_kernels
from acq_kernels import _upload
from acq_kernels.bn_stats import ops as bn_ops
from acq_kernels.bn_stats import plan as bn_plan
from conftest import cpu_backends

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_cuda_copy(monkeypatch):
    """Patches pinning (Tensor.pin_memory / is_pinned, the reserve's allocation) and Tensor.to so
    that to_device(host, cuda) runs on CPU; records (source, source pinned?, non_blocking) for
    every copy towards CUDA. Pinned-ness is a property of the storage, as in torch."""
    pinned, copies = set(), []
    real_to = torch.Tensor.to

    def pin_memory(self):
        out = self.clone()
        pinned.add(out.untyped_storage().data_ptr())
        return out

    def reserve():
        buf = torch.zeros(_upload.RESERVE_BYTES, dtype=torch.uint8)
        pinned.add(buf.untyped_storage().data_ptr())
        return buf

    def to(self, *args, **kwargs):
        dev = kwargs.get("device", args[0] if args else None)
        if isinstance(dev, torch.device) and dev.type == "cuda":
            copies.append((self, self.untyped_storage().data_ptr() in pinned,
                           kwargs.get("non_blocking", False)))
            return self.clone()
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.untyped_storage().data_ptr() in pinned)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(_upload, "_pinned_reserve", reserve)
    monkeypatch.setattr(_upload, "_reserve", {})
    monkeypatch.setattr(_upload, "_captured", [])
    return copies


def test_to_device_copies_from_pinned_memory_without_blocking(fake_cuda_copy, monkeypatch):
    monkeypatch.setattr(_upload, "_capturing", lambda device: False)
    host = torch.arange(12, dtype=torch.int64).view(3, 4)
    out = _upload.to_device(host, CUDA)
    assert torch.equal(out, host)
    [(src, src_pinned, non_blocking)] = fake_cuda_copy
    assert src_pinned and non_blocking and src is not host  # staged, never the pageable tensor
    assert CUDA in _upload._reserve  # ready for a capture to come


def test_captured_uploads_use_the_reserve_and_keep_their_bytes(fake_cuda_copy, monkeypatch):
    """In a capture, tables are carved out of the pinned reserve an uncaptured call made (no
    allocation inside the capture), each at its own address, never reused: replays reread them."""
    capturing = False
    monkeypatch.setattr(_upload, "_capturing", lambda device: capturing)
    _upload.to_device(torch.zeros(3), CUDA)  # warm-up, as before any capture
    reserve = _upload._reserve[CUDA][0]
    capturing = True
    tables = [torch.arange(n, dtype=torch.int64) * (i + 1) for i, n in enumerate((5, 14, 1))]
    for t in tables:
        assert torch.equal(_upload.to_device(t, CUDA), t)
    srcs = [src for src, pinned, nb in fake_cuda_copy[1:]]
    assert all(pinned and nb for _, pinned, nb in fake_cuda_copy)
    base = reserve.data_ptr()
    spans = sorted((s.data_ptr() - base, s.data_ptr() - base + s.numel() * s.element_size()) for s in srcs)
    assert all(s.untyped_storage().data_ptr() == base for s in srcs)  # inside the reserve
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # no overlap
    for s, t in zip(srcs, tables):
        assert torch.equal(s, t)  # the bytes a replay copies again
    assert all(any(s is c for c in _upload._captured) for s in srcs)  # kept past a new reserve
    capturing = False
    _upload.to_device(torch.zeros(3), CUDA)  # an uncaptured call never hands out carved bytes
    for s, t in zip(srcs, tables):
        assert torch.equal(s, t)


def test_captured_upload_without_a_reserve_pins_and_keeps_its_table(fake_cuda_copy, monkeypatch):
    monkeypatch.setattr(_upload, "_capturing", lambda device: True)
    host = torch.arange(6, dtype=torch.int64)
    _upload.to_device(host, CUDA)
    [(src, src_pinned, non_blocking)] = fake_cuda_copy
    assert src_pinned and non_blocking and _upload._captured == [src]


def test_to_device_on_cpu_is_a_plain_no_copy():
    host = torch.ones(3)
    assert _upload.to_device(host, torch.device("cpu")) is host


class DeviceTransfers:
    """Patches Tensor.to / Tensor.cuda and torch.tensor / torch.as_tensor to record every
    Python-level transfer of host data to an explicit device, and whether _upload.to_device made
    it. On CPU these are exactly the calls that copy host->device on CUDA. (Patched rather than a
    TorchFunctionMode, which would not see the calls made inside the custom ops' bodies.)"""

    def __init__(self, monkeypatch):
        self.uploads, self.others, self.on = [], [], False
        for owner, name, dev_of in ((torch.Tensor, "to", self._to_device_arg),
                                    (torch.Tensor, "cuda", lambda a, k: k.get("device", a[1] if len(a) > 1 else 0)),
                                    (torch, "tensor", lambda a, k: k.get("device")),
                                    (torch, "as_tensor", lambda a, k: k.get("device"))):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), dev_of))

    @staticmethod
    def _to_device_arg(args, kwargs):
        cand = kwargs.get("device", args[1] if len(args) > 1 else None)
        if isinstance(cand, str):
            return cand if cand.split(":")[0] in ("cpu", "cuda", "meta") else None
        return cand if isinstance(cand, torch.device) else None

    def _wrap(self, func, dev_of):
        def wrapper(*args, **kwargs):
            if self.on and dev_of(args, kwargs) is not None:
                stack = traceback.extract_stack()[:-1]
                via = any(f.filename.replace("\\", "/").endswith("acq_kernels/_upload.py") for f in stack)
                (self.uploads if via else self.others).append(
                    f"{func.__name__} -> {dev_of(args, kwargs)}\n" + "".join(traceback.format_list(stack[-6:])))
            return func(*args, **kwargs)
        return wrapper

    def record(self):
        self.uploads, self.others, self.on = [], [], True
        return self


def _layers(dtypes):
    shapes = [(4, 8, 6, 6), (4, 16, 3, 3), (4, 5, 7, 7)]
    xs = [torch.randn(s, dtype=dt).requires_grad_(True) for s, dt in zip(shapes, dtypes)]
    rms = [torch.randn(s[1]) for s in shapes]
    rvs = [torch.rand(s[1]) + 0.5 for s in shapes]
    return xs, rms, rvs


def _every_op(xs, rms, rvs):
    loss, _ = acq_kernels.bns_loss(xs, rms, rvs)
    flat = acq_kernels.bn_stats_flat(xs, shifts=rms)
    loss2, _ = acq_kernels.bns_loss_from_flat(flat, [x.shape[1] for x in xs], rms, rvs, shifts=rms)
    torch.autograd.grad(loss + loss2, xs)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
@pytest.mark.parametrize("mixed", [False, True], ids=["one-dtype", "mixed-dtypes"])
def test_bn_stats_ops_upload_only_through_pinned_path(monkeypatch, backend, mixed):
    dtypes = [torch.float32, torch.bfloat16, torch.float32] if mixed else [torch.float32] * 3
    xs, rms, rvs = _layers(dtypes)
    bn_ops._vec_cache.clear()
    bn_plan._cache.clear()
    probe = DeviceTransfers(monkeypatch)
    with acq_kernels.set_backend(backend):
        first = probe.record()
        _every_op(xs, rms, rvs)  # builds plans and cached vectors
        first = (list(first.uploads), list(first.others))
        again = probe.record()
        _every_op(xs, rms, rvs)  # cached path
    first_uploads, first_others = first
    assert not first_others, first_others[0]
    assert not again.others, again.others[0]
    assert first_uploads  # the vectors (and Triton's plans) were uploaded through to_device
    # Cached path: only what depends on this call's data pointers is sent again, i.e. Triton's
    # offset table per launch group (forward: 2 calls x 1 table, backward: 2 x 1) plus, with
    # mixed dtypes, the column order of the two partial results (2 calls).
    per_call = (4 if backend == "triton" else 0) * (2 if mixed else 1) + (2 if mixed else 0)
    assert len(again.uploads) == per_call, again.uploads
