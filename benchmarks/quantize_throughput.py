"""Block-wise quantize and dequantize throughput of each backend.

Prints, for every available device platform, GB/s and ns per element of
quantize (reads float32, writes uint8 codes and float32 absmax) and
dequantize (the reverse), for the native FFI handler and the pure-JAX path,
next to two plain-jnp baselines moving the same bytes in the same run: a
per-tensor int8 round trip (``round(x / s)`` and ``codes * s``) and a copy
(``x + 1``). Where torch and bitsandbytes are installed, their
``quantize_blockwise`` / ``dequantize_blockwise`` run on the same data.

    python benchmarks/quantize_throughput.py [--elements 16777216] [--block-size 256] [--platforms cpu,cuda]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import optax8
from optax8 import maps
from optax8.kernels import jax_backend, native


def bench(fn, *args, repeats: int) -> float:
  """Median seconds of one call of the jitted fn."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bitsandbytes_times(x: np.ndarray, block: int, repeats: int, device: str):
  """(quantize, dequantize) seconds of bitsandbytes on ``device``, or None."""
  try:
    import bitsandbytes.functional as bnbf
    import torch
  except ImportError:
    return None
  t = torch.from_numpy(np.array(x)).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def timed(fn):
    fn()
    sync()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      sync()
      times.append(time.perf_counter() - start)
    return float(np.median(times))

  codes, state = bnbf.quantize_blockwise(t, blocksize=block)
  return (timed(lambda: bnbf.quantize_blockwise(t, blocksize=block)),
          timed(lambda: bnbf.dequantize_blockwise(codes, state)))


def candidates(block: int, platform_name: str):
  kind, map_id = maps.SIGNED, 0
  out = {}
  if native.available(platform_name):
    out["native"] = (jax.jit(lambda x: native.quantize(x, block, map_id)),
                     jax.jit(lambda c, a: native.dequantize(c, a, block, map_id, jnp.float32)))
  out["jax"] = (jax.jit(lambda x: jax_backend.quantize(x, block, kind)),
                jax.jit(lambda c, a: jax_backend.dequantize(c, a, block, kind, jnp.float32)))
  out["jnp int8 (per tensor)"] = (
      jax.jit(lambda x: (jnp.round(x * (127 / jnp.max(jnp.abs(x)))).astype(jnp.int8), jnp.max(jnp.abs(x)))),
      jax.jit(lambda c, a: c.astype(jnp.float32) * (a / 127)))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--elements", type=int, default=1 << 24)
  parser.add_argument("--block-size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--platforms", default="cpu,cuda", help="comma list of the platforms to measure (where present)")
  args = parser.parse_args()
  n, block = args.elements, args.block_size
  cols = 4096
  shape = (n // cols, cols)
  n = shape[0] * shape[1]
  print(f"optax8 {optax8.__version__}, jax {jax.__version__}, {platform.machine()}, "
        f"{datetime.date.today().isoformat()}; {n} elements, block {block}")
  platforms = []
  for plat in args.platforms.split(","):
    try:
      jax.devices(plat)
      platforms.append(plat)
    except RuntimeError:
      pass
  for plat in platforms:
    device = jax.devices(plat)[0]
    x = jax.device_put(np.random.default_rng(0).standard_normal(shape).astype(np.float32), device)
    copy = bench(jax.jit(lambda x: x + 1), x, repeats=args.repeats)
    bytes_q = n * 4 + n + 4 * n // block
    print(f"\n[{plat}: {device.device_kind}]  copy: {2 * n * 4 / copy / 1e9:.1f} GB/s ({copy / n * 1e9:.3f} ns/elem)")
    print(f"{'backend':24s} {'quantize GB/s':>14s} {'ns/elem':>8s} {'dequant GB/s':>13s} {'ns/elem':>8s} "
          f"{'q+dq vs jnp int8':>17s}")
    rows = {}
    for name, (q, dq) in candidates(block, plat).items():
      codes, absmax = q(x)
      tq = bench(q, x, repeats=args.repeats)
      tdq = bench(dq, codes, absmax, repeats=args.repeats)
      rows[name] = (tq, tdq)
    bnb = bitsandbytes_times(np.asarray(x), block, args.repeats, plat)
    if bnb is not None:
      rows["bitsandbytes"] = bnb
    base = sum(rows["jnp int8 (per tensor)"])
    for name, (tq, tdq) in rows.items():
      print(f"{name:24s} {bytes_q / tq / 1e9:14.2f} {tq / n * 1e9:8.3f} {bytes_q / tdq / 1e9:13.2f} "
            f"{tdq / n * 1e9:8.3f} {base / (tq + tdq):16.2f}x")


if __name__ == "__main__":
  main()
