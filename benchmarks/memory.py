"""Optimizer-state bytes and train-step temporaries: optax8 against optax.

State bytes per parameter come from ``jax.eval_shape`` of ``init`` on a
1024 x 1024 leaf. Temporaries are XLA's ``temp_size_in_bytes`` of a jitted,
donated train step that computes the gradients of an MLP with ``jax.grad``
(``--layers`` layers of ``--width``) and applies the optimizer: for optax8
with ``tx.update`` + ``optax.apply_updates`` and with
``optax8.apply_gradients``.

    python benchmarks/memory.py
    python benchmarks/memory.py --layers 4
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from optax import contrib

import optax8

PAIRS = {
    "adamw": (optax.adamw(1e-3), optax8.adamw8bit(1e-3)),
    "adam": (optax.adam(1e-3), optax8.adam8bit(1e-3)),
    "lion": (optax.lion(1e-4), optax8.lion8bit(1e-4)),
    "sgd": (optax.sgd(1e-2, momentum=0.9), optax8.sgd8bit(1e-2, momentum=0.9)),
    "rmsprop": (optax.rmsprop(1e-3), optax8.rmsprop8bit(1e-3)),
    "adagrad": (optax.adagrad(1e-2), optax8.adagrad8bit(1e-2)),
    "lamb": (optax.lamb(1e-3), optax8.lamb8bit(1e-3)),
    "lars": (optax.lars(1e-2), optax8.lars8bit(1e-2)),
    "ademamix": (contrib.ademamix(1e-3), optax8.ademamix8bit(1e-3)),
    "muon": (contrib.muon(2e-2), optax8.muon8bit(2e-2)),
}


def state_bytes(tx, params) -> float:
  state = jax.eval_shape(tx.init, params)
  n = sum(p.size for p in jax.tree.leaves(params))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / n


def _mlp(params, x):
  for i in range(len(params) // 2):
    x = jax.nn.relu(x @ params[f"w{i}"] + params[f"b{i}"])
  return jnp.mean(x**2)


def temporaries(tx, width: int, layers: int, fused_apply: bool = False) -> float:
  params = {}
  for i in range(layers):
    params[f"w{i}"] = jax.ShapeDtypeStruct((width, width), jnp.float32)
    params[f"b{i}"] = jax.ShapeDtypeStruct((width,), jnp.float32)
  x = jax.ShapeDtypeStruct((8, width), jnp.float32)

  def step(params, state, x):
    grads = jax.grad(_mlp)(params, x)
    if fused_apply:
      return optax8.apply_gradients(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes / sum(p.size for p in jax.tree.leaves(params))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=8)
  args = ap.parse_args()
  params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
  print(f"# jax {jax.__version__}, backend {optax8.backends()['cpu']} on cpu; {args.layers}-layer MLP width "
        f"{args.width}")
  print("| optimizer | optax state B/param | optax8 state B/param | ratio | optax temp B/param "
        "| optax8 temp B/param, update | optax8 temp B/param, apply_gradients |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, (ref, ours) in PAIRS.items():
    s_ref, s_ours = state_bytes(ref, params), state_bytes(ours, params)
    t_ref, t_ours = temporaries(ref, args.width, args.layers), temporaries(ours, args.width, args.layers)
    t_apply = temporaries(ours, args.width, args.layers, fused_apply=True)
    print(f"| {name} | {s_ref:.3f} | {s_ours:.3f} | {s_ours / s_ref:.3f} | {t_ref:.3f} | {t_ours:.3f} "
          f"| {t_apply:.3f} |")


if __name__ == "__main__":
  main()
