// Portable instantiation of the CPU kernel (W = 1: plain floats; the compiler may still
// auto-vectorize with the baseline instruction set), plus the run-time ISA selection.
#include <cstdlib>
#include <cstring>

#include "cpu_kernel.h"
#include "half.h"

namespace hadaconv {
namespace cpu {
namespace {

struct Scalar {
  static constexpr int W = 1;
  using reg = float;
  static reg load(const float* p) { return *p; }
  static reg load(const uint16_t* p) { return half_to_float(*p); }
  static reg load(const BF16* p) { return bfloat16_to_float(p->bits); }
  static void store(float* p, reg v) { *p = v; }
  static void store(uint16_t* p, reg v) { *p = float_to_half(v); }
  static void store(BF16* p, reg v) { p->bits = float_to_bfloat16(v); }
  static reg zero() { return 0.0f; }
  static reg set1(float f) { return f; }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg intra(reg v) { return v; }
};

}  // namespace

Isa isa_portable() { return {"portable", 1, &run_rows<Scalar>, &run_transform<Scalar>, &run_blocks<Scalar>}; }

Isa select_isa() {
#if defined(HADACONV_X86)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f");
  const char* want = std::getenv("HADACONV_CPU_ISA");
  const bool any = !want || !*want;
  if (has_avx512 && (any || !std::strcmp(want, "avx512"))) return isa_avx512();
  if (has_avx2 && (any || !std::strcmp(want, "avx512") || !std::strcmp(want, "avx2"))) return isa_avx2();
#endif
  return isa_portable();
}

}  // namespace cpu
}  // namespace hadaconv
