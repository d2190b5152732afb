"""The fused optimizer step in pure JAX: the reference backend.

It mirrors ``ffi/include/optax8/step.h`` and ``step_rule.inc``: the same
algorithms, hyperparameter slots and per-element rule, followed by the
block-wise requantization of `optax8.kernels.jax_backend`. The same
``rule`` also runs the float32 state of leaves kept at 32 bits.
"""

from __future__ import annotations

import enum

import jax.numpy as jnp

from optax8 import maps
from optax8.kernels import jax_backend


class Algo(enum.IntEnum):
  """The ``algo`` attribute of the kernels (numbers are shared with step.h)."""

  ADAM = 0
  LION = 1
  MOMENTUM = 2
  RMS = 3
  RSS = 4
  ADEMAMIX = 5


# The maps of each algorithm's states, in kernel order.
STATE_KINDS = {
    Algo.ADAM: (maps.SIGNED, maps.UNSIGNED),
    Algo.LION: (maps.SIGNED,),
    Algo.MOMENTUM: (maps.SIGNED,),
    Algo.RMS: (maps.UNSIGNED,),
    Algo.RSS: (maps.UNSIGNED,),
    Algo.ADEMAMIX: (maps.SIGNED, maps.SIGNED, maps.UNSIGNED),
}


class Hyper(enum.IntEnum):
  """Slots of the float32 hyperparameter vector (shared with step.h)."""

  SCALE = 0
  B1 = 1
  ONE_MINUS_B1 = 2
  B2 = 3
  ONE_MINUS_B2 = 4
  B3 = 5
  ONE_MINUS_B3 = 6
  EPS = 7
  EPS_ROOT = 8
  WEIGHT_DECAY = 9
  COUPLED_DECAY = 10
  INV_BIAS1 = 11
  INV_BIAS2 = 12
  INV_BIAS1_NEXT = 13
  ALPHA = 14
  PRE_SCALE = 15
  NESTEROV = 16


NUM_HYPER = len(Hyper)
_DEFAULTS = {Hyper.SCALE: 1.0, Hyper.INV_BIAS1: 1.0, Hyper.INV_BIAS2: 1.0, Hyper.INV_BIAS1_NEXT: 1.0,
             Hyper.PRE_SCALE: 1.0}


def hyper_vector(**values):
  """The float32 vector of hyperparameters; names are lower-case slot names.

  Values may be Python numbers or (traced) arrays. ``one_minus_b1`` and the
  like default to ``1 - b1`` computed before the cast to float32, as optax
  computes them.
  """
  for b in ("b1", "b2", "b3"):
    if b in values and f"one_minus_{b}" not in values:
      values[f"one_minus_{b}"] = 1 - values[b]
  unknown = set(values) - {h.name.lower() for h in Hyper}
  if unknown:
    raise TypeError(f"hyper_vector: unknown hyperparameters {sorted(unknown)}")
  slots = [values.get(h.name.lower(), _DEFAULTS.get(h, 0.0)) for h in Hyper]
  return jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in slots])


def rule(algo: Algo, h, g, p, states):
  """The per-element step in float32: returns (update, new states).

  ``h`` is the hyperparameter vector, ``g`` the float32 gradient, ``p`` the
  float32 parameter or None, ``states`` a tuple of float32 arrays.
  """
  H = lambda slot: h[slot]
  ok = jnp.isfinite(g)
  p = jnp.zeros((), jnp.float32) if p is None else p
  g = jnp.where(ok, g, 0) + H(Hyper.COUPLED_DECAY) * p
  s = list(states)
  if algo in (Algo.ADAM, Algo.ADEMAMIX):
    iv = 1 if algo == Algo.ADAM else 2
    m = H(Hyper.ONE_MINUS_B1) * g + H(Hyper.B1) * s[0]
    v = H(Hyper.ONE_MINUS_B2) * (g * g) + H(Hyper.B2) * s[iv]
    if algo == Algo.ADAM:
      plain = m * H(Hyper.INV_BIAS1)
      nesterov = H(Hyper.B1) * (m * H(Hyper.INV_BIAS1_NEXT)) + H(Hyper.ONE_MINUS_B1) * (g * H(Hyper.INV_BIAS1))
      num = jnp.where(H(Hyper.NESTEROV) > 0, nesterov, plain)
    else:
      s[1] = H(Hyper.ONE_MINUS_B3) * g + H(Hyper.B3) * s[1]
      num = m * H(Hyper.INV_BIAS1) + H(Hyper.ALPHA) * s[1]
    s[0], s[iv] = m, v
    d = num / (jnp.sqrt(v * H(Hyper.INV_BIAS2) + H(Hyper.EPS_ROOT)) + H(Hyper.EPS))
  elif algo == Algo.LION:
    d = jnp.sign(H(Hyper.ONE_MINUS_B1) * g + H(Hyper.B1) * s[0])
    s[0] = H(Hyper.ONE_MINUS_B2) * g + H(Hyper.B2) * s[0]
  elif algo == Algo.MOMENTUM:
    x = H(Hyper.PRE_SCALE) * g
    s[0] = x + H(Hyper.B1) * s[0]
    d = jnp.where(H(Hyper.NESTEROV) > 0, x + H(Hyper.B1) * s[0], s[0])
  elif algo == Algo.RMS:
    s[0] = H(Hyper.ONE_MINUS_B2) * (g * g) + H(Hyper.B2) * s[0]
    d = (1 / (jnp.sqrt(s[0] * H(Hyper.INV_BIAS2) + H(Hyper.EPS_ROOT)) + H(Hyper.EPS))) * g
  elif algo == Algo.RSS:
    s[0] = g * g + s[0]
    d = jnp.where(s[0] > 0, 1 / jnp.sqrt(s[0] + H(Hyper.EPS_ROOT)), 0) * g
  else:
    raise ValueError(f"unknown algo {algo!r}")
  keep = ok & jnp.isfinite(d)   # skip elements whose step overflowed (|g| > 1.8e19 squares to inf)
  for x in s:
    keep = keep & jnp.isfinite(x)
  s = tuple(jnp.where(keep, x, 0) for x in s)
  u = jnp.where(keep, H(Hyper.SCALE) * (d + H(Hyper.WEIGHT_DECAY) * p), 0)
  return u, s


def step(algo, hyper, g, p, states, block_size: int, apply: bool = False):
  """Dequantize, apply ``rule``, requantize: returns (update, new states).

  ``g`` and ``p`` have rank >= 1 (``p`` may be None); ``states`` is a tuple
  of ``(codes, absmax)`` pairs in the order of ``STATE_KINDS[algo]``; the
  update has ``g``'s dtype. With ``apply``, the first result is the new
  parameter ``p + update`` (computed in float32) in ``p``'s dtype.
  """
  algo = Algo(algo)
  kinds = STATE_KINDS[algo]
  values = tuple(jax_backend.dequantize(c, a, block_size, k, jnp.float32) for (c, a), k in zip(states, kinds))
  p32 = None if p is None else p.astype(jnp.float32)
  u, new = rule(algo, hyper, g.astype(jnp.float32), p32, values)
  new_states = tuple(jax_backend.quantize(x, block_size, k) for x, k in zip(new, kinds))
  if apply:
    return (p32 + u).astype(p.dtype), new_states
  return u.astype(g.dtype), new_states
