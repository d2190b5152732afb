"""optax8 quickstart: block-wise 8-bit quantization of optimizer-like state.

Quantizes a first moment (signed map) and a second moment (unsigned map) of
a 4M-parameter tensor, reports memory and round-trip error, and checks the
error bound of block-wise dynamic quantization.

    python examples/quickstart.py
"""

import json

import jax
import jax.numpy as jnp

import optax8


def main():
  print("optax8", optax8.__version__, "backends:", optax8.backends())
  key_m, key_g = jax.random.split(jax.random.key(0))
  shape = (2048, 2048)
  # Adam-like moments after some steps: m ~ N(0, 1e-3), v ~ g^2 with heavy tails.
  m = 1e-3 * jax.random.normal(key_m, shape)
  v = (1e-2 * jax.random.t(key_g, 3.0, shape)) ** 2

  quantize = jax.jit(optax8.quantize, static_argnames=("block_size", "kind"))
  qm = quantize(m, block_size=256, kind=optax8.SIGNED)
  qv = quantize(v, block_size=256, kind=optax8.UNSIGNED)
  m2, v2 = optax8.dequantize(qm), optax8.dequantize(qv)

  f32_bytes = 2 * m.size * 4
  q_bytes = qm.nbytes + qv.nbytes
  rel_m = float(jnp.linalg.norm(m2 - m) / jnp.linalg.norm(m))
  rel_v = float(jnp.linalg.norm(v2 - v) / jnp.linalg.norm(v))
  print(f"state: float32 {f32_bytes / 2**20:.1f} MiB -> 8-bit {q_bytes / 2**20:.1f} MiB "
        f"({q_bytes / m.size:.4f} bytes per parameter, {1 - q_bytes / f32_bytes:.1%} saved)")
  print(f"relative round-trip error: m {rel_m:.4f}, v {rel_v:.4f}")
  assert rel_m < 0.02 and rel_v < 0.02
  print("RESULT " + json.dumps({"state_bytes_32bit": f32_bytes, "state_bytes_8bit": q_bytes,
                                "rel_error_m": rel_m, "rel_error_v": rel_v, "backends": optax8.backends()}))


if __name__ == "__main__":
  main()
