// Decoding and checking of the fused step's FFI buffers, shared by the CPU
// and CUDA handlers. One call updates L leaves of one algorithm:
//
//   args: hyper f32[..., L, kNumHyper] (row i for leaf i), then per leaf:
//         g, p, (codes u8, absmax f32) per state, and with stochastic
//         rounding (of either kind) row_index u32[rows] and col_index
//         u32[cols]: element (r, c)'s index in its whole leaf is
//         row_index[r] + col_index[c]
//   rets: per leaf: u (g's dtype and shape), and (codes, absmax) per state
//   attrs: algo, block_size, leaves (L), params_mode: 0 (p is a
//          placeholder, read as 0), 1 (p is read) or 2 (p is read and u =
//          p + update, the new parameter, which XLA may alias to p),
//          tile_rows (the block layout of every leaf: BlockLayout),
//          stochastic: which roundings are stochastic, bit 0 the states'
//          (optax8/rounding.py), bit 1 the new parameters' to bfloat16
//          (round_param, quantize.h; params_mode 2, bfloat16 buffers or
//          float32 ones that the caller casts); 0 rounds both to nearest,
//          bits: 8, or 4 (every state's codes in its map at 4 bits, packed
//          two a byte along the last axis)
// Leading dimensions of the hyperparameters (vmap) split the rows of every
// leaf evenly between them (whole matrices where blocks are tiles).
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
  bool apply = false;  // u is the new parameter p + update
  xla::ffi::DataType dtype = xla::ffi::DataType::F32;
  const float* hyper = nullptr;  // this leaf's first hyperparameter row
  int64_t rows_per_hyper = 1;    // rows of g that share one hyperparameter row
  int64_t hyper_stride = kNumHyper;  // floats between consecutive rows of this leaf
  const void* g = nullptr;
  const void* p = nullptr;
  void* u = nullptr;
  const uint8_t* codes_in[kMaxStates] = {};
  const float* absmax_in[kMaxStates] = {};
  uint8_t* codes_out[kMaxStates] = {};
  float* absmax_out[kMaxStates] = {};
  const uint32_t* row_index = nullptr;  // stochastic rounding: element indices (see above); else null
  const uint32_t* col_index = nullptr;
  bool stochastic_states = false;       // the codes are rounded stochastically (stochastic_code)
  bool round_params = false;            // u = round_param(p + update), a bfloat16 value (with apply)
  int bits = 8;                         // of every state's codes (4: packed two a byte)
  int64_t code_cols = 0;                // bytes of codes per row: cols, or (cols + 1) / 2 at 4 bits

  // The byte of the codes that holds element e (e's column even at 4 bits).
  int64_t code_offset(int64_t e) const { return bits == 4 ? (e / l.cols) * code_cols + (e % l.cols) / 2 : e; }
};

inline bool same_dims(xla::ffi::Span<const int64_t> a, xla::ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// Arguments per leaf (after the hyperparameters).
inline int64_t step_args_per_leaf(int64_t algo, int64_t stochastic) {
  return 2 + 2 * algo_states(algo) + (stochastic ? 2 : 0);
}

// Checks the counts of buffers of a call with `leaves` leaves.
inline xla::ffi::Error check_step_call(const xla::ffi::RemainingArgs& args, const xla::ffi::RemainingRets& rets,
                                       int64_t algo, int64_t leaves, int64_t stochastic, int64_t bits) {
  using xla::ffi::Error;
  if (algo < 0 || algo >= kNumAlgos)
    return Error::InvalidArgument("optax8 step: unknown algo " + std::to_string(algo));
  if (bits != 8 && bits != 4)
    return Error::InvalidArgument("optax8 step: bits must be 8 or 4, got " + std::to_string(bits));
  if (stochastic < 0 || stochastic > 3)
    return Error::InvalidArgument("optax8 step: stochastic must be 0 to 3, got " + std::to_string(stochastic));
  const int64_t n = algo_states(algo);
  if (leaves < 1 || int64_t(args.size()) != leaves * step_args_per_leaf(algo, stochastic) ||
      int64_t(rets.size()) != leaves * (1 + 2 * n))
    return Error::InvalidArgument("optax8 step: algo " + std::to_string(algo) + " takes, per leaf, g, p, " +
                                  std::to_string(n) + " (codes, absmax) states" +
                                  (stochastic ? " and row and column indices" : "") + "; got " +
                                  std::to_string(args.size()) + " arguments and " + std::to_string(rets.size()) +
                                  " results for " + std::to_string(leaves) + " leaves");
  return Error::Success();
}

// Decodes and checks leaf `leaf` of a call (after check_step_call).
inline xla::ffi::Error parse_step(xla::ffi::Buffer<xla::ffi::F32> hyper, const xla::ffi::RemainingArgs& args,
                                  const xla::ffi::RemainingRets& rets, int64_t leaf, int64_t leaves, int64_t algo,
                                  int64_t block, int64_t tile_rows, int64_t params_mode, int64_t stochastic,
                                  int64_t bits, StepBuffers* out) {
  using xla::ffi::Error;
  namespace ffi = xla::ffi;
  StepBuffers s;
  s.algo = algo;
  s.n_states = algo_states(algo);
  if (params_mode < 0 || params_mode > 2)
    return Error::InvalidArgument("optax8 step: params_mode must be 0, 1 or 2, got " + std::to_string(params_mode));
  s.with_params = params_mode >= 1;
  s.apply = params_mode == 2;
  const size_t a0 = size_t(leaf) * size_t(step_args_per_leaf(algo, stochastic)),
               r0 = size_t(leaf) * (1 + 2 * s.n_states);
  auto g = args.get<ffi::AnyBuffer>(a0);
  auto p = args.get<ffi::AnyBuffer>(a0 + 1);
  auto u = rets.get<ffi::AnyBuffer>(r0);
  if (!g.has_value() || !p.has_value() || !u.has_value())
    return Error::InvalidArgument("optax8 step: cannot decode the buffers of leaf " + std::to_string(leaf));
  const std::string where = "optax8 step (leaf " + std::to_string(leaf) + "): ";
  s.dtype = g->element_type();
  if (s.dtype != ffi::DataType::F32 && s.dtype != ffi::DataType::BF16 && s.dtype != ffi::DataType::F16)
    return Error::InvalidArgument(where + "gradients must be float32, bfloat16 or float16");
  if ((*u)->element_type() != s.dtype || !same_dims((*u)->dimensions(), g->dimensions()))
    return Error::InvalidArgument(where + "the output must have the gradient's dtype and shape");
  if (s.with_params && (p->element_type() != s.dtype || !same_dims(p->dimensions(), g->dimensions())))
    return Error::InvalidArgument(where + "params must have the gradient's dtype and shape " +
                                  dims_str(g->dimensions()) + ", got " + dims_str(p->dimensions()));
  for (int i = 0; i < s.n_states; ++i) {
    auto codes = args.get<ffi::Buffer<ffi::U8>>(a0 + 2 + 2 * i);
    auto absmax = args.get<ffi::Buffer<ffi::F32>>(a0 + 3 + 2 * i);
    auto codes_out = rets.get<ffi::Buffer<ffi::U8>>(r0 + 1 + 2 * i);
    auto absmax_out = rets.get<ffi::Buffer<ffi::F32>>(r0 + 2 + 2 * i);
    if (!codes.has_value() || !absmax.has_value() || !codes_out.has_value() || !absmax_out.has_value())
      return Error::InvalidArgument(where + "state " + std::to_string(i) + " must be uint8 codes and float32 absmax");
    BlockLayout l;
    if (auto e = make_layout(g->dimensions(), codes->dimensions(), absmax->dimensions(), block, tile_rows,
                             state_map(algo, i), &l, int(bits));
        e.failure())
      return e;
    if (!same_dims(codes->dimensions(), (*codes_out)->dimensions()) ||
        !same_dims(absmax->dimensions(), (*absmax_out)->dimensions()))
      return Error::InvalidArgument(where + "new state shapes differ from the old ones");
    s.l = l;
    s.bits = int(bits);
    s.code_cols = bits == 4 ? (l.cols + 1) / 2 : l.cols;
    s.codes_in[i] = codes->typed_data();
    s.absmax_in[i] = absmax->typed_data();
    s.codes_out[i] = (*codes_out)->typed_data();
    s.absmax_out[i] = (*absmax_out)->typed_data();
  }
  if (stochastic & 2) {
    if (!s.apply || s.dtype == ffi::DataType::F16)   // float32 buffers: the caller rounds u to bfloat16 (exact)
      return Error::InvalidArgument(where + "stochastic rounding of the new parameters needs params_mode 2 and "
                                            "bfloat16 (or float32) buffers");
    s.round_params = true;
  }
  s.stochastic_states = stochastic & 1;
  if (stochastic) {
    auto row_index = args.get<ffi::Buffer<ffi::U32>>(a0 + 2 + 2 * s.n_states);
    auto col_index = args.get<ffi::Buffer<ffi::U32>>(a0 + 3 + 2 * s.n_states);
    // (vmap's broadcast_all repeats the column indices once per example: the first cols serve all rows)
    if (!row_index.has_value() || !col_index.has_value() || int64_t(row_index->element_count()) != s.l.rows ||
        s.l.cols == 0 || int64_t(col_index->element_count()) % s.l.cols != 0)
      return Error::InvalidArgument(where + "stochastic rounding needs uint32 row indices (" +
                                    std::to_string(s.l.rows) + ") and column indices (" + std::to_string(s.l.cols) +
                                    ")");
    s.row_index = row_index->typed_data();
    s.col_index = col_index->typed_data();
  }
  const auto hd = hyper.dimensions();
  if (hd.size() < 2 || hd.back() != kNumHyper || hd[hd.size() - 2] != leaves)
    return Error::InvalidArgument("optax8 step: the hyperparameters must have shape (..., " + std::to_string(leaves) +
                                  ", " + std::to_string(int(kNumHyper)) + "), got " + dims_str(hd));
  const int64_t batch = int64_t(hyper.element_count()) / (leaves * kNumHyper);
  if (batch < 1 || s.l.matrices() % batch != 0)
    return Error::InvalidArgument(where + std::to_string(batch) + " hyperparameter rows do not divide " +
                                  std::to_string(s.l.matrices()) + (s.l.tile_rows > 1 ? " matrices" : " rows"));
  s.rows_per_hyper = s.l.rows / batch;
  s.hyper_stride = leaves * kNumHyper;
  s.hyper = hyper.typed_data() + leaf * kNumHyper;
  s.g = g->untyped_data();
  s.p = p->untyped_data();
  s.u = (*u)->untyped_data();
  *out = s;
  return Error::Success();
}

// The binding of the step handlers after their platform context C (the
// thread pool on CPU, the stream on CUDA): what parse_step decodes, and the
// attribute names optax8/kernels/native.py passes.
template <typename C>
auto step_binding() {
  namespace ffi = xla::ffi;
  return ffi::Ffi::Bind()
      .Ctx<C>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // hyperparameters, one row per leaf
      .RemainingArgs()                        // per leaf: g, p, (codes, absmax) per state
      .RemainingRets()                        // per leaf: output, new (codes, absmax) per state
      .template Attr<int64_t>("algo")
      .template Attr<int64_t>("block_size")
      .template Attr<int64_t>("leaves")
      .template Attr<int64_t>("params_mode")
      .template Attr<int64_t>("tile_rows")
      .template Attr<int64_t>("stochastic")
      .template Attr<int64_t>("bits");
}

}  // namespace optax8
