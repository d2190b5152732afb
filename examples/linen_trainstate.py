"""A Flax linen ``TrainState`` loop with optax8, checkpointed with orbax and resumed.

A linen MLP learns a fixed random teacher network (regression, synthetic
batches drawn from ``jax.random.fold_in(key, step)``, so any step's batch is
reproducible). ``TrainState.create(..., tx=optax8.adamw8bit(...))`` holds the
8-bit optimizer state (``QuantizedArray`` codes and absmax) next to the params.

The script trains ``--steps`` steps without stopping; then trains again from the
same start, saves the whole ``TrainState`` with orbax halfway, drops it,
restores it onto an abstract target (``jax.eval_shape``) and trains the rest.
The resumed run ends bit for bit where the uninterrupted one does. It ends with
one line ``RESULT {json}``.

    python examples/linen_trainstate.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

import optax8

IN, HIDDEN, OUT, BATCH = 64, 256, 16, 128


class MLP(nn.Module):
  hidden: int = HIDDEN
  out: int = OUT

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden)(x))
    x = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.out)(x)


@partial(jax.jit, static_argnums=1)
def create_state(key, steps: int) -> train_state.TrainState:
  """The initial TrainState (one compiled function: the model's and the optimizer's init)."""
  model = MLP()
  params = model.init(key, jnp.zeros((1, IN)))["params"]
  tx = optax8.adamw8bit(optax.cosine_decay_schedule(3e-3, steps), weight_decay=0.01)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def batch(step):
  """Inputs and the teacher's targets for ``step``: the same batch whenever the step is replayed."""
  kx, kt = jax.random.split(jax.random.fold_in(jax.random.key(1), step))
  x = jax.random.normal(kx, (BATCH, IN))
  teacher = MLP(hidden=64).init(jax.random.key(2), x)  # fixed weights: the key does not depend on step
  return x, MLP(hidden=64).apply(teacher, x) + 0.01 * jax.random.normal(kt, (BATCH, OUT))


@jax.jit
def loss_at(state: train_state.TrainState, step):
  x, y = batch(step)
  return jnp.mean((state.apply_fn({"params": state.params}, x) - y) ** 2)


@partial(jax.jit, donate_argnums=0)
def train_step(state: train_state.TrainState) -> tuple[train_state.TrainState, jax.Array]:
  loss, grads = jax.value_and_grad(lambda p: loss_at(state.replace(params=p), state.step))(state.params)
  return state.apply_gradients(grads=grads), loss


def train(state, until: int):
  loss = None
  while int(state.step) < until:
    state, loss = train_step(state)
  return state, float(loss)


def state_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--checkpoint-dir", default=None, help="where orbax writes (default: a temporary directory)")
  args = ap.parse_args()
  if args.steps < 2:
    ap.error("--steps must be at least 2")
  half = args.steps // 2
  key = jax.random.key(0)

  # Uninterrupted.
  full, loss_full = train(create_state(key, args.steps), args.steps)
  initial_loss = float(loss_at(create_state(key, args.steps), 0))
  print(f"uninterrupted: loss {initial_loss:.4f} -> {loss_full:.4f} after {args.steps} steps")

  # Interrupted at `half`: save, forget, restore onto an abstract target, continue.
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(args.checkpoint_dir or tmp).absolute() / f"step_{half}"
    state, _ = train(create_state(key, args.steps), half)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state, force=True)
    checkpointer.wait_until_finished()
    del state
    abstract = jax.eval_shape(lambda: create_state(key, args.steps))  # apply_fn and tx come from here
    restored = checkpointer.restore(path, abstract)
    checkpointer.close()
  print(f"restored the TrainState at step {int(restored.step)} from {path}")
  resumed, loss_resumed = train(restored, args.steps)
  print(f"resumed: loss {loss_resumed:.4f} after {args.steps} steps")

  quantized = [x for x in jax.tree.leaves(resumed.opt_state, is_leaf=lambda x: isinstance(x, optax8.QuantizedArray))
               if isinstance(x, optax8.QuantizedArray)]
  identical = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), (full.params, full.opt_state),
                                        (resumed.params, resumed.opt_state)))
  bytes32 = state_bytes(jax.eval_shape(optax.adamw(1e-3).init, full.params))
  print(f"identical params and optimizer state: {identical}; 8-bit state leaves: {len(quantized)}; "
        f"state {state_bytes(full.opt_state):,} bytes (optax.adamw: {bytes32:,})")
  print("RESULT " + json.dumps({
      "steps": args.steps, "checkpoint_step": half, "initial_loss": initial_loss, "loss_uninterrupted": loss_full,
      "loss_resumed": loss_resumed, "identical": identical, "quantized_leaves": len(quantized),
      "state_bytes_8bit": state_bytes(full.opt_state), "state_bytes_32bit": bytes32}))


if __name__ == "__main__":
  main()
