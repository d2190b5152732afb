"""State layout: blocks run along the last axis.

An array of shape ``(..., n)`` is cut into ``ceil(n / block_size)`` blocks
per row (the last one may be short). Its codes have the array's shape; its
absmax has shape ``(..., ceil(n / block_size))``. A scalar is one block of
one element (absmax shape ``(1,)``). A block never straddles a shard when
leading axes are split, or the last axis in multiples of ``block_size``.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_SIZE = 256
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


def absmax_shape(shape: Sequence[int], block_size: int) -> tuple[int, ...]:
  """Shape of the per-block absmax of an array of ``shape``."""
  shape = tuple(shape)
  if not shape:
    return (1,)
  return shape[:-1] + (num_blocks(shape[-1], check_block_size(block_size)),)


def check_value_dtype(dtype, what: str = "values") -> jnp.dtype:
  d = jnp.dtype(dtype)
  if d not in VALUE_DTYPES:
    raise TypeError(f"{what} must be float32, bfloat16 or float16, got {d}")
  return d
