"""Flax linen: the `StableEmbed` layer and a `TrainState` that applies fused (needs ``pip install optax8[flax]``)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

try:
  from flax import linen as nn
except ImportError as e:
  raise ImportError("optax8.linen needs flax: pip install 'optax8[flax]'") from e

from flax.training import train_state

from optax8 import stable_embed
from optax8.apply import apply_gradients
from optax8.options import STABLE_EMBEDDING

__all__ = ["StableEmbed", "TrainState"]


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` whose ``apply_gradients`` lets optax8's kernels write the params.

  Made and used as Flax's (``TrainState.create(apply_fn=..., params=...,
  tx=...)``, ``state.apply_gradients(grads=grads)``). ``apply_gradients``
  runs `optax8.apply_gradients`: the fused apply where ``tx`` has one, else
  ``tx.update`` and ``optax.apply_updates``, as Flax's. For float32
  parameters the result is Flax's TrainState's, bit for bit. Gradients under
  ``OVERWRITE_WITH_GRADIENT`` replace their parameters, as in Flax.
  """

  def apply_gradients(self, *, grads, **kwargs):
    overwrite = train_state.OVERWRITE_WITH_GRADIENT in grads
    params = self.params["params"] if overwrite else self.params
    new_params, new_opt_state = apply_gradients(self.tx, grads["params"] if overwrite else grads, self.opt_state,
                                                params)
    if overwrite:
      new_params = {"params": new_params,
                    train_state.OVERWRITE_WITH_GRADIENT: grads[train_state.OVERWRITE_WITH_GRADIENT]}
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs)


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
