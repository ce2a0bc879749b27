// Memory the CPU kernels keep between calls: scratch buffers and the storage of outputs of
// 4 MiB and more (buffer_cache.cpp). Fresh memory is zeroed by the kernel page by page on first
// touch (about 0.4 ms per MiB on a KVM guest), and glibc maps allocations above 32 MiB anew on
// every call, so without this cache a criss-cross forward+backward at (2, 64, 512, 97, 97) paid
// for zeroing about 90 MB of scratch and 77 MB of outputs each time.
//
// Only criss-cross attention uses it. CARAFE's outputs did too for a while (a forward at larger
// decoder shapes, 67 MB out, spent about half its time in page faults), but a freed output held
// here is memory no other op can use: evaluating ARM-Net R50 on one 512² image then peaked at
// 323 MB beyond the model, against 224 MB with only the criss-cross outputs kept and 199 MB with
// the cache off; the budget of tests/test_model.py is 250 MB.
//
// The cache holds at most ARMNET_OPS_CPU_SCRATCH_MB MiB (default 256; 0 turns it off) of buffers
// not in use, evicting the least recently returned first; torch.ops.armnet_ops.
// cpu_scratch_release() frees them all, as does an allocation that fails (which is then tried
// once more). A buffer is reused only for a request of at least half its size. Thread-safe
// (concurrent calls each take their own buffers) and fork-safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>

namespace armnet_ops {
namespace buffer_cache {

// Requests of this size and more go through the cache; smaller ones to malloc (or torch's
// allocator), whose heap reuses them anyway.
constexpr size_t kMinBytes = size_t(4) << 20;

// A buffer of `bytes` rounded up to 2 MiB, 2 MiB-aligned (nullptr when out of memory); `bytes`
// is set to its actual size. A new one is marked for transparent huge pages if `huge_pages`.
void* take(size_t& bytes, bool huge_pages);
// Returns a buffer from take() (with the size take() set) to the cache.
void give(void* p, size_t bytes);
// Frees every buffer not in use; returns the bytes freed.
int64_t release();

// allocate(); out of memory, it frees what the cache keeps and tries once more (as CUDA's caching
// allocator does), then fails with an error that says what the bytes were for.
template <typename Fn>
void* allocate_or_release(Fn allocate, size_t bytes, const char* op, const char* what) {
  void* p = allocate();
  if (p == nullptr && release() > 0) p = allocate();
  TORCH_CHECK(p != nullptr, op, ": out of memory: could not allocate ", bytes, " bytes ", what);
  return p;
}

// An uninitialised contiguous CPU tensor for a kernel's output, whose storage of kMinBytes and
// more comes from the cache and goes back to it when torch frees it (a training or inference
// loop frees its outputs every step, and the next step finds them already mapped). It is an
// ordinary tensor otherwise: resizable through the same allocator. The kernels using it must
// write every element before reading any, since a reused buffer holds old data.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace buffer_cache
}  // namespace armnet_ops
