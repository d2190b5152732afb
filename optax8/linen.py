"""Flax linen layers: `StableEmbed` (needs ``pip install optax8[flax]``)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

try:
  from flax import linen as nn
except ImportError as e:
  raise ImportError("optax8.linen needs flax: pip install 'optax8[flax]'") from e

from optax8 import stable_embed
from optax8.options import STABLE_EMBEDDING

__all__ = ["StableEmbed"]


class StableEmbed(nn.Module):
  """bitsandbytes' StableEmbedding for linen: ``nn.Embed`` plus a float32 LayerNorm, 32-bit optimizer state.

  ``__call__(inputs)`` looks up the rows of the table, normalizes them over
  the features in float32 (learned ``scale`` and ``bias``) and casts the
  result to ``dtype``::

      y = (e - mean(e)) / sqrt(var(e) + epsilon) * scale + bias,   e = float32(table[inputs])

  The table is the parameter ``stable_embedding`` of shape
  ``(num_embeddings, features)``; every optax8 optimizer keeps its state in
  float32 whatever its ``bits``, unless ``bits`` is a pytree or callable
  that gives this leaf explicitly.

  Example::

      embed = optax8.linen.StableEmbed(num_embeddings=32000, features=512, dtype=jnp.bfloat16)
      variables = embed.init(jax.random.key(0), tokens)
      x = embed.apply(variables, tokens)                          # (..., 512) bfloat16
      logits = embed.apply(variables, x, method=embed.attend)    # tied output layer

  Attributes:
    num_embeddings: number of rows (vocabulary size).
    features: size of each embedding vector.
    dtype: the output dtype (default: ``param_dtype``).
    param_dtype: dtype of the table, scale and bias (default float32).
    embedding_init: the table's initializer (default Xavier uniform).
    scale_init: the LayerNorm scale's initializer (default ones).
    bias_init: the LayerNorm bias's initializer (default zeros).
    epsilon: added to the variance (default 1e-6, as ``nn.LayerNorm``).
  """

  num_embeddings: int
  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  embedding_init: Callable = stable_embed.default_embed_init()
  scale_init: Callable = jax.nn.initializers.ones
  bias_init: Callable = jax.nn.initializers.zeros
  epsilon: float = stable_embed.EPSILON

  def setup(self):
    self.stable_embedding = self.param(STABLE_EMBEDDING, self.embedding_init, (self.num_embeddings, self.features),
                                       self.param_dtype)
    self.scale = self.param("scale", self.scale_init, (self.features,), self.param_dtype)
    self.bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Embeds integer ``inputs``: shape ``inputs.shape + (features,)``, dtype ``dtype``."""
    return stable_embed.embed(self.stable_embedding, self.scale, self.bias, inputs, self.epsilon,
                              self.dtype or self.param_dtype)

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ table.T`` (last axis ``num_embeddings``), for an output layer tied to the table."""
    return stable_embed.attend(self.stable_embedding, query, self.dtype)
