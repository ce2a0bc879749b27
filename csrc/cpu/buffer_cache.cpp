// The cache of buffer_cache.h, its allocator for outputs, and the op that empties it.

#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace armnet_ops {
namespace buffer_cache {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

class Cache {
 public:
  static Cache& instance() {
    // Never destroyed: outputs may be freed by torch after static destructors have run.
    static Cache* cache = new Cache();
    return *cache;
  }

  void* take(size_t& bytes, bool huge_pages) {
    bytes = (bytes + kHuge - 1) / kHuge * kHuge;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->bytes >= bytes && it->bytes <= 2 * bytes &&
            (best == free_.end() || it->bytes < best->bytes))
          best = it;
      if (best != free_.end()) {
        void* p = best->p;
        bytes = best->bytes;
        held_ -= bytes;
        free_.erase(best);
        return p;
      }
    }
    void* p = std::aligned_alloc(kHuge, bytes);
#if defined(MADV_HUGEPAGE)
    if (p != nullptr && huge_pages) madvise(p, bytes, MADV_HUGEPAGE);  // a hint only
#endif
    return p;
  }

  void give(void* p, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        evicted.push_back(p);
      } else {
        free_.push_back({p, bytes});
        held_ += bytes;
        while (held_ > limit_) {  // the oldest first
          evicted.push_back(free_.front().p);
          held_ -= free_.front().bytes;
          free_.erase(free_.begin());
        }
      }
    }
    for (void* q : evicted) std::free(q);
  }

  int64_t release() {
    std::vector<Block> all;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      held_ = 0;
    }
    int64_t bytes = 0;
    for (const Block& b : all) {
      std::free(b.p);
      bytes += static_cast<int64_t>(b.bytes);
    }
    return bytes;
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };

  Cache() {
    const char* mb = std::getenv("ARMNET_OPS_CPU_SCRATCH_MB");
    if (mb != nullptr && *mb != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(mb, &end, 10);
      TORCH_CHECK(*end == '\0' && v >= 0,
                  "ARMNET_OPS_CPU_SCRATCH_MB must be a whole number of MiB >= 0, got '", mb, "'");
      limit_ = static_cast<size_t>(v) << 20;
    }
#if defined(__linux__)
    // A fork while another thread holds the lock would leave the child's copy locked for good:
    // the forking thread takes the lock first, so the free list is whole in both processes, and
    // each releases it. The child keeps its copies of the cached buffers.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
  }

  std::mutex mutex_;
  std::vector<Block> free_;  // oldest first
  size_t held_ = 0;
  size_t limit_ = size_t(256) << 20;
};

// Outputs are not marked for huge pages: in fresh processes that made their first writes four
// times slower.
class OutputAllocator final : public c10::Allocator {
 public:
  static OutputAllocator* instance() {
    static OutputAllocator* allocator = new OutputAllocator();  // never destroyed, as Cache
    return allocator;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetCPUAllocator()->allocate(n);
    size_t bytes = n;
    void* p = allocate_or_release([&] { return Cache::instance().take(bytes, false); }, n,
                                  "armnet_ops (CPU)", "for an output");
    // The context remembers the buffer's size for the cache.
    return {p, new Block{p, bytes}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };
  static void give_back(void* ctx) {
    const Block* b = static_cast<const Block*>(ctx);
    Cache::instance().give(b->p, b->bytes);
    delete b;
  }
};

int64_t cpu_scratch_release() { return release(); }

}  // namespace

void* take(size_t& bytes, bool huge_pages) { return Cache::instance().take(bytes, huge_pages); }

void give(void* p, size_t bytes) { Cache::instance().give(p, bytes); }

int64_t release() { return Cache::instance().release(); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, OutputAllocator::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::nullopt);
}

}  // namespace buffer_cache

// No tensor argument to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(armnet_ops, CompositeExplicitAutograd, m) {
  m.impl("cpu_scratch_release", &buffer_cache::cpu_scratch_release);
}

}  // namespace armnet_ops
