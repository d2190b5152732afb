"""The fused optimizer step in pure JAX: the reference backend.

It mirrors ``ffi/include/optax8/step_rule.inc``: each row of the table of
algorithms (`optax8.kernels.algorithms`) gives the direction, wrapped in
the same per-element rule, followed by the block-wise requantization of
`optax8.kernels.jax_backend`. The same ``rule`` also runs the float32
state of leaves kept at 32 bits.
"""

from __future__ import annotations

import jax.numpy as jnp

from optax8 import layout
from optax8.complex_leaves import PAIRS, REAL
from optax8.kernels import algorithms, jax_backend
from optax8.kernels.algorithms import Hyper


def rule(algo, h, g, p, states, pairs: bool = False):
  """The per-element step in float32: returns (update, new states).

  ``algo`` is an `optax8.kernels.algorithms.Algorithm` or its id, ``h``
  the hyperparameter vector, ``g`` the float32 gradient, ``p`` the float32
  parameter or None, ``states`` a tuple of float32 arrays. With ``pairs``,
  the arrays are real views of a complex leaf (`optax8.complex_leaves`).
  """
  algorithm = algorithms.get(algo)
  ops = PAIRS if pairs else REAL
  ok = ops.finite(g)
  p = jnp.zeros((), jnp.float32) if p is None else p
  g = jnp.where(ok, g, 0) + h[Hyper.COUPLED_DECAY] * p
  s = list(states)
  d = algorithm.direction(h, g, s, ops) if pairs else algorithm.direction(h, g, s)
  keep = ok & ops.finite(d)   # skip elements whose step overflowed (|g| > 1.8e19 squares to inf)
  for x in s:
    keep = keep & ops.finite(x)
  s = tuple(jnp.where(keep, x, 0) for x in s)
  u = jnp.where(keep, h[Hyper.SCALE] * (d + h[Hyper.WEIGHT_DECAY] * p), 0)
  return u, s


def step(algo, hyper, g, p, states, block_size: int, apply: bool = False, pairs: bool = False,
         rows: int | None = None):
  """Dequantize, apply ``rule``, requantize: returns (update, new states).

  ``g`` and ``p`` have rank >= 1 (``p`` may be None); ``states`` is a tuple
  of ``(codes, absmax)`` pairs in the order of the algorithm's states; the
  update has ``g``'s dtype. With ``apply``, the first result is the new
  parameter ``p + update`` (computed in float32) in ``p``'s dtype. With
  ``pairs``, ``g``, ``p`` and the states are real views of a complex leaf.
  Blocks have ``rows`` rows (default: ``optax8.layout.tile_rows`` of g's shape).
  """
  rows = layout.tile_rows(g.shape, block_size) if rows is None else rows
  kinds = algorithms.get(algo).states
  values = tuple(jax_backend.dequantize(c, a, block_size, k, jnp.float32, rows) for (c, a), k in zip(states, kinds))
  p32 = None if p is None else p.astype(jnp.float32)
  u, new = rule(algo, hyper, g.astype(jnp.float32), p32, values, pairs)
  new_states = tuple(jax_backend.quantize(x, block_size, k, rows) for x, k in zip(new, kinds))
  if apply:
    return (p32 + u).astype(p.dtype), new_states
  return u.astype(g.dtype), new_states
