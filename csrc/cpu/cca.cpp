// Criss-cross attention on the CPU: the fused op (cca_forward / cca_backward), CCNet's block with
// its residual epilogue (cca_residual_forward / cca_residual_backward) and CCNet's two-op API
// (cca_weight / cca_map and their backwards). fp32 and fp64.
//
// The residual epilogue is fused: the forward writes y = gamma · out + residual from the same
// accumulator as out, and the backward reads grad_y and applies gamma as a factor inside the
// kernel (the gradient of out is gamma · grad_y, and everything is linear in it); its per-pixel
// D_u = <grad_y_u, out_u> (which the backward needs anyway, times gamma) also gives
// grad_gamma = sum_u D_u.
//
// Layout: q, k (N, Cqk, H, W), v (N, Cv, H, W), any strides (read as contiguous NCHW, a copy
// only when they are not); outputs and gradients are contiguous NCHW. The key set of pixel
// u = (h, w) is its row (h, z), z in [0, W), and its column (j, w), j != h.
//
// Each line is handled by GEMMs over L x L x C, the energies Q Kᵀ, the weighted sum P V and the
// four products of the backward, with the softmax between them along the rows of the line's
// L x L weights: the einsum formulation's arithmetic, line by line, with no energy tensor in
// memory. A row's products are BLAS calls on the NCHW tensors as they are (a row is a strided
// matrix). Columns are taken a SIMD vector of adjacent columns at a time (8 in AVX2 fp32, 16 in
// AVX-512), by register-tiled GEMMs whose every multiply-add is one vector instruction across
// those columns (cca_kernels.h, lane_gemm), without transposes, on copies in a lane layout (a
// block's vectors contiguous) made a chunk of channels at a time from whole NCHW rows. Memory
// beyond inputs and outputs: those copies (q and k whole, one chunk of v, the gradient and the
// outputs) and every block's H x H weights (in the backward also their gradient).
//
// Forward (cca_kernels.h, forward_kernel), two passes: every column first, with its own softmax
// statistics, written unnormalised into out; then every row, which merges its statistics with
// the column's (log-sum-exp), rescales the column part in out and adds its own with one GEMM,
// then applies the residual epilogue. Each energy is computed once. Saved: out and the
// log-sum-exp (N, H, W) in the op-math type.
//
// Backward, the same two passes over the lines: the weights are recomputed from lse, and each
// line's dQ, dK and dV are written (columns) then added (rows). Each pass writes only its own
// lines' pixels and the order of the passes is fixed, so the result does not depend on the
// thread count.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "buffer_cache.h"
#include "cca_checks.h"

namespace armnet_ops {
namespace {

// C (M x N) = alpha · op(A) · op(B) + beta · C, row-major with leading dimensions. It goes to
// the BLAS that torch links (MKL on x86-64 builds; its sgemm_/dgemm_ are found at load time);
// where the process has none, to at::mm on strided views. ARMNET_OPS_CPU_GEMM=aten forces the
// latter (tests run both). BLAS is column-major: row-major C = op(A) op(B) is column-major
// Cᵀ = op(B)ᵀ op(A)ᵀ, hence the swapped operands.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
// mkl.h's mkl_set_num_threads_local is a macro for this (the lowercase symbol is the Fortran one).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

bool use_blas() {
  static const bool blas = [] {
    const char* force = std::getenv("ARMNET_OPS_CPU_GEMM");
    return sgemm_ != nullptr && dgemm_ != nullptr &&
           !(force != nullptr && std::string(force) == "aten");
  }();
  return blas;
}

template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // C = beta·C (0 when beta = 0, NaN in C or not), which BLAS libraries differ on
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  TORCH_CHECK(std::max({M, N, K, lda, ldb, ldc}) <= std::numeric_limits<int>::max(),
              "criss-cross attention (CPU): a line's GEMM exceeds 32-bit BLAS sizes");
  // One MKL thread (at::mm goes to MKL too): the kernels parallelise over lines themselves, and a
  // GEMM split between threads (as MKL may when a pass has a single line) would sum in another
  // order than with one thread, so results would depend on the thread count.
  struct OneMklThread {
    int before = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    ~OneMklThread() {
      if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(before);
    }
  } one_thread;
  if (use_blas()) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const char opa = tb ? 'T' : 'N', opb = ta ? 'T' : 'N';
    if constexpr (std::is_same_v<T, float>)
      sgemm_(&opa, &opb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    else
      dgemm_(&opa, &opb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    auto m = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
    return t ? m.t() : m;
  };
  auto a = ta ? view(A, K, M, lda, true) : view(A, M, K, lda, false);
  auto b = tb ? view(B, N, K, ldb, true) : view(B, K, N, ldb, false);
  auto c = view(C, M, N, ldc, false);
  at::NoGradGuard no_grad;
  at::addmm_out(c, c, a, b, beta, alpha);
}

// Uninitialised scratch of n elements for the kernels. Buffers of 4 MiB and more come from
// buffer_cache (2 MiB-aligned, marked for transparent huge pages, and kept for the next call:
// without that a forward+backward at (2, 64, 512, 97, 97) paid for the kernel's zeroing of its
// ~90 MB of lane copies and weights each time); smaller ones from malloc.
struct ScratchDeleter {
  size_t cached_bytes = 0;  // 0: from malloc
  void operator()(void* p) const {
    if (cached_bytes != 0)
      buffer_cache::give(p, cached_bytes);
    else
      std::free(p);
  }
};

template <typename T>
std::unique_ptr<T[], ScratchDeleter> scratch(int64_t n) {
  size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
  const bool cached = bytes >= buffer_cache::kMinBytes;
  void* p = buffer_cache::allocate_or_release(
      [&] { return cached ? buffer_cache::take(bytes, true) : std::malloc(bytes); }, bytes,
      "criss-cross attention (CPU)", "of scratch");
  return std::unique_ptr<T[], ScratchDeleter>(static_cast<T*>(p),
                                              ScratchDeleter{cached ? bytes : 0});
}

#define ARMNET_ISA_KERNELS "cca_kernels.h"
#include "isa_variants.h"

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  cca_checks::check_qkv(q, k, v, op);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": expected CPU tensors");
}

// The fused forward: (y, out, lse). With `residual` defined (the residual op) the kernel also
// writes y = gamma · out + residual from the accumulator of out; otherwise y is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, double scale,
                                                       const at::Tensor& residual_,
                                                       const at::Tensor& gamma) {
  const int64_t N = q.size(0), Cqk = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto out = buffer_cache::empty_output({N, Cv, H, W}, v.options());
  auto lse = at::empty({N, H, W}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  const bool epilogue = residual_.defined();
  at::Tensor residual, y;
  if (epilogue) {
    residual = residual_.contiguous();
    y = buffer_cache::empty_output({N, Cv, H, W}, v.options());
  }
  if (N * H * W == 0) return {y, out, lse};
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto mcol = at::empty({N, H, W}, q.options()), scol = at::empty({N, H, W}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cca_forward_cpu", [&] {
    // A CPU tensor: reading gamma here costs no device synchronisation.
    const scalar_t g = epilogue ? gamma.item<scalar_t>() : scalar_t(0);
    ARMNET_CPU_KERNEL(forward_kernel<scalar_t>, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                      vc.data_ptr<scalar_t>(), mcol.data_ptr<scalar_t>(),
                      scol.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                      lse.data_ptr<scalar_t>(), N, Cqk, Cv, H, W, static_cast<scalar_t>(scale),
                      epilogue ? residual.data_ptr<scalar_t>() : nullptr,
                      epilogue ? y.data_ptr<scalar_t>() : nullptr, g);
  });
  return {y, out, lse};
}

std::tuple<at::Tensor, at::Tensor> cca_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, double scale) {
  check_inputs(q, k, v, "cca_forward");
  auto [y, out, lse] = forward(q, k, v, scale, at::Tensor(), at::Tensor());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_residual_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& residual,
    const at::Tensor& gamma, double scale) {
  const char* op = "cca_residual_forward";
  check_inputs(q, k, v, op);
  cca_checks::check_residual(residual, v, op);
  cca_checks::check_gamma(gamma, v, op);
  return forward(q, k, v, scale, residual, gamma);
}

// The fused backward: (grad_q, grad_k, grad_v, D) where D (N, H, W) holds <go_u, out_u> per
// pixel; the gradient of out is gamma · go (gamma = 1 for cca_backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out_, const at::Tensor& lse_, double scale, double gamma) {
  const int64_t N = q.size(0), Cqk = q.size(1), H = q.size(2), W = q.size(3), Cv = v.size(1);
  auto go = grad.to(v.scalar_type()).contiguous(), out = out_.contiguous();
  auto lse = lse_.to(q.scalar_type()).contiguous();
  auto gq = buffer_cache::empty_output({N, Cqk, H, W}, q.options());
  auto gk = buffer_cache::empty_output({N, Cqk, H, W}, q.options());
  auto gv = buffer_cache::empty_output({N, Cv, H, W}, v.options());
  auto D = at::empty({N, H, W}, q.options());
  if (N * H * W == 0) return {gq.zero_(), gk.zero_(), gv.zero_(), D};
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cca_backward_cpu", [&] {
    ARMNET_CPU_KERNEL(pixel_dots<scalar_t>, go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                      D.data_ptr<scalar_t>(), N, Cv, H, W);
    ARMNET_CPU_KERNEL(backward_kernel<scalar_t>, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                      vc.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                      D.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
                      gv.data_ptr<scalar_t>(), N, Cqk, Cv, H, W, static_cast<scalar_t>(scale),
                      static_cast<scalar_t>(gamma));
  });
  return {gq, gk, gv, D};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cca_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_inputs(q, k, v, "cca_backward");
  cca_checks::check_backward(grad_out, q, v, out, lse);
  auto [gq, gk, gv, D] = backward(grad_out, q, k, v, out, lse, scale, 1.0);
  return {gq, gk, gv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cca_residual_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& gamma, double scale) {
  const char* op = "cca_residual_backward";
  check_inputs(q, k, v, op);
  cca_checks::check_backward(grad_y, q, v, out, lse, op, "grad_y");
  cca_checks::check_gamma(gamma, v, op);
  auto [gq, gk, gv, D] = backward(grad_y, q, k, v, out, lse, scale, gamma.item<double>());
  // grad_gamma = sum(grad_y · out) = sum_u D_u: one serial pass in double over the per-pixel
  // partials, so the order (and the result) is fixed whatever the thread count.
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "cca_residual_backward_cpu", [&] {
    const scalar_t* d = D.data_ptr<scalar_t>();
    for (int64_t i = 0, n = D.numel(); i < n; ++i) total += static_cast<double>(d[i]);
  });
  auto grad_gamma = at::full(gamma.sizes(), total, gamma.options());
  return {gq, gk, gv, grad_gamma};
}

at::Tensor cca_weight_cpu(const at::Tensor& q_, const at::Tensor& k_) {
  check_inputs(q_, k_, q_, "cca_weight");
  auto q = q_.contiguous(), k = k_.contiguous();
  const int64_t N = q.size(0), C = q.size(1), H = q.size(2), W = q.size(3);
  auto e = at::empty({N, H + W - 1, H, W}, q.options());
  if (e.numel() == 0) return e;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cca_weight_cpu", [&] {
    ARMNET_CPU_KERNEL(weight_kernel<scalar_t>, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                      e.data_ptr<scalar_t>(), N, C, H, W);
  });
  return e;
}

std::tuple<at::Tensor, at::Tensor> cca_weight_backward_cpu(const at::Tensor& g_,
                                                           const at::Tensor& q_,
                                                           const at::Tensor& k_) {
  check_inputs(q_, k_, q_, "cca_weight_backward");
  const int64_t N = q_.size(0), C = q_.size(1), H = q_.size(2), W = q_.size(3);
  cca_checks::check_grad_energy(g_, q_);
  auto q = q_.contiguous(), k = k_.contiguous(), g = g_.to(q.scalar_type()).contiguous();
  auto gq = at::zeros_like(q), gk = at::zeros_like(k);
  if (N * H * W == 0) return {gq, gk};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cca_weight_backward_cpu", [&] {
    ARMNET_CPU_KERNEL(weight_backward_kernel<scalar_t>, g.data_ptr<scalar_t>(),
                      q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>(),
                      gk.data_ptr<scalar_t>(), N, C, H, W);
  });
  return {gq, gk};
}

at::Tensor cca_map_cpu(const at::Tensor& a_, const at::Tensor& v_) {
  cca_checks::check_attn(a_, v_, "cca_map");
  auto a = a_.contiguous(), v = v_.contiguous();
  const int64_t N = v.size(0), C = v.size(1), H = v.size(2), W = v.size(3);
  auto out = at::empty_like(v);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "cca_map_cpu", [&] {
    ARMNET_CPU_KERNEL(map_kernel<scalar_t>, a.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                      out.data_ptr<scalar_t>(), N, C, H, W);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cca_map_backward_cpu(const at::Tensor& g_, const at::Tensor& a_,
                                                        const at::Tensor& v_) {
  cca_checks::check_attn(a_, v_, "cca_map_backward");
  cca_checks::check_map_grad(g_, v_);
  auto a = a_.contiguous(), v = v_.contiguous(), g = g_.to(v.scalar_type()).contiguous();
  const int64_t N = v.size(0), C = v.size(1), H = v.size(2), W = v.size(3);
  auto ga = at::zeros_like(a), gv = at::zeros_like(v);
  if (N * H * W == 0) return {ga, gv};
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "cca_map_backward_cpu", [&] {
    ARMNET_CPU_KERNEL(map_backward_kernel<scalar_t>, g.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                      v.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(),
                      N, C, H, W);
  });
  return {ga, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(armnet_ops, CPU, m) {
  m.impl("cca_forward", &cca_forward_cpu);
  m.impl("cca_backward", &cca_backward_cpu);
  m.impl("cca_residual_forward", &cca_residual_forward_cpu);
  m.impl("cca_residual_backward", &cca_residual_backward_cpu);
  m.impl("cca_weight", &cca_weight_cpu);
  m.impl("cca_weight_backward", &cca_weight_backward_cpu);
  m.impl("cca_map", &cca_map_cpu);
  m.impl("cca_map_backward", &cca_map_backward_cpu);
}

}  // namespace armnet_ops
