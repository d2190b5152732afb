"""Apply gradients in one pass: the kernel writes the new parameters.

``optax.apply_updates(params, tx.update(grads, state, params)[0])`` reads
and writes every parameter twice (once for the update, once to add it).
optax8's optimizers are `FusedGradientTransformation`s: their ``update``
also carries a fused apply, in which each 8-bit leaf's kernel writes ``p +
update`` over the parameter instead (aliased, so a donated jitted step
updates params, state and nothing else in place)::

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply_step(params, state, grads):
      return optax8.apply_gradients(tx, grads, state, params)

[`apply_gradients`][optax8.apply.apply_gradients] falls back to ``update``
plus ``optax.apply_updates`` for any other transformation, with the same
results. The fused apply lives on ``tx.update``, so it survives anything
that rebuilds a transformation from its ``init`` and ``update``;
[`fused_apply`][optax8.apply.fused_apply] asks for it, and
[`chain`][optax8.apply.chain], [`partition`][optax8.apply.partition] and
[`inject_hyperparams`][optax8.apply.inject_hyperparams] are
``optax.chain``, ``optax.partition`` and ``optax.inject_hyperparams``
keeping their transformations' (optax's own hide their parts).

In a step that receives the gradients (``(params, state, grads)``, for
example after gradient accumulation) each kernel writes over its donated
parameter: one read of the gradient, one read and write of each parameter
and state, no temporaries. Where the step has read a parameter before the
update (its forward and backward passes), the backward pass may still need
it after the kernel could run; written over it, XLA would copy the
parameter twice (once for the readers, once for the kernel to overwrite).
There the kernel writes the new parameter to its own buffer, and XLA copies
the parameter once, as it does for optax's own optimizers
(`overwritable`).
"""

from __future__ import annotations

from typing import Callable

import functools

import jax
import optax


class FusedUpdate:
  """The ``update`` of a fused transformation, carrying its fused apply.

  Calling it is calling ``update``. ``apply_gradients(grads, state, params,
  **extra_args) -> (new_params, new_state)`` equals ``update`` followed by
  ``optax.apply_updates``, with the kernels writing the new parameters.
  Two optional parts let `chain` hand a last `optax8.param_rounding` to
  the fused apply before it: ``apply_rounded(grads, state, params,
  request, **extra_args)`` is ``apply_gradients`` with the new parameters
  rounded as ``request`` (`optax8.low_precision.ParamRounding`) asks, and
  ``param_rounding(updates, state, params) -> (request, new_state)`` is
  the request of a param_rounding transformation.
  """

  __slots__ = ("_update", "apply_gradients", "apply_rounded", "param_rounding", "__wrapped__", "__weakref__")

  def __init__(self, update: Callable, apply_gradients: Callable, apply_rounded: Callable | None = None,
               param_rounding: Callable | None = None):
    self._update = update
    self.apply_gradients = apply_gradients
    self.apply_rounded = apply_rounded
    self.param_rounding = param_rounding
    self.__wrapped__ = update   # inspect.signature (and jax.jit) see the update function

  def __call__(self, updates, state, params=None, **extra_args):
    return self._update(updates, state, params, **extra_args)


class FusedGradientTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation whose kernels can also write the new parameters.

  ``init`` and ``update`` are optax's; ``apply_gradients(grads, state,
  params)`` returns ``(new_params, new_state)``, equal to ``update``
  followed by ``optax.apply_updates``. Make one with ``optax8.apply.fused_transformation``.
  """

  __slots__ = ()

  def apply_gradients(self, grads, state, params, **extra_args):
    return self.update.apply_gradients(grads, state, params, **extra_args)


def fused_transformation(init: Callable, update: Callable, apply_gradients: Callable,
                         apply_rounded: Callable | None = None,
                         param_rounding: Callable | None = None) -> FusedGradientTransformation:
  """A `FusedGradientTransformation` from its functions (`FusedUpdate`)."""
  return FusedGradientTransformation(init, FusedUpdate(update, apply_gradients, apply_rounded, param_rounding))


def fused_from_run(init: Callable, run: Callable, rounds: bool = False,
                   param_rounding: Callable | None = None) -> FusedGradientTransformation:
  """A `FusedGradientTransformation` from ``init`` and ``run(updates, state, params, apply)``, which returns
  the updates (``apply`` False) or the new params (``apply`` True), and the new state. With ``rounds``,
  ``run`` also takes ``request`` (`FusedUpdate`'s ``apply_rounded``)."""

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return run(updates, state, params, apply=False)

  def apply_gradients_fn(grads, state, params, **extra_args):
    del extra_args
    return run(grads, state, params, apply=True)

  def apply_rounded_fn(grads, state, params, request, **extra_args):
    del extra_args
    return run(grads, state, params, apply=True, request=request)

  return fused_transformation(init, update_fn, apply_gradients_fn, apply_rounded_fn if rounds else None,
                              param_rounding)


def fused_apply(tx) -> Callable | None:
  """``tx``'s fused apply, ``(grads, state, params, **extra_args) -> (new_params, new_state)``, or None."""
  update = getattr(tx, "update", None)
  return update.apply_gradients if isinstance(update, FusedUpdate) else None


def _part(tx, name: str):
  """The `FusedUpdate` part ``name`` of ``tx``, or None."""
  update = getattr(tx, "update", None)
  return getattr(update, name) if isinstance(update, FusedUpdate) else None


def around_state(tx, init: Callable, enter: Callable, leave: Callable) -> optax.GradientTransformationExtraArgs:
  """``tx`` with ``init``, whose parts (``update``, the fused applies, a param_rounding request) take their
  state through ``enter(updates, state, params)`` and return it through ``leave(state)``; the fused parts
  ``tx`` has are kept."""
  inner = optax.with_extra_args_support(tx)
  apply, rounded, rounder = fused_apply(tx), _part(tx, "apply_rounded"), _part(tx, "param_rounding")

  def update(updates, state, params=None, **extra_args):
    updates, state = inner.update(updates, enter(updates, state, params), params, **extra_args)
    return updates, leave(state)

  if apply is None:
    return optax.GradientTransformationExtraArgs(init, update)

  def apply_gradients(grads, state, params, **extra_args):
    params, state = apply(grads, enter(grads, state, params), params, **extra_args)
    return params, leave(state)

  def apply_rounded(grads, state, params, request, **extra_args):
    params, state = rounded(grads, enter(grads, state, params), params, request, **extra_args)
    return params, leave(state)

  def param_rounding(updates, state, params):
    request, state = rounder(updates, enter(updates, state, params), params)
    return request, leave(state)

  return fused_transformation(init, update, apply_gradients, apply_rounded if rounded is not None else None,
                              param_rounding if rounder is not None else None)


def checking_inputs(tx, check: Callable, check_init: Callable | None = None) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` and fused applies first call ``check(updates, state, params)`` (which raises
  on bad input), and whose ``init`` first calls ``check_init(params)`` where given; its fused parts are kept."""
  def init(params):
    if check_init is not None:
      check_init(params)
    return tx.init(params)

  def enter(updates, state, params):
    check(updates, state, params)
    return state

  return around_state(tx, init, enter, lambda state: state)


def chain(*transforms) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(*transforms)``, keeping the last transformation's fused apply.

  Its ``apply_gradients`` runs the other transformations' ``update`` on the
  gradients, then the last one's fused apply; without a fused last
  transformation this is ``optax.chain``. The state is ``optax.chain``'s.
  Where the last is `optax8.param_rounding` and the one before has a fused
  apply that rounds (optax8's optimizers), that fused apply rounds the new
  parameters itself, in the kernels.
  """
  chained = optax.chain(*transforms)
  last = fused_apply(transforms[-1]) if transforms else None
  if last is None:
    return chained
  first = [optax.with_extra_args_support(tx) for tx in transforms[:-1]]
  rounder = _part(transforms[-1], "param_rounding")
  rounded = _part(transforms[-2], "apply_rounded") if rounder is not None and len(transforms) > 1 else None
  last_rounded = _part(transforms[-1], "apply_rounded")

  def run_first(grads, state, params, n, extra_args):
    new_states = []
    for tx, s in zip(first[:n], state[:n]):
      grads, s = tx.update(grads, s, params, **extra_args)
      new_states.append(s)
    return grads, new_states

  def apply_gradients(grads, state, params, **extra_args):
    if rounded is not None:   # the fused apply before the rounding rounds
      grads, new_states = run_first(grads, state, params, len(first) - 1, extra_args)
      request, rounding_state = rounder(grads, state[-1], params)
      params, s = rounded(grads, state[-2], params, request, **extra_args)
      return params, (*new_states, s, rounding_state)
    grads, new_states = run_first(grads, state, params, len(first), extra_args)
    params, last_state = last(grads, state[-1], params, **extra_args)
    return params, (*new_states, last_state)

  def apply_rounded(grads, state, params, request, **extra_args):
    grads, new_states = run_first(grads, state, params, len(first), extra_args)
    params, last_state = last_rounded(grads, state[-1], params, request, **extra_args)
    return params, (*new_states, last_state)

  return fused_transformation(chained.init, chained.update, apply_gradients,
                              apply_rounded if last_rounded is not None else None)


def partition(transforms: dict, param_labels, *, mask_compatible_extra_args: bool = False):
  """``optax.partition(transforms, param_labels)``, keeping the fused applies of its transformations.

  Its ``apply_gradients`` runs each group's transformation on its masked
  leaves with `apply_gradients` (the fused apply where it has one) and
  merges the new parameters; without any fused transformation this is
  ``optax.partition``. The state is ``optax.partition``'s.
  """
  partitioned = optax.partition(transforms, param_labels, mask_compatible_extra_args=mask_compatible_extra_args)
  if all(fused_apply(tx) is None for tx in transforms.values()):
    return partitioned

  def apply_gradients_fn(grads, state, params, **extra_args):
    labels = param_labels(grads) if callable(param_labels) else param_labels
    new_params, inner_states = params, {}
    for group, tx in transforms.items():
      mask = jax.tree.map(lambda label: label == group, labels)
      masked = lambda tree: jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), mask, tree)
      group_params, inner = apply_gradients(optax.with_extra_args_support(tx), masked(grads),
                                            state.inner_states[group].inner_state, masked(params), **extra_args)
      new_params = jax.tree.map(lambda m, new, old: new if m else old, mask, group_params, new_params)
      inner_states[group] = optax.MaskedState(inner_state=inner)
    return new_params, optax.PartitionState(inner_states)

  return fused_transformation(partitioned.init, partitioned.update, apply_gradients_fn)


def inject_hyperparams(inner_factory: Callable, static_args=(), hyperparam_dtype=None) -> Callable:
  """``optax.inject_hyperparams(inner_factory, ...)``, keeping the inner transformation's fused apply.

  The returned factory takes ``inner_factory``'s arguments (schedules for
  any numeric one) and builds ``optax.inject_hyperparams``'s transformation,
  with the same state (``hyperparams`` may be changed between steps without
  recompiling). Its ``apply_gradients`` computes the hyperparameters as
  ``update`` does and runs the inner transformation's fused apply with them
  (``update`` plus ``optax.apply_updates`` where it has none).
  """
  pending = []   # one slot per apply_gradients in progress, innermost last

  @functools.wraps(inner_factory)
  def capturing_factory(*args, **kwargs):
    tx = inner_factory(*args, **kwargs)
    if not pending or "params" in pending[-1]:
      return tx
    slot = pending[-1]

    def update_writing_params(grads, state, params=None, **extra_args):
      slot["params"], state = apply_gradients(tx, grads, state, params, **extra_args)
      return grads, state   # not used: apply_gradients returns the parameters from the slot

    return optax.GradientTransformationExtraArgs(tx.init, update_writing_params)

  injected_factory = optax.inject_hyperparams(capturing_factory, static_args, hyperparam_dtype)

  @functools.wraps(inner_factory)
  def factory(*args, **kwargs) -> FusedGradientTransformation:
    injected = injected_factory(*args, **kwargs)

    def apply_gradients_fn(grads, state, params, **extra_args):
      pending.append({})
      try:
        _, state = injected.update(grads, state, params, **extra_args)
        slot = pending[-1]
      finally:
        pending.pop()
      if "params" not in slot:
        raise RuntimeError("optax8.inject_hyperparams: optax.inject_hyperparams did not call the inner "
                           "transformation's update")
      return slot["params"], state

    return fused_transformation(injected.init, injected.update, apply_gradients_fn)

  return factory


def overwritable(params, grads) -> list[bool]:
  """Per leaf: whether the step's kernel may write the new parameter over ``params[i]``.

  False where an operation already traced into the parameter's jaxpr reads
  it and leads to the gradient of another leaf but not to ``grads[i]``:
  the backward pass of the layer below. XLA runs the readers that lead to
  ``grads[i]`` before the kernel, and may run that one after it. True for
  concrete arrays and for tracers of other kinds (vmap, grad).
  """
  out = [True] * len(params)
  frames = {}   # per jaxpr being traced: its operations, the readers of each variable, and (once needed) the
  #               bits of the gradients each variable leads to
  for i, p in enumerate(params):
    try:
      frame, var = p._trace.frame, p.val
      if id(frame) not in frames:
        eqns, readers = frame.get_eqns(), {}
        for e in eqns:
          for v in e.invars:
            readers.setdefault(id(v), []).append(e)
        frames[id(frame)] = {"eqns": eqns, "readers": readers, "reach": None}
    except (AttributeError, TypeError):
      continue
    info = frames[id(frame)]
    mine = info["readers"].get(id(var))
    if not mine:
      continue
    if info["reach"] is None:   # one sweep, last operation to first
      reach = {}
      for j, x in enumerate(grads):
        if getattr(getattr(x, "_trace", None), "frame", None) is frame:
          reach[id(x.val)] = reach.get(id(x.val), 0) | (1 << j)
      for e in reversed(info["eqns"]):
        bits = 0
        for v in e.outvars:
          bits |= reach.get(id(v), 0)
        if bits:
          for v in e.invars:
            reach[id(v)] = reach.get(id(v), 0) | bits
      info["reach"] = reach
    for e in mine:
      bits = 0
      for v in e.outvars:
        bits |= info["reach"].get(id(v), 0)
      if bits and not bits >> i & 1:
        out[i] = False
        break
  return out


def apply_gradients(tx, grads, state, params, **extra_args):
  """Returns ``(new_params, new_state)`` for one optimizer step.

  Equals ``updates, state = tx.update(grads, state, params, **extra_args)``
  then ``optax.apply_updates(params, updates)``; where ``tx`` has a fused
  apply (optax8's optimizers, and `chain`, `partition`,
  `inject_hyperparams` or `optax8.offload` of them) the
  sum ``p + update`` is formed in float32 inside the kernel and rounded
  once to the parameter's dtype.
  """
  fn = fused_apply(tx)
  if fn is None:
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state
  return fn(grads, state, params, **extra_args)
