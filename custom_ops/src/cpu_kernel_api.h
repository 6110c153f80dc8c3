// The interface between the op (hadamard_op.cc) and the per-instruction-set CPU kernels.
#pragma once

#include <cstdint>

namespace hadaconv {
namespace cpu {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Everything a row needs, in fp32, prepared once when the kernel is created (gamma and beta are
// constant initializers) or once per Compute call (they are graph inputs).  The transform's
// scale is folded into gvec / blocks, so the kernels never multiply by it.
struct Plan {
  int64_t n = 0, m = 1, L = 1;      // n = m * L, L a power of two
  // m > 1: for output segment a and input group g (core columns 4g .. 4g+3), the slot
  // g * 16 + s of the sign pattern s of C[a][4g..4g+3] (bit 3 - i set where entry i is -1),
  // [m][m/4]; C is the core or, for the inverse, its transpose.
  const uint16_t* slots = nullptr;
  const float* gvec = nullptr;      // [n] scale * gamma (scale alone without gamma); unused with blocks
  const float* beta = nullptr;      // [n] (zeros when absent)
  const float* blocks = nullptr;    // [n/B][B(q)][B(p)] scale * transposed block-diagonal gamma, or null
  int64_t B = 0;                    // block size of `blocks`, a multiple of the vector width
};

// Rows handled together by the block-gamma pass: each gamma vector loaded serves this many rows.
// At 4 the pass was bound by streaming the blocks from L2 (b = 64: 16 KB per block); 8 halves
// that and made the block pass 16-25% faster at n = 576 .. 5120 (Intel Xeon, AVX-512).
constexpr int kBlockRows = 8;
// The widest column chunk of the core pass, in floats (2 vectors of the widest ISA).
constexpr int kMaxChunk = 32;

// Floats between the segments of the scratch row: without it the m segments of a long
// power-of-two length map to the same few L1 sets when the core pass reads one column of each.
// Short segments (under 1 KiB) stay packed, so one pass can run over all of them.
constexpr int64_t kSegmentPad = 16;
constexpr int64_t segment_stride(int64_t L) { return L >= 256 ? L + kSegmentPad : L; }

// The scratch of one task, in floats from its start: the (padded) row, then kBlockRows rows of
// z' for block gammas (unused without them), then the sign-pattern tables of the core pass (16
// patterns per group of 4 core columns).
constexpr int64_t scratch_z(int64_t n, int64_t m) { return n + m * kSegmentPad; }
constexpr int64_t scratch_tables(int64_t n, int64_t m) { return scratch_z(n, m) + kBlockRows * n; }
constexpr int64_t scratch_floats(int64_t n, int64_t m) {
  return scratch_tables(n, m) + (m > 1 ? (m / 4) * 16 * kMaxChunk : 0);
}

// Rows [r0, r1) of x -> y; `scratch` holds scratch_floats(n, m) floats, 64-byte aligned,
// private to the caller.
using RowsFn = void (*)(const Plan&, DType, const void* x, void* y, int64_t r0, int64_t r1, float* scratch);

// The two halves of RowsFn for block gammas, so that a call of few rows can spread its blocks
// over threads (the blocks, not the transform, are what such a call reads from memory):
// TransformFn writes z' of rows [r0, r1) (at most kBlockRows) to z ([r1 - r0][n] floats) using
// `scratch` (scratch_floats(n, m), private to the caller); BlocksFn applies blocks [j0, j1) of
// the block pass (each B outputs wide) to those z' rows, writing y rows [r0, r1).  Tasks with
// disjoint block ranges may run at once on the same z.
using TransformFn = void (*)(const Plan&, DType, const void* x, int64_t r0, int64_t r1, float* z, float* scratch);
using BlocksFn = void (*)(const Plan&, DType, const float* z, void* y, int64_t r0, int64_t r1, int64_t j0, int64_t j1);

struct Isa {
  const char* name;
  int width;  // floats per vector; blocks are expanded to a multiple of it
  RowsFn rows;
  TransformFn transform;
  BlocksFn blocks;
};

Isa isa_portable();
Isa isa_avx2();    // valid only where the CPU has AVX2, FMA and F16C
Isa isa_avx512();  // valid only where the CPU has AVX512F (and F16C, FMA)

// The best instruction set of this CPU, lowered by the environment variable HADACONV_CPU_ISA
// (portable | avx2 | avx512), which tests use to cover every path the machine can run.
Isa select_isa();

}  // namespace cpu
}  // namespace hadaconv
