"""LARS with an 8-bit momentum: SGD's rule after a trust ratio over each whole leaf."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import optax

from optax8.fused import Options, Rule, fused, norm, trust_ratio
from optax8.optimizers import register as register_optimizer
from optax8.optimizers.sgd import MOMENTUM, Trace8bitState, momentum_hyper
from optax8.options import check_hyperparameters

__all__ = ["lars8bit"]


def _trust(g, p, wd, coefficient, eps):
  """optax.scale_by_trust_ratio on ``g + wd * p`` (non-finite g counts as 0)."""
  direction = lambda g, p: jnp.where(jnp.isfinite(g), g, 0).astype(jnp.float32) + wd * p.astype(jnp.float32)
  return trust_ratio(norm(p), norm(g, p, of=direction), coefficient, eps)


def lars8bit(learning_rate: optax.ScalarOrSchedule, weight_decay: optax.ScalarOrSchedule = 0.0,
             weight_decay_mask=True, trust_coefficient=0.001, eps=0.0, trust_ratio_mask=True, momentum=0.9,
             nesterov=False, *, bits=None, block_size=None, min_8bit_size=None, max_unorm=None, rounding=None,
             percentile_clipping=None, param_rounding=None):
  r"""LARS with an 8-bit momentum (``optax.lars``).

  .. math:: x = g + \text{wd}\, p, \quad
     m_t = -\text{lr}\, \frac{c \|p\|}{\|x\| + \epsilon} x + \mu m_{t-1}, \quad u = m_t

  The trust ratio is computed before momentum, per leaf, as in optax.
  ``max_unorm`` (bitsandbytes' LARS bound) then scales the update down so
  that ``||u|| <= lr * max_unorm * ||p||``; the momentum is not scaled.
  """
  check_hyperparameters("lars8bit", **locals())
  return fused("lars8bit", Rule(MOMENTUM, Trace8bitState, momentum_hyper(momentum, nesterov),
                                learning_rate=learning_rate, weight_decay=weight_decay, coupled=True,
                                decay_mask=weight_decay_mask,
                                pre=functools.partial(_trust, coefficient=trust_coefficient, eps=eps),
                                pre_mask=trust_ratio_mask),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding))


register_optimizer("lars8bit", lars8bit, optax.lars, ("trace",))
