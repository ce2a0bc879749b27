// Compiles a kernel header once per instruction set and picks one at run time.
//
// A CPU kernel file defines ARMNET_ISA_KERNELS as the name of its kernel header (a header with
// no include guard and no includes of its own), then includes this file inside its anonymous
// namespace. The kernels are then compiled for the baseline x86-64, for AVX2+FMA and for AVX-512
// (512-bit vectors preferred), each copy in a namespace of its own. Their inner loops run along
// contiguous rows and vectorise, so the vector width is most of the speed; the binary still runs
// on CPUs without AVX2. ARMNET_CPU_KERNEL(fn, args...) calls the best variant the CPU supports,
// capped by the environment variable ARMNET_OPS_CPU_ISA=base|avx2 (read once; the tests use it
// to run every variant). No include guard: each kernel file includes it once. It is included
// inside a namespace, so the includer provides the standard headers it and the kernel headers
// use (<algorithm>, <bit>, <cmath>, <cstdint>, <cstdlib>, <string>, <vector>).
//
// Each copy also sees its instruction set's vector width in bytes (kVectorBytes) and its number
// of vector registers (kVectorRegisters), for kernels that block their loops by hand:
// `#pragma GCC target` changes the code GCC emits but not the predefined macros (__AVX2__ stays
// undefined inside the AVX2 copy), so the kernels cannot ask the preprocessor.

namespace isa_base {
constexpr int kVectorBytes = 16, kVectorRegisters = 16;  // SSE2, the x86-64 baseline
#include ARMNET_ISA_KERNELS
}  // namespace isa_base

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
constexpr int kVectorBytes = 32, kVectorRegisters = 16;
#include ARMNET_ISA_KERNELS
}  // namespace isa_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
namespace isa_avx512 {
constexpr int kVectorBytes = 64, kVectorRegisters = 32;
#include ARMNET_ISA_KERNELS
}  // namespace isa_avx512
#pragma GCC pop_options

// 0 baseline, 1 AVX2, 2 AVX-512.
inline int kernel_isa() {
  static const int isa = [] {
    __builtin_cpu_init();
    int best = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = 2;
    const char* cap = std::getenv("ARMNET_OPS_CPU_ISA");
    if (cap != nullptr && std::string(cap) == "base") best = 0;
    if (cap != nullptr && std::string(cap) == "avx2") best = std::min(best, 1);
    return best;
  }();
  return isa;
}
#define ARMNET_CPU_KERNEL(fn, ...)                                                         \
  (kernel_isa() == 2   ? isa_avx512::fn(__VA_ARGS__)                                       \
   : kernel_isa() == 1 ? isa_avx2::fn(__VA_ARGS__)                                         \
                       : isa_base::fn(__VA_ARGS__))
#else
#define ARMNET_CPU_KERNEL(fn, ...) isa_base::fn(__VA_ARGS__)
#endif
