"""Complex leaves: stepped as real views, with optax's complex convention.

A complex leaf of shape ``(..., n)`` is stepped as its *real view*: the
float array of shape ``(..., 2n)`` that holds ``re, im`` pairs along the last
axis (the order of a complex array in memory). Its states have the real view's shape, so
an 8-bit state quantizes real and imaginary parts in the same blocks
(interleaved), and a block of 256 floats holds 128 complex elements.

The rules follow optax on complex numbers: a first moment is the complex
average of ``g`` (each part averaged), a second moment averages
``|g|^2 = conj(g) g`` (the same value on both parts of an element), and
Lion's ``sign`` is ``z / |z|``. The rules (``direction(h, g, s, ops)`` in
`optax8.kernels.algorithms`) take these from ``ops``: `REAL` for real
leaves (``x * x``, ``sign``), `PAIRS` for real views. Norms (trust ratios,
``max_unorm``) of a real view are those of the complex leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_complex(x) -> bool:
  return jnp.issubdtype(jnp.dtype(x.dtype), jnp.complexfloating)


def real_view_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of a complex leaf's real view: the last axis doubled (a scalar becomes ``(2,)``)."""
  return (*shape[:-1], 2 * shape[-1]) if shape else (2,)


def real_view(x):
  """``x`` (complex) as floats of shape `real_view_shape`: ``re, im`` interleaved along the last axis.

  A ``jax.ShapeDtypeStruct`` gives the struct of its real view (same sharding).
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(real_view_shape(tuple(x.shape)), jnp.finfo(x.dtype).dtype, sharding=x.sharding)
  parts = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)   # (..., n, 2): the complex memory layout
  return parts.reshape(real_view_shape(tuple(x.shape)))


def from_real_view(v, shape: tuple[int, ...], dtype):
  """The complex array of ``shape`` and ``dtype`` whose real view is ``v``."""
  parts = v.astype(jnp.finfo(dtype).dtype).reshape(*shape, 2)
  return jax.lax.complex(parts[..., 0], parts[..., 1]).astype(dtype)


class _Real:
  """Elementwise operations of the rules on real leaves."""

  @staticmethod
  def square(x):
    return x * x

  @staticmethod
  def sign(x):
    return jnp.sign(x)

  @staticmethod
  def finite(x):
    return jnp.isfinite(x)


class _Pairs:
  """The same on real views of complex leaves: each ``re, im`` pair is one element."""

  @staticmethod
  def _both(x):
    """``x`` of shape ``(..., n)`` per element, repeated on both parts: shape ``(..., 2n)``."""
    return jnp.repeat(x, 2, axis=-1)

  @staticmethod
  def _pairs(x):
    return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)

  @classmethod
  def square(cls, x):
    """``|z|^2`` on both parts."""
    p = cls._pairs(x)
    return cls._both(p[..., 0] * p[..., 0] + p[..., 1] * p[..., 1])

  @classmethod
  def sign(cls, x):
    """``z / |z|`` (0 where ``z`` is 0), as ``jnp.sign`` of a complex number."""
    p = cls._pairs(x)
    magnitude = cls._both(jnp.hypot(p[..., 0], p[..., 1]))
    return jnp.where(magnitude > 0, x / jnp.where(magnitude > 0, magnitude, 1), 0)

  @classmethod
  def finite(cls, x):
    """Both parts finite, on both parts."""
    ok = jnp.isfinite(cls._pairs(x))
    return cls._both(ok[..., 0] & ok[..., 1])


REAL = _Real()
PAIRS = _Pairs()
