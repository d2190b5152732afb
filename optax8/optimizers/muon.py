r"""Muon with an 8-bit momentum: momentum orthogonalised by Newton-Schulz.

The momentum (an EMA of the gradient, with bias correction and Nesterov's
look-ahead) is the per-element rule; the orthogonalisation of each whole
2-D update is a post-process hook. Leaves that are not matrices take
AdamW (`optax8.adamw8bit`), as in ``optax.contrib.muon``, whose
orthogonalisation, presets and dimension numbers this module reuses.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import _muon

from optax8 import maps
from optax8.apply import checking_inputs, partition
from optax8.fused import (Options, Rule, check_inexact, check_like_params, check_state_dtype, fused,
                          with_percentile_clipping)
from optax8.kernels.algorithms import Algorithm, Hyper, register
from optax8.optimizers import register as register_optimizer
from optax8.optimizers.adam import adamw8bit
from optax8.options import as_array, check_hyperparameters, path_str, unbox
from optax8.low_precision import with_param_rounding

__all__ = ["ScaleByMuon8bitState", "muon8bit", "scale_by_muon8bit"]


def _direction(h, g, s):
  s[0] = h[Hyper.ONE_MINUS_B1] * g + h[Hyper.B1] * s[0]
  plain = s[0] * h[Hyper.INV_BIAS1]
  nesterov = h[Hyper.B1] * (s[0] * h[Hyper.INV_BIAS1_NEXT]) + h[Hyper.ONE_MINUS_B1] * (g * h[Hyper.INV_BIAS1])
  return jnp.where(h[Hyper.NESTEROV] > 0, nesterov, plain)


MUON = register(Algorithm(6, "muon", (maps.SIGNED,), _direction, """
    F& m = s[0];
    m = h.v[kOneMinusB1] * g + h.v[kB1] * m;
    const F plain = m * h.v[kInvBias1];
    const F nesterov = h.v[kB1] * (m * h.v[kInvBias1Next]) + h.v[kOneMinusB1] * (g * h.v[kInvBias1]);
    return vselect(vpositive(h.v[kNesterov]), nesterov, plain);
"""))


class ScaleByMuon8bitState(NamedTuple):
  count: jax.Array
  mu: Any  # momentum (signed map)


def _hyper(beta, nesterov):
  def hyper(count, count_inc):
    return dict(b1=beta, inv_bias1=1 / (1 - beta**count_inc),
                inv_bias1_next=1 / (1 - beta**optax.safe_increment(count_inc)), nesterov=float(bool(nesterov)))
  return hyper


def _coefficients(name, ns_coeffs, ns_steps):
  """optax's Newton-Schulz coefficients: a preset name, (a, b, c) or one row (a, b, c) per step."""
  if isinstance(ns_coeffs, str):
    if ns_coeffs not in _muon._NS_COEFFS_PRESET_DICT:
      raise ValueError(f"{name}: unknown ns_coeffs preset {ns_coeffs!r}; known: "
                       f"{sorted(_muon._NS_COEFFS_PRESET_DICT)}")
    ns_coeffs = _muon._NS_COEFFS_PRESET_DICT[ns_coeffs]
  coeffs = jnp.asarray(ns_coeffs, jnp.float32)
  if coeffs.ndim > 2 or coeffs.shape[-1] != 3:
    raise ValueError(f"{name}: ns_coeffs must have shape (3,) or (n, 3), got {coeffs.shape}")
  if coeffs.ndim == 2 and coeffs.shape[0] > ns_steps:   # as optax: one row per step, at most ns_steps rows
    raise ValueError(f"{name}: ns_coeffs has {coeffs.shape[0]} rows, more than ns_steps={ns_steps}")
  return coeffs


def _dimension_numbers(name, spec):
  """``updates -> [MuonDimensionNumbers per leaf]`` from optax's argument.

  None: every leaf is a matrix. In a tree, None marks a leaf that Muon does
  not update (in muon8bit, AdamW's leaves).
  """
  def per_leaf(updates):
    n = len(jax.tree.leaves(updates))
    dims = spec(updates) if callable(spec) else spec
    if dims is None or isinstance(dims, _muon.MuonDimensionNumbers):
      return [dims or _muon.MuonDimensionNumbers()] * n
    leaves = jax.tree.leaves(dims, is_leaf=lambda x: isinstance(x, _muon.MuonDimensionNumbers))
    if len(leaves) != n or not all(isinstance(x, _muon.MuonDimensionNumbers) for x in leaves):
      raise ValueError(f"{name}: the weight dimension numbers must give one MuonDimensionNumbers per leaf that "
                       f"Muon updates ({n} leaves), got {len(leaves)}")
    return leaves
  return per_leaf


def _orthogonalize(d, p, wd, dim_num, *, coeffs, ns_steps, eps, adaptive, preconditioning, consistent_rms,
                   shape_scale):
  """optax's Muon on one leaf's momentum ``d``: Newton-Schulz, adaptive and shape scaling, then ``+ wd p``."""
  # Newton-Schulz divides by a norm of d, which overflows where an element exceeds about 1e19 (a diverging
  # gradient); its result does not depend on d's scale, so such a d is scaled by 2**-80 first (else by 1, exactly)
  overflows = jnp.isinf(jnp.sum(jnp.square(jnp.abs(d))))
  d_scaled = d * jnp.where(overflows, np.float32(2.0**-80), np.float32(1)).astype(d.real.dtype)
  x = _muon.orthogonalize_via_newton_schulz(d_scaled, coeffs, ns_steps, preconditioning, eps, dim_num)
  if adaptive:
    x = jnp.sum(d.conj() * x) * x
  if shape_scale:
    x = (_muon._scale_update_for_width_transfer(x, dim_num) if consistent_rms is None
         else _muon._scale_update_for_consistent_rms(x, dim_num, consistent_rms))
  return x + wd * p


def _rule(name, ns_coeffs, ns_steps, beta, eps, nesterov, adaptive, preconditioning, dimension_numbers,
          consistent_rms=None, shape_scale=False, **rule):
  if preconditioning not in _muon._PRECONDITIONINGS:
    raise ValueError(f"{name}: unknown preconditioning {preconditioning!r}; known: {_muon._PRECONDITIONINGS}")
  post = functools.partial(_orthogonalize, coeffs=_coefficients(name, ns_coeffs, ns_steps), ns_steps=ns_steps,
                           eps=eps, adaptive=adaptive, preconditioning=preconditioning,
                           consistent_rms=consistent_rms, shape_scale=shape_scale)
  return Rule(MUON, ScaleByMuon8bitState, _hyper(beta, nesterov), post=post,
              post_args=_dimension_numbers(name, dimension_numbers), **rule)


def scale_by_muon8bit(ns_coeffs=_muon._DEFAULT_NS_COEFFS, ns_steps=5, beta=0.95, eps=1e-8, mu_dtype=None, *,
                      nesterov=True, adaptive=False, preconditioning="frobenius", weight_dimension_numbers=None,
                      bits=None, block_size=None, min_8bit_size=None, max_unorm=None, rounding=None):
  r"""Muon's direction with an 8-bit momentum (``optax.contrib.scale_by_muon``).

  .. math::
    m_t = \beta m_{t-1} + (1 - \beta) g, \quad
    \hat m = \beta \frac{m_t}{1 - \beta^{t+1}} + (1 - \beta) \frac{g}{1 - \beta^t}
    \text{ (Nesterov; else } m_t / (1 - \beta^t)), \quad u = \operatorname{NS}(\hat m)

  where NS orthogonalises each matrix (``weight_dimension_numbers`` say
  which axes) by ``ns_steps`` Newton-Schulz iterations. Every leaf must be
  a matrix (or have dimension numbers).
  """
  check_hyperparameters("scale_by_muon8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  return fused("scale_by_muon8bit",
               _rule("scale_by_muon8bit", ns_coeffs, ns_steps, beta, eps, nesterov, adaptive, preconditioning,
                     weight_dimension_numbers),
               Options(bits, block_size, min_8bit_size, max_unorm, rounding=rounding))


def muon8bit(learning_rate: optax.ScalarOrSchedule, ns_coeffs=_muon._DEFAULT_NS_COEFFS, ns_steps=5, beta=0.95,
             eps=1e-8, weight_decay=0.0, weight_decay_mask=None, mu_dtype=None, *, nesterov=True, adaptive=False,
             preconditioning="frobenius", adam_b1=0.9, adam_b2=0.999, adam_eps_root=0.0, adam_weight_decay=0.0,
             adam_learning_rate=None, muon_weight_dimension_numbers=None, consistent_rms=None, bits=None,
             block_size=None, min_8bit_size=None, max_unorm=None, rounding=None, percentile_clipping=None,
             param_rounding=None):
  r"""Muon with an 8-bit momentum (``optax.contrib.muon``).

  .. math:: u = -\text{lr} \left(s \operatorname{NS}(\hat m) + \text{wd}\, p\right)

  for matrices, with ``NS`` and ``\hat m`` as in `scale_by_muon8bit` and
  ``s = sqrt(max(1, fan_out / fan_in))`` (or ``consistent_rms *
  sqrt(max(fan_in, fan_out))``); the other leaves (or those without
  ``muon_weight_dimension_numbers``) take `adamw8bit` with the ``adam_*``
  arguments, as in optax. The 8-bit options apply to both parts.
  """
  check_hyperparameters("muon8bit", **locals())
  check_state_dtype(mu_dtype, "mu_dtype")
  options = Options(bits, block_size, min_8bit_size, max_unorm, rounding=rounding)
  muon = fused("muon8bit", _rule("muon8bit", ns_coeffs, ns_steps, beta, eps, nesterov, adaptive, preconditioning,
                                 muon_weight_dimension_numbers, consistent_rms, shape_scale=True,
                                 learning_rate=learning_rate, weight_decay=weight_decay,
                                 decay_mask=weight_decay_mask), options)
  adam = adamw8bit(learning_rate if adam_learning_rate is None else adam_learning_rate, b1=adam_b1, b2=adam_b2,
                   eps=eps, eps_root=adam_eps_root, weight_decay=adam_weight_decay, nesterov=nesterov, bits=bits,
                   block_size=block_size, min_8bit_size=min_8bit_size, max_unorm=max_unorm, rounding=rounding)
  tx = _checked(partition({"muon": muon, "adam": adam}, _muon_labels(muon_weight_dimension_numbers)))
  return with_param_rounding("muon8bit", param_rounding, with_percentile_clipping("muon8bit", percentile_clipping, tx))


def _checked(tx):
  """muon8bit's partition ``tx``, checking the state and the params against the gradients first, with
  errors that name muon8bit and the leaf."""
  def check_init(params):
    for path, x in jax.tree_util.tree_flatten_with_path(unbox(params))[0]:
      check_inexact("muon8bit", path_str(path), x)

  def check(updates, state, params):
    if not isinstance(state, optax.PartitionState) or sorted(state.inner_states) != ["adam", "muon"]:
      raise TypeError(f"muon8bit: expected the state of muon8bit's init (an optax.PartitionState of its 'muon' "
                      f"and 'adam' parts), got {type(state).__name__}")
    if params is not None:
      check_like_params("muon8bit", jax.tree.map(as_array, updates), jax.tree.map(as_array, params))

  return checking_inputs(tx, check, check_init)


def _muon_labels(spec):
  """optax.contrib.muon's partition: matrices (default) or leaves with dimension numbers take Muon."""
  if spec is None:
    return lambda params: jax.tree.map(lambda x: "muon" if jnp.ndim(x) == 2 else "adam", params)
  is_spec = lambda x: x is None or isinstance(x, _muon.MuonDimensionNumbers)

  def labels(params):
    specs = spec(params) if callable(spec) else spec
    return jax.tree.map(lambda d, x: jax.tree.map(lambda _: "adam" if d is None else "muon", x), specs, params,
                        is_leaf=is_spec)
  return labels


register_optimizer("muon8bit", muon8bit, optax.contrib.muon, ("mu",))
