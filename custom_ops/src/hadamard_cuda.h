// Launcher of the CUDA kernel.  Plain C++ (no CUDA headers) so the op registration compiles
// with the host compiler; the stream is ORT's compute stream passed as a void*.
#pragma once

#include <cstdint>

namespace hadaconv {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Largest core order the kernel takes: the core travels as sign bits in the kernel parameters
// (128 * 128 bits = 2 KiB, under the 4 KiB classic parameter limit), so no device copy of it
// has to be kept in sync per stream.
constexpr int kMaxCore = 128;

struct CoreBits {
  uint32_t w[kMaxCore * kMaxCore / 32];  // bit (a * m + a') set where the (maybe transposed) core is -1
};

struct Args {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;     // [rows, n]
  void* y = nullptr;           // [rows, n]
  int64_t rows = 0;
  int64_t n = 0, m = 1, L = 1;  // n = m * L, L = 2^k <= 32768
  float scale = 1.0f;
  const void* gamma = nullptr;  // null, [n] (gamma_b == 1) or [n/b, b, b] (gamma_b == b > 1)
  int64_t gamma_b = 0;
  const void* beta = nullptr;   // null or [n]
};

// Bytes of device scratch the launch needs (0 when the row fits in shared memory), for the
// caller to allocate from ONNX Runtime's allocator; `error` set when the size is unsupported.
size_t workspace_bytes(const Args& args, const char** error);

// Enqueue the transform on `stream`.  Returns nullptr or a static error message.
const char* launch(const Args& args, const CoreBits& core, void* workspace, void* stream);

}  // namespace cuda
}  // namespace hadaconv
