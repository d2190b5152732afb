"""The 8-bit options of every optimizer, given once or per parameter leaf.

``bits``, ``block_size``, ``max_unorm``, ``percentile_clipping``,
``rounding`` and ``param_rounding`` each take, like optax's ``mask``:

- a single value, for every leaf;
- a pytree whose structure is a prefix of the params' (each value applies to
  all leaves below it), for example ``{"embed": 32, "blocks": 8}``;
- a callable ``params -> such a pytree``.

A pytree is matched by structure, as optax matches masks, and otherwise by
key path, so a plain dict also configures an ``nnx.State`` or a
``FrozenDict``. ``None``, at the top or anywhere in the pytree, means the
option's default. ``min_8bit_size`` is one number, compared with each leaf's
global (unsharded) size.

A leaf whose key path contains [`STABLE_EMBEDDING`][optax8.STABLE_EMBEDDING] (the table of a
``StableEmbed`` layer) keeps 32-bit state by default: a single ``bits``
value is the default of the other leaves, as bitsandbytes' StableEmbedding
overrides the optimizer's bits for its own parameter, while a pytree or
callable ``bits`` chooses every leaf explicitly.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax8.layout import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE4, VALUE_DTYPES, check_block_size
from optax8.rounding import NEAREST, ROUNDINGS

STABLE_EMBEDDING = "stable_embedding"
DEFAULT_MIN_8BIT_SIZE = 4096
PERCENTILE_OFF = 100


# ---- the one rule for numbers ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
  """The values a numeric option may take: an interval, optionally of integers."""

  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def __contains__(self, v: float) -> bool:
    above = v > self.low if self.low_open else v >= self.low
    below = v < self.high if self.high_open else v <= self.high
    return above and below and (not self.integer or float(v).is_integer())

  def __str__(self) -> str:
    if self.low == -math.inf and self.high == math.inf:
      return "an int" if self.integer else "a finite number"
    if self.integer:
      return f"an int >= {self.low:g}" if self.high == math.inf else f"an int in [{self.low:g}, {self.high:g}]"
    if self.high == math.inf and not self.low_open:
      return f"a finite number >= {self.low:g}"
    if self.high == math.inf:
      return f"a finite number > {self.low:g}"
    return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


UNIT = Range(0.0, 1.0, high_open=True)   # decay rates whose bias correction divides by 1 - b**t
NONNEGATIVE = Range(0.0)
FINITE = Range()   # a learning rate or weight decay of either sign, as optax takes them (< 0: gradient ascent)

# Each hyperparameter's range, by argument name (as in optax).
RANGES = {
    "learning_rate": FINITE, "b1": UNIT, "b2": UNIT, "b3": UNIT, "eps": NONNEGATIVE,
    "eps_root": NONNEGATIVE, "weight_decay": FINITE, "momentum": Range(0.0, 1.0), "decay": Range(0.0, 1.0),
    "alpha": NONNEGATIVE, "initial_scale": NONNEGATIVE, "initial_accumulator_value": NONNEGATIVE,
    "trust_coefficient": NONNEGATIVE, "max_unorm": NONNEGATIVE, "percentile_clipping": Range(0.0, 100.0),
    "percentile": Range(0.0, 100.0), "min_8bit_size": Range(0.0, integer=True),
    "history": Range(1.0, integer=True), "beta": UNIT, "ns_steps": Range(1.0, integer=True),
    "adam_b1": UNIT, "adam_b2": UNIT, "adam_eps_root": NONNEGATIVE, "adam_weight_decay": FINITE,
    "adam_learning_rate": FINITE,
}


def check_number(name: str, option: str, value, rule: Range | None = None):
  """Checks one numeric option by the one rule; returns it unchanged.

  None (the default) and callables (schedules) pass. Python and NumPy
  numbers must be finite and in ``rule`` (default ``RANGES[option]``):
  else ValueError. JAX arrays (under
  `optax.inject_hyperparams` they are traced) must be numeric
  scalars; their values are not read. Anything else (strings, bools) is a
  TypeError. Errors name ``name`` and ``option``.
  """
  if value is None or callable(value):
    return value
  rule = rule if rule is not None else RANGES.get(option, Range())
  if isinstance(value, jax.Array):
    if value.ndim != 0 or not (jnp.issubdtype(value.dtype, jnp.floating)
                               or jnp.issubdtype(value.dtype, jnp.integer)):
      raise TypeError(f"{name}: {option} must be a number (a numeric scalar), got an array of shape "
                      f"{tuple(value.shape)} and dtype {value.dtype}")
    return value
  numeric = isinstance(value, (int, float, np.integer, np.floating)) or (
      isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf")
  if isinstance(value, (bool, np.bool_)) or not numeric:
    raise TypeError(f"{name}: {option} must be a number, got {type(value).__name__} {value!r}")
  v = float(np.asarray(value))
  if not math.isfinite(v) or v not in rule:
    raise ValueError(f"{name}: {option} must be {rule}, got {value if isinstance(value, (int, float)) else v!r}")
  return value


HYPERPARAMETERS = ("learning_rate", "b1", "b2", "b3", "eps", "eps_root", "weight_decay", "momentum", "decay",
                   "alpha", "initial_scale", "initial_accumulator_value", "trust_coefficient", "beta", "ns_steps",
                   "adam_b1", "adam_b2", "adam_eps_root", "adam_weight_decay", "adam_learning_rate")


def check_hyperparameters(name: str, **arguments) -> None:
  """`check_number` of each hyperparameter among the arguments of optimizer ``name``.

  Called first thing as ``check_hyperparameters(name, **locals())``; the
  8-bit options are checked by `Options.check`.
  """
  for option in HYPERPARAMETERS:
    if option in arguments:
      check_number(name, option, arguments[option])


# ---- static values ----------------------------------------------------------


def static_int(value, what: str, option: str | None = None) -> int:
  """``value`` as a Python int; a traced value cannot set a shape or a state width.

  ``what`` names the value in errors, ``option`` the argument to make static.
  """
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{what} must be a static int; under optax.inject_hyperparams pass "
                    f"static_args=({option or what!r},)")
  if isinstance(value, jax.Array):
    value = np.asarray(value)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating, np.ndarray)):
    raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
  if np.ndim(value) != 0 or np.asarray(value).dtype.kind not in "iuf" or not float(np.asarray(value)).is_integer():
    raise TypeError(f"{what} must be an int, got {value!r}")
  return int(np.asarray(value))


def is_static(value) -> bool:
  """A Python or numpy number, known when the step is traced (jax arrays are not: inject_hyperparams)."""
  return isinstance(value, (int, float, np.ndarray, np.generic)) and not isinstance(value, bool)


def is_static_zero(value) -> bool:
  return value is None or (is_static(value) and float(np.asarray(value)) == 0.0)


def is_single(value) -> bool:
  """One value for all leaves (not a pytree of values or a callable)."""
  return not callable(value) and jax.tree_util.treedef_is_leaf(jax.tree.structure(value, is_leaf=_is_none))


def _is_none(x) -> bool:
  return x is None


# ---- per-leaf values ----------------------------------------------------------


def path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def leaf_values(value, tree, name: str, option: str) -> list:
  """One value of ``option`` per leaf of ``tree``, in flatten order.

  ``value`` is a single value, a pytree prefix of ``tree`` or a callable of
  ``tree`` returning one; both are matched without nnx Variable boxes
  (`unbox`), so a rule on key paths matches ``nnx.Optimizer``'s params as
  it matches a plain dict, and a pytree made from ``nnx.state(model,
  nnx.Param)`` fits the boxed params of ``init`` and the plain ones of
  ``update`` alike. Raises a ValueError naming the first
  leaf or entry that does not match. Entries under a subtree that
  `optax.masked` or `optax.partition` replaced by one ``optax.MaskedNode``
  (a mask or labels that are a prefix of the params) are not needed.
  """
  what = option
  tree = unbox(tree)   # one leaf for each boxed one: the same flatten order
  if callable(value):
    value = value(tree)
    what = f"the result of {option}(params)"
  value = unbox(value)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  try:
    subtrees = jax.tree.structure(value, is_leaf=_is_none).flatten_up_to(tree)
  except (ValueError, TypeError):
    masked = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)[0]
              if _is_masked(x)}
    return _by_path(value, leaves, name, what, masked)
  out = []
  for v, sub in zip(jax.tree.leaves(value, is_leaf=_is_none), subtrees):
    out.extend([v] * len(jax.tree.leaves(sub)))
  return out


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _by_path(value, leaves, name: str, what: str, masked=frozenset()) -> list:
  """Matches the entries of ``value`` to leaves whose key path starts with the entry's (entries under a
  path in ``masked`` are not needed)."""
  flat = jax.tree_util.tree_flatten_with_path(value, is_leaf=_is_none)[0]
  entries = {jax.tree_util.keystr(p): v for p, v in flat}
  under_mask = {jax.tree_util.keystr(p) for p, _ in flat
                if any(jax.tree_util.keystr(p[:k]) in masked for k in range(len(p) + 1))}
  keys = []   # the entry of each leaf, or None
  for path, _ in leaves:
    prefixes = (jax.tree_util.keystr(path[:k]) for k in range(len(path) + 1))
    keys.append(next((key for key in prefixes if key in entries), None))
  problem = None
  unused = [k for k in entries if k not in set(keys) and k not in under_mask]
  if unused:
    problem = f"its entry {unused[0] or '<root>'} is not in the params"
  elif None in keys:
    problem = f"no value for leaf {path_str(leaves[keys.index(None)][0])}"
  if problem:
    raise ValueError(f"{name}: {what} does not match the params' structure: {problem}")
  return [entries[k] for k in keys]


def check_rounding(value, where: str) -> str:
  """A rounding option's value: ``'nearest'`` or ``'stochastic'``."""
  if not isinstance(value, str) or value not in ROUNDINGS:
    raise ValueError(f"{where} must be one of {ROUNDINGS}, got {value!r}")
  return value


def leaf_roundings(value, tree, name: str, option: str) -> list[str]:
  """Each leaf's rounding from ``value`` (one string, a pytree prefix of ``tree`` or a callable; None: nearest)."""
  explicit = not is_single(value)
  return [NEAREST if v is None else
          check_rounding(v, f"{name}: " + (f"{option} of leaf {path_str(path)}" if explicit else option))
          for path, v in zip(key_paths(tree), leaf_values(value, tree, name, option))]


def as_array(x):
  """A pytree leaf as an array: Python numbers (which optax accepts as leaves) become 0-d arrays."""
  return x if hasattr(x, "dtype") and hasattr(x, "shape") else jnp.asarray(x)


def unbox(tree):
  """``tree`` without Flax nnx Variable boxes.

  ``nnx.Optimizer`` gives ``tx.init`` an ``nnx.State`` of ``nnx.Param``; an
  optimizer state built in those boxes would put a QuantizedArray (or an
  array of another shape) inside a Variable that nnx treats as one value.
  States are built on the unboxed structure instead. Flax is not imported
  here: without it loaded, no tree has such boxes.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return tree
  boxed = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda x: x.get_value() if boxed(x) else x, tree, is_leaf=boxed)


def boxes(tree) -> list:
  """Per leaf of ``unbox(tree)``: None, or a function that puts a state array in that leaf's nnx Variable.

  The Variable keeps its type and metadata (its ``out_sharding`` names), so
  ``nnx.get_partition_spec`` gives a state array the parameter's spec, as
  optax's ``tree.zeros_like`` does for its float32 moments. Only arrays are
  boxed: a QuantizedArray holds a boxed ``codes`` and a boxed ``absmax``.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return [None] * len(jax.tree.leaves(tree))
  boxed = lambda x: isinstance(x, nnx.Variable)
  out = []
  for x in jax.tree.leaves(tree, is_leaf=boxed):
    treedef = jax.tree.structure(x)
    if boxed(x) and treedef.num_leaves == 1:
      out.append(lambda array, treedef=treedef: treedef.unflatten([array]))
    else:
      out.extend([None] * treedef.num_leaves)
  return out


def key_name(key):
  """The name a key path element stands for: a dict key or attribute name (None for a sequence index)."""
  for attr in ("key", "name"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return None


def is_stable_embedding(path) -> bool:
  """Whether any element of a key path is named [`STABLE_EMBEDDING`][optax8.STABLE_EMBEDDING]."""
  return any(key_name(k) == STABLE_EMBEDDING for k in path)


# ---- the options ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
  """The 8-bit options every optimizer takes (``None``: the default).

  Attributes:
    bits: 8 (quantized state), 4 (4-bit codes, two a byte) or 32 (float32
      state), per leaf. Default 8, and 32 for
      [`STABLE_EMBEDDING`][optax8.STABLE_EMBEDDING] leaves unless ``bits`` is
      a pytree or callable.
    block_size: elements per quantization block, a power of two, per leaf.
      Default 256 (128 for 4-bit state).
    min_8bit_size: leaves with fewer elements keep float32 state. Default 4096.
    max_unorm: if > 0, scale the leaf's update direction down so that its
      norm is at most ``max_unorm * ||p||``, per leaf. Default 0 (off).
    percentile_clipping: clip each leaf's gradient to the norm at this
      percentile of its recent history (see `optax8.clipping`), per
      leaf. Default 100 (off).
    rounding: how 8-bit states are requantized, per leaf: ``'nearest'``
      (the default) or ``'stochastic'`` (unbiased: `optax8.rounding`).
    param_rounding: how the new bfloat16 and float16 parameters are
      rounded, per leaf: ``'nearest'`` (the default, as optax) or
      ``'stochastic'`` (`optax8.low_precision`).

  The defaults are ``None`` rather than numbers so that
  `optax.inject_hyperparams` treats them as static.
  """

  bits: Any = None
  block_size: Any = None
  min_8bit_size: Any = None
  max_unorm: Any = None
  percentile_clipping: Any = None
  rounding: Any = None
  param_rounding: Any = None

  def check(self, name: str) -> Options:
    """Checks every option given as one value (pytrees and callables are checked per leaf at init).

    Traced values (optax.inject_hyperparams without static_args) are
    checked where they are used.
    """
    given = lambda v: v is not None and is_single(v) and not isinstance(v, jax.core.Tracer)
    if self.min_8bit_size is not None and not is_single(self.min_8bit_size):
      raise TypeError(f"{name}: min_8bit_size is one int for the whole optimizer, got a "
                      f"{type(self.min_8bit_size).__name__}; choose 8 or 32 bits per leaf with bits, or give groups "
                      "of leaves their own optimizer with optax.partition")
    if given(self.min_8bit_size):
      check_number(name, "min_8bit_size", self.min_8bit_size)
    for option in ("max_unorm", "percentile_clipping"):
      if is_single(getattr(self, option)):
        check_number(name, option, getattr(self, option))
    if given(self.bits):
      self._bits(self.bits, name + ": bits")
    if given(self.block_size):
      self._block_size(self.block_size, name + ": block_size")
    if given(self.rounding):
      check_rounding(self.rounding, name + ": rounding")
    if given(self.param_rounding):
      check_rounding(self.param_rounding, name + ": param_rounding")
    return self


  @staticmethod
  def _bits(b, where: str) -> int:
    b = static_int(b, where, "bits")
    if b not in (4, 8, 32):
      raise ValueError(f"{where} must be 4, 8 or 32, got {b}")
    return b

  @staticmethod
  def _block_size(v, where: str) -> int:
    try:
      return check_block_size(static_int(v, where, "block_size"))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None

  def resolved_min_8bit_size(self) -> int:
    if self.min_8bit_size is None:
      return DEFAULT_MIN_8BIT_SIZE
    size = static_int(self.min_8bit_size, "min_8bit_size", "min_8bit_size")
    if size < 0:
      raise ValueError(f"min_8bit_size must be an int >= 0, got {size}")
    return size

  def leaf_bits(self, name: str, params) -> list[int]:
    """The state width (4, 8 or 32) of each leaf of ``params``.

    A leaf gets 8-bit (4-bit) state if its bits are 8 (4), it has at least
    ``min_8bit_size`` elements and a float32, bfloat16, float16 or complex
    dtype (4 bits: and rank >= 1, its codes pack the last axis).
    """
    explicit = not is_single(self.bits)
    min_size = max(self.resolved_min_8bit_size(), 1)
    out = []
    for (path, x), b in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            leaf_values(self.bits, params, name, "bits")):
      where = f"{name}: " + (f"bits of leaf {path_str(path)}" if explicit else "bits")
      if b is not None:
        b = self._bits(b, where)
      if b is None or (not explicit and is_stable_embedding(path)):
        b = 32 if is_stable_embedding(path) else (b or 8)
      dtype = jax.dtypes.canonicalize_dtype(x.dtype)   # NumPy's float64 is float32 in JAX (x64 off), as traced
      quantized = (b in (4, 8) and math.prod(x.shape) >= min_size and (b == 8 or np.ndim(x) >= 1)
                   and (dtype in VALUE_DTYPES or jnp.issubdtype(dtype, jnp.complexfloating)))
      out.append(b if quantized else 32)
    return out

  def leaf_block_sizes(self, name: str, tree, *, traced_ok: bool = False, bits=None) -> list[int | None]:
    """The block size of each leaf (None for a traced value where ``traced_ok``); the default depends on the
    leaf's ``bits`` (a list, default 8 for all; a None entry: unknown, and so is that leaf's default)."""
    explicit = not is_single(self.block_size)
    out = []
    paths = key_paths(tree)
    bits = [8] * len(paths) if bits is None else bits
    for path, v, b in zip(paths, leaf_values(self.block_size, tree, name, "block_size"), bits):
      where = f"{name}: " + (f"block_size of leaf {path_str(path)}" if explicit else "block_size")
      if v is None:
        out.append(None if b is None else DEFAULT_BLOCK_SIZE4 if b == 4 else DEFAULT_BLOCK_SIZE)
      elif traced_ok and isinstance(v, jax.core.Tracer):
        out.append(None)
      else:
        out.append(self._block_size(v, where))
    return out

  def leaf_roundings(self, name: str, tree) -> list[str]:
    """The rounding of each leaf's 8-bit states: ``'nearest'`` or ``'stochastic'``."""
    return leaf_roundings(self.rounding, tree, name, "rounding")

  def leaf_max_unorms(self, name: str, tree) -> list:
    """Each leaf's max_unorm: None where off, else a number or (under inject_hyperparams) an array."""
    explicit = not is_single(self.max_unorm)
    out = []
    for path, v in zip(key_paths(tree), leaf_values(self.max_unorm, tree, name, "max_unorm")):
      check_number(name, f"max_unorm of leaf {path_str(path)}" if explicit else "max_unorm", v, RANGES["max_unorm"])
      out.append(None if is_static_zero(v) else v)
    return out

  def clipping_active(self) -> bool:
    """False where percentile_clipping is off (None or 100) for every leaf whatever the params."""
    return callable(self.percentile_clipping) or not all(
        v is None or (is_static(v) and float(np.asarray(v)) == PERCENTILE_OFF)
        for v in _values(self.percentile_clipping))


def key_paths(tree) -> list:
  """The key path of each leaf of ``tree``, in flatten order."""
  return [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _values(value) -> list:
  return jax.tree.leaves(value, is_leaf=_is_none)
