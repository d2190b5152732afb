import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import optax8
from optax8 import maps
from helpers import DTYPES, FMAX, TINY, needs_native_cpu, per_element, quantize_with, dequantize_with, reference_quantize

BACKENDS = ["jax", pytest.param("native", marks=needs_native_cpu)]
BLOCKS = [2**k for k in range(0, 13)]


@st.composite
def arrays(draw, signed=True):
  rank = draw(st.integers(1, 3))
  shape = tuple(draw(st.lists(st.integers(1, 9), min_size=rank - 1, max_size=rank - 1)))
  shape += (draw(st.integers(1, 3000)),)
  dtype = draw(st.sampled_from(DTYPES))
  scales = [1e-6, 1.0, 1e3] if dtype == jnp.float16 else [1e-30, 1e-6, 1.0, 1e3, 1e30]
  scale = draw(st.sampled_from(scales))
  seed = draw(st.integers(0, 2**31))
  x = np.random.default_rng(seed).standard_normal(shape) * scale
  if not signed:
    x = np.abs(x)
  return np.asarray(jnp.asarray(x, dtype))


def _round_trip_bound(x32, absmax_per_elem, kind):
  """Half the gap between the two map values around x / absmax, times |absmax|.

  The signed map has no -1: below its minimum -0.99296875 (an element of a
  tie with the opposite sign's absmax) the bound is the distance to that
  minimum (4e-8 * |absmax| more than the half gap).
  """
  m = maps.dynamic_map(kind).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    v = np.where(absmax_per_elem != 0, x32 / absmax_per_elem, 0)
  hi = np.clip(np.searchsorted(m, v), 1, 255)
  half_gap = 0.5 * (m[hi] - m[hi - 1])
  return np.maximum(half_gap, m[0] - v) * np.abs(absmax_per_elem)


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
@given(data=st.data())
def test_round_trip_error_within_half_gap(kind, data):
  x = data.draw(arrays(signed=kind == maps.SIGNED))
  block = data.draw(st.sampled_from(BLOCKS))
  q = optax8.quantize(x, block_size=block, kind=kind)
  assert q.codes.shape == x.shape and q.codes.dtype == jnp.uint8
  assert q.absmax.shape == optax8.absmax_shape(x.shape, block) and q.absmax.dtype == jnp.float32
  x32 = np.asarray(x, np.float32).astype(np.float64)
  x32 = np.where(np.abs(x32) < TINY, 0, x32)
  amax = per_element(q.absmax, x.shape, block)
  err = np.abs(np.asarray(optax8.dequantize(q), np.float64) - x32)
  bound = _round_trip_bound(x32, amax, kind)
  # float32 rounding of x / absmax and of map * absmax: 2**-23 * |absmax|
  assert np.all(err <= bound + 2.0**-23 * np.abs(amax)), float(np.max(err - bound))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", maps.MAP_KINDS)
@given(data=st.data())
def test_backend_matches_numpy_reference(backend, kind, data):
  x = data.draw(arrays())
  block = data.draw(st.sampled_from(BLOCKS))
  codes, absmax = quantize_with(backend, x, block, kind)
  ref_codes, ref_absmax = reference_quantize(x, block, kind)
  np.testing.assert_array_equal(np.asarray(absmax), ref_absmax)
  np.testing.assert_array_equal(np.asarray(codes), ref_codes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", maps.MAP_KINDS)
def test_backend_matches_numpy_reference_at_the_edges(backend, kind):
  """Signed blocks whose largest |x| is negative or tied, and positive values far below their block's absmax
  (the unsigned map's floor), against the reference."""
  x = np.float32([[1.0, 1e-9, -1e-12, 0.5], [-2.0, 1e-20, 2e-38, 1.0], [-3.0, 3.0, -1e-9, 0.0]])
  codes, absmax = quantize_with(backend, x, 4, kind, rows=1)
  ref_codes, ref_absmax = reference_quantize(x, 4, kind, rows=1)
  np.testing.assert_array_equal(np.asarray(absmax), ref_absmax)
  np.testing.assert_array_equal(np.asarray(codes), ref_codes)


@needs_native_cpu
@pytest.mark.parametrize("kind", maps.MAP_KINDS)
@given(data=st.data())
def test_native_cpu_and_jax_are_bit_identical(kind, data):
  x = data.draw(arrays())
  block = data.draw(st.sampled_from(BLOCKS))
  out_dtype = data.draw(st.sampled_from(DTYPES))
  c_jax, a_jax = quantize_with("jax", x, block, kind)
  c_nat, a_nat = quantize_with("native", x, block, kind)
  np.testing.assert_array_equal(np.asarray(c_nat), np.asarray(c_jax))
  np.testing.assert_array_equal(np.asarray(a_nat).view(np.uint32), np.asarray(a_jax).view(np.uint32))
  d_jax = dequantize_with("jax", c_jax, a_jax, block, kind, out_dtype)
  d_nat = dequantize_with("native", c_jax, a_jax, block, kind, out_dtype)
  assert d_nat.dtype == d_jax.dtype == out_dtype
  np.testing.assert_array_equal(np.asarray(d_nat).view(np.uint8), np.asarray(d_jax).view(np.uint8))


SPECIAL = np.array([0.0, -0.0, 1e-45, -1e-40, TINY, -TINY, 1.0, -2.5, FMAX, -FMAX, np.inf, -np.inf, np.nan],
                   np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_do_not_spread(backend, dtype):
  rng = np.random.default_rng(3)
  block = 64
  base = rng.standard_normal((len(SPECIAL), block)).astype(np.float32)
  x = base.copy()
  x[:, 5] = SPECIAL  # one special value per block
  with np.errstate(over="ignore"):  # FMAX is inf in float16
    x = np.asarray(x.astype(dtype))
  clean = x.copy()
  clean[:, 5] = 0
  codes, absmax = quantize_with(backend, x, block, maps.SIGNED, rows=1)   # a block per row
  codes_clean, absmax_clean = quantize_with(backend, clean, block, maps.SIGNED, rows=1)
  codes, absmax = np.asarray(codes), np.asarray(absmax)[:, 0]
  assert np.all(np.isfinite(absmax))
  others = np.arange(block) != 5
  with np.errstate(over="ignore"):
    special32 = SPECIAL.astype(dtype).astype(np.float32)
  ignored = ~np.isfinite(special32) | (np.abs(special32) < TINY)
  # NaN, +-inf and subnormals leave absmax and every other element alone
  np.testing.assert_array_equal(absmax[ignored], np.asarray(absmax_clean)[ignored, 0])
  np.testing.assert_array_equal(codes[ignored][:, others], np.asarray(codes_clean)[ignored][:, others])
  zero_code = 127
  deq = np.asarray(dequantize_with(backend, codes, absmax[:, None], block, maps.SIGNED, jnp.float32, rows=1))
  assert np.all(np.isfinite(deq))
  for row, s in enumerate(special32):
    representable = maps.dynamic_map(maps.SIGNED) * absmax[row]   # the block's values (absmax may be negative)
    if np.isnan(s) or (np.isfinite(s) and abs(s) < TINY):
      assert codes[row, 5] == zero_code
    elif s == np.inf:   # saturates to the block's largest value
      assert deq[row, 5] == representable.max() > 0
    elif s == -np.inf:
      assert deq[row, 5] == representable.min() < 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_blocks(backend):
  x = np.zeros((6, 32), np.float32)
  x[1, :3] = [FMAX, -FMAX, 1e38]           # near the float32 limit
  x[2, :2] = [1e-37, -5e-38]               # tiny but normal absmax
  x[3, :2] = [1e-37, np.inf]               # inf with a tiny absmax: v overflows
  x[4, :2] = [1e-37, -np.inf]
  x[5, :2] = [np.inf, np.nan]              # nothing finite: absmax 0
  codes, absmax = map(np.asarray, quantize_with(backend, x, 32, maps.SIGNED, rows=1))   # a block per row
  assert absmax[0, 0] == 0 and np.all(codes[0] == 127)
  assert absmax[1, 0] == FMAX and codes[1, 0] == 255 and codes[1, 1] == 0
  assert absmax[2, 0] == np.float32(1e-37) and codes[2, 0] == 255
  assert codes[3, 1] == 255 and codes[4, 1] == 0
  assert absmax[5, 0] == 0 and np.all(codes[5] == 127)
  deq = np.asarray(dequantize_with(backend, codes, absmax, 32, maps.SIGNED, jnp.float32, rows=1))
  assert np.all(np.isfinite(deq)) and np.all(deq[0] == 0) and np.all(deq[5] == 0)
  np.testing.assert_allclose(deq[1, :3], [FMAX, -0.99296875 * FMAX, 1e38], rtol=0, atol=0.00704 * FMAX)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_absmax_takes_the_sign_of_the_largest_element(backend):
  """The signed map has +1 but no -1: a block whose largest |x| is negative gets a negative absmax, so that
  element dequantizes exactly, as a positive one does; a tie goes to the positive absmax. The unsigned map
  keeps max |x|."""
  x = np.zeros((5, 64), np.float32)
  x[0, :3] = [0.5, -3.0, 2.0]                  # the largest magnitude is negative
  x[1, :3] = [0.5, 3.0, -2.0]                  # positive
  x[2, :3] = [-3.0, 3.0, 1.0]                  # a tie
  x[3, :3] = [-1e-37, np.nan, -np.inf]         # NaN and inf do not count; absmax is -1e-37
  x[4, :3] = [2e-45, -1e-44, 0.0]              # subnormals do not count: absmax 0
  codes, absmax = map(np.asarray, quantize_with(backend, x, 64, maps.SIGNED, rows=1))   # a block per row
  np.testing.assert_array_equal(absmax[:, 0], np.float32([-3.0, 3.0, 3.0, -1e-37, 0.0]))
  deq = np.asarray(dequantize_with(backend, codes, absmax, 64, maps.SIGNED, jnp.float32, rows=1))
  assert deq[0, 1] == -3.0 and deq[1, 1] == 3.0 and deq[2, 1] == 3.0 and deq[3, 0] == np.float32(-1e-37)
  assert deq[2, 0] == np.float32(-0.99296875 * 3.0)   # the tie's negative element: the map's minimum
  assert deq[3, 2] == np.float32(-1e-37) and np.all(deq[4] == 0)   # -inf saturates to the block's lowest value
  _, unsigned = quantize_with(backend, np.abs(x[:3]), 64, maps.UNSIGNED, rows=1)
  np.testing.assert_array_equal(np.asarray(unsigned)[:, 0], np.float32([3.0, 3.0, 3.0]))


@pytest.mark.parametrize("shape", [(), (1,), (5,), (3, 0), (0,), (2, 3, 300)])
def test_shapes_including_scalars_and_empty(shape):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  q = optax8.quantize(x, block_size=128)
  assert q.codes.shape == shape and q.absmax.shape == optax8.absmax_shape(shape, 128)
  d = optax8.dequantize(q)
  assert d.shape == shape
  np.testing.assert_allclose(d, x, atol=0.01 * float(jnp.max(jnp.abs(x), initial=0.0)) + 1e-30)


def test_dequantize_dtypes_round_like_astype():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 1000)) * 1e3, jnp.float32)
  q = optax8.quantize(x)
  d32 = optax8.dequantize(q)
  for dtype in (jnp.bfloat16, jnp.float16):
    d = optax8.dequantize(q, dtype)
    assert d.dtype == dtype
    np.testing.assert_array_equal(np.asarray(d).view(np.uint16), np.asarray(d32.astype(dtype)).view(np.uint16))


def test_jit_and_vmap():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3, 700)), jnp.float32)
  q = optax8.quantize(x, 256)
  qj = jax.jit(optax8.quantize, static_argnums=(1, 2))(x, 256, "signed")
  qv = jax.vmap(lambda r: optax8.quantize(r, 256))(x)
  for other in (qj, qv):
    np.testing.assert_array_equal(other.codes, q.codes)
    np.testing.assert_array_equal(other.absmax, q.absmax)
  dv = jax.vmap(optax8.dequantize)(qv)
  np.testing.assert_array_equal(dv, optax8.dequantize(q))


def test_quantized_array_is_a_pytree_with_static_layout():
  x = jnp.ones((4, 512))
  q256, q512 = optax8.quantize(x, 256), optax8.quantize(x, 512)
  assert jax.tree.structure(q256) != jax.tree.structure(q512)
  assert len(jax.tree.leaves(q256)) == 2
  assert q256.nbytes == 4 * 512 + 4 * 32   # codes, and one absmax per tile of 16 x 16 (4 rows of it here)
  doubled = jax.tree.map(lambda a: a, q256)
  assert isinstance(doubled, optax8.QuantizedArray) and doubled.block_size == 256
  abstract = jax.eval_shape(lambda x: optax8.quantize(x, 256), x)
  assert abstract.codes.shape == (4, 512) and abstract.absmax.shape == (1, 32)


def test_clear_errors():
  with pytest.raises(TypeError, match="float32, bfloat16 or float16, got int32"):
    optax8.quantize(jnp.ones(4, jnp.int32))
  with pytest.raises(ValueError, match="power of two"):
    optax8.quantize(jnp.ones(4), block_size=100)
  with pytest.raises(ValueError, match="map kind"):
    optax8.quantize(jnp.ones(4), kind="dynamic")
  q = optax8.quantize(jnp.ones((4, 1024)), 256)
  with pytest.raises(ValueError, match=r"absmax shape \(1, 64\) .* block_size 512 \(expected \(1, 32\)\)"):
    optax8.dequantize(optax8.QuantizedArray(q.codes, q.absmax, 512))
  with pytest.raises(TypeError, match="codes must be uint8"):
    optax8.dequantize(optax8.QuantizedArray(q.codes.astype(jnp.int32), q.absmax, 256))
  with pytest.raises(TypeError, match="dtype must be float32"):
    optax8.dequantize(q, jnp.int8)


@needs_native_cpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_conversions_match_xla_exhaustively(dtype):
  # every 16-bit pattern as input (NaN and inf included) ...
  x = np.arange(65536, dtype=np.uint16).view(dtype).reshape(256, 256)
  for block in (1, 256):
    c_jax, a_jax = quantize_with("jax", x, block, maps.SIGNED)
    c_nat, a_nat = quantize_with("native", x, block, maps.SIGNED)
    np.testing.assert_array_equal(np.asarray(c_nat), np.asarray(c_jax))
    np.testing.assert_array_equal(np.asarray(a_nat), np.asarray(a_jax))
  # ... and outputs across the whole range, overflow and subnormals included
  rng = np.random.default_rng(0)
  absmax = (2.0 ** rng.uniform(-40, 20, (512, 1))).astype(np.float32)
  codes = np.tile(np.arange(256, dtype=np.uint8), (512, 1))
  d_jax = dequantize_with("jax", codes, absmax, 256, maps.SIGNED, dtype, rows=1)
  d_nat = dequantize_with("native", codes, absmax, 256, maps.SIGNED, dtype, rows=1)
  np.testing.assert_array_equal(np.asarray(d_nat).view(np.uint16), np.asarray(d_jax).view(np.uint16))
  assert np.isinf(np.asarray(d_jax, np.float32)).any() or dtype == jnp.bfloat16


def test_large_block_size_on_short_rows_needs_no_padding():
  from optax8.kernels import jax_backend
  x = jnp.asarray(np.random.default_rng(4).standard_normal((64, 10)), jnp.float32)
  f = jax.jit(lambda x: jax_backend.quantize(x, 2**20, maps.SIGNED, 1024))
  assert f.lower(x).compile().memory_analysis().temp_size_in_bytes < 2**20
  codes, absmax = f(x)
  small_codes, small_absmax = jax_backend.quantize(x, 4096, maps.SIGNED, 64)   # one 64 x 64 tile holds it all
  np.testing.assert_array_equal(codes, small_codes)
  np.testing.assert_array_equal(absmax, small_absmax)
  q = optax8.quantize(x, 2**20)
  np.testing.assert_array_equal(optax8.dequantize(q),
                                jax_backend.dequantize(codes, absmax, 2**20, maps.SIGNED, jnp.float32, 1024))


@pytest.mark.parametrize("kind", maps.MAP_KINDS + maps.MAP4_KINDS)
def test_level_encoder_equals_the_table_encoder(kind):
  """The arithmetic encoder (TPU; 4-bit maps: `small_code`'s comparisons) and the bucket-table one (CPU, CUDA)
  give the same code: around every decision point and map value, both signs, and on random floats of every
  exponent (all 2**32 floats were compared once for the 8-bit maps)."""
  from optax8.kernels import jax_backend
  points = np.concatenate([maps.midpoints(kind)[:-1], maps.dynamic_map(kind), [0.0, 1.0, 3e38, np.inf]])
  points = np.concatenate([points, -points]).astype(np.float32)
  near = [points]
  for direction in (np.inf, -np.inf):
    x = points
    for _ in range(4):
      x = np.nextafter(x, np.float32(direction))
      near.append(x)
  bits = np.random.default_rng(0).integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
  v = np.concatenate(near + [bits.view(np.float32)])
  v = jnp.asarray(v[~np.isnan(v)])
  encoder = jax_backend.small_code if kind in maps.MAP4_KINDS else jax_backend.level_code
  level = jax.jit(encoder, static_argnums=1)(v, kind)
  table = jax.jit(jax_backend.table_code, static_argnums=1)(v, kind)
  np.testing.assert_array_equal(np.asarray(level), np.asarray(table))
  np.testing.assert_array_equal(np.asarray(level), maps.nearest_code(np.asarray(v), kind))


def test_lowered_for_tpu_the_jax_path_gathers_from_small_tables_only():
  """Quantize, dequantize and the fused step, lowered for a TPU: every gather reads a table of <= 256 entries."""
  import re
  from optax8.kernels import jax_backend, jax_step
  from optax8.kernels.algorithms import hyper_vector
  x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
  codes, absmax = jax.ShapeDtypeStruct((64, 256), jnp.uint8), jax.ShapeDtypeStruct((4, 16), jnp.float32)
  packed, absmax4 = jax.ShapeDtypeStruct((64, 128), jnp.uint8), jax.ShapeDtypeStruct((8, 16), jnp.float32)
  fns = [(lambda x: jax_backend.quantize(x, 256, "signed", 16), (x,)),
         (lambda c, a: jax_backend.dequantize(c, a, 256, "unsigned", jnp.float32, 16), (codes, absmax)),
         (lambda g, p, s: jax_step.step(0, hyper_vector(scale=-1e-3), g, p, s, 256, True),
          (x, x, ((codes, absmax), (codes, absmax)))),
         (lambda g, p, s: jax_step.step(0, hyper_vector(scale=-1e-3), g, p, s, 128, True, bits=4),   # 4-bit
          (x, x, ((packed, absmax4), (packed, absmax4))))]
  for fn, args in fns:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    tables = [int(n) for n in re.findall(r'"stablehlo.gather"\(.*? : \(tensor<(\d+)x', text)]
    assert tables and max(tables) <= 256, tables


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_unsigned_map_keeps_code_0_for_zero(backend):
  """A positive normal value never gets the unsigned map's code 0, however small against its block's absmax
  (a second moment never dequantizes to 0); zero and subnormals do. The signed map rounds to nearest."""
  x = np.full((4, 256), 1e-9, np.float32)
  x[:, 0] = 1.0
  x[0, 1:4] = [0.0, 1e-39, np.finfo(np.float32).tiny]   # zero, a subnormal, the smallest normal
  x[1, 1] = 1e-35
  x = x.reshape(-1)   # a vector: runs of 256, each with a 1.0 first
  codes, absmax = quantize_with(backend, jnp.asarray(x), 256, maps.UNSIGNED)
  codes = np.asarray(codes).reshape(4, 256)
  x = x.reshape(4, 256)
  assert codes[0, 1] == 0 and codes[0, 2] == 0
  normal = x >= np.finfo(np.float32).tiny
  assert np.all(codes[normal] >= 1)
  values = np.asarray(optax8.dequantize(optax8.QuantizedArray(jnp.asarray(codes.reshape(-1)), absmax, 256,
                                                              maps.UNSIGNED))).reshape(4, 256)
  assert np.all(values[normal] > 0) and np.all(values[~normal] == 0)
  # round to nearest would give 0: these values lie below the first decision point
  assert np.all(maps.nearest_code(x[1:, 1:], maps.UNSIGNED) == 0)   # each run's absmax is 1
  signed, _ = quantize_with(backend, jnp.asarray(x.reshape(-1)), 256, maps.SIGNED)
  np.testing.assert_array_equal(np.asarray(signed).reshape(4, 256)[1:, 1:], 127)
