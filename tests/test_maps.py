import pathlib

import numpy as np
import pytest

from optax8 import maps


def test_signed_map_pins_spec_values():
  m = maps.dynamic_map(maps.SIGNED)
  assert m.shape == (256,) and m.dtype == np.float32
  assert np.all(np.diff(m) > 0)
  assert np.argmax(m == 0) == 127
  assert (m < 0).sum() == 127 and (m > 0).sum() == 128
  assert m[-1] == 1.0
  np.testing.assert_allclose(m[0], -0.99296875, rtol=1e-7)
  np.testing.assert_allclose(np.abs(m[m != 0]).min(), 5.5e-7, rtol=1e-6)
  assert -1.0 not in m


def test_unsigned_map_pins_spec_values():
  m = maps.dynamic_map(maps.UNSIGNED)
  assert m.shape == (256,) and np.all(np.diff(m) > 0)
  assert m[0] == 0.0 and m[-1] == 1.0 and (m > 0).sum() == 255
  np.testing.assert_allclose(m[1], 3.25e-7, rtol=1e-6)
  np.testing.assert_allclose(m[-2], (1 - 0.9 / 256) , rtol=1e-7)


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
def test_midpoints_lie_between_neighbours(kind):
  m, mid = maps.dynamic_map(kind), maps.midpoints(kind)
  assert mid.shape == (256,) and mid[255] == np.inf
  assert np.all(m[:-1] < mid[:255]) and np.all(mid[:255] < m[1:])


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
def test_nearest_code_is_argmin_distance(kind):
  rng = np.random.default_rng(0)
  v = rng.uniform(-1.2 if kind == maps.SIGNED else 0, 1.2, 20000).astype(np.float32)
  m = maps.dynamic_map(kind).astype(np.float64)
  dist = np.abs(v[:, None].astype(np.float64) - m[None, :])
  chosen = dist[np.arange(v.size), maps.nearest_code(v, kind)]
  np.testing.assert_allclose(chosen, dist.min(1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
def test_bucket_table_equals_search_on_random_floats(kind):
  rng = np.random.default_rng(1)
  bits = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
  v = bits.view(np.float32)
  v = v[~np.isnan(v)]
  # plus every bucket edge and values around every midpoint
  mids = maps.midpoints(kind)[:255]
  edges = np.arange(65536, dtype=np.uint32) << 16
  extra = np.concatenate([edges.view(np.float32), (edges | 0xFFFF).view(np.float32),
                          mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
  v = np.concatenate([v, extra[~np.isnan(extra)]]).astype(np.float32)
  table, full = maps.bucket_table(kind), maps.midpoints(kind)
  lo = table[v.view(np.uint32) >> 16]
  got = lo + (full[lo] < v)
  np.testing.assert_array_equal(got, maps.nearest_code(v, kind))


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
def test_values_below_two_to_minus_26_get_the_code_of_zero(kind):
  # The CPU step's fast path (ffi/src/cpu_step_loop.inc) relies on this:
  # there, a subnormal state normalizes to at most 2**-26 instead of 0.
  assert np.abs(maps.midpoints(kind)[:255]).min() > 2.0**-23
  v = np.float32([2.0**-26, -(2.0**-26), 2.0**-126, -(2.0**-149)])
  if kind == maps.UNSIGNED:
    v = np.abs(v)
  np.testing.assert_array_equal(maps.nearest_code(v, kind), maps.nearest_code(np.float32([0.0]), kind)[0])


def test_cxx_header_is_generated_from_the_maps():
  header = pathlib.Path(__file__).parents[1] / "ffi" / "include" / "optax8" / "maps.h"
  assert header.read_text() == maps.cxx_header(), "run: python -m optax8.maps > ffi/include/optax8/maps.h"


def test_unknown_map_kind():
  with pytest.raises(ValueError, match="map kind"):
    maps.map_id("dynamic")


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
def test_compact_bucket_table_gives_the_nearest_code(kind):
  """The CUDA step's lookup: clamp the bucket magnitude to [BUCKET_LO, BUCKET_HI], one byte, one comparison."""
  table, mids = maps.compact_buckets(kind), maps.midpoints(kind)
  rng = np.random.default_rng(1)
  mid_bits = mids[:255].view(np.uint32)
  bits = np.concatenate([
      mid_bits, mid_bits - 1, mid_bits + 1, mid_bits ^ 0x80000000,            # on and around every midpoint
      (np.arange(0x10000, dtype=np.uint32) << 16), (np.arange(0x10000, dtype=np.uint32) << 16) | 0xFFFF,  # bucket edges
      rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)])
  v = bits.view(np.float32)
  v = v[~np.isnan(v)]
  b = v.view(np.uint32)
  m = np.clip((b >> 16) & 0x7FFF, maps.BUCKET_LO, maps.BUCKET_HI) - maps.BUCKET_LO
  c = table[(b >> 31).astype(np.int64), m.astype(np.int64)].astype(np.int64)
  code = c + (mids[c] < v)
  np.testing.assert_array_equal(code, maps.nearest_code(v, kind))
