// What the CPU and CUDA handlers share: checks of FFI buffer shapes against
// the block layout (codes have the array's shape, absmax has shape[:-1] +
// (ceil(n / block),)) and of attributes, and dispatch on the float dtype.
#pragma once

#include <cstdint>
#include <string>

#include "optax8/quantize.h"
#include "xla/ffi/api/ffi.h"

namespace optax8 {

inline std::string dims_str(xla::ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (d.size() == 1 ? ",)" : ")");
}

inline xla::ffi::Error check_block_size(int64_t block) {
  if (block < 1 || (block & (block - 1)) != 0)
    return xla::ffi::Error::InvalidArgument("optax8: block_size must be a power of two, got " +
                                            std::to_string(block));
  return xla::ffi::Error::Success();
}

inline xla::ffi::Error check_map_kind(int64_t kind) {
  if (kind != kSignedMap && kind != kUnsignedMap)
    return xla::ffi::Error::InvalidArgument("optax8: map_kind must be 0 (signed) or 1 (unsigned), got " +
                                            std::to_string(kind));
  return xla::ffi::Error::Success();
}

// Checks the attributes and fills `out` from the array's and absmax's dimensions.
inline xla::ffi::Error make_layout(xla::ffi::Span<const int64_t> values,
                                   xla::ffi::Span<const int64_t> codes,
                                   xla::ffi::Span<const int64_t> absmax, int64_t block,
                                   int64_t map_kind, BlockLayout* out) {
  if (auto e = check_block_size(block); e.failure()) return e;
  if (auto e = check_map_kind(map_kind); e.failure()) return e;
  if (values.size() == 0)
    return xla::ffi::Error::InvalidArgument("optax8: arrays must have rank >= 1");
  bool same = codes.size() == values.size();
  for (size_t i = 0; same && i < values.size(); ++i) same = codes[i] == values[i];
  if (!same)
    return xla::ffi::Error::InvalidArgument("optax8: codes shape " + dims_str(codes) +
                                            " differs from values shape " + dims_str(values));
  BlockLayout l;
  l.block = block;
  l.cols = values.back();
  l.rows = 1;
  for (size_t i = 0; i + 1 < values.size(); ++i) l.rows *= values[i];
  l.row_blocks = num_blocks(l.cols, block);
  bool ok = absmax.size() == values.size() && absmax.back() == l.row_blocks;
  for (size_t i = 0; ok && i + 1 < values.size(); ++i) ok = absmax[i] == values[i];
  if (!ok)
    return xla::ffi::Error::InvalidArgument(
        "optax8: absmax shape " + dims_str(absmax) + " does not fit values shape " +
        dims_str(values) + " with block_size " + std::to_string(block) +
        " (expected the leading dimensions and " + std::to_string(l.row_blocks) + " blocks)");
  *out = l;
  return xla::ffi::Error::Success();
}

// Returns fn(F32{}), fn(BF16{}) or fn(F16{}) for the buffer's dtype.
template <typename Fn>
xla::ffi::Error by_float_dtype(xla::ffi::DataType dtype, const Fn& fn) {
  switch (dtype) {
    case xla::ffi::DataType::F32: return fn(F32{});
    case xla::ffi::DataType::BF16: return fn(BF16{});
    case xla::ffi::DataType::F16: return fn(F16{});
    default: return xla::ffi::Error::InvalidArgument("optax8: values must be float32, bfloat16 or float16");
  }
}

}  // namespace optax8
