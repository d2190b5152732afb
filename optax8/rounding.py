"""Stochastic rounding of 8-bit states: unbiased, reproducible, alike on every backend and mesh.

With ``rounding='stochastic'`` (an option of every optimizer, per leaf:
`optax8.options`) a requantized state element with normalized value
``v = x / absmax`` (`optax8.quantize`) takes the map value just below or
just above ``v``, the upper one with probability ``(v - lo) / (hi - lo)``,
so that the dequantized state is ``x`` on average::

    lo   = the largest map value <= v, hi = the next one
    code = index(lo) + (u * (hi - lo) < v - lo)        (0 below the map, 255 above it)

The unsigned map's floor (`optax8.maps.POSITIVE_FLOOR`) still applies. The
draw ``u`` in ``[0, 1)`` (24 bits) is a counter-based hash of the step, the
leaf, the state and the element, with no PRNG key in the optimizer state::

    key = mix(mix(step) ^ seed) ^ (0x9E3779B9 * (state + 1))
    u   = (mix(index ^ key) >> 8) * 2**-24

all in uint32 arithmetic, where ``mix`` is the "lowbias32" integer
finalizer, ``step`` the optimizer's count modulo 2**24, ``seed`` 24 bits of
the CRC-32 of the leaf's key path, ``state`` the state's position in the
algorithm (Adam: 0 for mu, 1 for nu) and ``index`` the element's row-major
position in its whole leaf (modulo 2**32). Every backend computes the same
``u`` for an element wherever its shard lies, so a run is reproducible and
its states do not depend on the mesh.
"""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
from jax import lax

NEAREST = "nearest"
STOCHASTIC = "stochastic"
ROUNDINGS = (NEAREST, STOCHASTIC)
SEED_BITS = 24   # seeds and steps travel in float32 hyperparameter slots, exact below 2**24

_GOLDEN = np.uint32(0x9E3779B9)


def leaf_seed(path: str) -> int:
  """The seed of a leaf: 24 bits of the CRC-32 of its key path (``jax.tree_util.keystr``)."""
  return zlib.crc32(path.encode()) & ((1 << SEED_BITS) - 1)


def mix(x):
  """The "lowbias32" finalizer of a uint32 array: a bijection whose output bits each depend on every input bit."""
  x = x ^ lax.shift_right_logical(x, np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ lax.shift_right_logical(x, np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ lax.shift_right_logical(x, np.uint32(16))


def state_key(step, seed, state: int):
  """The uint32 key of one state of one leaf at one step (``step`` and ``seed`` below 2**24, float or int)."""
  step, seed = (jnp.asarray(x).astype(jnp.uint32) for x in (step, seed))
  return mix(mix(step) ^ seed) ^ np.uint32((int(_GOLDEN) * (state + 1)) & 0xFFFFFFFF)


def uniform(index, key):
  """Draws in ``[0, 1)`` (float32, multiples of 2**-24) of uint32 element indices under ``key``."""
  bits = mix(index ^ key)
  return lax.shift_right_logical(bits, np.uint32(8)).astype(jnp.float32) * np.float32(2.0**-24)


def index_vectors(shape) -> tuple:
  """Per axis of ``shape``, the uint32 vector ``coordinate * stride`` (row-major strides, modulo 2**32).

  An element's index is the sum of its coordinates' entries; a shard that
  gets these vectors sliced like its elements (`optax8.sharding`) computes
  the indices of the whole leaf.
  """
  strides = [int(np.prod(shape[d + 1:], dtype=np.uint64)) & 0xFFFFFFFF for d in range(len(shape))]
  return tuple(lax.iota(jnp.uint32, n) * np.uint32(s) for n, s in zip(shape, strides))


def element_index(vectors):
  """The uint32 index of every element from its axes' `index_vectors` (an array of their lengths)."""
  rank = len(vectors)
  out = jnp.zeros((), jnp.uint32)
  for d, v in enumerate(vectors):
    out = out + v.reshape((1,) * d + (-1,) + (1,) * (rank - d - 1))
  return out
