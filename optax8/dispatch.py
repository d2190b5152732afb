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


def step(algo: int, hyper, g, p, states, block_size: int):
  """The fused optimizer step of one leaf on the platform's backend.

  ``g`` (rank >= 1) is the gradient, ``p`` the parameter or None,
  ``states`` a tuple of ``(codes, absmax)``; returns ``(update, new states)``.
  """
  flat = [x for pair in states for x in pair]
  n = len(flat)

  def unflatten(fn):
    def run(hyper, g, *rest):
      p = rest[n] if len(rest) > n else None
      pairs = tuple(zip(rest[:n:2], rest[1:n:2]))
      return fn(algo, hyper, g, p, pairs, block_size)
    return run

  args = (hyper, g, *flat) + (() if p is None else (p,))
  branches = _native_branches(unflatten(native.step))
  if block_size > CUDA_MAX_STEP_BLOCK:
    branches.pop("cuda", None)   # the CUDA kernel keeps a block's states in registers
  return lax.platform_dependent(*args, default=unflatten(jax_step.step), **branches)
