// AVX2 versions of the per-block loops of cpu_quantize.cc, eight elements at
// a time, with the same float32 operations as quantize.h (so the same bits).
// Compiled with a target attribute and chosen at run time: the library keeps
// a portable baseline.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define OPTAX8_HAVE_AVX2_PATH 1

#include <immintrin.h>

#include <cfloat>
#include <cstdint>

#include "optax8/quantize.h"

#define OPTAX8_AVX2 __attribute__((target("avx2,f16c"))) inline

namespace optax8::avx2 {

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

// ---- loads and stores of 8 values as float32 ------------------------------

OPTAX8_AVX2 __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
OPTAX8_AVX2 __m256 load8(const uint16_t* p, BF16) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
OPTAX8_AVX2 __m256 load8(const uint16_t* p, F16) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <typename In>
OPTAX8_AVX2 __m256 load(const typename In::T* p) {
  if constexpr (sizeof(typename In::T) == 4) return load8(p);
  else return load8(p, In{});
}

OPTAX8_AVX2 void store8(float* p, __m256 v, F32) { _mm256_storeu_ps(p, v); }
OPTAX8_AVX2 void store8(uint16_t* p, __m256 v, BF16) {  // round to nearest even; v is never NaN
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
OPTAX8_AVX2 void store8(uint16_t* p, __m256 v, F16) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

OPTAX8_AVX2 __m256 abs8(__m256 x) {
  return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}

// ---- the rules of quantize.h ------------------------------------------------

// absmax_term for 8 values.
OPTAX8_AVX2 __m256 absmax_term8(__m256 x) {
  const __m256 a = abs8(x);
  const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(a, _mm256_set1_ps(FLT_MIN), _CMP_GE_OQ),
                                  _mm256_cmp_ps(a, _mm256_set1_ps(FLT_MAX), _CMP_LE_OQ));
  return _mm256_and_ps(ok, a);
}

// signed_term for 8 values.
OPTAX8_AVX2 __m256 signed_term8(__m256 x) {
  const __m256 a = abs8(x);
  const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(a, _mm256_set1_ps(FLT_MIN), _CMP_GE_OQ),
                                  _mm256_cmp_ps(a, _mm256_set1_ps(FLT_MAX), _CMP_LE_OQ));
  return _mm256_and_ps(ok, x);
}

OPTAX8_AVX2 float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Normalizer::operator() for 8 values.
OPTAX8_AVX2 __m256 normalize8(__m256 x, const Normalizer& n) {
  const __m256 ok = _mm256_cmp_ps(abs8(x), _mm256_set1_ps(FLT_MIN), _CMP_GE_OQ);
  const __m256 c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-FLT_MAX)), _mm256_set1_ps(FLT_MAX));
  const __m256 v = _mm256_mul_ps(_mm256_mul_ps(c, _mm256_set1_ps(n.scale)), _mm256_set1_ps(n.inv));
  return _mm256_and_ps(ok, v);
}

// bucket_code (cpu_map.h) for 8 values.
OPTAX8_AVX2 __m256i bucket_code8(__m256 v, const uint32_t* table) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), _mm256_srli_epi32(bits, 16), 4);
  const __m256i lo = _mm256_and_si256(entry, _mm256_set1_epi32(0xff));
  const __m256i key = _mm256_and_si256(_mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31)), _mm256_set1_epi32(0xffff));
  return _mm256_sub_epi32(lo, _mm256_cmpgt_epi32(key, _mm256_srli_epi32(entry, 16)));
}

// floor_code (quantize.h) of 8 codes of the values x.
OPTAX8_AVX2 __m256i floor_codes8(__m256i codes, __m256 x, int floor) {
  const __m256i normal = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_set1_ps(FLT_MIN), _CMP_GE_OQ));
  return _mm256_max_epi32(codes, _mm256_and_si256(normal, _mm256_set1_epi32(floor)));
}

OPTAX8_AVX2 void store_codes8(uint8_t* p, __m256i codes) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}

OPTAX8_AVX2 __m256 scale_value8(__m256i codes, const float* values, float absmax) {
  const __m256 y = _mm256_mul_ps(_mm256_i32gather_ps(values, codes, 4), _mm256_set1_ps(absmax));
  return _mm256_and_ps(_mm256_cmp_ps(abs8(y), _mm256_set1_ps(FLT_MIN), _CMP_GE_OQ), y);
}

OPTAX8_AVX2 __m256i load_codes8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// ---- per-block loops: the first len - len % 8 elements ----------------------

template <typename In>
OPTAX8_AVX2 float block_absmax(const typename In::T* x, int64_t len) {
  __m256 m = _mm256_setzero_ps();
  for (int64_t k = 0; k + 8 <= len; k += 8) m = _mm256_max_ps(m, absmax_term8(load<In>(x + k)));
  return hmax8(m);
}

// The max of signed_term over the elements.
template <typename In>
OPTAX8_AVX2 float block_top(const typename In::T* x, int64_t len) {
  __m256 m = _mm256_setzero_ps();
  for (int64_t k = 0; k + 8 <= len; k += 8) m = _mm256_max_ps(m, signed_term8(load<In>(x + k)));
  return hmax8(m);
}

template <typename In>
OPTAX8_AVX2 void block_codes(const typename In::T* x, uint8_t* codes, int64_t len, const Normalizer& n,
                             const uint32_t* table, int floor) {
  for (int64_t k = 0; k + 8 <= len; k += 8) {
    const __m256 xv = load<In>(x + k);
    store_codes8(codes + k, floor_codes8(bucket_code8(normalize8(xv, n), table), xv, floor));
  }
}

template <typename Out>
OPTAX8_AVX2 void block_values(const uint8_t* codes, typename Out::T* out, int64_t len, float absmax,
                              const float* values) {
  for (int64_t k = 0; k + 8 <= len; k += 8) store8(out + k, scale_value8(load_codes8(codes + k), values, absmax), Out{});
}

}  // namespace optax8::avx2

#endif
