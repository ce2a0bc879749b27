"""Input validation shared by the public ops (SPEC §3.5).

Every message names the op and the argument and gives the expected and the actual value. The
checks run in Python before dispatch, so each backend sees only valid input; the C++ glue keeps
TORCH_CHECKs of its own for callers that reach torch.ops directly.
"""
from __future__ import annotations

import numbers

import torch

INT32_MAX = 2**31 - 1


def check_not_torchscript_onnx_export(op: str) -> None:
    """The TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) traces sizes as
    tensors and knows no translation of our ops: say which exporter does. torch.jit.is_tracing()
    comes first, as it is free (and a constant under torch.compile)."""
    if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
        raise RuntimeError(
            f"{op}: the TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) "
            "cannot export armnet_ops ops; use the dynamo exporter, torch.onnx.export(model, "
            "args, dynamo=True), which translates them into standard ONNX operators (needs "
            "onnxscript: pip install armnet-ops[deploy])")


def check_tensor(op: str, name: str, t, ndim: int) -> None:
    check_not_torchscript_onnx_export(op)  # every public op checks a tensor before anything else
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' must be {ndim}-D, got {t.dim()}-D with shape "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got {t.dtype}")


def check_same_device_dtype(op: str, **tensors) -> None:
    """All named tensors (None ones skipped) share one device and one dtype."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: argument '{name}' must be on the device of '{name0}' "
                             f"({t0.device}), got {t.device}")
        if t.dtype != t0.dtype:
            raise ValueError(f"{op}: argument '{name}' must have the dtype of '{name0}' "
                             f"({t0.dtype}), got {t.dtype}")


def check_size(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{op}: argument '{name}' must have {what} = {expected} (dim {dim}), "
                         f"got {t.shape[dim]} in shape {tuple(t.shape)}")


def check_int(op: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: argument '{name}' must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: argument '{name}' must be >= {minimum}, got {value}")
    return int(value)


def check_odd(op: str, name: str, value) -> int:
    value = check_int(op, name, value, 1)
    if value % 2 == 0:
        raise ValueError(f"{op}: argument '{name}' must be odd, got {value}")
    return value


def check_pair(op: str, name: str, value, minimum: int = 1) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{op}: argument '{name}' must be an int or a pair of ints, got {value!r}")
    return check_int(op, f"{name}[0]", value[0], minimum), check_int(op, f"{name}[1]", value[1], minimum)
