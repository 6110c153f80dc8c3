// A small CUDA emulation for the host compiler, enough to compile custom_ops/src/hadamard_cuda.cu
// (and cuda_harness.cu) unchanged and run its kernel on the CPU (tests/test_cuda_emulated.py).
//
// Each block runs on the calling host thread; each CUDA thread of the block is a fiber (ucontext)
// with its own stack.  __syncthreads() parks the fiber; the scheduler resumes the fibers one by
// one, in an order set by cuda_emu_set_schedule (0: ascending thread index, 1: descending, >= 2:
// a shuffle seeded by it, reshuffled at every barrier), each until its next barrier or its end.
// A missing barrier therefore lets one fiber read what the others have not written yet, and the
// result changes with the schedule.  A barrier reached by only some threads is reported (on a
// GPU it hangs).  Dynamic shared memory is one buffer, filled with NaN before every block, and
// the device's opt-in shared-memory limit is small (cuda_emu_set_smem_limit), so moderate rows
// already take the kernel's device-scratch path.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "half.h"  // custom_ops/src/half.h: the bit-exact conversions behind __half / __nv_bfloat16

// ----------------------------------------------------------------------------- qualifiers
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__

// ----------------------------------------------------------------------------- vector types
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline int min(int a, int b) { return a < b ? a : b; }

// ----------------------------------------------------------------------------- half types
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return hadaconv::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{hadaconv::float_to_half(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return hadaconv::bfloat16_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{hadaconv::float_to_bfloat16(f)}; }

// ----------------------------------------------------------------------------- runtime API
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4, cudaErrorMemoryAllocation = 2 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef struct CUstream_st* cudaStream_t;

namespace cuda_emu {

// The emulated device: its opt-in shared memory and multiprocessor count.
inline int& smem_limit() {
  static int v = 16 * 1024;
  return v;
}
inline int& schedule() {
  static int v = 0;
  return v;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline int& func_smem_limit() {  // the kernel attribute: 48 KiB until raised
  static int v = 48 * 1024;
  return v;
}
constexpr int kMaxSmemBytes = 64 * 1024;

}  // namespace cuda_emu

// The one dynamic shared-memory buffer (blocks run one after the other): the kernel's
// `extern __shared__ float4 smem4[];` names this array (same namespace, internal to each
// translation unit).
namespace hadaconv {
namespace cuda {
namespace {
float4 smem4[cuda_emu::kMaxSmemBytes / sizeof(float4)];
}
}  // namespace cuda
}  // namespace hadaconv

namespace cuda_emu {

static inline float4* smem_buffer() { return hadaconv::cuda::smem4; }

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // kStackBytes, kept for the process's life (reused by every block)
  unsigned tid = 0;
  bool done = false;
};
constexpr size_t kStackBytes = 128 * 1024;

struct BlockState {
  ucontext_t sched;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  dim3 block_idx, block_dim, grid_dim;
};
inline BlockState& state() {
  static BlockState s;
  return s;
}

inline void fiber_main() {
  BlockState& s = state();
  (*s.body)();
  s.cur->done = true;
  swapcontext(&s.cur->ctx, &s.sched);
}

inline dim3 thread_idx() { return dim3(state().cur->tid); }

inline void sync_threads() { swapcontext(&state().cur->ctx, &state().sched); }

// Runs one block: every fiber up to its next barrier, in the schedule's order, until all end.
inline bool run_block(unsigned threads, const std::function<void()>& body, std::mt19937& rng) {
  BlockState& s = state();
  s.body = &body;
  static std::vector<Fiber> fibers;
  if (fibers.size() < threads) fibers.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.tid = t;
    f.done = false;
    if (!f.stack) f.stack = static_cast<char*>(std::malloc(kStackBytes));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, &fiber_main, 0);
  }
  std::vector<unsigned> order(threads);
  for (;;) {
    for (unsigned t = 0; t < threads; ++t) order[t] = schedule() == 1 ? threads - 1 - t : t;
    if (schedule() >= 2) std::shuffle(order.begin(), order.end(), rng);
    unsigned finished = 0;
    for (unsigned t : order) {
      Fiber& f = fibers[t];
      if (f.done) {
        ++finished;
        continue;
      }
      s.cur = &f;
      swapcontext(&s.sched, &f.ctx);
      finished += f.done;
    }
    if (finished == threads) return true;
    if (finished) {
      std::fprintf(stderr, "cuda_emu: __syncthreads reached by only some threads of block %u\n", s.block_idx.x);
      return false;
    }
  }
}

// kernel<<<grid, block, smem, stream>>>(args...) as launch(grid, block, smem, stream, kernel)(args...).
template <class Kernel>
struct Launch {
  dim3 grid, block;
  size_t smem;
  Kernel* kernel;
  template <class... Args>
  void operator()(Args... args) const {
    if (block.x == 0 || block.x > 1024 || grid.x == 0 || smem > static_cast<size_t>(func_smem_limit()) ||
        smem > static_cast<size_t>(kMaxSmemBytes)) {
      last_error() = cudaErrorInvalidValue;
      return;
    }
    BlockState& s = state();
    s.grid_dim = grid;
    s.block_dim = block;
    std::mt19937 rng(static_cast<unsigned>(schedule()));
    const std::function<void()> body = [&] { kernel(args...); };
    for (unsigned b = 0; b < grid.x; ++b) {
      s.block_idx = dim3(b);
      float* buf = reinterpret_cast<float*>(smem_buffer());
      std::fill(buf, buf + kMaxSmemBytes / sizeof(float), std::numeric_limits<float>::quiet_NaN());
      if (!run_block(block.x, body, rng)) {
        last_error() = cudaErrorLaunchFailure;
        return;
      }
    }
  }
};
template <class Kernel>
Launch<Kernel> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, Kernel* kernel) {
  return Launch<Kernel>{grid, block, smem, kernel};
}

}  // namespace cuda_emu

#define HADACONV_LAUNCH(kernel, grid, block, smem, stream) ::cuda_emu::launch(grid, block, smem, stream, &kernel)
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::state().block_idx)
#define blockDim (::cuda_emu::state().block_dim)
#define gridDim (::cuda_emu::state().grid_dim)
inline void __syncthreads() { ::cuda_emu::sync_threads(); }

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? cuda_emu::smem_limit() : 1;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int value) {
  if (value > cuda_emu::kMaxSmemBytes) return cudaErrorInvalidValue;
  cuda_emu::func_smem_limit() = value;
  return cudaSuccess;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::last_error(); }
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::last_error();
  cuda_emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes);
  if (*p) std::memset(*p, 0xff, bytes);  // NaN-filled, as the shared memory
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

extern "C" __attribute__((visibility("default"), used)) inline void cuda_emu_set_schedule(int s) { cuda_emu::schedule() = s; }
extern "C" __attribute__((visibility("default"), used)) inline void cuda_emu_set_smem_limit(int bytes) {
  cuda_emu::smem_limit() = bytes;
}
