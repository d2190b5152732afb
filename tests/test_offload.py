"""offload: state in pinned host memory between steps, results bit for bit those of the wrapped optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax8
from optax8.offload import to_device, to_host

OPTIMIZERS = {
    "adamw8bit": lambda: optax8.adamw8bit(1e-2, weight_decay=1e-2, min_8bit_size=1024),
    "optax.adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax8.lion8bit(1e-3, min_8bit_size=1024)),
}


@pytest.mark.parametrize("bits", [8, 4])
def test_offload_in_a_chain_with_param_rounding_keeps_the_rounding_in_the_kernel(bits):
  """optax8.chain(optax8.offload(tx), optax8.param_rounding()): the chain hands the rounding to tx's kernels
  through the offloaded transformation (it dropped those parts, and the fused apply rounded u + p from the
  bfloat16 update instead): the new params equal those of the chain without offload, bit for bit."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((256, 64)), jnp.bfloat16)}
  grads = [{"w": jnp.asarray(rng.standard_normal((256, 64)), jnp.bfloat16)} for _ in range(3)]
  make = lambda: optax8.adamw8bit(1e-3, bits=bits, min_8bit_size=0)
  runs = []
  for tx in (optax8.chain(make(), optax8.param_rounding("stochastic")),
             optax8.chain(optax8.offload(make()), optax8.param_rounding("stochastic"))):
    p, s = params, tx.init(params)
    step = jax.jit(lambda g, s, p, tx=tx: optax8.apply_gradients(tx, g, s, p))
    for g in grads:
      p, s = step(g, s, p)
    runs.append(p)
  np.testing.assert_array_equal(np.asarray(runs[0]["w"], np.float32), np.asarray(runs[1]["w"], np.float32))


def _params():
  key = jax.random.key(0)
  return {"w": jax.random.normal(key, (16, 256)) * 0.1, "b": jnp.zeros((256,)), "s": jnp.ones(())}


def _grads(params, t):
  return jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape) * 0.01, params)


def _memory_kinds(tree):
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def _step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _donated_step(fn, params, state, grads):
  """jit with every input's and output's sharding given, so donation pairs buffers of the same memory kind."""
  return jax.jit(fn, in_shardings=_shardings((params, state, grads)), out_shardings=_shardings((params, state)),
                 donate_argnums=(0, 1))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_on_host_and_results_equal_the_plain_optimizer(name):
  tx = OPTIMIZERS[name]()
  off = optax8.offload(tx)
  params = _params()
  state, host_state = tx.init(params), off.init(params)
  assert _memory_kinds(host_state) == {"pinned_host"}
  _assert_equal(state, host_state)
  step = jax.jit(functools.partial(_step, tx))
  host_step = _donated_step(functools.partial(_step, off), params, host_state, _grads(params, 0))
  p1, p2 = params, jax.tree.map(jnp.copy, params)  # p2 is donated
  for t in range(3):
    grads = _grads(params, t)
    p1, state = step(p1, state, grads)
    p2, host_state = host_step(p2, host_state, grads)
    assert _memory_kinds(host_state) == {"pinned_host"}
    assert _memory_kinds(p2) == {"device"}
    _assert_equal(p1, p2)
    _assert_equal(state, host_state)


def test_eager_update_and_jitted_init():
  tx = OPTIMIZERS["adamw8bit"]()
  off = optax8.offload(tx)
  params = _params()
  host_state = jax.jit(off.init)(params)
  assert _memory_kinds(host_state) == {"pinned_host"}
  grads = _grads(params, 0)
  u1, s1 = tx.update(grads, tx.init(params), params)
  u2, s2 = off.update(grads, host_state, params)
  assert _memory_kinds(s2) == {"pinned_host"} and _memory_kinds(u2) == {"device"}
  _assert_equal(u1, u2)
  _assert_equal(s1, s2)


def test_apply_gradients_keeps_the_fused_path():
  tx = OPTIMIZERS["adamw8bit"]()
  off = optax8.offload(tx)
  assert isinstance(off, optax8.FusedGradientTransformation) and optax8.fused_apply(off) is not None
  assert optax8.fused_apply(optax8.offload(optax.adamw(1e-3))) is None
  params = _params()
  s1, s2 = tx.init(params), off.init(params)
  p1, p2 = params, jax.tree.map(jnp.copy, params)
  apply = jax.jit(lambda p, s, g: optax8.apply_gradients(tx, g, s, p))
  host_apply = _donated_step(lambda p, s, g: optax8.apply_gradients(off, g, s, p), p2, s2, _grads(params, 0))
  for t in range(2):
    grads = _grads(params, t)
    p1, s1 = apply(p1, s1, grads)
    p2, s2 = host_apply(p2, s2, grads)
    assert _memory_kinds(s2) == {"pinned_host"}
    _assert_equal(p1, p2)
    _assert_equal(s1, s2)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=lambda t: t.name)
def test_sharded_state_with_out_shardings_and_donation(axis_type):
  """Rows of every leaf on 4 devices: each leaf keeps its sharding on the host, out_shardings as documented."""
  mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,), devices=jax.devices()[:4])
  rows = lambda x: NamedSharding(mesh, P("x") if x.ndim and x.shape[0] % 4 == 0 else P())
  params = jax.tree.map(lambda x: jax.device_put(x, rows(x)), _params())
  tx = optax.adamw(1e-2, weight_decay=1e-2)
  off = optax8.offload(tx)
  state = jax.tree.map(lambda x: jax.device_put(x, rows(x)), tx.init(params))
  host_state = to_host(state)
  state_shardings = _shardings(host_state)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_shardings)):
    assert s == x.sharding.with_memory_kind("pinned_host")
  step = jax.jit(functools.partial(_step, tx))
  grads = lambda t: jax.tree.map(lambda x: jax.device_put(x, rows(x)), _grads(params, t))
  host_step = _donated_step(functools.partial(_step, off), params, host_state, grads(0))
  p1, p2 = params, jax.tree.map(jnp.copy, params)
  for t in range(2):
    p1, state = step(p1, state, grads(t))
    p2, host_state = host_step(p2, host_state, grads(t))
    assert _shardings(host_state) == state_shardings
    _assert_equal(p1, p2)
    _assert_equal(state, host_state)
  back = to_device(host_state)
  assert _memory_kinds(back) == {"device"}
  assert _shardings(back) == jax.tree.map(lambda s: s.with_memory_kind("device"), state_shardings)


@pytest.mark.parametrize("name", ["optax.adamw", "percentile_clipping", "inject_hyperparams", "MultiSteps"])
def test_state_of_scalars_joins_params_sharded_on_a_mesh(name):
  """Params sharded over 8 devices (no jax.set_mesh): the inner state's step counts, hyperparameters and
  norm histories go to the host replicated on the params' mesh, not pinned to device 0, so the jitted
  step takes them; its results are those of the plain optimizer."""
  make = {"optax.adamw": lambda: optax.adamw(1e-2),
          "percentile_clipping": lambda: optax8.adamw8bit(1e-2, min_8bit_size=1024, percentile_clipping=95),
          "inject_hyperparams": lambda: optax8.inject_hyperparams(optax8.adamw8bit)(1e-2, min_8bit_size=1024),
          "MultiSteps": lambda: optax.MultiSteps(optax8.lion8bit(1e-3, min_8bit_size=1024), 2)}[name]
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "x") if x.ndim == 2 else P()))   # whole blocks
  params = jax.tree.map(put, _params())
  tx, off = make(), optax8.offload(make())
  state, host_state = tx.init(params), off.init(params)
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(host_state))
  assert _memory_kinds(host_state) == {"pinned_host"}
  p1, p2 = params, params
  for t in range(3):
    grads = jax.tree.map(put, _grads(params, t))
    p1, state = jax.jit(functools.partial(_step, tx))(p1, state, grads)
    p2, host_state = jax.jit(functools.partial(_step, off))(p2, host_state, grads)
    _assert_equal(p1, p2)
  if name == "percentile_clipping":   # without offload too: its count and history are on the params' mesh
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(make().init(params)))


def test_extra_args_reach_transformations_that_take_them():
  off = optax8.offload(optax.adamw(1e-3))
  params = _params()
  _, state = jax.jit(lambda g, s, p: off.update(g, s, p, loss=1.0))(_grads(params, 0), off.init(params), params)
  assert _memory_kinds(state) == {"pinned_host"}


def test_unsupported_memory_kind_is_a_clear_error():
  with pytest.raises(ValueError, match="memory_kind must be one of .*'pinned_host'.*got 'unpinned_host'"):
    optax8.offload(optax.adamw(1e-3), memory_kind="unpinned_host")
