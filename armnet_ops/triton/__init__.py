"""Triton kernels, one module per op family. Each module defines its kernels, registers the
`armnet_ops::*_triton` twins of the C++ ops and their autograd, and is imported lazily by the
dispatcher (armnet_ops/_backend.py): TRITON_INTERPRET=1 must be set before a kernel is defined
for it to run on CPU tensors."""
