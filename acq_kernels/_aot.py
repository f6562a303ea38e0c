"""Ahead-of-time compilation of every Triton kernel for real GPUs, on any machine.

Each kernel family lists `AOT_SPECS` in its `triton_kernels.py`: one `AotSpec` per
specialisation worth checking. `compile_all(arch)` compiles them to PTX/cubin with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and reports what the PTX
says about performance intent (vector width of global loads, local-memory spills, divisions
that a kernel should do once per program rather than per element).

Run as `python -m acq_kernels._aot 90` (JSON on stdout). It must run in a process *without*
TRITON_INTERPRET=1: under the interpreter, @triton.jit returns interpreted functions that
cannot be code-generated. The tests therefore call it in a subprocess.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys

FAMILIES = ("acq_kernels.fake_quant.triton_kernels", "acq_kernels.attention.triton_kernels",
            "acq_kernels.bn_stats.triton_kernels")


@dataclasses.dataclass
class AotSpec:
    name: str                      # unique label, e.g. "fq_per_tensor_fwd[bf16]"
    kernel: object                 # the @triton.jit function
    signature: dict                # arg name -> Triton type ("*fp32", "i32", ...)
    constexprs: dict               # constexpr name -> value
    aligned: tuple = ()            # args with 16-byte-divisible values (pointers, sizes)
    streaming: bool = False        # a bandwidth-bound kernel: must use 128-bit global loads
    num_warps: int = 4
    options: dict = dataclasses.field(default_factory=dict)  # extra compile options, as launched
    # False: the kernel may divide (IEEE div.rn, integer div/rem) only per program, not per
    # element; the PTX then holds at most MAX_SCALAR_DIVS of them. None: not checked.
    per_element_div: bool | None = None


MAX_SCALAR_DIVS = 4  # per-program divisions of a kernel without per-element ones


def _is_128bit(op: str) -> bool:
    return any(t in op for t in (".v4.b32", ".v4.f32", ".v2.b64", ".v4.u32"))


def _loop_ops(ptx: str, prefix: str) -> list:
    """The `prefix` instructions (e.g. ld.global) inside loops: between a label and a later
    branch back to it."""
    lines = ptx.splitlines()
    labels = {}
    body = set()
    for i, line in enumerate(lines):
        m = re.match(r"\s*(\$\w+):", line)
        if m:
            labels[m.group(1)] = i
        m = re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", line)
        if m and m.group(1) in labels:  # a backward branch closes a loop
            body.update(range(labels[m.group(1)], i + 1))
    return [op for i in sorted(body) for op in re.findall(prefix + r"[\w.:]*", lines[i])]


def _analyse(ptx: str) -> dict:
    widths = re.findall(r"ld\.global[\w.:]*", ptx)  # incl. cache hints (L1::evict_first)
    vec = [w for w in widths if ".v4" in w or ".v2" in w]
    loop_loads = _loop_ops(ptx, r"ld\.global")
    return {
        "global_loads": len(widths),
        "vector_loads": len(vec),
        "has_128bit_load": any(_is_128bit(w) for w in widths),
        "has_128bit_store": any(_is_128bit(w) for w in re.findall(r"st\.global[\w.:]*", ptx)),
        # loads in the kernel's loops (its hot path, where it has one) and how many are 128-bit
        "loop_loads": len(loop_loads),
        "loop_128bit_loads": sum(map(_is_128bit, loop_loads)),
        "loop_div_rn": len(_loop_ops(ptx, r"\bdiv\.rn\.f32")),
        "loop_int_div": len(_loop_ops(ptx, r"\b(?:div|rem)\.[su](?:32|64)")),
        "local_memory": bool(re.search(r"\.local\b|ld\.local|st\.local", ptx)),
        "div_rn": len(re.findall(r"\bdiv\.rn\.f32", ptx)),
        "int_div": len(re.findall(r"\b(?:div|rem)\.[su](?:32|64)", ptx)),
    }


def compile_spec(spec: AotSpec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.kernel.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    src = ASTSource(spec.kernel, spec.signature, spec.constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, **spec.options})
    info = _analyse(compiled.asm["ptx"])
    info.update(name=spec.name, arch=arch, streaming=spec.streaming,
                per_element_div=spec.per_element_div, options=dict(spec.options),
                cubin_bytes=len(compiled.asm["cubin"]),
                n_spills=int(getattr(compiled, "n_spills", 0) or 0))
    return info


def all_specs() -> list[AotSpec]:
    specs = []
    for mod in FAMILIES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # family not written yet
                continue
            raise
        specs.extend(getattr(m, "AOT_SPECS", []))
    return specs


def compile_all(arch: int) -> list[dict]:
    return [compile_spec(s, arch) for s in all_specs()]


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    json.dump(compile_all(arch), sys.stdout, indent=1)
