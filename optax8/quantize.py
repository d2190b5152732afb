"""Block-wise 8-bit (and 4-bit) quantization of arrays.

For each block of ``block_size`` elements (a tile of the last two axes of a
matrix, 16 x 16 at 256; a run along a vector: `optax8.layout`)::

    absmax = max |x|                      (finite, normal x only)
    code   = argmin_j |map[j] - x / absmax|
    x'     = map[code] * absmax

with the signed dynamic map (first moments) or the unsigned one (second
moments), see `optax8.maps`. With the signed map, which has +1 but no -1,
absmax takes the sign of the block's element of largest magnitude (the
positive one of a tie), so that element comes back exactly. The round trip
error of an element is at most half the gap between the two map values
around ``x / absmax``, times ``|absmax|``.

Special values: NaN and float32 subnormals quantize to the code of 0 and do
not count toward ``absmax``; ``+-inf`` does not count toward ``absmax`` and
saturates to the block's largest and lowest values (``+-|absmax|`` and
``-+0.99296875 * |absmax|`` for the signed map). An all-zero block has ``absmax = 0`` and
dequantizes to zeros. The unsigned map sends negative values to 0.

The 4-bit maps (``'signed4'``, ``'unsigned4'``: 16 values) follow the same
rules; their codes are packed two a byte along the last axis
(`optax8.layout`), and they run in JAX on every platform.

Example::

    q = optax8.quantize(x, block_size=256)          # QuantizedArray
    x2 = optax8.dequantize(q, dtype=jnp.bfloat16)
    q4 = optax8.quantize(x, block_size=128, kind="signed4")   # 4-bit codes
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from optax8 import dispatch, maps
from optax8.kernels import jax_backend
from optax8.layout import DEFAULT_BLOCK_SIZE, absmax_shape, check_block_size, check_value_dtype, packed_shape, tile_rows


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """An array in block-wise 8-bit (or 4-bit) form: a pytree of ``codes`` and ``absmax``.

  ``block_size`` and ``kind`` are static pytree metadata, so two states of
  different block size or map have different tree structures.
  """

  codes: jax.Array   # uint8, the array's shape (4-bit: `optax8.layout.packed_shape`)
  absmax: jax.Array  # float32, one value per block (`optax8.layout.absmax_shape`), negative for some signed blocks
  block_size: int = DEFAULT_BLOCK_SIZE
  kind: str = maps.SIGNED
  columns: int | None = None   # 4-bit: the length of the array's last axis (its codes hold two a byte)

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of the array."""
    if self.columns is None:
      return tuple(self.codes.shape)
    return tuple(self.codes.shape[:-1]) + (self.columns,)

  @property
  def bits(self) -> int:
    return maps.BITS[self.kind]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.codes.shape)) * 1 + int(np.prod(self.absmax.shape)) * 4


jax.tree_util.register_dataclass(QuantizedArray, data_fields=["codes", "absmax"],
                                 meta_fields=["block_size", "kind", "columns"])


def packing_problem(q: QuantizedArray) -> str | None:
  """What is wrong with a 4-bit ``q``'s codes, which must hold its ``columns`` two a byte; None if nothing is
  (and for 8-bit codes)."""
  codes = tuple(q.codes.shape)
  if q.bits != 4 or (q.columns is not None and codes and codes == packed_shape(q.shape)):
    return None
  return f"4-bit codes of shape {codes} do not hold {q.columns} columns two a byte"


def quantize(x, block_size: int = DEFAULT_BLOCK_SIZE, kind: str = maps.SIGNED) -> QuantizedArray:
  """Quantizes ``x`` (float32, bfloat16 or float16, any shape) block-wise.

  Args:
    x: the values.
    block_size: elements per block, a power of two (tiles of a matrix: `optax8.layout`).
    kind: ``'signed'`` (dynamic map) or ``'unsigned'`` (for non-negative x);
      ``'signed4'`` or ``'unsigned4'`` for 4-bit codes, two a byte (x of rank >= 1).
  """
  block_size = check_block_size(block_size)
  x = jnp.asarray(x)
  check_value_dtype(x.dtype, "quantize: x")
  if maps.BITS[maps.check_kind(kind)] == 4:
    if x.ndim == 0:
      raise ValueError(f"quantize: 4-bit codes ({kind!r}) pack the last axis; x must have rank >= 1, got a scalar")
    codes, absmax = jax_backend.quantize(x, block_size, kind, tile_rows(x.shape, block_size))
    return QuantizedArray(codes, absmax, block_size, kind, x.shape[-1])
  map_id = maps.map_id(kind)
  if x.size == 0:
    return QuantizedArray(jnp.zeros(x.shape, jnp.uint8), jnp.zeros(absmax_shape(x.shape, block_size), jnp.float32),
                          block_size, kind)
  codes, absmax = dispatch.quantize(x.reshape(x.shape or (1,)), block_size, kind, map_id)
  return QuantizedArray(codes.reshape(x.shape), absmax, block_size, kind)


def dequantize(q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
  """Returns ``map[codes] * absmax`` as ``dtype`` (float32, bfloat16 or float16)."""
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"dequantize: expected a QuantizedArray, got {type(q).__name__}")
  dtype = check_value_dtype(dtype, "dequantize: dtype")
  block_size = check_block_size(q.block_size)
  four = maps.BITS[maps.check_kind(q.kind)] == 4
  codes, absmax = jnp.asarray(q.codes), jnp.asarray(q.absmax)
  if codes.dtype != jnp.uint8:
    raise TypeError(f"dequantize: codes must be uint8, got {codes.dtype}")
  if absmax.dtype != jnp.float32:
    raise TypeError(f"dequantize: absmax must be float32, got {absmax.dtype}")
  if problem := packing_problem(q):
    raise ValueError(f"dequantize: {problem}")
  shape = q.shape
  expected = absmax_shape(shape, block_size)
  if tuple(absmax.shape) != expected:
    raise ValueError(f"dequantize: absmax shape {tuple(absmax.shape)} does not fit codes shape "
                     f"{tuple(codes.shape)} with block_size {block_size} (expected {expected}); "
                     "was the state made with another block size?")
  if four:
    return jax_backend.dequantize(codes, absmax, block_size, q.kind, dtype, tile_rows(shape, block_size), shape[-1])
  if codes.size == 0:
    return jnp.zeros(codes.shape, dtype)
  out = dispatch.dequantize(codes.reshape(codes.shape or (1,)), absmax, block_size, q.kind, maps.map_id(q.kind),
                            dtype)
  return out.reshape(codes.shape)
