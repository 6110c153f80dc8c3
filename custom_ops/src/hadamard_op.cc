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
  float scale = 1.0f;
  std::vector<int8_t> core;  // m * m entries of +-1, row-major, as written by the exporter
};

// Attribute readers over the two ways ORT hands them out (kernel creation, shape inference).
struct AttrSource {
  const OrtKernelInfo* info = nullptr;
  const OrtShapeInferContext* ctx = nullptr;

  bool has_int(const char* name, int64_t* out) const {
    if (info) {
      OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, out);
      if (st) g_api->ReleaseStatus(st);
      return !st;
    }
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
    if (info) {
      OrtStatus* st = g_api->KernelInfoGetAttribute_float(info, name, out);
      if (st) g_api->ReleaseStatus(st);
      return !st;
    }
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
      OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
      if (st) {
        g_api->ReleaseStatus(st);
        return false;
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

struct TensorView {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  int64_t numel = 0;
};

TensorView view(const OrtValue* v) {
  TensorView t;
  t.value = v;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(v, &info));
  std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> guard(
      info, [](OrtTensorTypeAndShapeInfo* p) { g_api->ReleaseTensorTypeAndShapeInfo(p); });
  size_t rank = 0;
  check(g_api->GetTensorElementType(info, &t.type));
  check(g_api->GetDimensionsCount(info, &rank));
  t.dims.resize(rank);
  if (rank) check(g_api->GetDimensions(info, t.dims.data(), rank));
  t.numel = 1;
  for (int64_t d : t.dims) t.numel *= d;
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

// Validates X, gamma, beta against the attributes; returns gamma's block size (0 = no gamma,
// 1 = vector) and the number of rows.
struct Inputs {
  TensorView x, gamma, beta;
  bool has_gamma = false, has_beta = false;
  int64_t block = 0, rows = 0;
};

Inputs read_inputs(OrtKernelContext* ctx, const Attrs& a, ONNXTensorElementDataType want) {
  Inputs in;
  const OrtValue* xv = nullptr;
  check(g_api->KernelContext_GetInput(ctx, 0, &xv));
  if (!xv) fail("input X is missing");
  in.x = view(xv);
  if (in.x.type != want)
    fail(std::string("X has type ") + type_name(in.x.type) + ", this kernel takes " + type_name(want));
  if (in.x.dims.empty() || in.x.dims.back() != a.n)
    fail("the last dimension of X must be n = " + std::to_string(a.n) + ", got X of shape " + shape_str(in.x.dims));
  in.rows = in.x.numel / a.n;
  if (const OrtValue* g = optional_input(ctx, 1)) {
    in.gamma = view(g);
    in.has_gamma = true;
    const auto& d = in.gamma.dims;
    if (in.gamma.type != want)
      fail(std::string("gamma must have the type of X (") + type_name(want) + "), got " + type_name(in.gamma.type));
    if (d.size() == 1 && d[0] == a.n)
      in.block = 1;
    else if (d.size() == 3 && d[1] == d[2] && d[1] > 0 && d[0] * d[1] == a.n)
      in.block = d[1];
    else
      fail("gamma must be [" + std::to_string(a.n) + "] or [n/b, b, b] with n = " + std::to_string(a.n) +
           ", got " + shape_str(d));
  }
  if (const OrtValue* b = optional_input(ctx, 2)) {
    in.beta = view(b);
    in.has_beta = true;
    if (in.beta.type != want)
      fail(std::string("beta must have the type of X (") + type_name(want) + "), got " + type_name(in.beta.type));
    if (in.beta.dims.size() != 1 || in.beta.dims[0] != a.n)
      fail("beta must be [" + std::to_string(a.n) + "], got " + shape_str(in.beta.dims));
  }
  return in;
}

const void* data_of(const OrtValue* v) {
  void* p = nullptr;
  check(g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &p));
  return p;
}

// ----------------------------------------------------------------------------- the kernels

struct Kernel {
  Attrs attrs;
  ONNXTensorElementDataType type;
  bool on_cuda = false;
  cpu::Isa isa{};
  std::vector<float> coef;  // CPU: [m][m] scale * C
#ifdef HADACONV_WITH_CUDA
  std::unique_ptr<cuda::CoreBits> bits;
#endif
};

// Reads a host tensor of the kernel's type as floats.
std::vector<float> to_float(const TensorView& t, ONNXTensorElementDataType type) {
  std::vector<float> out(static_cast<size_t>(t.numel));
  const void* p = data_of(t.value);
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    std::memcpy(out.data(), p, out.size() * sizeof(float));
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p);
    for (size_t i = 0; i < out.size(); ++i) out[i] = half_to_float(h[i]);
  }
  return out;
}

struct CpuJob {
  const cpu::Plan* plan;
  cpu::RowsFn rows_fn;
  cpu::DType dtype;
  const void* x;
  void* y;
  int64_t rows, rows_per_task;
  std::atomic<bool> failed{false};
};

// One task of ORT's intra-op thread pool: a run of rows with a private scratch buffer (a
// per-call allocation, not thread_local storage, which would outlive a dlclose'd library).
void cpu_task(void* user, size_t task) noexcept {
  CpuJob* job = static_cast<CpuJob*>(user);
  const int64_t r0 = static_cast<int64_t>(task) * job->rows_per_task;
  const int64_t r1 = std::min(job->rows, r0 + job->rows_per_task);
  const size_t bytes = ((1 + cpu::kBlockRows) * job->plan->n * sizeof(float) + 63) / 64 * 64;
  float* scratch = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!scratch) {
    job->failed = true;
    return;
  }
  job->rows_fn(*job->plan, job->dtype, job->x, job->y, r0, r1, scratch);
  std::free(scratch);
}

void compute_cpu(Kernel& k, OrtKernelContext* ctx, const Inputs& in, OrtValue* out) {
  const Attrs& a = k.attrs;
  cpu::Isa isa = k.isa;
  // Segments narrower than a vector, and blocks that do not tile into whole vectors, take
  // the portable path (tiny widths only; see the README).
  int64_t B = in.block > 1 ? std::lcm(in.block, static_cast<int64_t>(isa.width)) : 0;
  if (a.L < isa.width || (B && a.n % B)) {
    isa = cpu::isa_portable();
    B = in.block > 1 ? in.block : 0;
  }
  std::vector<float> gvec, beta, blocks;
  beta = in.has_beta ? to_float(in.beta, k.type) : std::vector<float>(a.n, 0.0f);
  if (in.block > 1) {
    // Expand b x b blocks to B x B (block-diagonal inside) and transpose: see block_pass.
    const std::vector<float> g = to_float(in.gamma, k.type);
    const int64_t b = in.block;
    blocks.assign(static_cast<size_t>(a.n * B), 0.0f);
    for (int64_t j = 0; j < a.n / B; ++j)
      for (int64_t q = 0; q < B; ++q)
        for (int64_t p = 0; p < B; ++p) {
          const int64_t ip = j * B + p, iq = j * B + q;
          if (ip / b == iq / b) blocks[(j * B + q) * B + p] = g[(ip / b) * b * b + (ip % b) * b + (iq % b)];
        }
  } else {
    gvec = in.has_gamma ? to_float(in.gamma, k.type) : std::vector<float>(a.n, 1.0f);
  }
  cpu::Plan plan;
  plan.n = a.n;
  plan.m = a.m;
  plan.L = a.L;
  plan.coef = k.coef.data();
  plan.gvec = gvec.empty() ? nullptr : gvec.data();
  plan.beta = beta.data();
  plan.blocks = blocks.empty() ? nullptr : blocks.data();
  plan.B = B;

  CpuJob job;
  job.plan = &plan;
  job.rows_fn = isa.rows;
  job.dtype = k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? cpu::DType::kFloat32 : cpu::DType::kFloat16;
  job.x = data_of(in.x.value);
  void* y = nullptr;
  check(g_api->GetTensorMutableData(out, &y));
  job.y = y;
  job.rows = in.rows;
  // About 64K elements per task: enough work to hide the pool's scheduling, enough tasks to
  // balance the threads.
  job.rows_per_task = std::max<int64_t>(cpu::kBlockRows, 65536 / a.n);
  const size_t tasks = static_cast<size_t>((in.rows + job.rows_per_task - 1) / job.rows_per_task);
  check(g_api->KernelContext_ParallelFor(ctx, &cpu_task, tasks, 0, &job));
  if (job.failed) fail("out of memory for the row scratch buffers");
}

#ifdef HADACONV_WITH_CUDA
void compute_cuda(Kernel& k, OrtKernelContext* ctx, const Inputs& in, OrtValue* out) {
  cuda::Args args;
  args.dtype = k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT     ? cuda::DType::kFloat32
               : k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? cuda::DType::kFloat16
                                                                 : cuda::DType::kBFloat16;
  args.x = data_of(in.x.value);
  check(g_api->GetTensorMutableData(out, &args.y));
  args.rows = in.rows;
  args.n = k.attrs.n;
  args.m = k.attrs.m;
  args.L = k.attrs.L;
  args.scale = k.attrs.scale;
  args.gamma = in.has_gamma ? data_of(in.gamma.value) : nullptr;
  args.gamma_b = in.block;
  args.beta = in.has_beta ? data_of(in.beta.value) : nullptr;
  const char* err = nullptr;
  const size_t ws_bytes = cuda::workspace_bytes(args, &err);
  if (err) fail(err);
  void* stream = nullptr;
  check(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  // Rows too long for shared memory borrow device scratch from ORT's allocator; kernels on
  // this stream are ordered, so handing it back right after the launch is safe.
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
    check(g_api->GetTensorMemoryInfo(in.x.value, &mem));
    check(g_api->KernelContext_GetAllocator(ctx, mem, &ws.alloc));
    check(g_api->AllocatorAlloc(ws.alloc, ws_bytes, &ws.ptr));
  }
  err = cuda::launch(args, *k.bits, ws.ptr, stream);
  if (err) fail(std::string("CUDA launch failed: ") + err);
}
#endif

// ----------------------------------------------------------------------------- OrtCustomOp

struct HadamardOp : OrtCustomOp {
  ONNXTensorElementDataType type;
  bool on_cuda;
  HadamardOp(ONNXTensorElementDataType t, bool cuda);
};

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** out) noexcept {
  *out = nullptr;
  return guarded([&] {
    const HadamardOp* h = static_cast<const HadamardOp*>(op);
    auto k = std::make_unique<Kernel>();
    AttrSource src;
    src.info = info;
    try {
      k->attrs = read_attrs(src);
    } catch (const OpError& e) {
      // "HadamardAffine: <what>" -> "HadamardAffine node '<name>': <what>"
      const std::string prefix = std::string(kOpName) + ": ";
      const std::string what = e.msg.compare(0, prefix.size(), prefix) ? e.msg : e.msg.substr(prefix.size());
      throw OpError{std::string(kOpName) + " node '" + node_name(info) + "': " + what};
    }
    k->type = h->type;
    k->on_cuda = h->on_cuda;
    const Attrs& a = k->attrs;
    if (!k->on_cuda) {
      k->isa = cpu::select_isa();
      k->coef.resize(static_cast<size_t>(a.m * a.m));
      for (int64_t i = 0; i < a.m; ++i)
        for (int64_t j = 0; j < a.m; ++j) k->coef[i * a.m + j] = a.scale * core_at(a, i, j);
    }
#ifdef HADACONV_WITH_CUDA
    else {
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
    const Inputs in = read_inputs(ctx, k.attrs, k.type);
    OrtValue* out = nullptr;
    check(g_api->KernelContext_GetOutput(ctx, 0, in.x.dims.data(), in.x.dims.size(), &out));
    if (in.rows == 0) return;
#ifdef HADACONV_WITH_CUDA
    if (k.on_cuda) return compute_cuda(k, ctx, in, out);
#endif
    compute_cpu(k, ctx, in, out);
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
    for (int64_t& d : dims)
      if (d < 0) d = -1;
    OrtTensorTypeAndShapeInfo* out_info = nullptr;
    check(g_api->CreateTensorTypeAndShapeInfo(&out_info));
    std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> out_guard(
        out_info, [](OrtTensorTypeAndShapeInfo* p) { g_api->ReleaseTensorTypeAndShapeInfo(p); });
    check(g_api->SetTensorElementType(out_info, type));
    check(g_api->SetDimensions(out_info, dims.data(), rank));
    if (rank) {
      for (const char*& s : names)
        if (!s) s = "";
      check(g_api->SetSymbolicDimensions(out_info, names.data(), rank));
    }
    check(g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, out_info));
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
