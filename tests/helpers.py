"""Shared test helpers: backends and an independent numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax8 import maps
from optax8.quantize import QuantizedArray
from optax8.kernels import jax_backend, native

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
TINY = np.finfo(np.float32).tiny
FMAX = np.finfo(np.float32).max

needs_native_cpu = pytest.mark.skipif(not native.available("cpu"),
                                      reason="the native CPU library is not built in this install")


def _on(x, fn):
  return jax.jit(fn)(x) if x.ndim else fn(x)


def quantize_with(backend, x, block_size, kind):
  """(codes, absmax) of x (rank >= 1) on one backend, jitted on CPU."""
  if backend == "jax":
    return jax.jit(lambda x: jax_backend.quantize(x, block_size, kind))(x)
  return jax.jit(lambda x: native.quantize(x, block_size, maps.map_id(kind)))(x)


def dequantize_with(backend, codes, absmax, block_size, kind, dtype):
  if backend == "jax":
    fn = lambda c, a: jax_backend.dequantize(c, a, block_size, kind, dtype)
  else:
    fn = lambda c, a: native.dequantize(c, a, block_size, maps.map_id(kind), dtype)
  return jax.jit(fn)(codes, absmax)


def reference_quantize(x, block_size, kind):
  """numpy reference of the documented rules (no bucket table)."""
  x = np.asarray(x, np.float32)
  n = x.shape[-1]
  nb = -(-n // block_size)
  xp = np.zeros(x.shape[:-1] + (nb * block_size,), np.float32)
  xp[..., :n] = x
  xb = xp.reshape(x.shape[:-1] + (nb, block_size))
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    a = np.abs(xb)
    absmax = np.where((a >= TINY) & (a <= FMAX), a, 0).max(-1).astype(np.float32)
    scale = np.where(absmax > np.float32(2.0**126), np.float32(0.25), np.float32(1))[..., None]
    inv = np.where(absmax[..., None] > 0, np.float32(1) / np.where(absmax[..., None] > 0, absmax[..., None] * scale, 1), 0)
    v = np.where(a >= TINY, (np.clip(xb, -FMAX, FMAX) * scale) * inv.astype(np.float32), 0).astype(np.float32)
  codes = maps.nearest_code(v, kind).reshape(xp.shape)[..., :n]
  return codes, absmax


def state_bytes(state, name: str) -> int:
  """Bytes of the optimizer-state arrays whose path has the key ``name`` (``['name']``)."""
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]
  return sum(x.nbytes if isinstance(x, QuantizedArray) else x.size * x.dtype.itemsize
             for path, x in leaves if f"[{name!r}]" in jax.tree_util.keystr(path))
