"""Per-leaf state widths: a StableEmbed table in 32 bits by default, a head kept in 32 bits by choice.

A small Flax nnx model (``optax8.nnx.StableEmbed``, a hidden layer, an
output head) learns a fixed token-to-token map with ``optax8.adamw8bit``
through ``nnx.Optimizer``. ``bits`` is a pytree: ``None`` leaves the
embedding at its default (32 bits: the ``stable_embedding`` table), the
hidden layer gets 8 bits and the head 32 bits. The script prints each
leaf's state width and bytes per parameter, trains a few steps and ends
with a ``RESULT {json}`` line.

    python examples/per_leaf_bits.py
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

import optax8
from optax8.quantize import QuantizedArray

VOCAB, FEATURES = 512, 256


class Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = optax8.nnx.StableEmbed(VOCAB, FEATURES, rngs=rngs)
    self.hidden = nnx.Linear(FEATURES, FEATURES, rngs=rngs)
    self.head = nnx.Linear(FEATURES, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    return self.head(nnx.gelu(self.hidden(self.embed(tokens))))


def state_report(opt_state) -> dict:
  """Per parameter leaf: state width (8 or 32), state bytes and bytes per parameter (all moments)."""
  state = nnx.as_pure(opt_state)
  report = {}
  for field in ("mu", "nu"):
    leaves = jax.tree_util.tree_flatten_with_path(getattr(state, field),
                                                  is_leaf=lambda x: isinstance(x, QuantizedArray))[0]
    for path, x in leaves:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      quantized = isinstance(x, QuantizedArray)
      entry = report.setdefault(name, {"bits": 8 if quantized else 32, "params": int(x.size if not quantized
                                                                                      else x.codes.size),
                                       "state_bytes": 0})
      entry["state_bytes"] += x.nbytes if quantized else x.size * x.dtype.itemsize
  for entry in report.values():
    entry["bytes_per_param"] = round(entry["state_bytes"] / entry["params"], 4)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args(argv)

  model = Model(nnx.Rngs(0))
  # None: the default (32 bits for the StableEmbed table); any key path prefix of the params works.
  bits = {"embed": None, "hidden": 8, "head": 32}
  optimizer = nnx.Optimizer(model, optax8.adamw8bit(3e-3, weight_decay=0.01, bits=bits), wrt=nnx.Param)

  report = state_report(optimizer.opt_state)
  print(f"{'leaf':24} {'bits':>4} {'params':>8} {'state bytes':>12} {'bytes/param':>11}")
  for name, e in report.items():
    print(f"{name:24} {e['bits']:>4} {e['params']:>8} {e['state_bytes']:>12} {e['bytes_per_param']:>11.4f}")

  tokens = jax.random.randint(jax.random.key(1), (32, 16), 0, VOCAB)
  targets = (7 * tokens + 3) % VOCAB

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logp = jax.nn.log_softmax(model(tokens).astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = []
  for i in range(args.steps):
    losses.append(float(step(model, optimizer)))
    if i % 10 == 0 or i == args.steps - 1:
      print(f"step {i:3d}  loss {losses[-1]:.4f}")
  assert report == state_report(optimizer.opt_state), "training changed a leaf's state width"
  print("RESULT " + json.dumps({"state": report, "loss_first": losses[0], "loss_last": losses[-1],
                                "steps": args.steps}))


if __name__ == "__main__":
  main()
