"""Quantization maps: the 256 float32 values an 8-bit code stands for (16 for a 4-bit code).

Both maps come from the "dynamic exponent" construction of Dettmers et al.
(2022). At exponent level ``i = 0..6`` the magnitudes are the midpoints of
``k + 1`` evenly spaced points in ``[0.1, 1]``, scaled by ``10**(i - 6)``,
with ``k = 2**i`` (signed map, which also takes the negations) or
``k = 2**(i + 1)`` (unsigned map). ``0`` and ``1`` are added and the list is
sorted. The construction runs in float64 and rounds once to float32.

Rounding a normalized value ``v = x / absmax`` to its code is round to
nearest: ``code(v) = #{j : mid[j] < v}`` over the 255 float32 midpoints
``mid[j] = (map[j] + map[j + 1]) / 2`` (ties go to the lower code), except
that the unsigned map gives a positive normal ``x`` code 1 or more
(`POSITIVE_FLOOR`). The native CPU kernel and the pure-JAX path find that
count with a 65,536-entry table indexed by the top 16 bits of ``v`` (sign,
exponent, 7 mantissa bits) plus one comparison; the maps are spaced so that
no 16-bit bucket holds more than one midpoint, which `bucket_table` checks
when it builds the table. Off CPUs and GPUs the pure-JAX path counts by
arithmetic over the maps' `levels`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

SIGNED = "signed"
UNSIGNED = "unsigned"
MAP_KINDS = (SIGNED, UNSIGNED)   # the 8-bit maps (the native kernels' maps)
SIGNED4 = "signed4"
UNSIGNED4 = "unsigned4"
MAP4_KINDS = (SIGNED4, UNSIGNED4)   # the 4-bit maps: 16 values, two codes a byte
BITS = {SIGNED: 8, UNSIGNED: 8, SIGNED4: 4, UNSIGNED4: 4}
_MAP_IDS = {SIGNED: 0, UNSIGNED: 1}
_LEVELS = {8: 7, 4: 3}   # exponent levels of the construction per code width


# The lowest code of a positive normal value (x >= the smallest normal float32) in each map: the unsigned map
# keeps code 0 for zero alone, so a positive second moment never dequantizes to 0 (however small it is against
# its block's absmax; the zero-point problem of Li et al. 2023). The signed map has no floor.
POSITIVE_FLOOR = {SIGNED: 0, UNSIGNED: 1, SIGNED4: 0, UNSIGNED4: 1}

# Whether a block's absmax takes the sign of its element of largest magnitude (the positive one of a tie). The
# signed map runs from -0.99297 to +1, so with absmax = max |x| a block's most negative element cannot be
# represented, and a state that is its block's extreme shrinks by 0.7% at every requantization (Lion's momentum
# then stalls on Rosenbrock); with the sign, that element is +1 times absmax, exactly. Codes dequantize as before,
# map[code] * absmax, so states saved with a positive absmax stay valid. The unsigned map keeps max |x|.
SIGNS_ABSMAX = {SIGNED: True, UNSIGNED: False, SIGNED4: True, UNSIGNED4: False}


def is_signed(kind: str) -> bool:
  return kind in (SIGNED, SIGNED4)


def with_bits(kind: str, bits: int) -> str:
  """The map of ``kind``'s sign at ``bits`` (8 or 4): ``with_bits('unsigned', 4) == 'unsigned4'``."""
  signed = is_signed(kind)
  return {8: SIGNED if signed else UNSIGNED, 4: SIGNED4 if signed else UNSIGNED4}[bits]


def map_id(kind: str) -> int:
  """The integer the kernels use for a map kind."""
  try:
    return _MAP_IDS[kind]
  except KeyError:
    raise ValueError(f"map kind must be one of {MAP_KINDS}, got {kind!r}") from None


def check_kind(kind: str) -> str:
  if kind not in BITS:
    raise ValueError(f"map kind must be one of {MAP_KINDS + MAP4_KINDS}, got {kind!r}")
  return kind


@functools.cache
def dynamic_map(kind: str = SIGNED) -> np.ndarray:
  """The sorted float32 map of ``kind``: 256 values ('signed', 'unsigned') or 16 ('signed4', 'unsigned4').

  The 4-bit maps are the same construction with three levels (``10**(i -
  2)``, ``i = 0..2``): the signed one ``0, +-0.0055, +-0.0325, +-0.0775,
  +-0.2125, +-0.4375, +-0.6625, +-0.8875, 1``, the unsigned one from
  0.00325 to 1 (code 0 for zero alone: `POSITIVE_FLOOR`).
  """
  bits = BITS[check_kind(kind)]
  levels = _LEVELS[bits]
  values = [0.0, 1.0]
  for i in range(levels):
    k = 2**i if is_signed(kind) else 2 ** (i + 1)
    points = np.linspace(0.1, 1.0, k + 1)
    magnitudes = (points[:-1] + points[1:]) / 2 * 10.0 ** (i - levels + 1)
    values.extend(magnitudes)
    if is_signed(kind):
      values.extend(-magnitudes)
  out = np.sort(np.asarray(values, np.float64)).astype(np.float32)
  assert out.shape == (1 << bits,) and np.all(np.diff(out) > 0)
  out.setflags(write=False)
  return out


@functools.cache
def midpoints(kind: str = SIGNED) -> np.ndarray:
  """float32 decision points: the 255 (4-bit: 15) midpoints and a +inf sentinel."""
  m = dynamic_map(kind).astype(np.float64)
  mids = ((m[:-1] + m[1:]) / 2).astype(np.float32)
  out = np.append(mids, np.float32(np.inf))
  out.setflags(write=False)
  return out


def nearest_code(v: np.ndarray, kind: str = SIGNED) -> np.ndarray:
  """Reference rounding: codes of normalized float32 values (numpy)."""
  return np.searchsorted(midpoints(kind)[:-1], np.asarray(v, np.float32), side="left").astype(np.uint8)


@functools.cache
def bucket_table(kind: str = SIGNED) -> np.ndarray:
  """uint8[65536]: the code of the smallest float32 of each 16-bit bucket.

  ``code(v) = table[bits(v) >> 16] + (mid[table[...]] < v)`` for every
  float32 ``v`` that is not NaN. Raises if a bucket holds two midpoints.
  """
  b = np.arange(65536, dtype=np.uint32)
  negative = (b & 0x8000) != 0
  lo_bits = np.where(negative, (b << 16) | 0xFFFF, b << 16).astype(np.uint32)
  hi_bits = np.where(negative, b << 16, (b << 16) | 0xFFFF).astype(np.uint32)

  def clean(bits):
    v = bits.view(np.float32).copy()
    v[np.isnan(v)] = np.where(negative, -np.inf, np.inf)[np.isnan(v)]
    return v

  lo_code = nearest_code(clean(lo_bits), kind)
  hi_code = nearest_code(clean(hi_bits), kind)
  if np.any(hi_code.astype(int) - lo_code.astype(int) > 1):
    raise AssertionError(f"{kind} map: a 16-bit bucket holds two midpoints")
  lo_code.setflags(write=False)
  return lo_code


@functools.cache
def bucket_midpoints(kind: str = SIGNED) -> np.ndarray:
  """float32[65536]: ``midpoints(kind)[bucket_table(kind)]``, the one midpoint to compare with.

  Indexed by the same bucket as `bucket_table`, so the two lookups are
  independent (the pure-JAX path gathers both at once).
  """
  out = midpoints(kind)[bucket_table(kind)]
  out.setflags(write=False)
  return out


# The buckets (top 16 bits without the sign) where some code changes: below
# BUCKET_LO every float of either sign rounds to one code per sign and map,
# and from BUCKET_HI up (|v| >= 1) to another, with no midpoint in between.
BUCKET_LO, BUCKET_HI = 0x3400, 0x3F80
BUCKET_COUNT = (BUCKET_HI - BUCKET_LO + 1 + 3) // 4 * 4   # padded to whole 32-bit words


@functools.cache
def compact_buckets(kind: str = SIGNED) -> np.ndarray:
  """uint8[2, BUCKET_COUNT]: `bucket_table` for positive (row 0) and negative (row 1) floats whose
  bucket magnitude ``m = (bits >> 16) & 0x7fff`` is clamped to ``[BUCKET_LO, BUCKET_HI]``.

  ``code(v) = c + (mid[c] < v)`` with ``c = compact_buckets(kind)[sign, clamp(m) - BUCKET_LO]``
  for every float32 ``v`` that is not NaN (the CUDA step's lookup, 5.9 KB a map in shared
  memory). Raises if a bucket outside the range changes the code or holds a midpoint.
  """
  table, mids_bits = bucket_table(kind), midpoints(kind)[:-1].view(np.uint32) >> 16
  out = np.zeros((2, BUCKET_COUNT), np.uint8)
  for sign in (0, 1):
    m = np.arange(0x8000)
    codes = table[m | (sign << 15)]
    outside = (m < BUCKET_LO) | (m > BUCKET_HI)
    clamped = codes[np.clip(m, BUCKET_LO, BUCKET_HI)]
    if np.any(codes[outside] != clamped[outside]) or np.isin(m[outside] | (sign << 15), mids_bits).any():
      raise AssertionError(f"{kind} map: a code changes outside buckets [{BUCKET_LO:#x}, {BUCKET_HI:#x}]")
    out[sign, :BUCKET_HI - BUCKET_LO + 1] = codes[BUCKET_LO:BUCKET_HI + 1]
  out.setflags(write=False)
  return out


class Levels(NamedTuple):
  """The map's magnitudes by exponent level, for a code found by arithmetic (the pure-JAX encoder).

  The magnitudes ``P`` are the map's positive values below 1 (the signed
  map's 127, the unsigned map's 254), ascending; ``mids[q]`` is the float32
  midpoint between ``P[q - 1]`` and ``P[q]`` (``P[-1] = 0``, and
  ``P[len(P)] = 1``). Level ``l`` holds ``P[first[l]] .. P[first[l] +
  count[l] - 1]``, evenly spaced ``spacing[l]`` apart up to float32
  rounding, and ``mids[first[l]]`` is its lower decision point.
  """

  first: np.ndarray     # int32[7]
  count: np.ndarray     # int32[7]
  bottom: np.ndarray    # float32[7]: P[first[l]]
  inv_spacing: np.ndarray   # float32[7]: 1 / spacing (0 for a level of one value)
  mids: np.ndarray      # float32[len(P) + 1]


@functools.cache
def levels(kind: str = SIGNED) -> Levels:
  """The `Levels` of ``kind``: with them, ``#{q : mids[q] < a}`` for ``a >= 0`` is
  ``i + (mids[i] < a)`` with ``i = first[l] + 1 + clip(ceil((a - bottom[l]) * inv_spacing[l] - 1), 0, count[l] - 1)``,
  where ``l`` is the last level whose ``mids[first[l]]`` is below ``a`` (and 0 below ``mids[0]``); the same
  holds for ``<=`` throughout. `tests/test_quantize.py` checks this against the search on every midpoint's neighbours.
  """
  m = dynamic_map(kind)
  magnitudes = m[(m > 0) & (m < 1)]
  counts = [2**i if kind == SIGNED else 2 ** (i + 1) for i in range(7)]
  first = np.cumsum([0] + counts[:-1])
  assert first[-1] + counts[-1] == magnitudes.size
  ext = np.concatenate([[0.0], magnitudes, [1.0]]).astype(np.float64)
  mids = ((ext[:-1] + ext[1:]) / 2).astype(np.float32)
  bottom = magnitudes[first]
  top = magnitudes[first + np.asarray(counts) - 1]
  spacing = (top.astype(np.float64) - bottom) / np.maximum(np.asarray(counts) - 1, 1)
  inv = np.where(np.asarray(counts) > 1, 1 / np.where(spacing > 0, spacing, 1), 0).astype(np.float32)
  out = Levels(first.astype(np.int32), np.asarray(counts, np.int32), bottom.astype(np.float32), inv, mids)
  for a in out:
    a.setflags(write=False)
  return out


def cxx_header() -> str:
  """C++ source of ``ffi/include/optax8/maps.h`` (maps and midpoints as hex floats)."""

  def values(a):
    items = [f"{float(x).hex()}f" if np.isfinite(x) else "INFINITY" for x in a]
    lines = [", ".join(items[i:i + 4]) for i in range(0, len(items), 4)]
    return ", \\\n    ".join(lines)

  def padded(a):   # to 256 entries with +inf: the 8-bit maps' lookups and searches then serve the 4-bit maps
    return np.concatenate([a, np.full(256 - len(a), np.inf, np.float32)])

  parts = [
      "// Generated by optax8.maps.cxx_header(); do not edit.",
      "// The signed and unsigned dynamic maps and their decision midpoints",
      "// (255 midpoints and a +inf sentinel), as exact float32 hex literals; the",
      "// 4-bit maps' 16 values and 16 decision points are padded with +inf to 256:",
      "// no normalized value then counts past code 15, and stochastic rounding",
      "// never rounds up from it (u * inf is not below v - 1).",
      "#pragma once",
      "#include <cmath>",
  ]
  for kind in MAP_KINDS + MAP4_KINDS:
    name = kind.upper()
    parts.append(f"#define OPTAX8_{name}_POSITIVE_FLOOR {POSITIVE_FLOOR[kind]}  // maps.POSITIVE_FLOOR")
    parts.append(f"#define OPTAX8_{name}_SIGNS_ABSMAX {int(SIGNS_ABSMAX[kind])}  // maps.SIGNS_ABSMAX")
    parts.append(f"#define OPTAX8_{name}_MAP \\\n    {values(padded(dynamic_map(kind)))}")
    parts.append(f"#define OPTAX8_{name}_MIDS \\\n    {values(padded(midpoints(kind)))}")
  parts.append("// The compact bucket tables (optax8.maps.compact_buckets): positive, then negative floats.")
  parts.append(f"#define OPTAX8_BUCKET_LO {BUCKET_LO:#x}\n#define OPTAX8_BUCKET_HI {BUCKET_HI:#x}\n"
               f"#define OPTAX8_BUCKET_COUNT {BUCKET_COUNT}")
  for kind in MAP_KINDS + MAP4_KINDS:
    codes = [str(int(c)) for c in compact_buckets(kind).reshape(-1)]
    lines = [",".join(codes[i:i + 32]) for i in range(0, len(codes), 32)]
    parts.append(f"#define OPTAX8_{kind.upper()}_BUCKETS \\\n    " + ", \\\n    ".join(lines))
  return "\n".join(parts) + "\n"


if __name__ == "__main__":
  print(cxx_header(), end="")
