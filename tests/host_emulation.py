"""Builds a host harness of CUDA device code (one std::thread per CUDA thread, see
csrc/cuda/*_kernels.cuh) into a shared library for ctypes, and the C++ pieces harnesses share:
HOST_CUDA (threads, barrier, launch), HOST_HALF (__half / __nv_bfloat16 rounding as the device)
and HOST_WMMA (nvcuda::wmma). Used by the CARAFE, CCA and directional-conv emulation tests."""
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


# ---- C++ snippets for harnesses (paste them into the source before the kernel header) ----------

# The CUDA execution model on the host: dim3, blockIdx / threadIdx (per thread), blockDim,
# __syncthreads as a std::barrier, uint4, the qualifiers (and __launch_bounds__, of any arity) as
# nothing, and launch(gx, [gy,] threads, body): one std::thread per CUDA thread for the whole
# launch, the blocks of a 1-D or 2-D grid one after another (x fastest) with a barrier between them
# (so one set of static arrays can be every block's shared memory). The harness defines __shared__
# and __align__ to suit its kernels.
HOST_CUDA = r"""
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local dim3 blockIdx;
static thread_local dim3 threadIdx;
static dim3 blockDim;
static std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

template <typename F>
static void launch(int64_t gx, int64_t gy, int threads, F body) {
  if (gx == 0 || gy == 0) return;
  std::barrier<> bar(threads);
  g_barrier = &bar;
  blockDim.x = threads;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      threadIdx.x = t;
      for (int64_t by = 0; by < gy; ++by)
        for (int64_t bx = 0; bx < gx; ++bx) {
          blockIdx.x = static_cast<unsigned>(bx);
          blockIdx.y = static_cast<unsigned>(by);
          body();
          bar.arrive_and_wait();
        }
    });
  for (auto& th : pool) th.join();
}

template <typename F>
static void launch(int64_t blocks, int threads, F body) {
  launch(blocks, 1, threads, body);
}
"""

# Host __half and __nv_bfloat16: 16-bit storage, conversions from float rounding to nearest even
# (as __float2half_rn / __float2bfloat16_rn, which at::Half(float) and at::BFloat16(float) use on
# the device; NaN stays a quiet NaN, overflow goes to infinity, fp16 subnormals are kept), exact
# conversions to float. No arithmetic operators: an expression on two halves converts both to
# float and computes in float, which is what cuda_fp16.h's operators do before rounding the
# result; the kernels emulated here only convert (load, accumulate in float, round once).
# Exported for a check against torch's own conversions: host_round_f16 / host_round_bf16.
HOST_HALF = r"""
#include <cmath>
#include <cstdint>
#include <cstring>

inline uint16_t host_float_to_half_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                        // below 2^-14: a subnormal half (or zero)
    float af;
    std::memcpy(&af, &a, 4);
    // af · 2^24 is exact (a power-of-two scale) and < 1024; nearbyint rounds half to even.
    return sign | static_cast<uint16_t>(std::nearbyint(af * 16777216.0f));
  }
  a -= 112u << 23;                              // rebias the exponent (127 -> 15)
  return sign | static_cast<uint16_t>((a + 0xfffu + ((a >> 13) & 1u)) >> 13);
}

inline float host_half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t host_float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float host_bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct __half {
  uint16_t x;
  __half() = default;
  __half(float f) : x(host_float_to_half_bits(f)) {}
  __half(double d) : __half(static_cast<float>(d)) {}
  operator float() const { return host_half_bits_to_float(x); }
};

struct __nv_bfloat16 {
  uint16_t x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : x(host_float_to_bf16_bits(f)) {}
  __nv_bfloat16(double d) : __nv_bfloat16(static_cast<float>(d)) {}
  operator float() const { return host_bf16_bits_to_float(x); }
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage");

extern "C" {
void host_round_f16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half(in[i]).x;
}
void host_round_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __nv_bfloat16(in[i]).x;
}
void host_widen_f16(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = host_half_bits_to_float(in[i]);
}
void host_widen_bf16(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = host_bf16_bits_to_float(in[i]);
}
}
"""

# A host nvcuda::wmma (16 × 16 × 16 fragments): every thread of a warp holds a whole tile, but only
# lane 0 computes the products and stores (32 times cheaper; kernels must touch fragments only
# through fill / load / mma / store, and sync before anyone reads what was stored, as the CUDA
# ones do). Products and sums in the accumulator type: fp16 × fp16 and bf16 × bf16 products are
# exact in fp32, as on the tensor cores; the summation order (and the tensor cores' truncation
# within a 16-term sum) differs. Accumulator fragments load and store row- or column-major. Needs
# threadIdx.
HOST_WMMA = r"""
#include <algorithm>
#include <type_traits>
namespace nvcuda { namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment { T x[M * N]; };
template <typename T, typename L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k)
      f.x[i * 16 + k] = std::is_same_v<L, row_major> ? p[i * ld + k] : p[k * ld + i];
}
template <typename T, typename L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 16; ++j)
      f.x[k * 16 + j] = std::is_same_v<L, row_major> ? p[k * ld + j] : p[j * ld + k];
}
template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
  for (auto& e : f.x) e = v;
}
template <typename T, typename Tc, typename La, typename Lb>
void mma_sync(fragment<accumulator, 16, 16, 16, Tc>& d,
              const fragment<matrix_a, 16, 16, 16, T, La>& a,
              const fragment<matrix_b, 16, 16, 16, T, Lb>& b,
              const fragment<accumulator, 16, 16, 16, Tc>& c) {
  if ((threadIdx.x & 31) != 0) return;  // only lane 0's tile is ever stored (see above)
  Tc av[256], bv[256], r[256];           // operands widened once (exact)
  for (int e = 0; e < 256; ++e) {
    av[e] = static_cast<Tc>(a.x[e]);
    bv[e] = static_cast<Tc>(b.x[e]);
  }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      Tc s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += av[i * 16 + k] * bv[k * 16 + j];
      r[i * 16 + j] = s;
    }
  std::copy(r, r + 256, d.x);
}
template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ld,
                      layout_t layout) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i * 16 + j] = p[layout == mem_row_major ? i * ld + j : j * ld + i];
}
template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ld,
                       layout_t layout) {
  if ((threadIdx.x & 31) != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      p[layout == mem_row_major ? i * ld + j : j * ld + i] = f.x[i * 16 + j];
}
} }
"""
