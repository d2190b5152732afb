"""The fused optimizer step in pure JAX: the reference backend.

It mirrors ``ffi/include/optax8/step_rule.inc``: each row of the table of
algorithms (`optax8.kernels.algorithms`) gives the direction, wrapped in
the same per-element rule, followed by the block-wise requantization of
`optax8.kernels.jax_backend`. The same ``rule`` also runs the float32
state of leaves kept at 32 bits.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from optax8 import layout, maps, rounding
from optax8.complex_leaves import PAIRS, REAL
from optax8.kernels import algorithms, jax_backend
from optax8.kernels.algorithms import Hyper
from optax8.low_precision import PARAMS, stochastic_round

CHUNK_ELEMENTS = 1 << 16          # `step_in_chunks` with apply: elements of a leaf stepped at a time
UPDATE_CHUNK_ELEMENTS = 1 << 18   # and without (each the fastest of 2**16, 2**17, 2**18 on a 2-core CPU)


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
         rows: int | None = None, index=None, bits: int = 8, round_states: bool = True, round_params: bool = False):
  """Dequantize, apply ``rule``, requantize: returns (update, new states).

  ``g`` and ``p`` have rank >= 1 (``p`` may be None); ``states`` is a tuple
  of ``(codes, absmax)`` pairs in the order of the algorithm's states; the
  update has ``g``'s dtype. With ``apply``, the first result is the new
  parameter ``p + update`` (computed in float32) in ``p``'s dtype. With
  ``pairs``, ``g``, ``p`` and the states are real views of a complex leaf.
  Blocks have ``rows`` rows (default: ``optax8.layout.tile_rows`` of g's shape).
  With ``index``, g's elements' `optax8.rounding.index_vectors` in their
  whole leaf, the new states are rounded stochastically under the
  hyperparameters' rounding step and seed (unless ``round_states`` is
  False) and, with ``round_params`` (``apply``), the new bfloat16
  parameters under the parameter rounding step and the seed
  (`optax8.low_precision.stochastic_round`). With ``bits`` 4 the states
  are in the algorithm's maps at 4 bits, their codes packed.
  """
  rows = layout.tile_rows(g.shape, block_size) if rows is None else rows
  kinds = algorithms.get(algo).states
  kinds = kinds if bits == 8 else tuple(maps.with_bits(k, bits) for k in kinds)
  values = tuple(jax_backend.dequantize(c, a, block_size, k, jnp.float32, rows, g.shape[-1])
                 for (c, a), k in zip(states, kinds))
  p32 = None if p is None else p.astype(jnp.float32)
  u, new = rule(algo, hyper, g.astype(jnp.float32), p32, values, pairs)
  draws = [None] * len(kinds)
  where = None if index is None else rounding.element_index(index)
  if index is not None and round_states:
    draws = [rounding.uniform(where, rounding.state_key(hyper[Hyper.ROUNDING_STEP], hyper[Hyper.ROUNDING_SEED], i))
             for i in range(len(kinds))]
  new_states = tuple(jax_backend.quantize(x, block_size, k, rows, d) for x, k, d in zip(new, kinds, draws))
  if apply and round_params:
    key = rounding.state_key(hyper[Hyper.PARAM_ROUNDING_STEP], hyper[Hyper.ROUNDING_SEED], PARAMS)
    return stochastic_round(p32 + u, p.dtype, rounding.mix(where ^ key)), new_states
  if apply:
    return (p32 + u).astype(p.dtype), new_states
  return u.astype(g.dtype), new_states


def step_in_chunks(algo, hyper, g, p, states, block_size: int, apply: bool = False, pairs: bool = False,
                   rows: int | None = None, index=None, bits: int = 8, round_states: bool = True,
                   round_params: bool = False):
  """`step`, a slice of whole blocks along the first axis (about ``CHUNK_ELEMENTS``, without ``apply``
  ``UPDATE_CHUNK_ELEMENTS``) at a time.

  The same results, from a loop that writes each slice's output, codes and
  absmax into the results: the step's float32 temporaries are those of one
  slice, not of the leaf. XLA:CPU fuses `step` into loops that keep several
  float32 arrays of the leaf's size (about 20 bytes a parameter) and takes
  fresh memory from the system for them on every call. With ``apply`` the
  new parameter is written over the parameter, which XLA then neither
  copies nor fills when the step owns it (donated). Leaves of fewer
  than two slices, arrays on an explicit mesh, and vectors of 4-bit
  states (whose codes pack the first axis) take `step` directly.
  """
  rows = layout.tile_rows(g.shape, block_size) if rows is None else rows
  extent = layout.extents(g.ndim, block_size, rows)[0]
  inner = math.prod(g.shape[1:])
  target = CHUNK_ELEMENTS if apply else UPDATE_CHUNK_ELEMENTS
  length = max(extent, target // max(inner, 1) // extent * extent)
  chunks = g.shape[0] // length
  if chunks < 2 or jax_backend.on_explicit_mesh(g) or (bits == 4 and g.ndim == 1):
    return step(algo, hyper, g, p, states, block_size, apply, pairs, rows, index, bits, round_states, round_params)
  blocks = length // extent   # absmax rows of a slice

  def run(i, n, out, new_states, pi=None):
    """Slice ``i`` (``n`` rows of elements from ``i * length``) stepped, its results written to the results.

    With ``apply`` the output is the parameter itself, and ``pi``, this
    slice of it, was read by the previous turn after that turn wrote its own
    slice (a slice read from the output in the turn that writes it would make
    XLA copy the whole output on every slice). The other inputs are read from
    the operands, but for the codes, read and written by one fusion.
    """
    start, block_start = i * length, i * blocks
    cut = lambda x, n: lax.dynamic_slice_in_dim(x, start, n)
    cut_absmax = lambda x, n: lax.dynamic_slice_in_dim(x, block_start, n)
    nb = -(-n // extent)
    gi, pi = cut(g, n), pi if apply or p is None else cut(p, n)
    si = tuple((cut(c, n), cut_absmax(a, nb)) for (c, _), (_, a) in zip(new_states, states))
    ii = None if index is None else (cut(index[0], n),) + tuple(index[1:])
    o, new = step(algo, hyper, gi, pi, si, block_size, apply, pairs, rows, ii, bits, round_states, round_params)
    put = lambda x, y, at: lax.dynamic_update_slice_in_dim(x, y, at, 0)
    return put(out, o, start), tuple((put(c, nc, start), put(a, na, block_start))
                                     for (c, a), (nc, na) in zip(new_states, new))

  new_states = tuple((c, jnp.zeros_like(a)) for c, a in states)
  if apply:
    def body(i, carry):
      out, new_states, pi = carry
      out, new_states = run(i, length, out, new_states, pi)
      return out, new_states, lax.dynamic_slice_in_dim(out, (i + 1) * length, length)   # not written yet

    out, new_states, last = lax.fori_loop(0, chunks, body, (p, new_states, p[:length]))
    tail = lambda n: last[length - n:]   # the last slice read holds the leaf's last rows
  else:
    out, new_states = lax.fori_loop(0, chunks, lambda i, carry: run(i, length, *carry),
                                    (jnp.zeros(g.shape, g.dtype), new_states))
    tail = lambda n: None
  if chunks * length < g.shape[0]:
    n = g.shape[0] - chunks * length
    out, new_states = run(chunks, n, out, new_states, tail(n))
  return out, new_states
