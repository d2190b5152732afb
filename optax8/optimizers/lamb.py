"""LAMB with 8-bit moments: Adam's rule and a trust ratio over each whole leaf."""

from __future__ import annotations

import optax

from optax8.fused import Options, Rule, fused, norm, trust_ratio
from optax8.optimizers import register as register_optimizer
from optax8.optimizers.adam import ADAM, ScaleByAdam8bitState, adam_hyper
from optax8.options import check_hyperparameters

__all__ = ["lamb8bit"]


def _trust(d, p, wd, _):
  """optax.lamb's update before the learning rate: ``x ||p|| / ||x||`` with ``x = d + wd p``."""
  x = d + wd * p
  return x * trust_ratio(norm(p), norm(x))


def lamb8bit(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0,
             weight_decay: optax.ScalarOrSchedule = 0.0, mask=None, *, bits=None, block_size=None, min_8bit_size=None,
             max_unorm=None, rounding=None, percentile_clipping=None, param_rounding=None):
  r"""LAMB with 8-bit moments (``optax.lamb``).

  .. math:: r = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \text{wd}\, p, \quad
     u = -\text{lr}\, \frac{\|p\|}{\|r\|} r \quad (\text{ratio 1 where a norm is 0})

  Norms are per leaf.
  """
  check_hyperparameters("lamb8bit", **locals())
  return fused("lamb8bit", Rule(ADAM, ScaleByAdam8bitState, adam_hyper(b1, b2, eps, eps_root),
                                learning_rate=learning_rate, weight_decay=weight_decay, decay_mask=mask, post=_trust),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding))


register_optimizer("lamb8bit", lamb8bit, optax.lamb, ("mu", "nu"))
