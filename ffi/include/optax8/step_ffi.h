// Decoding and checking of the fused step's FFI buffers, shared by the CPU
// and CUDA handlers.
//
//   args: hyper f32[..., kNumHyper], g, p, then (codes u8, absmax f32) per state
//   rets: u (g's dtype and shape), then (codes, absmax) per state
//   attrs: algo, block_size, with_params (0: p is a placeholder, read as 0)
// The hyperparameter vector may carry leading dimensions (vmap): the rows of
// g are split evenly between its rows.
#pragma once

#include <cstdint>
#include <string>

#include "optax8/ffi_common.h"
#include "optax8/step.h"
#include "xla/ffi/api/ffi.h"

namespace optax8 {

struct StepBuffers {
  BlockLayout l;
  int64_t algo = 0;
  int n_states = 0;
  bool with_params = false;
  xla::ffi::DataType dtype = xla::ffi::DataType::F32;
  const float* hyper = nullptr;
  int64_t rows_per_hyper = 1;  // rows of g that share one hyperparameter row
  const void* g = nullptr;
  const void* p = nullptr;
  void* u = nullptr;
  const uint8_t* codes_in[kMaxStates] = {};
  const float* absmax_in[kMaxStates] = {};
  uint8_t* codes_out[kMaxStates] = {};
  float* absmax_out[kMaxStates] = {};
};

inline bool same_dims(xla::ffi::Span<const int64_t> a, xla::ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

inline xla::ffi::Error parse_step(xla::ffi::Buffer<xla::ffi::F32> hyper, xla::ffi::AnyBuffer g,
                                  xla::ffi::AnyBuffer p, xla::ffi::RemainingArgs states,
                                  xla::ffi::Result<xla::ffi::AnyBuffer> u, xla::ffi::RemainingRets new_states,
                                  int64_t algo, int64_t block, int64_t with_params, StepBuffers* out) {
  using xla::ffi::Error;
  namespace ffi = xla::ffi;
  if (algo < 0 || algo >= kNumAlgos)
    return Error::InvalidArgument("optax8 step: unknown algo " + std::to_string(algo));
  StepBuffers s;
  s.algo = algo;
  s.n_states = algo_states(algo);
  s.with_params = with_params != 0;
  s.dtype = g.element_type();
  if (s.dtype != ffi::DataType::F32 && s.dtype != ffi::DataType::BF16 && s.dtype != ffi::DataType::F16)
    return Error::InvalidArgument("optax8 step: gradients must be float32, bfloat16 or float16");
  if (u->element_type() != s.dtype || !same_dims(u->dimensions(), g.dimensions()))
    return Error::InvalidArgument("optax8 step: the update must have the gradient's dtype and shape");
  if (s.with_params && (p.element_type() != s.dtype || !same_dims(p.dimensions(), g.dimensions())))
    return Error::InvalidArgument("optax8 step: params must have the gradient's dtype and shape " +
                                  dims_str(g.dimensions()) + ", got " + dims_str(p.dimensions()));
  if (states.size() != size_t(2 * s.n_states) || new_states.size() != size_t(2 * s.n_states))
    return Error::InvalidArgument("optax8 step: algo " + std::to_string(algo) + " takes " +
                                  std::to_string(s.n_states) + " states (codes and absmax each)");
  for (int i = 0; i < s.n_states; ++i) {
    auto codes = states.get<ffi::Buffer<ffi::U8>>(2 * i);
    auto absmax = states.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    auto codes_out = new_states.get<ffi::Buffer<ffi::U8>>(2 * i);
    auto absmax_out = new_states.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    if (!codes.has_value() || !absmax.has_value() || !codes_out.has_value() || !absmax_out.has_value())
      return Error::InvalidArgument("optax8 step: state " + std::to_string(i) +
                                    " must be uint8 codes and float32 absmax");
    BlockLayout l;
    if (auto e = make_layout(g.dimensions(), codes->dimensions(), absmax->dimensions(), block,
                             state_map(algo, i), &l);
        e.failure())
      return e;
    if (!same_dims(codes->dimensions(), (*codes_out)->dimensions()) ||
        !same_dims(absmax->dimensions(), (*absmax_out)->dimensions()))
      return Error::InvalidArgument("optax8 step: new state shapes differ from the old ones");
    s.l = l;
    s.codes_in[i] = codes->typed_data();
    s.absmax_in[i] = absmax->typed_data();
    s.codes_out[i] = (*codes_out)->typed_data();
    s.absmax_out[i] = (*absmax_out)->typed_data();
  }
  const auto hd = hyper.dimensions();
  if (hd.size() == 0 || hd.back() != kNumHyper)
    return Error::InvalidArgument("optax8 step: the hyperparameters must have shape (..., " +
                                  std::to_string(int(kNumHyper)) + ")");
  const int64_t hyper_rows = int64_t(hyper.element_count()) / kNumHyper;
  if (hyper_rows < 1 || s.l.rows % hyper_rows != 0)
    return Error::InvalidArgument("optax8 step: " + std::to_string(hyper_rows) +
                                  " hyperparameter rows do not divide " + std::to_string(s.l.rows) + " rows");
  s.rows_per_hyper = s.l.rows / hyper_rows;
  s.hyper = hyper.typed_data();
  s.g = g.untyped_data();
  s.p = p.untyped_data();
  s.u = u->untyped_data();
  *out = s;
  return Error::Success();
}

}  // namespace optax8
