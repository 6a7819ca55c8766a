// Stride-1 'same' 3D convolution and its two gradients as XLA FFI custom calls on the
// CPU, computed by oneDNN (the library PyTorch's CPU convolutions use).
//
// Why: XLA:CPU has no fast 3D convolution (every conv3d takes a generic Eigen path), and
// the matmul formulation in layers.py stops at about half of PyTorch's training step on a
// 2-core CPU. oneDNN's JIT kernels run the same arithmetic near the FMA peak.
//
// Layouts are the model's own, so no transposes are needed on the JAX side:
//   x, y, dx, dy  (B, X, Y, Z, C)               oneDNN "ndhwc" with D=X, H=Y, W=Z
//   w, dw         (kx, ky, kz, C_in, C_out)      oneDNN "dhwio"
// Activations stay in that plain layout (oneDNN has channels-last kernels for all three
// passes); weights are reordered to whatever blocked layout the chosen kernel wants, which
// costs little (they are small). Primitives are built once per shape and cached.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// (B, X, Y, Z, C_in, C_out, k, dtype): float32 or bfloat16 everywhere (oneDNN accumulates
// bfloat16 convolutions in float32).
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, dt>;

struct Conv {
  memory::desc act_in, act_out, w_user;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_w_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_w;
};

std::unique_ptr<Conv> make_conv(const Key& key) {
  auto [b, sx, sy, sz, cin, cout, k, type] = key;
  auto& eng = cpu_engine();
  auto conv = std::make_unique<Conv>();
  conv->act_in = memory::desc({b, cin, sx, sy, sz}, type, tag::ndhwc);
  conv->act_out = memory::desc({b, cout, sx, sy, sz}, type, tag::ndhwc);
  conv->w_user = memory::desc({cout, cin, k, k, k}, type, tag::dhwio);
  memory::desc w_any({cout, cin, k, k, k}, type, tag::any);
  const memory::desc &in_pd = conv->act_in, &out_pd = conv->act_out;
  memory::dims strides{1, 1, 1}, pad{k / 2, k / 2, k / 2};
  auto alg = dnnl::algorithm::convolution_direct;
  // Each execution gets its own scratchpad (see `run_pass`), never the library's.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  conv->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, alg, in_pd, w_any, out_pd, strides, pad, pad, attr);
  conv->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, alg, in_pd, w_any, out_pd, strides, pad, pad, conv->fwd_pd, attr);
  conv->bwd_w_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, alg, in_pd, w_any, out_pd, strides, pad, pad, conv->fwd_pd, attr);
  conv->fwd = dnnl::convolution_forward(conv->fwd_pd);
  conv->bwd_data = dnnl::convolution_backward_data(conv->bwd_data_pd);
  conv->bwd_w = dnnl::convolution_backward_weights(conv->bwd_w_pd);
  return conv;
}

Conv& get_conv(const Key& key) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Conv>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, make_conv(key)).first;
  return *it->second;
}

// The oneDNN type of an FFI buffer type, or an error for the ones not handled.
ffi::ErrorOr<dt> onednn_type(ffi::DataType type) {
  if (type == ffi::DataType::F32) return dt::f32;
  if (type == ffi::DataType::BF16) return dt::bf16;
  return ffi::Unexpected(ffi::Error::InvalidArgument("onednn conv3d: only float32 and bfloat16 are supported"));
}

// Key from an activation (B, X, Y, Z, C_in), a kernel (k, k, k, C_in, C_out) and their
// common element type.
ffi::ErrorOr<Key> key_of(ffi::Span<const int64_t> act, ffi::Span<const int64_t> w, ffi::DataType a,
                         ffi::DataType b) {
  if (a != b) return ffi::Unexpected(ffi::Error::InvalidArgument("onednn conv3d: operands differ in dtype"));
  auto type = onednn_type(a);
  if (type.has_error()) return ffi::Unexpected(type.error());
  if (act.size() != 5 || w.size() != 5)
    return ffi::Unexpected(ffi::Error::InvalidArgument("onednn conv3d: expected 5-D activations and kernel"));
  if (w[0] != w[1] || w[1] != w[2] || w[0] % 2 == 0)
    return ffi::Unexpected(ffi::Error::InvalidArgument("onednn conv3d: kernel must be cubic with an odd size"));
  if (act[4] != w[3])
    return ffi::Unexpected(ffi::Error::InvalidArgument("onednn conv3d: input channels differ from the kernel's"));
  return Key{act[0], act[1], act[2], act[3], w[3], w[4], w[0], type.value()};
}

// Runs `fn` and turns a oneDNN exception into an FFI error (never an abort).
//
// One call at a time: XLA runs independent custom calls concurrently (a layer's input and
// kernel gradients, for one); each call already uses every core through OpenMP, so
// running two at once only oversubscribes the cores. Scratchpads are per execution
// (user-managed, see `run_pass`), not oneDNN's shared one.
template <typename F>
ffi::Error guarded(F&& fn) {
  static std::mutex exec_mu;
  std::lock_guard<std::mutex> lock(exec_mu);
  try {
    fn();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn conv3d: ") + e.what());
  }
  return ffi::Error::Success();
}

void* ptr(const void* p) { return const_cast<void*>(p); }

// One operand of a pass: its execution argument, its layout in XLA's buffer, the buffer.
struct Operand {
  int arg;
  const memory::desc& user;
  void* data;
};

// Executes one pass (forward, input gradient or kernel gradient: two operands in, one out)
// with its own scratchpad. An operand whose layout differs from the one the primitive
// chose (only ever the kernel: activations are channels-last on both sides) is reordered
// on the way in, or on the way out.
void run_pass(const dnnl::primitive_desc_base& pd, const dnnl::primitive& prim, Operand a, Operand b,
              Operand out) {
  auto& eng = cpu_engine();
  dnnl::stream s(eng);
  std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), eng)}};
  for (const Operand* in : {&a, &b}) {
    memory user(in->user, eng, in->data);
    memory::desc want = pd.query_md(dnnl::query::exec_arg_md, in->arg);
    if (want == in->user) {
      args[in->arg] = user;
    } else {
      memory m(want, eng);
      dnnl::reorder(user, m).execute(s, user, m);
      args[in->arg] = m;
    }
  }
  memory user_out(out.user, eng, out.data);
  memory::desc want = pd.query_md(dnnl::query::exec_arg_md, out.arg);
  memory result = want == out.user ? user_out : memory(want, eng);
  args[out.arg] = result;
  prim.execute(s, args);
  if (want != out.user) dnnl::reorder(result, user_out).execute(s, result, user_out);
  s.wait();
}

ffi::Error conv_fwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  auto key = key_of(x.dimensions(), w.dimensions(), x.element_type(), w.element_type());
  if (key.has_error()) return key.error();
  return guarded([&] {
    Conv& c = get_conv(key.value());
    run_pass(c.fwd_pd, c.fwd, {DNNL_ARG_SRC, c.act_in, ptr(x.untyped_data())},
             {DNNL_ARG_WEIGHTS, c.w_user, ptr(w.untyped_data())}, {DNNL_ARG_DST, c.act_out, y->untyped_data()});
  });
}

ffi::Error conv_bwd_data(ffi::AnyBuffer g, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx) {
  auto gd = g.dimensions(), wd = w.dimensions();
  if (gd.size() != 5 || wd.size() != 5 || gd[4] != wd[4])
    return ffi::Error::InvalidArgument("onednn conv3d backward data: output channels differ from the kernel's");
  int64_t act[5] = {gd[0], gd[1], gd[2], gd[3], wd[3]};
  auto key = key_of(ffi::Span<const int64_t>(act, 5), wd, g.element_type(), w.element_type());
  if (key.has_error()) return key.error();
  return guarded([&] {
    Conv& c = get_conv(key.value());
    run_pass(c.bwd_data_pd, c.bwd_data, {DNNL_ARG_DIFF_DST, c.act_out, ptr(g.untyped_data())},
             {DNNL_ARG_WEIGHTS, c.w_user, ptr(w.untyped_data())},
             {DNNL_ARG_DIFF_SRC, c.act_in, dx->untyped_data()});
  });
}

ffi::Error conv_bwd_weights(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dw) {
  auto gd = g.dimensions(), wd = dw->dimensions();
  if (gd.size() != 5 || wd.size() != 5 || gd[4] != wd[4])
    return ffi::Error::InvalidArgument("onednn conv3d backward weights: output channels differ from the kernel's");
  auto key = key_of(x.dimensions(), wd, x.element_type(), g.element_type());
  if (key.has_error()) return key.error();
  return guarded([&] {
    Conv& c = get_conv(key.value());
    run_pass(c.bwd_w_pd, c.bwd_w, {DNNL_ARG_SRC, c.act_in, ptr(x.untyped_data())},
             {DNNL_ARG_DIFF_DST, c.act_out, ptr(g.untyped_data())},
             {DNNL_ARG_DIFF_WEIGHTS, c.w_user, dw->untyped_data()});
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransvwConv3dForward, conv_fwd,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(TransvwConv3dBackwardData, conv_bwd_data,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(TransvwConv3dBackwardWeights, conv_bwd_weights,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// Which oneDNN implementation each pass of a shape runs ("jit:avx512_core", "gemm:jit", ...):
// for the benchmark's report. Writes a NUL-terminated string of at most `n` bytes.
extern "C" int transvw_onednn_impl_info(int64_t b, int64_t sx, int64_t sy, int64_t sz, int64_t cin,
                                        int64_t cout, int64_t k, char* out, int n) {
  try {
    Conv& c = get_conv(Key{b, sx, sy, sz, cin, cout, k, dt::f32});
    std::string info = std::string(c.fwd_pd.impl_info_str()) + " | " + c.bwd_data_pd.impl_info_str() + " | " +
                       c.bwd_w_pd.impl_info_str();
    snprintf(out, n, "%s", info.c_str());
    return 0;
  } catch (const dnnl::error& e) {
    snprintf(out, n, "%s", e.what());
    return 1;
  }
}

// 1 when this CPU (and ONEDNN_MAX_CPU_ISA) gives oneDNN a bfloat16 convolution, else 0:
// CPUs without AVX-512 have none, and there the model keeps bfloat16 layers on XLA.
extern "C" int transvw_onednn_supports_bf16() {
  try {
    make_conv(Key{1, 4, 4, 4, 16, 16, 3, dt::bf16});
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}
