"""SGD with an 8-bit momentum buffer, and optax.trace's 8-bit form."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax8 import maps
from optax8.complex_leaves import REAL
from optax8.fused import Options, Rule, check_state_dtype, fused, with_percentile_clipping
from optax8.kernels.algorithms import Algorithm, Hyper, register
from optax8.optimizers import register as register_optimizer
from optax8.options import check_hyperparameters
from optax8.low_precision import with_param_rounding

__all__ = ["Trace8bitState", "sgd8bit", "trace8bit"]


def _direction(h, g, s, ops=REAL):   # linear: the same on complex leaves
  x = h[Hyper.PRE_SCALE] * g
  s[0] = x + h[Hyper.B1] * s[0]
  return jnp.where(h[Hyper.NESTEROV] > 0, x + h[Hyper.B1] * s[0], s[0])


MOMENTUM = register(Algorithm(2, "momentum", (maps.SIGNED,), _direction, """
    F& m = s[0];
    const F x = h.v[kPreScale] * g;
    m = x + h.v[kB1] * m;
    return vselect(vpositive(h.v[kNesterov]), x + h.v[kB1] * m, m);
"""))


class Trace8bitState(NamedTuple):
  count: jax.Array
  trace: Any


def momentum_hyper(decay, nesterov=False):
  return lambda count, count_inc: dict(b1=decay, nesterov=float(bool(nesterov)))


def trace8bit(decay, nesterov=False, accumulator_dtype=None, *, bits=None, block_size=None, min_8bit_size=None,
              max_unorm=None, rounding=None):
  r"""Momentum with an 8-bit trace (``optax.trace``).

  .. math:: m_t = g + \text{decay}\, m_{t-1}, \quad u = m_t \text{ (or } g + \text{decay}\, m_t
     \text{ with Nesterov)}
  """
  check_hyperparameters("trace8bit", **locals())
  check_state_dtype(accumulator_dtype, "accumulator_dtype")
  return fused("trace8bit", Rule(MOMENTUM, Trace8bitState, momentum_hyper(decay, nesterov)),
               Options(bits, block_size, min_8bit_size, max_unorm, rounding=rounding))


def sgd8bit(learning_rate: optax.ScalarOrSchedule, momentum=None, nesterov=False, accumulator_dtype=None, *,
            weight_decay=None, bits=None, block_size=None, min_8bit_size=None, max_unorm=None, rounding=None,
            percentile_clipping=None, param_rounding=None):
  r"""SGD with an 8-bit momentum buffer (``optax.sgd``).

  .. math:: g' = g + \text{wd}\, p, \quad m_t = g' + \mu m_{t-1}, \quad u = -\text{lr}\, m_t

  ``weight_decay`` (not in optax.sgd; bnb's and torch's coupled decay)
  defaults to None (none). Without momentum there is no state and this is
  optax.sgd.
  """
  check_hyperparameters("sgd8bit", **locals())
  check_state_dtype(accumulator_dtype, "accumulator_dtype")
  if momentum is None:
    parts = [] if weight_decay is None else [optax.add_decayed_weights(weight_decay)]
    return with_param_rounding("sgd8bit", param_rounding, with_percentile_clipping(
        "sgd8bit", percentile_clipping, optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))))
  return fused("sgd8bit", Rule(MOMENTUM, Trace8bitState, momentum_hyper(momentum, nesterov),
                               learning_rate=learning_rate, weight_decay=weight_decay, coupled=True),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding))


register_optimizer("sgd8bit", sgd8bit, optax.sgd, ("trace",))
