"""bfloat16 and float16 parameters without float32 master weights: stochastic rounding of the new parameters.

A bfloat16 parameter has 8 significant bits. Rounded to nearest, ``p + u``
is ``p`` again wherever ``|u|`` is under half the spacing of bfloat16 values
around ``p`` (2**-9 of ``|p|`` or less): late in training, with a small
learning rate, most updates are lost, where float32 params (or float32
master weights, 4 more bytes per parameter) would keep them.
[`param_rounding`][optax8.low_precision.param_rounding] rounds the new
parameter stochastically instead, up or down with the probabilities that
make it ``p + u`` on average. bfloat16 is float32's upper half, so with
16 random bits ``r``::

    x  = float32(p) + float32(u)
    p' = upper16(bits(x) + r)

rounds ``|x|`` to the bfloat16 value above it with probability (the lower
half of ``bits(x)``) / 2**16 = ``(|x| - lo) / (hi - lo)`` exactly, and to
the one below otherwise: ``E[p'] = x``. float16 leaves take the rule of
the 8-bit states (`optax8.rounding`): ``p'`` is ``hi`` where ``u * (hi -
lo) < x - lo``. The random bits are `optax8.rounding`'s counter-based hash
of the transformation's step count, the leaf's key path and the element's
index in its whole leaf (under the state number `PARAMS`): no PRNG key in
the state, the same new parameters on every backend and mesh. Leaves of
other dtypes (float32, complex) get ``p + u`` as `optax.apply_updates`
makes it.

With the optimizers' option ``param_rounding='stochastic'`` (or this
transformation last in an `optax8.chain`), AdamW on bfloat16 params keeps
2 + 2.03 bytes per parameter (params and 8-bit state).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax8.apply import FusedGradientTransformation, chain, fused_from_run
from optax8.options import as_array, check_rounding, is_single, key_paths, leaf_roundings, path_str, unbox
from optax8.rounding import NEAREST, SEED_BITS, STOCHASTIC, element_index, index_vectors, leaf_seed, mix, state_key
from optax8.sharding import zero_count

PARAMS = 255   # the state number of parameters in the draws' key (`optax8.rounding.state_key`)
NARROW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))   # the dtypes rounded stochastically


class ParamRoundingState(NamedTuple):
  """The step count, for the draws."""

  count: jax.Array


class ParamRounding(NamedTuple):
  """What `param_rounding` asks of the fused apply before it in a chain (`optax8.apply.chain`).

  ``leaves``: per leaf of the updates, whether its new parameter is rounded
  stochastically (a bfloat16 or float16 leaf whose rounding is
  'stochastic'), as `new_param` rounds it with ``step``.
  """

  leaves: tuple
  step: jax.Array


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def stochastic_round(x, dtype, bits):
  """``x`` (float32) rounded to ``dtype`` (bfloat16 or float16) with uint32 random ``bits``: ``E[result] = x``.

  bfloat16 is float32's upper half: ``upper16(bits(x) + (bits >> 16))``
  rounds ``|x|`` up with probability (the lower half of ``bits(x)``) /
  2**16. float16 takes the neighbour rule with the draw ``(bits >> 8) *
  2**-24``. Where rounding to nearest gives a finite value, so does this
  (and NaN stays NaN). Its derivative is that of ``E[result] = x``: the
  tangent cast to ``dtype``.
  """
  near = x.astype(dtype)
  if jnp.dtype(dtype) == jnp.bfloat16:
    upper = (lax.bitcast_convert_type(x, jnp.uint32) + lax.shift_right_logical(bits, np.uint32(16))) & np.uint32(
        0xFFFF0000)
    out = lax.bitcast_convert_type(upper, jnp.float32).astype(dtype)   # exact: the lower half is zero
  else:
    draws = lax.shift_right_logical(bits, np.uint32(8)).astype(jnp.float32) * np.float32(2.0**-24)
    n = near.astype(jnp.float32)
    other = jnp.nextafter(near, jnp.where(x > n, jnp.inf, -jnp.inf).astype(dtype))
    up = draws * jnp.abs(other.astype(jnp.float32) - n) < jnp.abs(x - n)
    out = jnp.where(up, other, near)
  return jnp.where(jnp.isfinite(out) | jnp.isinf(near), out, near)


@stochastic_round.defjvp
def _stochastic_round_jvp(dtype, primals, tangents):
  x, bits = primals
  return stochastic_round(x, dtype, bits), tangents[0].astype(dtype)


def new_param(p, u, step, path: str):
  """``p + u`` rounded stochastically to ``p``'s (narrow) dtype with the draws of leaf ``path`` at ``step``."""
  key = state_key(step, leaf_seed(path), PARAMS)
  bits = mix(element_index(index_vectors(p.shape)) ^ key)
  return stochastic_round(p.astype(jnp.float32) + u.astype(jnp.float32), p.dtype, bits)


def param_rounding(rounding: Any = STOCHASTIC, *, name: str = "param_rounding", option: str = "rounding"
                   ) -> FusedGradientTransformation:
  """Rounds the new parameters to their dtype stochastically: the last transformation of a chain.

  Its ``update`` turns the update ``u`` of each bfloat16 or float16 leaf into
  ``p' - p``, where ``p'`` is ``p + u`` rounded stochastically (see the
  module), so that ``optax.apply_updates`` makes ``p'``; its fused apply
  (`optax8.apply_gradients`, `optax8.nnx.Optimizer`) returns ``p'``. Other
  leaves pass through. ``rounding`` is ``'stochastic'`` or ``'nearest'``
  (``p + u`` as optax rounds it), per leaf: one value, a pytree prefix of
  the params or a callable of them. The optimizers' option
  ``param_rounding`` appends it::

      tx = optax8.adamw8bit(1e-3, param_rounding="stochastic")
      # is
      tx = optax8.chain(optax8.adamw8bit(1e-3), optax8.param_rounding("stochastic"))

  After an optax8 optimizer in `optax8.chain` (as the option makes it),
  the optimizer's kernels round the new bfloat16 parameters of the fused
  apply themselves, ``p + u`` formed in float32 as in every fused apply.
  ``name`` and ``option`` name the transformation and the option in errors.
  """
  if is_single(rounding) and rounding is not None:
    check_rounding(rounding, f"{name}: {option}")

  def init_fn(params):
    params = unbox(params)
    leaf_roundings(rounding, params, name, option)
    return ParamRoundingState(zero_count(jax.tree.leaves(params)))

  def request(updates, state, params):
    """The `ParamRounding` of ``updates`` and the new state (checks ``params`` against ``updates``)."""
    if params is None:
      raise ValueError(f"{name}: rounding the new parameters needs them: call update(updates, state, params)")
    updates = jax.tree.map(as_array, updates)
    treedef = jax.tree.structure(updates)
    try:
      ps = treedef.flatten_up_to(jax.tree.map(as_array, params))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{name}: params do not have the structure of the updates: {e}") from None
    paths = [path_str(path) for path in key_paths(updates)]
    for path, u, p in zip(paths, treedef.flatten_up_to(updates), ps):
      if tuple(p.shape) != tuple(np.shape(u)):
        raise ValueError(f"{name}: leaf {path}: params shape {tuple(p.shape)} differs from the update's "
                         f"{tuple(np.shape(u))}")
    rounded = tuple(r == STOCHASTIC and jnp.dtype(p.dtype) in NARROW
                    for p, r in zip(ps, leaf_roundings(rounding, params, name, option)))
    step = jnp.bitwise_and(state.count, (1 << SEED_BITS) - 1)
    return ParamRounding(rounded, step), ParamRoundingState(optax.safe_increment(state.count))

  def run(updates, state, params, apply: bool):
    updates = jax.tree.map(as_array, updates)
    req, new_state = request(updates, state, params)
    treedef = jax.tree.structure(updates)
    out = []
    for path, u, p, r in zip(key_paths(updates), treedef.flatten_up_to(updates),
                             treedef.flatten_up_to(jax.tree.map(as_array, params)), req.leaves):
      if not r:
        out.append(jnp.asarray(p + u).astype(p.dtype) if apply else u)   # optax.apply_updates
        continue
      new = new_param(p, u, req.step, path_str(path))
      # p' - p, and 0 where p' is p (an infinite p stays itself, as in the fused apply, not inf - inf)
      diff = jnp.where(new == p, 0, new.astype(jnp.float32) - p.astype(jnp.float32))
      out.append(new if apply else diff.astype(u.dtype))
    return treedef.unflatten(out), new_state

  return fused_from_run(init_fn, run, param_rounding=request)


def with_param_rounding(name: str, value, tx):
  """``chain(tx, param_rounding(value))``, or ``tx`` where ``value`` is None or 'nearest' for every leaf."""
  if value is None or (is_single(value) and check_rounding(value, f"{name}: param_rounding") == NEAREST):
    return tx
  return chain(tx, param_rounding(value, name=name, option="param_rounding"))
