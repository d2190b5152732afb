"""The fused optimizer engine: the GradientTransformation of an algorithm.

Every optax8 optimizer (`optax8.optimizers`) is a `fused` transformation:
per parameter leaf, one kernel call (`optax8.dispatch.step_group`)
dequantizes the leaf's 8-bit states, applies the optimizer's rule,
requantizes the new states and writes the update in the gradient's dtype::

    u = scale * (d(g + wd_c * p, states) + wd * p)

where ``d`` is the algorithm's direction (Adam's ``m_hat / (sqrt(v_hat) +
eps)``, Lion's ``sign(...)``, ...), ``scale`` is ``-learning_rate`` for the
optimizers and 1 for the ``scale_by_*`` building blocks, ``wd`` the
decoupled and ``wd_c`` the coupled weight decay. Hooks over whole leaves
(`Rule`'s ``pre`` and ``post``) run in JAX around the kernel. Leaves
smaller than ``min_8bit_size`` elements (or with ``bits`` 32; the options
may be set per leaf, see `optax8.options`) keep float32 state and run
the same rule in JAX.

Hyperparameters reach the kernels as a float32 device vector, so a new
learning rate (a schedule, `optax.inject_hyperparams`) never
recompiles. A gradient element that is NaN or infinite, or whose step
overflows float32 (a finite gradient above 1.8e19 squares to infinity),
gives a zero update and zero states for that element only; it never
reaches its block's absmax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax8 import clipping, dispatch, maps, rounding
from optax8.apply import FusedGradientTransformation, chain, checking_inputs, fused_from_run, overwritable
from optax8.complex_leaves import PAIRS, REAL, from_real_view, is_complex, real_view
from optax8.kernels import jax_step
from optax8.kernels.algorithms import Algorithm, hyper_vector
from optax8.kernels.jax_step import rule
from optax8.layout import absmax_shape, packed_shape, tile_rows
from optax8.options import Options, as_array, boxes, is_static_zero, key_paths, path_str, unbox
from optax8.low_precision import ParamRounding, new_param, with_param_rounding
from optax8.quantize import QuantizedArray, packing_problem
from optax8.sharding import on_one_sharding, state_shardings, zero_count

GROUP_ELEMENTS = 1 << 18  # leaves are stepped together up to this many elements per kernel call
GROUP_LEAVES = 64         # and up to this many leaves (XLA's compile time grows with a call's operands)

def schedule_value(x, count):
  """A hyperparameter that may be a schedule of the step count."""
  return x(count) if callable(x) else x


def check_state_dtype(dtype, name: str) -> None:
  """optax's ``mu_dtype``/``accumulator_dtype``: optax8 states are float32 or 8-bit."""
  if dtype is not None and jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f"{name}={dtype}: optax8 keeps states in 8 bits (or float32 with bits=32)")


# ---- paths and checks -------------------------------------------------------


def _paths(tree) -> list[str]:
  return [path_str(path) for path in key_paths(tree)]


def _flatten_like(treedef, tree, what: str, name: str):
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name}: {what} does not have the structure of the updates: {e}") from None


def check_inexact(name: str, path: str, x) -> None:
  """A TypeError naming leaf ``path`` unless ``x`` (an array or a Python number) is floating-point or complex."""
  dtype = jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"{name}: leaf {path} has dtype {dtype}: only floating-point and complex leaves can be optimized; "
                    "leave it out of the optimizer with optax.masked or optax.partition (e.g. optax.set_to_zero())")


def _check_param(name: str, path: str, x, algorithm: Algorithm) -> None:
  check_inexact(name, path, x)
  if is_complex(x) and not algorithm.takes_complex:
    raise TypeError(f"{name}: leaf {path} is complex ({jnp.dtype(x.dtype)}), which {name} does not support; leave it "
                    "out with optax.partition (e.g. to optax8.adamw8bit)")


def _state_leaf(kind: str, shape, bits: int, block_size: int, initial, shardings=None):
  """The initial state of one leaf: ``initial`` everywhere, placed on ``shardings`` (see optax8.sharding)."""
  full = jnp.full if shardings is None else shardings.full
  if bits == 32:
    return full(shape, initial, jnp.float32)
  kind = maps.with_bits(kind, bits)
  top = len(maps.dynamic_map(kind)) - 1   # the code of 1: initial * 1
  code = top if not is_static_zero(initial) else int(maps.nearest_code(np.zeros(1, np.float32), kind)[0])
  absmax = full(absmax_shape(shape, block_size), jnp.asarray(initial, jnp.float32), jnp.float32)
  if bits == 4:   # two codes a byte
    return QuantizedArray(full(packed_shape(shape), code | code << 4, jnp.uint8), absmax, block_size, kind, shape[-1])
  return QuantizedArray(full(shape, code, jnp.uint8), absmax, block_size, kind)


def _shard_columns(leaf, g):
  """A 4-bit ``leaf`` whose codes are a shard of its columns (``tx.update`` inside ``shard_map`` on a leaf split
  along its last axis: the codes are the shard's, the static ``columns`` the whole leaf's) with the gradient's
  columns; the new state gets the whole leaf's back. Any other leaf as it is."""
  if (isinstance(leaf, QuantizedArray) and leaf.bits == 4 and leaf.columns and np.ndim(g) >= 1
      and leaf.columns != g.shape[-1] and leaf.columns % max(g.shape[-1], 1) == 0
      and tuple(leaf.codes.shape) == packed_shape(tuple(g.shape))):
    return dataclasses.replace(leaf, columns=g.shape[-1])
  return leaf


def _check_state_leaf(name: str, path: str, g, leaf, kind: str, block_size: int | None, bits: int | None = None,
                      min_size: int = 0):
  shape = tuple(g.shape)
  has = leaf.bits if isinstance(leaf, QuantizedArray) else 32
  if bits is not None and bits != has:
    small = (f" This leaf has {math.prod(shape)} elements here, fewer than min_8bit_size {min_size}: inside "
             "shard_map the optimizer sees each shard, so make the state there too (tx.init inside the same "
             "shard_map) or lower min_8bit_size." if has != 32 and math.prod(shape) < min_size else "")
    raise ValueError(f"{name}: leaf {path}: the state has {has}-bit state where the optimizer "
                     f"keeps {bits}-bit state; was it made with other bits or min_8bit_size?{small}")
  if isinstance(leaf, QuantizedArray):
    kind = maps.with_bits(kind, leaf.bits)
    if leaf.kind != kind:
      raise ValueError(f"{name}: leaf {path}: state uses the {leaf.kind} map, expected {kind}")
    if block_size is not None and leaf.block_size != block_size:
      raise ValueError(f"{name}: leaf {path}: state was made with block_size {leaf.block_size}, "
                       f"but the optimizer uses block_size {block_size}")
    got = leaf.shape
    if jnp.dtype(leaf.codes.dtype) != jnp.uint8 or jnp.dtype(leaf.absmax.dtype) != jnp.float32:
      raise TypeError(f"{name}: leaf {path}: {leaf.bits}-bit state must have uint8 codes and float32 absmax, got "
                      f"{leaf.codes.dtype} and {leaf.absmax.dtype}")
    if problem := packing_problem(leaf):
      raise ValueError(f"{name}: leaf {path}: {problem}")
    if got == shape and tuple(leaf.absmax.shape) != absmax_shape(shape, leaf.block_size):
      raise ValueError(f"{name}: leaf {path}: absmax shape {tuple(leaf.absmax.shape)} does not fit shape "
                       f"{shape} with block_size {leaf.block_size}")
  else:
    got = tuple(np.shape(leaf))
    if jnp.dtype(leaf.dtype) != jnp.float32:
      raise TypeError(f"{name}: leaf {path}: 32-bit state must be float32, got {leaf.dtype}")
  if got != shape:
    raise ValueError(f"{name}: leaf {path}: gradient shape {shape} differs from the optimizer state's "
                     f"shape {got}; was the state made for other parameters?")


def _check_grad(name: str, path: str, g, p):
  if not jnp.issubdtype(jnp.dtype(g.dtype), jnp.inexact):
    raise TypeError(f"{name}: leaf {path}: gradient has dtype {g.dtype}: only floating-point and complex leaves "
                    "can be optimized; leave it out with optax.masked or optax.partition (e.g. optax.set_to_zero())")
  if p is not None and is_complex(p) != is_complex(g):
    raise TypeError(f"{name}: leaf {path}: gradient dtype {g.dtype} and parameter dtype {p.dtype}: a complex "
                    "parameter needs a complex gradient and a real one a real gradient")


def norm(*arrays, of=lambda x: x):
  """The Euclidean norm of a whole leaf ``of(*arrays)`` in float32, non-finite elements counted as 0.

  Where the sum of squares overflows (an element above about 1.8e19, or
  many near it) it is that of ``x * 2**-80``, times ``2**80``: finite up to
  float32's largest value (the elements this drops, below 1e5, weigh under
  1e-28 of it), so a diverging gradient scales a trust ratio down instead
  of zeroing the whole leaf's update. XLA:CPU takes the second sum only
  then (a conditional on ``arrays``, so that ``of`` stays fused into the
  sums; taken every step, it made LAMB's and LARS's steps 30-50% slower
  there); elsewhere both sums are taken every step, as XLA may fuse two
  reductions of one input into one pass, while a GPU would wait for the
  host at a conditional.
  """
  return jax.lax.platform_dependent(cpu=lambda: _norm(arrays, of, True), default=lambda: _norm(arrays, of, False))


def _norm(arrays, of, conditional: bool):
  """`norm`, with the second sum under a conditional or taken every step."""
  def squares(scale, *arrays):
    x = of(*arrays).astype(jnp.float32)
    return jnp.sum(jnp.where(jnp.isfinite(x), x * x, 0) if scale is None else
                   jnp.where(jnp.isfinite(x), jnp.square(x * np.float32(scale)), 0))

  plain = squares(None, *arrays)
  scaled = lambda *arrays: jnp.sqrt(squares(2.0**-80, *arrays)) * np.float32(2.0**80)
  if conditional:
    return jax.lax.cond(jnp.isinf(plain), scaled, lambda *_: jnp.sqrt(plain), *arrays)
  return jnp.where(jnp.isinf(plain), scaled(*arrays), jnp.sqrt(plain))


def check_like_params(name: str, updates, params) -> None:
  """A ValueError naming the leaf where ``params`` differs from ``updates`` in structure or shape."""
  ps = _flatten_like(jax.tree.structure(updates), params, "params", name)
  for path, g, p in zip(key_paths(updates), jax.tree.leaves(updates), ps):
    _check_shape(name, path_str(path), g, p)


def _check_shape(name: str, path: str, g, p) -> None:
  if p is not None and jnp.shape(p) != jnp.shape(g):
    raise ValueError(f"{name}: leaf {path}: params shape {jnp.shape(p)} differs from the gradient's {jnp.shape(g)}")


def trust_ratio(param_norm, update_norm, coefficient=1.0, eps=0.0):
  """optax.scale_by_trust_ratio's factor: ``c ||p|| / (||u|| + eps)``, 1 where a norm is 0."""
  ratio = coefficient * param_norm / (update_norm + eps)
  return jnp.where((param_norm == 0) | (update_norm == 0), 1.0, ratio)


# ---- the engine -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """How an optimizer drives its algorithm's kernel.

  Attributes:
    algorithm: the row of `optax8.kernels.algorithms` whose rule runs.
    state: the optimizer's state type: a NamedTuple of ``count`` and one
      field per state of the algorithm, in kernel order.
    hyper: ``(count, count_inc) -> dict`` of hyperparameter slots (see
      `optax8.kernels.algorithms.hyper_vector`) shared by all leaves.
    initial: initial value of each state (a number, or an array under
      inject_hyperparams).
    learning_rate: None (the update is the direction) or a float/schedule
      (the update is ``-learning_rate * ...``).
    weight_decay: decoupled (``coupled=False``: added to the direction) or
      coupled (added to the gradient) weight decay, a float or schedule.
    decay_mask: optax-style mask of the leaves that get weight decay.
    pre: hook over a whole gradient leaf, ``(g, p, wd) -> factor``: the
      gradient (with coupled decay) is multiplied by ``-learning_rate *
      factor`` before the rule (LARS's trust ratio, before momentum), and
      the learning rate is not applied after it.
    pre_mask: optax-style mask of the leaves that get ``pre`` (factor 1
      elsewhere).
    post: hook over a whole leaf's direction, ``(d, p, wd, arg) -> x``: the
      update is ``-learning_rate * x`` (default ``x = d + wd * p``; LAMB's
      trust ratio, Muon's orthogonalisation). ``d`` and ``p`` are float32.
    post_args: ``updates -> list`` of one ``arg`` per leaf for ``post``.
  """

  algorithm: Algorithm
  state: type
  hyper: Callable[[jax.Array, jax.Array], dict]
  initial: tuple = ()
  learning_rate: Any = None
  weight_decay: Any = None
  coupled: bool = False
  decay_mask: Any = None
  pre: Callable | None = None
  pre_mask: Any = True
  post: Callable | None = None
  post_args: Callable | None = None


def _leaf_flags(mask, tree, treedef, name: str, what: str) -> list[bool]:
  """Per-leaf booleans from an optax-style mask (bool, pytree prefix or callable)."""
  if mask is None:
    mask = True
  m = mask(tree) if callable(mask) else mask
  try:
    full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), m, tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name}: {what} does not match the parameters' structure: {e}") from None
  return [bool(f) for f in _flatten_like(treedef, full, what, name)]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one leaf is stepped: decided from its path, shape and options and the `Rule`, before any value.

  Attributes:
    path: the leaf's key path, for errors.
    bits, block_size: its state's width and block size (None where the
      options are traced under inject_hyperparams: the state says).
    decay: the weight-decay mask selects it.
    pre: the ``pre`` hook applies to it (its mask).
    max_unorm: None (off) or the bound.
    post: its direction goes through `_post` (a ``post`` hook or max_unorm).
    post_arg: its argument of the ``post`` hook.
    coupled: the weight decay is added to the gradient (by the kernel).
    has_pre_hook: the `Rule` has a ``pre`` hook (the learning rate then
      scales the gradient, before the rule).
    stochastic: its 8-bit states are rounded stochastically (`optax8.rounding`).
  """

  path: str
  bits: int | None
  block_size: int | None
  decay: bool
  pre: bool
  max_unorm: Any
  post: bool
  post_arg: Any
  coupled: bool
  has_pre_hook: bool
  stochastic: bool = False

  @property
  def needs_params(self) -> bool:
    return self.has_pre_hook or self.post

  @property
  def kernel_params(self) -> bool:
    """The kernel reads p for weight decay: coupled decay, or decoupled decay applied by the kernel."""
    return self.decay and (self.coupled or not self.post)

  @property
  def hyper_key(self):
    """Leaves with equal keys share a hyperparameter vector (None: the leaf's own, from its pre-scale or its
    rounding seed)."""
    return None if self.has_pre_hook or self.stochastic else (self.decay, self.post)


def plan_leaves(name: str, r: Rule, options: Options, treedef, updates, params) -> list[LeafPlan]:
  """Each leaf's `LeafPlan`; per-leaf options are resolved on ``params`` (or ``updates`` without them)."""
  configured = params if params is not None else updates
  n = treedef.num_leaves
  unorms = options.leaf_max_unorms(name, configured)
  traced = any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves((options.bits, options.min_8bit_size)))
  bits = [None] * n if traced else options.leaf_bits(name, configured)
  block_sizes = options.leaf_block_sizes(name, configured, traced_ok=True, bits=bits)
  decay = _leaf_flags(r.decay_mask, configured, treedef, name, "the weight-decay mask")
  pre = (_leaf_flags(r.pre_mask, configured, treedef, name, "the mask of the pre-scale") if r.pre is not None
         else [False] * n)
  post_args = r.post_args(updates) if r.post_args is not None else [None] * n
  stochastic = [x == rounding.STOCHASTIC for x in options.leaf_roundings(name, configured)]
  return [LeafPlan(path, bits[i], block_sizes[i], decay[i], pre[i], unorms[i],
                   r.post is not None or unorms[i] is not None, post_args[i], r.coupled, r.pre is not None,
                   stochastic[i])
          for i, path in enumerate(_paths(updates))]


def _leaf_hyper(r: Rule, base: dict, plan: LeafPlan, scale, wd, g, p, count, param_step=None) -> dict:
  """The hyperparameter slots of one leaf's kernel call (``param_step``: its new parameters' rounding step)."""
  wd_leaf = wd if plan.decay else 0.0
  hyper = dict(base)
  if plan.stochastic:
    hyper["rounding_step"] = jnp.bitwise_and(count, (1 << rounding.SEED_BITS) - 1)
  if plan.stochastic or param_step is not None:
    hyper["rounding_seed"] = rounding.leaf_seed(plan.path)
  if param_step is not None:
    hyper["param_rounding_step"] = param_step
  if r.coupled:
    hyper["coupled_decay"] = wd_leaf
  if r.pre is not None:   # the learning rate scales the gradient, before the rule
    hyper["pre_scale"] = scale * (r.pre(g, p, wd_leaf) if plan.pre else 1.0)
    hyper["scale"] = 1.0
  elif plan.post:         # the learning rate and the decoupled decay come after the hook
    hyper["scale"] = 1.0
  else:
    hyper["scale"] = scale
    if not r.coupled:
      hyper["weight_decay"] = wd_leaf
  return hyper


def fused(name: str, r: Rule, options: Options) -> FusedGradientTransformation:
  """Builds the GradientTransformation of one fused optimizer.

  With ``options.percentile_clipping`` on, the result is
  ``optax.chain(percentile_clipping(...), optimizer)`` (see
  `with_percentile_clipping`); with ``options.param_rounding``
  stochastic anywhere, that is followed by `optax8.param_rounding`.
  """
  options.check(name)
  algorithm = r.algorithm
  kinds = algorithm.states
  state_cls = r.state
  initial = r.initial or (0.0,) * len(kinds)
  needs_decay_params = not is_static_zero(r.weight_decay)

  def init_fn(params):
    params = jax.tree.map(as_array, params)
    leaves, paths = jax.tree.leaves(params), _paths(params)
    for path, x in zip(paths, leaves):
      _check_param(name, path, x, algorithm)
    bits = options.leaf_bits(name, params)
    block_sizes = options.leaf_block_sizes(name, params, bits=bits)
    options.leaf_max_unorms(name, params)   # checked here, used by update
    options.leaf_roundings(name, params)
    states = []
    for path, x, b, bs, box in zip(paths, leaves, bits, block_sizes, boxes(params)):
      x = real_view(x) if is_complex(x) else x   # a complex leaf's state has its real view's shape
      shardings = state_shardings(name, path, x, b, bs)   # the state is sharded like the parameter
      leaf_states = (_state_leaf(k, tuple(x.shape), b, bs, v, shardings) for k, v in zip(kinds, initial))
      states.append(tuple(leaf if box is None else jax.tree.map(box, leaf) for leaf in leaf_states))
    # the state's structure is that of the unboxed params; its arrays are in their parameter's nnx
    # Variables (if any), so that nnx.get_partition_spec gives them the parameter's spec
    state_def = jax.tree.structure(unbox(params))
    fields = [state_def.unflatten([s[i] for s in states]) for i in range(len(kinds))]
    return state_cls(zero_count(leaves), *fields)   # replicated on the params' mesh (optax8.sharding)

  def run(updates, state, params, apply: bool, request: ParamRounding | None = None):
    """The update (or with ``apply`` the new params) and the new state; with ``request`` (`optax8.apply.chain`
    passes `optax8.param_rounding`'s) the new params of the leaves it selects rounded stochastically: a
    bfloat16 leaf's by its kernel, the others in JAX after their update."""
    if not isinstance(state, state_cls):
      raise TypeError(f"{name}: expected a {state_cls.__name__}, got {type(state).__name__}")
    boxed_def = jax.tree.structure(state)   # the arrays of init's state may be in nnx Variables:
    state = unbox(state)                    # stepped without them, returned in them
    count = state.count
    count_inc = optax.safe_increment(count)
    updates = jax.tree.map(as_array, updates)
    params = None if params is None else jax.tree.map(as_array, params)
    treedef = jax.tree.structure(updates)
    state_def = jax.tree.structure(unbox(updates))  # the state has no nnx Variable boxes
    grads = treedef.flatten_up_to(updates)
    moments = [_flatten_like(state_def, f, f"state field {state_cls._fields[i + 1]!r}", name)
               for i, f in enumerate(state[1:])]
    ps = _flatten_like(treedef, params, "params", name) if params is not None else [None] * len(grads)
    plans = plan_leaves(name, r, options, treedef, updates, params)
    if params is None and (apply or needs_decay_params or any(plan.needs_params for plan in plans)):
      raise ValueError(f"{name}: this optimizer needs the current params: call update(updates, state, params)")
    in_place = overwritable(ps, grads) if apply else [True] * len(grads)
    rounded = request.leaves if request is not None else (False,) * len(grads)

    lr = schedule_value(r.learning_rate, count)
    scale = 1.0 if r.learning_rate is None else -lr
    wd = schedule_value(r.weight_decay, count) if needs_decay_params else 0.0
    base = r.hyper(count, count_inc)

    # for the error of a state made for larger leaves (traced under inject_hyperparams: the state decides)
    min_size = 0 if isinstance(options.min_8bit_size, jax.core.Tracer) else options.resolved_min_8bit_size()
    calls, views = [], []
    for i, (plan, g, p, own) in enumerate(zip(plans, grads, ps, in_place)):
      _check_grad(name, plan.path, g, p)
      _check_shape(name, plan.path, g, p)
      pairs = is_complex(g)
      if pairs:   # stepped as real views (optax8.complex_leaves)
        _check_param(name, plan.path, g, algorithm)
        g, p = real_view(g), None if p is None else real_view(p)
      views.append(p)
      leaf_states = tuple(_shard_columns(m[i], g) for m in moments)
      for leaf, kind in zip(leaf_states, kinds):
        _check_state_leaf(name, plan.path, g, leaf, kind, plan.block_size, plan.bits, min_size)
      if isinstance(leaf_states[0], QuantizedArray):
        g, p, leaf_states = on_one_sharding(name, plan.path, g, p, leaf_states, plan.bits, plan.block_size)
      fused_apply = apply and not plan.post and isinstance(leaf_states[0], QuantizedArray)
      # the kernel rounds a bfloat16 leaf's new parameter; other rounded leaves get their update, rounded below
      round_params = fused_apply and rounded[i] and jnp.dtype(p.dtype) == jnp.dtype(jnp.bfloat16)
      fused_apply = fused_apply and (round_params or not rounded[i])
      kernel_p = p if fused_apply or (plan.kernel_params and needs_decay_params) else None
      hyper = _leaf_hyper(r, base, plan, scale, wd, g, p, count, request.step if round_params else None)
      calls.append(LeafCall(hyper, None if round_params else plan.hyper_key, g, kernel_p, leaf_states, fused_apply,
                            pairs, own, plan.stochastic, round_params))
    results = _run_leaves(algorithm, calls)
    out_u, out_states = [], [[] for _ in kinds]
    for i, ((u, new), plan, call, p, out, rounds) in enumerate(zip(results, plans, calls, views,
                                                                  ps if apply else grads, rounded)):
      if plan.post:
        u = _post(r, plan, u, call.g, p, scale, wd, call.pairs)
      if apply and rounds and not call.round_params:
        u = new_param(p, u, request.step, plan.path)
      elif apply and not call.apply:
        u = jnp.asarray(p + u).astype(p.dtype)
      if call.pairs:
        u = from_real_view(u, tuple(out.shape), out.dtype)
      out_u.append(u)
      for j, (s, m) in enumerate(zip(new, moments)):
        out_states[j].append(dataclasses.replace(s, columns=m[i].columns) if isinstance(s, QuantizedArray) else s)
    new_state = state_cls(count_inc, *[state_def.unflatten(s) for s in out_states])
    if jax.tree.structure(new_state) != boxed_def:
      new_state = boxed_def.unflatten(jax.tree.leaves(new_state))
    return treedef.unflatten(out_u), new_state

  tx = fused_from_run(init_fn, run, rounds=True)
  return with_param_rounding(name, options.param_rounding,
                             with_percentile_clipping(name, options.percentile_clipping, tx))


def with_percentile_clipping(name: str, percentile, tx):
  """``chain(percentile_clipping(percentile), tx)``, or ``tx`` where clipping is off.

  A fused ``tx`` stays fused (`optax8.apply.chain`): its fused apply clips,
  then lets the kernels write the new parameters.
  """
  if not Options(percentile_clipping=percentile).check(name).clipping_active():
    return tx

  def check(updates, state, params):
    if type(state) is not tuple or len(state) != 2 or not isinstance(state[0], clipping.PercentileClippingState):
      raise TypeError(f"{name}: expected the state of its init, percentile clipping's state and the optimizer's "
                      f"(percentile_clipping={percentile!r}); got a {type(state).__name__}: was it made by {name} "
                      "without percentile_clipping?")

  return checking_inputs(chain(clipping._percentile_clipping(percentile, 100, True, name, "percentile_clipping"), tx),
                         check)


class LeafCall(NamedTuple):
  """One leaf's step: its hyperparameter slots, gradient, parameter (or None), states."""

  hyper: dict         # slots for `hyper_vector`
  hyper_key: Any      # leaves with equal keys (not None) have equal slots
  g: jax.Array
  p: jax.Array | None
  states: tuple
  apply: bool  # 8-bit leaves only: return p + update
  pairs: bool = False   # g, p and the states are real views of a complex leaf: stepped in JAX
  in_place: bool = True   # with apply: the kernel may write over p (nothing traced before reads it)
  stochastic: bool = False   # round the quantized states stochastically
  round_params: bool = False   # with apply: round the new (bfloat16) parameter stochastically


def _run_leaves(algorithm: Algorithm, calls: list[LeafCall]):
  """(output, new states) per leaf: 8-bit and 4-bit leaves in one kernel call per group, float32 ones in JAX.

  Quantized leaves that share block size, layout (tiles of matrices or runs
  of vectors), params use, apply mode, rounding and bits go through
  `optax8.dispatch.step_group` calls of up to ``GROUP_ELEMENTS``
  elements and ``GROUP_LEAVES`` leaves (a larger leaf gets its own call):
  many small leaves share a call, while large gradients need not all be
  alive at once (a call reads all its gradients, so XLA keeps them until it
  runs).
  """
  vectors = {}

  def vector(c: LeafCall):
    """The hyperparameter vector of a leaf, made once per key."""
    if c.hyper_key is None:
      return hyper_vector(**c.hyper)
    if c.hyper_key not in vectors:
      vectors[c.hyper_key] = hyper_vector(**c.hyper)
    return vectors[c.hyper_key]

  results = [None] * len(calls)
  groups: dict[tuple, list[int]] = {}
  for i, c in enumerate(calls):
    if c.pairs:
      results[i] = _step_in_jax(algorithm, vector(c), c)
    elif all(isinstance(s, QuantizedArray) for s in c.states):
      block_size = c.states[0].block_size
      groups.setdefault((block_size, tile_rows(c.g.shape, block_size), c.p is None, c.apply, c.in_place,
                         c.stochastic, c.states[0].bits, c.round_params), []).append(i)
    else:
      u, new = rule(algorithm, vector(c), c.g.astype(jnp.float32), None if c.p is None else c.p.astype(jnp.float32),
                    c.states)
      results[i] = (u.astype(c.g.dtype), new)
  batches = []
  for key, idx in groups.items():
    current, size = [], 0
    for i in idx:
      n = int(np.prod(calls[i].g.shape))
      if current and (size + n > GROUP_ELEMENTS or len(current) == GROUP_LEAVES):
        batches.append((key, current))
        current, size = [], 0
      current.append(i)
      size += n
    batches.append((key, current))
  for (block_size, _, _, apply, in_place, stochastic, bits, round_params), idx in batches:
    leaves = []
    for i in idx:
      c = calls[i]
      flat = tuple(c.g.shape) or (1,)   # 4-bit leaves have rank >= 1
      leaves.append((c.g.reshape(flat), None if c.p is None else c.p.reshape(flat),
                     tuple((s.codes.reshape(s.codes.shape or flat), s.absmax) for s in c.states)))
    key = calls[idx[0]].hyper_key
    if key is not None and all(calls[i].hyper_key == key for i in idx):
      first = vector(calls[idx[0]])
      hypers = jnp.broadcast_to(first, (len(idx),) + first.shape)
    else:
      hypers = jnp.stack([vector(calls[i]) for i in idx])
    for i, (u, new) in zip(idx, dispatch.step_group(algorithm.id, hypers, leaves, block_size, apply, in_place,
                                                    stochastic, bits, round_params)):
      c = calls[i]
      results[i] = (u.reshape(c.g.shape), tuple(QuantizedArray(code.reshape(s.codes.shape), a, s.block_size, s.kind,
                                                               s.columns) for (code, a), s in zip(new, c.states)))
  return results


def _step_in_jax(algorithm: Algorithm, hyper, c: LeafCall):
  """(output, new states) of a complex leaf (on its real view: ``rule`` and ``step`` with ``pairs``), in JAX."""
  if isinstance(c.states[0], QuantizedArray):
    first = c.states[0]
    options = dict(block_size=first.block_size, apply=c.apply, pairs=c.pairs, bits=first.bits)
    out, new = jax.lax.platform_dependent(   # XLA:CPU: a slice at a time (bounded temporaries)
        c.g, c.p, tuple((s.codes, s.absmax) for s in c.states),
        rounding.index_vectors(c.g.shape) if c.stochastic else None,
        cpu=lambda g, p, states, index: jax_step.step_in_chunks(algorithm, hyper, g, p, states, index=index,
                                                                **options),
        default=lambda g, p, states, index: jax_step.step(algorithm, hyper, g, p, states, index=index, **options))
    return out, tuple(QuantizedArray(code, a, s.block_size, s.kind, s.columns) for (code, a), s in zip(new, c.states))
  u, new = rule(algorithm, hyper, c.g.astype(jnp.float32), None if c.p is None else c.p.astype(jnp.float32),
                c.states, pairs=c.pairs)
  return u.astype(c.g.dtype), new


def _post(r: Rule, plan: LeafPlan, d, g, p, scale, wd, pairs: bool = False):
  """Direction ``d`` -> update, with max_unorm, then ``r.post`` (or decoupled decay), then the learning rate.

  max_unorm scales the direction by ``min(1, max_unorm ||p|| / ||d||)``,
  before the learning rate and decoupled weight decay, as bitsandbytes.
  With a ``pre`` hook the learning rate is in ``d`` already (LARS), and
  the bound is ``lr * max_unorm * ||p||``. With a ``post`` hook, which sets
  the update's norm itself (LAMB's trust ratio, Muon's orthogonalisation),
  the bound applies to its result instead.
  """
  if r.pre is not None:
    scale, wd, unorm_scale = 1.0, 0.0, jnp.abs(scale)
  else:
    wd, unorm_scale = (wd if plan.decay and not r.coupled else 0.0), 1.0
  d32 = d.astype(jnp.float32)
  p32 = p.astype(jnp.float32)

  def bounded(x):
    if plan.max_unorm is None:
      return x
    limit = plan.max_unorm * unorm_scale * norm(p32)
    unorm = norm(x)
    return x * jnp.where((plan.max_unorm > 0) & (unorm > limit), limit / jnp.where(unorm > 0, unorm, 1), 1.0)

  x = bounded(r.post(d32, p32, wd, plan.post_arg)) if r.post is not None else bounded(d32) + wd * p32
  bad = ~(PAIRS if pairs else REAL).finite(g)   # a complex element with a non-finite part: both parts
  return jnp.where(bad, 0, scale * x).astype(d.dtype)
