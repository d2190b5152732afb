"""The nine optimizers, drop-in replacements for their optax namesakes.

Each takes optax's arguments and defaults for the same optimizer and the
8-bit options ``bits`` (8 or 32; default 8), ``block_size`` (default 256),
``min_8bit_size`` (default 4096: smaller leaves keep float32 state),
``max_unorm`` (default 0, off) and ``percentile_clipping``
(default 100, off: see [`optax8.percentile_clipping`][optax8.clipping.percentile_clipping]), and returns an
``optax.GradientTransformationExtraArgs`` whose kernel also applies the
learning rate and weight decay (one pass over each leaf per step). With
``bits=32`` the result equals optax's float32 optimizer to float32 rounding.

All options but ``min_8bit_size`` may be set per leaf: a pytree (prefix) of
the params or a callable of them, like optax's ``mask`` (see
`optax8.options`); leaves under a ``stable_embedding`` key keep 32-bit
state unless ``bits`` says otherwise per leaf. With percentile clipping on,
the state is ``(PercentileClippingState, optimizer state)``.

Example::

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(3e-4, weight_decay=0.1))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import dataclasses

import optax

from optax8.fused import Options, Rule, fused, with_percentile_clipping
from optax8.kernels.jax_step import Algo
from optax8.options import check_hyperparameters
from optax8.transforms import (adam_hyper, ademamix_hyper, check_state_dtype, lion_hyper, momentum_hyper,
                               rms_hyper, rss_hyper, trace8bit)


def adam8bit(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *, nesterov=False,
             bits=None, block_size=None, min_8bit_size=None, max_unorm=None, percentile_clipping=None):
  r"""Adam with 8-bit moments (``optax.adam``): ``u = -lr * m_hat / (sqrt(v_hat) + eps)``."""
  check_hyperparameters("adam8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("adam8bit", Rule(Algo.ADAM, adam_hyper(b1, b2, eps, eps_root, nesterov), learning_rate=learning_rate),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping))


def adamw8bit(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, weight_decay=1e-4, mask=None,
              *, nesterov=False, bits=None, block_size=None, min_8bit_size=None, max_unorm=None,
              percentile_clipping=None):
  r"""AdamW with 8-bit moments (``optax.adamw``).

  .. math:: u = -\text{lr} \left(\frac{\hat m}{\sqrt{\hat v + \epsilon_{root}} + \epsilon} + \text{wd}\, p\right)

  ``mask`` (a pytree of bools, a prefix of one, or a callable of params)
  selects the leaves that get weight decay, as in optax.
  """
  check_hyperparameters("adamw8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("adamw8bit", Rule(Algo.ADAM, adam_hyper(b1, b2, eps, eps_root, nesterov), learning_rate=learning_rate,
                                 weight_decay=weight_decay, decay_mask=mask),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping))


def lion8bit(learning_rate, b1=0.9, b2=0.99, mu_dtype=None, weight_decay=1e-3, mask=None, *, bits=None,
             block_size=None, min_8bit_size=None, max_unorm=None, percentile_clipping=None):
  r"""Lion with an 8-bit momentum (``optax.lion``): ``u = -lr * (sign(...) + wd * p)``."""
  check_hyperparameters("lion8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("lion8bit", Rule(Algo.LION, lion_hyper(b1, b2), learning_rate=learning_rate, weight_decay=weight_decay,
                                decay_mask=mask),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping))


def sgd8bit(learning_rate, momentum=None, nesterov=False, accumulator_dtype=None, *, weight_decay=None, bits=None,
            block_size=None, min_8bit_size=None, max_unorm=None, percentile_clipping=None):
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
    return with_percentile_clipping("sgd8bit", percentile_clipping,
                                    optax.chain(*parts, optax.scale_by_learning_rate(learning_rate)))
  return fused("sgd8bit", Rule(Algo.MOMENTUM, momentum_hyper(momentum, nesterov), learning_rate=learning_rate,
                               weight_decay=weight_decay, coupled=True),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping))


def rmsprop8bit(learning_rate, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True, centered=False,
                momentum=None, nesterov=False, bias_correction=False, *, weight_decay=None, bits=None,
                block_size=None, min_8bit_size=None, max_unorm=None, percentile_clipping=None):
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
  opts = Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping)
  rule = Rule(Algo.RMS, rms_hyper(decay, eps, eps_in_sqrt, bias_correction), initial=(initial_scale,),
              learning_rate=learning_rate, weight_decay=weight_decay, coupled=True)
  if momentum is None:
    return fused("rmsprop8bit", rule, opts)
  tx = optax.chain(fused("rmsprop8bit", rule, dataclasses.replace(opts, percentile_clipping=None)),
                   trace8bit(momentum, nesterov, bits=bits, block_size=block_size, min_8bit_size=min_8bit_size))
  return with_percentile_clipping("rmsprop8bit", percentile_clipping, tx)   # in front of the whole chain


def adagrad8bit(learning_rate, initial_accumulator_value=0.1, eps=1e-7, *, weight_decay=None, bits=None,
                block_size=None, min_8bit_size=None, max_unorm=None, percentile_clipping=None):
  r"""Adagrad with an 8-bit sum of squares (``optax.adagrad``).

  .. math:: s_t = s_{t-1} + g^2, \quad u = -\text{lr}\, g / \sqrt{s_t + \epsilon}

  eps sits inside the square root, as in optax (bnb: outside).
  ``weight_decay`` (not in optax.adagrad; bnb's and torch's coupled decay,
  default None: none) adds ``wd * p`` to the gradient first.
  """
  check_hyperparameters("adagrad8bit", **locals())
  return fused("adagrad8bit", Rule(Algo.RSS, rss_hyper(eps), initial=(initial_accumulator_value,),
                                   learning_rate=learning_rate, weight_decay=weight_decay, coupled=True),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping))


def lamb8bit(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, mask=None, *, bits=None,
             block_size=None, min_8bit_size=None, max_unorm=None, percentile_clipping=None):
  r"""LAMB with 8-bit moments (``optax.lamb``).

  .. math:: r = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \text{wd}\, p, \quad
     u = -\text{lr}\, \frac{\|p\|}{\|r\|} r \quad (\text{ratio 1 where a norm is 0})

  Norms are per leaf.
  """
  check_hyperparameters("lamb8bit", **locals())
  return fused("lamb8bit", Rule(Algo.ADAM, adam_hyper(b1, b2, eps, eps_root), learning_rate=learning_rate,
                                weight_decay=weight_decay, decay_mask=mask, trust="lamb"),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping))


def lars8bit(learning_rate, weight_decay=0.0, weight_decay_mask=True, trust_coefficient=0.001, eps=0.0,
             trust_ratio_mask=True, momentum=0.9, nesterov=False, *, bits=None, block_size=None,
             min_8bit_size=None, max_unorm=None, percentile_clipping=None):
  r"""LARS with an 8-bit momentum (``optax.lars``).

  .. math:: x = g + \text{wd}\, p, \quad
     m_t = -\text{lr}\, \frac{c \|p\|}{\|x\| + \epsilon} x + \mu m_{t-1}, \quad u = m_t

  The trust ratio is computed before momentum, per leaf, as in optax.
  ``max_unorm`` (bitsandbytes' LARS bound) then scales the update down so
  that ``||u|| <= lr * max_unorm * ||p||``; the momentum is not scaled.
  """
  check_hyperparameters("lars8bit", **locals())
  return fused("lars8bit", Rule(Algo.MOMENTUM, momentum_hyper(momentum, nesterov), learning_rate=learning_rate,
                                weight_decay=weight_decay, coupled=True, decay_mask=weight_decay_mask, trust="lars",
                                trust_coefficient=trust_coefficient, trust_eps=eps, trust_mask=trust_ratio_mask),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping))


def ademamix8bit(learning_rate, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, eps_root=0.0, mu_dtype=None,
                 weight_decay=0.0, mask=None, *, bits=None, block_size=None, min_8bit_size=None, max_unorm=None,
                 percentile_clipping=None):
  r"""AdEMAMix with three 8-bit states (``optax.contrib.ademamix``).

  .. math:: u = -\text{lr} \left(\frac{\hat m_1 + \alpha m_2}{\sqrt{\hat \nu + \epsilon_{root}} + \epsilon}
     + \text{wd}\, p\right)

  ``b3`` and ``alpha`` may be schedules (bnb's ``t_beta3``/``t_alpha``
  warmups are such schedules).
  """
  check_hyperparameters("ademamix8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("ademamix8bit", Rule(Algo.ADEMAMIX, ademamix_hyper(b1, b2, b3, alpha, eps, eps_root),
                                    learning_rate=learning_rate, weight_decay=weight_decay, decay_mask=mask),
               Options(bits, block_size, min_8bit_size, max_unorm, percentile_clipping))

