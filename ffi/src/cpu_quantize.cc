// CPU FFI handlers: block-wise quantize and dequantize.
#include <algorithm>
#include <cstdint>

#include "optax8/cpu_avx2.h"
#include "optax8/cpu_map.h"
#include "optax8/cpu_parallel.h"
#include "optax8/ffi_common.h"
#include "optax8/quantize.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace optax8 {
namespace {

constexpr int64_t kGrainElements = 1 << 16;

// Elements [0, simd) of a block go through the AVX2 loops where the CPU
// has them; the rest through the portable ones.
inline int64_t simd_prefix(int64_t len) {
#if OPTAX8_HAVE_AVX2_PATH
  if (avx2::supported()) return len - len % 8;
#endif
  return 0;
}

template <typename In>
void quantize_blocks(const typename In::T* x, uint8_t* codes, float* absmax,
                     const BlockLayout& l, const HostMap& map, int64_t first, int64_t last) {
  const bool sign = map.sign;
  for (int64_t b = first; b < last; ++b) {
    const Block k = l.at(b);
    const int64_t simd = simd_prefix(k.width);
    float m = 0.0f, top = 0.0f;   // max absmax_term, max signed_term (signed map)
    for (int64_t r = 0; r < k.height; ++r) {
      const typename In::T* xr = x + k.off + r * l.cols;
#if OPTAX8_HAVE_AVX2_PATH
      if (simd) {
        m = std::max(m, avx2::block_absmax<In>(xr, simd));
        if (sign) top = std::max(top, avx2::block_top<In>(xr, simd));
      }
#endif
      for (int64_t j = simd; j < k.width; ++j) {
        m = std::max(m, absmax_term(In::load(xr[j])));
        top = std::max(top, signed_term(In::load(xr[j])));
      }
    }
    if (sign) m = signed_absmax(m, top);
    const Normalizer normalize(m);
    for (int64_t r = 0; r < k.height; ++r) {
      const typename In::T* xr = x + k.off + r * l.cols;
      uint8_t* cr = codes + k.off + r * l.cols;
#if OPTAX8_HAVE_AVX2_PATH
      if (simd) avx2::block_codes<In>(xr, cr, simd, normalize, map.table, map.floor);
#endif
      for (int64_t j = simd; j < k.width; ++j) {
        const float xj = In::load(xr[j]);
        cr[j] = uint8_t(floor_code(bucket_code(normalize(xj), map.table), xj, map.floor));
      }
    }
    absmax[b] = m;
  }
}

template <typename Out>
void dequantize_blocks(const uint8_t* codes, const float* absmax, typename Out::T* out,
                       const BlockLayout& l, const HostMap& map, int64_t first, int64_t last) {
  for (int64_t b = first; b < last; ++b) {
    const Block k = l.at(b);
    const int64_t simd = simd_prefix(k.width);
    const float a = absmax[b];
    for (int64_t r = 0; r < k.height; ++r) {
      const int64_t offset = k.off + r * l.cols;
#if OPTAX8_HAVE_AVX2_PATH
      if (simd) avx2::block_values<Out>(codes + offset, out + offset, simd, a, map.values);
#endif
      for (int64_t j = simd; j < k.width; ++j)
        out[offset + j] = Out::store(scale_value(map.values[codes[offset + j]], a));
    }
  }
}

// Splits the blocks of `l` over the pool so that each task gets at least
// kGrainElements elements.
template <typename Fn>
void for_blocks(ffi::ThreadPool& pool, const BlockLayout& l, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(l.block, 1));
  parallel_for(pool, l.blocks(), grain, fn);
}

ffi::Error Quantize(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::U8>> codes,
                    ffi::Result<ffi::Buffer<ffi::F32>> absmax, int64_t block_size, int64_t map_kind,
                    int64_t tile_rows) {
  BlockLayout l;
  if (auto e = make_layout(x.dimensions(), codes->dimensions(), absmax->dimensions(), block_size, tile_rows,
                           map_kind, &l);
      e.failure())
    return e;
  const HostMap& map = host_map(map_kind);
  uint8_t* c = codes->typed_data();
  float* a = absmax->typed_data();
  auto run = [&](auto tag) {
    using In = decltype(tag);
    const auto* xs = reinterpret_cast<const typename In::T*>(x.untyped_data());
    for_blocks(pool, l, [&](int64_t first, int64_t last) {
      quantize_blocks<In>(xs, c, a, l, map, first, last);
    });
    return ffi::Error::Success();
  };
  return by_float_dtype(x.element_type(), run);
}

ffi::Error Dequantize(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> absmax,
                      ffi::Result<ffi::AnyBuffer> out, int64_t block_size, int64_t map_kind,
                      int64_t tile_rows) {
  BlockLayout l;
  if (auto e = make_layout(out->dimensions(), codes.dimensions(), absmax.dimensions(), block_size, tile_rows,
                           map_kind, &l);
      e.failure())
    return e;
  const HostMap& map = host_map(map_kind);
  auto run = [&](auto tag) {
    using Out = decltype(tag);
    auto* o = reinterpret_cast<typename Out::T*>(out->untyped_data());
    for_blocks(pool, l, [&](int64_t first, int64_t last) {
      dequantize_blocks<Out>(codes.typed_data(), absmax.typed_data(), o, l, map, first, last);
    });
    return ffi::Error::Success();
  };
  return by_float_dtype(out->element_type(), run);
}

}  // namespace
}  // namespace optax8

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax8_quantize_cpu, optax8::Quantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("map_kind")
                                  .Attr<int64_t>("tile_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax8_dequantize_cpu, optax8::Dequantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("map_kind")
                                  .Attr<int64_t>("tile_rows"));

// The XLA FFI API version these handlers were compiled against.
extern "C" int64_t optax8_cpu_ffi_api_version() {
  return int64_t{XLA_FFI_API_MAJOR} * 1000 + XLA_FFI_API_MINOR;
}
