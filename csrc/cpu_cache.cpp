// Caching allocator for the CPU ops' outputs.
//
// An encoder forward allocates the same few large activations (tokens x 3*dim, tokens x hidden_dim, ...) in
// every layer and frees them a layer later. glibc serves blocks this large with fresh mmap'd pages or gives
// the top of its heap back to the system, so the next layer touches new pages: at 8 x 128 tokens on
// distilbert-base, 10-25 thousand page faults per forward (each one a kernel entry plus a 4 KiB memset).
// Like a GPU caching allocator, or ONNX Runtime's arena, this keeps freed blocks and hands them out again:
//
//   - Blocks of kMinCachedBytes or more are rounded up to a size class (4 per power of two, so at most
//     25% over the request) and, once freed, kept in a free list; an allocation of the same class takes the
//     most recently freed block (its pages are the likeliest to be in cache).
//   - At most `limit` free bytes are kept (DISTILKERNELS_CPU_CACHE_MB, 512 MiB by default; 0 turns caching
//     off); past it the least recently freed blocks go back to the system.
//   - Smaller requests go to PyTorch's default CPU allocator.
//
// Tensors made here are ordinary resizable CPU tensors; only where their memory comes from differs.
#include "cpu_cache.h"
#include "env.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace distilkernels {
namespace {

constexpr size_t kMinCachedBytes = size_t(256) << 10;
constexpr int64_t kDefaultLimitMiB = 512;

// n rounded up to its size class: a multiple of a quarter of the largest power of two <= n.
size_t size_class(size_t n) {
  size_t p = 1;
  while (p <= n / 2) p *= 2;
  const size_t step = p / 4;
  return (n + step - 1) / step * step;
}

int64_t limit_from_env() {
  const char* env = std::getenv("DISTILKERNELS_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return kDefaultLimitMiB << 20;
  // Digits only (distilkernels/_env.py checks the same at import), and the byte count must fit in int64: a
  // wrapped, negative limit broke eviction, a crash rather than a warning.
  int64_t mib = 0;
  bool ok = true;
  for (const char* c = env; *c != '\0' && ok; ++c) {
    ok = *c >= '0' && *c <= '9' && mib <= (INT64_MAX >> 20) / 10;
    if (ok) mib = mib * 10 + (*c - '0');
  }
  if (ok && mib <= (INT64_MAX >> 20)) return mib << 20;
  env::warn_once("DISTILKERNELS_CPU_CACHE_MB", env, "a non-negative integer (MiB) below 2**43",
                 std::to_string(kDefaultLimitMiB));
  return kDefaultLimitMiB << 20;
}

struct FreeBlock {
  void* ptr;
  size_t bytes;
  uint64_t freed_at;  // release order, for least-recently-freed eviction
};

class Cache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      int64_t best = -1;
      for (int64_t i = 0; i < static_cast<int64_t>(free_.size()); ++i)
        if (free_[i].bytes == bytes && (best < 0 || free_[i].freed_at > free_[best].freed_at)) best = i;
      if (best >= 0) {
        void* ptr = free_[best].ptr;
        free_[best] = free_.back();
        free_.pop_back();
        cached_bytes_ -= bytes;
        live_[ptr] = bytes;
        live_bytes_ += bytes;
        ++hits_;
        return ptr;
      }
      ++misses_;
    }
    void* ptr = c10::alloc_cpu(bytes);  // outside the lock; throws on failure
    std::lock_guard<std::mutex> lock(mu_);
    live_[ptr] = bytes;
    live_bytes_ += bytes;
    return ptr;
  }

  void give_back(void* ptr) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(ptr);
      TORCH_INTERNAL_ASSERT(it != live_.end(), "distilkernels CPU cache: freeing a block it did not hand out");
      const size_t bytes = it->second;
      live_.erase(it);
      live_bytes_ -= bytes;
      free_.push_back({ptr, bytes, ++clock_});
      cached_bytes_ += bytes;
      evict_to(limit_, evicted);
    }
    for (void* p : evicted) c10::free_cpu(p);
  }

  int64_t empty() {
    std::vector<void*> evicted;
    int64_t freed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      freed = cached_bytes_;
      evict_to(0, evicted);
    }
    for (void* p : evicted) c10::free_cpu(p);
    return freed;
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "the CPU cache limit must be >= 0 bytes, got ", bytes);
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
      evict_to(limit_, evicted);
    }
    for (void* p : evicted) c10::free_cpu(p);
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {limit_, cached_bytes_, live_bytes_, hits_, misses_};
  }

 private:
  // Drops least recently freed blocks until at most `bytes` are cached; the caller frees them unlocked.
  void evict_to(int64_t bytes, std::vector<void*>& evicted) {
    while (cached_bytes_ > bytes) {
      int64_t oldest = 0;
      for (int64_t i = 1; i < static_cast<int64_t>(free_.size()); ++i)
        if (free_[i].freed_at < free_[oldest].freed_at) oldest = i;
      evicted.push_back(free_[oldest].ptr);
      cached_bytes_ -= free_[oldest].bytes;
      free_[oldest] = free_.back();
      free_.pop_back();
    }
  }

  std::mutex mu_;
  std::vector<FreeBlock> free_;  // a few dozen blocks at most: linear scans are cheap
  std::unordered_map<void*, size_t> live_;
  int64_t limit_ = limit_from_env();
  int64_t cached_bytes_ = 0, live_bytes_ = 0, hits_ = 0, misses_ = 0;
  uint64_t clock_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran.
Cache& cache() {
  static Cache* instance = new Cache();
  return *instance;
}

void release(void* ptr) { cache().give_back(ptr); }

struct CachingCpuAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    void* ptr = cache().take(size_class(n));
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  static auto* allocator = new CachingCpuAllocator();  // never destroyed, as the cache
  return at::Tensor(at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              c10::typeMetaToScalarType(options.dtype()), c10::nullopt));
}

CpuCacheStats cpu_cache_stats() { return cache().stats(); }
int64_t cpu_cache_empty() { return cache().empty(); }
void cpu_cache_set_limit(int64_t bytes) { cache().set_limit(bytes); }

}  // namespace distilkernels
