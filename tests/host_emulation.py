"""Builds a host harness of CUDA device code (one std::thread per CUDA thread, see
csrc/cuda/*_kernels.cuh) into a shared library for ctypes. Used by the CARAFE and CCA emulation
tests."""
import ctypes
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_harness(directory, name: str, source: str) -> ctypes.CDLL:
    """Compiles `source` (C++20, csrc/ on the include path) to <directory>/lib<name>.so and loads
    it. Skips the calling test when the machine has no C++ compiler; a compile error fails it,
    with the compiler's message."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or c++) for the host emulation of the CUDA kernels")
    src = os.path.join(directory, f"{name}.cpp")
    lib = os.path.join(directory, f"lib{name}.so")
    with open(src, "w") as f:
        f.write(source)
    res = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall",
                          "-Wno-unknown-pragmas", f"-I{os.path.join(ROOT, 'csrc')}", src,
                          "-o", lib], capture_output=True, text=True)
    assert res.returncode == 0, f"host compile of {name} failed:\n{res.stderr[-4000:]}"
    return ctypes.CDLL(lib)
