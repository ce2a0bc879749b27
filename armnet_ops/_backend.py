"""Loading the C++/CUDA extension and choosing a backend for each call.

Every public op takes `backend=` with one of BACKENDS or "auto". The rules (SPEC §2):

* "auto" on CUDA tensors: the first GPU backend in the op's `gpu_order` (or its per-dtype
  `gpu_order_by_dtype`) that is built and supports the dtype, else the reference.
* "auto" on CPU tensors: the C++ CPU kernel when it is built and supports the dtype, else the
  reference.
* A backend asked for by name that cannot run raises a RuntimeError that says why and how to
  build it. Nothing falls back silently.

Which C++ kernels exist is read off the dispatcher, not off a list kept by hand: a backend is
available exactly when its kernel is registered for the dispatch key.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import warnings
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` in the armnet_ops source tree"
CUDA_BUILD_HINT = ("rebuild with `FORCE_CUDA=1 pip install --no-build-isolation -e .` on a machine "
                   "with the CUDA toolkit")


def _load_extension() -> str | None:
    """Loads armnet_ops/_C into torch.ops; returns None on success, else the reason.

    The library is looked up next to this file rather than through the import system, so a
    copy of the package never picks up another copy's build (an editable install's finder would
    resolve armnet_ops._C to its own source tree)."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.join(here, "_C" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        return "the extension armnet_ops._C is not built"
    try:
        torch.ops.load_library(path)
    except OSError as e:
        return f"the extension {os.path.basename(path)} failed to load: {e}"
    return None


EXTENSION_ERROR = _load_extension()
if EXTENSION_ERROR is not None:
    warnings.warn(f"armnet_ops: {EXTENSION_ERROR}; only the reference and Triton backends are "
                  f"available ({BUILD_HINT}).", RuntimeWarning, stacklevel=1)


def release_cpu_scratch() -> int:
    """Frees the memory the CPU kernels keep between calls (csrc/cpu/buffer_cache.h): scratch
    buffers, and the storage of freed outputs of 4 MiB and more (criss-cross attention), at most
    ARMNET_OPS_CPU_SCRATCH_MB MiB (default 256). Returns the bytes freed; 0 without the C++
    extension. Outputs still in use are not touched. As
    torch.cuda.empty_cache() for the CUDA allocator: later calls allocate again."""
    if EXTENSION_ERROR is not None:
        return 0
    return int(torch.ops.armnet_ops.cpu_scratch_release())


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether armnet_ops::<op> has a kernel registered for the dispatch key ("CPU", "CUDA")."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"armnet_ops::{op}", dispatch_key)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


SPECS: dict = {}  # public op name -> OpSpec, filled as the op modules define them


@dataclass(frozen=True)
class OpSpec:
    """What the dispatcher needs to know of one public op.

    `cpp_op` names the C++ forward (csrc/ops.cpp); its Triton twin is `cpp_op + "_triton"`,
    registered when `triton_module` is imported.
    """
    name: str
    cpp_op: str
    triton_module: str
    dtypes: dict = field(default_factory=lambda: {
        "reference": FLOATS, "cpu": (torch.float32, torch.float64), "cuda": FLOATS,
        "triton": FLOATS})
    gpu_order: tuple = ("cuda", "triton")
    # dtype -> the GPU order for that dtype where it differs from gpu_order; an empty tuple makes
    # "auto" take the reference (the library's own conv, e.g. cuDNN) on a GPU.
    gpu_order_by_dtype: dict = field(default_factory=dict)

    def __post_init__(self):
        SPECS[self.name] = self


def _triton_op(spec: OpSpec):
    """Imports the op's Triton module (lazily: TRITON_INTERPRET must be set before the kernels
    are defined) and returns the registered Triton op, or raises ImportError."""
    importlib.import_module(spec.triton_module)
    return getattr(torch.ops.armnet_ops, spec.cpp_op + "_triton")


def availability(spec: OpSpec, backend: str, device: torch.device) -> tuple[bool, str]:
    """(available, reason when not) for one backend of one op on one device type."""
    device = torch.device(device)
    if backend == "reference":
        return True, ""
    if backend in ("cpu", "cuda"):
        key = backend.upper()
        hint = BUILD_HINT if backend == "cpu" else CUDA_BUILD_HINT
        if device.type != backend:
            return False, f"it runs on {key} tensors, got {device.type} tensors"
        if EXTENSION_ERROR is not None:
            return False, f"{EXTENSION_ERROR}; {hint}"
        if not has_kernel(spec.cpp_op, key):
            return False, f"the extension has no {key} kernel for {spec.cpp_op}; {hint}"
        return True, ""
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (`pip install triton`)"
        if device.type == "cpu" and not triton_interpreted():
            return False, ("Triton runs on CPU tensors only under the interpreter: set "
                           "TRITON_INTERPRET=1 before importing armnet_ops")
        if device.type not in ("cpu", "cuda"):
            return False, f"Triton needs CUDA tensors, got {device.type} tensors"
        try:
            _triton_op(spec)
        except (ImportError, AttributeError) as e:
            return False, f"the Triton kernels failed to import: {e}"
        return True, ""
    raise ValueError(f"{spec.name}: backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")


def available_backends(spec: OpSpec, device: torch.device) -> list[str]:
    return [b for b in BACKENDS if availability(spec, b, device)[0]]


def resolve(spec: OpSpec, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run this call (see the module docstring)."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"{spec.name}: backend must be one of {BACKENDS + ('auto',)}, "
                         f"got {backend!r}")
    if backend == "auto":
        order = (spec.gpu_order_by_dtype.get(dtype, spec.gpu_order) if device.type == "cuda"
                 else ("cpu",))
        for candidate in order:
            if dtype in spec.dtypes[candidate] and availability(spec, candidate, device)[0]:
                return candidate
        return "reference"
    ok, why = availability(spec, backend, device)
    if not ok:
        raise RuntimeError(f"{spec.name}: backend {backend!r} is not available: {why}")
    if dtype not in spec.dtypes[backend]:
        raise TypeError(f"{spec.name}: backend {backend!r} supports dtypes "
                        f"{[str(d) for d in spec.dtypes[backend]]}, got {dtype}")
    return backend


_SELECTED: dict = {}


@torch.compiler.assume_constant_result
def select(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str:
    """resolve() for the public op named `op`, as the public functions call it. Its answer does
    not change within a process, so it is computed once per argument set: eager calls skip the
    dispatcher and import-system queries, and torch.compile keeps it as a trace-time constant
    (Dynamo cannot trace those queries). Errors are not cached. The cache is a plain dict, not
    functools.lru_cache, whose wrapper Dynamo would trace into."""
    key = (op, backend, device_type, dtype)
    if key not in _SELECTED:
        _SELECTED[key] = resolve(SPECS[op], backend, torch.device(device_type), dtype)
    return _SELECTED[key]


def forward_op(spec: OpSpec, backend: str):
    """The registered forward op that runs a kernel backend. Choosing "triton" has imported the
    op's Triton module (availability does), so this is a plain lookup that Dynamo traces."""
    return getattr(torch.ops.armnet_ops, spec.cpp_op + ("_triton" if backend == "triton" else ""))


def autocast_inputs(*tensors):
    """Autocast does not reach custom ops, so the public functions apply it themselves: under an
    active autocast region, floating inputs are cast to its dtype (the ops are matmul-like: they
    run in low precision and accumulate in fp32). None entries pass through. Meta tensors (models
    built without memory) pass through too: asking `is_autocast_enabled` about the meta device
    raises "unknown device type for autocast". (Not `torch.amp.is_autocast_available`: Dynamo in
    torch 2.11, the GPU machine's, cannot trace it, so torch.compile(fullgraph=True) would fail.)"""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
