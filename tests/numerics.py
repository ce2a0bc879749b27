"""The numerical contract of SPEC §3.4 as assertions, and the backend × device matrix.

* fp64 and fp32: max |out - ref| <= tol · max|ref| with the fp64 reference, tol 1e-4 for fp32.
* fp16 and bf16 (flash-attention's rule): max |out - ref64| <= 2 · max |ref_lowp - ref64| + atol,
  where ref_lowp is the reference computed in that same low precision and atol is half an ulp
  at the output's scale (the rounding of the output itself).
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import HAS_TRITON

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _scale(ref: torch.Tensor) -> float:
    return ref.abs().max().item() if ref.numel() else 1.0


def assert_close(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                 what: str = "output") -> None:
    """out (any dtype) against the fp64 reference; ref_lowp is required for fp16/bf16."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all() or not torch.isfinite(ref64).all(), f"{what}: non-finite values"
    if out.numel() == 0:
        return
    scale = max(_scale(ref64), 1e-12)
    err = (out.double() - ref64.double()).abs().max().item()
    if out.dtype in TOLERANCE:
        bound = TOLERANCE[out.dtype] * scale
    else:
        assert ref_lowp is not None, f"{what}: a {out.dtype} check needs the low-precision reference"
        ref_err = (ref_lowp.double() - ref64.double()).abs().max().item()
        bound = 2 * ref_err + 0.5 * torch.finfo(out.dtype).eps * scale
    assert err <= bound, f"{what} ({out.dtype}): max abs error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})"


def _triton_interpreter_ready() -> bool:
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


needs_cuda = pytest.mark.needs_cuda
needs_triton_cpu = pytest.mark.skipif(
    not _triton_interpreter_ready(),
    reason="Triton on CPU tensors needs triton and TRITON_INTERPRET=1 (set by conftest without a GPU)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (backend, device) pairs every kernel backend is tested on; the reference is the oracle.
KERNEL_BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=needs_triton_cpu),
    pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[needs_cuda, needs_triton]),
]


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck with every test utility; raises on the first failure."""
    torch.library.opcheck(op, args, kwargs or {})
