// The maps on the host (8-bit and 4-bit): values, decision points and the
// 16-bit bucket table of the CPU code lookup (see optax8/maps.py), and the
// packing of 4-bit codes.
//
// The code of a normalized value v is #{j : mids[j] < v}. All floats with
// the same top 16 bits (a bucket) lie between two consecutive map values or
// straddle at most one decision point, so with lo = the count for the
// bucket's lowest value, code = lo + (mids[lo] < v), and mids[lo] matters
// only when it lies in v's bucket, where it shares v's top 16 bits. One
// 32-bit table entry per bucket holds lo (bits 0-7) and the low 16 bits of
// that decision point as an order key (bits 16-31; 0xffff when no decision
// point lies in the bucket), so one lookup and one integer comparison give
// the code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "optax8/quantize.h"

namespace optax8 {

// Order key of the low 16 bits of a float among floats of its bucket.
inline uint32_t bucket_key(uint32_t bits) {
  return (bits & 0xffffu) ^ ((bits & 0x80000000u) ? 0xffffu : 0u);
}

// The code of a normalized value v from the bucket table.
inline int bucket_code(float v, const uint32_t* table) {
  const uint32_t bits = float_bits(v), entry = table[bits >> 16];
  return int(entry & 0xffu) + ((entry >> 16) < bucket_key(bits) ? 1 : 0);
}

// A map of 256 values (a 4-bit map's 16 padded with +inf: maps.h).
struct HostMap {
  float values[256];
  float mids[256];
  uint32_t table[65536];
  // Stochastic rounding's lookup of the map value at or below v and of its neighbour above:
  // floors[b] holds 1 + that value's code for the lowest float of bucket b (bits 0-8; 0 below the map) and,
  // from bit 15, the order key of the next map value where it lies in the bucket (0x10000 where none does);
  // pairs[c + 1] holds values c and c + 1 (values[-1] = -inf, values[256] = +inf) as one 64-bit word.
  uint32_t floors[65536];
  alignas(64) float pairs[257][2];
  alignas(64) uint8_t planes[4][256];  // planes[k][c]: byte k of values[c] (byte-permute lookups)
  int floor;                           // positive_floor of the map (quantize.h)
  bool sign;                           // signs_absmax of the map (quantize.h)

  HostMap(const float (&v)[256], const float (&m)[256], int64_t kind)
      : floor(positive_floor(kind)), sign(signs_absmax(kind)) {
    std::copy(v, v + 256, values);
    std::copy(m, m + 256, mids);
    for (int c = 0; c < 256; ++c)
      for (int k = 0; k < 4; ++k) planes[k][c] = uint8_t(float_bits(values[c]) >> (8 * k));
    for (uint32_t b = 0; b < 65536; ++b) {
      const bool negative = b & 0x8000u;
      float lowest = bits_float(negative ? (b << 16) | 0xffffu : b << 16);
      if (std::isnan(lowest)) lowest = negative ? -INFINITY : INFINITY;
      const int lo = search_code(lowest, mids);
      const uint32_t mid_bits = float_bits(mids[lo]);
      const uint32_t key = (mid_bits >> 16) == b ? bucket_key(mid_bits) : 0xffffu;
      table[b] = uint32_t(lo) | (key << 16);
      const int below = int(std::upper_bound(values, values + 256, lowest) - values);   // 1 + the floor's code
      const uint32_t next_bits = below < 256 ? float_bits(values[below]) : 0u;
      const uint32_t next_key = below < 256 && (next_bits >> 16) == b ? bucket_key(next_bits) : 0x10000u;
      floors[b] = uint32_t(below) | (next_key << 15);
    }
    for (int c = -1; c < 256; ++c) {
      pairs[c + 1][0] = c < 0 ? -INFINITY : values[c];
      pairs[c + 1][1] = c + 1 < 256 ? values[c + 1] : INFINITY;
    }
  }
};

// Codes of n values x rounded stochastically (stochastic_code, quantize.h), raised to the map's floor: element
// k's index in its leaf is row_index + col_index[k], its draw rounding_draw(index, key).
inline void stochastic_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                             const HostMap& map, uint32_t row_index, const uint32_t* col_index, uint32_t key) {
  for (int64_t k = 0; k < n; ++k) {
    const float v = normalize(x[k]);
    const float u = rounding_draw(row_index + col_index[k], key);
    codes[k] = uint8_t(floor_code(stochastic_code(v, bucket_code(v, map.table), u, map.values), x[k], map.floor));
  }
}

inline const HostMap& host_map(int64_t kind) {
  static const float signed_values[256] = {OPTAX8_SIGNED_MAP};
  static const float signed_mids[256] = {OPTAX8_SIGNED_MIDS};
  static const float unsigned_values[256] = {OPTAX8_UNSIGNED_MAP};
  static const float unsigned_mids[256] = {OPTAX8_UNSIGNED_MIDS};
  static const float signed4_values[256] = {OPTAX8_SIGNED4_MAP};
  static const float signed4_mids[256] = {OPTAX8_SIGNED4_MIDS};
  static const float unsigned4_values[256] = {OPTAX8_UNSIGNED4_MAP};
  static const float unsigned4_mids[256] = {OPTAX8_UNSIGNED4_MIDS};
  switch (kind) {
    case kUnsignedMap: {
      static const HostMap map(unsigned_values, unsigned_mids, kind);
      return map;
    }
    case kSigned4Map: {
      static const HostMap map(signed4_values, signed4_mids, kind);
      return map;
    }
    case kUnsigned4Map: {
      static const HostMap map(unsigned4_values, unsigned4_mids, kind);
      return map;
    }
    default: {
      static const HostMap map(signed_values, signed_mids, kSignedMap);
      return map;
    }
  }
}

// ---- 4-bit codes, two a byte along the last axis (optax8/layout.py) --------------
// Element 2j in the low half of byte j; an odd last element leaves the high
// half 0. A pair of codes is one little-endian uint16 (codes c0, c1 as bytes).

using PairBytes = uint16_t __attribute__((may_alias));

// The n codes of n elements from packed bytes.
inline void unpack_codes4(const uint8_t* packed, int64_t n, uint8_t* codes) {
  PairBytes* pairs = reinterpret_cast<PairBytes*>(codes);
  for (int64_t j = 0; j < n / 2; ++j) {
    const uint16_t b = packed[j];
    pairs[j] = uint16_t((b & 0x0fu) | ((b & 0xf0u) << 4));
  }
  if (n % 2) codes[n - 1] = packed[n / 2] & 0x0fu;
}

// The packed bytes of n codes (each below 16).
inline void pack_codes4(const uint8_t* codes, int64_t n, uint8_t* packed) {
  const PairBytes* pairs = reinterpret_cast<const PairBytes*>(codes);
  for (int64_t j = 0; j < n / 2; ++j) {
    const uint16_t w = pairs[j];
    packed[j] = uint8_t((w & 0x0fu) | ((w >> 4) & 0xf0u));
  }
  if (n % 2) packed[n / 2] = codes[n - 1];
}

}  // namespace optax8
