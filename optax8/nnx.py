"""Flax nnx: the `StableEmbed` layer and an `Optimizer` that applies fused (needs ``pip install optax8[flax]``)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

try:
  from flax import nnx
except ImportError as e:
  raise ImportError("optax8.nnx needs flax: pip install 'optax8[flax]'") from e

from optax8 import stable_embed
from optax8.apply import fused_apply

__all__ = ["Optimizer", "StableEmbed"]


class Optimizer(nnx.Optimizer):
  """``nnx.Optimizer`` whose ``update`` lets optax8's kernels write the new parameters.

  The same constructor, state and ``update(model, grads, **kwargs)`` as
  ``nnx.Optimizer``. Where ``tx`` has a fused apply (`optax8.fused_apply`:
  optax8's optimizers and `optax8.chain`, `optax8.partition`,
  `optax8.inject_hyperparams` or `optax8.offload` of them), ``update`` runs
  it: ``new_params, opt_state = apply(grads, opt_state, params)``, each
  8-bit leaf's kernel adding its update to the parameter in the same pass,
  and returns None (no separate updates exist). For float32 parameters the
  result is ``nnx.Optimizer``'s, bit for bit; a bfloat16 parameter is
  rounded once, from ``p + u`` in float32. Without a fused apply this is
  ``nnx.Optimizer``.
  """

  def update(self, model, grads, /, **kwargs):
    apply = fused_apply(self.tx)
    if apply is None:
      return super().update(model, grads, **kwargs)
    graph = {"graph": self.graph} if hasattr(self, "graph") else {}
    params = nnx.as_pure(nnx.state(model, self.wrt, **graph))
    new_params, new_opt_state = apply(nnx.as_pure(nnx.state(grads, self.wrt, **graph)), nnx.as_pure(self.opt_state),
                                      params, **nnx.as_pure(kwargs))
    nnx.update(model, new_params)
    nnx.update(self.opt_state, nnx.state(new_opt_state, **graph))
    self.step[...] += 1
    return None


class StableEmbed(nnx.Module):
  """bitsandbytes' StableEmbedding for nnx: ``nnx.Embed`` plus a float32 LayerNorm, 32-bit optimizer state.

  ``__call__(inputs)`` looks up the rows of the table, normalizes them over
  the features in float32 (learned ``scale`` and ``bias``) and casts the
  result to ``dtype``::

      y = (e - mean(e)) / sqrt(var(e) + epsilon) * scale + bias,   e = float32(table[inputs])

  The table is the ``nnx.Param`` attribute ``stable_embedding`` of shape
  ``(num_embeddings, features)``; every optax8 optimizer (also through
  ``nnx.Optimizer``) keeps its state in float32 whatever its ``bits``,
  unless ``bits`` is a pytree or callable that gives this leaf explicitly.

  Example::

      embed = optax8.nnx.StableEmbed(32000, 512, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
      x = embed(tokens)             # (..., 512) bfloat16
      logits = embed.attend(x)      # tied output layer

  Args:
    num_embeddings: number of rows (vocabulary size).
    features: size of each embedding vector.
    dtype: the output dtype (default: ``param_dtype``).
    param_dtype: dtype of the table, scale and bias (default float32).
    embedding_init: the table's initializer (default Xavier uniform).
    scale_init: the LayerNorm scale's initializer (default ones).
    bias_init: the LayerNorm bias's initializer (default zeros).
    epsilon: added to the variance (default 1e-6, as ``nnx.LayerNorm``).
    rngs: the random streams; the table draws from ``rngs.params()``.
    embedding_metadata: metadata of the table's ``nnx.Param`` (for example
      its sharding).
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               embedding_init: Callable = stable_embed.default_embed_init(),
               scale_init: Callable = jax.nn.initializers.ones, bias_init: Callable = jax.nn.initializers.zeros,
               epsilon: float = stable_embed.EPSILON, rngs: nnx.Rngs,
               embedding_metadata: Mapping[str, Any] = MappingProxyType({})):
    self.num_embeddings = num_embeddings
    self.features = features
    self.dtype = dtype or param_dtype
    self.param_dtype = param_dtype
    self.epsilon = epsilon
    self.stable_embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features), param_dtype),
                                      **embedding_metadata)
    self.scale = nnx.Param(scale_init(rngs.params(), (features,), param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (features,), param_dtype))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Embeds integer ``inputs``: shape ``inputs.shape + (features,)``, dtype ``dtype``."""
    return stable_embed.embed(self.stable_embedding[...], self.scale[...], self.bias[...], inputs, self.epsilon,
                              self.dtype)

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ table.T`` (last axis ``num_embeddings``), for an output layer tied to the table."""
    return stable_embed.attend(self.stable_embedding[...], query, self.dtype)
