"""Pure-JAX block-wise quantization: the reference backend.

It follows the rules of ``ffi/include/optax8/quantize.h`` operation by
operation, so the native CPU handler and this path give bit-identical codes
and absmax. Inputs have rank >= 1 (the dispatcher reshapes scalars).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax8 import maps
from optax8.layout import num_blocks

_TINY = np.float32(np.finfo(np.float32).tiny)
_FMAX = np.float32(np.finfo(np.float32).max)
_HUGE = np.float32(2.0**126)  # above it, 1 / absmax would be subnormal


def _blocked(x, block_size, fill):
  """(..., n) -> (..., nb, width), padding the last block with `fill`.

  width is block_size, or n when one block holds the whole row (no padding
  up to a large block size).
  """
  n = x.shape[-1]
  nb = num_blocks(n, block_size)
  width = block_size if nb > 1 else n
  pad = nb * width - n
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=fill)
  return x.reshape(x.shape[:-1] + (nb, width))


def _unblocked(x, n):
  return x.reshape(x.shape[:-2] + (-1,))[..., :n]


def _lookup(table, index):
  """table[index] for a constant table, sharded like ``index`` (also on explicit meshes)."""
  return jnp.asarray(table).at[index].get(mode="promise_in_bounds", out_sharding=jax.typeof(index).sharding)


def table_code(v, kind):
  """Codes of normalized float32 values: bucket table plus one comparison.

  ``lo = table[bucket]``, ``code = lo + (mid[lo] < v)``, with ``mid[lo]``
  read from a second table indexed by the same bucket.
  """
  bucket = lax.shift_right_logical(lax.bitcast_convert_type(v, jnp.uint32), jnp.uint32(16)).astype(jnp.int32)
  lo = _lookup(maps.bucket_table(kind), bucket)
  mid = _lookup(maps.bucket_midpoints(kind), bucket)
  return lo + (mid < v).astype(jnp.uint8)


def quantize(x, block_size, kind):
  """Returns (codes uint8 of x's shape, absmax float32 (..., nb))."""
  n = x.shape[-1]
  xb = _blocked(x.astype(jnp.float32), block_size, 0)
  a = jnp.abs(xb)
  absmax = jnp.max(jnp.where((a >= _TINY) & (a <= _FMAX), a, 0), axis=-1)
  scale = jnp.where(absmax > _HUGE, np.float32(0.25), np.float32(1))
  positive = absmax > 0
  inv = jnp.where(positive, 1 / jnp.where(positive, absmax * scale, 1), 0)
  v = jnp.where(a >= _TINY, (jnp.clip(xb, -_FMAX, _FMAX) * scale[..., None]) * inv[..., None], 0)
  return _unblocked(table_code(v, kind), n), absmax


def dequantize(codes, absmax, block_size, kind, dtype):
  """Returns map[codes] * absmax of each element's block, as dtype."""
  n = codes.shape[-1]
  cb = _blocked(codes, block_size, 0)
  out = _lookup(maps.dynamic_map(kind), cb.astype(jnp.int32)) * absmax[..., None]
  out = jnp.where(jnp.abs(out) >= _TINY, out, 0)
  return _unblocked(out, n).astype(dtype)
