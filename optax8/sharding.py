"""optax8 on a device mesh: shard-local kernels and state shardings.

JAX's SPMD partitioner runs optax8 on many devices. Every kernel is
elementwise over an array's elements except that a block shares one absmax:
a tile of ``b_d`` elements along each axis ``d`` (`optax8.layout`: 1 on
leading axes, 16 x 16 on a matrix's last two at block_size 256, a run of
block_size on a vector's). A shard computes its part alone exactly when it
holds whole blocks::

    axis d (n, b_d = 1)   any sharding
    axis d (n, b_d > 1)   unsharded, or split s ways with n % (s * b_d) == 0
    absmax                the elements' sharding: ceil(n / b_d) along axis d on the same mesh axes

`shard_local` wraps a kernel in ``jax.experimental.custom_partitioning``
with this rule (a Shardy ``SdyShardingRule``, and the GSPMD callbacks), so
the partitioner runs the kernel on each device's shards with no
communication; the FFI call alone would be replicated (an all-gather of
every operand). `state_shardings` gives a parameter's 8-bit state the
parameter's sharding, and rejects one that would split a block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import ArrayMapping, CompoundFactor, SdyShardingRule, custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from optax8 import layout

# ---- the block rule ---------------------------------------------------------


def _axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec(sharding, ndim: int) -> tuple:
  """A NamedSharding's spec with one entry per dimension."""
  spec = tuple(sharding.spec)
  return spec + (None,) * (ndim - len(spec))


def num_shards(mesh, entry) -> int:
  """How many ways a dimension with spec ``entry`` is split on ``mesh``."""
  return math.prod(mesh.shape[a] for a in _axes(entry))


def keeps_blocks(n: int, shards: int, extent: int) -> bool:
  """Whether splitting an axis of ``n`` elements ``shards`` ways gives every shard whole blocks of ``extent``."""
  return shards == 1 or (n % shards == 0 and (n // shards) % extent == 0)


# ---- shard-local kernels ----------------------------------------------------

ELEMENTS = "elements"  # an array of a leaf's shape: values, codes, updates
ABSMAX = "absmax"      # a leaf's absmax (one value per block: `optax8.layout.absmax_shape`)
PACKED = "packed"      # a leaf's 4-bit codes, two a byte along the last axis (`optax8.layout.packed_shape`)
AXIS = "axis"          # a vector along one axis of a leaf, split like it (``(AXIS, (leaf, axis))``, axis < 0)
REPLICATED = "replicated"
BATCH = "batch"        # a replicated array batched by jax.vmap: its first axis split like every leaf's (the batch)


@dataclasses.dataclass(frozen=True)
class Op:
  """A kernel call whose operands and results are leaves' elements, absmax, or replicated arrays.

  Attributes:
    kernel: ``kernel(*operands, **params) -> results`` (a sequence), traced
      on whole arrays and on each device's shards alike.
    params: the kernel's static keyword arguments, as sorted ``(name, value)`` pairs.
    block_size: elements per quantization block.
    rows: rows of a block (`optax8.layout.tile_rows`), the same for every leaf.
    leaf_shapes: the elements' shape of each leaf.
    operands, results: the role of each array: ``(ELEMENTS, leaf)``,
      ``(ABSMAX, leaf)``, ``(PACKED, leaf)``, ``(AXIS, (leaf, axis))`` (``axis`` counted from
      the end, so a batch axis in front keeps it), ``(REPLICATED, rank)`` or
      ``(BATCH, rank)`` (`batched_rows`).
  """

  kernel: Callable
  params: tuple
  block_size: int
  rows: int
  leaf_shapes: tuple
  operands: tuple
  results: tuple

  def call(self, *arrays):
    return tuple(self.kernel(*arrays, **dict(self.params)))

  def reference(self, *arrays):
    """`call` on the pure-JAX backend (``kernel(..., pure=True)``), whose derivatives JAX knows."""
    return tuple(self.kernel(*arrays, **dict(self.params), pure=True))

  def extents(self, leaf: int) -> tuple[int, ...]:
    """A block's extent along each axis of leaf ``leaf`` (a batch axis added in front keeps them)."""
    return layout.extents(len(self.leaf_shapes[leaf]), self.block_size, self.rows)

  def batched(self, size: int) -> Op:
    """The op over a leading batch axis of ``size`` added to every leaf."""
    return dataclasses.replace(self, leaf_shapes=tuple((size,) + s for s in self.leaf_shapes))

  def batched_rows(self, size: int, batched_replicated) -> Op:
    """`batched`, where the replicated operands flagged in ``batched_replicated`` have a batch axis too (a
    batch of hyperparameter rows): they become ``BATCH`` operands, split like the leaves' batch axis, and
    each device vmaps the kernel over its part of the batch."""
    in_axes = tuple(None if role[0] in (REPLICATED, AXIS) and not b else 0
                    for role, b in zip(self.operands, batched_replicated))
    operands = tuple((BATCH, role[1] + 1) if role[0] == REPLICATED and b else role
                     for role, b in zip(self.operands, batched_replicated))
    return dataclasses.replace(self.batched(size), kernel=_vmapped, params=(("in_axes", in_axes), ("op", self)),
                               operands=operands)


def _vmapped(*arrays, in_axes, op: Op, pure: bool = False):
  """``op``'s kernel vmapped over the arrays' batch axis (`Op.batched_rows`)."""
  return jax.vmap(lambda *a: tuple(op.kernel(*a, **dict(op.params), **({"pure": True} if pure else {}))),
                  in_axes=in_axes)(*arrays)


def make_op(kernel: Callable, leaf_shapes, operands, results, **params) -> Op:
  """An `Op` of ``kernel`` with static ``params`` (which include ``block_size`` and ``rows``)."""
  return Op(kernel, tuple(sorted(params.items())), params["block_size"], params["rows"],
            tuple(tuple(s) for s in leaf_shapes), tuple(operands), tuple(results))


def shard_local(op: Op, *arrays) -> tuple:
  """``op.call(*arrays)``, partitioned so that each device computes its own shards.

  Under ``jax.vmap`` a batch axis becomes one more leading axis of every
  leaf; where a replicated operand is batched (a batch of hyperparameter
  rows: Adam's, when the step counts come from ``jax.vmap(tx.init)``), it
  is split like that axis and each device vmaps the kernel over its part
  (`Op.batched_rows`); only a batched vector along an axis, or a second
  vmap of such an op, vmaps the kernel unpartitioned. Under
  ``jax.disable_jit()`` the kernel runs eagerly, unpartitioned. Its
  derivatives (``jax.jvp``, ``jax.grad``) are those of the pure-JAX
  backend's kernel (`Op.reference`), which gives the same values: codes
  have none, absmax and float outputs theirs.
  """
  return _differentiable(op)(*arrays)


def _differentiable(op: Op):
  @jax.custom_jvp
  def run(*arrays):
    if jax.config.jax_disable_jit:
      return op.call(*arrays)
    return _shard_local_jit(op, *arrays)

  @run.defjvp
  def _jvp(primals, tangents):
    return run(*primals), jax.jvp(op.reference, primals, tangents)[1]

  return run


@functools.partial(jax.jit, static_argnums=0)
def _shard_local_jit(op: Op, *arrays):
  # jit, so that eager calls on sharded arrays are partitioned too.
  fn = jax.custom_batching.custom_vmap(lambda *a: _partitioned(op, *a))

  @fn.def_vmap
  def _batch_rule(axis_size, in_batched, *args):
    if axis_size == 0:   # an empty batch: empty results of the per-example shapes
      example = [jax.ShapeDtypeStruct(a.shape[1:] if b else a.shape, a.dtype) for a, b in zip(args, in_batched)]
      out = [jnp.zeros((0,) + r.shape, r.dtype) for r in jax.eval_shape(op.call, *example)]
      return tuple(out), (True,) * len(out)
    if any(b and role[0] in (AXIS, BATCH) for b, role in zip(in_batched, op.operands)):
      out = jax.vmap(op.call, in_axes=tuple(0 if b else None for b in in_batched))(*args)
    else:
      args = [a if b or role[0] in (REPLICATED, AXIS) else jnp.broadcast_to(a, (axis_size,) + a.shape)
              for a, b, role in zip(args, in_batched, op.operands)]
      rows = any(b and role[0] == REPLICATED for b, role in zip(in_batched, op.operands))
      out = shard_local(op.batched_rows(axis_size, in_batched) if rows else op.batched(axis_size), *args)
    return tuple(out), (True,) * len(out)

  return fn(*arrays)


@functools.partial(jax.jit, static_argnums=0)
def _run(op: Op, *arrays):
  # Under jit the kernel's constants (lookup tables) stay inside its own jaxpr:
  # custom_partitioning takes functions without closed-over constants.
  return op.call(*arrays)


def _leaf_specs(op: Op, mesh, arg_shapes) -> list[tuple]:
  """Each leaf's spec: that of its last elements (or packed codes) operand, with any axis that would split blocks
  unsharded.

  The last is the state's codes where the op has them (after the gradient
  and the parameter): a gradient sharded otherwise is moved to the state,
  as optax moves it, not the whole state to the gradient.
  """
  specs = [None] * len(op.leaf_shapes)
  for (role, leaf), arg in reversed(list(zip(op.operands, arg_shapes))):
    if role in (ELEMENTS, PACKED) and specs[leaf] is None:
      shape = op.leaf_shapes[leaf]
      spec = _spec(arg.sharding, len(shape)) if isinstance(arg.sharding, NamedSharding) else (None,) * len(shape)
      specs[leaf] = tuple(None if not keeps_blocks(n, num_shards(mesh, entry), b) else entry
                          for n, b, entry in zip(shape, op.extents(leaf), spec))
  if any(role == BATCH for role, _ in op.operands):   # one batch axis: the first leaf's split for all
    specs = [(specs[0][0],) + s[1:] for s in specs]
  return specs


def _shardings(op: Op, mesh, specs, roles):
  def spec(role, leaf):
    if role == REPLICATED:
      return PartitionSpec()
    if role == AXIS:
      return PartitionSpec(specs[leaf[0]][leaf[1]])
    if role == BATCH:
      return PartitionSpec(specs[0][0])
    return PartitionSpec(*specs[leaf])

  return tuple(NamedSharding(mesh, spec(*r)) for r in roles)


def _partition(op: Op, mesh, arg_shapes, result_shape):
  specs = _leaf_specs(op, mesh, arg_shapes)

  def local(*shards):
    # The per-device computation has no mesh: without this, an Explicit mesh of
    # the caller's context would add sharding annotations that no partitioner
    # removes (jax 0.12 fails to compile them).
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
      return op.call(*shards)

  return mesh, local, _shardings(op, mesh, specs, op.results), _shardings(op, mesh, specs, op.operands)


def _infer(op: Op, mesh, arg_shapes, result_shape):
  """The results' shardings from the operands' (GSPMD partitioner)."""
  return _shardings(op, mesh, _leaf_specs(op, mesh, arg_shapes), op.results)


def _rule(op: Op, mesh, operand_types, result_types) -> SdyShardingRule:
  """The Shardy rule: one factor per axis a block spans one element of; ``(nb, b)`` for an axis of extent b.

  The factor ``b`` needs replication, so such an axis is split only between
  whole blocks, and absmax's axis shares the leaf's ``nb`` factor, as packed
  4-bit codes' last axis does (``(nb, b / 2)``; blocks have even columns). Where
  ``n`` is not a multiple of ``b`` the axis stays whole.

  A factor whose size some mesh axis does not divide needs replication too:
  Shardy would otherwise split it over part of an axis (a sub-axis, e.g. 2
  blocks over 2 of 8 devices when the gradient arrives split by columns),
  which custom_partitioning cannot express; the operand is resharded instead.
  With ``BATCH`` operands every leaf's first axis is the one factor ``batch``.
  """
  del operand_types, result_types
  axis_sizes = [s for s in dict(getattr(mesh, "shape", {}) or {}).values() if s > 1]
  whole = lambda size: all(size % s == 0 for s in axis_sizes)
  need, sizes, leaves = [], {}, []
  with_packed = {leaf for role, leaf in op.operands + op.results if role == PACKED}
  batch = any(role == BATCH for role, _ in op.operands)
  need += [] if not batch or whole(op.leaf_shapes[0][0]) else ["batch"]
  for i, shape in enumerate(op.leaf_shapes):
    elements, absmax = (), ()
    for d, (n, b) in enumerate(zip(shape, op.extents(i))):
      if batch and d == 0:
        axis = nb = "batch"
      elif b == 1:
        axis = nb = f"n{i}_{d}"
        need += [] if whole(n) else [axis]
      elif n % b == 0 and n > b:
        axis, nb = CompoundFactor(f"k{i}_{d}", f"b{i}_{d}"), f"k{i}_{d}"
        sizes[f"b{i}_{d}"] = b
        need += [f"b{i}_{d}"] + ([] if whole(n // b) else [nb])
      else:
        axis, nb = f"n{i}_{d}", f"k{i}_{d}"
        need += [axis, nb]
      elements, absmax = elements + (axis,), absmax + (nb,)
    packed = None
    if i in with_packed:   # the last axis: (nb, b / 2) where the elements' is (nb, b), else whole
      if isinstance(elements[-1], CompoundFactor):
        packed = CompoundFactor(absmax[-1], f"h{i}")
        sizes[f"h{i}"] = op.extents(i)[-1] // 2
      else:
        packed = f"c{i}"
      need.append(packed[-1] if isinstance(packed, CompoundFactor) else packed)
    leaves.append((elements, absmax, elements[:-1] + (packed,)))
  replicated = [0]

  def mapping(role, arg):
    if role in (REPLICATED, BATCH):
      names = tuple(f"r{replicated[0]}_{d}" for d in range(role == BATCH, arg))
      replicated[0] += 1
      need.extend(names)
      return ArrayMapping(*(("batch",) if role == BATCH else ()) + names)
    if role == AXIS:
      return ArrayMapping(leaves[arg[0]][0][arg[1]])
    return ArrayMapping(*leaves[arg][{ELEMENTS: 0, ABSMAX: 1, PACKED: 2}[role]])

  operands = tuple(mapping(*r) for r in op.operands)
  results = tuple(mapping(*r) for r in op.results)
  order = {}   # Shardy numbers factors by first appearance and wants special factors in that order
  for m in operands + results:
    for dim in m:
      for f in (dim if isinstance(dim, CompoundFactor) else (dim,)):
        order.setdefault(f, len(order))
  return SdyShardingRule(operands, results, need_replication_factors=tuple(sorted(need, key=order.get)), **sizes)


_partitioned = custom_partitioning(_run, static_argnums=(0,))
_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           propagate_user_sharding=None, sharding_rule=_rule)

# ---- state shardings ----------------------------------------------------------


def _mesh_sharding(x) -> NamedSharding | None:
  """``x``'s NamedSharding: a concrete array's, or a traced one's on an Explicit mesh (from ``jax.typeof``)."""
  if isinstance(x, jax.core.Tracer):
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is None or jax.sharding.AxisType.Explicit not in getattr(sharding.mesh, "axis_types", ()):
      return None   # on an Auto mesh a traced array's sharding is not known yet
  else:
    sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
    return None
  return sharding


@dataclasses.dataclass(frozen=True)
class StateShardings:
  """Where one parameter's state lives: codes, absmax and float32 state all take the parameter's spec.

  An absmax has the parameter's rank (one value per block along each axis),
  so the same spec puts its blocks on the shards of their elements; a
  scalar's absmax ``(1,)`` is replicated.
  """

  sharding: NamedSharding
  traced: bool  # under jit (on an Explicit mesh): the sharding goes into the arrays' types

  def full(self, shape, value, dtype):
    """``jnp.full`` created directly on each device's shards."""
    spec = self.sharding.spec if len(shape) == self.ndim else PartitionSpec()
    sharding = NamedSharding(self.sharding.mesh, spec)
    if self.traced:
      return jnp.full(shape, value, dtype, out_sharding=sharding)
    return jnp.full(shape, value, dtype, device=sharding)

  @property
  def ndim(self) -> int:
    return len(self.sharding.spec)


def state_shardings(name: str, path: str, x, bits: int, block_size: int) -> StateShardings | None:
  """The shardings of the state of parameter ``x`` (None where ``x`` carries no mesh sharding).

  ``x`` is a concrete array or, on an Explicit mesh, a traced one (its
  ``jax.typeof`` has the sharding). For 8-bit (and 4-bit) state each axis must hold
  whole blocks on every shard (with block_size 256: a matrix axis unsharded
  or split into shards of a multiple of 16); otherwise this raises a
  ValueError naming the leaf, its sharding, the block size and what to change.
  """
  sharding = _mesh_sharding(x)
  if sharding is None:
    return None
  shape = tuple(x.shape)
  spec = _spec(sharding, len(shape))
  if bits in (4, 8) and shape:
    extents = layout.block_shape(shape, block_size)
    for d, (n, b, entry) in enumerate(zip(shape, extents, spec)):
      shards = num_shards(sharding.mesh, entry)
      if keeps_blocks(n, shards, b):
        continue
      what = (f"its axis {d} ({n} elements, {b} per block)" if len(shape) > 1
              else f"its {n} elements (blocks of {b})")
      fits = [s for s in (block_size >> k for k in range(1, block_size.bit_length()))
              if all(keeps_blocks(m, num_shards(sharding.mesh, e), extent)
                     for m, extent, e in zip(shape, layout.block_shape(shape, s), spec))]
      fix = f"leave that axis unsharded or shard it into multiples of {b}, "
      if fits:
        fix += (f"or use block_size={fits[0]} for this leaf (blocks of "
                f"{' x '.join(map(str, layout.block_shape(shape, fits[0])))}; see optax8.layout), ")
      raise ValueError(
          f"{name}: leaf {path} of shape {shape} is sharded {sharding.spec} on mesh {dict(sharding.mesh.shape)}: "
          f"{what} is split {shards} ways into shards of {n / shards:g}, which cuts its quantization blocks "
          f"(blocks of {block_size} elements, {' x '.join(map(str, extents))} along the axes, must each lie "
          f"within one shard). To fix it, {fix}or keep this leaf at 32 bits.")
  if bits == 4 and shape and num_shards(sharding.mesh, spec[-1]) > 1 and (shape[-1] // num_shards(
      sharding.mesh, spec[-1])) % 2:
    raise ValueError(f"{name}: leaf {path} of shape {shape} is sharded {sharding.spec}: its last axis is split into "
                     "shards of an odd length, and 4-bit codes pack that axis two a byte. Use a block_size whose "
                     "blocks span an even number of columns, shard another axis, or keep this leaf at 8 bits.")
  return StateShardings(NamedSharding(sharding.mesh, PartitionSpec(*spec)), isinstance(x, jax.core.Tracer))


def on_one_sharding(name: str, path: str, g, p, states, bits: int, block_size: int):
  """``(g, p, states)`` of one 8-bit (or 4-bit) leaf on an Explicit mesh, resharded to one sharding.

  The kernels compute each shard alone, so the gradient, parameter, codes
  and absmax must be split alike. On an Explicit mesh a sharding is part of
  an array's type, and one that differs (a replicated gradient, a state
  restored replicated) is resharded here as optax's elementwise steps
  would: to the parameter's sharding, or without params to the state's
  codes'. The state then leaves the step sharded like the parameter. On an
  Auto mesh the partitioner does this itself; nothing is changed.
  """
  lead = _mesh_sharding(states[0].codes if p is None else p)
  if lead is None or jax.sharding.AxisType.Explicit not in lead.mesh.axis_types:
    return g, p, states
  spec = _spec(lead, g.ndim)
  if p is not None:
    state_shardings(name, path, p, bits, block_size)   # a parameter's sharding that splits blocks is refused

  def put(x):
    target = spec if x.ndim == len(spec) else (None,) * x.ndim   # an absmax of shape (1,): replicated
    now = _mesh_sharding(x)
    if now is not None and now.mesh == lead.mesh and _spec(now, x.ndim) == target:
      return x
    return jax.sharding.reshard(x, NamedSharding(lead.mesh, PartitionSpec(*target)))

  states = tuple(dataclasses.replace(q, codes=put(q.codes), absmax=put(q.absmax)) for q in states)
  return put(g), None if p is None else put(p), states


def zero_count(params):
  """The initial step count, an int32 zero replicated on the mesh of the first sharded parameter."""
  return replicated_full(params, (), 0, jnp.int32)


def replicated_full(params, shape, value, dtype):
  """``jnp.full(shape, value, dtype)`` replicated on the mesh of the first sharded parameter (state that is
  not per element: a step count, a history of norms), so that a jitted step takes it with the params."""
  mesh = _params_mesh(params)
  if mesh is None:
    return jnp.full(shape, value, dtype)
  traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params))
  return StateShardings(NamedSharding(mesh, PartitionSpec()), traced).full(shape, value, dtype)


def on_the_params_mesh(state, params):
  """``state`` with each concrete leaf that lies on one device put replicated on the params' mesh (optax's
  step counts, say), where the params are sharded over several devices; the other leaves as they are."""
  mesh = _params_mesh(params)
  if mesh is None or mesh.size == 1:
    return state

  def put(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) == 1:
      return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    return x

  return jax.tree.map(put, state)


def _params_mesh(params):
  """The mesh of the first parameter that carries a mesh sharding, or None."""
  return next((s.mesh for s in map(_mesh_sharding, jax.tree.leaves(params)) if s is not None), None)
