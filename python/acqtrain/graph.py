"""torch.fx plumbing shared by the quantizer and the trainer: tracing with a clear error, shape
propagation on a dummy input, the attention layers S found from the graph, and tap points.

Everything here works on a `torch.fx.GraphModule` whose submodules are the traced model's own
objects (no copies), so a traced teacher shares its parameters with the user's model.
"""
from __future__ import annotations

import contextlib
import io

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import AcqError


class _Tracer(fx.Tracer):
    """torch.fx's tracer plus user leaf types, remembering which module a failure happened in."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_types = tuple(leaf_modules)
        self.path: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.path)
            raise
        finally:
            self.path.pop()


def trace(model: nn.Module, leaf_modules=()) -> fx.GraphModule:
    """symbolic_trace(model) as a GraphModule, or an AcqError naming the untraceable module."""
    tracer = _Tracer(leaf_modules)
    try:
        g = tracer.trace(model)
    except Exception as exc:
        where = " > ".join(f"{p} ({type(model.get_submodule(p)).__name__})" for p in tracer.failed_in or [])
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AcqError(
            f"torch.fx cannot trace {type(model).__name__}" + (f" inside {where}" if where else "")
            + f": {type(exc).__name__}: {msg}. The quantizer needs a traceable model: make that forward's "
            "control flow independent of tensor values, or pass its module type in leaf_modules=(...) "
            "if it holds no weight layers or activations") from None
    return fx.GraphModule(tracer.root, g, type(model).__name__)


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, input_shape, device=None) -> None:
    """Run gm once on zeros of `input_shape` ([N, C, H, W]); every node gets meta['tensor_meta'].

    Zeros (not random numbers) leave the global RNG untouched; the modules run in eval mode, so no
    BN running statistics change."""
    p = next(iter(gm.parameters()), None)
    device = device if device is not None else (p.device if p is not None else "cpu")
    x = torch.zeros(tuple(input_shape), device=device)
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback it re-raises
            ShapeProp(gm).propagate(x)
    except Exception as exc:
        raise AcqError(f"the model does not run on an input of shape {list(input_shape)} "
                       f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                       "set image_size / in_channels (--image-size, --in-channels) to the model's input") from None
    finally:
        for m, t in modes:
            m.training = t


def _spatial(node: fx.Node):
    """(H, W) of a node's [N, C, H, W] float output, else None."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata) and len(meta.shape) == 4 and meta.dtype.is_floating_point:
        return tuple(meta.shape[2:])
    return None


def stage_outputs(gm: fx.GraphModule, weight_types) -> list[str]:
    """Default attention layers: per spatial resolution, the last node producing a map of that size
    (the last feature map before each change of resolution, the final one included), for
    resolutions with at least two weight layers (a one-conv stem is not a stage) and more than one
    pixel (pooled vectors, squeeze-excitation gates). Needs propagate_shapes first."""
    modules = dict(gm.named_modules())
    last, convs, order = {}, {}, {}
    for i, node in enumerate(gm.graph.nodes):
        size = _spatial(node)
        if size is None or size[0] * size[1] <= 1:
            continue
        last[size] = node.name
        order[size] = i
        if node.op == "call_module" and isinstance(modules[node.target], weight_types):
            convs[size] = convs.get(size, 0) + 1
    sizes = sorted((s for s in last if convs.get(s, 0) >= 2), key=order.get)
    if not sizes:
        raise AcqError(f"{type(gm).__name__}: found no stages (feature maps [N, C, H, W] with two or more "
                       "weight layers) to take attention maps from; name them with attention_layers "
                       "(--attention-layers NAME,NAME)")
    return [last[s] for s in sizes]


def _module_paths(node: fx.Node) -> set:
    paths = {node.target} if node.op == "call_module" else set()
    for k, v in (node.meta.get("nn_module_stack") or {}).items():
        paths.add(v[0] if isinstance(v, tuple) else k)  # torch < 2.1: {path: type}
    return paths


def named_outputs(gm: fx.GraphModule, names) -> list[str]:
    """The output node of each named module (qualified name, e.g. `layer2` or `features.6`) or the
    node of that name; a module called more than once is ambiguous and refused."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    out = []
    for name in names:
        if name in by_name:
            out.append(name)
            continue
        calls = [n for n in nodes if n.op == "call_module" and n.target == name]
        if len(calls) > 1:
            raise AcqError(f"attention layer {name!r} is called {len(calls)} times in the forward; name a module "
                           f"called once (or a graph node: {', '.join(c.name for c in calls)})")
        inside = [n for n in nodes if any(p == name or str(p).startswith(name + ".") for p in _module_paths(n))]
        if not inside:
            raise AcqError(f"attention layer {name!r} is not a module the forward calls (e.g. "
                           f"{', '.join(stage_names_hint(gm))})")
        out.append(inside[-1].name)
    for name in out:
        if by_name[name].meta.get("tensor_meta") is not None and _spatial(by_name[name]) is None:
            raise AcqError(f"attention layer {name!r} does not output a [N, C, H, W] feature map")
    return out


def stage_names_hint(gm: fx.GraphModule) -> list[str]:
    return [n for n, _ in gm.named_children()][:6]


class TapPoint(nn.Identity):
    """Marks a feature map in a traced graph: FeatureTap hooks these (one call per forward)."""


def insert_taps(gm: fx.GraphModule, node_names, after=None) -> list[TapPoint]:
    """Insert a TapPoint after each named node (or after after(node), e.g. its quantizer) and
    route the node's later users through it; returns the tap points in order."""
    by_name = {n.name: n for n in gm.graph.nodes}
    points = []
    for i, name in enumerate(node_names):
        node = by_name[name]
        if after is not None:
            node = after(node)
        point = TapPoint()
        attr = f"acq_tap_{i}"
        gm.add_submodule(attr, point)
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_module(attr, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda u: u is not tap)
        points.append(point)
    gm.recompile()
    return points
