"""The native FFI libraries: loading, version check, registration, calls.

``pip install .`` builds ``optax8/_lib/liboptax8_cpu.so`` (always) and
``liboptax8_cuda.so`` (where a CUDA compiler was found), with
``build_info.json`` recording the XLA FFI API version of the headers they
were compiled against. A handler compiled against a newer FFI API than the
running jaxlib fails at its first call and takes the backend down, so a
library is used only when its API major version equals the runtime's and
its minor version is not newer; otherwise optax8 warns once and the pure-JAX
backend runs. Set ``OPTAX8_DISABLE_NATIVE=1`` to never load the libraries.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax8 import layout, rounding
from optax8.kernels import algorithms
from optax8.sharding import num_shards

LIB_DIR = pathlib.Path(__file__).resolve().parent.parent / "_lib"
PLATFORMS = {"cpu": ("liboptax8_cpu.so", "cpu", "_cpu"), "cuda": ("liboptax8_cuda.so", "CUDA", "_cuda")}
TARGETS = ("optax8_quantize", "optax8_dequantize", "optax8_step")
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class Library:
  """What optax8 knows about one platform's native library."""

  platform: str
  available: bool
  reason: str = ""
  path: str | None = None
  ffi_api: tuple[int, int] | None = None
  rules: dict[int, int] = dataclasses.field(default_factory=dict)   # algorithm id -> compiled fingerprint


def build_info() -> dict | None:
  """The build record written by CMake, or None for a build without it."""
  try:
    return json.loads((LIB_DIR / "build_info.json").read_text())
  except (OSError, ValueError):
    return None


def runtime_ffi_api() -> tuple[int, int] | None:
  """The XLA FFI API version of the running jaxlib, read from its headers."""
  try:
    text = (pathlib.Path(jax.ffi.include_dir()) / "xla/ffi/api/c_api.h").read_text()
  except OSError:
    return None
  major = re.search(r"^#define XLA_FFI_API_MAJOR (\d+)", text, re.M)
  minor = re.search(r"^#define XLA_FFI_API_MINOR (\d+)", text, re.M)
  if not (major and minor):
    return None
  return int(major.group(1)), int(minor.group(1))


def compatible(built: tuple[int, int], runtime: tuple[int, int] | None) -> bool:
  """A handler built against API ``built`` runs on a jaxlib with ``runtime``."""
  return runtime is not None and built[0] == runtime[0] and built[1] <= runtime[1]


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _jax_has_cuda() -> bool:
  try:
    return bool(jax.devices("cuda"))
  except RuntimeError:
    return False


_lock = threading.Lock()
_libraries: dict[str, Library] = {}


def library(platform: str) -> Library:
  """Loads and registers the native handlers for ``platform`` once."""
  with _lock:
    if platform not in _libraries:
      lib = _libraries[platform] = _load(platform)
      if not lib.available and lib.path is not None and (platform == "cpu" or _jax_has_cuda()):
        warnings.warn(f"optax8: the native {platform} library cannot be used ({lib.reason}); "
                      "falling back to the pure-JAX backend.", RuntimeWarning, stacklevel=3)
    return _libraries[platform]


def _load(platform: str) -> Library:
  filename, xla_platform, suffix = PLATFORMS[platform]
  if os.environ.get("OPTAX8_DISABLE_NATIVE", "") not in ("", "0"):
    return Library(platform, False, "disabled by OPTAX8_DISABLE_NATIVE")
  info = build_info()
  path = LIB_DIR / filename
  if platform == "cuda" and info is not None and not info["cuda"].get("built"):
    return Library(platform, False, f"not built: {info['cuda'].get('reason') or 'no CUDA compiler'}")
  if info is None or not path.exists():
    return Library(platform, False, "not built")
  built = tuple(info["ffi_api"])
  if platform == "cuda" and not _jax_has_cuda():   # nothing to run it on: do not load the CUDA runtime
    return Library(platform, False, "JAX has no CUDA backend here (jax[cuda12] or jax[cuda13] adds one)",
                   str(path), built)
  runtime = runtime_ffi_api()
  if not compatible(built, runtime):
    return Library(platform, False,
                   f"built against XLA FFI API {built[0]}.{built[1]}, but jaxlib {_jaxlib_version()} "
                   f"provides {'an unknown version' if runtime is None else '%d.%d' % runtime}; "
                   "reinstall optax8 against this jaxlib", str(path), built)
  try:
    handle = ctypes.CDLL(str(path))
    version_fn = getattr(handle, f"optax8{suffix}_ffi_api_version")
    version_fn.restype = ctypes.c_int64
    compiled = divmod(version_fn(), 1000)
    if compiled != built:
      raise OSError(f"library reports FFI API {compiled}, build_info.json says {built}")
    if platform == "cuda":
      handle.optax8_cuda_error_string.restype = ctypes.c_char_p
      err = handle.optax8_cuda_probe()
      if err:
        reason = handle.optax8_cuda_error_string(err).decode()
        if "driver" in reason.lower():
          reason += (f" (this library has the CUDA {info['cuda'].get('compiler_version') or ''} runtime: update the "
                     "NVIDIA driver, or reinstall optax8 with the nvcc of a CUDA toolkit the driver supports)")
        return Library(platform, False, f"built, but its kernels cannot run here: {reason}", str(path), built)
    fingerprint_fn = getattr(handle, f"optax8{suffix}_rule_fingerprint")
    fingerprint_fn.restype, fingerprint_fn.argtypes = ctypes.c_uint32, [ctypes.c_int64]
    rules = {a.id: int(fingerprint_fn(a.id)) for a in algorithms.table()}
    for target in TARGETS:
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, target + suffix)),
                                  platform=xla_platform)
  except (OSError, AttributeError, ValueError, RuntimeError) as e:
    return Library(platform, False, f"failed to load: {e}", str(path), built)
  return Library(platform, True, "", str(path), built, rules)


def available(platform: str) -> bool:
  return library(platform).available


_stale_warned: set = set()


def has_rule(platform: str, algo) -> bool:
  """Whether ``platform``'s library was built with the current rule of ``algo`` (its row's fingerprint).

  A row added or changed after the build runs on the pure-JAX backend
  (with one warning) until the library is rebuilt.
  """
  lib = library(platform)
  algorithm = algorithms.get(algo)
  if not lib.available:
    return False
  if lib.rules.get(algorithm.id) == algorithm.fingerprint:
    return True
  if (platform, algorithm.id) not in _stale_warned:
    _stale_warned.add((platform, algorithm.id))
    warnings.warn(f"optax8: the native {platform} library was built without the current rule of algorithm "
                  f"{algorithm.name!r} ({'changed' if algorithm.id in lib.rules and lib.rules[algorithm.id] else 'new'}"
                  " since the build); it runs on the pure-JAX backend until optax8 is rebuilt "
                  "(pip install -e .)", RuntimeWarning, stacklevel=4)
  return False


def _ensure_registered():
  for platform in PLATFORMS:
    library(platform)


def _sharding_of(x):
  """The sharding in x's type on an explicit mesh (so results keep it), else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = mesh is not None and jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ())
  return sharding if explicit else None


def _divisible(sharding, shape):
  """``sharding`` without the mesh axes of the dimensions of ``shape`` they do not divide (None stays None).

  A block layout that does not fit the shards (a gathered operand, `optax8.sharding`) leaves an absmax axis
  that the elements' mesh axes do not split evenly.
  """
  if sharding is None:
    return None
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  kept = [e if n % num_shards(sharding.mesh, e) == 0 else None for n, e in zip(shape, spec)]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*kept))


def _varying(results, operands):
  """The results, varying over every manual mesh axis that an operand varies over.

  Inside ``jax.shard_map`` (``check_vma=True``) an FFI call's results carry
  no varying axes; the pure-JAX branch's carry its operands', and the two
  branches of the backend switch must have equal types.
  """
  axes = set()
  for x in operands:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    axes.update(manual.varying if manual is not None else getattr(aval, "vma", ()))
  if not axes:
    return list(results)
  return [lax.pcast(r, tuple(sorted(axes)), to="varying") for r in results]


def _layout_attrs(shape, block_size: int, rows: int | None) -> dict:
  """The block layout attributes of the handlers: block_size and tile_rows (`optax8.layout`)."""
  rows = layout.tile_rows(shape, block_size) if rows is None else rows
  return dict(block_size=np.int64(block_size), tile_rows=np.int64(rows))


def quantize(x, block_size: int, map_id: int, target: str = "optax8_quantize", rows: int | None = None):
  """FFI call: (codes, absmax) of ``x`` (rank >= 1), blocks of ``rows`` rows (default: x's own layout).

  ``target`` (here and below) names the registered handler: tests pass the
  emulated CUDA handlers' names.
  """
  _ensure_registered()
  sharding = _sharding_of(x)
  attrs = _layout_attrs(x.shape, block_size, rows)
  absmax_shape = layout.absmax_shape(x.shape, block_size, rows)
  out = (jax.ShapeDtypeStruct(x.shape, np.uint8, sharding=sharding),
         jax.ShapeDtypeStruct(absmax_shape, np.float32, sharding=_divisible(sharding, absmax_shape)))
  call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")
  return tuple(_varying(call(x, map_kind=np.int64(map_id), **attrs), [x]))


def dequantize(codes, absmax, block_size: int, map_id: int, dtype, target: str = "optax8_dequantize",
               rows: int | None = None):
  """FFI call: ``map[codes] * absmax`` as ``dtype``."""
  _ensure_registered()
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(codes.shape, dtype, sharding=_sharding_of(codes)),
                          vmap_method="broadcast_all")
  return _varying([call(codes, absmax, map_kind=np.int64(map_id), **_layout_attrs(codes.shape, block_size, rows))],
                  [codes, absmax])[0]


def _kernel_dtype(g, p):
  """The one float dtype the step handler reads g and p in: theirs where they share a kernel
  dtype, else float32 (exact for 16-bit values; float64 is rounded once)."""
  dtype = jnp.dtype(g.dtype)
  if dtype in _KERNEL_DTYPES and (p is None or jnp.dtype(p.dtype) == dtype):
    return dtype
  return jnp.dtype(jnp.float32)


def step_group(algo: int, hypers, leaves, block_size: int, apply: bool = False, target: str = "optax8_step",
               rows: int | None = None, in_place: bool = True, indices=None, bits: int = 8,
               round_states: bool = True, round_params: bool = False):
  """One FFI call of the fused step over many leaves of one algorithm.

  ``hypers`` is float32 ``(len(leaves), NUM_HYPER)``; each leaf is ``(g, p,
  states)`` with ``p`` None or the parameter and ``states`` a tuple of
  ``(codes, absmax)``; ``p`` must be given for all leaves or for none.
  Returns ``(output, new states)`` per leaf: the output is the update (in
  g's dtype, aliased to g) or, with ``apply``, the new parameter ``p +
  update`` (in p's dtype, aliased to p unless ``in_place`` is False and p
  is the kernel's own dtype). Codes and absmax are aliased to their new
  values, so a donated jitted step updates them in place.

  g and p of different dtypes are both read as float32 (the handler takes
  one dtype), so neither is rounded: the output is rounded once, to g's
  dtype (update) or p's (apply), as the pure-JAX step does. Every leaf's
  blocks have ``rows`` rows (default: those of the first leaf's own layout).
  With ``indices``, each leaf's `optax8.rounding.index_vectors` (one per
  axis of g), the states are rounded stochastically (unless
  ``round_states`` is False) and, with ``round_params`` (``apply``,
  bfloat16 params), so are the new parameters
  (`optax8.low_precision.stochastic_round`).
  With ``bits`` 4 every state's codes are 4-bit codes, packed two a byte
  along the last axis (blocks of an even number of columns).
  """
  _ensure_registered()
  with_params = leaves[0][1] is not None
  if apply and not with_params:
    raise ValueError("step: apply=True needs the parameters")
  if round_params and (indices is None or not apply or
                       any(jnp.dtype(p.dtype) != jnp.dtype(jnp.bfloat16) for _, p, _ in leaves)):
    raise ValueError("step_group: round_params needs apply, bfloat16 params and the index vectors")
  stochastic = (1 if indices is not None and round_states else 0) | (2 if round_params else 0)
  mode = 2 if apply else int(with_params)
  operands, out, aliases, out_dtypes = [hypers], [], {}, []
  for leaf, (g, p, states) in enumerate(leaves):
    if (p is not None) != with_params:
      raise ValueError("step_group: give p for every leaf or for none")
    out_dtypes.append(p.dtype if apply else g.dtype)
    dtype = _kernel_dtype(g, p)
    g = g.astype(dtype)
    converted = p is not None and jnp.dtype(p.dtype) != dtype   # then the kernel's p has no other reader
    p = np.zeros((1,), dtype) if p is None else p.astype(dtype)
    result = p if apply else g
    if not apply or in_place or converted:
      aliases[len(operands) + (1 if apply else 0)] = len(out)
    out.append(jax.ShapeDtypeStruct(result.shape, result.dtype, sharding=_sharding_of(result)))
    operands += [g, p]
    for pair in states:
      for x in pair:
        aliases[len(operands)] = len(out)
        out.append(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding_of(x)))
        operands.append(x)
    if stochastic:   # element (r, c)'s index in its leaf: row_index[r] + col_index[c]
      index = indices[leaf]
      operands += [rounding.element_index(index[:-1]).reshape(-1), index[-1]]
  call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all", input_output_aliases=aliases)
  results = _varying(call(*operands, algo=np.int64(int(algo)), leaves=np.int64(len(leaves)),
                          params_mode=np.int64(mode), stochastic=np.int64(stochastic), bits=np.int64(bits),
                          **_layout_attrs(leaves[0][0].shape, block_size, rows)),
                     operands)
  per_leaf, k = [], 0
  for (_, _, states), dtype in zip(leaves, out_dtypes):
    n = 2 * len(states)
    new = results[k + 1:k + 1 + n]
    per_leaf.append((results[k].astype(dtype), tuple(zip(new[::2], new[1::2]))))
    k += 1 + n
  return per_leaf


def step(algo: int, hyper, g, p, states, block_size: int, apply: bool = False, target: str = "optax8_step",
         rows: int | None = None):
  """The fused step of one leaf (``hyper`` of shape (NUM_HYPER,)): ``(output, new states)``."""
  return step_group(algo, hyper[None], [(g, p, states)], block_size, apply, target, rows)[0]
