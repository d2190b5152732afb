"""Quantization error of the block layouts on real Adam moments: 16 x 16 tiles against runs of 256, and bitsandbytes.

Trains a small language model (embedding 4096 x 256, two 256 x 1024 / 1024 x 256
MLP layers, an output projection 256 x 4096) with float32 ``optax.adam`` on a
synthetic next-token task (Zipf-distributed tokens, each followed by a fixed
successor 80% of the time), then quantizes its first and second moments
with each layout at block_size 256 and prints the round-trip error against
the float32 moments:

- ``bnb``: bitsandbytes' rule, runs of 256 over the flattened tensor with a positive absmax and no positive
  floor (numpy);
- ``flat``: runs of 256 over the flattened tensor (bitsandbytes' layout) with optax8's rules;
- ``rows``: runs of 256 along the last axis;
- ``tiles``: 16 x 16 tiles over the last two axes (optax8's layout of matrices).

The error is ``||x - q(x)|| / ||x||`` per tensor, and for the second moment also
``||(sqrt(v) - sqrt(q(v))) / (sqrt(v) + eps)||_mean``, the relative error of
Adam's denominator.

    python benchmarks/layout_error.py [--steps 200]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax8 import maps
from optax8.kernels import jax_backend

VOCAB, WIDTH, HIDDEN, SEQ, BATCH = 4096, 256, 1024, 32, 32


def init(key):
  k = jax.random.split(key, 4)
  return {"embed": jax.random.normal(k[0], (VOCAB, WIDTH)) * 0.02,
          "up": jax.random.normal(k[1], (WIDTH, HIDDEN)) / WIDTH**0.5,
          "down": jax.random.normal(k[2], (HIDDEN, WIDTH)) / HIDDEN**0.5,
          "out": jax.random.normal(k[3], (WIDTH, VOCAB)) / WIDTH**0.5}


def loss_fn(params, tokens):
  x = params["embed"][tokens[:, :-1]]
  x = x + jax.nn.gelu(x @ params["up"]) @ params["down"]
  logits = x @ params["out"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


NEXT = jax.random.permutation(jax.random.key(1), VOCAB)   # the successor of each token, most of the time


def batch(key):
  # Zipf-distributed tokens (rare rows of the embedding get rare updates), each followed by its successor
  # with probability 0.8, else by a fresh Zipf draw.
  k1, k2 = jax.random.split(key)
  fresh = jax.random.categorical(k1, -1.1 * jnp.log(jnp.arange(1, VOCAB + 1.0)), shape=(SEQ, BATCH))
  follow = jax.random.bernoulli(k2, 0.8, (SEQ, BATCH))

  def next_token(tok, xs):
    f, keep = xs
    tok = jnp.where(keep, NEXT[tok], f)
    return tok, tok

  _, toks = jax.lax.scan(next_token, fresh[0], (fresh, follow))
  return toks.T


def moments(steps: int):
  tx = optax.adam(3e-3)
  params = init(jax.random.key(0))
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch(key))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  for i in range(steps):
    params, state, loss = step(params, state, jax.random.key(i + 1))
  return state[0].mu, state[0].nu, float(loss)


def bnb_round_trip(x, kind: str):
  """bitsandbytes' blockwise rule: runs of 256 of the flattened tensor, absmax = max |x|, the nearest map value."""
  flat = np.asarray(x, np.float32).reshape(-1)
  blocks = np.pad(flat, (0, -flat.size % 256)).reshape(-1, 256)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    codes = maps.nearest_code(np.where(absmax > 0, blocks / absmax, 0).astype(np.float32), kind)
  return (maps.dynamic_map(kind)[codes] * absmax).reshape(-1)[:flat.size].reshape(x.shape)


def round_trip(x, kind: str, layout: str):
  if layout == "bnb":
    return bnb_round_trip(x, kind)
  if layout == "flat":
    flat = x.reshape(-1)
    c, a = jax_backend.quantize(flat, 256, kind, 1)
    return jax_backend.dequantize(c, a, 256, kind, jnp.float32, 1).reshape(x.shape)
  rows = 16 if layout == "tiles" else 1
  c, a = jax_backend.quantize(x, 256, kind, rows)
  return jax_backend.dequantize(c, a, 256, kind, jnp.float32, rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  mu, nu, loss = moments(args.steps)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; {args.steps} Adam steps, loss {loss:.3f}")
  layouts = ("bnb", "flat", "rows", "tiles")
  print("| moment | leaf | shape | " + " | ".join(f"{name} error" for name in layouts) + " | tiles / bnb |")
  print("|---|---|---|" + "---:|" * (len(layouts) + 1))
  totals = {("m", l): [] for l in layouts} | {("v", l): [] for l in layouts} | {("den", l): [] for l in layouts}
  for name in mu:
    for moment, tree, kind in (("m", mu, maps.SIGNED), ("v", nu, maps.UNSIGNED)):
      x = np.asarray(tree[name], np.float64)
      errs = []
      for layout in layouts:
        q = np.asarray(round_trip(tree[name], kind, layout), np.float64)
        err = np.linalg.norm(x - q) / np.linalg.norm(x)
        errs.append(err)
        totals[(moment, layout)].append(err)
        if moment == "v":
          den = np.mean(np.abs(np.sqrt(x) - np.sqrt(q)) / (np.sqrt(x) + 1e-8))
          totals[("den", layout)].append(den)
      print(f"| {moment} | {name} | {tuple(x.shape)} | " + " | ".join(f"{e:.5f}" for e in errs)
            + f" | {errs[3] / errs[0]:.3f} |")
  print()
  print("| mean over leaves | " + " | ".join(layouts) + " | tiles / bnb |")
  print("|---|" + "---:|" * (len(layouts) + 1))
  for key, label in (("m", "first moment: relative L2 error"), ("v", "second moment: relative L2 error"),
                     ("den", "Adam denominator sqrt(v) + eps: mean relative error")):
    means = [float(np.mean(totals[(key, l)])) for l in layouts]
    print(f"| {label} | " + " | ".join(f"{m:.5f}" for m in means) + f" | {means[3] / means[0]:.3f} |")


if __name__ == "__main__":
  main()
