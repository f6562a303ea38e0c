"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) on this CPU-only machine, and its
PTX carries the performance intent: 128-bit global loads in streaming kernels (at odd sizes for
the fake-quant family, 7x7 and 14x14 attention maps, channel counts that are not 16-divisible),
inside the hot loop where the kernel has one; no spills; no per-element divisions where a
per-program one does."""
import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"sm_{a}")
def compiled(request):
    # Under TRITON_INTERPRET=1 @triton.jit yields interpreted functions that cannot be
    # code-generated, so compile in a clean subprocess.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "acq_kernels._aot", str(request.param)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return request.param, json.loads(proc.stdout)


def test_every_kernel_compiles(compiled):
    arch, results = compiled
    from acq_kernels._aot import all_specs
    assert {r["name"] for r in results} == {s.name for s in all_specs()}
    for r in results:
        assert r["cubin_bytes"] > 0, r


def test_streaming_kernels_use_128bit_loads(compiled):
    arch, results = compiled
    bad = [r["name"] for r in results if r["streaming"] and not r["has_128bit_load"]]
    assert not bad, f"sm_{arch}: streaming kernels without 128-bit global loads: {bad}"


def test_no_local_memory_spills(compiled):
    arch, results = compiled
    bad = [(r["name"], r["n_spills"]) for r in results if r["local_memory"] or r["n_spills"]]
    assert not bad, f"sm_{arch}: kernels using local memory / spilling: {bad}"


def test_no_per_element_divisions(compiled):
    """Kernels marked per_element_div=False (per-tensor and two-channel fake-quant blocks)
    divide only per program: 1/scale and the channel index once, not per element."""
    from acq_kernels._aot import MAX_SCALAR_DIVS
    arch, results = compiled
    checked = [r for r in results if r["per_element_div"] is False]
    assert checked
    # the check needs teeth: the per-element gather variant does divide per element. Older
    # Triton (3.3) spells the IEEE division without div.rn.f32, so the count proves nothing there.
    gather = [r for r in results if r["per_element_div"] is True]
    assert gather
    if not all(r["div_rn"] > MAX_SCALAR_DIVS for r in gather):
        import triton
        pytest.skip(f"Triton {triton.__version__} emits no div.rn.f32 for tl.math.div_rn: cannot count divisions")
    bad = [(r["name"], r["div_rn"], r["int_div"]) for r in checked
           if r["div_rn"] > MAX_SCALAR_DIVS or r["int_div"] > MAX_SCALAR_DIVS]
    assert not bad, f"sm_{arch}: per-element divisions (name, div.rn, int div/rem): {bad}"


def test_fake_quant_streaming_specs_claim_no_aligned_sizes():
    """The fake-quant streaming specs compile with sizes of unknown divisibility (odd numel,
    channel stride, row length), so their 128-bit loads hold for odd shapes too, not only for
    16-divisible ones (Triton specialises a size divisible by 16 at launch). [rows, channels]
    and [rows, run] tiles get aligned rows from a row length passed in units of VEC (72
    channels, a run of 196), as the launchers pass it."""
    from acq_kernels._aot import all_specs
    for s in all_specs():
        if s.streaming and s.name.startswith(("fq_", "minmax_")):
            sizes = [a for a in s.aligned if not s.signature[a].startswith("*")]
            assert not sizes, (s.name, sizes)


def _by_name(results, prefix):
    return {r["name"]: r for r in results if r["name"].startswith(prefix)}


def test_odd_attention_maps_keep_128bit_loads_in_the_hot_loop(compiled):
    """NCHW maps whose H*W is not a whole number of 16-byte vectors (7x7 in every dtype,
    14x14 in 16-bit) go to the plane kernels: every load of F in the forward's channel loop is
    128-bit (ld.global.v4.b32: 4 fp32 or 8 bf16/fp16), and the backward's tiles load and
    store 128-bit. The channel-tile kernel at 7x7 (kept for maps whose samples start
    unaligned) is scalar: the evidence that the plane view is what vectorises."""
    arch, results = compiled
    fwd = _by_name(results, "attn_map_plane[")
    bwd = _by_name(results, "attn_feat_grad_plane[")
    for shape in ("fp32,7x7", "bf16,7x7", "fp16,7x7,p", "bf16,14x14", "fp16,14x14"):
        r = fwd[f"attn_map_plane[{shape}]"]
        assert r["loop_loads"] and r["loop_128bit_loads"] == r["loop_loads"], (arch, r)
        r = bwd[f"attn_feat_grad_plane[{shape}]"]
        assert r["has_128bit_load"] and r["has_128bit_store"], (arch, r)
    # channel-tile kernels with sizes in units of VEC: 14x14 fp32 NCHW, 72 channels nhwc
    for name in ("attn_map_fwd[fp32,nchw,14x14]", "attn_map_fwd[fp32,nhwc,C72]",
                 "attn_map_fwd[bf16,nhwc,C72]"):
        r = _by_name(results, name)[name]
        assert r["loop_loads"] and r["loop_128bit_loads"] == r["loop_loads"], (arch, r)
    for name in ("attn_feat_grad[fp32,nhwc,C72]", "attn_feat_grad[bf16,nhwc,C72]"):
        r = _by_name(results, name)[name]
        assert r["has_128bit_load"] and r["has_128bit_store"], (arch, r)
    scalar = _by_name(results, "attn_map_fwd_fused[fp32,nchw,p]")["attn_map_fwd_fused[fp32,nchw,p]"]
    assert scalar["loop_loads"] and not scalar["loop_128bit_loads"], (arch, scalar)


def test_per_channel_plane_kernels_do_not_divide_per_element(compiled):
    """Per-channel LSQ backward and the min/max partials of a channel that is not one
    contiguous range (NCHW axis 1) walk [rows, run] tiles of each channel: no integer divide
    or modulo and no IEEE division inside their loops (1/scale and the program split once per
    program), and 128-bit loads in the loop where the run is a whole number of vectors (14x14
    fp32, 28x28 bf16 -- sizes not declared 16-divisible) or G channels' runs are (7x7: the
    channel-group kernels). The [rows, run] kernels at a run of 49 stay scalar (odd_run)."""
    arch, results = compiled
    for prefix in ("fq_lsq_backward[", "minmax_channel_partials[", "fq_lsq_backward_cinner[",
                   "minmax_cinner_partials[", "fq_lsq_backward_grouped[",
                   "minmax_grouped_partials["):
        rs = _by_name(results, prefix)
        assert rs, prefix
        for r in rs.values():
            assert r["loop_loads"], r
            assert not r["loop_int_div"] and not r["loop_div_rn"], (arch, r)
            if "odd_run" not in r["name"]:
                assert r["loop_128bit_loads"], (arch, r)
