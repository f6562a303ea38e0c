"""Performance intent of the CUDA kernels, checked without a GPU: each csrc/cuda/*.cu file is
compiled to PTX once per test session for sm_90 (ptxas -v on the checked kernels for spills), and the kernels that
must stream at bandwidth are asserted to use 128-bit global loads, to spill nothing to local
memory, and to do no 64-bit integer division inside any loop (a per-element `div.s64` is a
subroutine call of ~70 instructions). Skipped where nvcc or c++filt is missing."""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc")
PTXAS = shutil.which("ptxas")
CXXFILT = shutil.which("c++filt")
pytestmark = pytest.mark.skipif(None in (NVCC, PTXAS, CXXFILT), reason="needs nvcc, ptxas and c++filt")

FILES = ("fake_quant", "attention", "bn_stats", "fake_quant_observe")
# The three element types the 128-bit paths serve, with their elements per 16 bytes.
VEC_TYPES = (("float", 4), ("__half", 8), ("__nv_bfloat16", 8))

_DIV64 = re.compile(r"^\s*(?:@%p\d+\s+)?(?:div|rem)\.[su]64\b")
_LD_V4 = re.compile(r"\bld\.global(?:\.\w+)*?\.v4\.")  # .nc, cache and eviction hints allowed
_ST_V4 = re.compile(r"\bst\.global(?:\.\w+)*?\.v4\.")
_ENTRY = re.compile(r"^(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)\s*\(",
                    re.M)


# Kernels whose ptxas report (spills) is needed: ptxas runs on these entries only, which keeps
# the session's compile to a few seconds per file.
CHECKED = re.compile(r"^void (?:minmax_(?:partial|columns|rows|fq_segment)_kernel|lsq_\w+_kernel|"
                     r"fq_kernel|map_nchw_kernel|map_nhwc_kernel|feat_bwd_kernel)"
                     r"<(?:float|__half|__nv_bfloat16)\b|"
                     r"^void observe_fq_kernel<|"
                     r"^(?:bn_combine_kernel|bn_partial_kernel|bn_backward_kernel|lsq_finish_kernel|per_elem|hoisted)\(")


class Compiled:
    """One .cu file's PTX functions (demangled name -> body) and ptxas spill figures."""

    def __init__(self, ptx: str):
        starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)]
        names = _demangle([name for _, name in starts])
        self.mangled = dict(zip(names, (name for _, name in starts)))
        self.bodies = {}
        for i, (pos, _) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
            self.bodies[names[i]] = ptx[pos:end]
        self.spills = {}  # demangled name -> (stack frame, spill stores, spill loads) bytes

    def read_ptxas_log(self, log: str):
        props = re.findall(r"Function properties for ([\w$]+)\s*\n\s*(\d+) bytes stack frame, "
                           r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        for name, (_, frame, st, ld) in zip(_demangle([p[0] for p in props]), props):
            self.spills[name] = (int(frame), int(st), int(ld))

    def kernel(self, pattern: str):
        """The one kernel whose demangled name matches `pattern` (a regex on its signature)."""
        hits = [n for n in self.bodies if re.search(pattern, n)]
        assert len(hits) == 1, f"{pattern!r} matched {hits}"
        return hits[0]


def _demangle(names):
    if not names:
        return []
    out = subprocess.run([CXXFILT], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return [re.sub(r"acq::cuda::\(anonymous namespace\)::", "", n) for n in out]


def loop_lines(body: str):
    """Lines of `body` inside some loop: between a label and a later branch back to it."""
    lines = body.splitlines()
    labels = {}
    inside = [False] * len(lines)
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__\w+):", line.strip())
        if m:
            # A block that only returns is a shared exit that ptxas may place anywhere: a
            # branch to it is no loop.
            if i + 1 < len(lines) and lines[i + 1].strip() != "ret;":
                labels[m.group(1)] = i
            continue
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and m.group(1) in labels:  # a backward branch closes a loop
            for k in range(labels[m.group(1)], i + 1):
                inside[k] = True
    return [line for line, flag in zip(lines, inside) if flag]


def div64_in_loops(body: str):
    return [line.strip() for line in loop_lines(body) if _DIV64.match(line)]


def _compile(src: str, out_dir: str, arch: int = 90) -> Compiled:
    """nvcc -ptx for sm_<arch>, then ptxas -v on the CHECKED entries."""
    name = os.path.splitext(os.path.basename(src))[0]
    ptx = os.path.join(out_dir, name + ".ptx")
    res = subprocess.run([NVCC, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-ptx", "-I",
                          os.path.join(ROOT, "csrc"), src, "-o", ptx], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    with open(ptx) as f:
        c = Compiled(f.read())
    entries = [m for n, m in c.mangled.items() if CHECKED.search(n)]
    if entries:
        res = subprocess.run([PTXAS, f"-arch=sm_{arch}", "-v", "-e", ",".join(entries), ptx, "-o",
                              os.path.join(out_dir, name + ".cubin")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]
        c.read_ptxas_log(res.stderr)
    return c


@pytest.fixture(scope="session")
def cu(tmp_path_factory):
    """name -> Compiled, the three kernel files compiled in parallel once per session."""
    dirs = {n: str(tmp_path_factory.mktemp(f"ptx_{n}")) for n in FILES}
    with ThreadPoolExecutor(len(FILES)) as pool:
        futs = {n: pool.submit(_compile, os.path.join(ROOT, "csrc", "cuda", n + ".cu"), dirs[n])
                for n in FILES}
        return {n: f.result() for n, f in futs.items()}


def assert_streams(c: Compiled, pattern: str, loads: int = 1, stores: int = 0):
    """The kernel has >= `loads` 128-bit global loads (and `stores` stores), no spills and no
    64-bit integer division inside a loop."""
    name = c.kernel(pattern)
    body = c.bodies[name]
    assert len(_LD_V4.findall(body)) >= loads, f"{name}: fewer than {loads} 128-bit loads"
    assert len(_ST_V4.findall(body)) >= stores, f"{name}: fewer than {stores} 128-bit stores"
    assert_lean(c, name)


def assert_lean(c: Compiled, name: str):
    assert name in c.spills, f"{name}: no ptxas report"
    assert c.spills[name] == (0, 0, 0), f"{name}: stack/spills {c.spills[name]}"
    bad = div64_in_loops(c.bodies[name])
    assert not bad, f"{name}: 64-bit integer division in a loop: {bad[:3]}"


def test_detector_flags_a_per_element_64_bit_division(tmp_path):
    """The loop scan sees what the old per-channel observer did (j / inner on int64 per
    element), and a division hoisted before the loop passes."""
    src = tmp_path / "probe.cu"
    src.write_text("""
__global__ void per_elem(const float* x, float* y, long n, long inner) {
  for (long j = threadIdx.x; j < n; j += blockDim.x) y[j] = x[(j / inner) * 3];
}
__global__ void hoisted(const float* x, float* y, long n, long inner) {
  const long q = n / inner;
  for (long j = threadIdx.x; j < n; j += blockDim.x) y[j] = x[j] * q;
}
""")
    c = _compile(str(src), str(tmp_path))
    assert div64_in_loops(c.bodies[c.kernel(r"^per_elem")])
    assert not div64_in_loops(c.bodies[c.kernel(r"^hoisted")])


def _streaming_cases():
    """(file, kernel, 128-bit loads, 128-bit stores, its scalar twin or None): signatures with
    {t} / {v} for the element type and its elements per 16 bytes."""
    cases = [("fake_quant", "minmax_partial_kernel<{t}, {v}>", 1, 0, "minmax_partial_kernel<{t}, 1>"),
             # Channels innermost: threads across channels; runs: loads along each run.
             ("fake_quant", "minmax_columns_kernel<{t}, {v}, false>", 1, 0,
              "minmax_columns_kernel<{t}, 1, false>"),
             ("fake_quant", "minmax_rows_kernel<{t}, {v}>", 1, 0, "minmax_rows_kernel<{t}, 1>"),
             # Contiguous per-channel segments: the min/max pass (four loads in flight) and the
             # fake quant (load + store) both 128-bit.
             ("fake_quant", "minmax_fq_segment_kernel<{t}, {v}>", 5, 1,
              "minmax_fq_segment_kernel<{t}, 1>"),
             # Fake quant: per tensor, per channel over runs, and with the channels innermost
             # (Cols: channels_last activations), for int and float zero points.
             ("fake_quant", "fq_kernel<{t}, {v}, false, false, false>", 1, 1,
              "fq_kernel<{t}, 1, false, false, false>")]
    for zp in ("false", "true"):
        cases += [("fake_quant", f"fq_kernel<{{t}}, {{v}}, true, {zp}, false>", 1, 1,
                   f"fq_kernel<{{t}}, 1, true, {zp}, false>"),
                  ("fake_quant", f"fq_kernel<{{t}}, {{v}}, true, {zp}, true>", 1, 1, None)]
    # LSQ backward: grad and x read, dx written, on every layout.
    cases += [("fake_quant", f"{k}<{{t}}, {{v}}>", 2, 1, f"{k}<{{t}}, 1>")
              for k in ("lsq_flat_kernel", "lsq_columns_kernel", "lsq_rows_kernel")]
    for square in ("true", "false"):
        # Attention maps: four independent loads per loop trip in both layouts.
        cases += [("attention", f"{k}<{{t}}, {square}, {{v}}>", 4, 0, f"{k}<{{t}}, {square}, 1>")
                  for k in ("map_nchw_kernel", "map_nhwc_kernel")]
        # Feature backward: loads of f, stores of df; index divisions per vector (32-bit).
        cases += [("attention", f"feat_bwd_kernel<{{t}}, {square}, {cl}, unsigned int, {{v}}>", 1, 1,
                   None) for cl in ("false", "true")]
    return cases


@pytest.mark.parametrize("t,v", VEC_TYPES)
@pytest.mark.parametrize("case", _streaming_cases(), ids=lambda c: c[1].replace("{t}, ", "").replace("{v}", "V"))
def test_kernel_streams(cu, case, t, v):
    """128-bit loads (and stores), no spills and no 64-bit division in a loop; the scalar
    twin (unaligned or odd sizes) is lean as well."""
    f, kernel, loads, stores, scalar = case
    c = cu[f]
    assert_streams(c, r"\b" + re.escape(kernel.format(t=t, v=v)), loads=loads, stores=stores)
    if scalar is not None:
        assert_lean(c, c.kernel(r"\b" + re.escape(scalar.format(t=t, v=v))))


def test_per_channel_minmax_finish_is_lean(cu):
    c = cu["fake_quant"]
    assert_lean(c, c.kernel(r"minmax_columns_kernel<float, 1, true>"))  # the finishing pass
    assert not any("minmax_channel_kernel" in n for n in c.bodies)  # the strided one is gone
    assert_lean(c, c.kernel(r"lsq_finish_kernel"))


@pytest.mark.parametrize("kernel,stores", (("bn_partial_kernel", 0), ("bn_backward_kernel", 6)))
def test_bn_stats_streams(cu, kernel, stores):
    """Both walks (channels-inner rows, generic per channel) have a 128-bit path per element
    type (dispatched per tile at run time), with no spills and no division in any loop."""
    assert_streams(cu["bn_stats"], rf"^{kernel}\(", loads=6, stores=stores)


def test_bn_combine_is_lean(cu):
    c = cu["bn_stats"]
    name = c.kernel(r"bn_combine_kernel")
    assert_lean(c, name)
    assert "bar.sync" in c.bodies[name]  # the tree over partial rows


# --- fq_observe_forward: observer + qparams + fake quant in one launch ----------------------

OBSERVE_SRC = os.path.join(ROOT, "csrc", "cuda", "fake_quant_observe.cu")


@pytest.fixture(scope="session")
def observe_sm80(tmp_path_factory):
    """fake_quant_observe.cu for sm_80 (the other supported architecture of the wheel)."""
    return _compile(OBSERVE_SRC, str(tmp_path_factory.mktemp("ptx_observe_80")), arch=80)


def _observe_variants(c: Compiled):
    return [n for n in c.bodies if n.startswith("void observe_fq_kernel<")]


@pytest.mark.parametrize("arch", [80, 90])
def test_observe_kernel_has_every_variant_lean(cu, observe_sm80, arch):
    """One kernel per (dtype, vector width, per-channel): all spill-free, no 64-bit division
    in any loop (channels follow cursors), on sm_80 and sm_90."""
    c = cu["fake_quant_observe"] if arch == 90 else observe_sm80
    names = _observe_variants(c)
    want = [f"{t}, {v}, {pc}" for t, v in VEC_TYPES + (("double", 1),) for pc in ("false", "true")]
    want += [f"{t}, 1, {pc}" for t, _ in VEC_TYPES for pc in ("false", "true")]
    for w in want:
        assert any(f"observe_fq_kernel<{w}>" in n for n in names), (w, names)
    assert not any("observe_fq_kernel<double, 2" in n for n in names)  # float64 stays scalar
    for name in names:
        assert_lean(c, name)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("t,v", VEC_TYPES)
@pytest.mark.parametrize("per_channel", ["false", "true"])
def test_observe_kernel_streams_in_its_loops(cu, observe_sm80, arch, t, v, per_channel):
    """128-bit loads inside loops (the min/max pass and the fake-quant pass) and 128-bit
    stores of out; per tensor the min/max pass keeps four loads in flight."""
    c = cu["fake_quant_observe"] if arch == 90 else observe_sm80
    name = c.kernel(rf"observe_fq_kernel<{t}, {v}, {per_channel}>")
    loops = "\n".join(loop_lines(c.bodies[name]))
    want_loads = 5 if per_channel == "false" else 3  # 4 + 1; columns 2 + runs 1 (+ fq 1)
    assert len(_LD_V4.findall(loops)) >= want_loads, name
    assert len(_ST_V4.findall(loops)) >= 1, name


def test_observe_kernel_has_the_grid_barrier(cu, observe_sm80):
    """Between the phases: cooperative_groups' grid sync (an arrive on a gpu-scope counter
    with release semantics, then an acquire spin) besides the block barriers."""
    for c in (cu["fake_quant_observe"], observe_sm80):
        for name in _observe_variants(c):
            body = c.bodies[name]
            assert re.search(r"\batom\.add\.release\.gpu\.", body), name
            assert re.search(r"\bld\.acquire\.gpu\.", body), name
            assert re.search(r"\bbar(?:rier)?\.sync\b", body), name


def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*", "", src)


def test_observe_launch_is_one_cooperative_capturable_launch():
    """The launcher has one launch site, cooperative when the grid has several blocks (so
    co-residency is guaranteed or the launch is refused, then retried on one block; a
    cooperative kernel is a valid graph node), and nothing host-visible: no synchronisation,
    no copies, no memsets, no host allocation (the workspace comes from torch's caching
    allocator in the op)."""
    src = _strip_comments(open(OBSERVE_SRC).read())
    assert src.count("cudaLaunchKernelEx(") == 1
    assert "cudaErrorCooperativeLaunchTooLarge" in src
    assert "<<<" not in src
    assert "cudaLaunchAttributeCooperative" in src
    for bad in ("Synchronize", "cudaMemcpy", "cudaMemset", "cudaMalloc", "cudaHostAlloc",
                "cudaStreamWait", "cudaEventSynchronize"):
        assert bad not in src, bad
    ops_src = _strip_comments(open(os.path.join(ROOT, "csrc", "ops", "fake_quant.cpp")).read())
    body = ops_src[ops_src.index("fq_observe_forward_cuda("):]
    body = body[:body.index("\n}\n")]
    for bad in (".item", ".cpu()", "Synchronize", "to(at::kCPU", "copy_", "fill_", "zero_("):
        assert bad not in body, bad
    assert "CUDAGuard" in body and "check_observe_args" in body
