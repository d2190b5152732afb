"""Host offload of optimizer state: the JAX form of paged optimizers.

``offload(tx)`` keeps the state of any GradientTransformation (optax8's or
optax's) in host memory between steps::

    init:    state = host(tx.init(params))
    update:  u, s = tx.update(g, device(state), params);  return u, host(s)

``host`` and ``device`` change only where each state leaf lives, never its
value or sharding, so the results are bit for bit those of ``tx``. On a
concrete array the target is the leaf's own sharding with another memory
kind (``x.sharding.with_memory_kind(...)``); under ``jax.jit`` a traced leaf
has no concrete sharding, so it moves by memory space
(``jax.device_put(x, jax.memory.Space.Host)``) and keeps the sharding the
partitioner gives it. Inside a jitted train step the transfers are part of
the compiled program: XLA copies the state in before the update and out
after it, and device memory holds the state only during the step.

Example (the state of a donated step stays on the host)::

    tx = optax8.offload(optax8.adamw8bit(1e-3))
    state = tx.init(params)                                   # pinned_host
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    @functools.partial(jax.jit, donate_argnums=(0, 1),
                       out_shardings=(param_shardings, state_shardings))
    def step(params, state, batch):
      grads = jax.grad(loss)(params, batch)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
"""

from __future__ import annotations

import functools

import jax
import optax

from optax8.apply import around_state
from optax8.sharding import on_the_params_mesh

HOST_MEMORY_KIND = "pinned_host"
_SPACES = {HOST_MEMORY_KIND: jax.memory.Space.Host}


@functools.cache
def _jitted_put(sharding):
  # A jitted transfer, where an eager one is refused: jaxlib 0.12.1 on CPU refuses to device_put an array
  # that a jitted function left in pinned_host ("Unsupported layout used for PjRt CPU buffers: {0:S(5)}").
  return jax.jit(lambda a: jax.device_put(a, sharding), out_shardings=sharding)


def _move(x, memory_kind: str | None, space):
  """``x`` in ``memory_kind`` (``None``: its devices' default memory), with its own sharding."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = x.sharding
    kind = memory_kind or next(iter(sharding.device_set)).default_memory().kind
    if sharding.memory_kind == kind:
      return x
    try:
      return jax.device_put(x, sharding.with_memory_kind(kind))
    except jax.errors.JaxRuntimeError as e:
      if "Unsupported layout" not in str(e):
        raise
      return _jitted_put(sharding.with_memory_kind(kind))(x)
  return jax.device_put(x, space)


def to_host(tree, memory_kind: str = HOST_MEMORY_KIND):
  """Every array leaf of ``tree`` in host memory (``memory_kind``), shardings kept; works under jit."""
  space = _SPACES[_check_memory_kind(memory_kind)]
  return jax.tree.map(lambda x: _move(x, memory_kind, space), tree)


def to_device(tree):
  """Every array leaf of ``tree`` in its devices' default memory, shardings kept; works under jit."""
  return jax.tree.map(lambda x: _move(x, None, jax.memory.Space.Device), tree)


def _check_memory_kind(memory_kind: str) -> str:
  if memory_kind not in _SPACES:
    raise ValueError(f"offload: memory_kind must be one of {sorted(_SPACES)}, got {memory_kind!r} (inside jit, "
                     "XLA moves arrays only between device memory and pinned host memory)")
  return memory_kind


def offload(tx: optax.GradientTransformation, memory_kind: str = HOST_MEMORY_KIND) -> optax.GradientTransformation:
  """``tx`` with its state in host memory between steps.

  Args:
    tx: any GradientTransformation. Extra keyword arguments of ``update``
      reach ``tx`` if it takes them.
    memory_kind: where the state lives between steps; ``'pinned_host'``
      (page-locked host memory, the kind XLA transfers to and from inside
      a jitted computation).

  Returns:
    A transformation with ``tx``'s state and results: ``init`` returns the
    state in ``memory_kind``; ``update`` moves it to the device, runs
    ``tx.update`` and returns the new state in ``memory_kind``. If ``tx``
    has a fused apply (`optax8.fused_apply`), so has the result
    ([`optax8.apply_gradients`][optax8.apply.apply_gradients] keeps writing the parameters in the
    kernel).
  """
  memory_kind = _check_memory_kind(memory_kind)

  def init_fn(params):
    return to_host(on_the_params_mesh(tx.init(params), params), memory_kind)

  # update, apply_gradients and the parts that let a following optax8.param_rounding round in tx's kernels
  return around_state(tx, init_fn, lambda updates, state, params: to_device(state),
                      lambda state: to_host(state, memory_kind))
