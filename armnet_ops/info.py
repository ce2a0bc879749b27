"""`python -m armnet_ops.info`: versions, devices, and for each op which backends this install
can run, with the reason for each one it cannot."""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import platform
import subprocess

import torch

from . import _backend
from . import carafe as _carafe, cca as _cca, directional_conv as _dconv  # noqa: F401  (define the specs)

SPECS = _backend.SPECS
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def available_backends(op: str, device="cpu") -> list[str]:
    """The backends that can run `op` (a public function name) on tensors of `device`."""
    if op not in SPECS:
        raise ValueError(f"available_backends: argument 'op' must be one of {sorted(SPECS)}, got {op!r}")
    return _backend.available_backends(SPECS[op], torch.device(device))


def git_commit() -> str:
    """The source tree's HEAD hash, with "-dirty" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_SOURCE_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_SOURCE_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(device: torch.device) -> dict:
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton
        triton_version = triton.__version__
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "device_type": device.type,
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        # The vector ISA torch's kernels run with, which our CPU kernels pick the same way
        # (csrc/cpu/isa_variants.h): the same core count gives 2x the FLOP rate with AVX-512.
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa_cap": os.environ.get("ARMNET_OPS_CPU_ISA"),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["device"] = f"cpu ({env['cpu_threads']} threads)"
    return env


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
