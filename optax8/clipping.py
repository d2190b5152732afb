"""Percentile clipping (bitsandbytes): clip a gradient to a low percentile of its recent norms.

Per leaf (or for the global norm of all leaves), the transformation keeps
the squared gradient norms of the last ``history`` steps, ``h``. At the
first step every slot holds the first squared norm; at step ``t`` (counting
from 1) slot ``t mod history`` is overwritten. With ``n_t`` the current
norm::

    c = sqrt(sort(h)[k]),   k = min(floor(percentile * history / 100), history - 1)
    g <- g * c / n_t   if n_t > c,   else g unchanged

(bitsandbytes' ``sort(h)[percentile]`` for its fixed history of 100).
Since the current norm is in ``h``, percentile 100 never clips: it means
off, and such leaves keep no history.

Non-finite gradient elements count as zero in the norm, as the optimizers
give them a zero update; they pass through unscaled, for the optimizer (or
``optax.apply_if_finite``) to handle. A squared norm that overflows float32
is recorded as float32's largest value (the gradient is still scaled by its
true norm), so nothing non-finite ever enters the history.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax8.complex_leaves import is_complex, real_view
from optax8.options import (PERCENTILE_OFF, RANGES, as_array, check_number, is_single, is_static, key_paths,
                            leaf_values, path_str, static_int, unbox)
from optax8.sharding import replicated_full, zero_count

FLOAT32_MAX = float(np.finfo(np.float32).max)


class PercentileClippingState(NamedTuple):
  count: jax.Array  # int32 scalar: steps taken
  history: Any      # float32 (history,) squared norms per leaf (MaskedNode where off), or one for the global norm


def percentile_clipping(percentile=5, history=100, per_leaf=True) -> optax.GradientTransformationExtraArgs:
  """Scales each leaf's gradient down to the ``percentile``-th percentile of its last ``history`` norms.

  Args:
    percentile: in [0, 100]; 100 turns clipping off. With ``per_leaf`` it may
      be given per leaf: a pytree prefix of the params or a callable of them.
      Under `optax.inject_hyperparams` it may change between steps.
    history: how many recent squared norms to keep (a static int).
    per_leaf: each leaf by its own norm (bitsandbytes' rule), or with
      ``False`` all leaves by their global norm.

  Example::

    tx = optax.chain(optax8.percentile_clipping(5), optax8.adamw8bit(1e-3))
  """
  return _percentile_clipping(percentile, history, per_leaf, "percentile_clipping", "percentile")


def _percentile_clipping(percentile, history, per_leaf: bool, name: str, option: str):
  """percentile_clipping whose errors name the transformation ``name`` and its argument ``option``."""
  if not per_leaf and not is_single(percentile):
    raise TypeError(f"{name}: with per_leaf=False, {option} is one number for the global norm, got {percentile!r}")
  if is_single(percentile):
    check_number(name, option, percentile, RANGES["percentile"])
  check_number(name, "history", history)

  def percentiles(tree) -> list:
    """Each leaf's percentile (one for the global norm), None where off."""
    values = leaf_values(percentile, tree, name, option) if per_leaf else [percentile]
    explicit = not is_single(percentile)
    out = []
    for path, p in zip(key_paths(tree) if per_leaf else [()], values):
      if p is None:
        p = PERCENTILE_OFF
      check_number(name, f"{option} of leaf {path_str(path)}" if explicit else option, p, RANGES["percentile"])
      if is_static(p) and float(np.asarray(p)) == PERCENTILE_OFF:
        p = None
      out.append(p)
    return out

  def init_fn(params):
    params = jax.tree.map(as_array, params)
    size = static_int(history, f"{name}: history", "history")
    if size < 1:
      raise ValueError(f"{name}: history must be >= 1, got {size}")

    def empty(p):
      return optax.MaskedNode() if p is None else replicated_full(params, (size,), 0, jnp.float32)

    ps = percentiles(params)
    if per_leaf:
      hist = jax.tree.structure(unbox(params)).unflatten([empty(p) for p in ps])  # no nnx Variable boxes
    else:
      hist = empty(ps[0])
    return PercentileClippingState(zero_count(params), hist)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if not isinstance(state, PercentileClippingState):
      raise TypeError(f"{name}: expected a PercentileClippingState, got {type(state).__name__}")
    updates = jax.tree.map(as_array, updates)
    treedef = jax.tree.structure(updates)
    state_def = jax.tree.structure(unbox(updates))
    grads = treedef.flatten_up_to(updates)
    for path, g in zip(key_paths(updates), grads):
      if not jnp.issubdtype(jnp.dtype(g.dtype), jnp.inexact):
        raise TypeError(f"{name}: leaf {path_str(path)}: gradient has dtype {g.dtype}, expected a floating-point "
                        "or complex dtype")
    ps = percentiles(params if params is not None else updates)
    count = state.count
    if per_leaf:
      try:
        hists = state_def.flatten_up_to(state.history)
      except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: the state's history does not have the structure of the updates: {e}") from None
      out, new_hists = [], []
      for g, h, p in zip(grads, hists, ps):
        if (p is None) != isinstance(h, optax.MaskedNode):
          raise ValueError(f"{name}: the state's history was made for other {option} values")
        if p is None:
          out.append(g)
          new_hists.append(h)
          continue
        h, scale = _record(h, *_norms(g), count, p)
        out.append(_scale(g, scale))
        new_hists.append(h)
      return treedef.unflatten(out), PercentileClippingState(optax.safe_increment(count),
                                                             state_def.unflatten(new_hists))
    if ps[0] is None:
      return updates, PercentileClippingState(optax.safe_increment(count), state.history)
    sq, norm = zip(*map(_norms, grads)) if grads else ((), ())
    total = jnp.minimum(sum(sq, jnp.zeros([], jnp.float32)), FLOAT32_MAX)
    norms = jnp.stack(norm) if norm else jnp.zeros((1,), jnp.float32)
    h, scale = _record(state.history, total, jnp.where(total < FLOAT32_MAX, jnp.sqrt(total), _robust_norm(norms)),
                       count, ps[0])
    return (treedef.unflatten([_scale(g, scale) for g in grads]),
            PercentileClippingState(optax.safe_increment(count), h))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _norms(g):
  """The squared norm of the finite elements (at most float32's largest value) and the norm."""
  if g.size == 0:   # an empty leaf: norm 0, never clipped
    return jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32)
  g = (real_view(g) if is_complex(g) else g).astype(jnp.float32)   # a complex leaf's norm is its real view's
  g = jnp.where(jnp.isfinite(g), g, 0)
  sq = jnp.sum(g * g)
  norm = jax.lax.cond(sq < FLOAT32_MAX, lambda: jnp.sqrt(sq), lambda: _robust_norm(g))
  return jnp.minimum(sq, FLOAT32_MAX), norm


def _robust_norm(x):
  """The norm of finite ``x`` without overflow: ``max|x| * ||x / max|x|||``."""
  top = jnp.max(jnp.abs(x))
  return top * jnp.sqrt(jnp.sum(jnp.square(x / jnp.where(top > 0, top, 1))))


def _record(h, sq, norm, count, percentile):
  """The new history and the gradient's scale, ``c / n`` where the norm ``n`` exceeds the clip ``c``."""
  size = h.shape[0]
  h = jnp.where(count == 0, jnp.full_like(h, sq), h.at[optax.safe_increment(count) % size].set(sq))
  if is_static(percentile):
    k = min(math.floor(float(np.asarray(percentile)) * size / 100), size - 1)
  else:
    k = jnp.clip(jnp.floor(jnp.asarray(percentile, jnp.float32) * size / 100), 0, size - 1).astype(jnp.int32)
  clip_sq = jnp.sort(h)[k]
  clip = jnp.sqrt(clip_sq)
  scale = jnp.where(norm > clip, clip / jnp.where(norm > 0, norm, 1), 1.0)
  return h, scale


def _scale(g, scale):
  """``g * scale`` in float32 (complex64 for a complex g), rounded to g's dtype; non-finite elements unchanged."""
  work = jnp.complex64 if is_complex(g) else jnp.float32
  return jnp.where(jnp.isfinite(g), (g.astype(work) * scale).astype(g.dtype), g)
