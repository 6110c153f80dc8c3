// The CPU row kernel alone, without ONNX Runtime, against a one-pass elementwise floor
// (y = x * c, what bench_ort_op.py's Mul is), both timed in this process and alternating
// call by call.  For kernel work (custom_ops/README.md says how much it moves between runs);
// speed claims come from the ONNX Runtime benchmarks.
//
//   cpu_kernel_bench N M [ROWS [REPEATS]]      e.g. cpu_kernel_bench 576 36
//
// N = M * 2^k; the vector gamma (the block gamma's extra pass is not timed here).  Two row
// counts per case: ROWS (default 2048, X and Y far larger than L2, as in bench_ort_op.py) and
// 16 rows called over and over (X and Y hot in L1/L2: the kernel's arithmetic alone).  Prints
// the medians in microseconds per row and the kernel / floor ratios.  The core's sign pattern
// is a fixed pseudo-random one: the time does not depend on the signs.  HADACONV_CPU_ISA picks
// a lower instruction set, as for the op.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu_kernel_api.h"

using hadaconv::cpu::DType;
using hadaconv::cpu::Isa;
using hadaconv::cpu::Plan;

namespace {

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The floor, compiled for every instruction set the kernel has, chosen by the CPU at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void floor_pass(const float* x, float* y, const float* c, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < n; ++k) y[r * n + k] = x[r * n + k] * c[k];
}

struct Buffers {
  float* x;
  float* y;
  // aligned_alloc wants a size that is a multiple of the alignment.
  static size_t bytes(int64_t floats) { return (static_cast<size_t>(floats) * sizeof(float) + 63) / 64 * 64; }
  explicit Buffers(int64_t floats)
      : x(static_cast<float*>(std::aligned_alloc(64, bytes(floats)))),
        y(static_cast<float*>(std::aligned_alloc(64, bytes(floats)))) {
    if (!x || !y) {
      std::fprintf(stderr, "error: out of memory for %lld floats\n", static_cast<long long>(floats));
      std::exit(1);
    }
    for (int64_t i = 0; i < floats; ++i) {
      x[i] = static_cast<float>(i % 97) * 0.01f;
      y[i] = 0.0f;
    }
  }
  ~Buffers() {
    std::free(x);
    std::free(y);
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median microseconds per row of the kernel and of the floor over `repeats` alternating calls.
void time_case(const Isa& isa, const Plan& p, int64_t rows, int64_t repeats, float* scratch, double* kernel_us,
               double* floor_us) {
  Buffers b(rows * p.n);
  std::vector<float> c(static_cast<size_t>(p.n), 0.5f);
  std::vector<double> tk, tf;
  for (int64_t i = 0; i < repeats + 2; ++i) {  // two warm-up calls each
    const double t0 = seconds();
    isa.rows(p, DType::kFloat32, b.x, b.y, 0, rows, scratch);
    const double t1 = seconds();
    floor_pass(b.x, b.y, c.data(), rows, p.n);
    const double t2 = seconds();
    if (i >= 2) {
      tk.push_back(t1 - t0);
      tf.push_back(t2 - t1);
    }
  }
  *kernel_us = median(tk) / rows * 1e6;
  *floor_us = median(tf) / rows * 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s N M [ROWS [REPEATS]]   (N = M * 2^k, M = 1 or a multiple of 4)\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]), m = std::atoll(argv[2]);
  const int64_t rows = argc > 3 ? std::atoll(argv[3]) : 2048;
  const int64_t repeats = argc > 4 ? std::atoll(argv[4]) : 0;
  const int64_t L = m > 0 ? n / m : 0;
  if (n < 1 || m < 1 || n % m || (L & (L - 1)) || (m > 1 && m % 4) || rows < 1 || repeats < 0) {
    std::fprintf(stderr, "error: need N = M * 2^k with M = 1 or a multiple of 4, ROWS >= 1, REPEATS >= 0\n");
    return 2;
  }
  Isa isa = hadaconv::cpu::select_isa();
  if (L < isa.width) isa = hadaconv::cpu::isa_portable();  // as the op chooses (prepare_gamma)
  const int64_t G = m / 4;
  std::vector<uint16_t> slots(static_cast<size_t>(std::max<int64_t>(1, m * G)));
  for (int64_t a = 0; a < m; ++a)
    for (int64_t g = 0; g < G; ++g) slots[a * G + g] = static_cast<uint16_t>(g * 16 + (a * 7 + g * 3) % 16);
  std::vector<float> gvec(static_cast<size_t>(n), 0.5f), beta(static_cast<size_t>(n), 0.1f);
  Plan p;
  p.n = n;
  p.m = m;
  p.L = L;
  p.slots = slots.data();
  p.gvec = gvec.data();
  p.beta = beta.data();
  const int64_t floats = (hadaconv::cpu::scratch_floats(n, m) + 15) / 16 * 16;
  float* scratch = static_cast<float*>(std::aligned_alloc(64, floats * sizeof(float)));
  if (!scratch) return 1;
  // Enough calls for a stable median: 2e8 floats through each (0.1-0.3 s here), at least 20.
  auto count = [&](int64_t r) { return repeats ? repeats : std::max<int64_t>(20, 200000000 / (r * n)); };
  double k_cold, f_cold, k_hot, f_hot;
  time_case(isa, p, rows, count(rows), scratch, &k_cold, &f_cold);
  time_case(isa, p, 16, count(16), scratch, &k_hot, &f_hot);
  std::printf("%s n=%lld m=%lld  %lld rows: kernel %.3f us/row, floor %.3f, ratio %.2f  |  16 rows (hot): kernel %.3f, floor %.3f, ratio %.2f\n",
              isa.name, static_cast<long long>(n), static_cast<long long>(m), static_cast<long long>(rows), k_cold, f_cold,
              k_cold / f_cold, k_hot, f_hot, k_hot / f_hot);
  std::free(scratch);
  return 0;
}
