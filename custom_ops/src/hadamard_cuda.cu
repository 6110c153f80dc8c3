// CUDA kernel of com.hadaconv::HadamardAffine: one pass over global memory per row.
//
// A thread block owns a row (looping over rows when the grid is capped).  The row lives in
// fp32 shared memory (or, for rows too long for shared memory, in a per-block slice of device
// scratch, which the same code addresses through one pointer):
//   pass 0   each thread loads 8 consecutive elements (16-byte loads when aligned), converts to
//            fp32 and does strides 1, 2, 4 in registers;
//   pass 1+  radix-8 (then 4, 2) butterflies at strides 8 .. L/2, one __syncthreads each;
//            consecutive threads touch consecutive words (bank-conflict free from stride 32;
//            strides 8 and 16 see 4- and 2-way conflicts, a small share of the passes);
//   last     the m x m core (sign bits in the kernel parameters, uniform across a warp), the
//            scale, and the affine (vector or b x b blocks) fused into the write-out.
// Everything accumulates in fp32 whatever T is.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "hadamard_cuda.h"

namespace hadaconv {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;

// The launch, behind a macro so that tests/cuda_emu can run this file on the CPU unchanged.
#ifndef HADACONV_LAUNCH
#define HADACONV_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

struct Params {
  int64_t rows, n, L;
  int m, log2L;
  float scale;
  const void* gamma;
  int64_t gamma_b;  // 0 none, 1 vector, b > 1 blocks
  const void* beta;
  float* ws;        // null: the row lives in shared memory
  int64_t ws_floats;  // floats of scratch per block
  bool vec;         // 16-byte loads/stores are legal for every row
  CoreBits core;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 8 consecutive elements <-> fp32 registers; `vec` says p is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float v[8], bool vec) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_f(h[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f(p[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float v[8], bool vec) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint4 raw;
      T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) h[i] = from_f<T>(v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = from_f<T>(v[i]);
  }
}

template <int P>
__device__ __forceinline__ void butterflies(float* v) {
#pragma unroll
  for (int h = 1; h < P; h <<= 1)
#pragma unroll
    for (int t = 0; t < P; ++t)
      if (!(t & h)) {
        const float a = v[t], b = v[t + h];
        v[t] = a + b;
        v[t + h] = a - b;
      }
}

// Radix-2^R butterflies at stride s over the whole row in `buf`.
template <int R>
__device__ __forceinline__ void radix_pass(float* buf, int64_t n, int64_t s, int log2s) {
  constexpr int P = 1 << R;
  for (int64_t g = threadIdx.x; g < (n >> R); g += blockDim.x) {
    const int64_t base = ((g >> log2s) << (log2s + R)) + (g & (s - 1));
    float v[P];
#pragma unroll
    for (int t = 0; t < P; ++t) v[t] = buf[base + t * s];
    butterflies<P>(v);
#pragma unroll
    for (int t = 0; t < P; ++t) buf[base + t * s] = v[t];
  }
}

__device__ __forceinline__ bool core_negative(const Params& p, int a, int a2) {
  const int bit = a * p.m + a2;
  return (p.core.w[bit >> 5] >> (bit & 31)) & 1u;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) hadamard_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                          const __grid_constant__ Params p) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  // __grid_constant__: the core bits are indexed dynamically and must stay in the constant
  // bank instead of being copied to local memory.  The scratch (smem or device) is 16-byte
  // aligned and n is a multiple of 8 whenever the float4 accesses below run.
  float* buf = p.ws ? p.ws + blockIdx.x * p.ws_floats : smem;
  float* buf2 = buf + p.n;  // z' for block gammas when m > 1
  const T* gamma = static_cast<const T*>(p.gamma);
  const T* beta = static_cast<const T*>(p.beta);
  const int64_t n = p.n, L = p.L;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = x + row * n;
    T* yr = y + row * n;

    // Pass 0.
    int done;  // log2 of the strides finished
    if (L >= 8) {
      for (int64_t g = threadIdx.x; g < n / 8; g += blockDim.x) {
        float v[8];
        load8(xr + g * 8, v, p.vec);
        butterflies<8>(v);
        // Two 16-byte stores per thread: 2-way bank conflicts instead of 8-way for scalars.
        reinterpret_cast<float4*>(buf + g * 8)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(buf + g * 8)[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
      done = 3;
    } else {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) buf[i] = to_f(xr[i]);
      done = 0;
    }
    // Passes 1+.
    while (done < p.log2L) {
      __syncthreads();
      const int r = min(3, p.log2L - done);
      const int64_t s = int64_t(1) << done;
      if (r == 3) radix_pass<3>(buf, n, s, done);
      else if (r == 2) radix_pass<2>(buf, n, s, done);
      else radix_pass<1>(buf, n, s, done);
      done += r;
    }
    __syncthreads();

    if (p.m == 1) {
      // z = scale * buf; chunks of 8 for 16-byte stores where the row allows it.
      if (p.gamma_b > 1) {
        const int64_t b = p.gamma_b;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
          const int64_t blk = i / b, q0 = blk * b;
          const T* grow = gamma + blk * b * b + (i - q0) * b;
          float acc = 0.f;
          for (int64_t q = 0; q < b; ++q) acc = fmaf(to_f(grow[q]), buf[q0 + q], acc);
          acc *= p.scale;
          if (beta) acc += to_f(beta[i]);
          yr[i] = from_f<T>(acc);
        }
      } else if (n >= 8) {
        for (int64_t g = threadIdx.x; g < n / 8; g += blockDim.x) {
          float v[8], gv[8], bv[8];
          const float4 lo = reinterpret_cast<const float4*>(buf + g * 8)[0];
          const float4 hi = reinterpret_cast<const float4*>(buf + g * 8)[1];
          v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w; v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
#pragma unroll
          for (int t = 0; t < 8; ++t) v[t] *= p.scale;
          if (gamma) {
            load8(gamma + g * 8, gv, p.vec);
#pragma unroll
            for (int t = 0; t < 8; ++t) v[t] *= gv[t];
          }
          if (beta) {
            load8(beta + g * 8, bv, p.vec);
#pragma unroll
            for (int t = 0; t < 8; ++t) v[t] += bv[t];
          }
          store8(yr + g * 8, v, p.vec);
        }
      } else {
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
          float v = buf[i] * p.scale;
          if (gamma) v *= to_f(gamma[i]);
          if (beta) v += to_f(beta[i]);
          yr[i] = from_f<T>(v);
        }
      }
    } else {
      // Core product, 4 output segments per work item (core orders > 1 are multiples of 4).
      const bool blocks = p.gamma_b > 1;
      for (int64_t w = threadIdx.x; w < (p.m / 4) * L; w += blockDim.x) {
        const int a0 = static_cast<int>(w / L) * 4;
        const int64_t b = w - (w / L) * L;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        for (int a2 = 0; a2 < p.m; ++a2) {
          const float z = buf[a2 * L + b];
#pragma unroll
          for (int t = 0; t < 4; ++t) acc[t] += core_negative(p, a0 + t, a2) ? -z : z;
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const int64_t i = (a0 + t) * L + b;
          float v = acc[t] * p.scale;
          if (blocks) {
            buf2[i] = v;
            continue;
          }
          if (gamma) v *= to_f(gamma[i]);
          if (beta) v += to_f(beta[i]);
          yr[i] = from_f<T>(v);
        }
      }
      if (blocks) {
        __syncthreads();
        const int64_t bb = p.gamma_b;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
          const int64_t blk = i / bb, q0 = blk * bb;
          const T* grow = gamma + blk * bb * bb + (i - q0) * bb;
          float acc = 0.f;
          for (int64_t q = 0; q < bb; ++q) acc = fmaf(to_f(grow[q]), buf2[q0 + q], acc);
          if (beta) acc += to_f(beta[i]);
          yr[i] = from_f<T>(acc);
        }
      }
    }
    __syncthreads();  // buf is reused by the next row
  }
}

int64_t scratch_floats(const Args& a) { return a.n * ((a.m > 1 && a.gamma_b > 1) ? 2 : 1); }

int threads_for(int64_t n) {
  const int64_t t = ((n / 8 + 31) / 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

// Where the row lives: shared memory when it fits the device's opt-in limit, else scratch.
struct Layout {
  bool in_smem;
  int64_t grid;
  size_t smem_bytes, ws_bytes;
  const char* error;
};

Layout layout(const Args& a) {
  Layout l{true, 0, 0, 0, nullptr};
  int dev = 0, smem_max = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) {
    l.error = cudaGetErrorString(e);
    return l;
  }
  if (a.L & (a.L - 1) || a.n != a.m * a.L || a.m > kMaxCore || (a.m > 1 && a.m % 4)) {
    l.error = "unsupported n / m for the CUDA kernel";
    return l;
  }
  const size_t bytes = static_cast<size_t>(scratch_floats(a)) * sizeof(float);
  // Grid-stride over rows; the grid stays within what one launch may have.
  l.grid = a.rows < (int64_t(1) << 30) ? a.rows : (int64_t(1) << 30);
  if (bytes <= static_cast<size_t>(smem_max)) {
    l.smem_bytes = bytes;
  } else {
    l.in_smem = false;
    const int64_t cap = int64_t(sms) * 2;
    l.grid = l.grid < cap ? l.grid : cap;
    l.ws_bytes = bytes * static_cast<size_t>(l.grid);
  }
  return l;
}

// The kernels' dynamic shared-memory limit, raised once per device to the device's opt-in
// maximum (a process-wide function attribute: setting it per launch to the launch's own size
// raced between sessions on different threads).  layout() never asks for more than that.
constexpr int kMaxDevices = 64;

const char* allow_large_smem() {
  static std::once_flag once[kMaxDevices];
  static const char* error[kMaxDevices] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (dev < 0 || dev >= kMaxDevices) return "device index out of range";
  std::call_once(once[dev], [dev] {
    int smem_max = 0;
    cudaError_t err = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    const auto attr = cudaFuncAttributeMaxDynamicSharedMemorySize;
    if (err == cudaSuccess) err = cudaFuncSetAttribute(hadamard_kernel<float>, attr, smem_max);
    if (err == cudaSuccess) err = cudaFuncSetAttribute(hadamard_kernel<__half>, attr, smem_max);
    if (err == cudaSuccess) err = cudaFuncSetAttribute(hadamard_kernel<__nv_bfloat16>, attr, smem_max);
    if (err != cudaSuccess) error[dev] = cudaGetErrorString(err);
  });
  return error[dev];
}

template <typename T>
const char* launch_typed(const Args& a, const CoreBits& core, void* ws, cudaStream_t stream) {
  const Layout l = layout(a);
  if (l.error) return l.error;
  if (l.grid == 0) return nullptr;
  if (!l.in_smem && !ws) return "missing device scratch for a long row";
  Params p;
  p.rows = a.rows;
  p.n = a.n;
  p.L = a.L;
  p.m = static_cast<int>(a.m);
  p.log2L = 0;
  while ((int64_t(1) << p.log2L) < a.L) ++p.log2L;
  p.scale = a.scale;
  p.gamma = a.gamma;
  p.gamma_b = a.gamma ? a.gamma_b : 0;
  p.beta = a.beta;
  p.ws = l.in_smem ? nullptr : static_cast<float*>(ws);
  p.ws_floats = scratch_floats(a);
  // Rows start 16-byte aligned when the base pointers are and a row is a multiple of 16 bytes;
  // gamma/beta are only read with 16-byte loads in the m == 1 vector path, so check them too.
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; };
  p.vec = aligned(a.x) && aligned(a.y) && (a.n * sizeof(T)) % 16 == 0 && (!a.gamma || aligned(a.gamma)) &&
          (!a.beta || aligned(a.beta));
  p.core = core;
  if (l.smem_bytes > 48 * 1024) {
    const char* err = allow_large_smem();
    if (err) return err;
  }
  HADACONV_LAUNCH(hadamard_kernel<T>, static_cast<unsigned>(l.grid), threads_for(a.n), l.smem_bytes, stream)(
      static_cast<const T*>(a.x), static_cast<T*>(a.y), p);
  // Peek, not Get: the launch error belongs to this launch, and reading it must not clear a
  // sticky error some other library on this thread still has to see.
  const cudaError_t e = cudaPeekAtLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

size_t workspace_bytes(const Args& args, const char** error) {
  const Layout l = layout(args);
  *error = l.error;
  return l.error ? 0 : l.ws_bytes;
}

const char* launch(const Args& args, const CoreBits& core, void* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32: return launch_typed<float>(args, core, workspace, s);
    case DType::kFloat16: return launch_typed<__half>(args, core, workspace, s);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, core, workspace, s);
  }
  return "unsupported element type";
}

}  // namespace cuda
}  // namespace hadaconv
