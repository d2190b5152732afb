"""Shared test helpers: backends and an independent numpy reference."""

import contextlib
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax8 import layout, maps
from optax8.quantize import QuantizedArray
from optax8.kernels import jax_backend, native

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
TINY = np.finfo(np.float32).tiny
FMAX = np.finfo(np.float32).max

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_script(path: pathlib.Path):
  """The module of a script outside the package (benchmarks/, examples/), imported from its file."""
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


needs_native_cpu = pytest.mark.skipif(not native.available("cpu"),
                                      reason="the native CPU library is not built in this install")


@contextlib.contextmanager
def pure_jax_steps(monkeypatch):
  """Inside: the pure-JAX step where the native kernels would run (`native.has_rule` answers False). Backends are
  chosen when a step is traced and the shard-local kernels are jitted and cached: the caches are cleared on
  entry and on exit, so that no later step keeps the pure-JAX kernels. On exit every patch of ``monkeypatch``
  is undone, those made inside included."""
  monkeypatch.setattr(native, "has_rule", lambda platform, algo: False)
  jax.clear_caches()
  try:
    yield
  finally:
    monkeypatch.undo()
    jax.clear_caches()


def _on(x, fn):
  return jax.jit(fn)(x) if x.ndim else fn(x)


def quantize_with(backend, x, block_size, kind, rows=None):
  """(codes, absmax) of x (rank >= 1) on one backend, jitted on CPU; blocks of ``rows`` rows (default: x's own)."""
  rows = layout.tile_rows(x.shape, block_size) if rows is None else rows
  if backend == "jax":
    return jax.jit(lambda x: jax_backend.quantize(x, block_size, kind, rows))(x)
  return jax.jit(lambda x: native.quantize(x, block_size, maps.map_id(kind), rows=rows))(x)


def dequantize_with(backend, codes, absmax, block_size, kind, dtype, rows=None):
  rows = layout.tile_rows(codes.shape, block_size) if rows is None else rows
  if backend == "jax":
    fn = lambda c, a: jax_backend.dequantize(c, a, block_size, kind, dtype, rows)
  else:
    fn = lambda c, a: native.dequantize(c, a, block_size, maps.map_id(kind), dtype, rows=rows)
  return jax.jit(fn)(codes, absmax)


def per_element(absmax, shape, block_size, rows=None):
  """Each element's block absmax (float64) for an array of ``shape``."""
  rows = layout.tile_rows(shape, block_size) if rows is None else rows
  out = np.asarray(absmax, np.float64)
  for axis, (n, b) in enumerate(zip(shape, layout.extents(len(shape), block_size, rows))):
    out = np.repeat(out, b, axis=axis).take(np.arange(n), axis=axis) if b > 1 else out
  return out


def reference_quantize(x, block_size, kind, rows=None):
  """numpy reference of the documented rules (no bucket table), in the block layout of `optax8.layout`."""
  x = np.asarray(x, np.float32)
  rows = layout.tile_rows(x.shape, block_size) if rows is None else rows
  extents = layout.extents(x.ndim, block_size, rows)
  k = 2 if rows > 1 else 1
  padded = x.shape[:x.ndim - k] + tuple(-(-n // b) * b for n, b in zip(x.shape[x.ndim - k:], extents[x.ndim - k:]))
  xp = np.zeros(padded, np.float32)
  xp[tuple(slice(0, n) for n in x.shape)] = x
  blocked = x.shape[:x.ndim - k]
  for n, b in zip(padded[x.ndim - k:], extents[x.ndim - k:]):
    blocked += (n // b, b)
  xb = xp.reshape(blocked)
  within = (-1,) if k == 1 else (-3, -1)
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    a = np.abs(xb)
    counted = (a >= TINY) & (a <= FMAX)
    absmax = np.where(counted, a, 0).max(within).astype(np.float32)
    if maps.SIGNS_ABSMAX[kind]:   # the sign of the element of largest magnitude, + on a tie
      absmax = np.where(np.where(counted, xb, 0).max(within) >= absmax, absmax, -absmax)
    am = np.expand_dims(absmax, within)
    scale = np.where(np.abs(am) > np.float32(2.0**126), np.float32(0.25), np.float32(1))
    inv = np.where(am != 0, np.float32(1) / np.where(am != 0, am * scale, 1), 0)
    v = np.where(a >= TINY, (np.clip(xb, -FMAX, FMAX) * scale) * inv.astype(np.float32), 0).astype(np.float32)
  codes = maps.nearest_code(v, kind)
  codes = np.where(xb >= TINY, np.maximum(codes, maps.POSITIVE_FLOOR[kind]), codes).astype(np.uint8)  # code 0 is for 0
  return codes.reshape(padded)[tuple(slice(0, n) for n in x.shape)], absmax


def state_bytes(state, name: str) -> int:
  """Bytes of the optimizer-state arrays whose path has the key ``name`` (``['name']``)."""
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]
  return sum(x.nbytes if isinstance(x, QuantizedArray) else x.size * x.dtype.itemsize
             for path, x in leaves if f"[{name!r}]" in jax.tree_util.keystr(path))
