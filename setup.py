"""Builds armnet_ops._C: the C++ CPU kernels always, the CUDA kernels when a GPU is visible or
FORCE_CUDA=1 is set.

Build with the torch you will run with: `pip install --no-build-isolation -e .`.

Environment:
  FORCE_CUDA=1            compile the CUDA sources even without a visible GPU (CI does this).
  CPU_ONLY=1              never compile the CUDA sources.
  TORCH_CUDA_ARCH_LIST    the architectures, e.g. "9.0" (default: the visible GPU, else 8.0;9.0+PTX).
  CUDA_HOME               the toolkit; found from `nvcc` otherwise, even when it is a wrapper script.
  MAX_JOBS                parallel compile jobs (ninja).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[armnet_ops build] {msg}", file=sys.stderr, flush=True)


def find_cuda_home() -> str | None:
    """The toolkit root. `nvcc --dryrun` prints the toolkit's own TOP even when the `nvcc` on PATH
    is a shell wrapper that execs the real compiler, so that is asked before guessing paths."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True,
                                 timeout=60).stderr
            m = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
            if m:
                return os.path.realpath(m.group(1).strip())
        except (OSError, subprocess.SubprocessError):
            pass
        return os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))
    for guess in ("/usr/local/cuda", "/opt/cuda"):
        if os.path.exists(os.path.join(guess, "bin", "nvcc")):
            return os.path.realpath(guess)
    return None


def wheel_cuda_includes() -> list[str]:
    """Include folders of the nvidia-* wheels. torch's CUDA headers include cublas_v2.h and
    cusparse.h, which a bare nvcc install may lack while the wheels next to torch ship them."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    found = []
    for root in sorted(r for r in roots if r and os.path.isdir(os.path.join(r, "nvidia"))):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in ("cublas_v2.h", "cusparse.h")):
                found.append(inc)
    return found


def want_cuda(torch) -> tuple[bool, str]:
    if os.environ.get("CPU_ONLY", "0") == "1":
        return False, "CPU_ONLY=1 is set"
    if torch.version.cuda is None:
        return False, f"the installed torch {torch.__version__} is a CPU-only build"
    if not (torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"):
        return False, "no GPU is visible and FORCE_CUDA=1 is not set"
    if find_cuda_home() is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return True, ""


def extensions():
    import torch
    from packaging.version import Version

    if Version(torch.__version__.split("+")[0]) < Version("2.6"):
        raise RuntimeError(f"armnet_ops needs torch >= 2.6, found {torch.__version__}")

    use_cuda, why_not = want_cuda(torch)
    if use_cuda:
        os.environ["CUDA_HOME"] = find_cuda_home()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    # cpp_extension reads CUDA_HOME when it is imported, so only now.
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std here: torch.utils.cpp_extension picks the standard its own headers need (C++17 in
    # torch 2.11, C++20 in 2.13 and later), so the sources must compile as both.
    cxx = ["-O3", "-fopenmp"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += wheel_cuda_includes()
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                         "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                         "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        log(f"building CPU and CUDA kernels with the toolkit at {os.environ['CUDA_HOME']}, "
            f"archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')}")
        ext = cpp_extension.CUDAExtension
    else:
        log(f"building the CPU kernels only: {why_not}")
        ext = cpp_extension.CppExtension
    return [ext("armnet_ops._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                extra_link_args=["-fopenmp"])], cpp_extension.BuildExtension.with_options(
        use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return True
    except ImportError:
        return False


ext_modules, build_ext = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
