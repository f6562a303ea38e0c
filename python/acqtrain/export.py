"""`acq export`: a trained student -> integer weights + qparams, a plain-PyTorch model, an ONNX QDQ graph.

export_student(student, out_dir, input_shape) writes
- quantized.safetensors  integer weights (uint8 / int8 containers), per-channel float32 scales and int32
                         zero points, every activation site's scale / zero point, the float tensors;
- manifest.json          model, geometry, bits and integer range per layer and site, the graph (torch.fx
                         nodes) that `acq_deploy.load` rebuilds, versions, teacher hash, self-check figures;
- acq_deploy.py          the torch-only loader (python/acqtrain/deploy.py);
- model.onnx             QuantizeLinear -> Clip -> DequantizeLinear at every activation site, DequantizeLinear
                         on every integer weight; the Clip keeps sub-8-bit ranges exact (e.g. [0, 15] in the
                         uint8 container at 4 bits), nothing is widened. BatchNorm is exported as trained
                         (BatchNormalization with the student's statistics and affine), not folded.

The student (an nn.Module tree or a torch.fx GraphModule) is rewritten module by module: every
`acqtrain.quant.ActQuant` becomes a quantize/dequantize pair, every `acqtrain.quant.WeightQuant` layer a
dequantize + float op of its integer weight; then the whole model is traced into torch functions.
The rebuilt model is checked against the student, and the ONNX graph against the rebuilt model with
onnxruntime, on a probe batch before the export is reported done.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import warnings

import torch
from torch import fx, nn

from . import deploy
from .errors import AcqError
from .paths import check_output_dir
from .quant import ActQuant, WeightQuant

ONNX_FILE = "model.onnx"
LOADER_FILE = "acq_deploy.py"
_EXTRA = "pip install 'acq_kernels[export]'"

_KINDS = ((nn.ConvTranspose1d, "conv_transpose1d"), (nn.ConvTranspose2d, "conv_transpose2d"),
          (nn.ConvTranspose3d, "conv_transpose3d"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"),
          (nn.Conv3d, "conv3d"), (nn.Linear, "linear"))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """A hash of a model's weights (names, dtypes, shapes, values): identifies a teacher without its file."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def require_export_deps(onnx: bool = True) -> None:
    """AcqError naming the missing optional dependency (checked before any file is written)."""
    names = ["safetensors"] + (["onnx", "onnxruntime", "onnxscript"] if onnx else [])
    missing = []
    for n in names:
        try:
            __import__(n)
        except ImportError:
            missing.append(n)
    if missing:
        raise AcqError(f"acq export needs {', '.join(missing)} ({_EXTRA})")


# ---------------------------------------------------------------- module rewriting
def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _layer_kind(m: nn.Module) -> str:
    for cls, kind in _KINDS:
        if isinstance(m, cls):
            return kind
    raise AcqError(f"weight-quantized layer of type {type(m).__name__} has no export rule")


def _hparams(m: nn.Module, kind: str, name: str) -> dict:
    if kind == "linear":
        return {}
    if getattr(m, "padding_mode", "zeros") != "zeros":
        raise AcqError(f"layer {name}: padding_mode={m.padding_mode!r} is not exportable (only 'zeros')")
    hp = {k: getattr(m, k) for k in ("stride", "padding", "dilation", "groups")}
    if kind.startswith("conv_transpose"):
        hp["output_padding"] = m.output_padding
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}


def integer_weight(m: WeightQuant, name: str):
    """(int weight in its container, scale, zero_point, qmin, qmax, axis, container name) of a layer,
    with the formula of the fake quantizer: clamp(round(w * (1 / scale)) + zero_point, qmin, qmax)."""
    scale, zp, qmin, qmax, axis = m.weight_qparams()
    w = m.weight.detach().float()
    scale = scale.detach().float().reshape(-1)
    zp = zp.detach().to(torch.int32).reshape(-1)
    shape = [1] * w.dim()
    shape[axis] = -1
    q = torch.round(w * (1.0 / scale).view(shape)) + zp.view(shape).float()
    q = torch.clamp(q, qmin, qmax)
    lo, hi = min(qmin, int(zp.min())), max(qmax, int(zp.max()))
    container = deploy.container_for(lo, hi)
    if container is None:
        raise AcqError(f"layer {name}: integer range [{qmin}, {qmax}] with zero points in "
                       f"[{int(zp.min())}, {int(zp.max())}] does not fit an 8-bit container "
                       f"(w_bits={getattr(m, 'w_bits', '?')}); only <= 8-bit weights are exportable")
    return q.to(deploy.CONTAINERS[container][0]), scale, zp, qmin, qmax, axis, container


def to_deploy_modules(student: nn.Module) -> tuple[nn.Module, list, list]:
    """A CPU copy of `student` with every quantizer replaced by its plain-torch Q/DQ form, and the
    manifest entries of its weight layers and activation sites (in module order)."""
    model = copy.deepcopy(student).cpu().eval()
    layers, sites = [], []
    for name, m in list(model.named_modules()):
        if isinstance(m, ActQuant):
            if not (torch.isfinite(m.min_val) and torch.isfinite(m.max_val)):
                raise AcqError(f"activation site {name} was never calibrated (its range is empty)")
            qmin, qmax = int(getattr(m, "quant_min", 0)), int(getattr(m, "quant_max", 2 ** m.bits - 1))
            container = deploy.container_for(min(qmin, int(m.zero_point.min())), max(qmax, int(m.zero_point.max())))
            if container is None:
                raise AcqError(f"activation site {name}: range [{qmin}, {qmax}] ({m.bits} bits) does not fit an "
                               "8-bit container; only <= 8-bit activations are exportable")
            _set_submodule(model, name, deploy.QuantDequantAct(m.scale, m.zero_point, qmin, qmax, container))
            sites.append({"name": name, "bits": m.bits, "quant_min": qmin, "quant_max": qmax,
                          "scale": float(m.scale.reshape(-1)[0]), "zero_point": int(m.zero_point.reshape(-1)[0]),
                          "container": container, "tensors": [f"{name}.scale", f"{name}.zero_point"]})
        elif isinstance(m, WeightQuant):
            kind = _layer_kind(m)
            hp = _hparams(m, kind, name)
            q, scale, zp, qmin, qmax, axis, container = integer_weight(m, name)
            bias = None if m.bias is None else m.bias.detach().float()
            _set_submodule(model, name, deploy.DequantWeightLayer(kind, hp, q, scale, zp, qmin, qmax, axis, bias))
            layers.append({"name": name, "kind": kind, "w_bits": m.w_bits, "quant_min": qmin, "quant_max": qmax,
                           "axis": axis, "container": container, "out_channels": int(scale.numel()),
                           "weight_shape": list(q.shape), "hparams": hp, "has_bias": bias is not None,
                           "tensors": [f"{name}.weight_int", f"{name}.weight_scale", f"{name}.weight_zero_point"]
                           + ([f"{name}.bias"] if bias is not None else [])})
    # a quantizer of acq_kernels left in place would not survive the export (the graph admits only
    # torch's own functions and ops, see deploy.graph_to_json): name it instead of failing in the trace
    left = [f"{n} ({type(m).__module__}.{type(m).__name__})" for n, m in model.named_modules()
            if type(m).__module__.split(".")[0] == "acq_kernels"]
    if left:
        raise AcqError(f"cannot export: no export rule for {', '.join(left[:5])}")
    return model, layers, sites


class _Tracer(fx.Tracer):
    """torch.nn modules stay leaves (call_module); everything else, the Q/DQ modules included, is traced
    through to torch functions, with buffers as get_attr nodes (not baked-in constants)."""
    proxy_buffer_attributes = True


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        raise AcqError(f"cannot trace the student for export ({type(exc).__name__}: {exc})") from None
    return fx.GraphModule(model, graph)


def _modules_of(gm: fx.GraphModule) -> tuple[dict, dict]:
    """(manifest specs, tensors) of the torch.nn leaf modules the graph calls."""
    specs, tensors = {}, {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target not in specs:
            m = gm.get_submodule(n.target)
            try:
                specs[n.target] = deploy.module_to_json(m)
            except TypeError as exc:
                raise AcqError(f"cannot export module {n.target}: {exc}") from None
            tensors.update({f"{n.target}.{k}": v.detach().cpu().contiguous().clone()
                            for k, v in m.state_dict().items()})
    return specs, tensors


def _tensors_of(gm: fx.GraphModule) -> dict:
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                raise AcqError(f"cannot export attribute {n.target} ({type(obj).__name__}, not a tensor)")
            out[n.target] = obj.detach().cpu().contiguous().clone()
    return out


# ---------------------------------------------------------------- ONNX
def _onnx_translations():
    """QuantizeLinear + Clip (the site's exact integer range) and DequantizeLinear for torch's
    per-tensor decomposed ops with tensor qparams (onnxscript's default drops the Clip)."""
    from onnxscript import opset18 as op

    def quantize(x, scale, zero_point, quant_min: int, quant_max: int, dtype: int):
        zp = op.Cast(zero_point, to=dtype)
        q = op.QuantizeLinear(x, scale, zp)
        return op.Clip(q, op.Cast(quant_min, to=dtype), op.Cast(quant_max, to=dtype))

    def dequantize(x, scale, zero_point, quant_min: int, quant_max: int, dtype: int, out_dtype: int = -1):
        return op.DequantizeLinear(x, scale, op.Cast(zero_point, to=dtype))

    qd = torch.ops.quantized_decomposed
    return {qd.quantize_per_tensor.tensor: quantize, qd.dequantize_per_tensor.tensor: dequantize}


def export_onnx(model: nn.Module, path: str, input_shape, sites: list, layers: list) -> dict:
    """Write `model` (the rebuilt deploy model) as ONNX with a dynamic batch; check and count its Q/DQ."""
    import onnx

    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["images"],
                                     output_names=["logits"], custom_translation_table=_onnx_translations(),
                                     dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=True)
        except Exception as exc:
            raise AcqError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    prog.save(path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    counts = {t: sum(n.op_type == t for n in proto.graph.node)
              for t in ("QuantizeLinear", "DequantizeLinear", "Clip", "BatchNormalization")}
    clipped = sum((s["quant_min"], s["quant_max"]) != (0, 255) for s in sites)
    expected = {"QuantizeLinear": len(sites), "DequantizeLinear": len(sites) + len(layers), "Clip": len(sites)}
    if any(counts[k] != v for k, v in expected.items()):
        raise AcqError(f"ONNX graph has {counts} Q/DQ/Clip nodes, expected {expected} "
                       f"({len(sites)} activation sites, {len(layers)} weight layers)")
    return {"opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": counts, "sites_sub8bit": clipped}


def onnx_session(path: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise AcqError(f"evaluating an ONNX file needs onnxruntime ({_EXTRA})") from None
    try:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise AcqError(f"onnxruntime cannot load {path} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def onnx_run(session, x: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().contiguous().numpy()})[0])


# ---------------------------------------------------------------- the export
def export_student(student: nn.Module, out_dir: str, input_shape, meta: dict | None = None, onnx: bool = True,
                   probe_batch: int = 16, seed: int = 0) -> dict:
    """Export a trained student (see the module docstring); returns the manifest.

    student: the fake-quantized model (acqtrain.quant.quantize_model's output, ranges frozen).
    input_shape: (channels, height, width) of one input image.
    meta: extra manifest fields (model name, bits, teacher hash, checkpoint ...).
    onnx: also write and check model.onnx (needs onnx, onnxscript and onnxruntime).
    """
    input_shape = [int(v) for v in input_shape]
    require_export_deps(onnx)
    check_output_dir(out_dir, "--out")
    model, layers, sites = to_deploy_modules(student)
    gm = trace(model)
    modules, tensors = _modules_of(gm)
    tensors.update(_tensors_of(gm))
    from . import __version__
    manifest = {"format": deploy.FORMAT, "acq_version": __version__, "torch_version": torch.__version__,
                "input_shape": input_shape, **(meta or {}),
                "batchnorm": "as trained (BatchNormalization with the student's statistics and affine; not folded)",
                "weight_layers": layers, "activation_sites": sites,
                "float_modules": [n for n, m in student.named_modules()
                                  if isinstance(m, tuple(c for c, _ in _KINDS)) and not isinstance(m, WeightQuant)],
                "modules": modules, "graph": deploy.graph_to_json(gm.graph)}
    rebuilt = deploy.build(json.loads(json.dumps(manifest)), tensors)
    # self-check on a probe batch: rebuilt plain-torch model vs the student
    x = torch.randn((probe_batch, *input_shape), generator=torch.Generator().manual_seed(seed))
    dev = next((p.device for p in student.parameters()), torch.device("cpu"))
    with torch.no_grad():
        ref = student.eval()(x.to(dev)).float().cpu()
        got = rebuilt(x)
    diff = float((got - ref).abs().max())
    if not diff <= 1e-4 * (1.0 + float(ref.abs().max())):
        raise AcqError(f"the exported model disagrees with the student (max |diff| {diff:.3g} on a probe batch)")
    manifest["check"] = {"probe_batch": probe_batch, "torch_max_abs_diff": diff}
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(out_dir, deploy.TENSORS), metadata={"format": deploy.FORMAT})
    shutil.copyfile(deploy.__file__, os.path.join(out_dir, LOADER_FILE))
    if onnx:
        path = os.path.join(out_dir, ONNX_FILE)
        manifest["onnx"] = export_onnx(rebuilt, path, input_shape, sites, layers)
        manifest["check"]["onnxruntime_max_abs_diff"] = float((onnx_run(onnx_session(path), x) - got).abs().max())
    with open(os.path.join(out_dir, deploy.MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
