// Test harness for benchmarks/gpu_check.py: the CUDA launcher behind one C function, so the
// kernel can be checked on a GPU machine whose onnxruntime lacks the CUDA execution provider.
// Not part of libhadaconv_ort; built only with -DHADACONV_CUDA_HARNESS=ON.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "hadamard_cuda.h"

extern "C" __attribute__((visibility("default"))) const char* hadaconv_harness_run(
    int dtype, const void* x, void* y, int64_t rows, int64_t n, int64_t m, const int8_t* core, int transpose,
    float scale, const void* gamma, int64_t gamma_b, const void* beta, void* stream) {
  using namespace hadaconv::cuda;
  if (m > kMaxCore) return "m too large";
  static CoreBits bits;  // the harness is single-threaded
  std::memset(&bits, 0, sizeof(bits));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j)
      if ((transpose ? core[j * m + i] : core[i * m + j]) < 0) bits.w[(i * m + j) / 32] |= 1u << ((i * m + j) % 32);
  Args a;
  a.dtype = static_cast<DType>(dtype);
  a.x = x;
  a.y = y;
  a.rows = rows;
  a.n = n;
  a.m = m;
  a.L = n / m;
  a.scale = m == 1 && core[0] < 0 ? -scale : scale;  // as the op's read_attrs folds a 1 x 1 core
  a.gamma = gamma;
  a.gamma_b = gamma ? gamma_b : 0;
  a.beta = beta;
  const char* err = nullptr;
  const size_t ws_bytes = workspace_bytes(a, &err);
  if (err) return err;
  void* ws = nullptr;
  if (ws_bytes && cudaMalloc(&ws, ws_bytes) != cudaSuccess) return "cudaMalloc of the scratch failed";
  err = launch(a, bits, ws, stream);
  if (ws) {
    cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
    cudaFree(ws);
  }
  return err;
}
