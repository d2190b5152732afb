"""State layout: blocks are tiles over the last two axes.

A block of ``block_size`` B elements is a tile of ``tile_rows x tile_cols``
elements of the last two axes, with ``tile_cols = 2**ceil(log2(B) / 2)``
and ``tile_rows = B / tile_cols`` (16 x 16 for B = 256). Along each axis
``d`` a block spans ``block_shape[d]`` elements: 1 on leading axes,
``tile_rows`` and ``tile_cols`` on the last two (the blocks at the end of an
axis may be short). A vector's blocks are runs of B elements, and a scalar
is one block of one element. Codes have the array's shape; absmax has
``ceil(shape[d] / block_shape[d])`` along each axis (``(1,)`` for a scalar).

4-bit codes (`optax8.maps.MAP4_KINDS`) are packed two a byte along the
last axis: element ``2j`` in the low half of byte ``j``, element ``2j + 1``
in the high half (`packed_shape`); blocks and absmax are those of the
unpacked array.

The layout depends on the shape and B only, so a code means the same on
every mesh. A block lies within one shard wherever each axis is unsharded
or split into shards whose length is a multiple of the block's extent on it:
with B = 256, any split of a matrix axis into shards of 16 or more elements
(a multiple of 16), FSDP or tensor parallel, on either axis or both.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_SIZE = 256
DEFAULT_BLOCK_SIZE4 = 128   # of 4-bit states (B128 of Li et al., "Memory Efficient Optimizers with 4-bit States")
MAX_BLOCK_SIZE = 1 << 20
VALUE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_block_size(block_size) -> int:
  """Returns block_size as an int; it must be a power of two in [1, 2**20]."""
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise TypeError(f"block_size must be an int, got {block_size!r}")
  b = int(block_size)
  if b < 1 or b > MAX_BLOCK_SIZE or b & (b - 1):
    raise ValueError(f"block_size must be a power of two between 1 and {MAX_BLOCK_SIZE}, got {b}")
  return b


def num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


def tile(block_size: int) -> tuple[int, int]:
  """``(tile_rows, tile_cols)`` of a block of a matrix: ``tile_cols = 2**ceil(log2(B) / 2)``."""
  b = check_block_size(block_size)
  cols = 1 << ((b.bit_length()) // 2)   # log2(b) = bit_length - 1; ceil(log2 / 2) = bit_length // 2
  return b // cols, cols


def tile_rows(shape: Sequence[int], block_size: int) -> int:
  """Rows of a block of an array of ``shape``: 1 for scalars and vectors, else ``tile(block_size)[0]``."""
  return tile(block_size)[0] if len(shape) >= 2 else 1


def block_shape(shape: Sequence[int], block_size: int) -> tuple[int, ...]:
  """A block's extent along each axis of an array of ``shape`` (``()`` for a scalar)."""
  shape = tuple(shape)
  return extents(len(shape), block_size, tile_rows(shape, block_size))


def extents(ndim: int, block_size: int, rows: int) -> tuple[int, ...]:
  """A block's extent along each of ``ndim`` axes for blocks of ``rows`` rows (1: runs along the last axis).

  The kernels take ``rows`` with the block size: an array with extra leading
  (batch) axes keeps the layout of its examples.
  """
  if ndim == 0:
    return ()
  if rows == 1:
    return (1,) * (ndim - 1) + (block_size,)
  return (1,) * (ndim - 2) + (rows, block_size // rows)


def absmax_shape(shape: Sequence[int], block_size: int, rows: int | None = None) -> tuple[int, ...]:
  """Shape of the per-block absmax of an array of ``shape`` (blocks of ``rows`` rows; default: its own)."""
  shape = tuple(shape)
  if not shape:
    return (1,)
  rows = tile_rows(shape, block_size) if rows is None else rows
  return tuple(num_blocks(n, b) for n, b in zip(shape, extents(len(shape), check_block_size(block_size), rows)))


def packed_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """The shape of the 4-bit codes of an array of ``shape`` (rank >= 1): two codes a byte along the last axis."""
  shape = tuple(shape)
  return shape[:-1] + ((shape[-1] + 1) // 2,)


def check_value_dtype(dtype, what: str = "values") -> jnp.dtype:
  d = jnp.dtype(dtype)
  if d not in VALUE_DTYPES:
    raise TypeError(f"{what} must be float32, bfloat16 or float16, got {d}")
  return d
