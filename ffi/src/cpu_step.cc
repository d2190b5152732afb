// CPU FFI handler of the fused optimizer step (see optax8/step.h).
//
// The block loop (cpu_step_loop.inc) and the rule (step_rule.inc) are
// compiled for scalar floats (any CPU) and, with GCC on x86-64, for AVX2
// vectors of 8 floats and AVX-512 vectors of 16, chosen at run time: the
// widest the CPU has, at most OPTAX8_CPU_ISA (scalar, avx2 or avx512) when
// that is set.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "optax8/cpu_avx2.h"
#include "optax8/cpu_map.h"
#include "optax8/cpu_parallel.h"
#include "optax8/ffi_common.h"
#include "optax8/quantize.h"
#include "optax8/step.h"
#include "optax8/step_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace optax8 {

// Elements of a chunk of tiles that step_tiles (cpu_step_loop.inc) steps together.
constexpr int64_t kTileChunk = 2048;

namespace cpu_scalar {

inline float vsqrt(float x) { return std::sqrt(x); }
inline float vsign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
inline float vselect(bool m, float a, float b) { return m ? a : b; }
inline bool vfinite(float x) { return std::fabs(x) <= FLT_MAX; }
inline bool vpositive(float x) { return x > 0.0f; }
inline bool vand(bool a, bool b) { return a && b; }

#define OPTAX8_RULE inline
#include "optax8/step_rule.inc"
#undef OPTAX8_RULE

using V = float;
constexpr int kLanes = 1;
using NanMask = bool;
template <typename G>
inline float lanes_load(const typename G::T* p, G) { return G::load(*p); }
template <typename G>
inline void lanes_store(typename G::T* p, float v, G) { *p = G::store(v); }
inline float lanes_zero() { return 0.0f; }
inline float lanes_broadcast(float x) { return x; }
inline float lanes_max(float x, float acc) { return x > acc ? x : acc; }  // a NaN x is dropped
inline bool lanes_no_nan() { return false; }
inline bool lanes_note_nan(float x, bool acc) { return acc || x != x; }
inline bool lanes_any_nan(bool m) { return m; }
inline float lanes_abs(float x) { return std::fabs(x); }
inline float lanes_hmax(float x) { return x; }
inline float lanes_load_f32(const float* p) { return *p; }
inline void lanes_store_f32(float* p, float v) { *p = v; }
inline void lanes_dequantize_block(const uint8_t* codes, int64_t n, const HostMap& map, float absmax, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = scale_value(map.values[codes[k]], absmax);
}
// scale_value of n codes, element k with absmax[k >> run_shift] (runs of a tile's row segments).
inline void lanes_dequantize_runs(const uint8_t* codes, int64_t n, const HostMap& map, const float* absmax,
                                  int run_shift, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = scale_value(map.values[codes[k]], absmax[k >> run_shift]);
}
inline void lanes_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize, const HostMap& map) {
  for (int64_t k = 0; k < n; ++k)
    codes[k] = uint8_t(floor_code(bucket_code(normalize(x[k]), map.table), x[k], map.floor));
}
inline void lanes_codes_fast(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                             const HostMap& map) {
  lanes_codes(x, codes, n, normalize, map);
}
inline void lanes_stochastic_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                                   const HostMap& map, uint32_t row_index, const uint32_t* col_index, uint32_t key) {
  stochastic_codes(x, codes, n, normalize, map, row_index, col_index, key);
}
inline float lanes_round_param(float x, uint32_t row_index, const uint32_t* col_index, uint32_t key) {
  return round_param(x, row_index + col_index[0], key);
}

#include "cpu_step_loop.inc"

}  // namespace cpu_scalar

#if OPTAX8_HAVE_AVX2_PATH && defined(__GNUC__) && !defined(__clang__)
#define OPTAX8_HAVE_AVX2_STEP 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#pragma GCC diagnostic ignored "-Wignored-attributes"  // HyperF<__m256>: may_alias dropped, harmless
namespace cpu_avx2 {

using V = __m256;
constexpr int kLanes = 8;

inline V vsqrt(V x) { return _mm256_sqrt_ps(x); }
inline V vsign(V x) {
  const V one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), one),
                       _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ), one));
}
inline V vselect(V m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
inline V vfinite(V x) { return _mm256_cmp_ps(avx2::abs8(x), _mm256_set1_ps(FLT_MAX), _CMP_LE_OQ); }
inline V vpositive(V x) { return _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ); }
inline V vand(V a, V b) { return _mm256_and_ps(a, b); }

#define OPTAX8_RULE inline
#include "optax8/step_rule.inc"
#undef OPTAX8_RULE

template <typename G>
inline V lanes_load(const typename G::T* p, G) { return avx2::load<G>(p); }
template <typename G>
inline void lanes_store(typename G::T* p, V v, G) { avx2::store8(p, v, G{}); }
inline V lanes_zero() { return _mm256_setzero_ps(); }
inline V lanes_broadcast(float x) { return _mm256_set1_ps(x); }
inline V lanes_max(V x, V acc) { return _mm256_max_ps(x, acc); }  // a NaN x is dropped
inline V lanes_abs(V x) { return avx2::abs8(x); }
inline float lanes_hmax(V x) { return avx2::hmax8(x); }
using NanMask = V;
inline V lanes_no_nan() { return _mm256_setzero_ps(); }
inline V lanes_note_nan(V x, V acc) { return _mm256_or_ps(acc, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
inline bool lanes_any_nan(V m) { return _mm256_movemask_ps(m) != 0; }
inline V lanes_load_f32(const float* p) { return _mm256_loadu_ps(p); }
inline void lanes_store_f32(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void lanes_dequantize_block(const uint8_t* codes, int64_t n, const HostMap& map, float absmax, float* out) {
  const int64_t main = n - n % 8;
  avx2::block_values<F32>(codes, out, main, absmax, map.values);
  cpu_scalar::lanes_dequantize_block(codes + main, n - main, map, absmax, out + main);
}
inline void lanes_dequantize_runs(const uint8_t* codes, int64_t n, const HostMap& map, const float* absmax,
                                  int run_shift, float* out) {
  const int64_t run = int64_t{1} << run_shift;
  for (int64_t k = 0; k < n; k += run)
    lanes_dequantize_block(codes + k, std::min(run, n - k), map, absmax[k >> run_shift], out + k);
}
inline void lanes_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                        const HostMap& map) {
  for (int64_t k = 0; k < n; k += 8) {
    const V xv = _mm256_loadu_ps(x + k);
    avx2::store_codes8(codes + k, avx2::floor_codes8(avx2::bucket_code8(avx2::normalize8(xv, normalize), map.table),
                                                     xv, map.floor));
  }
}
inline void lanes_codes_fast(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                             const HostMap& map) {
  const V inv = _mm256_set1_ps(normalize.inv);
  for (int64_t k = 0; k < n; k += 8) {
    const V xv = _mm256_loadu_ps(x + k);
    avx2::store_codes8(codes + k, avx2::floor_codes8(avx2::bucket_code8(_mm256_mul_ps(xv, inv), map.table), xv,
                                                     map.floor));
  }
}

// mix32 (quantize.h) of 8 lanes.
inline __m256i mix32_8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7feb352d));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(int(0x846ca68bu)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// stochastic_codes (cpu_map.h) 8 values at a time, the rest one by one; as the AVX-512 loop (the floors
// table and 64-bit gathers of pairs of map values).
inline void lanes_stochastic_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                                   const HostMap& map, uint32_t row_index, const uint32_t* col_index, uint32_t key) {
  const __m256i row = _mm256_set1_epi32(int(row_index)), keys = _mm256_set1_epi32(int(key));
  const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
  const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);   // (low, high) pairs to 4 lows, 4 highs
  const long long* pairs = reinterpret_cast<const long long*>(&map.pairs[0][0]);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    const __m256 v = _mm256_add_ps(avx2::normalize8(xv, normalize), _mm256_setzero_ps());
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(map.floors), _mm256_srli_epi32(bits, 16),
                                                 4);
    const __m256i order = _mm256_and_si256(_mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31)),
                                           _mm256_set1_epi32(0xffff));
    // lo = (entry & 0x1ff) - 1, plus 1 where order >= entry >> 15: minus 1 where entry >> 15 > order (a
    // comparison's all ones are -1)
    const __m256i lo = _mm256_add_epi32(_mm256_and_si256(entry, _mm256_set1_epi32(0x1ff)),
                                        _mm256_cmpgt_epi32(_mm256_srli_epi32(entry, 15), order));
    const __m256i lo1 = _mm256_add_epi32(lo, _mm256_set1_epi32(1));   // pairs[lo + 1]: values lo, lo + 1
    const __m256 a = _mm256_permutevar8x32_ps(
        _mm256_castsi256_ps(_mm256_i32gather_epi64(pairs, _mm256_castsi256_si128(lo1), 8)), split);
    const __m256 b = _mm256_permutevar8x32_ps(
        _mm256_castsi256_ps(_mm256_i32gather_epi64(pairs, _mm256_extracti128_si256(lo1, 1), 8)), split);
    const __m256 low = _mm256_permute2f128_ps(a, b, 0x20), high = _mm256_permute2f128_ps(a, b, 0x31);
    const __m256i index = _mm256_add_epi32(row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_index + k)));
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(mix32_8(_mm256_xor_si256(index, keys)), 8)),
                                   _mm256_set1_ps(0x1p-24f));
    const __m256 up = _mm256_cmp_ps(_mm256_mul_ps(u, _mm256_sub_ps(high, low)), _mm256_sub_ps(v, low), _CMP_LT_OQ);
    const __m256i code = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(lo, _mm256_castps_si256(up)), zero), top);
    avx2::store_codes8(codes + k, avx2::floor_codes8(code, xv, map.floor));
  }
  stochastic_codes(x + k, codes + k, n - k, normalize, map, row_index, col_index + k, key);
}

// round_param (quantize.h) of 8 values x, element k's index row_index + col_index[k].
inline V lanes_round_param(V x, uint32_t row_index, const uint32_t* col_index, uint32_t key) {
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(int(row_index)),
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_index)));
  const __m256i r = _mm256_srli_epi32(mix32_8(_mm256_xor_si256(index, _mm256_set1_epi32(int(key)))), 16);
  const V out = _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(_mm256_castps_si256(x), r),
                                                     _mm256_set1_epi32(int(0xffff0000u))));
  return vselect(vfinite(out), out, x);
}

#include "cpu_step_loop.inc"

}  // namespace cpu_avx2
#pragma GCC pop_options
#endif

#if OPTAX8_HAVE_AVX2_STEP
#define OPTAX8_HAVE_AVX512_STEP 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")
#pragma GCC diagnostic ignored "-Wignored-attributes"  // HyperF<__m512>: may_alias dropped, harmless
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive in its AVX-512 headers
namespace cpu_avx512 {

using V = __m512;
constexpr int kLanes = 16;

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

inline V vsqrt(V x) { return _mm512_sqrt_ps(x); }
inline V vsign(V x) {
  const V one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  return _mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), one),
                       _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), one));
}
inline V vselect(__mmask16 m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
inline __mmask16 vfinite(V x) { return _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(FLT_MAX), _CMP_LE_OQ); }
inline __mmask16 vpositive(V x) { return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ); }
inline __mmask16 vand(__mmask16 a, __mmask16 b) { return a & b; }

#define OPTAX8_RULE inline
#include "optax8/step_rule.inc"
#undef OPTAX8_RULE

inline V lanes_load(const float* p, F32) { return _mm512_loadu_ps(p); }
inline V lanes_load(const uint16_t* p, BF16) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
inline V lanes_load(const uint16_t* p, F16) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void lanes_store(float* p, V v, F32) { _mm512_storeu_ps(p, v); }
inline void lanes_store(uint16_t* p, V v, BF16) {  // round to nearest even; v is never NaN
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void lanes_store(uint16_t* p, V v, F16) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline V lanes_zero() { return _mm512_setzero_ps(); }
inline V lanes_broadcast(float x) { return _mm512_set1_ps(x); }
inline V lanes_max(V x, V acc) { return _mm512_max_ps(x, acc); }  // a NaN x is dropped
inline V lanes_abs(V x) { return _mm512_abs_ps(x); }
inline float lanes_hmax(V x) { return _mm512_reduce_max_ps(x); }
using NanMask = __mmask16;
inline __mmask16 lanes_no_nan() { return 0; }
inline __mmask16 lanes_note_nan(V x, __mmask16 acc) { return acc | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
inline bool lanes_any_nan(__mmask16 m) { return m != 0; }
inline V lanes_load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline void lanes_store_f32(float* p, V v) { _mm512_storeu_ps(p, v); }

inline bool has_vbmi() {
  static const bool ok = __builtin_cpu_supports("avx512vbmi");
  return ok;
}

// y = scale_value(map value, absmax) for 16 map values.
inline V scale_values16(V values, float absmax, bool flush) {
  const V y = _mm512_mul_ps(values, _mm512_set1_ps(absmax));
  if (!flush) return y;
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(y), _mm512_set1_ps(FLT_MIN), _CMP_GE_OQ), y);
}

// The map lookup of 64 codes without gathers (AVX-512 VBMI): byte k of
// each map value comes from two 128-entry byte permutes of plane k (the low
// 7 bits of the code) and a blend on bit 7; unpacking the four planes'
// bytes gives the 64 floats. Codes are first permuted (4-byte groups: a 4x4
// transpose) so that the unpacks' lane order becomes element order.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,f16c")))
void dequantize_vbmi(const uint8_t* codes, int64_t n, const HostMap& map, const float* absmax, int run_shift,
                     float* out) {
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  __m512i plane[4][4];
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 4; ++j) plane[k][j] = _mm512_load_si512(map.planes[k] + 64 * j);
  for (int64_t i = 0; i < n; i += 64) {
    const __m512i c = _mm512_permutexvar_epi32(order, _mm512_loadu_si512(codes + i));
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i b[4];
    for (int k = 0; k < 4; ++k)
      b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(plane[k][0], c, plane[k][1]),
                                    _mm512_permutex2var_epi8(plane[k][2], c, plane[k][3]));
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    const __m512i v[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                          _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
    for (int q = 0; q < 4; ++q) {
      const float a = absmax[(i + 16 * q) >> run_shift];
      // flush: products may be subnormal and must become 0; not needed when
      // |absmax| >= 2**-104, since every non-zero map value exceeds 2**-22.
      _mm512_storeu_ps(out + i + 16 * q, scale_values16(_mm512_castsi512_ps(v[q]), a, std::fabs(a) < 0x1p-104f));
    }
  }
}

// scale_value of n codes into out: 64 at a time by byte permutes where the
// CPU has VBMI, else 16 at a time by gathers; the rest one by one.
inline void lanes_dequantize_block(const uint8_t* codes, int64_t n, const HostMap& map, float absmax, float* out) {
  const bool flush = std::fabs(absmax) < 0x1p-104f;   // as in dequantize_vbmi
  int64_t k = 0;
  if (has_vbmi()) {
    k = n - n % 64;
    dequantize_vbmi(codes, k, map, &absmax, 62, out);
  }
  for (; k + 16 <= n; k += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k)));
    _mm512_storeu_ps(out + k, scale_values16(_mm512_i32gather_ps(c, map.values, 4), absmax, flush));
  }
  cpu_scalar::lanes_dequantize_block(codes + k, n - k, map, absmax, out + k);
}

// scale_value of n codes, element k with absmax[k >> run_shift]: by byte
// permutes where the CPU has VBMI and runs are whole groups of 16.
inline void lanes_dequantize_runs(const uint8_t* codes, int64_t n, const HostMap& map, const float* absmax,
                                  int run_shift, float* out) {
  int64_t k = 0;
  if (has_vbmi() && run_shift >= 4) {
    k = n - n % 64;
    dequantize_vbmi(codes, k, map, absmax, run_shift, out);
  }
  for (; k < n;) {   // k is at a run's start, or at a multiple of 64 (also within a run)
    const int64_t end = std::min(n, ((k >> run_shift) + 1) << run_shift);
    lanes_dequantize_block(codes + k, end - k, map, absmax[k >> run_shift], out + k);
    k = end;
  }
}

// Normalizer (quantize.h) of 16 values x, with its scale and inverse broadcast.
inline V normalize16(V x, V scale, V inv) {
  const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(FLT_MIN), _CMP_GE_OQ);
  const V c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-FLT_MAX)), _mm512_set1_ps(FLT_MAX));
  return _mm512_maskz_mov_ps(ok, _mm512_mul_ps(_mm512_mul_ps(c, scale), inv));
}

// bucket_code (cpu_map.h) of 16 normalized values v.
inline __m512i bucket_codes16(V v, const uint32_t* table) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), table, 4);
  const __m512i lo = _mm512_and_si512(entry, _mm512_set1_epi32(0xff));
  const __m512i key = _mm512_and_si512(_mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31)), _mm512_set1_epi32(0xffff));
  const __mmask16 up = _mm512_cmpgt_epi32_mask(key, _mm512_srli_epi32(entry, 16));
  return _mm512_mask_add_epi32(lo, up, lo, _mm512_set1_epi32(1));
}

// floor_code (quantize.h) of 16 codes: raised to `floor` where the values x are >= FLT_MIN.
inline __m512i floor_codes16(__m512i code, V x, int floor) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(FLT_MIN), _CMP_GE_OQ);
  return _mm512_mask_max_epi32(code, normal, code, _mm512_set1_epi32(floor));
}

inline void store_codes16(uint8_t* codes, __m512i code) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(code));
}

// bucket_code of 16 normalized values v, raised to the unsigned map's positive floor where the values x are
// >= FLT_MIN when kFloor (floor_code, quantize.h), stored as bytes.
template <bool kFloor>
inline void store_bucket_codes16(uint8_t* codes, V v, V x, const uint32_t* table) {
  const __m512i code = bucket_codes16(v, table);
  store_codes16(codes, kFloor ? floor_codes16(code, x, OPTAX8_UNSIGNED_POSITIVE_FLOOR) : code);
}

// Normalizer and bucket_code for 16 values at a time (fast: the fast path's normalization, cpu_step_loop.inc).
template <bool kFloor, bool kFast>
inline void codes16(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize, const uint32_t* table) {
  const V scale = _mm512_set1_ps(normalize.scale), inv = _mm512_set1_ps(normalize.inv);
  for (int64_t k = 0; k < n; k += 16) {
    const V xv = _mm512_loadu_ps(x + k);
    store_bucket_codes16<kFloor>(codes + k, kFast ? _mm512_mul_ps(xv, inv) : normalize16(xv, scale, inv), xv, table);
  }
}
inline void lanes_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                        const HostMap& map) {
  if (map.floor) return codes16<true, false>(x, codes, n, normalize, map.table);   // the unsigned map
  codes16<false, false>(x, codes, n, normalize, map.table);
}
// The same codes for a block that meets the fast path's conditions (cpu_step_loop.inc).
inline void lanes_codes_fast(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                             const HostMap& map) {
  if (map.floor) return codes16<true, true>(x, codes, n, normalize, map.table);
  codes16<false, true>(x, codes, n, normalize, map.table);
}

// mix32 (quantize.h) of 16 lanes.
inline __m512i mix32_16(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb352d));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(int(0x846ca68bu)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

// stochastic_codes (cpu_map.h) 16 values at a time, the rest one by one. stochastic_code's lo (the code of
// the map value at or below v) comes from the floors table, and values lo and lo + 1 from one 64-bit gather
// of pairs (-inf and +inf past the map's ends make the clamps of lo and lo + 1 unnecessary); v + 0 turns -0
// into +0, whose floor is the code of 0 as stochastic_code finds it.
inline void lanes_stochastic_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                                   const HostMap& map, uint32_t row_index, const uint32_t* col_index, uint32_t key) {
  const V scale = _mm512_set1_ps(normalize.scale), inv = _mm512_set1_ps(normalize.inv);
  const __m512i row = _mm512_set1_epi32(int(row_index)), keys = _mm512_set1_epi32(int(key));
  const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, one);
  const void* pairs = &map.pairs[0][0];
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const V xv = _mm512_loadu_ps(x + k);
    const V v = _mm512_add_ps(normalize16(xv, scale, inv), _mm512_setzero_ps());
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), map.floors, 4);
    const __m512i order = _mm512_and_si512(_mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31)),
                                           _mm512_set1_epi32(0xffff));
    const __m512i below = _mm512_and_si512(entry, _mm512_set1_epi32(0x1ff));   // lo + 1
    const __m512i lo1 = _mm512_mask_add_epi32(below, _mm512_cmpge_epu32_mask(order, _mm512_srli_epi32(entry, 15)),
                                              below, one);
    const __m512i pair_lo = _mm512_i32gather_epi64(_mm512_castsi512_si256(lo1), pairs, 8);
    const __m512i pair_hi = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(lo1, 1), pairs, 8);
    const V low = _mm512_castsi512_ps(_mm512_permutex2var_epi32(pair_lo, even, pair_hi));
    const V high = _mm512_castsi512_ps(_mm512_permutex2var_epi32(pair_lo, odd, pair_hi));
    const __m512i index = _mm512_add_epi32(row, _mm512_loadu_si512(col_index + k));   // rounding_draw
    const V u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(mix32_16(_mm512_xor_si512(index, keys)), 8)),
                              _mm512_set1_ps(0x1p-24f));
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_mul_ps(u, _mm512_sub_ps(high, low)), _mm512_sub_ps(v, low),
                                            _CMP_LT_OQ);
    const __m512i lo = _mm512_sub_epi32(lo1, one);
    const __m512i code = _mm512_min_epi32(_mm512_max_epi32(_mm512_mask_add_epi32(lo, up, lo, one), zero), top);
    store_codes16(codes + k, map.floor ? floor_codes16(code, xv, map.floor) : code);
  }
  stochastic_codes(x + k, codes + k, n - k, normalize, map, row_index, col_index + k, key);
}

// round_param (quantize.h) of 16 values x, element k's index row_index + col_index[k].
inline V lanes_round_param(V x, uint32_t row_index, const uint32_t* col_index, uint32_t key) {
  const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(int(row_index)), _mm512_loadu_si512(col_index));
  const __m512i r = _mm512_srli_epi32(mix32_16(_mm512_xor_si512(index, _mm512_set1_epi32(int(key)))), 16);
  const V out = _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(_mm512_castps_si512(x), r),
                                                     _mm512_set1_epi32(int(0xffff0000u))));
  return vselect(vfinite(out), out, x);
}

#include "cpu_step_loop.inc"

}  // namespace cpu_avx512
#pragma GCC pop_options
#endif

namespace {

using BlockFn = void (*)(const StepBuffers&, int64_t, int64_t, float*, uint8_t*);

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest instruction set OPTAX8_CPU_ISA allows (read on each call).
Isa isa_cap() {
  const char* e = std::getenv("OPTAX8_CPU_ISA");
  if (e == nullptr) return kAvx512;
  const std::string s(e);
  return s == "scalar" ? kScalar : s == "avx2" ? kAvx2 : kAvx512;
}

template <typename G, int A>
BlockFn pick_variant(Isa cap) {
#if OPTAX8_HAVE_AVX512_STEP
  if (cap >= kAvx512 && cpu_avx512::supported()) return &cpu_avx512::step_blocks<A, G>;
#endif
#if OPTAX8_HAVE_AVX2_STEP
  if (cap >= kAvx2 && avx2::supported()) return &cpu_avx2::step_blocks<A, G>;
#endif
  return &cpu_scalar::step_blocks<A, G>;
}

template <typename G>
BlockFn pick(int64_t algo, Isa cap) {
#define OPTAX8_CASE(A) \
  case A: return pick_variant<G, A>(cap);
  switch (Algo(algo)) { OPTAX8_FOR_EACH_ALGO(OPTAX8_CASE) }
#undef OPTAX8_CASE
  return nullptr;  // not an algorithm: check_step_call refused it
}

constexpr int64_t kGrainElements = 1 << 14;

// All leaves' blocks form one range that the thread pool splits, so many
// small leaves cost what one leaf of the same total size costs.
ffi::Error Step(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper, ffi::RemainingArgs args, ffi::RemainingRets rets,
                int64_t algo, int64_t block_size, int64_t leaves, int64_t params_mode, int64_t tile_rows,
                int64_t stochastic, int64_t bits) {
  if (auto e = check_step_call(args, rets, algo, leaves, stochastic, bits); e.failure()) return e;
  std::vector<StepBuffers> bufs(leaves);
  std::vector<BlockFn> fns(leaves);
  std::vector<int64_t> first_block(leaves + 1, 0);
  const Isa cap = isa_cap();
  for (int64_t i = 0; i < leaves; ++i) {
    if (auto e = parse_step(hyper, args, rets, i, leaves, algo, block_size, tile_rows, params_mode, stochastic,
                            bits, &bufs[i]);
        e.failure())
      return e;
    const ffi::DataType dtype = bufs[i].dtype;
    fns[i] = dtype == ffi::DataType::F32    ? pick<F32>(algo, cap)
             : dtype == ffi::DataType::BF16 ? pick<BF16>(algo, cap)
                                            : pick<F16>(algo, cap);
    first_block[i + 1] = first_block[i] + bufs[i].l.blocks();
  }
  const int64_t total = first_block[leaves];
  if (total == 0) return ffi::Error::Success();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / block_size);
  const int64_t tmp_size = int64_t(algo_states(algo)) * std::max(block_size, kTileChunk);
  parallel_for(pool, total, grain, [&](int64_t first, int64_t last) {
    std::vector<float> tmp(tmp_size);
    std::vector<uint8_t> tile_codes(std::max(block_size, kTileChunk));
    int64_t i = std::upper_bound(first_block.begin(), first_block.end(), first) - first_block.begin() - 1;
    for (; first < last; ++i) {
      const int64_t end = std::min(last, first_block[i + 1]);
      if (end > first) fns[i](bufs[i], first - first_block[i], end - first_block[i], tmp.data(), tile_codes.data());
      first = end;
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace optax8

// The fingerprint of the rule of algorithm `algo` compiled here (0: none).
extern "C" uint32_t optax8_cpu_rule_fingerprint(int64_t algo) {
  return algo >= 0 && algo < optax8::kNumAlgos ? optax8::kRuleFingerprints[algo] : 0u;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax8_step_cpu, optax8::Step, optax8::step_binding<ffi::ThreadPool>());
