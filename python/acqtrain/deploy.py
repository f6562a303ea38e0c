"""The exported, deployable model in plain PyTorch: this file imports nothing but torch.

`acq export` copies it next to its outputs as `acq_deploy.py`, so that

    import acq_deploy
    model = acq_deploy.load("EXPORT_DIR")      # a torch.fx.GraphModule, eval mode
    logits = model(images)                     # [N, C, H, W] float32 -> [N, classes]

runs where neither acq nor acq_kernels is installed. `load` rebuilds the model from two files:
- `manifest.json`: the computation as a list of torch.fx nodes (torch / operator functions and
  torch.nn modules such as BatchNorm2d, with their constructor arguments, resolved by name under a
  fixed set of modules, never by importing or executing anything else),
  plus the bit width, integer range and qparams of every weight layer and activation site;
- `quantized.safetensors`: the tensors the nodes read: integer weights in 8-bit containers with
  per-output-channel float32 scales and int32 zero points, every activation site's scale and zero
  point, and the float tensors (biases, BatchNorm statistics and affine, as trained: not folded).

Quantization is expressed with torch's standard decomposed Q/DQ ops (the ones PT2E quantization
emits and the ONNX exporter maps to QuantizeLinear/DequantizeLinear):
- weights: dequantize_per_channel(int weight, scale, zero_point) -> float weight -> the layer's op;
- activations: quantize_per_tensor (round(x * (1 / scale)) + zero_point, clamped to the site's
  [quant_min, quant_max], e.g. [0, 15] at 4 bits) -> dequantize_per_tensor.
These compute exactly what the trained student computes (same fp32 formulas).
"""
from __future__ import annotations

import json
import math
import operator
import os
import struct

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import fx, nn

FORMAT = "acq-export-v1"
MANIFEST, TENSORS = "manifest.json", "quantized.safetensors"
_QD = torch.ops.quantized_decomposed

# integer containers: (torch dtype, lowest, highest)
CONTAINERS = {"uint8": (torch.uint8, 0, 255), "int8": (torch.int8, -128, 127)}


def container_for(values_min: int, values_max: int) -> str | None:
    """The narrowest 8-bit container holding [values_min, values_max] (None: none does)."""
    for name, (_, lo, hi) in CONTAINERS.items():
        if lo <= values_min and values_max <= hi:
            return name
    return None


class QuantDequantAct(nn.Module):
    """One activation site: per-tensor affine quantization to [quant_min, quant_max], dequantized."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                 container: str):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(()).clone())
        self.quant_min, self.quant_max, self.dtype = quant_min, quant_max, CONTAINERS[container][0]

    def forward(self, x):
        q = _QD.quantize_per_tensor.tensor(x, self.scale, self.zero_point, self.quant_min, self.quant_max,
                                           self.dtype)
        return _QD.dequantize_per_tensor.tensor(q, self.scale, self.zero_point, self.quant_min, self.quant_max,
                                                self.dtype)


# layer kinds: the float op a weight-quantized layer applies to (input, dequantized weight, bias)
def _conv(fn):
    return lambda x, w, b, hp: fn(x, w, b, hp["stride"], hp["padding"], hp["dilation"], hp["groups"])


def _conv_transpose(fn):
    return lambda x, w, b, hp: fn(x, w, b, hp["stride"], hp["padding"], hp["output_padding"], hp["groups"],
                                  hp["dilation"])


LAYER_OPS = {
    "conv1d": _conv(F.conv1d), "conv2d": _conv(F.conv2d), "conv3d": _conv(F.conv3d),
    "conv_transpose1d": _conv_transpose(F.conv_transpose1d),
    "conv_transpose2d": _conv_transpose(F.conv_transpose2d),
    "conv_transpose3d": _conv_transpose(F.conv_transpose3d),
    "linear": lambda x, w, b, hp: F.linear(x, w, b),
}


class DequantWeightLayer(nn.Module):
    """A conv / linear layer whose weight is stored as integers + per-channel scale and zero point."""

    def __init__(self, kind: str, hparams: dict, weight_int: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, quant_min: int, quant_max: int, axis: int, bias=None):
        super().__init__()
        self.kind, self.hparams, self.axis = kind, hparams, axis
        self.quant_min, self.quant_max, self.dtype = quant_min, quant_max, weight_int.dtype
        self.register_buffer("weight_int", weight_int)
        self.register_buffer("weight_scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("weight_zero_point", zero_point.detach().to(torch.int32).reshape(-1).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        w = _QD.dequantize_per_channel(self.weight_int, self.weight_scale, self.weight_zero_point, self.axis,
                                       self.quant_min, self.quant_max, self.dtype)
        return LAYER_OPS[self.kind](x, w, self.bias, self.hparams)


# ---------------------------------------------------------------- graph <-> JSON
# Functions a node may call are looked up by qualified name under these roots only.
_ROOTS = {"torch": torch, "operator": operator, "math": math, "_operator": operator}
_BUILTINS = {"getattr": getattr}
_OP_NAMESPACES = ("aten", "prims", "quantized_decomposed")  # torch.ops.* that plain torch provides
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                       torch.int64, torch.int32, torch.int16, torch.int8,
                                                       torch.uint8, torch.bool)}


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    name = fx.node._get_qualified_name(target)
    if name.removeprefix("builtins.") in _BUILTINS and _BUILTINS[name.removeprefix("builtins.")] is target:
        return name.removeprefix("builtins.")
    parts = name.split(".")
    if parts[0] not in _ROOTS or (parts[:2] == ["torch", "ops"] and parts[2] not in _OP_NAMESPACES):
        raise TypeError(f"node target {name} is not a torch/operator/math function")
    return name


def _resolve(name: str):
    if name in _BUILTINS:
        return _BUILTINS[name]
    head, *rest = name.split(".")
    if head not in _ROOTS:
        raise ValueError(f"manifest names a function outside torch/operator/math: {name}")
    if head == "torch" and rest[:1] == ["ops"] and (len(rest) < 2 or rest[1] not in _OP_NAMESPACES):
        raise ValueError(f"manifest names an operator outside {_OP_NAMESPACES}: {name}")
    obj = _ROOTS[head]
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _encode(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (tuple, list)):
        return {"tuple" if isinstance(a, tuple) else "list": [_encode(v) for v in a]}
    if isinstance(a, dict):
        return {"dict": {k: _encode(v) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, slice):
        return {"slice": [_encode(a.start), _encode(a.stop), _encode(a.step)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    raise TypeError(f"cannot serialise node argument {a!r} ({type(a).__name__})")


def _decode(a, env):
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()
    if kind == "node":
        return env[v]
    if kind == "float":
        return float(v)
    if kind in ("tuple", "list"):
        out = [_decode(x, env) for x in v]
        return tuple(out) if kind == "tuple" else out
    if kind == "dict":
        return {k: _decode(x, env) for k, x in v.items()}
    if kind == "dtype":
        return _DTYPES[v]
    if kind == "slice":
        return slice(*(_decode(x, env) for x in v))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "memory_format":
        return getattr(torch, v)
    raise ValueError(f"unknown manifest argument kind {kind!r}")


def module_to_json(m: nn.Module) -> dict:
    """A torch.nn leaf module as {"type", "kwargs"}: its constructor arguments read back from the
    attributes of the same names (checked by rebuilding it and comparing the two reprs)."""
    cls = type(m)
    if getattr(nn, cls.__name__, None) is not cls:
        raise TypeError(f"{cls.__module__}.{cls.__name__} is not a torch.nn module")
    import inspect
    kwargs = {}
    for p in list(inspect.signature(cls.__init__).parameters)[1:]:
        if p == "bias":
            kwargs[p] = getattr(m, "bias", None) is not None
        elif p not in ("device", "dtype") and hasattr(m, p):
            kwargs[p] = _encode(getattr(m, p))
    spec = {"type": cls.__name__, "kwargs": kwargs}
    rebuilt = module_from_json(spec)
    if repr(rebuilt) != repr(m) or {k: v.shape for k, v in rebuilt.state_dict().items()} != \
            {k: v.shape for k, v in m.state_dict().items()}:
        raise TypeError(f"cannot rebuild {m!r} from its attributes (got {rebuilt!r})")
    return spec


def module_from_json(spec: dict) -> nn.Module:
    cls = getattr(nn, spec["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"manifest names a module outside torch.nn: {spec['type']}")
    return cls(**{k: _decode(v, {}) for k, v in spec["kwargs"].items()})


def graph_to_json(graph: fx.Graph) -> list:
    """The nodes of a traced graph (placeholder / get_attr / call_module / call_function / call_method /
    output)."""
    nodes = []
    for n in graph.nodes:
        nodes.append({"name": n.name, "op": n.op, "target": _target_name(n.target),
                      "args": _encode(n.args), "kwargs": _encode(n.kwargs)})
    return nodes


def graph_from_json(nodes: list) -> fx.Graph:
    graph, env = fx.Graph(), {}
    for spec in nodes:
        op, target = spec["op"], spec["target"]
        if op in ("call_function",):
            target = _resolve(target)
        elif op not in ("placeholder", "get_attr", "call_module", "call_method", "output"):
            raise ValueError(f"unsupported node op {op!r} in manifest")
        args, kwargs = _decode(spec["args"], env), _decode(spec["kwargs"], env)
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=spec["name"])
        env[spec["name"]] = node
    graph.lint()
    return graph


# ---------------------------------------------------------------- tensors
_ST_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: str) -> dict:
    """A safetensors file as {name: tensor}; the `safetensors` package when installed, else a
    minimal reader of the format (8-byte little-endian header size, JSON header, raw bytes)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        pass
    else:
        return load_file(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        buf = bytearray(data[start:end])
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def build(manifest: dict, tensors: dict) -> fx.GraphModule:
    """The plain-PyTorch model of an export: its graph over its tensors (buffers), in eval mode."""
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not an acq export manifest (format {manifest.get('format')!r}, expected {FORMAT!r})")
    graph = graph_from_json(manifest["graph"])
    root = {}
    for name, spec in manifest["modules"].items():
        m = module_from_json(spec)
        keys = {k: f"{name}.{k}" for k in m.state_dict()}
        lacking = sorted(v for v in keys.values() if v not in tensors)
        if lacking:
            raise ValueError(f"the tensors file lacks {lacking[:5]}")
        m.load_state_dict({k: tensors[v] for k, v in keys.items()})
        root[name] = m
    needed = {n.target for n in graph.nodes if n.op == "get_attr"}
    missing = sorted(needed - set(tensors))
    if missing:
        raise ValueError(f"the tensors file lacks {missing[:5]}")
    root.update({k: tensors[k] for k in needed})
    return fx.GraphModule(root, graph).eval()


def load(directory: str) -> fx.GraphModule:
    """Rebuild the exported model from DIR/manifest.json and DIR/quantized.safetensors."""
    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    return build(manifest, read_safetensors(os.path.join(directory, TENSORS)))
