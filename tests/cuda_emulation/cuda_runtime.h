// A CPU stand-in for the few CUDA runtime names csrc/jacobi_cuda.cu uses, so that the kernel's
// own source compiles with g++ and runs one std::thread per CUDA thread (see emulate.cpp).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __launch_bounds__(n)

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
enum { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct Dim3 { unsigned int x = 0; };

namespace emu {
inline thread_local Dim3 thread_idx, block_idx, block_dim;
inline int optin_shared_bytes = 227 * 1024;  // H100's opt-in limit; tests lower it
inline int sm_count = 132;                    // H100's; 1 keeps every matrix on one block
inline std::vector<float> shared_memory;
inline std::barrier<>* barrier = nullptr;
inline std::atomic<int> or_votes{0};
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim

inline int cudaDeviceGetAttribute(int* value, int attribute, int) {
  *value = attribute == cudaDevAttrMultiProcessorCount ? emu::sm_count : emu::optin_shared_bytes;
  return cudaSuccess;
}
using std::max;  // CUDA's device-side min / max
using std::min;
template <class F> int cudaFuncSetAttribute(F, int, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }

inline void __syncthreads() { emu::barrier->arrive_and_wait(); }
// every thread votes, all read the result, then one resets it for the next call
inline int __syncthreads_or(int predicate) {
  if (predicate) emu::or_votes.fetch_or(1);
  emu::barrier->arrive_and_wait();
  int result = emu::or_votes.load();
  emu::barrier->arrive_and_wait();
  if (emu::thread_idx.x == 0) emu::or_votes.store(0);
  emu::barrier->arrive_and_wait();
  return result;
}
inline unsigned int atomicMax(unsigned int* address, unsigned int value) {
  std::atomic_ref<unsigned int> ref(*address);
  unsigned int old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {}
  return old;
}
inline unsigned int __float_as_uint(float x) { unsigned int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned int u) { float x; std::memcpy(&x, &u, 4); return x; }

namespace emu {
// kernel<<<grid, threads, smem_bytes, stream>>>(args...): blocks one after another, each with
// `threads` std::threads that share the block's dynamic shared memory and barrier
template <class Kernel, class... Args>
void launch(Kernel kernel, unsigned int grid, int threads, size_t smem_bytes, cudaStream_t, Args... args) {
  for (unsigned int b = 0; b < grid; ++b) {
    shared_memory.assign(smem_bytes / sizeof(float) + 1, 0.0f);
    std::barrier<> block_barrier(threads);
    barrier = &block_barrier;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([=] {
        thread_idx.x = t;
        block_idx.x = b;
        block_dim.x = threads;
        kernel(args...);
      });
    for (auto& th : pool) th.join();
  }
}
}  // namespace emu
