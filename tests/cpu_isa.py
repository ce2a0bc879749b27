"""The C++ kernels of criss-cross attention and CARAFE are compiled once per instruction set and
one is picked at run time (csrc/cpu/isa_variants.h); the machine running the tests uses the best,
so the others run in a subprocess with ARMNET_OPS_CPU_ISA capping the choice."""
import os
import subprocess
import sys

ISAS = ["base", "avx2"]


def run_with_cpu_isa(script: str, isa: str | None, **env_vars: str) -> None:
    """Runs `script` (which prints "ok") in a subprocess with the ISA cap (None: no cap) and the
    extra environment variables given."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env_vars)
    if isa is not None:
        env["ARMNET_OPS_CPU_ISA"] = isa
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
