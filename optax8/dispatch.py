"""Backend choice per platform, made at lowering time.

Each op is a ``jax.lax.platform_dependent`` over the platforms whose native
library loaded (``cpu``, ``cuda``), with the pure-JAX path as the default
(TPU, ROCm, or a platform without a usable library). One jitted function
therefore runs on CPU and GPU alike, with no Python branch on devices. On a
device mesh each op runs on each device's shards (`optax8.sharding`).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from optax8 import sharding
from optax8.kernels import jax_backend, jax_step, native
from optax8.kernels.algorithms import CUDA_MAX_STEP_BLOCK
from optax8.sharding import ABSMAX, ELEMENTS, REPLICATED

NATIVE_PLATFORMS = tuple(native.PLATFORMS)


def backends() -> dict[str, str]:
  """Which backend runs on each platform: 'native' or 'jax'."""
  out = {p: "native" if native.available(p) else "jax" for p in NATIVE_PLATFORMS}
  out.update(rocm="jax", tpu="jax")
  return out


def _native_branches(fn):
  return {p: fn for p in NATIVE_PLATFORMS if native.available(p)}


def quantize(x, block_size: int, kind: str, map_id: int):
  """(codes, absmax) of ``x`` (rank >= 1) on the platform's backend, on each device's shards."""
  op = sharding.make_op(_quantize, [x.shape], [(ELEMENTS, 0)], [(ELEMENTS, 0), (ABSMAX, 0)],
                        block_size=block_size, kind=kind, map_id=map_id)
  return sharding.shard_local(op, x)


def dequantize(codes, absmax, block_size: int, kind: str, map_id: int, dtype):
  """``map[codes] * absmax`` as ``dtype`` on the platform's backend, on each device's shards."""
  op = sharding.make_op(_dequantize, [codes.shape], [(ELEMENTS, 0), (ABSMAX, 0)], [(ELEMENTS, 0)],
                        block_size=block_size, kind=kind, map_id=map_id, dtype=jnp.dtype(dtype))
  return sharding.shard_local(op, codes, absmax)[0]


def _quantize(x, block_size: int, kind: str, map_id: int):
  return lax.platform_dependent(
      x,
      default=functools.partial(jax_backend.quantize, block_size=block_size, kind=kind),
      **_native_branches(functools.partial(native.quantize, block_size=block_size, map_id=map_id)))


def _dequantize(codes, absmax, block_size: int, kind: str, map_id: int, dtype):
  return (lax.platform_dependent(
      codes, absmax,
      default=functools.partial(jax_backend.dequantize, block_size=block_size, kind=kind, dtype=dtype),
      **_native_branches(functools.partial(native.dequantize, block_size=block_size, map_id=map_id,
                                           dtype=dtype))),)


def step_group(algo: int, hypers, leaves, block_size: int, apply: bool = False):
  """The fused optimizer step of many leaves of one algorithm on the platform's backend.

  ``hypers`` is ``(len(leaves), NUM_HYPER)``; each leaf is ``(g, p,
  states)`` with ``g`` of rank >= 1, ``p`` the parameter or None (for all
  leaves alike) and ``states`` a tuple of ``(codes, absmax)``. Returns
  ``(update, new states)`` per leaf, or ``(p + update, new states)`` with
  ``apply``. Natively the whole group is one kernel call.
  """
  structure = tuple((p is not None, len(states)) for _, p, states in leaves)
  flat, operands, results = [hypers], [(REPLICATED, 2)], []
  for i, (g, p, states) in enumerate(leaves):
    flat += [g] + ([p] if p is not None else []) + [x for pair in states for x in pair]
    operands += [(ELEMENTS, i)] * (2 if p is not None else 1) + [(ELEMENTS, i), (ABSMAX, i)] * len(states)
    results += [(ELEMENTS, i)] + [(ELEMENTS, i), (ABSMAX, i)] * len(states)
  op = sharding.make_op(_step_group, [g.shape for g, _, _ in leaves], operands, results, algo=algo,
                        block_size=block_size, apply=apply, structure=structure)
  out = iter(sharding.shard_local(op, *flat))
  return [(next(out), tuple((next(out), next(out)) for _ in range(n))) for _, n in structure]


def _step_group(*flat, algo: int, block_size: int, apply: bool, structure):
  """`step_group` on flat operands ``hypers, (g, [p], codes, absmax, ...) per leaf``; flat results."""

  def unflatten(args):
    it = iter(args[1:])
    out = []
    for has_p, n in structure:
      g = next(it)
      p = next(it) if has_p else None
      values = [next(it) for _ in range(2 * n)]
      out.append((g, p, tuple(zip(values[::2], values[1::2]))))
    return args[0], out

  def native_fn(*args):
    hypers, group = unflatten(args)
    return _flat(native.step_group(algo, hypers, group, block_size, apply))

  def jax_fn(*args):
    hypers, group = unflatten(args)
    return _flat([jax_step.step(algo, hypers[i], g, p, s, block_size, apply) for i, (g, p, s) in enumerate(group)])

  branches = {p: native_fn for p in NATIVE_PLATFORMS if native.has_rule(p, algo)}
  if block_size > CUDA_MAX_STEP_BLOCK:
    branches.pop("cuda", None)   # the CUDA kernel keeps a block's states in registers
  return lax.platform_dependent(*flat, default=jax_fn, **branches)


def _flat(per_leaf):
  return [x for out, states in per_leaf for x in (out, *(a for pair in states for a in pair))]


def step(algo: int, hyper, g, p, states, block_size: int, apply: bool = False):
  """The fused optimizer step of one leaf: ``(update or p + update, new states)``."""
  return step_group(algo, hyper[None], [(g, p, states)], block_size, apply)[0]
