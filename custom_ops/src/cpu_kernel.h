// The CPU row kernel, written once over a small SIMD "traits" type V and instantiated by each
// instruction-set translation unit (cpu_portable.cc, cpu_avx2.cc, cpu_avx512.cc) with its own
// compiler flags.
//
// Everything in this header has internal linkage (an unnamed namespace), on purpose: the same
// template compiled with -mavx512f in one TU and without it in another must never be merged by
// the linker (the ODR would let it keep the AVX-512 copy for the portable path, which then dies
// with SIGILL on an AVX2 machine).  For the same reason the kernel uses no std:: templates.
//
// One row of n = m * L floats (L = 2^k) goes through an fp32 scratch row that stays in L1:
//   pass 0   load + convert the input, butterflies of strides < W inside each vector (shuffles),
//            and up to 3 more strides across vectors, in registers; store to scratch; the next
//            row's input is prefetched meanwhile (over all passes on long rows, see Paced), so
//            memory and arithmetic overlap;
//   pass 1+  radix-8 (then 4, 2) butterflies in place for the remaining strides < L; for m = 1
//            the last group writes y = g * v + beta straight from registers;
//   core     (m > 1) the m x m +-1 product, column chunk by column chunk: for each group of 4
//            core columns the 16 signed sums +-z0 +-z1 +-z2 +-z3 are formed once (22 adds),
//            and every output segment then adds one of them per group, so an output costs
//            m/4 adds instead of m multiply-adds (the "mailman" trick for +-1 matrices); the
//            diagonal affine is fused into the write-out.  Where a segment is a single vector
//            (576 = 36 x 16 with AVX-512) two rows go through the core together, sharing each
//            look-up offset, gamma and beta, and the segments' transform (`intra`) is done as
//            the core loads the input: no pass 0, no scratch row;
//   blocks   block-diagonal gammas take one more pass (b x b products, kBlockRows rows at once).
// A row over kL1Row bytes (f32: n > 4096) has its output lines requested while the transform
// passes run, and (with a core of padded segments, L >= 256) its y written in order after the
// core: writing a line of y reads it from memory first, and issued only at the write-out that
// read stalled the row (5120 and 8192 on the Intel Xeon: the output's write-allocate did not
// overlap the arithmetic at all).
#pragma once

#include <cstdint>

#include "cpu_kernel_api.h"

// The row kernel's building blocks are forced inline: left to the compiler, which of them it
// inlines or clones changes with unrelated code in the same file, and with it the speed of a
// width by 10-20% (measured on n = 576 and 768 with GCC 14).
#define HADACONV_HOT __attribute__((always_inline)) inline

namespace hadaconv {
namespace cpu {

// bfloat16 storage, distinct from IEEE half's uint16_t so the traits can overload on it.
struct BF16 {
  uint16_t bits;
};

namespace {

// How the next row's input reaches L1 while the current row is worked on.  A step is about one
// vector through a Sylvester pass; the passes take their own copy of the state (a local stays in
// registers, and the vector stores around it may alias anything).
//
// Both fetch the next row [end - bytes, end) from its start, one line at `end - left`, so that no
// pointer past the row's end is ever formed, whatever its length.
struct NextRow {
  const char* end = nullptr;
  int64_t left = 0;  // bytes of the next row not yet fetched

  template <int kLocality>
  HADACONV_HOT void line() {
    __builtin_prefetch(end - left, 0, kLocality);
    left -= 64;
  }
  template <int kLocality>
  void rest() {
    while (left > 0) line<kLocality>();
  }
  void start(const void* q, int64_t bytes) {
    end = q ? static_cast<const char*>(q) + bytes : nullptr;
    left = q ? bytes : 0;
  }
};

// Burst: one cache line a step of the first pass, as that pass loads the current row, so the
// misses overlap its arithmetic.  A next row over kL1Row bytes goes to L2 only, as in Paced.
constexpr int64_t kL1Row = 16384;
struct Burst : NextRow {
  static constexpr bool kPaced = false;
  bool to_l2 = false;

  HADACONV_HOT void step() {
    if (left > 0) {
      if (to_l2) line<2>();
      else line<3>();
    }
  }
  // Ends the row (fetching what is left) and begins one whose successor is [q, q + bytes), or
  // nothing for q null.
  void next(const void* q, int64_t bytes) {
    if (to_l2) rest<2>();
    else rest<3>();
    start(q, bytes);
    to_l2 = bytes > kL1Row;
  }
};

// Paced: one line every `every` steps of every pass, `every` from the steps the previous row
// took (the rows of a call share one plan; the first row fetches a line a step), aiming to finish
// by three quarters of the row.  On a long row the first pass is a small part of the work: a
// burst there stalls it on the misses while the later passes leave memory idle (n = 4096 and
// 8192 on the Intel Xeon: about 1.75x the elementwise floor in a burst, 1.3-1.6x paced).  A next
// row over kL1Row bytes goes to L2 only: in L1 (48 KB here) it would evict the current row's
// scratch (n = 8192: 1.64-1.89x the floor fetched into L1, 1.55-1.67x into L2).  Where pacing
// pays is decided by `paced`.
struct Paced : NextRow {
  static constexpr bool kPaced = true;
  int64_t every = 1, count = 1;
  int64_t steps = 0;  // steps taken in this row
  bool to_l2 = false;

  HADACONV_HOT void step() {
    ++steps;
    if (--count) return;
    count = every;
    if (left > 0) {
      if (to_l2) line<2>();
      else line<3>();
    }
  }
  void next(const void* q, int64_t bytes) {
    rest<2>();
    const int64_t lines = (bytes + 63) / 64;
    every = steps > 0 && lines > 0 ? (3 * steps / 4) / lines : 1;
    if (every < 1) every = 1;
    count = every;
    steps = 0;
    start(q, bytes);
    to_l2 = bytes > kL1Row;
  }
};

// Asks for the lines of y[0, count) into L2 ahead of the pass that writes them (see the file
// comment: long rows).
template <class T>
HADACONV_HOT void request_output(const T* y, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(y);
  for (int64_t k = 0; k < count * static_cast<int64_t>(sizeof(T)); k += 64) __builtin_prefetch(bytes + k, 1, 2);
}

template <class V, int P>
HADACONV_HOT void butterflies(typename V::reg* v) {
  for (int h = 1; h < P; h <<= 1)
    for (int t = 0; t < P; ++t)
      if (!(t & h)) {
        const typename V::reg a = v[t], b = v[t + h];
        v[t] = V::add(a, b);
        v[t + h] = V::sub(a, b);
      }
}

// Where a butterfly group's results go: back to the scratch, or (the last group of a pure
// power-of-two row) y = g * v + beta straight from registers.
template <class T>
struct Sink {
  T* y;
  const float* g;
  const float* beta;
};

// A radix-2^R butterfly group at stride `stride` (a multiple of V::W) over n floats of `s`: the
// Sylvester stages commute, so that is simply all blocks of 2^R * stride elements.  With
// kAffine the group is the last one and writes to the sink instead.
template <class V, int R, bool kAffine, class T, class A>
HADACONV_HOT void radix_pass(float* s, int64_t n, int64_t stride, Sink<T> out, A& ahead) {
  constexpr int P = 1 << R;
  const int64_t span = stride << R;
  A ah = ahead;
  for (int64_t base = 0; base < n; base += span) {
    for (int64_t j = 0; j < stride; j += V::W) {
      const int64_t i = base + j;
      typename V::reg v[P];
      for (int t = 0; t < P; ++t) v[t] = V::load(s + i + t * stride);
      if constexpr (A::kPaced)
        for (int t = 0; t < P; ++t) ah.step();
      butterflies<V, P>(v);
      for (int t = 0; t < P; ++t) {
        const int64_t k = i + t * stride;
        if (kAffine)
          V::store(out.y + k, V::fmadd(v[t], V::load(out.g + k), V::load(out.beta + k)));
        else
          V::store(s + k, v[t]);
      }
    }
  }
  if constexpr (A::kPaced) ahead = ah;
}

// Pass 0: n inputs -> scratch with every stride < W * 2^R done in registers.  The input is
// read in contiguous runs of 2^R vectors, the way the hardware prefetcher likes it.
template <class V, int R, bool kAffine, class T, class A>
HADACONV_HOT void first_pass(const T* x, float* s, int64_t n, Sink<T> out, A& ahead) {
  constexpr int P = 1 << R;
  A ah = ahead;
  for (int64_t base = 0; base < n; base += P * V::W) {
    for (int t = 0; t < P; ++t) ah.step();
    typename V::reg v[P];
    for (int t = 0; t < P; ++t) v[t] = V::intra(V::load(x + base + t * V::W));
    butterflies<V, P>(v);
    for (int t = 0; t < P; ++t) {
      const int64_t k = base + t * V::W;
      if (kAffine)
        V::store(out.y + k, V::fmadd(v[t], V::load(out.g + k), V::load(out.beta + k)));
      else
        V::store(s + k, v[t]);
    }
  }
  ahead = ah;
}

template <class V, bool kAffine, class T, class A>
inline void first_pass_r(int R, const T* x, float* s, int64_t n, Sink<T> out, A& ah) {
  if (R == 3) first_pass<V, 3, kAffine>(x, s, n, out, ah);
  else if (R == 2) first_pass<V, 2, kAffine>(x, s, n, out, ah);
  else if (R == 1) first_pass<V, 1, kAffine>(x, s, n, out, ah);
  else first_pass<V, 0, kAffine>(x, s, n, out, ah);
}

template <class V, bool kAffine, class T, class A>
inline void radix_pass_r(int R, float* s, int64_t n, int64_t stride, Sink<T> out, A& ah) {
  if (R == 3) radix_pass<V, 3, kAffine>(s, n, stride, out, ah);
  else if (R == 2) radix_pass<V, 2, kAffine>(s, n, stride, out, ah);
  else radix_pass<V, 1, kAffine>(s, n, stride, out, ah);
}

// Sylvester blocks up to this many floats are finished while they sit in L1, before the
// strides that span several blocks run over the whole segment.
constexpr int64_t kLocal = 1024;
// Fusing the affine into a butterfly group at a stride of this many bytes or more makes its
// four streams (s, y, g, beta) fight over the same few L1 sets: a separate pass is cheaper.
constexpr int64_t kFuseStrideBytes = 1024;

// H_L (unscaled) of every L-long segment of x[0, len) into s[0, len); with `fuse` (m = 1, no
// blocks, len = L) the result goes to the sink instead, y = g * (H x) + beta.
template <class V, class T, class A>
inline void sylvester(const T* x, float* s, int64_t len, int64_t L, bool fuse, Sink<T> out, A& ah) {
  const int64_t LB = L < kLocal ? L : kLocal;
  // Largest first group: strides W .. W * 2^R0 in registers.
  const int R0 = L >= 8 * V::W ? 3 : (L >= 4 * V::W ? 2 : (L >= 2 * V::W ? 1 : 0));
  const int64_t done0 = int64_t{V::W} << R0;  // strides below this are finished by pass 0
  if (LB == done0) {  // short segments: one pass over the whole run does everything
    if (fuse) return first_pass_r<V, true>(R0, x, s, len, out, ah);
    return first_pass_r<V, false>(R0, x, s, len, out, ah);
  }
  // Otherwise block by block, each finished while it sits in L1.
  for (int64_t base = 0; base < len; base += LB) {
    // Without `fuse` the sink is null and unused: offsetting a null pointer is undefined.
    const Sink<T> o = fuse ? Sink<T>{out.y + base, out.g + base, out.beta + base} : out;
    // A long row's Y is written by the last pass; its lines are requested block by block here.
    if (fuse && LB < L && len * static_cast<int64_t>(sizeof(T)) > kL1Row) request_output(out.y + base, LB);
    first_pass_r<V, false>(R0, x + base, s + base, LB, o, ah);
    for (int64_t done = done0; done < LB;) {
      const int64_t left = LB / done;  // 2^(stages left in the block)
      const int R = left >= 8 ? 3 : (left == 4 ? 2 : 1);
      if (fuse && LB == L && (done << R) == L && done * 4 < kFuseStrideBytes)
        return radix_pass_r<V, true>(R, s + base, LB, done, o, ah);
      radix_pass_r<V, false>(R, s + base, LB, done, o, ah);
      done <<= R;
    }
  }
  for (int64_t done = LB; done < L;) {
    const int64_t left = L / done;
    const int R = left >= 8 ? 3 : (left == 4 ? 2 : 1);
    if (fuse && (done << R) == L && done * 4 < kFuseStrideBytes) return radix_pass_r<V, true>(R, s, len, done, out, ah);
    radix_pass_r<V, false>(R, s, len, done, out, ah);
    done <<= R;
  }
  if (fuse) {
    A a = ah;
    for (int64_t k = 0; k < len; k += V::W) {
      if constexpr (A::kPaced) a.step();
      V::store(out.y + k, V::fmadd(V::load(s + k), V::load(out.g + k), V::load(out.beta + k)));
    }
    if constexpr (A::kPaced) ah = a;
  }
}

// What the core pass works on: NV vectors per column chunk, either side by side in one row
// (kRows false: vector v is W floats after vector v - 1, in and out, and takes gamma and beta
// from there too) or the same columns of NV rows (kRows true: vector v is v * zstep floats
// further in the scratch, v * ystep elements further in the output, and shares gamma and beta
// with vector 0).
template <class T, class Z = float>
struct CoreIo {
  const Z* z;      // segment a' of the transformed row at z + a' * Ls (see kIntra in sign_table)
  T* y;            // the output row (the affine fused), or null
  float* out;      // z' without the affine (block gammas follow), or null
  int64_t zstep, ystep;  // kRows only
};

// Column vectors per core chunk: 2 where the segment allows (the look-up offsets then serve two
// vectors), 8 for the scalar kernel (a loop the compiler may vectorize).
template <class V>
constexpr int core_chunk() {
  return V::W == 1 ? 8 : 2;
}

// Floats per slot of the core's tables: the widest column chunk of this instruction set (a
// wider stride would spread the tables over twice the cache lines).
template <class V>
constexpr int64_t slot_floats() {
  return int64_t{core_chunk<V>()} * V::W;
}

template <class V, bool kIntra, class Z>
HADACONV_HOT typename V::reg load_z(const Z* z) {
  return kIntra ? V::intra(V::load(z)) : V::load(z);
}

// The 16 signed sums of core columns 4g .. 4g+3 for the NV vectors at `col`: slot s (bit 3 - i
// set where z_i enters with -1) at tbl + (g * 16 + s) * slot_floats<V>() + v * W.  With kIntra
// the segments are single vectors of the input row itself, their Sylvester transform (`intra`)
// done as they are loaded: no first pass, no scratch row.
template <class V, int NV, bool kRows, bool kIntra, class T, class Z>
HADACONV_HOT void sign_table(const CoreIo<T, Z> io, int64_t Ls, int64_t col, int g, float* tbl) {
  using reg = typename V::reg;
  constexpr int64_t S = slot_floats<V>();
  float* t = tbl + g * 16 * S;
  for (int v = 0; v < NV; ++v) {
    const Z* zc = io.z + v * (kRows ? io.zstep : V::W) + 4 * g * Ls + col;
    const reg z0 = load_z<V, kIntra>(zc), z1 = load_z<V, kIntra>(zc + Ls), z2 = load_z<V, kIntra>(zc + 2 * Ls),
              z3 = load_z<V, kIntra>(zc + 3 * Ls);
    const reg a0 = V::add(z0, z1), a1 = V::sub(z0, z1);
    const reg b[4] = {V::add(a0, z2), V::sub(a0, z2), V::add(a1, z2), V::sub(a1, z2)};
    reg q[8];
    for (int k = 0; k < 4; ++k) {
      q[2 * k] = V::add(b[k], z3);
      q[2 * k + 1] = V::sub(b[k], z3);
    }
    // -z0 with signs k' on z1..z3 is minus the pattern with every sign flipped: 7 - k'.
    for (int k = 0; k < 8; ++k) {
      V::store(t + k * S + v * V::W, q[k]);
      V::store(t + (8 + k) * S + v * V::W, V::sub(V::zero(), q[7 - k]));
    }
  }
}

// The core product z'[a*L + b] = sum_a' C[a][a'] z[a'*L + b] as table look-ups (see the file
// comment), then y = g * z' + beta (kAffine) or z' -> out.  Never inlined: GCC's inlined copy in
// transform_row ran 30% slower at n = 768 (registers spilled).
template <class V, int NV, bool kAffine, bool kRows, bool kIntra = false, class T, class Z, class A>
__attribute__((noinline)) void core_pass(const Plan& p, const CoreIo<T, Z> io, int64_t Ls, float* tbl, A& ahead) {
  using reg = typename V::reg;
  constexpr int64_t S = slot_floats<V>();
  const int64_t L = p.L;
  const int m = static_cast<int>(p.m), G = m / 4;
  A ah = ahead;
  for (int64_t col = 0; col < L; col += (kRows ? 1 : NV) * V::W) {
    for (int g = 0; g < G; ++g) {
      if constexpr (kIntra)  // the fetch of the next rows, as the first pass would have made it
        for (int t = 0; t < 4 * NV; ++t) ah.step();
      sign_table<V, NV, kRows, kIntra>(io, Ls, col, g, tbl);
    }
    for (int a = 0; a < m; ++a) {
      const uint16_t* sl = p.slots + a * G;
      reg acc[NV], acc2[NV];  // two chains: the adds' latency, not their count, would bound it
      for (int v = 0; v < NV; ++v) {
        acc[v] = V::load(tbl + sl[0] * S + v * V::W);
        acc2[v] = V::zero();
      }
      int g = 1;
      for (; g + 1 < G; g += 2) {
        const float *t0 = tbl + sl[g] * S, *t1 = tbl + sl[g + 1] * S;
        for (int v = 0; v < NV; ++v) {
          acc[v] = V::add(acc[v], V::load(t0 + v * V::W));
          acc2[v] = V::add(acc2[v], V::load(t1 + v * V::W));
        }
      }
      if (g < G) {
        const float* t0 = tbl + sl[g] * S;
        for (int v = 0; v < NV; ++v) acc[v] = V::add(acc[v], V::load(t0 + v * V::W));
      }
      for (int v = 0; v < NV; ++v) {
        const int64_t i = a * L + col;
        const reg r = V::add(acc[v], acc2[v]);
        if (kAffine) {
          const int64_t k = i + (kRows ? 0 : v * V::W);
          V::store(io.y + v * (kRows ? io.ystep : V::W) + i, V::fmadd(r, V::load(p.gvec + k), V::load(p.beta + k)));
        } else {
          V::store(io.out + v * (kRows ? io.ystep : V::W) + i, r);
        }
      }
    }
  }
  if constexpr (kIntra) ahead = ah;
}

// Block-diagonal affine for kRows rows at once: blocks were expanded by the op to B x B (B a
// multiple of W) and stored transposed, gt[j][q][p] = G_j[p][q], so each q contributes a
// broadcast z_q times contiguous columns, and each column of gamma loaded from cache serves
// kRows rows (gamma is b times the size of a row: streaming it once per row would cost more
// than the row itself).
template <class V, int kRows, int TP, class T>
HADACONV_HOT void block_tile_rows(const Plan& p, const float* z, T* const* y, int64_t j, int64_t p0) {
  const int64_t B = p.B, n = p.n;
  const float* g = p.blocks + j * B * B + p0;
  typename V::reg acc[kRows][TP];
  for (int t = 0; t < TP; ++t) {
    const typename V::reg b = V::load(p.beta + j * B + p0 + t * V::W);
    for (int r = 0; r < kRows; ++r) acc[r][t] = b;
  }
  for (int64_t q = 0; q < B; ++q) {
    typename V::reg gq[TP];
    for (int t = 0; t < TP; ++t) gq[t] = V::load(g + q * B + t * V::W);
    for (int r = 0; r < kRows; ++r) {
      const typename V::reg zq = V::set1(z[r * n + j * B + q]);
      for (int t = 0; t < TP; ++t) acc[r][t] = V::fmadd(gq[t], zq, acc[r][t]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < TP; ++t) V::store(y[r] + j * B + p0 + t * V::W, acc[r][t]);
}

// Tiles of kTile vectors (then 4, 2, 1 for what is left of the block): at most 16 accumulators
// over the kRows rows with AVX-512's 32 registers, at most 8 with AVX2's 16 (and the portable
// kernel), and at most 8 vectors a row, so that a decode-sized call of 1 or 2 rows still has 8
// independent sums (with 2 the fmadd chain's latency, 4 cycles, not the FMA units, would bound
// it) and 8 rows on AVX-512 have 16 in flight.
template <class V, int kRows, class T>
inline void block_pass_rows(const Plan& p, const float* z, T* const* y, int64_t j0, int64_t j1) {
  constexpr int kAcc = V::W == 16 ? 16 : 8;
  constexpr int kWant = kAcc / kRows >= 8 ? 8 : kAcc / kRows;
  constexpr int kTile = kWant >= 4 ? kWant - kWant % 4 : (kWant >= 2 ? 2 : 1);
  const int64_t B = p.B;
  for (int64_t j = j0; j < j1; ++j) {
    int64_t p0 = 0;
    for (; p0 + kTile * V::W <= B; p0 += kTile * V::W) block_tile_rows<V, kRows, kTile>(p, z, y, j, p0);
    if (kTile > 4 && p0 + 4 * V::W <= B) {
      block_tile_rows<V, kRows, 4>(p, z, y, j, p0);
      p0 += 4 * V::W;
    }
    if (kTile > 2 && p0 + 2 * V::W <= B) {
      block_tile_rows<V, kRows, 2>(p, z, y, j, p0);
      p0 += 2 * V::W;
    }
    if (p0 < B) block_tile_rows<V, kRows, 1>(p, z, y, j, p0);
  }
}

template <class V, int NV, class T, class A>
inline void core_row(const Plan& p, const CoreIo<T> io, int64_t Ls, float* tbl, A& ah) {
  if (!p.blocks) core_pass<V, NV, true, false>(p, io, Ls, tbl, ah);
  else core_pass<V, NV, false, false>(p, io, Ls, tbl, ah);
}

// One row x -> y (or, with blocks, -> z' in `zrow` for block_pass_rows); `s` is the row
// scratch (segments at a stride of segment_stride(L)), `tbl` the core's tables.
template <class V, class T, class A>
inline void transform_row(const Plan& p, const T* x, T* y, float* s, float* zrow, float* tbl, A& ah) {
  const int64_t L = p.L;
  const Sink<T> out{y, p.gvec, p.beta};
  if (p.m == 1) {
    // With blocks the Sylvester passes run in z' directly.
    if (p.blocks) sylvester<V>(x, zrow, L, L, false, out, ah);
    else sylvester<V>(x, s, L, L, true, out, ah);
    return;
  }
  const int64_t Ls = segment_stride(L);
  if (L == V::W) {  // single-vector segments: the core transforms them as it loads them
    const CoreIo<T, T> io{x, y, zrow, 0, 0};
    if (!p.blocks) core_pass<V, 1, true, false, true>(p, io, L, tbl, ah);
    else core_pass<V, 1, false, false, true>(p, io, L, tbl, ah);
    return;
  }
  // A long row's Y: written in order after the core, its lines requested segment by segment as
  // the segments are transformed (only where they are transformed one by one: padded, L >= 256;
  // the measured case, 5120 = 20 x 256).
  const bool long_row = y && !p.blocks && Ls != L && p.n * static_cast<int64_t>(sizeof(T)) > kL1Row;
  if (Ls == L) {
    sylvester<V>(x, s, p.n, L, false, out, ah);
  } else {
    for (int64_t a = 0; a < p.m; ++a) {
      if (long_row) request_output(y + a * L, L);
      sylvester<V>(x + a * L, s + a * Ls, L, L, false, out, ah);
    }
  }
  constexpr int NV = core_chunk<V>();
  if (long_row) {
    const CoreIo<T> io{s, nullptr, zrow, 0, 0};
    if (L >= NV * V::W) core_pass<V, NV, false, false>(p, io, Ls, tbl, ah);
    else core_pass<V, 1, false, false>(p, io, Ls, tbl, ah);
    for (int64_t k = 0; k < p.n; k += V::W)
      V::store(y + k, V::fmadd(V::load(zrow + k), V::load(p.gvec + k), V::load(p.beta + k)));
    return;
  }
  const CoreIo<T> io{s, y, zrow, 0, 0};
  if (L >= NV * V::W) core_row<V, NV>(p, io, Ls, tbl, ah);
  else core_row<V, 1>(p, io, Ls, tbl, ah);
}

// Two rows at once whose segments are one vector each (n = 576 = 36 x 16 with AVX-512), where a
// row alone would give the core pass a single vector per look-up: together they read each
// look-up offset, gamma and beta once for both.  A segment's Sylvester transform is then the
// in-register `intra`, which the core's table pass applies as it loads the input: no scratch
// rows.
template <class V, class T, class A>
inline void transform_pair(const Plan& p, const T* x, T* y, float* tbl, A& ah) {
  const CoreIo<T, T> io{x, y, nullptr, p.n, p.n};
  core_pass<V, 2, true, true, true>(p, io, p.L, tbl, ah);
}

// Blocks [j0, j1) of the block pass for rows [r0, r1) (at most kBlockRows), z' of row r0 + i
// at z + i * n.
template <class V, class T>
inline void blocks_typed(const Plan& p, const float* z, T* y, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  T* ys[kBlockRows];
  const int rows = static_cast<int>(r1 - r0);
  for (int i = 0; i < rows; ++i) ys[i] = y + (r0 + i) * p.n;
  switch (rows) {
    case 8: block_pass_rows<V, 8>(p, z, ys, j0, j1); break;
    case 7: block_pass_rows<V, 7>(p, z, ys, j0, j1); break;
    case 6: block_pass_rows<V, 6>(p, z, ys, j0, j1); break;
    case 5: block_pass_rows<V, 5>(p, z, ys, j0, j1); break;
    case 4: block_pass_rows<V, 4>(p, z, ys, j0, j1); break;
    case 3: block_pass_rows<V, 3>(p, z, ys, j0, j1); break;
    case 2: block_pass_rows<V, 2>(p, z, ys, j0, j1); break;
    default: block_pass_rows<V, 1>(p, z, ys, j0, j1); break;
  }
}

// Whether the next row is Paced: only rows whose Sylvester passes go beyond the L1-sized blocks
// (a power of two over kLocal), where the first pass is a small part of the row's work.  On
// shorter rows counting the steps cost more than it won (rows with a core: 5-10% slower).
inline bool paced(const Plan& p) {
  return p.m == 1 && p.L > kLocal;
}

// z' of rows [r0, r1) (at most kBlockRows) into z, with the row scratch s and the tables tbl.
template <class V, class A, class T>
inline void transform_with(const Plan& p, const T* x, int64_t r0, int64_t r1, float* z, float* s, float* tbl, const T* after) {
  const int64_t n = p.n;
  A ah;
  for (int64_t r = r0; r < r1; ++r) {
    ah.next(r + 1 < r1 ? x + (r + 1) * n : after, n * static_cast<int64_t>(sizeof(T)));
    transform_row<V>(p, x + r * n, static_cast<T*>(nullptr), s, z + (r - r0) * n, tbl, ah);
  }
}

// The same, the row scratch and tables from `scratch`; `after` is the row that follows r1 - 1.
template <class V, class T>
inline void transform_typed(const Plan& p, const T* x, int64_t r0, int64_t r1, float* z, float* scratch, const T* after) {
  float* s = scratch;
  float* tbl = scratch + scratch_tables(p.n, p.m);
  if (paced(p)) transform_with<V, Paced>(p, x, r0, r1, z, s, tbl, after);
  else transform_with<V, Burst>(p, x, r0, r1, z, s, tbl, after);
}

// Rows [r0, r1) x -> y without block gammas; s the row scratch.
template <class V, class A, class T>
inline void rows_with(const Plan& p, const T* x, T* y, int64_t r0, int64_t r1, float* s, float* zrow, float* tbl) {
  const int64_t n = p.n;
  A ah;
  // Rows [r, r + k) start: fetch the k after them, as far as they lie in [r0, r1).
  auto start = [&](int64_t r, int64_t k) {
    const int64_t e = r + 2 * k < r1 ? r + 2 * k : r1;
    if (e > r + k) ah.next(x + (r + k) * n, (e - r - k) * n * static_cast<int64_t>(sizeof(T)));
    else ah.next(nullptr, 0);
  };
  int64_t r = r0;
  if (p.m > 1 && p.L == V::W && core_chunk<V>() == 2)
    for (; r + 1 < r1; r += 2) {
      start(r, 2);
      transform_pair<V>(p, x + r * n, y + r * n, tbl, ah);
    }
  for (; r < r1; ++r) {
    start(r, 1);
    transform_row<V>(p, x + r * n, y + r * n, s, zrow, tbl, ah);
  }
}

// Block gammas go kBlockRows rows at a time (see block_tile_rows); z' of row r is kept at
// z + r * n, which is why the scratch holds (1 + kBlockRows) * n floats.
template <class V, class T>
inline void rows_typed(const Plan& p, const T* x, T* y, int64_t r0, int64_t r1, float* scratch) {
  const int64_t n = p.n;
  float* s = scratch;
  float* z = scratch + scratch_z(n, p.m);
  float* tbl = scratch + scratch_tables(n, p.m);
  if (p.blocks) {
    for (int64_t r = r0; r < r1; r += kBlockRows) {
      const int64_t e = r1 - r < kBlockRows ? r1 : r + kBlockRows;
      transform_typed<V>(p, x, r, e, z, scratch, e < r1 ? x + e * n : nullptr);
      blocks_typed<V>(p, z, y, r, e, 0, n / p.B);
    }
    return;
  }
  if (paced(p)) rows_with<V, Paced>(p, x, y, r0, r1, s, z, tbl);
  else rows_with<V, Burst>(p, x, y, r0, r1, s, z, tbl);
}

template <class V>
void run_transform(const Plan& p, DType dtype, const void* x, int64_t r0, int64_t r1, float* z, float* scratch) {
  switch (dtype) {
    case DType::kFloat32:
      transform_typed<V>(p, static_cast<const float*>(x), r0, r1, z, scratch, static_cast<const float*>(nullptr));
      break;
    case DType::kFloat16:
      transform_typed<V>(p, static_cast<const uint16_t*>(x), r0, r1, z, scratch, static_cast<const uint16_t*>(nullptr));
      break;
    case DType::kBFloat16:
      transform_typed<V>(p, static_cast<const BF16*>(x), r0, r1, z, scratch, static_cast<const BF16*>(nullptr));
      break;
  }
}

template <class V>
void run_blocks(const Plan& p, DType dtype, const float* z, void* y, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  switch (dtype) {
    case DType::kFloat32: blocks_typed<V>(p, z, static_cast<float*>(y), r0, r1, j0, j1); break;
    case DType::kFloat16: blocks_typed<V>(p, z, static_cast<uint16_t*>(y), r0, r1, j0, j1); break;
    case DType::kBFloat16: blocks_typed<V>(p, z, static_cast<BF16*>(y), r0, r1, j0, j1); break;
  }
}

template <class V>
void run_rows(const Plan& p, DType dtype, const void* x, void* y, int64_t r0, int64_t r1, float* scratch) {
  static_assert(kBlockRows == 8, "blocks_typed dispatches 1 .. 8 rows");
  static_assert(slot_floats<V>() <= kMaxChunk, "the core tables must fit the scratch");
  switch (dtype) {
    case DType::kFloat32:
      rows_typed<V>(p, static_cast<const float*>(x), static_cast<float*>(y), r0, r1, scratch);
      break;
    case DType::kFloat16:
      rows_typed<V>(p, static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), r0, r1, scratch);
      break;
    case DType::kBFloat16:
      rows_typed<V>(p, static_cast<const BF16*>(x), static_cast<BF16*>(y), r0, r1, scratch);
      break;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace hadaconv
