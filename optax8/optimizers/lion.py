"""Lion with an 8-bit momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from optax8 import maps
from optax8.complex_leaves import REAL
from optax8.fused import Options, Rule, check_state_dtype, fused
from optax8.kernels.algorithms import Algorithm, Hyper, register
from optax8.optimizers import register as register_optimizer
from optax8.options import check_hyperparameters

__all__ = ["ScaleByLion8bitState", "lion8bit", "scale_by_lion8bit"]


def _direction(h, g, s, ops=REAL):
  d = ops.sign(h[Hyper.ONE_MINUS_B1] * g + h[Hyper.B1] * s[0])
  s[0] = h[Hyper.ONE_MINUS_B2] * g + h[Hyper.B2] * s[0]
  return d


LION = register(Algorithm(1, "lion", (maps.SIGNED,), _direction, """
    F& m = s[0];
    const F d = vsign(h.v[kOneMinusB1] * g + h.v[kB1] * m);
    m = h.v[kOneMinusB2] * g + h.v[kB2] * m;
    return d;
"""))


class ScaleByLion8bitState(NamedTuple):
  count: jax.Array
  mu: Any


def _hyper(b1, b2):
  return lambda count, count_inc: dict(b1=b1, b2=b2)


def scale_by_lion8bit(b1=0.9, b2=0.99, mu_dtype=None, *, bits=None, block_size=None, min_8bit_size=None,
                      max_unorm=None, rounding=None):
  r"""Lion's direction with an 8-bit momentum (``optax.scale_by_lion``).

  .. math:: u = \operatorname{sign}((1 - b_1) g + b_1 m_{t-1}), \quad m_t = b_2 m_{t-1} + (1 - b_2) g
  """
  check_hyperparameters("scale_by_lion8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("scale_by_lion8bit", Rule(LION, ScaleByLion8bitState, _hyper(b1, b2)),
               Options(bits, block_size, min_8bit_size, max_unorm, rounding=rounding))


def lion8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.99, mu_dtype=None,
             weight_decay: optax.ScalarOrSchedule = 1e-3, mask=None, *, bits=None, block_size=None,
             min_8bit_size=None, max_unorm=None, rounding=None, percentile_clipping=None, param_rounding=None):
  r"""Lion with an 8-bit momentum (``optax.lion``): ``u = -lr * (sign(...) + wd * p)``."""
  check_hyperparameters("lion8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("lion8bit", Rule(LION, ScaleByLion8bitState, _hyper(b1, b2), learning_rate=learning_rate,
                                weight_decay=weight_decay, decay_mask=mask),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding))


register_optimizer("lion8bit", lion8bit, optax.lion, ("mu",))
