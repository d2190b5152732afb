"""StableEmbed's computation, shared by `optax8.linen` and `optax8.nnx`.

bitsandbytes' ``StableEmbedding`` (Dettmers et al., 2022): an embedding
table ``T`` of shape ``(num_embeddings, features)`` with Xavier-uniform
init, whose lookup is followed by a LayerNorm computed in float32 and cast
to the layer's dtype::

    e = float32(T[i]),  y = (e - mean(e)) / sqrt(var(e) + epsilon) * scale + bias

with mean and (biased) variance over the features. The table is the
parameter named ``stable_embedding``
(`optax8.options.STABLE_EMBEDDING`), which every optax8 optimizer
keeps in 32-bit state unless ``bits`` is a pytree or callable (see
`optax8.options`). This module needs only JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPSILON = 1e-6  # flax's LayerNorm default


def default_embed_init():
  """Xavier-uniform (Glorot) init: ``U(-b, b)``, ``b = sqrt(6 / (num_embeddings + features))``."""
  return jax.nn.initializers.xavier_uniform()


def embed(table, scale, bias, inputs, epsilon: float = EPSILON, dtype=None) -> jax.Array:
  """The lookup ``table[inputs]``, LayerNorm in float32, cast to ``dtype`` (default: the table's).

  The output has shape ``inputs.shape + (features,)``. An index outside
  ``[0, num_embeddings)`` gives NaN, as Flax's ``Embed``.
  """
  inputs = jnp.asarray(inputs)
  if not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError(f"StableEmbed: inputs must have an integer dtype, got {inputs.dtype}")
  e = jnp.take(table, inputs, axis=0).astype(jnp.float32)
  mean = jnp.mean(e, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(e - mean), axis=-1, keepdims=True)
  y = (e - mean) * jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(table.dtype if dtype is None else dtype)


def attend(table, query, dtype=None) -> jax.Array:
  """``query @ table.T`` in ``dtype`` (default: both promoted), for logits tied to the table.

  As Flax's ``Embed.attend``, this uses the raw table, without the LayerNorm.
  """
  query = jnp.asarray(query)
  if query.shape[-1:] != table.shape[-1:]:
    raise ValueError(f"StableEmbed.attend: query's last axis must have size {table.shape[-1]} (features), "
                     f"got shape {query.shape}")
  dtype = jnp.result_type(query, table) if dtype is None else dtype
  return jnp.dot(query.astype(dtype), table.astype(dtype).T)
