// A caching allocator for the outputs of the CPU ops (see cpu_cache.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace distilkernels {

// at::empty(sizes, options) for a CPU tensor, its memory taken from the cache of freed blocks.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

struct CpuCacheStats {
  int64_t limit_bytes;   // cached (free) bytes kept at most
  int64_t cached_bytes;  // free blocks held now
  int64_t live_bytes;    // blocks handed out and not yet freed
  int64_t hits, misses;  // allocations served from the cache / from the system
};

CpuCacheStats cpu_cache_stats();
// Frees every cached block; returns the bytes given back.
int64_t cpu_cache_empty();
// Sets the cached-bytes limit (0 turns caching off) and evicts down to it.
void cpu_cache_set_limit(int64_t bytes);

}  // namespace distilkernels
