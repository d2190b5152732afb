"""Backend choice per platform, made at lowering time.

Each op is a ``jax.lax.platform_dependent`` over the platforms whose native
library loaded (``cpu``, ``cuda``), with the pure-JAX path as the default
(TPU, ROCm, or a platform without a usable library). One jitted function
therefore runs on CPU and GPU alike, with no Python branch on devices.
"""

from __future__ import annotations

import functools

from jax import lax

from optax8.kernels import jax_backend, native

NATIVE_PLATFORMS = tuple(native.PLATFORMS)


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
