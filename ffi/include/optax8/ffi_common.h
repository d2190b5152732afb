// What the CPU and CUDA handlers share: checks of FFI buffer shapes against
// the block layout (BlockLayout: codes have the array's shape, absmax one
// value per block) and of attributes, and dispatch on the float dtype.
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

// Checks the attributes and fills `out` from the array's and absmax's
// dimensions, for blocks of tile_rows x (block / tile_rows) elements over
// the last two axes (tile_rows 1: runs of `block` along the last axis).
// Codes of 4 bits (`bits` 4) are packed two a byte along the last axis, and
// a block's columns must then be even (no byte is shared by two blocks).
inline xla::ffi::Error make_layout(xla::ffi::Span<const int64_t> values,
                                   xla::ffi::Span<const int64_t> codes,
                                   xla::ffi::Span<const int64_t> absmax, int64_t block, int64_t tile_rows,
                                   int64_t map_kind, BlockLayout* out, int bits = 8) {
  if (auto e = check_block_size(block); e.failure()) return e;
  if (auto e = check_map_kind(map_kind); e.failure()) return e;
  if (values.size() == 0)
    return xla::ffi::Error::InvalidArgument("optax8: arrays must have rank >= 1");
  if (tile_rows < 1 || (tile_rows & (tile_rows - 1)) != 0 || block % tile_rows != 0 ||
      (tile_rows > 1 && values.size() < 2))
    return xla::ffi::Error::InvalidArgument("optax8: tile_rows must be a power of two that divides block_size " +
                                            std::to_string(block) + ", and 1 for a vector; got " +
                                            std::to_string(tile_rows) + " for values of shape " + dims_str(values));
  if (bits == 4 && (block / tile_rows) % 2 != 0)
    return xla::ffi::Error::InvalidArgument("optax8: 4-bit codes need blocks of an even number of columns, got " +
                                            std::to_string(tile_rows) + " x " + std::to_string(block / tile_rows));
  bool same = codes.size() == values.size();
  for (size_t i = 0; same && i < values.size(); ++i)
    same = codes[i] == (bits == 4 && i + 1 == values.size() ? (values[i] + 1) / 2 : values[i]);
  if (!same)
    return xla::ffi::Error::InvalidArgument("optax8: codes shape " + dims_str(codes) + " does not fit values shape " +
                                            dims_str(values) + (bits == 4 ? " (4-bit codes: two a byte)" : ""));
  BlockLayout l;
  l.block = block;
  l.tile_rows = tile_rows;
  l.tile_cols = block / tile_rows;
  l.cols = values.back();
  l.rows = 1;
  for (size_t i = 0; i + 1 < values.size(); ++i) l.rows *= values[i];
  l.mat_rows = tile_rows > 1 ? values[values.size() - 2] : 1;
  l.row_blocks = num_blocks(l.cols, l.tile_cols);
  l.bands = num_blocks(l.mat_rows, tile_rows);
  const size_t blocked = tile_rows > 1 ? 2 : 1;  // trailing axes cut into blocks
  bool ok = absmax.size() == values.size() && absmax.back() == l.row_blocks &&
            (blocked == 1 || absmax[absmax.size() - 2] == l.bands);
  for (size_t i = 0; ok && i + blocked < values.size(); ++i) ok = absmax[i] == values[i];
  if (!ok)
    return xla::ffi::Error::InvalidArgument(
        "optax8: absmax shape " + dims_str(absmax) + " does not fit values shape " + dims_str(values) +
        " with blocks of " + std::to_string(tile_rows) + " x " + std::to_string(l.tile_cols) + " (expected the " +
        "leading dimensions and " + (blocked == 2 ? std::to_string(l.bands) + " x " : std::string()) +
        std::to_string(l.row_blocks) + " blocks)");
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
