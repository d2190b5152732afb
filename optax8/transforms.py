"""Building blocks in optax's style: the 8-bit ``scale_by_*`` transformations.

Each returns the optimizer's direction (no learning rate), like its optax
counterpart, with its state quantized block-wise to 8 bits. Chain them with
``optax.scale_by_learning_rate`` and friends, or use the fused optimizers of
`optax8.alias`, which also fold the learning rate and weight decay into
the kernel. Every function takes the 8-bit options ``bits`` (8 or 32),
``block_size`` (256), ``min_8bit_size`` (4096) and ``max_unorm`` (0, off),
all but ``min_8bit_size`` also per leaf (see `optax8.options`). For
percentile clipping chain [`optax8.percentile_clipping`][optax8.clipping.percentile_clipping] in front.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from optax8.fused import Options, Rule, _value, fused
from optax8.kernels.jax_step import Algo
from optax8.options import check_hyperparameters


def check_state_dtype(dtype, name: str) -> None:
  """optax's ``mu_dtype``/``accumulator_dtype``: optax8 states are float32 or 8-bit."""
  if dtype is not None and jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f"{name}={dtype}: optax8 keeps states in 8 bits (or float32 with bits=32)")


def adam_hyper(b1, b2, eps, eps_root, nesterov=False):
  """Adam's slots: reciprocal bias corrections ``1 / (1 - b**t)``."""
  def hyper(count, count_inc):
    return dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, inv_bias1=1 / (1 - b1**count_inc),
                inv_bias2=1 / (1 - b2**count_inc), inv_bias1_next=1 / (1 - b1**optax.safe_increment(count_inc)),
                nesterov=float(bool(nesterov)))
  return hyper


def lion_hyper(b1, b2):
  return lambda count, count_inc: dict(b1=b1, b2=b2)


def momentum_hyper(decay, nesterov=False):
  return lambda count, count_inc: dict(b1=decay, nesterov=float(bool(nesterov)))


def rms_hyper(decay, eps, eps_in_sqrt=True, bias_correction=False):
  """eps goes inside the square root (eps_root slot) or outside (eps slot)."""
  def hyper(count, count_inc):
    inv_bias2 = 1 / (1 - decay**count_inc) if bias_correction else 1.0
    inside, outside = (eps, 0.0) if eps_in_sqrt else (0.0, eps)
    return dict(b2=decay, eps_root=inside, eps=outside, inv_bias2=inv_bias2)
  return hyper


def rss_hyper(eps):
  return lambda count, count_inc: dict(eps_root=eps)  # inside the square root, as optax


def ademamix_hyper(b1, b2, b3, alpha, eps, eps_root):
  """AdEMAMix's slots; ``b3`` and ``alpha`` may be schedules of the step count."""
  def hyper(count, count_inc):
    return dict(b1=b1, b2=b2, b3=_value(b3, count), alpha=_value(alpha, count), eps=eps, eps_root=eps_root,
                inv_bias1=1 / (1 - b1**count_inc), inv_bias2=1 / (1 - b2**count_inc))
  return hyper


def scale_by_adam8bit(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *, nesterov=False, bits=None,
                      block_size=None, min_8bit_size=None, max_unorm=None):
  r"""Adam's direction with 8-bit moments (``optax.scale_by_adam``).

  .. math::
    m_t = b_1 m_{t-1} + (1 - b_1) g, \quad v_t = b_2 v_{t-1} + (1 - b_2) g^2, \quad
    u = \frac{m_t / (1 - b_1^t)}{\sqrt{v_t / (1 - b_2^t) + \epsilon_{root}} + \epsilon}

  ``m`` uses the signed map, ``v`` the unsigned one.
  """
  check_hyperparameters("scale_by_adam8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("scale_by_adam8bit", Rule(Algo.ADAM, adam_hyper(b1, b2, eps, eps_root, nesterov)),
               Options(bits, block_size, min_8bit_size, max_unorm))


def scale_by_lion8bit(b1=0.9, b2=0.99, mu_dtype=None, *, bits=None, block_size=None, min_8bit_size=None,
                      max_unorm=None):
  r"""Lion's direction with an 8-bit momentum (``optax.scale_by_lion``).

  .. math:: u = \operatorname{sign}((1 - b_1) g + b_1 m_{t-1}), \quad m_t = b_2 m_{t-1} + (1 - b_2) g
  """
  check_hyperparameters("scale_by_lion8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("scale_by_lion8bit", Rule(Algo.LION, lion_hyper(b1, b2)),
               Options(bits, block_size, min_8bit_size, max_unorm))


def trace8bit(decay, nesterov=False, accumulator_dtype=None, *, bits=None, block_size=None, min_8bit_size=None,
              max_unorm=None):
  r"""Momentum with an 8-bit trace (``optax.trace``).

  .. math:: m_t = g + \text{decay}\, m_{t-1}, \quad u = m_t \text{ (or } g + \text{decay}\, m_t
     \text{ with Nesterov)}
  """
  check_hyperparameters("trace8bit", **locals())
  check_state_dtype(accumulator_dtype, "accumulator_dtype")
  return fused("trace8bit", Rule(Algo.MOMENTUM, momentum_hyper(decay, nesterov)),
               Options(bits, block_size, min_8bit_size, max_unorm))


def scale_by_rms8bit(decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True, bias_correction=False, *,
                     bits=None, block_size=None, min_8bit_size=None, max_unorm=None):
  r"""RMSprop's scaling with an 8-bit second moment (``optax.scale_by_rms``).

  .. math:: v_t = \text{decay}\, v_{t-1} + (1 - \text{decay}) g^2, \quad u = g / \sqrt{v_t + \epsilon}
     \text{ (or } g / (\sqrt{v_t} + \epsilon) \text{ with eps\_in\_sqrt=False)}
  """
  check_hyperparameters("scale_by_rms8bit", **locals())
  return fused("scale_by_rms8bit",
               Rule(Algo.RMS, rms_hyper(decay, eps, eps_in_sqrt, bias_correction), initial=(initial_scale,)),
               Options(bits, block_size, min_8bit_size, max_unorm))


def scale_by_rss8bit(initial_accumulator_value=0.1, eps=1e-7, *, bits=None, block_size=None, min_8bit_size=None,
                     max_unorm=None):
  r"""Adagrad's scaling with an 8-bit sum of squares (``optax.scale_by_rss``).

  .. math:: s_t = s_{t-1} + g^2, \quad u = g / \sqrt{s_t + \epsilon} \text{ (0 where } s_t = 0)
  """
  check_hyperparameters("scale_by_rss8bit", **locals())
  return fused("scale_by_rss8bit", Rule(Algo.RSS, rss_hyper(eps), initial=(initial_accumulator_value,)),
               Options(bits, block_size, min_8bit_size, max_unorm))


def scale_by_ademamix8bit(b1=0.9, b2=0.999, b3=0.9999, alpha=6.0, eps=1e-8, eps_root=0.0, mu_dtype=None, *,
                          bits=None, block_size=None, min_8bit_size=None, max_unorm=None):
  r"""AdEMAMix's direction with three 8-bit states (``optax.contrib.scale_by_ademamix``).

  .. math::
    m_1 \leftarrow b_1 m_1 + (1 - b_1) g, \quad m_2 \leftarrow b_3 m_2 + (1 - b_3) g, \quad
    \nu \leftarrow b_2 \nu + (1 - b_2) g^2, \quad
    u = \frac{m_1 / (1 - b_1^t) + \alpha m_2}{\sqrt{\nu / (1 - b_2^t) + \epsilon_{root}} + \epsilon}

  ``b3`` and ``alpha`` may be schedules of the step count.
  """
  check_hyperparameters("scale_by_ademamix8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("scale_by_ademamix8bit", Rule(Algo.ADEMAMIX, ademamix_hyper(b1, b2, b3, alpha, eps, eps_root)),
               Options(bits, block_size, min_8bit_size, max_unorm))
