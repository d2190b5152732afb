"""The translations of docs/migrating_from_bitsandbytes.md against bitsandbytes itself.

Runs each bitsandbytes optimizer (torch, on the CPU) and its optax8
translation for 20 steps on the same float32 params and gradients (a
vector of 4096, a 64 x 64 matrix, a vector of 300: 32-bit state at the
default ``min_8bit_size``) and prints, per pair, the distance between the
final params relative to the params' change under bitsandbytes. At 32
bits a translation should be within float32 rounding (about 1e-6); at 8
bits each library is about 2e-2 from its own 32-bit run, so the two differ
by about that. Needs torch and bitsandbytes next to JAX:

    pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install bitsandbytes
    python benchmarks/bnb_translations.py
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax8

STEPS = 20
SHAPES = {"vector": (4096,), "matrix": (64, 64), "small": (300,)}
B32, B8 = dict(bits=32), dict(min_8bit_size=0)

# (bitsandbytes optimizer and arguments, optax8 translation): the table of docs/migrating_from_bitsandbytes.md
PAIRS = [
    ("Adam32bit", dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8), lambda: optax8.adam8bit(1e-2, 0.9, 0.95, 1e-8, **B32)),
    ("Adam32bit", dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
     lambda: optax8.adamw8bit(1e-2, 0.9, 0.95, weight_decay=0.1, **B32)),
    ("AdamW32bit", dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
     lambda: optax8.adamw8bit(1e-2, 0.9, 0.95, weight_decay=0.1, **B32)),
    ("Lion32bit", dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
     lambda: optax8.lion8bit(1e-3, 0.9, 0.99, weight_decay=0.1, **B32)),
    ("SGD32bit", dict(lr=1e-1, momentum=0.9, weight_decay=0.01),
     lambda: optax8.sgd8bit(1e-1, momentum=0.9, weight_decay=0.01, **B32)),
    ("SGD32bit", dict(lr=1e-1, momentum=0.9, nesterov=True), lambda: optax8.sgd8bit(1e-1, momentum=0.9, **B32)),
    ("RMSprop32bit", dict(lr=1e-3, alpha=0.99, eps=1e-8),
     lambda: optax8.rmsprop8bit(1e-3, decay=0.99, eps=1e-8, eps_in_sqrt=False, **B32)),
    ("Adagrad32bit", dict(lr=1e-2, eps=1e-10),
     lambda: optax8.adagrad8bit(1e-2, initial_accumulator_value=0.0, eps=1e-10, **B32)),
    ("LARS32bit", dict(lr=1e-1, momentum=0.9), lambda: optax8.sgd8bit(1e-1, momentum=0.9, max_unorm=0.02, **B32)),
    ("Adam8bit", dict(lr=1e-2, betas=(0.9, 0.95), min_8bit_size=0), lambda: optax8.adam8bit(1e-2, 0.9, 0.95, **B8)),
    ("Adam8bit", dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, min_8bit_size=0),
     lambda: optax8.adamw8bit(1e-2, 0.9, 0.95, weight_decay=0.1, **B8)),
    ("AdamW8bit", dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, min_8bit_size=0),
     lambda: optax8.adamw8bit(1e-2, 0.9, 0.95, weight_decay=0.1, **B8)),
    ("Lion8bit", dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, min_8bit_size=0),
     lambda: optax8.lion8bit(1e-3, 0.9, 0.99, weight_decay=0.1, **B8)),
    ("SGD8bit", dict(lr=1e-1, momentum=0.9, weight_decay=0.01, min_8bit_size=0),
     lambda: optax8.sgd8bit(1e-1, momentum=0.9, weight_decay=0.01, **B8)),
    ("RMSprop8bit", dict(lr=1e-3, alpha=0.99, min_8bit_size=0),
     lambda: optax8.rmsprop8bit(1e-3, decay=0.99, eps=1e-8, eps_in_sqrt=False, **B8)),
    ("Adagrad8bit", dict(lr=1e-2, min_8bit_size=0),
     lambda: optax8.adagrad8bit(1e-2, initial_accumulator_value=0.0, eps=1e-10, **B8)),
    ("LAMB8bit", dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, min_8bit_size=0),
     lambda: optax8.adamw8bit(1e-2, 0.9, 0.999, weight_decay=0.01, **B8)),
    ("LARS8bit", dict(lr=1e-1, momentum=0.9, min_8bit_size=0), lambda: optax8.sgd8bit(1e-1, momentum=0.9, **B8)),
    ("AdEMAMix8bit", dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=5.0, weight_decay=0.0, min_8bit_size=0),
     lambda: optax8.ademamix8bit(1e-2, 0.9, 0.999, 0.9999, alpha=5.0, **B8)),
]


def data(seed=0):
  rng = np.random.default_rng(seed)
  p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: (rng.standard_normal(s) * (0.1 + rng.random(s)) * 0.1).astype(np.float32) for k, s in SHAPES.items()}
           for _ in range(STEPS)]
  return p0, grads


def run_bnb(name: str, kwargs: dict, p0, grads):
  import bitsandbytes as bnb
  import torch
  params = {k: torch.nn.Parameter(torch.tensor(v.copy())) for k, v in p0.items()}
  opt = getattr(bnb.optim, name)(list(params.values()), **kwargs)
  for g in grads:
    for k, p in params.items():
      p.grad = torch.tensor(g[k])
    opt.step()
  return {k: p.detach().numpy().copy() for k, p in params.items()}


def run_optax8(tx, p0, grads):
  params = jax.tree.map(jnp.asarray, p0)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for g in grads:
    params, state = step(jax.tree.map(jnp.asarray, g), state, params)
  return jax.tree.map(np.asarray, params)


def main():
  try:
    import bitsandbytes as bnb
    import torch
  except ImportError:
    print("torch and bitsandbytes are not installed: nothing to compare (see the docstring)")
    return
  warnings.filterwarnings("ignore")
  torch.set_num_threads(1)
  p0, grads = data()
  print(f"# bitsandbytes {bnb.__version__}, torch {torch.__version__}, jax {jax.__version__}; {STEPS} steps; "
        "|optax8 - bnb| / |bnb's change of the params| per leaf")
  rows = []
  for name, kwargs, make in PAIRS:
    ours = run_optax8(make(), p0, grads)
    ref = run_bnb(name, kwargs, p0, grads)
    err = {k: float(np.linalg.norm(ours[k] - ref[k]) / np.linalg.norm(ref[k] - p0[k])) for k in SHAPES}
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    rows.append(dict(bnb=f"{name}({args})", errors=err))
    print(f"{name}({args}): " + "  ".join(f"{k} {v:.1e}" for k, v in err.items()), flush=True)
  print("JSON " + json.dumps(rows))


if __name__ == "__main__":
  main()
