"""The optimizers, one module per algorithm (as optax.contrib keeps them).

Each module holds an algorithm's whole definition: its row of the table of
algorithms (`optax8.kernels.algorithms`: the state maps and the
per-element rule in JAX and in C++), its state type, its ``scale_by_*``
building block and its optimizers (drop-in replacements for their optax
namesakes, with the math in their docstrings). Every module here is
imported with the package and its ``__all__`` is exported by ``optax8``:
adding an optimizer is adding a module (see docs/adding_an_optimizer.md).

Every optimizer takes its optax namesake's arguments and defaults and the
8-bit options ``bits`` (8, 4 or 32; default 8), ``block_size`` (default 256, 128 at 4 bits),
``min_8bit_size`` (default 4096: smaller leaves keep float32 state),
``max_unorm`` (default 0, off) and ``percentile_clipping`` (default 100,
off: see [`optax8.percentile_clipping`][optax8.clipping.percentile_clipping]).
All options but ``min_8bit_size`` may be set per leaf: a pytree (prefix) of
the params or a callable of them, like optax's ``mask`` (see
`optax8.options`); leaves under a ``stable_embedding`` key keep 32-bit
state unless ``bits`` says otherwise per leaf. The optimizers' kernels also
apply the learning rate and weight decay (one pass over each leaf per
step); with ``bits=32`` each equals optax's float32 optimizer to float32
rounding. The building blocks return the direction (no learning rate), like
their optax counterparts.

Example::

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(3e-4, weight_decay=0.1))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An entry of the registry of optimizers.

  Attributes:
    name: the public name (``adamw8bit``).
    make: the factory, learning rate first.
    reference: the optax float32 optimizer of the same arguments (its
      namesake), or None.
    state_fields: the names of the state fields that hold per-leaf states.
  """

  name: str
  make: Callable
  reference: Callable | None
  state_fields: tuple[str, ...]


REGISTRY: dict[str, Optimizer] = {}


def register(name: str, make: Callable, reference: Callable | None, state_fields: tuple[str, ...]) -> None:
  """Adds an optimizer to the registry (from its module)."""
  if name in REGISTRY:
    raise ValueError(f"optimizer {name!r} is registered twice")
  REGISTRY[name] = Optimizer(name, make, reference, tuple(state_fields))


__all__ = []
for _module in MODULES:
  _mod = importlib.import_module(f"{__name__}.{_module}")
  for _name in _mod.__all__:
    globals()[_name] = getattr(_mod, _name)
    __all__.append(_name)
del _module, _mod, _name
