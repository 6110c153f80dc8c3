// com.hadaconv::HadamardAffine (version 1) for ONNX Runtime, through the plain C API.
//
//   Y = gamma * (scale * H X) + beta  per row of the last axis,  H = H_m (x) H_{2^k}
//
// The C API is used directly (no C++ wrapper) so that no exception can cross into ONNX
// Runtime: every entry point below catches everything and answers with an OrtStatus.  The
// library is built against one header version (ORT_API_VERSION) and asks the running ONNX
// Runtime for exactly that API table, which newer runtimes keep providing.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <string>
#include <vector>

#include <onnxruntime_c_api.h>

#include "cpu_kernel_api.h"
#include "half.h"
#ifdef HADACONV_WITH_CUDA
#include "hadamard_cuda.h"
#endif

namespace hadaconv {
namespace {

const OrtApi* g_api = nullptr;

constexpr const char* kDomain = "com.hadaconv";
constexpr const char* kOpName = "HadamardAffine";

// Errors travel as exceptions inside the library and become an OrtStatus at the boundary.
struct OpError {
  std::string msg;
};

[[noreturn]] void fail(const std::string& msg) { throw OpError{std::string(kOpName) + ": " + msg}; }

// Turns an OrtStatus from an API call into an OpError (and releases it).
void check(OrtStatus* st) {
  if (!st) return;
  std::string msg = g_api->GetErrorMessage(st);
  g_api->ReleaseStatus(st);
  fail(msg);
}

template <class F>
OrtStatus* guarded(F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const OpError& e) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, e.msg.c_str());
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "HadamardAffine: out of memory");
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, (std::string("HadamardAffine: ") + e.what()).c_str());
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, "HadamardAffine: unknown error");
  }
}

std::string shape_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + (d[i] < 0 ? std::string("?") : std::to_string(d[i]));
  return s + "]";
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    default: return "a non-float type";
  }
}

// ----------------------------------------------------------------------------- attributes

struct Attrs {
  int64_t n = 0, m = 1, L = 1, transpose = 0;
  float scale = 1.0f;  // validated > 0; negative after read_attrs only for m = 1 with a core of [-1]
  std::vector<int8_t> core;  // m * m entries of +-1, row-major, as written by the exporter
};

// Attribute readers over the two ways ORT hands them out (kernel creation, shape inference).
struct AttrSource {
  const OrtKernelInfo* info = nullptr;
  const OrtShapeInferContext* ctx = nullptr;

  // Kernel creation: whether a read succeeded; an attribute that is there with another type is
  // malformed (a float `transpose` or an int `scale` would otherwise silently take the default).
  bool found(OrtStatus* st, const char* name, const char* want) const {
    if (!st) return true;
    g_api->ReleaseStatus(st);
    float f = 0.0f;
    int64_t i = 0;
    size_t size = 0;
    bool other_type = false;
    for (OrtStatus* other : {g_api->KernelInfoGetAttribute_float(info, name, &f),
                             g_api->KernelInfoGetAttribute_int64(info, name, &i),
                             g_api->KernelInfoGetAttributeArray_float(info, name, nullptr, &size),
                             g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size),
                             g_api->KernelInfoGetAttribute_string(info, name, nullptr, &size)}) {
      other_type |= !other;
      if (other) g_api->ReleaseStatus(other);
    }
    if (other_type) fail(std::string("attribute ") + name + " must be " + want);
    return false;
  }

  bool has_int(const char* name, int64_t* out) const {
    if (info) return found(g_api->KernelInfoGetAttribute_int64(info, name, out), name, "an int");
    const OrtOpAttr* a = nullptr;
    OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &a);
    if (st || !a) {
      if (st) g_api->ReleaseStatus(st);
      return false;
    }
    size_t got = 0;
    check(g_api->ReadOpAttr(a, ORT_OP_ATTR_INT, out, sizeof(*out), &got));
    return true;
  }
  bool has_float(const char* name, float* out) const {
    if (info) return found(g_api->KernelInfoGetAttribute_float(info, name, out), name, "a float");
    const OrtOpAttr* a = nullptr;
    OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &a);
    if (st || !a) {
      if (st) g_api->ReleaseStatus(st);
      return false;
    }
    size_t got = 0;
    check(g_api->ReadOpAttr(a, ORT_OP_ATTR_FLOAT, out, sizeof(*out), &got));
    return true;
  }
  bool has_ints(const char* name, std::vector<int64_t>* out) const {
    size_t size = 0;
    if (info) {
      if (!found(g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size), name, "a list of ints"))
        return false;
      if (!size) {  // ORT hands out a list of floats as an empty list of ints
        size_t floats = 0;
        OrtStatus* st = g_api->KernelInfoGetAttributeArray_float(info, name, nullptr, &floats);
        if (st) g_api->ReleaseStatus(st);
        else if (floats) fail(std::string("attribute ") + name + " must be a list of ints");
      }
      out->resize(size);
      if (size) check(g_api->KernelInfoGetAttributeArray_int64(info, name, out->data(), &size));
      return true;
    }
    const OrtOpAttr* a = nullptr;
    OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &a);
    if (st || !a) {
      if (st) g_api->ReleaseStatus(st);
      return false;
    }
    // The first call reports the size needed (and fails when the buffer is too small).
    st = g_api->ReadOpAttr(a, ORT_OP_ATTR_INTS, nullptr, 0, &size);
    if (st) g_api->ReleaseStatus(st);
    out->resize(size / sizeof(int64_t));
    if (size) check(g_api->ReadOpAttr(a, ORT_OP_ATTR_INTS, out->data(), size, &size));
    return true;
  }
};

// The largest Hadamard core either kernel takes (the CUDA kernel keeps the core as bits in a
// fixed-size array, the CPU kernel tiles it 4 rows at a time).
constexpr int64_t kMaxCore = 128;
#ifdef HADACONV_WITH_CUDA
static_assert(kMaxCore == cuda::kMaxCore, "the CPU and CUDA kernels must accept the same cores");
#endif
// Widths above 2^26 would overflow the kernels' 32-bit index arithmetic on the device side and
// are far beyond any model width.
constexpr int64_t kMaxWidth = int64_t{1} << 26;

// Reads and validates every attribute.  The file is untrusted input: nothing the kernels
// assume (m = 1 or a multiple of 4, an orthogonal +-1 core, a finite positive scale) may be
// left to chance, so a malformed node fails here, at session creation, and never runs.
Attrs read_attrs(const AttrSource& src) {
  Attrs a;
  if (!src.has_int("n", &a.n)) fail("missing attribute 'n'");
  if (!src.has_int("m", &a.m)) a.m = 1;
  if (!src.has_int("transpose", &a.transpose)) a.transpose = 0;
  const bool has_scale = src.has_float("scale", &a.scale);
  if (a.n < 1 || a.n > kMaxWidth)
    fail("attribute n must be in [1, " + std::to_string(kMaxWidth) + "], got " + std::to_string(a.n));
  if (!has_scale) a.scale = 1.0f / std::sqrt(static_cast<float>(a.n));
  if (!std::isfinite(a.scale) || !(a.scale > 0.0f)) fail("attribute scale must be finite and positive");
  if (a.m != 1 && (a.m < 4 || a.m % 4 || a.m > kMaxCore))
    fail("attribute m must be 1 or a multiple of 4 up to " + std::to_string(kMaxCore) + " (a Hadamard order), got " +
         std::to_string(a.m));
  if (a.n % a.m) fail("n = " + std::to_string(a.n) + " is not a multiple of m = " + std::to_string(a.m));
  a.L = a.n / a.m;
  if (a.L & (a.L - 1)) fail("n = " + std::to_string(a.n) + " is not m * 2^k for m = " + std::to_string(a.m));
  if (a.transpose != 0 && a.transpose != 1) fail("attribute transpose must be 0 or 1");
  std::vector<int64_t> core;
  if (!src.has_ints("core", &core)) {
    if (a.m != 1) fail("missing attribute 'core' (the m x m Hadamard core)");
    core = {1};
  }
  if (static_cast<int64_t>(core.size()) != a.m * a.m)
    fail("attribute core has " + std::to_string(core.size()) + " entries, expected m * m = " + std::to_string(a.m * a.m));
  a.core.resize(core.size());
  for (size_t i = 0; i < core.size(); ++i) {
    if (core[i] != 1 && core[i] != -1) fail("attribute core must hold only +1 and -1");
    a.core[i] = static_cast<int8_t>(core[i]);
  }
  // core core^T = m I: the transform is orthogonal only for a true Hadamard core.
  for (int64_t i = 0; i < a.m; ++i)
    for (int64_t j = i; j < a.m; ++j) {
      int64_t dot = 0;
      for (int64_t k = 0; k < a.m; ++k) dot += a.core[i * a.m + k] * a.core[j * a.m + k];
      if (dot != (i == j ? a.m : 0))
        fail("attribute core is not a Hadamard matrix (rows " + std::to_string(i) + " and " + std::to_string(j) +
             " are not orthogonal)");
    }
  // A 1 x 1 core is a sign, and both kernels skip the core product when m = 1: the sign goes
  // into the scale, which the kernels apply as it is (a core of [-1] once ran as [1]).
  if (a.m == 1 && a.core[0] < 0) {
    a.scale = -a.scale;
    a.core[0] = 1;
  }
  return a;
}

std::string node_name(const OrtKernelInfo* info) {
  size_t size = 0;
  OrtStatus* st = g_api->KernelInfo_GetNodeName(info, nullptr, &size);
  if (st) g_api->ReleaseStatus(st);
  if (size == 0) return "?";
  std::string name(size, '\0');
  st = g_api->KernelInfo_GetNodeName(info, name.data(), &size);
  if (st) {
    g_api->ReleaseStatus(st);
    return "?";
  }
  name.resize(std::strlen(name.c_str()));
  return name;
}

// The core as applied: C[a][a'] = core[a][a'] or, for the inverse, core[a'][a].
inline int8_t core_at(const Attrs& a, int64_t i, int64_t j) {
  return a.transpose ? a.core[j * a.m + i] : a.core[i * a.m + j];
}

// ----------------------------------------------------------------------------- tensors

// Ranks above this are refused: the per-call path keeps shapes in fixed arrays (no heap).
constexpr size_t kMaxRank = 16;

struct TensorView {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  int64_t dims[kMaxRank] = {};
  size_t rank = 0;
  int64_t numel = 0;

  int64_t last() const { return rank ? dims[rank - 1] : -1; }
  std::string shape() const { return shape_str(std::vector<int64_t>(dims, dims + rank)); }
};

TensorView view(const OrtValue* v) {
  TensorView t;
  t.value = v;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(v, &info));
  std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> guard(
      info, [](OrtTensorTypeAndShapeInfo* p) { g_api->ReleaseTensorTypeAndShapeInfo(p); });
  check(g_api->GetTensorElementType(info, &t.type));
  check(g_api->GetDimensionsCount(info, &t.rank));
  if (t.rank > kMaxRank) fail("tensors of rank above " + std::to_string(kMaxRank) + " are not supported");
  if (t.rank) check(g_api->GetDimensions(info, t.dims, t.rank));
  t.numel = 1;
  for (size_t i = 0; i < t.rank; ++i) t.numel *= t.dims[i];
  return t;
}

// The optional inputs may be absent in two ways: not listed, or listed as "".
const OrtValue* optional_input(OrtKernelContext* ctx, size_t index) {
  size_t count = 0;
  check(g_api->KernelContext_GetInputCount(ctx, &count));
  if (index >= count) return nullptr;
  const OrtValue* v = nullptr;
  check(g_api->KernelContext_GetInput(ctx, index, &v));
  return v;
}

// gamma's block size (1 = vector, b > 1 = [n/b, b, b] blocks) after checking type and shape.
int64_t gamma_block(const TensorView& g, const Attrs& a, ONNXTensorElementDataType want) {
  if (g.type != want)
    fail(std::string("gamma must have the type of X (") + type_name(want) + "), got " + type_name(g.type));
  const int64_t* d = g.dims;
  if (g.rank == 1 && d[0] == a.n) return 1;
  if (g.rank == 3 && d[1] == d[2] && d[1] > 0 && d[0] * d[1] == a.n) return d[1];
  fail("gamma must be [" + std::to_string(a.n) + "] or [n/b, b, b] with n = " + std::to_string(a.n) + ", got " +
       g.shape());
}

void check_beta(const TensorView& b, const Attrs& a, ONNXTensorElementDataType want) {
  if (b.type != want)
    fail(std::string("beta must have the type of X (") + type_name(want) + "), got " + type_name(b.type));
  if (b.rank != 1 || b.dims[0] != a.n) fail("beta must be [" + std::to_string(a.n) + "], got " + b.shape());
}

const void* data_of(const OrtValue* v) {
  void* p = nullptr;
  check(g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &p));
  return p;
}

// ----------------------------------------------------------------------------- CPU parameters

// Reads a host tensor of the kernel's type as floats into `out` (resized).
void to_float(const TensorView& t, std::vector<float>* out) {
  out->resize(static_cast<size_t>(t.numel));
  const void* p = data_of(t.value);
  if (t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    std::memcpy(out->data(), p, out->size() * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(p);
  const bool bf16 = t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  for (size_t i = 0; i < out->size(); ++i) (*out)[i] = bf16 ? bfloat16_to_float(h[i]) : half_to_float(h[i]);
}

// gamma in the form the row kernels take, with the transform's scale folded in: a vector
// (ones when absent), or the b x b blocks expanded to B x B (block-diagonal inside, B a
// multiple of the vector width) and transposed, see block_tile_rows.
struct GammaPrep {
  int64_t block = 0;  // 0 none, 1 vector, b > 1 blocks
  int64_t B = 0;      // expanded block size (0 without blocks)
  cpu::Isa isa{};     // the kernel for this gamma (narrow blocks and segments take the portable one)
  std::vector<float> vec, blocks;
};

void prepare_gamma(const Attrs& a, cpu::Isa isa, const TensorView* gamma, int64_t block, GammaPrep* out) {
  out->block = block;
  // Segments narrower than a vector, and blocks that do not tile into whole vectors, take the
  // portable path (tiny widths only; see the README).
  int64_t B = block > 1 ? std::lcm(block, static_cast<int64_t>(isa.width)) : 0;
  if (a.L < isa.width || (B && a.n % B)) {
    isa = cpu::isa_portable();
    B = block > 1 ? block : 0;
  }
  out->isa = isa;
  out->B = B;
  std::vector<float> g;
  if (gamma) to_float(*gamma, &g);
  if (block <= 1) {
    out->vec.assign(static_cast<size_t>(a.n), a.scale);
    if (gamma)
      for (int64_t i = 0; i < a.n; ++i) out->vec[i] *= g[i];
    out->blocks.clear();
    return;
  }
  const int64_t b = block;
  out->vec.clear();
  out->blocks.assign(static_cast<size_t>(a.n * B), 0.0f);
  for (int64_t j = 0; j < a.n / B; ++j)
    for (int64_t bj = 0; bj < B / b; ++bj)  // the b x b blocks on the diagonal of tile j
      for (int64_t q = 0; q < b; ++q)
        for (int64_t p = 0; p < b; ++p) {
          const int64_t ip = j * B + bj * b + p, blk = ip / b;
          out->blocks[(j * B + bj * b + q) * B + bj * b + p] = a.scale * g[blk * b * b + p * b + q];
        }
}

void prepare_beta(const Attrs& a, const TensorView* beta, std::vector<float>* out) {
  if (beta)
    to_float(*beta, out);
  else
    out->assign(static_cast<size_t>(a.n), 0.0f);
}

// Per-task scratch owned by the kernel: slots claimed through a bit mask (ORT may run one
// kernel from several threads at once), each allocated the first time it is claimed and kept
// for the kernel's life, so steady-state calls allocate nothing.
class ScratchPool {
 public:
  static constexpr int kSlots = 64;
  explicit ScratchPool(size_t floats) : bytes_((floats * sizeof(float) + 63) / 64 * 64) {}
  ~ScratchPool() {
    for (float* p : slot_) std::free(p);
  }
  // A slot's buffer, or null when out of memory; `id` is -1 for a one-off buffer (every slot
  // busy), which release() frees.
  float* acquire(int* id) {
    uint64_t busy = busy_.load(std::memory_order_relaxed);
    for (;;) {
      if (~busy == 0) break;
      const int i = __builtin_ctzll(~busy);
      if (busy_.compare_exchange_weak(busy, busy | (uint64_t{1} << i), std::memory_order_acquire)) {
        if (!slot_[i]) slot_[i] = static_cast<float*>(std::aligned_alloc(64, bytes_));
        *id = i;
        if (!slot_[i]) release(i, nullptr);
        return slot_[i];
      }
    }
    *id = -1;
    return static_cast<float*>(std::aligned_alloc(64, bytes_));
  }
  void release(int id, float* p) {
    if (id < 0) {
      std::free(p);
      return;
    }
    busy_.fetch_and(~(uint64_t{1} << id), std::memory_order_release);
  }

 private:
  size_t bytes_;
  std::atomic<uint64_t> busy_{0};
  float* slot_[kSlots] = {};
};

// ----------------------------------------------------------------------------- the kernels

struct Kernel {
  Attrs attrs;
  ONNXTensorElementDataType type;
  bool on_cuda = false;
  // CPU: the core's sign-pattern slots (see cpu::Plan), and gamma / beta when they are
  // constant initializers, prepared at creation.  Absent ones count as constant too, but their
  // n-float defaults wait for the first call: a few bytes of graph must not reserve 512 MB a
  // node at session creation (n up to kMaxWidth) for a node that may never run.
  std::vector<uint16_t> slots;
  bool gamma_const = false, beta_const = false;
  bool gamma_default = false, beta_default = false;
  // A mutex and a flag, not std::call_once: a throwing call_once (bad_alloc at n = 2^26) can
  // leave its flag stuck with libstdc++ on some targets (GCC PR 66146); this retries instead.
  std::mutex defaults_mutex;
  std::atomic<bool> defaults_ready{false};
  GammaPrep gamma;
  std::vector<float> beta;
  std::unique_ptr<ScratchPool> scratch;
  bool log_isa = false;  // HADACONV_CPU_ISA_LOG set: say on stderr which kernel each run used
#ifdef HADACONV_WITH_CUDA
  std::unique_ptr<cuda::CoreBits> bits;
  int device = -1;  // the device the shared-memory attribute was set for
#endif
};

struct CpuJob {
  const cpu::Plan* plan;
  cpu::Isa isa;
  cpu::DType dtype;
  const void* x;
  void* y;
  int64_t rows, rows_per_task;
  ScratchPool* pool;
  std::atomic<bool> failed{false};
  // Split calls (see run_split): z' of all rows, and blocks per task.
  const float* z = nullptr;
  int64_t blocks_per_task = 0;
};

// One task of ORT's intra-op thread pool: a run of rows with a scratch slot of the kernel.
void cpu_task(void* user, size_t task) noexcept {
  CpuJob* job = static_cast<CpuJob*>(user);
  const int64_t r0 = static_cast<int64_t>(task) * job->rows_per_task;
  const int64_t r1 = std::min(job->rows, r0 + job->rows_per_task);
  int id = -1;
  float* scratch = job->pool->acquire(&id);
  if (!scratch) {
    job->failed = true;
    return;
  }
  job->isa.rows(*job->plan, job->dtype, job->x, job->y, r0, r1, scratch);
  job->pool->release(id, scratch);
}

// One task of a split call: blocks [j0, j1) of every row, from the shared z'.
void split_task(void* user, size_t task) noexcept {
  const CpuJob* job = static_cast<const CpuJob*>(user);
  const int64_t nb = job->plan->n / job->plan->B;
  const int64_t j0 = static_cast<int64_t>(task) * job->blocks_per_task;
  job->isa.blocks(*job->plan, job->dtype, job->z, job->y, 0, job->rows, j0, std::min(nb, j0 + job->blocks_per_task));
}

// Bytes of block gamma per task below which a call is not split.
constexpr int64_t kSplitBytes = 64 * 1024;

// A call of at most kBlockRows rows whose block gamma spans several kSplitBytes (b = 64 at
// n = 576: 147 KB, ten times the row) spends its time reading the blocks from memory, behind
// the rest of a decode step's weights.  It transforms its rows once, then spreads the blocks
// over the intra-op threads, each streaming its share.  Returns false where it does not apply.
bool run_split(CpuJob& job, OrtKernelContext* ctx) {
  const cpu::Plan& p = *job.plan;
  if (!p.blocks || job.rows < 1 || job.rows > cpu::kBlockRows) return false;
  const int64_t nb = p.n / p.B, bytes = p.n * p.B * static_cast<int64_t>(sizeof(float));
  const int64_t tasks = std::min(nb, bytes / kSplitBytes);
  if (tasks < 2) return false;
  int id = -1;
  float* scratch = job.pool->acquire(&id);
  if (!scratch) fail("out of memory for the row scratch buffers");
  float* z = scratch + cpu::scratch_z(p.n, p.m);
  job.isa.transform(p, job.dtype, job.x, 0, job.rows, z, scratch);
  job.z = z;
  job.blocks_per_task = (nb + tasks - 1) / tasks;
  const size_t n_tasks = static_cast<size_t>((nb + job.blocks_per_task - 1) / job.blocks_per_task);
  OrtStatus* st = g_api->KernelContext_ParallelFor(ctx, &split_task, n_tasks, 0, &job);
  job.pool->release(id, scratch);
  check(st);
  return true;
}

cpu::DType cpu_dtype(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT     ? cpu::DType::kFloat32
         : t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? cpu::DType::kFloat16
                                                      : cpu::DType::kBFloat16;
}

void compute_cpu(Kernel& k, OrtKernelContext* ctx, const TensorView& x, OrtValue* out) {
  const Attrs& a = k.attrs;
  // Graph-input gamma / beta (rare: exports make them initializers) are prepared per call.
  GammaPrep gamma_call;
  std::vector<float> beta_call;
  if (!k.defaults_ready.load(std::memory_order_acquire)) {  // ORT may run one kernel from several threads
    std::lock_guard<std::mutex> lock(k.defaults_mutex);
    if (!k.defaults_ready.load(std::memory_order_relaxed)) {
      if (k.gamma_default) prepare_gamma(a, cpu::select_isa(), nullptr, 0, &k.gamma);
      if (k.beta_default) prepare_beta(a, nullptr, &k.beta);
      k.defaults_ready.store(true, std::memory_order_release);
    }
  }
  const GammaPrep* gp = &k.gamma;
  const std::vector<float>* bp = &k.beta;
  if (!k.gamma_const) {
    const OrtValue* g = optional_input(ctx, 1);
    TensorView gv;
    if (g) gv = view(g);
    prepare_gamma(a, cpu::select_isa(), g ? &gv : nullptr, g ? gamma_block(gv, a, k.type) : 0, &gamma_call);
    gp = &gamma_call;
  }
  if (!k.beta_const) {
    const OrtValue* b = optional_input(ctx, 2);
    TensorView bv;
    if (b) {
      bv = view(b);
      check_beta(bv, a, k.type);
    }
    prepare_beta(a, b ? &bv : nullptr, &beta_call);
    bp = &beta_call;
  }
  cpu::Plan plan;
  plan.n = a.n;
  plan.m = a.m;
  plan.L = a.L;
  plan.slots = k.slots.data();
  plan.gvec = gp->vec.empty() ? nullptr : gp->vec.data();
  plan.beta = bp->data();
  plan.blocks = gp->blocks.empty() ? nullptr : gp->blocks.data();
  plan.B = gp->B;

  CpuJob job;
  job.plan = &plan;
  job.isa = gp->isa;
  if (k.log_isa) std::fprintf(stderr, "hadaconv: HadamardAffine ran the %s kernel\n", gp->isa.name);
  job.dtype = cpu_dtype(k.type);
  job.x = data_of(x.value);
  void* y = nullptr;
  check(g_api->GetTensorMutableData(out, &y));
  job.y = y;
  job.rows = x.numel / a.n;
  job.pool = k.scratch.get();
  // About 64K elements per task: enough work to hide the pool's scheduling, enough tasks to
  // balance the threads; in whole groups of the rows the kernel takes together (block gammas
  // 8, the core's row pairs 2), so no task ends on a group that streams its gamma for one row.
  const int64_t group = plan.blocks ? cpu::kBlockRows : 2;
  job.rows_per_task = (std::max<int64_t>(group, 65536 / a.n) + group - 1) / group * group;
  if (run_split(job, ctx)) return;
  const size_t tasks = static_cast<size_t>((job.rows + job.rows_per_task - 1) / job.rows_per_task);
  if (tasks == 1)
    cpu_task(&job, 0);  // decode-sized calls skip the thread pool's hand-off
  else
    check(g_api->KernelContext_ParallelFor(ctx, &cpu_task, tasks, 0, &job));
  if (job.failed) fail("out of memory for the row scratch buffers");
}

#ifdef HADACONV_WITH_CUDA
void compute_cuda(Kernel& k, OrtKernelContext* ctx, const TensorView& x, OrtValue* out) {
  cuda::Args args;
  args.dtype = k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT     ? cuda::DType::kFloat32
               : k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? cuda::DType::kFloat16
                                                                 : cuda::DType::kBFloat16;
  args.x = data_of(x.value);
  check(g_api->GetTensorMutableData(out, &args.y));
  args.rows = x.numel / k.attrs.n;
  args.n = k.attrs.n;
  args.m = k.attrs.m;
  args.L = k.attrs.L;
  args.scale = k.attrs.scale;
  // gamma / beta stay device tensors in their own type: the kernel reads them directly.
  if (const OrtValue* g = optional_input(ctx, 1)) {
    const TensorView gv = view(g);
    args.gamma_b = gamma_block(gv, k.attrs, k.type);
    args.gamma = data_of(g);
  }
  if (const OrtValue* b = optional_input(ctx, 2)) {
    check_beta(view(b), k.attrs, k.type);
    args.beta = data_of(b);
  }
  const char* err = nullptr;
  const size_t ws_bytes = cuda::workspace_bytes(args, &err);
  if (err) fail(err);
  void* stream = nullptr;
  check(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  // Rows too long for shared memory borrow device scratch through ORT's stream-aware scratch
  // buffer: a block freed after an asynchronous launch is only reused by work ordered after
  // it on the same stream.
  struct Scratch {
    OrtAllocator* alloc = nullptr;
    void* ptr = nullptr;
    ~Scratch() {
      if (ptr) release(g_api->AllocatorFree(alloc, ptr));
      if (alloc) g_api->ReleaseAllocator(alloc);
    }
    static void release(OrtStatus* st) {
      if (st) g_api->ReleaseStatus(st);
    }
  } ws;
  if (ws_bytes) {
    const OrtMemoryInfo* mem = nullptr;
    check(g_api->GetTensorMemoryInfo(x.value, &mem));
    check(g_api->KernelContext_GetAllocator(ctx, mem, &ws.alloc));
    check(g_api->KernelContext_GetScratchBuffer(ctx, mem, ws_bytes, &ws.ptr));
  }
  err = cuda::launch(args, *k.bits, ws.ptr, stream);
  if (err) fail(std::string("CUDA launch failed: ") + err);
}
#endif

// The gamma and beta given as graph inputs, checked against the node for an empty X, which
// computes nothing (compute_cpu / compute_cuda check them otherwise, as they read them; constant
// ones were checked at kernel creation, and the CUDA kernel takes both per call): no input of the
// wrong shape is accepted because X happens to have no rows.
void check_affine_inputs(const Kernel& k, OrtKernelContext* ctx) {
  if (k.on_cuda || !k.gamma_const)
    if (const OrtValue* g = optional_input(ctx, 1)) gamma_block(view(g), k.attrs, k.type);
  if (k.on_cuda || !k.beta_const)
    if (const OrtValue* b = optional_input(ctx, 2)) check_beta(view(b), k.attrs, k.type);
}

// ----------------------------------------------------------------------------- OrtCustomOp

struct HadamardOp : OrtCustomOp {
  ONNXTensorElementDataType type;
  bool on_cuda;
  HadamardOp(ONNXTensorElementDataType t, bool cuda);
};

// A constant initializer at `index` of the node, or null (a graph input, or absent).
const OrtValue* constant_input(const OrtKernelInfo* info, size_t index, bool* present) {
  size_t count = 0;
  check(g_api->KernelInfo_GetInputCount(info, &count));
  *present = index < count;
  if (!*present) return nullptr;
  int is_const = 0;
  const OrtValue* v = nullptr;
  OrtStatus* st = g_api->KernelInfoGetConstantInput_tensor(info, index, &is_const, &v);
  if (st) {
    g_api->ReleaseStatus(st);
    return nullptr;
  }
  // An input listed as "" is absent: ORT reports it as not constant with no type.
  if (!is_const) {
    char name[2] = {};
    size_t size = sizeof(name);
    st = g_api->KernelInfo_GetInputName(info, index, name, &size);
    if (st) g_api->ReleaseStatus(st);
    else if (size <= 1) *present = false;
  }
  return is_const ? v : nullptr;
}

// CPU set-up at creation: the core's look-up slots, and gamma / beta when they are constant
// (validated here, so a wrong initializer fails at session creation).
void prepare_cpu(Kernel& k, const OrtKernelInfo* info) {
  const Attrs& a = k.attrs;
  const int64_t G = a.m / 4;
  if (a.m > 1) {
    k.slots.resize(static_cast<size_t>(a.m * G));
    for (int64_t i = 0; i < a.m; ++i)
      for (int64_t g = 0; g < G; ++g) {
        int s = 0;
        for (int t = 0; t < 4; ++t) s |= (core_at(a, i, 4 * g + t) < 0) << (3 - t);
        k.slots[i * G + g] = static_cast<uint16_t>(g * 16 + s);
      }
  }
  k.scratch = std::make_unique<ScratchPool>(static_cast<size_t>(cpu::scratch_floats(a.n, a.m)));
  const char* log = std::getenv("HADACONV_CPU_ISA_LOG");
  k.log_isa = log && *log && std::strcmp(log, "0");
  bool present = false;
  if (const OrtValue* g = constant_input(info, 1, &present)) {
    const TensorView gv = view(g);
    prepare_gamma(a, cpu::select_isa(), &gv, gamma_block(gv, a, k.type), &k.gamma);
    k.gamma_const = true;
  } else if (!present) {
    k.gamma_const = k.gamma_default = true;
  }
  if (const OrtValue* b = constant_input(info, 2, &present)) {
    const TensorView bv = view(b);
    check_beta(bv, a, k.type);
    prepare_beta(a, &bv, &k.beta);
    k.beta_const = true;
  } else if (!present) {
    k.beta_const = k.beta_default = true;
  }
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** out) noexcept {
  *out = nullptr;
  return guarded([&] {
    const HadamardOp* h = static_cast<const HadamardOp*>(op);
    auto k = std::make_unique<Kernel>();
    k->type = h->type;
    k->on_cuda = h->on_cuda;
    try {
      AttrSource src;
      src.info = info;
      k->attrs = read_attrs(src);
      if (!k->on_cuda) prepare_cpu(*k, info);
    } catch (const OpError& e) {
      // "HadamardAffine: <what>" -> "HadamardAffine node '<name>': <what>"
      const std::string prefix = std::string(kOpName) + ": ";
      const std::string what = e.msg.compare(0, prefix.size(), prefix) ? e.msg : e.msg.substr(prefix.size());
      throw OpError{std::string(kOpName) + " node '" + node_name(info) + "': " + what};
    }
#ifdef HADACONV_WITH_CUDA
    if (k->on_cuda) {
      const Attrs& a = k->attrs;
      k->bits = std::make_unique<cuda::CoreBits>();
      std::memset(k->bits.get(), 0, sizeof(cuda::CoreBits));
      for (int64_t i = 0; i < a.m; ++i)
        for (int64_t j = 0; j < a.m; ++j)
          if (core_at(a, i, j) < 0) k->bits->w[(i * a.m + j) / 32] |= 1u << ((i * a.m + j) % 32);
    }
#endif
    *out = k.release();
  });
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) noexcept {
  return guarded([&] {
    Kernel& k = *static_cast<Kernel*>(kernel);
    const OrtValue* xv = nullptr;
    check(g_api->KernelContext_GetInput(ctx, 0, &xv));
    if (!xv) fail("input X is missing");
    const TensorView x = view(xv);
    if (x.type != k.type)
      fail(std::string("X has type ") + type_name(x.type) + ", this kernel takes " + type_name(k.type));
    if (x.rank == 0 || x.last() != k.attrs.n)
      fail("the last dimension of X must be n = " + std::to_string(k.attrs.n) + ", got X of shape " + x.shape());
    OrtValue* out = nullptr;
    if (x.numel == 0) {  // nothing to compute, but the inputs must still be right
      check_affine_inputs(k, ctx);
      check(g_api->KernelContext_GetOutput(ctx, 0, x.dims, x.rank, &out));
      return;
    }
    check(g_api->KernelContext_GetOutput(ctx, 0, x.dims, x.rank, &out));
#ifdef HADACONV_WITH_CUDA
    if (k.on_cuda) return compute_cuda(k, ctx, x, out);
#endif
    compute_cpu(k, ctx, x, out);
  });
}

void ORT_API_CALL destroy_kernel(void* kernel) noexcept { delete static_cast<Kernel*>(kernel); }

// Output type and shape = those of X, symbolic dimension names included.  Done with the C API
// and -1 for symbolic dims (the 1.21 C++ wrapper writes -2, which newer runtimes reject and
// then silently leave the output shape empty).
OrtStatus* ORT_API_CALL infer_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  return guarded([&] {
    OrtTensorTypeAndShapeInfo* in_info = nullptr;
    // Owned by the context (ORT keeps the infos it hands out): releasing it is a double free.
    check(g_api->ShapeInferContext_GetInputTypeShape(ctx, 0, &in_info));
    ONNXTensorElementDataType type;
    size_t rank = 0;
    check(g_api->GetTensorElementType(in_info, &type));
    check(g_api->GetDimensionsCount(in_info, &rank));
    std::vector<int64_t> dims(rank);
    std::vector<const char*> names(rank, nullptr);
    if (rank) {
      check(g_api->GetDimensions(in_info, dims.data(), rank));
      check(g_api->GetSymbolicDimensions(in_info, names.data(), rank));
    }
    // An unknown shape reaches us as rank 0, which cannot be told from a scalar X (refused at
    // run time): Y's shape is then left unknown, its type is set from the kernel definition.
    // Declaring it a scalar let the optimizer fold Shape(Y) to [] (a wrong answer, found in review).
    if (rank) {
      for (int64_t& d : dims)
        if (d < 0) d = -1;
      for (const char*& s : names)
        if (!s) s = "";
      OrtTensorTypeAndShapeInfo* out_info = nullptr;
      check(g_api->CreateTensorTypeAndShapeInfo(&out_info));
      std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> out_guard(
          out_info, [](OrtTensorTypeAndShapeInfo* p) { g_api->ReleaseTensorTypeAndShapeInfo(p); });
      check(g_api->SetTensorElementType(out_info, type));
      check(g_api->SetDimensions(out_info, dims.data(), rank));
      check(g_api->SetSymbolicDimensions(out_info, names.data(), rank));
      check(g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, out_info));
    }
    // Static mismatches are reported here too, although the runtime may only log them; the
    // kernel checks again with the real shapes.
    AttrSource src;
    src.ctx = ctx;
    const Attrs a = read_attrs(src);
    if (rank && dims.back() >= 0 && dims.back() != a.n)
      fail("the last dimension of X must be n = " + std::to_string(a.n) + ", got " + std::to_string(dims.back()));
  });
}

HadamardOp::HadamardOp(ONNXTensorElementDataType t, bool cuda) : OrtCustomOp{}, type(t), on_cuda(cuda) {
  version = ORT_API_VERSION;
  GetName = [](const OrtCustomOp*) noexcept { return kOpName; };
  GetExecutionProviderType = [](const OrtCustomOp* op) noexcept -> const char* {
    return static_cast<const HadamardOp*>(op)->on_cuda ? "CUDAExecutionProvider" : nullptr;
  };
  GetInputTypeCount = [](const OrtCustomOp*) noexcept -> size_t { return 3; };
  GetInputType = [](const OrtCustomOp* op, size_t) noexcept { return static_cast<const HadamardOp*>(op)->type; };
  GetOutputTypeCount = [](const OrtCustomOp*) noexcept -> size_t { return 1; };
  GetOutputType = [](const OrtCustomOp* op, size_t) noexcept { return static_cast<const HadamardOp*>(op)->type; };
  GetInputCharacteristic = [](const OrtCustomOp*, size_t i) noexcept {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  GetOutputCharacteristic = [](const OrtCustomOp*, size_t) noexcept { return INPUT_OUTPUT_REQUIRED; };
  GetInputMemoryType = [](const OrtCustomOp*, size_t) noexcept { return OrtMemTypeDefault; };
  GetVariadicInputMinArity = [](const OrtCustomOp*) noexcept { return 1; };
  GetVariadicInputHomogeneity = [](const OrtCustomOp*) noexcept { return 1; };
  GetVariadicOutputMinArity = [](const OrtCustomOp*) noexcept { return 1; };
  GetVariadicOutputHomogeneity = [](const OrtCustomOp*) noexcept { return 1; };
  CreateKernelV2 = &create_kernel;
  KernelComputeV2 = &compute;
  KernelDestroy = &destroy_kernel;
  InferOutputShapeFn = &infer_shape;
  GetStartVersion = [](const OrtCustomOp*) noexcept { return 1; };
  GetEndVersion = [](const OrtCustomOp*) noexcept { return 1; };
}

// One op object per element type and provider; ONNX Runtime merges them into one schema and
// picks the kernel by the input types.
const std::vector<HadamardOp>& all_ops() {
  static const std::vector<HadamardOp> ops = [] {
    std::vector<HadamardOp> v;
    v.emplace_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false);
    v.emplace_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, false);
    v.emplace_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, false);
#ifdef HADACONV_WITH_CUDA
    v.emplace_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true);
    v.emplace_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, true);
    v.emplace_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, true);
#endif
    return v;
  }();
  return ops;
}

}  // namespace
}  // namespace hadaconv

// The library's only exported symbol (see exports.map).  The domain object must outlive every
// session that uses it, so one is created per process and deliberately never released.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                         const OrtApiBase* api_base) {
  using namespace hadaconv;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // A runtime older than our headers: API table 1 always exists and can still say so.
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL, "libhadaconv_ort needs ONNX Runtime 1.21 or newer") : nullptr;
  }
  g_api = api;
  static std::mutex mutex;
  static OrtCustomOpDomain* domain = nullptr;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (!domain) {
      OrtCustomOpDomain* d = nullptr;
      if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &d)) return st;
      for (const HadamardOp& op : all_ops())
        if (OrtStatus* st = api->CustomOpDomain_Add(d, &op)) {
          api->ReleaseCustomOpDomain(d);
          return st;
        }
      domain = d;
    }
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "HadamardAffine: registering the custom ops failed");
  }
  return api->AddCustomOpDomain(options, domain);
}
