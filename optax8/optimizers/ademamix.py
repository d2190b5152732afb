"""AdEMAMix with three 8-bit states."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from optax8 import maps
from optax8.complex_leaves import REAL
from optax8.fused import Options, Rule, check_state_dtype, fused, schedule_value
from optax8.kernels.algorithms import Algorithm, Hyper, register
from optax8.optimizers import register as register_optimizer
from optax8.options import check_hyperparameters

__all__ = ["ScaleByAdemamix8bitState", "ademamix8bit", "scale_by_ademamix8bit"]


def _direction(h, g, s, ops=REAL):
  m1 = h[Hyper.ONE_MINUS_B1] * g + h[Hyper.B1] * s[0]
  nu = h[Hyper.ONE_MINUS_B2] * ops.square(g) + h[Hyper.B2] * s[2]
  s[1] = h[Hyper.ONE_MINUS_B3] * g + h[Hyper.B3] * s[1]
  num = m1 * h[Hyper.INV_BIAS1] + h[Hyper.ALPHA] * s[1]
  s[0], s[2] = m1, nu
  return num / (jnp.sqrt(nu * h[Hyper.INV_BIAS2] + h[Hyper.EPS_ROOT]) + h[Hyper.EPS])


ADEMAMIX = register(Algorithm(5, "ademamix", (maps.SIGNED, maps.SIGNED, maps.UNSIGNED), _direction, """
    F& m1 = s[0];
    F& m2 = s[1];
    F& nu = s[2];
    m1 = h.v[kOneMinusB1] * g + h.v[kB1] * m1;
    nu = h.v[kOneMinusB2] * (g * g) + h.v[kB2] * nu;
    m2 = h.v[kOneMinusB3] * g + h.v[kB3] * m2;
    const F num = m1 * h.v[kInvBias1] + h.v[kAlpha] * m2;
    return num / (vsqrt(nu * h.v[kInvBias2] + h.v[kEpsRoot]) + h.v[kEps]);
"""))


class ScaleByAdemamix8bitState(NamedTuple):
  count: jax.Array
  m1: Any  # fast EMA (signed)
  m2: Any  # slow EMA (signed)
  nu: Any  # second moment (unsigned)


def _hyper(b1, b2, b3, alpha, eps, eps_root):
  """AdEMAMix's slots; ``b3`` and ``alpha`` may be schedules of the step count."""
  def hyper(count, count_inc):
    return dict(b1=b1, b2=b2, b3=schedule_value(b3, count), alpha=schedule_value(alpha, count), eps=eps,
                eps_root=eps_root, inv_bias1=1 / (1 - b1**count_inc), inv_bias2=1 / (1 - b2**count_inc))
  return hyper


def scale_by_ademamix8bit(b1=0.9, b2=0.999, b3: optax.ScalarOrSchedule = 0.9999, alpha: optax.ScalarOrSchedule = 6.0,
                          eps=1e-8, eps_root=0.0, mu_dtype=None, *, bits=None, block_size=None, min_8bit_size=None,
                          max_unorm=None, rounding=None):
  r"""AdEMAMix's direction with three 8-bit states (``optax.contrib.scale_by_ademamix``).

  .. math::
    m_1 \leftarrow b_1 m_1 + (1 - b_1) g, \quad m_2 \leftarrow b_3 m_2 + (1 - b_3) g, \quad
    \nu \leftarrow b_2 \nu + (1 - b_2) g^2, \quad
    u = \frac{m_1 / (1 - b_1^t) + \alpha m_2}{\sqrt{\nu / (1 - b_2^t) + \epsilon_{root}} + \epsilon}

  ``b3`` and ``alpha`` may be schedules of the step count.
  """
  check_hyperparameters("scale_by_ademamix8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("scale_by_ademamix8bit",
               Rule(ADEMAMIX, ScaleByAdemamix8bitState, _hyper(b1, b2, b3, alpha, eps, eps_root)),
               Options(bits, block_size, min_8bit_size, max_unorm, rounding=rounding))


def ademamix8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, b3: optax.ScalarOrSchedule = 0.9999,
                 alpha: optax.ScalarOrSchedule = 5.0, eps=1e-8, eps_root=0.0, mu_dtype=None, weight_decay=0.0,
                 mask=None, *, bits=None, block_size=None, min_8bit_size=None, max_unorm=None, rounding=None,
                 percentile_clipping=None, param_rounding=None):
  r"""AdEMAMix with three 8-bit states (``optax.contrib.ademamix``).

  .. math:: u = -\text{lr} \left(\frac{\hat m_1 + \alpha m_2}{\sqrt{\hat \nu + \epsilon_{root}} + \epsilon}
     + \text{wd}\, p\right)

  ``b3`` and ``alpha`` may be schedules (bnb's ``t_beta3``/``t_alpha``
  warmups are such schedules).
  """
  check_hyperparameters("ademamix8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("ademamix8bit", Rule(ADEMAMIX, ScaleByAdemamix8bitState, _hyper(b1, b2, b3, alpha, eps, eps_root),
                                    learning_rate=learning_rate, weight_decay=weight_decay, decay_mask=mask),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding))


register_optimizer("ademamix8bit", ademamix8bit, contrib.ademamix, ("m1", "m2", "nu"))
