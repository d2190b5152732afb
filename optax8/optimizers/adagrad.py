"""Adagrad with an 8-bit sum of squares."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax8 import maps
from optax8.complex_leaves import REAL
from optax8.fused import Options, Rule, fused
from optax8.kernels.algorithms import Algorithm, Hyper, register
from optax8.optimizers import register as register_optimizer
from optax8.options import check_hyperparameters

__all__ = ["ScaleByRss8bitState", "adagrad8bit", "scale_by_rss8bit"]


def _direction(h, g, s, ops=REAL):
  s[0] = ops.square(g) + s[0]
  return jnp.where(s[0] > 0, 1 / jnp.sqrt(s[0] + h[Hyper.EPS_ROOT]), 0) * g


RSS = register(Algorithm(4, "rss", (maps.UNSIGNED,), _direction, """
    F& v = s[0];
    v = g * g + v;
    return vselect(vpositive(v), h.one / vsqrt(v + h.v[kEpsRoot]), zero) * g;
"""))


class ScaleByRss8bitState(NamedTuple):
  count: jax.Array
  sum_of_squares: Any


def _hyper(eps):
  return lambda count, count_inc: dict(eps_root=eps)  # inside the square root, as optax


def scale_by_rss8bit(initial_accumulator_value=0.1, eps=1e-7, *, bits=None, block_size=None, min_8bit_size=None,
                     max_unorm=None, rounding=None):
  r"""Adagrad's scaling with an 8-bit sum of squares (``optax.scale_by_rss``).

  .. math:: s_t = s_{t-1} + g^2, \quad u = g / \sqrt{s_t + \epsilon} \text{ (0 where } s_t = 0)
  """
  check_hyperparameters("scale_by_rss8bit", **locals())
  return fused("scale_by_rss8bit", Rule(RSS, ScaleByRss8bitState, _hyper(eps), initial=(initial_accumulator_value,)),
               Options(bits, block_size, min_8bit_size, max_unorm, rounding=rounding))


def adagrad8bit(learning_rate: optax.ScalarOrSchedule, initial_accumulator_value=0.1, eps=1e-7, *, weight_decay=None,
                bits=None, block_size=None, min_8bit_size=None, max_unorm=None, rounding=None,
                percentile_clipping=None, param_rounding=None):
  r"""Adagrad with an 8-bit sum of squares (``optax.adagrad``).

  .. math:: s_t = s_{t-1} + g^2, \quad u = -\text{lr}\, g / \sqrt{s_t + \epsilon}

  eps sits inside the square root, as in optax (bnb: outside).
  ``weight_decay`` (not in optax.adagrad; bnb's and torch's coupled decay,
  default None: none) adds ``wd * p`` to the gradient first.
  """
  check_hyperparameters("adagrad8bit", **locals())
  return fused("adagrad8bit", Rule(RSS, ScaleByRss8bitState, _hyper(eps), initial=(initial_accumulator_value,),
                                   learning_rate=learning_rate, weight_decay=weight_decay, coupled=True),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding))


register_optimizer("adagrad8bit", adagrad8bit, optax.adagrad, ("sum_of_squares",))
