"""Optimizer-state memory of real model shapes: optax against optax8, computed abstractly.

The parameters of Llama-style decoders (token embedding, per layer RMSNorm
scales, attention q/k/v/o, SwiGLU MLP, final norm, untied output head) are
``jax.ShapeDtypeStruct``s; each optimizer's state comes from
``jax.eval_shape(tx.init, params)``, so nothing is allocated and a 70B model
takes a second. Bytes are the state's ``size * itemsize`` summed over leaves
(float32 params; leaves under 4096 elements, the norm scales, keep float32
state in optax8).

    python benchmarks/model_memory.py
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import jax
import jax.numpy as jnp
from memory import PAIRS  # the nine (optax, optax8) pairs

GiB = 2**30


class Decoder(NamedTuple):
  name: str
  vocab: int
  d: int
  layers: int
  heads: int
  kv_heads: int
  ffn: int


MODELS = {
    "125m": Decoder("Llama-style 125M", 32000, 768, 12, 12, 12, 2048),
    "1.3b": Decoder("Llama-style 1.3B", 32000, 2048, 24, 16, 16, 5504),
    "7b": Decoder("Llama-2 7B", 32000, 4096, 32, 32, 32, 11008),
    "70b": Decoder("Llama-2 70B", 32000, 8192, 80, 64, 8, 28672),
}


def decoder_params(m: Decoder, dtype=jnp.float32) -> dict:
  """The parameter shapes of decoder ``m``, one leaf per weight as in a per-layer (unstacked) model."""
  def s(*shape):
    return jax.ShapeDtypeStruct(shape, dtype)

  kv = m.kv_heads * (m.d // m.heads)
  layer = {"attention_norm": s(m.d), "wq": s(m.d, m.d), "wk": s(m.d, kv), "wv": s(m.d, kv), "wo": s(m.d, m.d),
           "mlp_norm": s(m.d), "w_gate": s(m.d, m.ffn), "w_up": s(m.d, m.ffn), "w_down": s(m.ffn, m.d)}
  return {"embed": s(m.vocab, m.d), "layers": [dict(layer) for _ in range(m.layers)], "norm": s(m.d),
          "lm_head": s(m.d, m.vocab)}


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="125m,1.3b,7b,70b", help=f"comma-separated, of {', '.join(MODELS)}")
  args = ap.parse_args()
  models = [MODELS[k] for k in args.models.split(",")]
  params = [decoder_params(m) for m in models]
  counts = [sum(x.size for x in jax.tree.leaves(p)) for p in params]
  print(f"# jax {jax.__version__}; optimizer state in GiB, optax / optax8 (ratio); float32 params")
  print("| optimizer | " + " | ".join(f"{m.name} ({n / 1e9:.2f}B params)" for m, n in zip(models, counts)) + " |")
  print("| --- |" + " ---: |" * len(models))
  for name, (ref, ours) in PAIRS.items():
    cells = []
    for p in params:
      a, b = nbytes(jax.eval_shape(ref.init, p)), nbytes(jax.eval_shape(ours.init, p))
      cells.append(f"{a / GiB:.2f} / {b / GiB:.2f} ({b / a:.3f})")
    print(f"| {name} | " + " | ".join(cells) + " |")
  print("| params (float32) | " + " | ".join(f"{nbytes(p) / GiB:.2f}" for p in params) + " |")


if __name__ == "__main__":
  main()
