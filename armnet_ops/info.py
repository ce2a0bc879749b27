"""`python -m armnet_ops.info`: versions, devices, and for each op which backends this install
can run, with the reason for each one it cannot."""
from __future__ import annotations

import importlib
import importlib.util
import platform

import torch

from . import _backend
from . import carafe as _carafe, cca as _cca, directional_conv as _dconv  # noqa: F401  (define the specs)

SPECS = _backend.SPECS


def available_backends(op: str, device="cpu") -> list[str]:
    """The backends that can run `op` (a public function name) on tensors of `device`."""
    if op not in SPECS:
        raise ValueError(f"available_backends: argument 'op' must be one of {sorted(SPECS)}, got {op!r}")
    return _backend.available_backends(SPECS[op], torch.device(device))


def report() -> str:
    triton = importlib.util.find_spec("triton")
    lines = [f"python  {platform.python_version()}",
             f"torch   {torch.__version__} (CUDA {torch.version.cuda})",
             f"triton  {importlib.import_module('triton').__version__ if triton else 'not installed'}"
             + (" (TRITON_INTERPRET=1)" if _backend.triton_interpreted() else ""),
             f"extension  {'loaded' if _backend.EXTENSION_ERROR is None else _backend.EXTENSION_ERROR}"]
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        lines.append(f"device  {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("device  cpu only (no CUDA device visible)")
    for device in devices:
        lines.append(f"\nbackends on {device} tensors:")
        for name, spec in SPECS.items():
            lines.append(f"  {name}")
            for b in _backend.BACKENDS:
                ok, why = _backend.availability(spec, b, torch.device(device))
                lines.append(f"    {b:<10} {'yes' if ok else 'no: ' + why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
