"""The table of algorithms: one row per per-element rule of the fused step.

A row (`Algorithm`) is what the kernels know of an optimizer: its id, the
maps of its states, and its per-element rule, written once in JAX and once
in C++, side by side in the module of ``optax8/optimizers`` that defines
the optimizer. The fused step (``ffi/include/optax8/step_rule.inc``,
`optax8.kernels.jax_step.rule`) wraps that rule the same way for every
row::

    ok = isfinite(g);  g = (ok ? g : 0) + coupled_decay * p
    d, states = direction(h, g, states)      # the row's rule
    u = scale * (d + weight_decay * p)       # 0, with all states 0, where g, d or a state is not finite

The native dispatch is generated from this table::

    python -m optax8.kernels.algorithms

writes ``ffi/include/optax8/algorithms.h`` (the ids, state maps,
hyperparameter slots and shared constants) and
``ffi/include/optax8/algorithm_rules.inc`` (each row's C++ rule). Every
switch over algorithms in the handlers is written with the generated
``OPTAX8_FOR_EACH_ALGO`` and has no ``default:``; a rule without a row, or a
row without a rule, does not compile. A test fails when the checked-in
files differ from what this module writes.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import pathlib
import textwrap
import zlib
from typing import Callable

import jax.numpy as jnp

from optax8 import maps


class Hyper(enum.IntEnum):
  """Slots of the float32 hyperparameter vector, a device buffer of the step."""

  SCALE = 0           # final multiplier of the update (-learning_rate, or 1)
  B1 = 1              # first-moment decay (the momentum of SGD and LARS)
  ONE_MINUS_B1 = 2
  B2 = 3              # second-moment decay (RMSprop's decay)
  ONE_MINUS_B2 = 4
  B3 = 5              # AdEMAMix's slow EMA decay
  ONE_MINUS_B3 = 6
  EPS = 7             # added outside the square root
  EPS_ROOT = 8        # added inside the square root (RMSprop's and Adagrad's eps in optax)
  WEIGHT_DECAY = 9    # decoupled: added to the direction (AdamW, Lion, AdEMAMix)
  COUPLED_DECAY = 10  # coupled: added to the gradient (SGD, RMSprop, Adagrad, LARS)
  INV_BIAS1 = 11      # 1 / (1 - b1**t)
  INV_BIAS2 = 12      # 1 / (1 - b2**t)
  INV_BIAS1_NEXT = 13  # 1 / (1 - b1**(t+1)) (Nesterov)
  ALPHA = 14          # AdEMAMix's mixing coefficient
  PRE_SCALE = 15      # multiplies the gradient before momentum (LARS: -lr * trust ratio)
  NESTEROV = 16       # 0 or 1
  ROUNDING_STEP = 17  # stochastic rounding (`optax8.rounding`): the step count modulo 2**24
  ROUNDING_SEED = 18  # and the leaf's seed
  PARAM_ROUNDING_STEP = 19  # the step count of the new parameters' stochastic rounding (`optax8.low_precision`)


NUM_HYPER = len(Hyper)
_DEFAULTS = {Hyper.SCALE: 1.0, Hyper.INV_BIAS1: 1.0, Hyper.INV_BIAS2: 1.0, Hyper.INV_BIAS1_NEXT: 1.0,
             Hyper.PRE_SCALE: 1.0}

CUDA_MAX_STEP_BLOCK = 4096  # the CUDA step keeps a block's states in registers: larger blocks take the JAX step


def hyper_vector(**values):
  """The float32 vector of hyperparameters; names are lower-case slot names.

  Values may be Python numbers or (traced) arrays. ``one_minus_b1`` and the
  like default to ``1 - b1`` computed before the cast to float32, as optax
  computes them.
  """
  for b in ("b1", "b2", "b3"):
    if b in values and f"one_minus_{b}" not in values:
      values[f"one_minus_{b}"] = 1 - values[b]
  unknown = set(values) - {h.name.lower() for h in Hyper}
  if unknown:
    raise TypeError(f"hyper_vector: unknown hyperparameters {sorted(unknown)}")
  slots = [values.get(h.name.lower(), _DEFAULTS.get(h, 0.0)) for h in Hyper]
  return jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in slots])


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
  """One row of the table.

  Attributes:
    id: the ``algo`` attribute of the kernels (dense from 0; part of the
      ABI between Python and the native library).
    name: lower-case name; the C++ enumerator is ``k`` + its CamelCase.
    states: the map (`optax8.maps.SIGNED` or ``UNSIGNED``) of each state,
      in kernel order.
    direction: the pure-JAX rule ``(h, g, s) -> d``: ``h`` the
      hyperparameter vector (index it with `Hyper`), ``g`` the float32
      gradient (coupled decay added), ``s`` a list of the float32 states,
      replaced in place by the new ones; ``d`` is the direction. A rule
      that also takes ``ops`` (``(h, g, s, ops=REAL)``) and squares and
      signs with ``ops.square`` and ``ops.sign`` runs on complex leaves too
      (`optax8.complex_leaves`).
    cxx: the same rule in C++: the body of ``template <typename F> F
      direction(const HyperF<F>& h, F g, F* s)``, where ``h.v[kB1]`` reads a
      slot, ``h.one`` is 1, ``zero`` is 0 and ``vsqrt``, ``vsign``,
      ``vselect(mask, a, b)``, ``vfinite``, ``vpositive`` work on any F
      (a float or a SIMD vector). Write the operations in the order of
      ``direction``: the backends agree bit for bit.
  """

  id: int
  name: str
  states: tuple[str, ...]
  direction: Callable
  cxx: str

  @property
  def takes_complex(self) -> bool:
    """``direction`` takes ``ops``: the rule runs on real views of complex leaves."""
    return "ops" in inspect.signature(self.direction).parameters

  @property
  def cxx_name(self) -> str:
    return _camel(self.name)

  @property
  def fingerprint(self) -> int:
    """A 32-bit digest of the row as the native libraries compile it (and of the slots of `Hyper`)."""
    slots = ",".join(f"{h.name}={int(h)}" for h in Hyper)
    text = "|".join([str(self.id), self.name, ",".join(self.states), textwrap.dedent(self.cxx).strip(), slots])
    return zlib.crc32(text.encode())

  def __int__(self) -> int:
    return self.id

  __index__ = __int__

  def __repr__(self) -> str:
    return f"Algorithm({self.name!r}, id={self.id})"


_TABLE: dict[int, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
  """Adds a row (at import of the module that defines it); returns it.

  A row with the id and name of a registered one must have its states and
  C++ rule too (a module run again), and then replaces it.
  """
  for other in _TABLE.values():
    same = (other.id, other.name, other.states, other.cxx) == (algorithm.id, algorithm.name, algorithm.states,
                                                                algorithm.cxx)
    if not same and (other.id == algorithm.id or other.name == algorithm.name):
      raise ValueError(f"algorithm {algorithm!r} clashes with {other!r}")
  if not algorithm.states or any(k not in maps.MAP_KINDS for k in algorithm.states):
    raise ValueError(f"algorithm {algorithm!r}: states must be a non-empty tuple of {maps.MAP_KINDS}")
  _TABLE[algorithm.id] = algorithm
  return algorithm


def table() -> list[Algorithm]:
  """Every row, by id (imports `optax8.optimizers`, which registers them)."""
  importlib.import_module("optax8.optimizers")
  rows = sorted(_TABLE.values(), key=lambda a: a.id)
  if [a.id for a in rows] != list(range(len(rows))):
    raise ValueError(f"algorithm ids must be 0..{len(rows) - 1}, got {[a.id for a in rows]}")
  return rows


def get(algo) -> Algorithm:
  """The row of an id (or the row itself)."""
  if isinstance(algo, Algorithm):
    return algo
  if int(algo) not in _TABLE:
    table()
  try:
    return _TABLE[int(algo)]
  except KeyError:
    raise ValueError(f"unknown algorithm id {algo!r}; known: {[a.name for a in table()]}") from None


# ---- the generated C++ -------------------------------------------------------

_HEADER = pathlib.Path(__file__).parents[2] / "ffi" / "include" / "optax8"
_MAP_NAMES = {maps.SIGNED: "kSignedMap", maps.UNSIGNED: "kUnsignedMap"}


def _camel(name: str) -> str:
  return "k" + "".join(part.capitalize() for part in name.lower().split("_"))


def _source(a: Algorithm) -> str:
  """The file that defines a row."""
  return a.direction.__module__.replace(".", "/") + ".py"


def cxx_header() -> str:
  """C++ source of ``ffi/include/optax8/algorithms.h``."""
  rows = table()
  max_states = max(len(a.states) for a in rows)
  states_cases = "\n".join(f"    case {a.cxx_name}: return {len(a.states)};" for a in rows)

  def map_of(a):
    expr = _MAP_NAMES[a.states[-1]]
    for i in reversed(range(len(a.states) - 1)):
      expr = f"i == {i} ? {_MAP_NAMES[a.states[i]]} : {expr}"
    return expr

  map_cases = "\n".join(f"    case {a.cxx_name}: return {map_of(a)};" for a in rows)
  fingerprints = ", ".join(f"{a.fingerprint:#010x}u" for a in rows)
  enum = "\n".join(f"  {a.cxx_name} = {a.id},  // {_source(a)}: {', '.join(a.states)}" for a in rows)
  each = " ".join(f"X({a.cxx_name})" for a in rows)
  slots = "\n".join(f"  {_camel(h.name)} = {int(h)}," for h in Hyper)
  return f"""\
// Generated by `python -m optax8.kernels.algorithms`; do not edit.
// The table of algorithms (optax8/kernels/algorithms.py): ids, the maps of
// their states, the hyperparameter slots and constants shared with Python.
#pragma once

#include <cstdint>

#include "optax8/quantize.h"

namespace optax8 {{

// Algorithms (the `algo` attribute of the step).
enum Algo : int64_t {{
{enum}
}};
constexpr int kNumAlgos = {len(rows)};
constexpr int kMaxStates = {max_states};

// X(kName) for every algorithm: the handlers' switches over algorithms are
// written with it and have no default, so each covers the whole table.
#define OPTAX8_FOR_EACH_ALGO(X) {each}

// The number of states of an algorithm (0: not an algorithm).
OPTAX8_HD constexpr int algo_states(int64_t algo) {{
  switch (algo) {{
{states_cases}
  }}
  return 0;
}}

// The map of state i of an algorithm.
OPTAX8_HD constexpr int64_t state_map(int64_t algo, int i) {{
  switch (algo) {{
{map_cases}
  }}
  return kSignedMap;
}}

// Algorithm.fingerprint of each row: the libraries report them
// (optax8_<platform>_rule_fingerprint), and a row whose rule changed since
// the build runs on the pure-JAX backend instead.
constexpr uint32_t kRuleFingerprints[kNumAlgos] = {{{fingerprints}}};

// Slots of the float32 hyperparameter vector (a device buffer, so a new
// learning rate or step count never recompiles); see optax8.kernels.algorithms.Hyper.
enum Hyper : int {{
{slots}
  kNumHyper = {NUM_HYPER},
}};

// The largest block of the CUDA step (optax8.kernels.algorithms.CUDA_MAX_STEP_BLOCK).
constexpr int64_t kCudaMaxStepBlock = {CUDA_MAX_STEP_BLOCK};

}}  // namespace optax8
"""


def cxx_rules() -> str:
  """C++ source of ``ffi/include/optax8/algorithm_rules.inc``."""
  branches = []
  for i, a in enumerate(table()):
    body = textwrap.indent(textwrap.dedent(a.cxx).strip(), "    ")
    keyword = "if" if i == 0 else "} else if"
    branches.append(f"  {keyword} constexpr (A == {a.cxx_name}) {{  // {_source(a)}\n{body}")
  return f"""\
// Generated by `python -m optax8.kernels.algorithms`; do not edit.
// Each algorithm's direction, from its row (optax8/optimizers). No include
// guard: step_rule.inc includes it where F's helpers are declared.

template <int A, typename F>
OPTAX8_RULE F direction(const HyperF<F>& h, F g, F* s) {{
  const F zero{{}};
  (void)zero;
{chr(10).join(branches)}
  }} else {{
    static_assert(A != A, "an algorithm without a rule");
  }}
}}
"""


GENERATED = {"algorithms.h": cxx_header, "algorithm_rules.inc": cxx_rules}


def write(directory: pathlib.Path = _HEADER) -> list[pathlib.Path]:
  """Writes the generated files into ``directory``; returns their paths."""
  out = []
  for name, source in GENERATED.items():
    path = directory / name
    path.write_text(source())
    out.append(path)
  return out


if __name__ == "__main__":   # the package's module, not this copy, holds the registered rows
  for path in importlib.import_module("optax8.kernels.algorithms").write():
    print(path)
