"""Triton kernels, one module per op family. Each module defines its kernels, registers the
`armnet_ops::*_triton` twins of the C++ ops and their autograd, and is imported lazily by the
dispatcher (armnet_ops/_backend.py): TRITON_INTERPRET=1 must be set before a kernel is defined
for it to run on CPU tensors."""

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """The context of a kernel launch on t: Triton launches on the current CUDA device, so a
    tensor on another GPU must make its own device current first (as torch's own ops do)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
