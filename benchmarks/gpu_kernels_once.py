"""Every CUDA handler once, on small odd-sized inputs: the program that
``benchmarks/gpu_check.py`` runs under compute-sanitizer (memcheck, racecheck).

Quantize and dequantize of both maps in each dtype, and the fused step of
every algorithm in each dtype, with and without params and in apply mode
(and with stochastic rounding of states and of bfloat16 params, and 4-bit
states), at block sizes 16, 256
and 4096, one leaf and a group of three. Each result
is compared with the CPU handler's; the last line says how many differ.

    python benchmarks/gpu_kernels_once.py
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from optax8 import maps, rounding
from optax8.kernels import algorithms, native

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _states(rng, algo, shape, block):
  out = []
  for kind in algo.states:
    x = rng.standard_normal(shape).astype(np.float32)
    x = x * 0.1 if kind == maps.SIGNED else x * x * 1e-2
    codes, absmax = native.quantize(jax.device_put(x, jax.devices("cpu")[0]), block, maps.map_id(kind))
    out.append((np.asarray(codes), np.asarray(absmax)))
  return tuple(out)


def _run(device, fn, *args):
  args = jax.tree.map(lambda a: jax.device_put(a, device), args)
  return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def main():
  gpu, cpu = jax.devices("cuda")[0], jax.devices("cpu")[0]
  rng = np.random.default_rng(0)
  runs = differ = 0

  def compare(fn, *args):
    nonlocal runs, differ
    a, b = _run(gpu, fn, *args), _run(cpu, fn, *args)
    runs += 1
    same = all(np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    differ += not same

  for dtype, kind, (shape, block) in itertools.product(DTYPES, maps.MAP_KINDS,
                                                       [((3, 1000), 16), ((5, 777), 256), ((2, 9000), 4096)]):
    x = np.asarray((rng.standard_normal(shape) * 3).astype(np.float32).astype(dtype))
    map_id = maps.map_id(kind)
    compare(lambda x: native.quantize(x, block, map_id), x)
    codes, absmax = _run(cpu, lambda x: native.quantize(x, block, map_id), x)
    compare(lambda c, a: native.dequantize(c, a, block, map_id, dtype), codes, absmax)

  for algo, dtype, mode, block in itertools.product(algorithms.table(), DTYPES, ("update", "params", "apply"),
                                                    (16, 256, 4096)):
    shapes = [(3, 2 * block + 7), (1, 5), (4, block)]
    leaves = []
    for shape in shapes:
      g = np.asarray((rng.standard_normal(shape) * 0.5).astype(np.float32).astype(dtype))
      p = None if mode == "update" else np.asarray(rng.standard_normal(shape).astype(np.float32).astype(dtype))
      leaves.append((g, p, _states(rng, algo, shape, block)))
    hypers = np.stack([np.asarray(algorithms.hyper_vector(scale=-1e-2, b1=0.9, b2=0.999, b3=0.9999, eps=1e-8,
                                                        weight_decay=1e-2, alpha=5.0, pre_scale=1.0))] * len(leaves))
    apply = mode == "apply"
    compare(lambda h, ls: native.step_group(int(algo), h, ls, block, apply), hypers, leaves)
    compare(lambda h, l: native.step(int(algo), h[0], *l, block, apply), hypers, leaves[0])
    if mode == "apply" and dtype == jnp.float32:   # stochastic rounding, and 4-bit codes (any byte is two)
      indices = [rounding.index_vectors(g.shape) for g, _, _ in leaves]
      compare(lambda h, ls: native.step_group(int(algo), h.at[:, algorithms.Hyper.ROUNDING_STEP].set(7.0), ls,
                                              block, apply, indices=indices), hypers, leaves)
      packed = [(g, p, tuple((c[..., :(g.shape[-1] + 1) // 2], a) for c, a in s)) for g, p, s in leaves]
      compare(lambda h, ls: native.step_group(int(algo), h, ls, block, apply, bits=4), hypers, packed)
    if mode == "apply" and dtype == jnp.bfloat16:   # the new params rounded stochastically
      indices = [rounding.index_vectors(g.shape) for g, _, _ in leaves]
      compare(lambda h, ls: native.step_group(int(algo), h.at[:, algorithms.Hyper.PARAM_ROUNDING_STEP].set(7.0), ls,
                                              block, apply, indices=indices, round_states=False, round_params=True),
              hypers, leaves)
  print(f"{runs} handler runs on the GPU, {differ} differ from the CPU handler")
  return 1 if differ else 0


if __name__ == "__main__":
  raise SystemExit(main())
