"""CMakeLists.txt builds csrc/ into a library that torch.ops.load_library can load, and the ops
it registers compute what the reference computes. CPU-only, in a fresh process: the library
defines the same armnet_ops namespace as the package's own extension."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_cpu_build_loads_and_runs(tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DARMNET_OPS_CUDA=OFF",
                    f"-DPython3_EXECUTABLE={sys.executable}", *gen],
                   check=True, capture_output=True, text=True)
    res = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    lib = build / "libarmnet_ops.so"
    assert lib.exists()
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        # Import only the reference module: the package itself would load its own _C too.
        import importlib.util
        spec = importlib.util.spec_from_file_location("ref", {os.path.join(ROOT, "armnet_ops", "reference.py")!r})
        ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
        f = torch.randn(2, 4, 5, 6, dtype=torch.float64)
        m = torch.randn(2, 2 * 9, 10, 12, dtype=torch.float64)
        out = torch.ops.armnet_ops.carafe_forward(f, m, 3, 2, 2)
        torch.testing.assert_close(out, ref.carafe(f, m, 3, 2, 2))
        q, k, v = (torch.randn(1, 2, 4, 5, dtype=torch.float64) for _ in range(3))
        out, lse = torch.ops.armnet_ops.cca_forward(q, k, v, 1.0)
        torch.testing.assert_close(out, ref.criss_cross_attention(q, k, v, 1.0))
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-4000:]
