"""Optimizer state in checkpoints: a check against the optimizer, and flax.serialization support.

A state is a pytree of arrays ([`optax8.QuantizedArray`][optax8.quantize.QuantizedArray] leaves hold
``codes`` and ``absmax``), so orbax and ``flax.serialization`` save and
restore it like any other. A state restores correctly only into an
optimizer that makes the same tree: the same 8-bit and 32-bit leaves
(``bits``, ``min_8bit_size``), block size and block layout (absmax shape
`optax8.layout.absmax_shape`: one value per 16 x 16 tile of a matrix at
block_size 256) and parameter shapes. [`check_state`][optax8.checkpoint.check_state]
compares a state, its abstract form or a checkpoint's metadata with what the
optimizer makes, leaf by leaf::

    expected = jax.eval_shape(tx.init, params)
    optax8.check_state(checkpointer.metadata(path).item_metadata, expected)   # before restoring
    optax8.check_state(restored, expected)                                    # or after

QuantizedArray is registered with ``flax.serialization`` (state dict
``{'codes', 'absmax'}``; restoring checks both shapes against the target's)
when ``flax.serialization`` is imported, before or after optax8; importing
optax8 does not import flax.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import jax
import jax.numpy as jnp
import numpy as np

from optax8.layout import absmax_shape, block_shape
from optax8.quantize import QuantizedArray

_MAX_PROBLEMS = 8


def _name(key) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _names(path) -> tuple[str, ...]:
  """The names along a key path, without the ``value`` level of a box.

  An nnx Variable (``codes.value``) or a linen ``Partitioned``
  (``kernel.value.codes``) adds a ``value`` level, which orbax's metadata
  keeps as a dict key: it is dropped where only ``codes`` or ``absmax`` (or
  nothing) follow it, so boxed and plain states match (a submodule named
  ``value``, as in attention, is followed by its own parameters).
  """
  names = [_name(k) for k in path]
  return tuple(n for i, n in enumerate(names)
               if not (n == "value" and all(m in ("codes", "absmax") for m in names[i + 1:])))


def _flat(tree) -> dict[tuple[str, ...], tuple[tuple, object]]:
  """{names along the path: (key path, leaf)}; names match across NamedTuples, dataclasses, dicts and lists."""
  return {_names(path): (path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _quantized(tree) -> dict[tuple[str, ...], tuple[str, QuantizedArray]]:
  is_q = lambda x: isinstance(x, QuantizedArray)
  return {_names(path): (jax.tree_util.keystr(path), q)
          for path, q in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0] if is_q(q)}


def _optimizer_states(got: dict, want: dict) -> tuple[dict, dict]:
  """Both sides' optimizer states: of a whole training state (``nnx.state(optimizer)``, a TrainState, or a
  tree holding one, such as ``{"model": ..., "optimizer": nnx.state(optimizer)}``), its ``opt_state`` entry
  and nothing else (the step, params, model and its RNG keys are not the optimizer's)."""
  def opt_state(flat):
    inner = {names[names.index("opt_state") + 1:]: v for names, v in flat.items() if "opt_state" in names}
    return inner or flat
  return opt_state(got), opt_state(want)


def _shape_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    extended = jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)   # PRNG keys: key<fry>
    return tuple(x.shape), x.dtype if extended else jnp.dtype(x.dtype)
  x = np.asarray(x)
  return x.shape, x.dtype


def check_state(state, expected) -> None:
  """Raises ``ValueError`` naming each leaf where ``state`` does not fit ``expected``.

  Args:
    state: an optimizer state, its abstract form (``jax.ShapeDtypeStruct``
      leaves), a state dict (``flax.serialization.to_state_dict``) or a
      checkpoint's metadata tree (orbax ``metadata(path).item_metadata``):
      any pytree whose leaves have ``shape`` and ``dtype``. Paths are
      compared by their names, so nested dicts match NamedTuples and
      QuantizedArrays, and the ``value`` level of nnx Variables and linen
      ``Partitioned`` boxes is ignored. A whole training state
      (``nnx.state(optimizer)``, a ``TrainState`` or their metadata), or a
      tree that holds one next to the model (``nnx.state((model,
      optimizer))``), is checked by its ``opt_state``.
    expected: what the optimizer makes, ``jax.eval_shape(tx.init, params)``
      (or ``tx.init(params)``).

  The error says what differs (8-bit against 32-bit leaves, block size,
  map, shapes, dtypes) and which optimizer option or parameter explains it.
  """
  problems = []
  got, want = _optimizer_states(_flat(state), _flat(expected))
  q_got, q_want = _optimizer_states(_quantized(state), _quantized(expected))
  for names, (path, q) in q_got.items():
    if tuple(q.absmax.shape) != absmax_shape(q.shape, q.block_size):
      blocks = " x ".join(map(str, block_shape(q.shape, q.block_size))) or "1"
      problems.append(f"{path}: absmax shape {tuple(q.absmax.shape)} does not fit the shape "
                      f"{q.shape} with block_size {q.block_size} (blocks of {blocks}: expected "
                      f"{absmax_shape(q.shape, q.block_size)}); was it quantized with another block size or "
                      "block layout?")
    elif names in q_want:
      w = q_want[names][1]
      if q.block_size != w.block_size:
        problems.append(f"{path}: the state was quantized with block_size {q.block_size}, the optimizer uses "
                        f"block_size {w.block_size}")
      if q.kind != w.kind:
        problems.append(f"{path}: the state uses the {q.kind} map, the optimizer the {w.kind} map"
                        + (f" (the state has {q.bits}-bit codes, the optimizer {w.bits}-bit ones: other bits)"
                           if q.bits != w.bits else ""))
  keystr = jax.tree_util.keystr
  for names, (key_path, leaf) in want.items():
    path = keystr(key_path)
    if names in got:
      problems.extend(_compare(names, path, got[names][1], leaf, got, want))
    elif names[-1:] in (("codes",), ("absmax",)) and names[:-1] in got:
      if names[-1] == "codes":
        problems.append(f"{keystr(key_path[:-1])}: the state has a 32-bit array where the optimizer keeps 8-bit "
                        "codes and absmax; it was made with other bits or min_8bit_size")
    elif names + ("codes",) in got:
      problems.append(f"{path}: the state has 8-bit codes and absmax where the optimizer keeps a 32-bit array; it "
                      "was made with other bits or min_8bit_size")
    else:
      problems.append(f"{path}: missing from the state; was it made by another optimizer or for other parameters?")
  for names, (key_path, _) in got.items():
    reported = (names[-1:] in (("codes",), ("absmax",)) and names[:-1] in want) or names + ("codes",) in want
    if names not in want and not reported:
      problems.append(f"{keystr(key_path)}: the state has this leaf, the optimizer does not; was it made by another "
                      "optimizer or for other parameters?")
  if problems:
    more = f"\n  ... and {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
    raise ValueError("check_state: the state does not fit the optimizer:\n  "
                     + "\n  ".join(problems[:_MAX_PROBLEMS]) + more)


def _packed_as(shape, want_shape) -> str | None:
  """How codes of ``shape`` differ from ``want_shape`` by 4-bit packing (two a byte along the last axis):
  '4-bit' (the state's packed), '8-bit' (the optimizer's), or None."""
  if not shape or len(shape) != len(want_shape) or shape[:-1] != want_shape[:-1]:
    return None
  if shape[-1] == -(-want_shape[-1] // 2):
    return "4-bit"
  return "8-bit" if want_shape[-1] == -(-shape[-1] // 2) else None


def _compare(names, path, leaf, want_leaf, got, want) -> list[str]:
  (shape, dtype), (want_shape, want_dtype) = _shape_dtype(leaf), _shape_dtype(want_leaf)
  out = []
  if shape != want_shape:
    codes = names[:-1] + ("codes",)
    both = codes in got and codes in want
    got_codes, want_codes = (_shape_dtype(got[codes][1])[0], _shape_dtype(want[codes][1])[0]) if both else ((), ())
    same_codes = both and got_codes == want_codes
    packed = _packed_as(got_codes, want_codes)   # None without both codes
    if packed:
      if names[-1] == "codes":
        other = "8-bit" if packed == "4-bit" else "4-bit"
        out.append(f"{path}: shape {shape}, the optimizer expects {want_shape}: the state has {packed} codes "
                   f"where the optimizer keeps {other} ones (4-bit codes pack the last axis two a byte); it was "
                   "made with other bits")
    elif names[-1] == "absmax" and same_codes:
      out.append(f"{path}: shape {shape}, the optimizer expects {want_shape}: the state was quantized with "
                 "another block_size or block layout")
    else:
      out.append(f"{path}: shape {shape}, the optimizer expects {want_shape}: was the state made for parameters "
                 "of other shapes?")
  if dtype != want_dtype:
    out.append(f"{path}: dtype {dtype}, the optimizer expects {want_dtype}")
  return out


# ---- flax.serialization -----------------------------------------------------


def _register_flax() -> None:
  from flax import serialization

  def to_state_dict(q):
    return {"codes": serialization.to_state_dict(q.codes), "absmax": serialization.to_state_dict(q.absmax)}

  def from_state_dict(target, state):
    where = serialization.current_path().removeprefix("./")
    if not isinstance(state, dict) or set(state) != {"codes", "absmax"}:
      found = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise ValueError(f"QuantizedArray at {where!r}: expected a state dict with 'codes' and 'absmax', got {found}; "
                       "was it saved with other bits or min_8bit_size?")
    for field in ("codes", "absmax"):
      shape, want = np.shape(state[field]), tuple(getattr(target, field).shape)
      if shape != want:
        raise ValueError(f"QuantizedArray at {where!r}: {field} shape {shape}, the target has {want} (block_size "
                         f"{target.block_size}); was it saved with another block_size or block layout, or for "
                         "parameters of other shapes?")
    return QuantizedArray(serialization.from_state_dict(target.codes, state["codes"], "codes"),
                          serialization.from_state_dict(target.absmax, state["absmax"], "absmax"),
                          target.block_size, target.kind, target.columns)

  serialization.register_serialization_state(QuantizedArray, to_state_dict, from_state_dict, override=True)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
  """Runs `_register_flax` right after ``flax.serialization`` is first imported."""

  def find_spec(self, fullname, path, target=None):
    if fullname != "flax.serialization":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is not None and spec.loader is not None:
      exec_module = spec.loader.exec_module

      def exec_and_register(module):
        exec_module(module)
        _register_flax()

      spec.loader.exec_module = exec_and_register
    return spec


if "flax.serialization" in sys.modules:
  _register_flax()
else:
  sys.meta_path.insert(0, _RegisterOnImport())
