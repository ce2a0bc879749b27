"""Checks on the sm_90 SASS of the criss-cross attention CUDA kernels, without a GPU.

The machine code of the built extension (armnet_ops/_C*.so, built with FORCE_CUDA=1
TORCH_CUDA_ARCH_LIST=9.0 in CI) is read with cuobjdump (shipped in the triton wheel, or the CUDA
toolkit's) and three properties of the hot kernels are asserted, each one protecting a design
decision of csrc/cuda/cca_kernels.cuh that a harmless-looking edit could undo silently (the host
emulation checks results, not speed):

* no local memory (LDL / STL) in the hot kernels: a spill, or an array the compiler could not
  keep in registers, puts a round trip to memory inside the tile loops;
* tensor cores (HMMA, or HGMMA for wgmma) in every fp16 / bf16 tiled kernel: the WmmaPolicy path
  must not fall back to the scalar FMA policy (as it does, by design, for pre-sm_80 bf16);
* 16-byte operand loads: every q / k / v / dO operand tile of the tiled kernels is moved by
  cp.async of 16 bytes (LDGSTS.E[.BYPASS].128), the path that reads a pixel's channel vector
  contiguously in the column pass as well as in the row pass (one kernel serves both passes:
  they differ only in the LinePass strides). Precisely: each hot kernel has LDGSTS .128
  instructions and no narrower LDGSTS. (The scalar fallback for channel counts that are not a
  multiple of 16 bytes, the per-pixel statistics and the partial sums are plain LDG and are not
  operand tiles.)

Hot kernels: cca_fwd_line_kernel (the forward where a line fits in shared memory), cca_lse_kernel
and cca_pv_kernel (the forward's fallback for long lines; pv also gives dv) and cca_grad_kernel,
for fp16, bf16 and fp32. The fp64 instantiations exist for gradcheck and are only held to the
load check.

Skips, with the reason, when the extension is not built, was built without CUDA (CPU_ONLY), has no
sm_90 code, or no cuobjdump is found; with FORCE_CUDA=1 in the environment (the CI job that builds
the CUDA objects) those are failures instead. ARMNET_OPS_SASS_BINARY names another binary to read
(an object compiled from csrc/cuda/cca.cu alone, say).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCED = os.environ.get("FORCE_CUDA") == "1"

# Kernel family and dtype from substrings of the Itanium-mangled names (no demangler needed):
# cca_cuda::cca_pv_kernel<WmmaPolicy<__nv_bfloat16, float>, ...> mangles to
# "..cca_cuda13cca_pv_kernelINS0_10WmmaPolicyI13__nv_bfloat16fEE..".
FAMILIES = ("cca_fwd_line_kernel", "cca_lse_kernel", "cca_pv_kernel", "cca_grad_kernel")
DTYPES = {"WmmaPolicyI13__nv_bfloat16f": "bf16", "WmmaPolicyI6__halff": "fp16",
          "FmaPolicyIff": "fp32", "FmaPolicyIdd": "fp64"}
HOT_DTYPES = ("fp16", "bf16", "fp32")


def _unavailable(reason: str):
    if FORCED:
        pytest.fail(f"FORCE_CUDA=1 but the SASS checks cannot run: {reason}")
    pytest.skip(reason)


def _cuobjdump() -> str | None:
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _binary() -> str:
    override = os.environ.get("ARMNET_OPS_SASS_BINARY")
    if override:
        return override
    # This tree's extension (an editable install or an in-place build), else the one a regular
    # install put in site-packages, found without importing it.
    found = sorted(glob.glob(os.path.join(ROOT, "armnet_ops", "_C*.so")))
    if found:
        return found[0]
    try:
        spec = importlib.util.find_spec("armnet_ops._C")
    except ImportError:
        spec = None
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        _unavailable("the extension armnet_ops._C is not built (no armnet_ops/_C*.so)")
    return spec.origin


def parse_sass(text: str) -> dict[str, list[str]]:
    """{mangled function name: its SASS instruction lines} from cuobjdump -sass output."""
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
        elif current is not None and re.search(r"/\*[0-9a-f]{4,}\*/", line):
            current.append(line)
    return functions


def classify(name: str) -> tuple[str, str] | None:
    """(family, dtype) of a tiled criss-cross kernel, None for any other function."""
    family = next((f for f in FAMILIES if f in name), None)
    dtype = next((d for key, d in DTYPES.items() if key in name), None)
    if family is None or dtype is None or "cca_cuda" not in name:
        return None
    return family, dtype


def opcodes(lines: list[str]) -> list[str]:
    """The opcode (with modifiers) of each instruction line, predicates stripped."""
    out = []
    for line in lines:
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            out.append(m.group(1))
    return out


@pytest.fixture(scope="module")
def kernels() -> dict[tuple[str, str], list[str]]:
    tool = _cuobjdump()
    if tool is None:
        _unavailable("cuobjdump not found (neither in the triton wheel nor on PATH)")
    binary = _binary()
    res = subprocess.run([tool, "-sass", "-arch", "sm_90", binary], capture_output=True,
                         text=True)
    if res.returncode != 0 or "Function :" not in res.stdout:
        _unavailable(f"{os.path.basename(binary)} has no sm_90 device code (built without CUDA, "
                     f"e.g. CPU_ONLY=1, or for other architectures): "
                     f"{(res.stderr or res.stdout).strip()[:300]}")
    found: dict[tuple[str, str], list[str]] = {}
    for name, lines in parse_sass(res.stdout).items():
        key = classify(name)
        if key is not None:
            found.setdefault(key, []).extend(opcodes(lines))
    if not found:
        _unavailable(f"{os.path.basename(binary)} has sm_90 code but no criss-cross kernels")
    return found


def test_every_tiled_kernel_is_present(kernels):
    """All four families in all four dtypes: a missing one would make the other checks vacuous."""
    missing = [(f, d) for f in FAMILIES for d in DTYPES.values() if (f, d) not in kernels]
    assert not missing, f"tiled criss-cross kernels missing from the SASS: {missing}"


@pytest.mark.parametrize("dtype", HOT_DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_local_memory(kernels, family, dtype):
    ops = kernels[(family, dtype)]
    local = sorted({op for op in ops if op.startswith(("LDL", "STL"))})
    assert not local, (f"{family} {dtype} uses local memory ({local}: register spills or a "
                       "local array) inside its tile loops")


@pytest.mark.parametrize("dtype", ("fp16", "bf16"))
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_cores(kernels, family, dtype):
    ops = kernels[(family, dtype)]
    mma = [op for op in ops if op.startswith(("HMMA", "HGMMA"))]
    assert mma, f"{family} {dtype} has no tensor-core instruction (HMMA/HGMMA)"


@pytest.mark.parametrize("dtype", tuple(DTYPES.values()))
@pytest.mark.parametrize("family", FAMILIES)
def test_operand_tiles_are_16_byte_async_copies(kernels, family, dtype):
    ops = kernels[(family, dtype)]
    async_copies = [op for op in ops if op.startswith("LDGSTS")]
    wide = [op for op in async_copies if op.endswith(".128")]
    narrow = sorted({op for op in async_copies if not op.endswith(".128")})
    assert wide, f"{family} {dtype}: no 16-byte cp.async (LDGSTS .128) operand loads"
    assert not narrow, f"{family} {dtype}: cp.async narrower than 16 bytes: {narrow}"


def test_parsers_on_a_sample():
    """The parsing itself, on a hand-written excerpt in cuobjdump's format (runs everywhere)."""
    sample = """
        Function : _ZN10armnet_ops8cca_cuda13cca_pv_kernelINS0_10WmmaPolicyI6__halffEENS0_5TilesILi128ELi64ELi32EEES3_fLb0EEEvNS0_4ArgsIT1_T2_EENS0_8LinePassEb
        /*0000*/                   LDC R1, c[0x0][0x28] ;        /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;  /* 0x0000000002057fae */
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;  /* 0x0000000c0804723c */
        /*0030*/                   STL [R1], R4 ;                /* 0x0000000401007387 */
        Function : _ZN10armnet_ops44_GLOBAL__N__cca_cu17cca_energy_kernelIffEEvPKT_S4_PS2_liii
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;  /* 0x0000000402027981 */
    """
    funcs = parse_sass(sample)
    assert len(funcs) == 2
    (pv_name, pv_lines), (other, _) = funcs.items()
    assert classify(pv_name) == ("cca_pv_kernel", "fp16")
    assert classify(other) is None
    assert opcodes(pv_lines) == ["LDC", "LDGSTS.E.BYPASS.128", "HMMA.16816.F32", "STL"]
