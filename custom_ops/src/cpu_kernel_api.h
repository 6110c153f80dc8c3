// The interface between the op (hadamard_op.cc) and the per-instruction-set CPU kernels.
#pragma once

#include <cstdint>

namespace hadaconv {
namespace cpu {

enum class DType { kFloat32, kFloat16 };

// Everything a row needs, prepared once per Compute call in fp32 (so half-precision gammas are
// converted once, not per row).
struct Plan {
  int64_t n = 0, m = 1, L = 1;      // n = m * L, L a power of two
  const float* coef = nullptr;      // [m][m]: scale * core (or its transpose), output-major
  const float* gvec = nullptr;      // [n] diagonal gamma (ones when absent); unused with blocks
  const float* beta = nullptr;      // [n] (zeros when absent)
  const float* blocks = nullptr;    // [n/B][B(q)][B(p)] transposed block-diagonal gamma, or null
  int64_t B = 0;                    // block size of `blocks`, a multiple of the vector width
};

// Rows handled together by the block-gamma pass.
constexpr int kBlockRows = 4;

// Rows [r0, r1) of x -> y; `scratch` holds (1 + kBlockRows) * n floats, 64-byte aligned,
// private to the caller.
using RowsFn = void (*)(const Plan&, DType, const void* x, void* y, int64_t r0, int64_t r1, float* scratch);

struct Isa {
  const char* name;
  int width;  // floats per vector; blocks are expanded to a multiple of it
  RowsFn rows;
};

Isa isa_portable();
Isa isa_avx2();    // valid only where the CPU has AVX2, FMA and F16C
Isa isa_avx512();  // valid only where the CPU has AVX512F (and F16C, FMA)

// The best instruction set of this CPU, lowered by the environment variable HADACONV_CPU_ISA
// (portable | avx2 | avx512), which tests use to cover every path the machine can run.
Isa select_isa();

}  // namespace cpu
}  // namespace hadaconv
