"""Pure-JAX block-wise quantization: the reference backend.

It follows the rules of ``ffi/include/optax8/quantize.h`` operation by
operation, so the native CPU handler and this path give bit-identical codes
and absmax, in the block layout of `optax8.layout`. Inputs have rank >= 1
(the dispatcher reshapes scalars).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax8 import layout, maps
from optax8.sharding import num_shards
from optax8.layout import num_blocks

_TINY = np.float32(np.finfo(np.float32).tiny)
_FMAX = np.float32(np.finfo(np.float32).max)
_HUGE = np.float32(2.0**126)  # above it, 1 / absmax would be subnormal


def _reshape(x, shape, spec):
  """``x.reshape(shape)``; on an explicit mesh the result's spec is ``spec`` (an axis split in two keeps its mesh
  axes on the first part, axes merged keep the first one's)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
    return x.reshape(shape)
  return lax.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


def _spec(x):
  """x's spec, one entry per axis (all None off explicit meshes: then `_reshape` ignores it)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()) or ())
  return spec + (None,) * (x.ndim - len(spec))


def on_explicit_mesh(x) -> bool:
  """Whether x's type names mesh axes (an explicit mesh)."""
  return any(e is not None for e in _spec(x))


def _split_spec(x, entry, nb, width):
  """The specs of (nb, width) for an axis of spec ``entry`` cut into nb blocks: on the blocks where they divide
  among the shards, else on a single block's elements (nb = 1), else none (an explicit mesh then refuses the
  reshape: such an axis splits blocks, which `optax8.sharding.state_shardings` refuses for optimizer state)."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if entry is None or mesh is None:
    return (None, None)
  shards = num_shards(mesh, entry)
  if nb % shards == 0:
    return (entry, None)
  return (None, entry) if nb == 1 and width % shards == 0 else (None, None)


def _blocked(x, block_size, rows, fill):
  """(..., R, C) -> (..., nR, tR, nC, tC) for blocks of ``rows`` > 1 rows, else (..., n) -> (..., nb, width).

  Pads with `fill`. Along each blocked axis the width is the block's extent,
  or the axis' length when one block spans it (no padding up to a large
  block). A sharded axis is split into whole blocks per shard
  (`optax8.sharding`), so it needs no padding.
  """
  k = 2 if rows > 1 else 1
  extents = layout.extents(x.ndim, block_size, rows)
  lead, spec = x.shape[:x.ndim - k], _spec(x)
  pads, blocked, blocked_spec = [(0, 0)] * len(lead), lead, spec[:x.ndim - k]
  for n, b, entry in zip(x.shape[x.ndim - k:], extents[x.ndim - k:], spec[x.ndim - k:]):
    nb = num_blocks(n, b)
    width = b if nb > 1 else n
    pads.append((0, nb * width - n))
    blocked += (nb, width)
    blocked_spec += _split_spec(x, entry, nb, width)
  if any(p for _, p in pads):
    x = jnp.pad(x, pads, constant_values=fill)
  return _reshape(x, blocked, blocked_spec)


def _per_element(absmax, rows):
  """absmax broadcast against ``_blocked`` elements."""
  return absmax[..., None] if rows == 1 else absmax[..., :, None, :, None]


def _unblocked(x, shape, rows):
  """Inverse of ``_blocked``: the array of ``shape`` (padding dropped)."""
  spec = _spec(x)
  if rows == 1:
    x = _reshape(x, x.shape[:-2] + (x.shape[-2] * x.shape[-1],), spec[:-2] + (spec[-2] or spec[-1],))
    return x if x.shape[-1] == shape[-1] else x[..., :shape[-1]]
  x = _reshape(x, x.shape[:-4] + (x.shape[-4] * x.shape[-3], x.shape[-2] * x.shape[-1]),
               spec[:-4] + (spec[-4] or spec[-3], spec[-2] or spec[-1]))
  return x if x.shape[-2:] == tuple(shape[-2:]) else x[..., :shape[-2], :shape[-1]]


def _lookup(table, index):
  """table[index] for a constant table, sharded like ``index`` (also on explicit meshes)."""
  return jnp.asarray(table).at[index].get(mode="promise_in_bounds", out_sharding=jax.typeof(index).sharding)


def _count_below(a, kind):
  """``#{q : mids[q] < a}`` over the decision points of ``kind``'s magnitudes (`optax8.maps.Levels`).

  The level by seven comparisons, the position in it by arithmetic (one
  code low at most), then one comparison with a decision point from a
  table of 128 (signed) or 255 (unsigned) values.
  """
  lv = maps.levels(kind)
  level = sum((a > lv.mids[f]).astype(jnp.int32) for f in lv.first)   # 1 + the level; 0 below every point

  def pick(values):
    out = jnp.asarray(values[0])
    for i in range(2, 8):
      out = jnp.where(level >= i, values[i - 1], out)
    return out

  bottom, inv = pick(lv.bottom), pick(lv.inv_spacing)
  first, top = pick(lv.first), pick(lv.count - 1)
  within = jnp.clip(jnp.ceil((a - bottom) * inv - 1), 0, top).astype(jnp.int32)
  i = first + 1 + within
  count = i + (_lookup(lv.mids, i) < a).astype(jnp.int32)
  return jnp.where(level > 0, count, 0)


def table_code(v, kind):
  """Codes of normalized float32 values: bucket table plus one comparison (`optax8.maps.bucket_table`).

  ``lo = table[bucket]``, ``code = lo + (mid[lo] < v)``, with ``mid[lo]``
  read from a second table indexed by the same bucket: two gathers from
  tables of 65,536 entries per element, the fastest encoder on XLA:CPU.
  """
  bucket = lax.shift_right_logical(lax.bitcast_convert_type(v, jnp.uint32), jnp.uint32(16)).astype(jnp.int32)
  lo = _lookup(maps.bucket_table(kind), bucket)
  mid = _lookup(maps.bucket_midpoints(kind), bucket)
  return lo + (mid < v).astype(jnp.uint8)


def level_code(v, kind):
  """Codes of normalized float32 values (not NaN): ``#{j : midpoints[j] < v}``, by `_count_below`.

  A negative value of the signed map counts the magnitudes' points at or
  below ``|v|``, which are those below the next float up.
  """
  if kind == maps.UNSIGNED:
    return _count_below(v, kind).astype(jnp.uint8)
  a = jnp.abs(v)
  negative = v < 0
  up = lax.bitcast_convert_type(lax.bitcast_convert_type(a, jnp.int32) + (a < np.inf).astype(jnp.int32), jnp.float32)
  count = _count_below(jnp.where(negative, up, a), kind)
  return jnp.where(negative, jnp.maximum(127 - count, 0), 127 + count).astype(jnp.uint8)


def code_of(v, kind):
  """Codes of normalized float32 values: `table_code` on CPU and CUDA, `level_code` (4-bit maps:
  `small_code`) elsewhere (TPU).

  They give the same code for every float32 (a test checks every decision
  point's neighbours, and the 8-bit ones were compared on all 2**32
  floats); a gather from a table of 65,536 entries is cheap on a CPU or a
  GPU and slow on a TPU, where the levels' arithmetic is not.
  """
  other = small_code if maps.BITS[kind] == 4 else level_code
  return lax.platform_dependent(v, cpu=lambda v: table_code(v, kind), cuda=lambda v: table_code(v, kind),
                                default=lambda v: other(v, kind))


def small_code(v, kind):
  """Codes of normalized float32 values in a 4-bit map: ``#{j : midpoints[j] < v}`` by 15 comparisons."""
  count = jnp.zeros(v.shape, jnp.uint8)
  for mid in maps.midpoints(kind)[:-1]:
    count = count + (v > mid).astype(jnp.uint8)
  return count


def stochastic_code(v, nearest, u, kind):
  """Codes of normalized float32 values ``v`` rounded stochastically (`optax8.rounding`), from their nearest
  codes and their draws ``u`` in [0, 1)."""
  values = maps.dynamic_map(kind)
  top = len(values) - 1
  c = nearest.astype(jnp.int32)
  lo = c - (_lookup(values, c) > v).astype(jnp.int32)   # the code of the map value at or below v; -1 below the map
  low, high = _lookup(values, jnp.clip(lo, 0, top)), _lookup(values, jnp.clip(lo + 1, 0, top))
  return jnp.clip(lo + (u * (high - low) < v - low).astype(jnp.int32), 0, top).astype(jnp.uint8)


def pack4(codes):
  """4-bit codes (uint8 below 16) two a byte along the last axis (`optax8.layout.packed_shape`).

  A pair of codes is read as one little-endian uint16 (a bitcast, no
  shuffle), which XLA fuses into the loop that makes the codes.
  """
  if codes.shape[-1] % 2:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
  pairs = _reshape(codes, codes.shape[:-1] + (codes.shape[-1] // 2, 2), _spec(codes) + (None,))
  both = lax.bitcast_convert_type(pairs, jnp.uint16)   # element 2j in the low byte
  return ((both & np.uint16(0x0F)) | ((both >> np.uint16(4)) & np.uint16(0xF0))).astype(jnp.uint8)


def unpack4(packed, columns: int):
  """The codes of `pack4`: ``(..., ceil(columns / 2))`` bytes to ``(..., columns)`` codes."""
  b = packed.astype(jnp.uint16)
  pairs = lax.bitcast_convert_type((b & np.uint16(0x0F)) | ((b & np.uint16(0xF0)) << np.uint16(4)), jnp.uint8)
  out = _reshape(pairs, packed.shape[:-1] + (2 * packed.shape[-1],), _spec(packed))
  return out if out.shape[-1] == columns else out[..., :columns]


def quantize(x, block_size, kind, rows, u=None):
  """Returns (codes uint8 of x's shape, absmax float32) for blocks of ``rows`` rows (`optax8.layout`).

  With the signed map, a block's absmax has the sign of its element of
  largest magnitude (`optax8.maps.SIGNS_ABSMAX`). With draws ``u`` (float32
  in [0, 1), x's shape) the codes are rounded stochastically
  (`optax8.rounding`), else to nearest. A 4-bit map's codes are packed
  (`pack4`).
  """
  xb = _blocked(x.astype(jnp.float32), block_size, rows, 0)
  a = jnp.abs(xb)
  within = (-1,) if rows == 1 else (-3, -1)
  counted = (a >= _TINY) & (a <= _FMAX)
  if maps.SIGNS_ABSMAX[kind]:   # the sign of the largest |x|; a tie goes to the positive one
    clean = jnp.where(counted, xb, 0)
    top, bottom = jnp.max(clean, axis=within), jnp.min(clean, axis=within)
    absmax = jnp.where(top >= -bottom, top, bottom)
  else:
    absmax = jnp.max(jnp.where(counted, a, 0), axis=within)
  scale = jnp.where(jnp.abs(absmax) > _HUGE, np.float32(0.25), np.float32(1))
  nonzero = absmax != 0
  inv = jnp.where(nonzero, 1 / jnp.where(nonzero, absmax * scale, 1), 0)
  v = jnp.where(a >= _TINY, (jnp.clip(xb, -_FMAX, _FMAX) * _per_element(scale, rows)) * _per_element(inv, rows), 0)
  four = maps.BITS[kind] == 4
  codes = code_of(v, kind)
  if u is not None:
    codes = stochastic_code(v, codes, _blocked(u, block_size, rows, 0), kind)
  floor = maps.POSITIVE_FLOOR[kind]   # the unsigned map's code 0 is for zero alone
  if floor:
    codes = jnp.where(xb >= _TINY, jnp.maximum(codes, np.uint8(floor)), codes)
  codes = _unblocked(codes, x.shape, rows)
  return (pack4(codes) if four else codes), absmax


def dequantize(codes, absmax, block_size, kind, dtype, rows, columns: int | None = None):
  """Returns map[codes] * absmax of each element's block, as dtype (4-bit codes: of ``columns`` columns)."""
  if maps.BITS[kind] == 4:
    codes = unpack4(codes, columns)
  cb = _blocked(codes, block_size, rows, 0)
  out = _lookup(maps.dynamic_map(kind), cb.astype(jnp.int32)) * _per_element(absmax, rows)
  out = jnp.where(jnp.abs(out) >= _TINY, out, 0)
  return _unblocked(out, codes.shape, rows).astype(dtype)
