"""The public API around the kernels: backend selection (SPEC §2), bad input (SPEC §3.5), the
info command, and importing without the built extension."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import armnet_ops
from armnet_ops import _backend
from armnet_ops.carafe import SPEC as CARAFE_SPEC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(N=1, C=2, Cv=3, H=4, W=5, dtype=torch.float32):
    return (torch.randn(N, C, H, W, dtype=dtype), torch.randn(N, C, H, W, dtype=dtype),
            torch.randn(N, Cv, H, W, dtype=dtype))


# ---- backend selection ------------------------------------------------------------------------

def test_auto_on_cpu_picks_the_cpu_kernel_when_built_else_the_reference():
    cpu_ok = _backend.availability(CARAFE_SPEC, "cpu", torch.device("cpu"))[0]
    expected = "cpu" if cpu_ok else "reference"
    assert _backend.resolve(CARAFE_SPEC, "auto", torch.device("cpu"), torch.float32) == expected
    # The CPU kernels are fp32/fp64; other dtypes go to the reference.
    assert _backend.resolve(CARAFE_SPEC, "auto", torch.device("cpu"), torch.bfloat16) == "reference"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        armnet_ops.criss_cross_attention(*_qkv(), backend="fastest")


def test_asked_for_backend_that_cannot_run_says_why_and_how_to_build():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available.*CUDA tensors"):
        armnet_ops.carafe(torch.randn(1, 2, 3, 3), torch.randn(1, 9, 6, 6), 3, 1, 2, backend="cuda")


@pytest.mark.skipif(_backend.EXTENSION_ERROR is not None, reason="needs the built extension")
def test_asked_for_dtype_the_backend_lacks_is_an_error_not_a_fallback():
    with pytest.raises(TypeError, match="supports dtypes"):
        armnet_ops.carafe(torch.randn(1, 2, 3, 3, dtype=torch.float16),
                          torch.randn(1, 9, 6, 6, dtype=torch.float16), 3, 1, 2, backend="cpu")


def test_available_backends_lists_the_reference_everywhere():
    for op in ("criss_cross_attention", "cca_weight", "cca_map", "carafe", "carafe_fused",
               "directional_conv2d"):
        assert "reference" in armnet_ops.available_backends(op, "cpu")
    with pytest.raises(ValueError, match="argument 'op'"):
        armnet_ops.available_backends("conv")


def test_info_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "armnet_ops.info"], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout
    assert f"torch   {torch.__version__}" in out
    for op in ("criss_cross_attention", "carafe_fused", "directional_conv2d"):
        assert op in out
    assert "reference  yes" in out


def test_import_without_the_extension_warns_once_and_runs_the_reference(tmp_path):
    pkg = tmp_path / "armnet_ops"
    shutil.copytree(os.path.join(ROOT, "armnet_ops"), pkg,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import armnet_ops\n"
            "print(sum('not built' in str(x.message) for x in w))\n"
            "q = torch.randn(1, 2, 3, 3)\n"
            "print(armnet_ops.criss_cross_attention(q, q, q).shape)\n"
            "print(armnet_ops.available_backends('carafe'))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "1"
    assert lines[1] == "torch.Size([1, 2, 3, 3])"
    assert "'cpu'" not in lines[2]


# ---- bad input (SPEC §3.5), on every public op --------------------------------------------------

BAD_CCA = [
    (lambda q, k, v: (q[0], k, v), "argument 'q' must be 4-D"),
    (lambda q, k, v: (q, k[:, :, :3], v), "argument 'k' must have the shape of 'q'"),
    (lambda q, k, v: (q, k, v[:, :, :, :2]), "argument 'v' must have W = 5"),
    (lambda q, k, v: (q, k, torch.cat([v, v])), "argument 'v' must have N = 1"),
    (lambda q, k, v: (q, k.double(), v), "argument 'k' must have the dtype of 'q'"),
    (lambda q, k, v: (q, k, v.long()), "argument 'v' must be a floating-point"),
]


@pytest.mark.parametrize("mutate,message", BAD_CCA)
def test_criss_cross_attention_bad_input(mutate, message):
    with pytest.raises((ValueError, TypeError), match=message):
        armnet_ops.criss_cross_attention(*mutate(*_qkv()), backend="reference")


def test_cca_two_op_api_bad_input():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="argument 'attn' must have H\\+W-1 channels = 8"):
        armnet_ops.cca_map(torch.randn(1, 7, 4, 5), v)
    with pytest.raises(ValueError, match="argument 'k' must have the shape"):
        armnet_ops.cca_weight(q, k[:, :1])


def _carafe_args(k=3, G=1, s=2, C=4):
    return torch.randn(1, C, 3, 4), torch.randn(1, G * k * k, s * 3, s * 4), k, G, s


BAD_CARAFE = [
    (dict(kernel=4), ValueError, "argument 'kernel_size' must be odd, got 4"),
    (dict(G=3), ValueError, r"must be divisible by group_size \(3\)"),
    (dict(s=0), ValueError, "argument 'scale_factor' must be >= 1, got 0"),
    (dict(s=1.5), TypeError, "argument 'scale_factor' must be an integer"),
    (dict(mask_channels=8), ValueError, "argument 'masks' must have G·k² channels = 9"),
    (dict(mask_rows=5), ValueError, "argument 'masks' must have s·H rows = 6"),
    (dict(ndim=3), ValueError, "argument 'features' must be 4-D"),
    (dict(dtype=torch.float64), ValueError, "argument 'masks' must have the dtype of 'features'"),
]


@pytest.mark.parametrize("change,error,message", BAD_CARAFE)
def test_carafe_bad_input(change, error, message):
    f, m, k, G, s = _carafe_args()
    k = change.get("kernel", k)
    G = change.get("G", G)
    s = change.get("s", s)
    if "mask_channels" in change:
        m = m[:, :change["mask_channels"]]
    if "mask_rows" in change:
        m = m[:, :, :change["mask_rows"]]
    if "ndim" in change:
        f = f[0]
    if "dtype" in change:
        m = m.to(change["dtype"])
    with pytest.raises(error, match=message):
        armnet_ops.carafe(f, m, k, G, s, backend="reference")


def test_carafe_fused_bad_logit_channels():
    f = torch.randn(1, 4, 3, 4)
    with pytest.raises(ValueError, match="argument 'mask_logits' must have G·k²·s² channels = 36"):
        armnet_ops.carafe_fused(f, torch.randn(1, 9, 3, 4), 3, 1, 2)
    with pytest.raises(ValueError, match="argument 'mask_logits' must have H = 3"):
        armnet_ops.carafe_fused(f, torch.randn(1, 36, 6, 4), 3, 1, 2)


BAD_DCONV = [
    (dict(weight=torch.randn(5, 3, 2, 3)), ValueError, r"kernel height\)' must be odd, got 2"),
    (dict(weight=torch.randn(5, 4, 3, 3)), ValueError, "argument 'weight' must have in_channels of x = 3"),
    (dict(dilation=(1, 1.5)), TypeError, r"argument 'dilation\[1\]' must be an integer"),
    (dict(dilation=(0, 1)), ValueError, r"argument 'dilation\[0\]' must be >= 1, got 0"),
    (dict(bias=torch.randn(4)), ValueError, "argument 'bias' must have out_channels = 5"),
    (dict(scale=torch.randn(5).double()), ValueError, "argument 'scale' must have the dtype of 'x'"),
    (dict(activation="gelu"), ValueError, "argument 'activation' must be one of"),
    (dict(x=torch.randn(3, 6, 6)), ValueError, "argument 'x' must be 4-D"),
]


@pytest.mark.parametrize("change,error,message", BAD_DCONV)
def test_directional_conv_bad_input(change, error, message):
    args = dict(x=torch.randn(2, 3, 6, 6), weight=torch.randn(5, 3, 1, 3), bias=None,
                dilation=(1, 2), scale=None, shift=None, activation=None)
    args.update(change)
    x, w, b, d = args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("dilation")
    with pytest.raises(error, match=message):
        armnet_ops.directional_conv2d(x, w, b, d, **args, backend="reference")


def test_empty_batches_give_empty_outputs():
    q, k, v = _qkv(N=0)
    assert armnet_ops.criss_cross_attention(q, k, v, backend="reference").shape == (0, 3, 4, 5)
    f, m, *rest = _carafe_args()
    assert armnet_ops.carafe(f[:0], m[:0], *rest, backend="reference").shape == (0, 4, 6, 8)
    y = armnet_ops.directional_conv2d(torch.randn(0, 3, 5, 5), torch.randn(2, 3, 3, 1), None, (2, 1),
                                      backend="reference")
    assert y.shape == (0, 2, 5, 5)


def test_autocast_casts_inputs_to_the_autocast_dtype():
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = armnet_ops.criss_cross_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = armnet_ops.reference.criss_cross_attention(q.double(), k.double(), v.double())
    assert (out.double() - ref).abs().max() < 0.1 * ref.abs().max()
