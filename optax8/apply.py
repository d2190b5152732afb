"""Apply gradients in one pass: the kernel writes the new parameters.

``optax.apply_updates(params, tx.update(grads, state, params)[0])`` reads
and writes every parameter twice (once for the update, once to add it).
For optax8's fused optimizers, [`apply_gradients`][optax8.apply.apply_gradients] has each 8-bit
leaf's kernel write ``p + update`` over the parameter instead (aliased, so a
donated jitted step updates params, state and nothing else in place)::

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply_step(params, state, grads):
      return optax8.apply_gradients(tx, grads, state, params)

Any other transformation (an ``optax.chain``, optax's own optimizers) falls
back to ``update`` plus ``optax.apply_updates``, with the same results.

It pays most in a step that receives the gradients (``(params, state,
grads)``, for example after gradient accumulation): one read of the
gradient, one read and write of each parameter and state, no temporaries.
Where the gradients are computed in the same jitted step, the backward pass
may still read a parameter after its update is due, and XLA then copies
that parameter first; ``tx.update`` plus ``optax.apply_updates`` avoids the
copy there (its update is aliased to the gradient instead).
"""

from __future__ import annotations

import optax


def apply_gradients(tx, grads, state, params, **extra_args):
  """Returns ``(new_params, new_state)`` for one optimizer step.

  Equals ``updates, state = tx.update(grads, state, params, **extra_args)``
  then ``optax.apply_updates(params, updates)``; for optax8's optimizers
  the sum ``p + update`` is formed in float32 inside the kernel and rounded
  once to the parameter's dtype.
  """
  fn = getattr(tx, "apply_gradients_fn", None)
  if fn is None:
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state
  return fn(grads, state, params)
