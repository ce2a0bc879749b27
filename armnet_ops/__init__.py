"""armnet_ops: criss-cross attention, CARAFE and directional dilated convolution as PyTorch ops,
each with reference, C++ CPU, CUDA and Triton backends behind one `backend=` keyword.

    import armnet_ops
    out = armnet_ops.criss_cross_attention(q, k, v)               # (N, Cv, H, W)
    up = armnet_ops.carafe_fused(x, logits, 5, 1, 2)               # (N, C, 2H, 2W)
    y = armnet_ops.directional_conv2d(x, w, dilation=(1, 3), activation="relu")

`python -m armnet_ops.info` lists which backends this install has. With onnxscript installed
(the `deploy` extra), `torch.onnx.export(..., dynamo=True)` translates every op into standard ONNX
operators (armnet_ops/onnx.py).
"""
from . import _onnx_hook, nn, reference
from ._backend import BACKENDS, release_cpu_scratch
from .carafe import carafe, carafe_fused
from .cca import cca_map, cca_weight, criss_cross_attention
from .directional_conv import directional_conv2d, directional_conv2d_pair

__version__ = "0.1.0"
_onnx_hook.install()


def available_backends(op: str, device="cpu") -> list[str]:
    """The backends that can run `op` (a public function name) on tensors of `device`."""
    from .info import available_backends as available
    return available(op, device)

__all__ = ["BACKENDS", "available_backends", "carafe", "carafe_fused", "cca_map", "cca_weight",
           "criss_cross_attention", "directional_conv2d", "directional_conv2d_pair", "nn", "reference",
           "release_cpu_scratch"]
