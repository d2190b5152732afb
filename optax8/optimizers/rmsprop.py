"""RMSprop with an 8-bit second moment."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax8 import maps
from optax8.complex_leaves import REAL
from optax8.apply import chain
from optax8.fused import Options, Rule, fused, with_percentile_clipping
from optax8.kernels.algorithms import Algorithm, Hyper, register
from optax8.optimizers import register as register_optimizer
from optax8.optimizers.sgd import trace8bit
from optax8.options import check_hyperparameters
from optax8.low_precision import with_param_rounding

__all__ = ["ScaleByRms8bitState", "rmsprop8bit", "scale_by_rms8bit"]


def _direction(h, g, s, ops=REAL):
  s[0] = h[Hyper.ONE_MINUS_B2] * ops.square(g) + h[Hyper.B2] * s[0]
  return (1 / (jnp.sqrt(s[0] * h[Hyper.INV_BIAS2] + h[Hyper.EPS_ROOT]) + h[Hyper.EPS])) * g


RMS = register(Algorithm(3, "rms", (maps.UNSIGNED,), _direction, """
    F& v = s[0];
    v = h.v[kOneMinusB2] * (g * g) + h.v[kB2] * v;
    const F scaling = h.one / (vsqrt(v * h.v[kInvBias2] + h.v[kEpsRoot]) + h.v[kEps]);
    return scaling * g;
"""))


class ScaleByRms8bitState(NamedTuple):
  count: jax.Array
  nu: Any


def _hyper(decay, eps, eps_in_sqrt=True, bias_correction=False):
  """eps goes inside the square root (eps_root slot) or outside (eps slot)."""
  def hyper(count, count_inc):
    inv_bias2 = 1 / (1 - decay**count_inc) if bias_correction else 1.0
    inside, outside = (eps, 0.0) if eps_in_sqrt else (0.0, eps)
    return dict(b2=decay, eps_root=inside, eps=outside, inv_bias2=inv_bias2)
  return hyper


def scale_by_rms8bit(decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True, bias_correction=False, *,
                     bits=None, block_size=None, min_8bit_size=None, max_unorm=None, rounding=None):
  r"""RMSprop's scaling with an 8-bit second moment (``optax.scale_by_rms``).

  .. math:: v_t = \text{decay}\, v_{t-1} + (1 - \text{decay}) g^2, \quad u = g / \sqrt{v_t + \epsilon}
     \text{ (or } g / (\sqrt{v_t} + \epsilon) \text{ with eps\_in\_sqrt=False)}
  """
  check_hyperparameters("scale_by_rms8bit", **locals())
  return fused("scale_by_rms8bit",
               Rule(RMS, ScaleByRms8bitState, _hyper(decay, eps, eps_in_sqrt, bias_correction),
                    initial=(initial_scale,)),
               Options(bits, block_size, min_8bit_size, max_unorm, rounding=rounding))


def rmsprop8bit(learning_rate: optax.ScalarOrSchedule, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True,
                centered=False, momentum=None, nesterov=False, bias_correction=False, *, weight_decay=None, bits=None,
                block_size=None, min_8bit_size=None, max_unorm=None, rounding=None, percentile_clipping=None,
                param_rounding=None):
  r"""RMSprop with an 8-bit second moment (``optax.rmsprop``).

  .. math:: v_t = \text{decay}\, v_{t-1} + (1 - \text{decay}) g^2, \quad u = -\text{lr}\, g / \sqrt{v_t + \epsilon}

  eps sits inside the square root by default, as in optax (bnb puts it
  outside: ``eps_in_sqrt=False``). ``momentum`` adds an 8-bit trace after
  the learning rate, as optax does. ``weight_decay`` (not in optax.rmsprop;
  bnb's and torch's coupled decay, default None: none) adds ``wd * p`` to
  the gradient first.
  ``centered=True`` is not supported.
  """
  check_hyperparameters("rmsprop8bit", **locals())
  if centered:
    raise NotImplementedError("rmsprop8bit: centered=True is not supported; use optax.rmsprop(centered=True)")
  opts = Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping, rounding, param_rounding)
  rule = Rule(RMS, ScaleByRms8bitState, _hyper(decay, eps, eps_in_sqrt, bias_correction), initial=(initial_scale,),
              learning_rate=learning_rate, weight_decay=weight_decay, coupled=True)
  if momentum is None:
    return fused("rmsprop8bit", rule, opts)
  tx = chain(fused("rmsprop8bit", rule, dataclasses.replace(opts, percentile_clipping=None, param_rounding=None)),
             trace8bit(momentum, nesterov, bits=bits, block_size=block_size, min_8bit_size=min_8bit_size,
                       rounding=rounding))
  return with_param_rounding("rmsprop8bit", param_rounding,   # after the whole chain,
                             with_percentile_clipping("rmsprop8bit", percentile_clipping, tx))   # in front of it


register_optimizer("rmsprop8bit", rmsprop8bit, optax.rmsprop, ("nu",))
