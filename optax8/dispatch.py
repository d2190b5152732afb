"""Backend choice per platform, made at lowering time.

Each op is a ``jax.lax.platform_dependent`` over the platforms whose native
library loaded (``cpu``, ``cuda``), with the pure-JAX path as the default
(TPU, ROCm, or a platform without a usable library). One jitted function
therefore runs on CPU and GPU alike, with no Python branch on devices.
"""

from __future__ import annotations

import functools

from jax import lax

from optax8.kernels import jax_backend, jax_step, native

NATIVE_PLATFORMS = tuple(native.PLATFORMS)
CUDA_MAX_STEP_BLOCK = 4096  # larger blocks take the pure-JAX step on GPUs


def backends() -> dict[str, str]:
  """Which backend runs on each platform: 'native' or 'jax'."""
  out = {p: "native" if native.available(p) else "jax" for p in NATIVE_PLATFORMS}
  out.update(rocm="jax", tpu="jax")
  return out


def _native_branches(fn):
  return {p: fn for p in NATIVE_PLATFORMS if native.available(p)}


def quantize(x, block_size: int, kind: str, map_id: int):
  """(codes, absmax) of ``x`` (rank >= 1) on the platform's backend."""
  return lax.platform_dependent(
      x,
      default=functools.partial(jax_backend.quantize, block_size=block_size, kind=kind),
      **_native_branches(functools.partial(native.quantize, block_size=block_size, map_id=map_id)))


def dequantize(codes, absmax, block_size: int, kind: str, map_id: int, dtype):
  """``map[codes] * absmax`` as ``dtype`` on the platform's backend."""
  return lax.platform_dependent(
      codes, absmax,
      default=functools.partial(jax_backend.dequantize, block_size=block_size, kind=kind, dtype=dtype),
      **_native_branches(functools.partial(native.dequantize, block_size=block_size, map_id=map_id,
                                           dtype=dtype)))


def step_group(algo: int, hypers, leaves, block_size: int, apply: bool = False):
  """The fused optimizer step of many leaves of one algorithm on the platform's backend.

  ``hypers`` is ``(len(leaves), NUM_HYPER)``; each leaf is ``(g, p,
  states)`` with ``g`` of rank >= 1, ``p`` the parameter or None (for all
  leaves alike) and ``states`` a tuple of ``(codes, absmax)``. Returns
  ``(update, new states)`` per leaf, or ``(p + update, new states)`` with
  ``apply``. Natively the whole group is one kernel call.
  """
  structure = [(p is not None, len(states)) for _, p, states in leaves]
  flat = [hypers]
  for g, p, states in leaves:
    flat += [g] + ([p] if p is not None else []) + [x for pair in states for x in pair]

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
    return native.step_group(algo, hypers, group, block_size, apply)

  def jax_fn(*args):
    hypers, group = unflatten(args)
    return [jax_step.step(algo, hypers[i], g, p, s, block_size, apply) for i, (g, p, s) in enumerate(group)]

  branches = _native_branches(native_fn)
  if block_size > CUDA_MAX_STEP_BLOCK:
    branches.pop("cuda", None)   # the CUDA kernel keeps a block's states in registers
  return lax.platform_dependent(*flat, default=jax_fn, **branches)


def step(algo: int, hyper, g, p, states, block_size: int, apply: bool = False):
  """The fused optimizer step of one leaf: ``(update or p + update, new states)``."""
  return step_group(algo, hyper[None], [(g, p, states)], block_size, apply)[0]
