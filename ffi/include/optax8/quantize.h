// Block-wise 8-bit quantization: the per-element rules, shared by the CPU
// and CUDA kernels (host and device code) and mirrored by the pure-JAX path
// in optax8/kernels/jax_backend.py.
//
// For a block B with float32 values x:
//   absmax = max |x| over the finite x with |x| >= FLT_MIN (else 0); with the
//            signed map, the value of that x itself: -absmax when no counted
//            x reaches +absmax (a tie goes to the positive one)
//   s      = |absmax| > 2**126 ? 1/4 : 1    (keeps inv a normal float)
//   inv    = absmax != 0 ? 1 / (absmax * s) : 0
//   v      = (clean(x) * s) * inv           (x / absmax, within one rounding)
//   code   = #{j : mid[j] < v}              (round to nearest map value),
//            at least 1 for x >= FLT_MIN with the unsigned map
//   x'     = flush(map[code] * absmax)      (dequantize)
// where clean(x) is 0 for NaN and subnormals and clamps +-inf to +-FLT_MAX,
// so NaN never reaches absmax or another element, and +-inf saturates to the
// block's extreme codes; flush(y) is 0 for subnormal y. These are the exact
// float32 operations XLA performs for the pure-JAX path (XLA turns a division
// by a broadcast into a multiplication by its reciprocal), so both give
// bit-identical codes, and no result depends on the flush-to-zero mode.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "optax8/maps.h"

#if defined(__CUDACC__)
#define OPTAX8_HD __host__ __device__ __forceinline__
#else
#define OPTAX8_HD inline
#endif

namespace optax8 {

// The 8-bit maps (kernel attributes map_kind) and the 4-bit ones (the step's states with bits = 4).
enum MapKind : int64_t { kSignedMap = 0, kUnsignedMap = 1, kSigned4Map = 2, kUnsigned4Map = 3 };

// The map of `kind`'s sign (an 8-bit kind) with codes of `bits` (8 or 4) bits.
OPTAX8_HD constexpr int64_t map_with_bits(int64_t kind, int bits) {
  return bits == 4 ? (kind == kUnsignedMap ? kUnsigned4Map : kSigned4Map) : kind;
}

OPTAX8_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

OPTAX8_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// ---- 16-bit float conversions (exact, round to nearest even) -------------

OPTAX8_HD float bf16_to_f32(uint16_t h) { return bits_float(uint32_t(h) << 16); }

OPTAX8_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

OPTAX8_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    const float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

OPTAX8_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf
  if (a >= 0x38800000u) {                       // normal half
    const uint32_t r = a - (112u << 23);
    return sign | uint16_t((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
  }
  const uint32_t e = a >> 23;                   // subnormal half or zero
  if (e < 102) return sign;
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - e;
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return sign | uint16_t(q);
}

// Element access by dtype: each reads and writes float32.
struct F32 {
  using T = float;
  static OPTAX8_HD float load(T v) { return v; }
  static OPTAX8_HD T store(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static OPTAX8_HD float load(T v) { return bf16_to_f32(v); }
  static OPTAX8_HD T store(float v) { return f32_to_bf16(v); }
};
struct F16 {
  using T = uint16_t;
  static OPTAX8_HD float load(T v) { return f16_to_f32(v); }
  static OPTAX8_HD T store(float v) { return f32_to_f16(v); }
};

// ---- the quantization rules -------------------------------------------------

// |x| where x counts toward a block's absmax, else 0 (NaN, inf, subnormal).
OPTAX8_HD float absmax_term(float x) {
  const float a = fabsf(x);
  return (a >= FLT_MIN && a <= FLT_MAX) ? a : 0.0f;
}

// ---- the signed map's signed absmax ------------------------------------------
// The signed map runs from -0.99297 to +1, so a block scaled by +max |x|
// cannot represent its most negative element exactly, and a momentum that
// is a block's extreme shrinks by 0.7% at every requantization. Its absmax
// takes the sign of the block's element of largest magnitude instead: that
// element normalizes to +1 whatever its sign, and x' = map[code] * absmax
// dequantizes every code unchanged. The unsigned map keeps max |x|.

// Whether map `kind` gives a block's absmax the sign of its largest element.
OPTAX8_HD constexpr bool signs_absmax(int64_t kind) {
  return kind == kUnsignedMap    ? OPTAX8_UNSIGNED_SIGNS_ABSMAX
         : kind == kSigned4Map   ? OPTAX8_SIGNED4_SIGNS_ABSMAX
         : kind == kUnsigned4Map ? OPTAX8_UNSIGNED4_SIGNS_ABSMAX
                                 : OPTAX8_SIGNED_SIGNS_ABSMAX;
}

// x where it counts toward a block's absmax, else 0 (absmax_term with the sign).
OPTAX8_HD float signed_term(float x) {
  const float a = fabsf(x);
  return (a >= FLT_MIN && a <= FLT_MAX) ? x : 0.0f;
}

// The signed absmax from a block's max of absmax_term, m, and its max of
// signed_term (or of x where that is >= m), top: -m unless an element reaches +m.
OPTAX8_HD float signed_absmax(float m, float top) { return top >= m ? m : -m; }

// The signed absmax of two parts of a block from theirs: the larger
// magnitude, the positive one of a tie (a reduction of signed_term).
OPTAX8_HD float larger_signed(float a, float b) {
  const float fa = fabsf(a), fb = fabsf(b);
  return (fa > fb || (fa == fb && a > b)) ? a : b;
}

// What x contributes to its block's absmax (signed_term where `sign`, else
// absmax_term), and the absmax of two parts of a block from theirs: one
// reduction for either kind of map.
OPTAX8_HD float absmax_term(float x, bool sign) { return sign ? signed_term(x) : absmax_term(x); }
OPTAX8_HD float fold_absmax(float a, float b, bool sign) { return sign ? larger_signed(a, b) : fmaxf(a, b); }

// The factors that normalize a block: v = (x * scale) * inv.
struct Normalizer {
  float scale, inv;
  OPTAX8_HD Normalizer() : scale(1.0f), inv(0.0f) {}  // absmax 0
  OPTAX8_HD explicit Normalizer(float absmax)
      : scale(fabsf(absmax) > 0x1p126f ? 0.25f : 1.0f),
        inv(absmax != 0.0f ? 1.0f / (absmax * scale) : 0.0f) {}
  // x / absmax with NaN and subnormals as 0 and +-inf as +-FLT_MAX.
  OPTAX8_HD float operator()(float x) const {
    if (!(fabsf(x) >= FLT_MIN)) return 0.0f;
    const float c = x > FLT_MAX ? FLT_MAX : (x < -FLT_MAX ? -FLT_MAX : x);
    return (c * scale) * inv;
  }
};

// map value times absmax, with a subnormal result flushed to +0.
OPTAX8_HD float scale_value(float value, float absmax) {
  const float y = value * absmax;
  return fabsf(y) >= FLT_MIN ? y : 0.0f;
}

// The lowest code of a positive normal value x (x >= FLT_MIN) in map `kind`:
// the unsigned map keeps code 0 for zero alone, so a positive second moment
// never dequantizes to 0 (x / absmax below the first decision point would
// round to it); the signed map has no floor.
OPTAX8_HD int positive_floor(int64_t kind) {
  return kind == kUnsignedMap    ? OPTAX8_UNSIGNED_POSITIVE_FLOOR
         : kind == kSigned4Map   ? OPTAX8_SIGNED4_POSITIVE_FLOOR
         : kind == kUnsigned4Map ? OPTAX8_UNSIGNED4_POSITIVE_FLOOR
                                 : OPTAX8_SIGNED_POSITIVE_FLOOR;
}

// `code` of the unnormalized value x, raised to `floor` where x >= FLT_MIN.
OPTAX8_HD int floor_code(int code, float x, int floor) { return x >= FLT_MIN && code < floor ? floor : code; }

// #{j : mids[j] < v} over 256 sorted decision points (mids[255] = +inf):
// an 8-step branch-free binary search.
OPTAX8_HD int search_code(float v, const float* mids) {
  int c = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int step = 128; step > 0; step >>= 1) c += (mids[c + step - 1] < v) ? step : 0;
  return c;
}

// ---- stochastic rounding (optax8/rounding.py) ---------------------------------

// The "lowbias32" integer hash.
OPTAX8_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// The key of state `state` of a leaf: its rounding step and seed are integers below 2**24 in float slots.
OPTAX8_HD uint32_t rounding_key(float step, float seed, int state) {
  return mix32(mix32(uint32_t(step)) ^ uint32_t(seed)) ^ (0x9E3779B9u * uint32_t(state + 1));
}

// The draw in [0, 1) of the element of uint32 index `index` under `key`.
OPTAX8_HD float rounding_draw(uint32_t index, uint32_t key) { return float(mix32(index ^ key) >> 8) * 0x1p-24f; }

// The state number of the new parameters in rounding_key (optax8/low_precision.py: PARAMS).
constexpr int kParamsState = 255;

// The new bfloat16 parameter x = p + u rounded stochastically (optax8/low_precision.py) with the random bits
// mix32(index ^ key): the bfloat16 value upper16(bits(x) + (bits >> 16)) as a float, or x itself (which the
// store then rounds to nearest) where that is not finite.
OPTAX8_HD float round_param(float x, uint32_t index, uint32_t key) {
  const float out = bits_float((float_bits(x) + (mix32(index ^ key) >> 16)) & 0xffff0000u);
  return std::fabs(out) <= FLT_MAX ? out : x;
}

// The stochastic code of normalized v from its nearest code c and draw u:
// the map value at or below v, or the next one with probability (v - lo) / (hi - lo).
OPTAX8_HD int stochastic_code(float v, int c, float u, const float* values) {
  const int lo = c - (values[c] > v ? 1 : 0);
  if (lo < 0) return 0;
  if (lo >= 255) return 255;
  const float low = values[lo], high = values[lo + 1];
  return lo + (u * (high - low) < v - low ? 1 : 0);
}

// Number of blocks along an axis of n elements.
OPTAX8_HD int64_t num_blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// A block: its first element, its first row (of all rows), and its width
// (columns) and height (rows); element (r, c) of it is at off + r * cols + c.
struct Block {
  int64_t off, row, width, height;
};

// An array seen as `rows` rows of `cols` elements (its last axis), grouped
// in matrices of `mat_rows` rows (its second-to-last axis; 1 for blocks of
// one row), cut into blocks of tile_rows x tile_cols elements: tile_rows
// rows of one matrix by tile_cols columns. Blocks at the end of a row or of
// a matrix may be smaller. tile_rows = 1 gives runs of `block` elements
// along the last axis. Blocks are numbered row-major: matrix, band of
// tile_rows rows, then column; absmax has one value per block in that order
// (the shape (..., bands, row_blocks) or, for runs, (..., row_blocks)).
struct BlockLayout {
  int64_t rows = 0;        // product of the leading dimensions
  int64_t cols = 0;        // last dimension
  int64_t block = 0;       // tile_rows * tile_cols
  int64_t tile_rows = 1;
  int64_t tile_cols = 0;
  int64_t mat_rows = 1;    // rows of a matrix
  int64_t row_blocks = 0;  // blocks across a row: ceil(cols / tile_cols)
  int64_t bands = 1;       // bands of blocks down a matrix: ceil(mat_rows / tile_rows)
  OPTAX8_HD int64_t elements() const { return rows * cols; }
  OPTAX8_HD int64_t matrices() const { return mat_rows > 0 ? rows / mat_rows : 0; }
  OPTAX8_HD int64_t blocks() const { return matrices() * bands * row_blocks; }
  OPTAX8_HD Block at(int64_t b) const {
    const int64_t band = b / row_blocks, col = (b - band * row_blocks) * tile_cols;
    const int64_t matrix = band / bands, first = (band - matrix * bands) * tile_rows;
    const int64_t row = matrix * mat_rows + first;
    return Block{row * cols + col, row, (cols - col < tile_cols ? cols - col : tile_cols),
                 (mat_rows - first < tile_rows ? mat_rows - first : tile_rows)};
  }
  // The block of the element in row `row` (of all rows), column `col`.
  OPTAX8_HD int64_t block_of(int64_t row, int64_t col) const {
    const int64_t matrix = row / mat_rows;
    return ((matrix * bands) + (row - matrix * mat_rows) / tile_rows) * row_blocks + col / tile_cols;
  }
};

}  // namespace optax8
