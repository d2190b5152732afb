// CPU FFI handler of the fused optimizer step (see optax8/step.h).
//
// The block loop (cpu_step_loop.inc) and the rule (step_rule.inc) are
// compiled for scalar floats (any CPU) and, with GCC on x86-64, for AVX2
// vectors of 8 floats and AVX-512 vectors of 16, chosen at run time
// (OPTAX8_CPU_NO_AVX512=1 skips AVX-512).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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

namespace cpu_scalar {

inline float vsqrt(float x) { return std::sqrt(x); }
inline float vsign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
inline float vselect(bool m, float a, float b) { return m ? a : b; }
inline bool vfinite(float x) { return std::fabs(x) <= FLT_MAX; }
inline bool vpositive(float x) { return x > 0.0f; }

#define OPTAX8_RULE inline
#include "optax8/step_rule.inc"
#undef OPTAX8_RULE

using V = float;
constexpr int kLanes = 1;
template <typename G>
inline float lanes_load(const typename G::T* p, G) { return G::load(*p); }
template <typename G>
inline void lanes_store(typename G::T* p, float v, G) { *p = G::store(v); }
inline float lanes_zero() { return 0.0f; }
inline float lanes_broadcast(float x) { return x; }
inline float lanes_max(float x, float acc) { return x > acc ? x : acc; }  // a NaN x is dropped
inline float lanes_dequantize(const uint8_t* codes, const float* values, float absmax, bool) {
  return scale_value(values[*codes], absmax);
}
inline float lanes_abs(float x) { return std::fabs(x); }
inline float lanes_hmax(float x) { return x; }
inline void lanes_store_f32(float* p, float v) { *p = v; }
inline void lanes_codes(const float*, uint8_t*, int64_t, const Normalizer&, const HostMap&) {}

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
inline V lanes_dequantize(const uint8_t* codes, const float* values, float absmax, bool flush) {
  if (flush) return avx2::scale_value8(avx2::load_codes8(codes), values, absmax);
  return _mm256_mul_ps(_mm256_i32gather_ps(values, avx2::load_codes8(codes), 4), _mm256_set1_ps(absmax));
}
inline V lanes_abs(V x) { return avx2::abs8(x); }
inline float lanes_hmax(V x) { return avx2::hmax8(x); }
inline void lanes_store_f32(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void lanes_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                        const HostMap& map) {
  for (int64_t k = 0; k < n; k += 8)
    avx2::store_codes8(codes + k, avx2::bucket_code8(avx2::normalize8(_mm256_loadu_ps(x + k), normalize), map.table));
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
// scale_value of 16 codes.
inline V lanes_dequantize(const uint8_t* codes, const float* values, float absmax, bool flush) {
  const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const V y = _mm512_mul_ps(_mm512_i32gather_ps(c, values, 4), _mm512_set1_ps(absmax));
  if (!flush) return y;
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(y), _mm512_set1_ps(FLT_MIN), _CMP_GE_OQ), y);
}
inline V lanes_abs(V x) { return _mm512_abs_ps(x); }
inline float lanes_hmax(V x) { return _mm512_reduce_max_ps(x); }
inline void lanes_store_f32(float* p, V v) { _mm512_storeu_ps(p, v); }
// Normalizer and bucket_code (cpu_map.h) for 16 values at a time.
inline void lanes_codes(const float* x, uint8_t* codes, int64_t n, const Normalizer& normalize,
                        const HostMap& map) {
  const V scale = _mm512_set1_ps(normalize.scale), inv = _mm512_set1_ps(normalize.inv);
  for (int64_t k = 0; k < n; k += 16) {
    const V xv = _mm512_loadu_ps(x + k);
    const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_abs_ps(xv), _mm512_set1_ps(FLT_MIN), _CMP_GE_OQ);
    const V c = _mm512_min_ps(_mm512_max_ps(xv, _mm512_set1_ps(-FLT_MAX)), _mm512_set1_ps(FLT_MAX));
    const __m512i bits = _mm512_castps_si512(_mm512_maskz_mov_ps(ok, _mm512_mul_ps(_mm512_mul_ps(c, scale), inv)));
    const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), map.table, 4);
    const __m512i lo = _mm512_and_si512(entry, _mm512_set1_epi32(0xff));
    const __m512i key = _mm512_and_si512(_mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31)), _mm512_set1_epi32(0xffff));
    const __mmask16 up = _mm512_cmpgt_epi32_mask(key, _mm512_srli_epi32(entry, 16));
    const __m512i code = _mm512_mask_add_epi32(lo, up, lo, _mm512_set1_epi32(1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtepi32_epi8(code));
  }
}

#include "cpu_step_loop.inc"

}  // namespace cpu_avx512
#pragma GCC pop_options
#endif

namespace {

using BlockFn = void (*)(const StepBuffers&, int64_t, int64_t, float*);

template <typename G, int A>
BlockFn pick_variant() {
#if OPTAX8_HAVE_AVX512_STEP
  if (cpu_avx512::supported() && std::getenv("OPTAX8_CPU_NO_AVX512") == nullptr)
    return &cpu_avx512::step_blocks<A, G>;
#endif
#if OPTAX8_HAVE_AVX2_STEP
  if (avx2::supported()) return &cpu_avx2::step_blocks<A, G>;
#endif
  return &cpu_scalar::step_blocks<A, G>;
}

template <typename G>
BlockFn pick(int64_t algo) {
  switch (algo) {
    case kAdam: return pick_variant<G, kAdam>();
    case kLion: return pick_variant<G, kLion>();
    case kMomentum: return pick_variant<G, kMomentum>();
    case kRms: return pick_variant<G, kRms>();
    case kRss: return pick_variant<G, kRss>();
    default: return pick_variant<G, kAdemamix>();
  }
}

constexpr int64_t kGrainElements = 1 << 14;

// All leaves' blocks form one range that the thread pool splits, so many
// small leaves cost what one leaf of the same total size costs.
ffi::Error Step(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper, ffi::RemainingArgs args, ffi::RemainingRets rets,
                int64_t algo, int64_t block_size, int64_t leaves, int64_t params_mode) {
  if (auto e = check_step_call(args, rets, algo, leaves); e.failure()) return e;
  std::vector<StepBuffers> bufs(leaves);
  std::vector<BlockFn> fns(leaves);
  std::vector<int64_t> first_block(leaves + 1, 0);
  for (int64_t i = 0; i < leaves; ++i) {
    if (auto e = parse_step(hyper, args, rets, i, leaves, algo, block_size, params_mode, &bufs[i]); e.failure())
      return e;
    const ffi::DataType dtype = bufs[i].dtype;
    fns[i] = dtype == ffi::DataType::F32 ? pick<F32>(algo) : dtype == ffi::DataType::BF16 ? pick<BF16>(algo)
                                                                                           : pick<F16>(algo);
    first_block[i + 1] = first_block[i] + bufs[i].l.blocks();
  }
  const int64_t total = first_block[leaves];
  if (total == 0) return ffi::Error::Success();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / block_size);
  const int64_t tmp_size = int64_t(algo_states(algo)) * block_size;
  parallel_for(pool, total, grain, [&](int64_t first, int64_t last) {
    std::vector<float> tmp(tmp_size);
    int64_t i = std::upper_bound(first_block.begin(), first_block.end(), first) - first_block.begin() - 1;
    for (; first < last; ++i) {
      const int64_t end = std::min(last, first_block[i + 1]);
      if (end > first) fns[i](bufs[i], first - first_block[i], end - first_block[i], tmp.data());
      first = end;
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace optax8

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax8_step_cpu, optax8::Step, optax8::step_binding<ffi::ThreadPool>());
