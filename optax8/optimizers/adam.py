"""Adam and AdamW with 8-bit moments."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax8 import maps
from optax8.complex_leaves import REAL
from optax8.fused import Options, Rule, check_state_dtype, fused
from optax8.kernels.algorithms import Algorithm, Hyper, register
from optax8.optimizers import register as register_optimizer
from optax8.options import check_hyperparameters

__all__ = ["ScaleByAdam8bitState", "adam8bit", "adamw8bit", "scale_by_adam8bit"]


def _direction(h, g, s, ops=REAL):
  m = h[Hyper.ONE_MINUS_B1] * g + h[Hyper.B1] * s[0]
  v = h[Hyper.ONE_MINUS_B2] * ops.square(g) + h[Hyper.B2] * s[1]
  plain = m * h[Hyper.INV_BIAS1]
  nesterov = h[Hyper.B1] * (m * h[Hyper.INV_BIAS1_NEXT]) + h[Hyper.ONE_MINUS_B1] * (g * h[Hyper.INV_BIAS1])
  num = jnp.where(h[Hyper.NESTEROV] > 0, nesterov, plain)
  s[0], s[1] = m, v
  return num / (jnp.sqrt(v * h[Hyper.INV_BIAS2] + h[Hyper.EPS_ROOT]) + h[Hyper.EPS])


ADAM = register(Algorithm(0, "adam", (maps.SIGNED, maps.UNSIGNED), _direction, """
    F& m = s[0];
    F& v = s[1];
    m = h.v[kOneMinusB1] * g + h.v[kB1] * m;
    v = h.v[kOneMinusB2] * (g * g) + h.v[kB2] * v;
    const F plain = m * h.v[kInvBias1];
    const F nesterov = h.v[kB1] * (m * h.v[kInvBias1Next]) + h.v[kOneMinusB1] * (g * h.v[kInvBias1]);
    const F num = vselect(vpositive(h.v[kNesterov]), nesterov, plain);
    return num / (vsqrt(v * h.v[kInvBias2] + h.v[kEpsRoot]) + h.v[kEps]);
"""))


class ScaleByAdam8bitState(NamedTuple):
  count: jax.Array  # int32 scalar: steps taken
  mu: Any           # first moment (signed map)
  nu: Any           # second moment (unsigned map)


def adam_hyper(b1, b2, eps, eps_root, nesterov=False):
  """Adam's slots: reciprocal bias corrections ``1 / (1 - b**t)``."""
  def hyper(count, count_inc):
    return dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, inv_bias1=1 / (1 - b1**count_inc),
                inv_bias2=1 / (1 - b2**count_inc), inv_bias1_next=1 / (1 - b1**optax.safe_increment(count_inc)),
                nesterov=float(bool(nesterov)))
  return hyper


def scale_by_adam8bit(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *, nesterov=False, bits=None,
                      block_size=None, min_8bit_size=None, max_unorm=None, rounding=None):
  r"""Adam's direction with 8-bit moments (``optax.scale_by_adam``).

  .. math::
    m_t = b_1 m_{t-1} + (1 - b_1) g, \quad v_t = b_2 v_{t-1} + (1 - b_2) g^2, \quad
    u = \frac{m_t / (1 - b_1^t)}{\sqrt{v_t / (1 - b_2^t) + \epsilon_{root}} + \epsilon}

  ``m`` uses the signed map, ``v`` the unsigned one.
  """
  check_hyperparameters("scale_by_adam8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("scale_by_adam8bit", Rule(ADAM, ScaleByAdam8bitState, adam_hyper(b1, b2, eps, eps_root, nesterov)),
               Options(bits, block_size, min_8bit_size, max_unorm, rounding=rounding))


def adam8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *,
             nesterov=False, bits=None, block_size=None, min_8bit_size=None, max_unorm=None, rounding=None,
             percentile_clipping=None, param_rounding=None):
  r"""Adam with 8-bit moments (``optax.adam``): ``u = -lr * m_hat / (sqrt(v_hat) + eps)``."""
  check_hyperparameters("adam8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("adam8bit", Rule(ADAM, ScaleByAdam8bitState, adam_hyper(b1, b2, eps, eps_root, nesterov),
                                learning_rate=learning_rate),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding))


def adamw8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None,
              weight_decay: optax.ScalarOrSchedule = 1e-4, mask=None, *, nesterov=False, bits=None, block_size=None,
              min_8bit_size=None, max_unorm=None, rounding=None, percentile_clipping=None, param_rounding=None):
  r"""AdamW with 8-bit moments (``optax.adamw``).

  .. math:: u = -\text{lr} \left(\frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon} + \text{wd}\, p\right)

  ``mask`` (a pytree of bools, a prefix of one, or a callable of params)
  selects the leaves that get weight decay, as in optax.
  """
  check_hyperparameters("adamw8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("adamw8bit", Rule(ADAM, ScaleByAdam8bitState, adam_hyper(b1, b2, eps, eps_root, nesterov),
                                 learning_rate=learning_rate, weight_decay=weight_decay, decay_mask=mask),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding))


register_optimizer("adam8bit", adam8bit, optax.adam, ("mu", "nu"))
register_optimizer("adamw8bit", adamw8bit, optax.adamw, ("mu", "nu"))
