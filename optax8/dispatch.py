"""Backend choice per platform, made at lowering time.

Each op is a ``jax.lax.platform_dependent`` over the platforms whose native
library loaded (``cpu``, ``cuda``), with the pure-JAX path as the default
(TPU, ROCm, or a platform without a usable library). One jitted function
therefore runs on CPU and GPU alike, with no Python branch on devices. On a
device mesh each op runs on each device's shards (`optax8.sharding`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

from optax8 import layout, rounding, sharding
from optax8.kernels import jax_backend, jax_step, native
from optax8.kernels.algorithms import CUDA_MAX_STEP_BLOCK
from optax8.sharding import ABSMAX, AXIS, ELEMENTS, PACKED, REPLICATED

NATIVE_PLATFORMS = tuple(native.PLATFORMS)


def backends() -> dict[str, str]:
  """Which backend runs on each platform: 'native' or 'jax'."""
  out = {p: "native" if native.available(p) else "jax" for p in NATIVE_PLATFORMS}
  out.update(rocm="jax", tpu="jax")
  return out


def _native_branches(fn):
  return {p: fn for p in NATIVE_PLATFORMS if native.available(p)}


def quantize(x, block_size: int, kind: str, map_id: int):
  """(codes, absmax) of ``x`` (rank >= 1) on the platform's backend, on each device's shards."""
  op = sharding.make_op(_quantize, [x.shape], [(ELEMENTS, 0)], [(ELEMENTS, 0), (ABSMAX, 0)],
                        block_size=block_size, rows=layout.tile_rows(x.shape, block_size), kind=kind, map_id=map_id)
  return sharding.shard_local(op, x)


def dequantize(codes, absmax, block_size: int, kind: str, map_id: int, dtype):
  """``map[codes] * absmax`` as ``dtype`` on the platform's backend, on each device's shards."""
  op = sharding.make_op(_dequantize, [codes.shape], [(ELEMENTS, 0), (ABSMAX, 0)], [(ELEMENTS, 0)],
                        block_size=block_size, rows=layout.tile_rows(codes.shape, block_size), kind=kind,
                        map_id=map_id, dtype=jnp.dtype(dtype))
  return sharding.shard_local(op, codes, absmax)[0]


def _quantize(x, block_size: int, rows: int, kind: str, map_id: int, pure: bool = False):
  jax_fn = functools.partial(jax_backend.quantize, block_size=block_size, kind=kind, rows=rows)
  if pure:   # the kernels' derivatives (optax8.sharding.Op.reference)
    return jax_fn(x)
  return lax.platform_dependent(
      x, default=jax_fn,
      **_native_branches(functools.partial(native.quantize, block_size=block_size, map_id=map_id, rows=rows)))


def _dequantize(codes, absmax, block_size: int, rows: int, kind: str, map_id: int, dtype, pure: bool = False):
  jax_fn = functools.partial(jax_backend.dequantize, block_size=block_size, kind=kind, dtype=dtype, rows=rows)
  if pure:
    return (jax_fn(codes, absmax),)
  return (lax.platform_dependent(
      codes, absmax, default=jax_fn,
      **_native_branches(functools.partial(native.dequantize, block_size=block_size, map_id=map_id,
                                           dtype=dtype, rows=rows))),)


@dataclasses.dataclass(frozen=True)
class StepGroup:
  """One fused step call over a group of leaves: the contract from the engine to every backend.

  Static and hashable: the engine builds it once per group and step, and it
  goes unchanged through the shard-local wrapper (`optax8.sharding`) to the
  backend that runs (native CPU or CUDA, or pure JAX). Its operands are
  ``hypers`` (``(leaves, NUM_HYPER)`` float32) and, per leaf, ``g``, ``p``
  (where ``with_params``) and ``(codes, absmax)`` per state; its results,
  per leaf, the update (or with ``apply`` the new parameter ``p + update``)
  and ``(codes, absmax)`` per state. A group with ``round_states`` rounds
  its states stochastically (`optax8.rounding`), one with ``round_params``
  (``apply``, bfloat16 params) its new parameters
  (`optax8.low_precision`): then each leaf's operands end with its axes'
  index vectors, which a shard gets sliced like its elements.
  With ``bits`` 4 every state's codes are 4-bit codes, two a byte along
  the last axis.
  """

  algo: int
  block_size: int
  rows: int     # rows of a block of every leaf (`optax8.layout.tile_rows`)
  apply: bool
  with_params: bool
  leaves: int   # how many
  states: int   # states per leaf
  in_place: bool = True   # with apply: the new params may overwrite the params' buffers (native backends)
  ranks: tuple = ()       # with stochastic rounding, each leaf's rank (its index vectors); else ()
  bits: int = 8           # of every state's codes
  round_states: bool = False   # the new states are rounded stochastically
  round_params: bool = False   # and the new parameters

  @property
  def indexed(self) -> bool:
    """Each leaf's operands end with its index vectors."""
    return bool(self.ranks)

  @classmethod
  def of(cls, algo, block_size: int, apply: bool, leaves, in_place: bool = True,
         stochastic: bool = False, bits: int = 8, round_params: bool = False) -> StepGroup:
    """The group of ``leaves``, ``(g, p or None, states)`` each (p given for all or none; blocks of as many
    rows in each: all of rank >= 2, or all vectors)."""
    with_params = leaves[0][1] is not None
    if any((p is not None) != with_params for _, p, _ in leaves):
      raise ValueError("step_group: give p for every leaf or for none")
    rows = {layout.tile_rows(g.shape, block_size) for g, _, _ in leaves}
    if len(rows) != 1:
      raise ValueError("step_group: every leaf's blocks must have as many rows (matrices and vectors apart)")
    ranks = tuple(g.ndim for g, _, _ in leaves) if stochastic or round_params else ()
    return cls(int(algo), int(block_size), rows.pop(), bool(apply), with_params, len(leaves), len(leaves[0][2]),
               bool(in_place), ranks, int(bits), bool(stochastic), bool(round_params))

  def flatten(self, hypers, leaves) -> list:
    """The flat operands; the index vectors are made here, from the leaves' whole shapes."""
    return [hypers] + [x for g, p, states in leaves
                       for x in (g, *((p,) if self.with_params else ()), *(a for pair in states for a in pair),
                                 *(rounding.index_vectors(g.shape) if self.indexed else ()))]

  def unflatten(self, flat):
    """``(hypers, [(g, p, states, index)])`` from flat operands (``index`` None unless indexed)."""
    it = iter(flat[1:])
    leaves = []
    for i in range(self.leaves):
      g = next(it)
      p = next(it) if self.with_params else None
      states = tuple((next(it), next(it)) for _ in range(self.states))
      leaves.append((g, p, states, tuple(next(it) for _ in range(self.ranks[i])) if self.indexed else None))
    return flat[0], leaves

  @staticmethod
  def flatten_results(per_leaf) -> list:
    return [x for out, states in per_leaf for x in (out, *(a for pair in states for a in pair))]

  def unflatten_results(self, flat) -> list:
    """``[(output, ((codes, absmax), ...))]`` per leaf from flat results."""
    it = iter(flat)
    return [(next(it), tuple((next(it), next(it)) for _ in range(self.states))) for _ in range(self.leaves)]

  def roles(self):
    """The shard-local roles of the operands and results (`optax8.sharding.make_op`)."""
    per_leaf = 2 if self.with_params else 1
    codes = PACKED if self.bits == 4 else ELEMENTS
    operands, results = [(REPLICATED, 2)], []
    for i in range(self.leaves):
      operands += [(ELEMENTS, i)] * per_leaf + [(codes, i), (ABSMAX, i)] * self.states
      operands += [(AXIS, (i, d - self.ranks[i])) for d in range(self.ranks[i])] if self.indexed else []
      results += [(ELEMENTS, i)] + [(codes, i), (ABSMAX, i)] * self.states
    return operands, results


def step_group(algo: int, hypers, leaves, block_size: int, apply: bool = False, in_place: bool = True,
               stochastic: bool = False, bits: int = 8, round_params: bool = False):
  """The fused optimizer step of many leaves of one algorithm on the platform's backend.

  ``hypers`` is ``(len(leaves), NUM_HYPER)``; each leaf is ``(g, p,
  states)`` with ``g`` of rank >= 1, ``p`` the parameter or None (for all
  leaves alike) and ``states`` a tuple of ``(codes, absmax)``. Returns
  ``(update, new states)`` per leaf, or ``(p + update, new states)`` with
  ``apply``, written over the parameters where ``in_place``.
  Natively the whole group is one kernel call. With ``stochastic`` the
  states are rounded stochastically (`optax8.rounding`), with
  ``round_params`` (``apply``, bfloat16 params) the new parameters
  (`optax8.low_precision`); with ``bits`` 4 the codes are 4-bit codes
  (`optax8.layout.packed_shape`).
  """
  group = StepGroup.of(algo, block_size, apply, leaves, in_place, stochastic, bits, round_params)
  operands, results = group.roles()
  op = sharding.make_op(_step_group, [g.shape for g, _, _ in leaves], operands, results, block_size=block_size,
                        rows=group.rows, group=group)
  return group.unflatten_results(sharding.shard_local(op, *group.flatten(hypers, leaves)))


def _step_group(*flat, group: StepGroup, block_size: int, rows: int, pure: bool = False):
  """`step_group` on flat operands; flat results (with ``pure``, the pure-JAX step's)."""
  del block_size, rows   # the group's, given to the sharding rule

  def unflatten(args):
    """The group's operands; index vectors gain zeros for a batch axis in front (vmap: examples draw alike)."""
    hypers, leaves = group.unflatten(args)
    if group.indexed:
      leaves = [(g, p, s, tuple(jnp.zeros((n,), jnp.uint32) for n in g.shape[:g.ndim - len(index)]) + index)
                for g, p, s, index in leaves]
    return hypers, leaves

  def native_fn(*args):
    hypers, leaves = unflatten(args)
    return group.flatten_results(native.step_group(
        group.algo, hypers, [leaf[:3] for leaf in leaves], group.block_size, group.apply, rows=group.rows,
        in_place=group.in_place, indices=[leaf[3] for leaf in leaves] if group.indexed else None,
        bits=group.bits, round_states=group.round_states, round_params=group.round_params))

  def jax_fn(*args, step=jax_step.step):
    hypers, leaves = unflatten(args)
    return group.flatten_results([step(group.algo, hypers[i], g, p, s, group.block_size, group.apply,
                                       rows=group.rows, index=index, bits=group.bits,
                                       round_states=group.round_states, round_params=group.round_params)
                                  for i, (g, p, s, index) in enumerate(leaves)])

  if pure:
    return jax_fn(*flat)
  # XLA:CPU without the native library: the pure-JAX step a slice at a time (bounded temporaries)
  branches = {"cpu": functools.partial(jax_fn, step=jax_step.step_in_chunks)}
  packs = group.bits == 8 or group.block_size // group.rows % 2 == 0   # no byte of 4-bit codes in two blocks
  branches.update({p: native_fn for p in NATIVE_PLATFORMS if native.has_rule(p, group.algo) and packs})
  if group.block_size > CUDA_MAX_STEP_BLOCK:
    branches.pop("cuda", None)   # the CUDA kernel keeps a block's states in registers
  return lax.platform_dependent(*flat, default=jax_fn, **branches)


def step(algo: int, hyper, g, p, states, block_size: int, apply: bool = False):
  """The fused optimizer step of one leaf: ``(update or p + update, new states)``."""
  return step_group(algo, hyper[None], [(g, p, states)], block_size, apply)[0]
