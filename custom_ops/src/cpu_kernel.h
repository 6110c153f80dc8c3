// The CPU row kernel, written once over a small SIMD "traits" type V and instantiated by each
// instruction-set translation unit (cpu_portable.cc, cpu_avx2.cc, cpu_avx512.cc) with its own
// compiler flags.
//
// Everything in this header has internal linkage (an unnamed namespace), on purpose: the same
// template compiled with -mavx512f in one TU and without it in another must never be merged by
// the linker (the ODR would let it keep the AVX-512 copy for the portable path, which then dies
// with SIGILL on an AVX2 machine).  For the same reason the kernel uses no std:: templates.
//
// One row of n = m * L floats (L = 2^k) goes through an fp32 scratch buffer that stays in L1/L2:
//   pass 0   load + convert the input, butterflies of strides < W inside each vector (shuffles),
//            and up to 3 more strides across vectors, in registers; store to scratch;
//   pass 1+  radix-8 (then 4, 2) butterflies in place for the remaining strides < L;
//   last     the m x m core product across the m segments, with the scale folded into the
//            core coefficients and the diagonal affine (g, beta) fused into the write-out;
//            block-diagonal gammas take one more pass (b x b products) from a second buffer.
#pragma once

#include <cstdint>

#include "cpu_kernel_api.h"

namespace hadaconv {
namespace cpu {
namespace {

// A radix-2^R butterfly group at stride `stride` (a multiple of V::W) over the whole row: the
// Sylvester stages commute, so the row is simply all blocks of 2^R * stride elements.
template <class V, int R>
inline void radix_pass(float* s, int64_t n, int64_t stride) {
  constexpr int P = 1 << R;
  const int64_t span = stride << R;
  for (int64_t base = 0; base < n; base += span) {
    for (int64_t j = 0; j < stride; j += V::W) {
      float* p = s + base + j;
      typename V::reg v[P];
      for (int t = 0; t < P; ++t) v[t] = V::load(p + t * stride);
      for (int h = 1; h < P; h <<= 1)
        for (int t = 0; t < P; ++t)
          if (!(t & h)) {
            const typename V::reg a = v[t], b = v[t + h];
            v[t] = V::add(a, b);
            v[t + h] = V::sub(a, b);
          }
      for (int t = 0; t < P; ++t) V::store(p + t * stride, v[t]);
    }
  }
}

// The last butterfly group of a pure power-of-two row (m = 1, no blocks) fused with the
// write-out: y = (scale * v) * g + beta straight from registers, saving a pass over scratch.
template <class V, int R, class T>
inline void final_pass(const Plan& p, const float* s, T* y, int64_t stride) {
  constexpr int P = 1 << R;
  const typename V::reg c = V::set1(p.coef[0]);
  const int64_t span = stride << R;
  for (int64_t base = 0; base < p.n; base += span) {
    for (int64_t j = 0; j < stride; j += V::W) {
      const int64_t i = base + j;
      typename V::reg v[P];
      for (int t = 0; t < P; ++t) v[t] = V::load(s + i + t * stride);
      for (int h = 1; h < P; h <<= 1)
        for (int t = 0; t < P; ++t)
          if (!(t & h)) {
            const typename V::reg a = v[t], b = v[t + h];
            v[t] = V::add(a, b);
            v[t + h] = V::sub(a, b);
          }
      for (int t = 0; t < P; ++t) {
        const int64_t k = i + t * stride;
        V::store(y + k, V::fmadd(V::mul(v[t], c), V::load(p.gvec + k), V::load(p.beta + k)));
      }
    }
  }
}

// Pass 0: input -> scratch with every stride < W * 2^R done in registers.  The input is read
// in contiguous runs of 2^R vectors, the way the hardware prefetcher likes it.
template <class V, int R, class T>
inline void first_pass(const T* x, float* s, int64_t n) {
  constexpr int P = 1 << R;
  for (int64_t base = 0; base < n; base += P * V::W) {
    typename V::reg v[P];
    for (int t = 0; t < P; ++t) v[t] = V::intra(V::load(x + base + t * V::W));
    for (int h = 1; h < P; h <<= 1)
      for (int t = 0; t < P; ++t)
        if (!(t & h)) {
          const typename V::reg a = v[t], b = v[t + h];
          v[t] = V::add(a, b);
          v[t + h] = V::sub(a, b);
        }
    for (int t = 0; t < P; ++t) V::store(s + base + t * V::W, v[t]);
  }
}

// The core product z'[a*L + b] = sum_a' C[a][a'] z[a'*L + b] (C holds the scale and, for the
// inverse, the transpose), TA output segments at a time so each z vector is loaded once per
// tile, then y = g * z' + beta.  With blocks, z' goes to `out` (fp32) and g/beta are skipped.
template <class V, int TA, bool kAffine, class T>
inline void core_pass(const Plan& p, const float* z, T* y, float* out) {
  const int64_t L = p.L;
  const int m = static_cast<int>(p.m);
  for (int a0 = 0; a0 < m; a0 += TA) {
    const float* c = p.coef + a0 * m;
    for (int64_t b = 0; b < L; b += V::W) {
      typename V::reg acc[TA];
      for (int t = 0; t < TA; ++t) acc[t] = V::zero();
      for (int a = 0; a < m; ++a) {
        const typename V::reg zv = V::load(z + a * L + b);
        for (int t = 0; t < TA; ++t) acc[t] = V::fmadd(V::set1(c[t * m + a]), zv, acc[t]);
      }
      for (int t = 0; t < TA; ++t) {
        const int64_t i = (a0 + t) * L + b;
        if (kAffine)
          V::store(y + i, V::fmadd(acc[t], V::load(p.gvec + i), V::load(p.beta + i)));
        else
          V::store(out + i, acc[t]);
      }
    }
  }
}

// Block-diagonal affine from the fp32 z': blocks were expanded by the op to B x B (B a multiple
// of W) and stored transposed, gt[j][q][p] = G_j[p][q], so each q contributes a broadcast z_q
// times contiguous columns.  TP vectors of outputs per tile bound the live registers.
template <class V, int TP, class T>
inline void block_tile(const Plan& p, const float* z, T* y, int64_t j, int64_t p0) {
  const int64_t B = p.B;
  const float* g = p.blocks + j * B * B + p0;
  const float* zj = z + j * B;
  typename V::reg acc[TP];
  for (int t = 0; t < TP; ++t) acc[t] = V::load(p.beta + j * B + p0 + t * V::W);
  for (int64_t q = 0; q < B; ++q) {
    const typename V::reg zq = V::set1(zj[q]);
    for (int t = 0; t < TP; ++t) acc[t] = V::fmadd(V::load(g + q * B + t * V::W), zq, acc[t]);
  }
  for (int t = 0; t < TP; ++t) V::store(y + j * B + p0 + t * V::W, acc[t]);
}

template <class V, class T>
inline void block_pass(const Plan& p, const float* z, T* y) {
  const int64_t B = p.B;
  for (int64_t j = 0; j < p.n / B; ++j) {
    int64_t p0 = 0;
    for (; p0 + 4 * V::W <= B; p0 += 4 * V::W) block_tile<V, 4>(p, z, y, j, p0);
    switch ((B - p0) / V::W) {
      case 3: block_tile<V, 3>(p, z, y, j, p0); break;
      case 2: block_tile<V, 2>(p, z, y, j, p0); break;
      case 1: block_tile<V, 1>(p, z, y, j, p0); break;
      default: break;
    }
  }
}

// The same for kRows rows at once: each column of gamma loaded from cache then serves kRows
// rows.  Gamma is b times the size of a row, so streaming it once per row would cost more
// than the row itself.
template <class V, int kRows, int TP, class T>
inline void block_tile_rows(const Plan& p, const float* z, T* const* y, int64_t j, int64_t p0) {
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

template <class V, int kRows, class T>
inline void block_pass_rows(const Plan& p, const float* z, T* const* y) {
  const int64_t B = p.B;
  for (int64_t j = 0; j < p.n / B; ++j) {
    int64_t p0 = 0;
    for (; p0 + 2 * V::W <= B; p0 += 2 * V::W) block_tile_rows<V, kRows, 2>(p, z, y, j, p0);
    if (p0 < B) block_tile_rows<V, kRows, 1>(p, z, y, j, p0);
  }
}

template <class V, class T>
inline void transform_row(const Plan& p, const T* x, T* y, float* s, float* s2, bool block_pass_too = true) {
  const int64_t n = p.n, L = p.L;
  // Pass 0 takes as many of the strides W, 2W, 4W as L allows.
  int64_t done;  // strides below `done` are finished
  if (L >= 8 * V::W) {
    first_pass<V, 3>(x, s, n);
    done = 8 * V::W;
  } else if (L >= 4 * V::W) {
    first_pass<V, 2>(x, s, n);
    done = 4 * V::W;
  } else if (L >= 2 * V::W) {
    first_pass<V, 1>(x, s, n);
    done = 2 * V::W;
  } else {
    first_pass<V, 0>(x, s, n);
    done = V::W;
  }
  // The remaining strides in groups of up to 3; for m = 1 without blocks the last group
  // writes the output itself.
  const bool fuse = p.m == 1 && !p.blocks;
  while (done < L) {
    const int64_t left = L / done;  // 2^(stages left)
    const int R = left >= 8 ? 3 : (left == 4 ? 2 : 1);
    const bool last = (done << R) == L;
    if (fuse && last) {
      if (R == 3) final_pass<V, 3>(p, s, y, done);
      else if (R == 2) final_pass<V, 2>(p, s, y, done);
      else final_pass<V, 1>(p, s, y, done);
      return;
    }
    if (R == 3) radix_pass<V, 3>(s, n, done);
    else if (R == 2) radix_pass<V, 2>(s, n, done);
    else radix_pass<V, 1>(s, n, done);
    done <<= R;
  }
  // Hadamard core orders are 1 or multiples of 4, so a tile of 4 always divides m.
  if (p.blocks) {
    if (p.m == 1) core_pass<V, 1, false>(p, s, y, s2);
    else core_pass<V, 4, false>(p, s, y, s2);
    if (block_pass_too) block_pass<V>(p, s2, y);
  } else if (p.m == 1) {
    core_pass<V, 1, true>(p, s, y, nullptr);
  } else {
    core_pass<V, 4, true>(p, s, y, nullptr);
  }
}

// Block gammas go kBlockRows rows at a time (see block_tile_rows); z' of row r is kept at
// s2 + r * n, which is why the scratch holds (1 + kBlockRows) * n floats.
template <class V, class T>
inline void rows_typed(const Plan& p, const T* x, T* y, int64_t r0, int64_t r1, float* s) {
  float* s2 = s + p.n;
  int64_t r = r0;
  if (p.blocks) {
    for (; r + kBlockRows <= r1; r += kBlockRows) {
      T* ys[kBlockRows];
      for (int i = 0; i < kBlockRows; ++i) {
        transform_row<V>(p, x + (r + i) * p.n, y + (r + i) * p.n, s, s2 + i * p.n, false);
        ys[i] = y + (r + i) * p.n;
      }
      block_pass_rows<V, kBlockRows>(p, s2, ys);
    }
  }
  for (; r < r1; ++r) transform_row<V>(p, x + r * p.n, y + r * p.n, s, s2);
}

template <class V>
void run_rows(const Plan& p, DType dtype, const void* x, void* y, int64_t r0, int64_t r1, float* scratch) {
  if (dtype == DType::kFloat32)
    rows_typed<V>(p, static_cast<const float*>(x), static_cast<float*>(y), r0, r1, scratch);
  else
    rows_typed<V>(p, static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), r0, r1, scratch);
}

}  // namespace
}  // namespace cpu
}  // namespace hadaconv
