"""optax8 on an 8-device CPU mesh: shard-local kernels, state shardings, Explicit-mode types."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax8
from optax8 import dispatch, sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets them)")

BLOCK = 256
# FSDP shards the rows of every matrix, tensor parallelism its columns (whole blocks per shard: 2048 / 8 = 256).
LAYOUTS = {"fsdp": P("x", None), "tp": P(None, "x")}
OPTIMIZERS = {
    "adamw": lambda: optax8.adamw8bit(1e-2, weight_decay=1e-2, min_8bit_size=256),
    "lamb": lambda: optax8.lamb8bit(1e-2, weight_decay=1e-2, min_8bit_size=256),
    "lars": lambda: optax8.lars8bit(1e-2, weight_decay=1e-2, min_8bit_size=256),
}


def _mesh(axis_type, shape=(8,), names=("x",)):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.standard_normal((16, 2048)).astype(np.float32),
          "b": rng.standard_normal((2048,)).astype(np.float32),
          "s": rng.standard_normal((8,)).astype(np.float32)}   # 32-bit state (below min_8bit_size)


def _specs(layout):
  return {"w": LAYOUTS[layout], "b": P("x"), "s": P("x")}


def _put(tree, mesh, specs):
  return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


def _step_fn(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _state_leaves(state):
  """(path, array) of every codes, absmax and float32 state leaf of the moments (not the count)."""
  leaves = jax.tree_util.tree_flatten_with_path(state[1:])[0]
  return [(jax.tree_util.keystr(path), x) for path, x in leaves]


def _hlo(fn, *args):
  return fn.lower(*args).compile().as_text()


# ---- kernels -----------------------------------------------------------------


@pytest.mark.parametrize("spec", [P("x", None), P(None, "x"), P("x", "y"), P(None, ("x", "y"))],
                         ids=["rows", "columns", "both", "columns2"])
def test_quantize_and_dequantize_run_on_each_shard(spec):
  mesh = _mesh(AxisType.Auto, (4, 2), ("x", "y"))
  host = np.random.default_rng(0).standard_normal((16, 2048)).astype(np.float32)
  expected = optax8.quantize(host, BLOCK)
  x = jax.device_put(host, NamedSharding(mesh, spec))
  quantize = jax.jit(lambda x: optax8.quantize(x, BLOCK))
  q = quantize(x)
  d = jax.jit(optax8.dequantize)(q)
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(expected.codes))
  np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(expected.absmax))
  np.testing.assert_array_equal(np.asarray(d), np.asarray(optax8.dequantize(expected)))
  for a in (q.codes, q.absmax, d, optax8.quantize(x, BLOCK).absmax):   # jitted and eager
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (a.sharding, spec)
  assert "all-gather" not in _hlo(quantize, x)
  assert "all-gather" not in _hlo(jax.jit(optax8.dequantize), q)


def test_a_last_axis_that_splits_blocks_is_gathered_not_miscomputed():
  """A row of 1000 elements is not whole blocks: the kernel needs whole rows, by communication."""
  mesh = _mesh(AxisType.Auto)
  host = np.random.default_rng(1).standard_normal((4, 1000)).astype(np.float32)
  x = jax.device_put(host, NamedSharding(mesh, P(None, "x")))
  q = jax.jit(lambda x: optax8.quantize(x, BLOCK))(x)
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(optax8.quantize(host, BLOCK).codes))


def test_block_rule():
  assert sharding.keeps_blocks(2048, 8, 256) and sharding.keeps_blocks(100, 1, 256)
  assert not sharding.keeps_blocks(1024, 8, 256)   # 128 per shard
  assert not sharding.keeps_blocks(2040, 8, 8)     # uneven shards


# ---- optimizer steps ---------------------------------------------------------


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_sharded_step_equals_the_single_device_step(opt, layout, axis_type):
  tx = OPTIMIZERS[opt]()
  step = _step_fn(tx)
  params_host, grads_host = _tree(0), _tree(1)
  ref_params, ref_state = jax.jit(step)(params_host, tx.init(params_host), grads_host)

  mesh, specs = _mesh(axis_type), _specs(layout)
  with jax.set_mesh(mesh):
    params, grads = _put(params_host, mesh, specs), _put(grads_host, mesh, specs)
    state = tx.init(params)
    init_types = jax.tree.map(jax.typeof, state)
    jitted = jax.jit(step, donate_argnums=(1,))
    hlo = _hlo(jitted, params, state, grads)
    new_params, new_state = jitted(params, state, grads)
    new_types = jax.tree.map(jax.typeof, new_state)

  # State leaves are sharded like their parameter (absmax on the same mesh axes), never replicated.
  for path, x in _state_leaves(new_state):
    leaf = "w" if "'w'" in path else "b" if "'b'" in path else "s"
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, specs[leaf]), x.ndim), (path, x.sharding)
    assert not x.sharding.is_fully_replicated, path
  assert init_types == new_types
  assert "all-gather" not in hlo
  if opt != "adamw":   # trust ratios: per-shard partial sums of squares, combined by an all-reduce
    assert "all-reduce" in hlo

  # Codes, absmax and float32 state match the single-device step bit for bit. AdamW's updates do too;
  # LAMB's and LARS's norms sum their shards' partial sums in another order (float32 rounding).
  exact = opt == "adamw"
  for (path, got), (_, want) in zip(_state_leaves(new_state), _state_leaves(ref_state)):
    if exact or opt == "lamb":   # LAMB's ratio scales the update after the state is stored
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=path)
    elif got.dtype == np.uint8:   # LARS's ratio scales the gradient that enters the momentum
      diff = np.abs(np.asarray(got, np.int32) - np.asarray(want, np.int32))
      assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, path
    else:
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, err_msg=path)
  for k in params_host:
    if exact:
      np.testing.assert_array_equal(np.asarray(new_params[k]), np.asarray(ref_params[k]), err_msg=k)
    else:
      np.testing.assert_allclose(np.asarray(new_params[k]), np.asarray(ref_params[k]), rtol=1e-6, atol=1e-7)


def test_explicit_mesh_types_are_kept_by_eager_and_jitted_updates():
  tx = OPTIMIZERS["adamw"]()
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    params = _put(_tree(0), mesh, _specs("fsdp"))
    grads = _put(_tree(1), mesh, _specs("fsdp"))
    state = tx.init(params)
    types = jax.tree.map(jax.typeof, state)
    assert jax.tree.map(jax.typeof, jax.jit(tx.init)(params)) == types
    _, eager = tx.update(grads, state, params)
    assert jax.tree.map(jax.typeof, eager) == types
    _, jitted = jax.jit(tx.update)(grads, state, params)
    assert jax.tree.map(jax.typeof, jitted) == types
    assert jax.typeof(state.mu["w"].codes).sharding.spec == P("x", None)


def test_pure_jax_backend_is_shard_local_too(monkeypatch):
  jax.clear_caches()   # the native kernels are chosen when an op is traced
  monkeypatch.setattr(dispatch, "_native_branches", lambda fn: {})
  try:
    test_sharded_step_equals_the_single_device_step("adamw", "tp", AxisType.Auto)
  finally:
    monkeypatch.undo()
    jax.clear_caches()


def test_vmapped_quantize_keeps_its_shards():
  mesh = _mesh(AxisType.Auto)
  host = np.random.default_rng(2).standard_normal((8, 4, 512)).astype(np.float32)
  x = jax.device_put(host, NamedSharding(mesh, P("x", None, None)))
  q = jax.jit(jax.vmap(lambda r: optax8.quantize(r, BLOCK)))(x)
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(optax8.quantize(host, BLOCK).codes))
  assert q.codes.sharding.is_equivalent_to(x.sharding, 3)


# ---- errors ------------------------------------------------------------------


def test_a_sharding_that_splits_blocks_fails_at_init():
  mesh = _mesh(AxisType.Auto)
  params = {"layer": {"w": jax.device_put(jnp.zeros((16, 1024)), NamedSharding(mesh, P(None, "x")))}}
  with pytest.raises(ValueError) as e:
    optax8.adamw8bit(1e-3).init(params)
  msg = str(e.value)
  for part in ("adamw8bit", "['layer']['w']", "P(None, 'x')", "256", "128", "P('x', None)", "block_size"):
    assert part in msg, (part, msg)
  # A block size that divides the shard length, or 32-bit state, is fine.
  state = optax8.adamw8bit(1e-3, block_size=128).init(params)
  assert state.mu["layer"]["w"].absmax.sharding.spec == P(None, "x")
  optax8.adamw8bit(1e-3, bits=32).init(params)


def test_a_gradient_split_finer_than_the_blocks_is_resharded_not_a_crash():
  """FSDP params (rows) whose gradients the backward pass splits by columns, 8 ways over a row of two
  256-element blocks: no block factor is split over part of a mesh axis (which custom_partitioning
  cannot express); the step compiles and equals the single-device step."""
  rng = np.random.default_rng(0)
  params_host = {"w1": (rng.standard_normal((1024, 512)) / 32).astype(np.float32),
                 "w2": (rng.standard_normal((512, 256)) / 32).astype(np.float32)}
  x, y = rng.standard_normal((16, 1024)).astype(np.float32), rng.standard_normal((16, 256)).astype(np.float32)
  tx = optax8.adamw8bit(1e-3, weight_decay=0.1)

  def step(params, state):
    grads = jax.grad(lambda p: jnp.mean((jax.nn.relu(x @ p["w1"]) @ p["w2"] - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), grads

  mesh = _mesh(AxisType.Auto)
  params = _put(params_host, mesh, {"w1": P("x", None), "w2": P("x", None)})
  new_params, grads = jax.jit(step)(params, tx.init(params))
  grads_host = jax.tree.map(np.asarray, grads)   # the reference steps on the very same gradients
  updates, _ = jax.jit(tx.update)(grads_host, tx.init(params_host), params_host)
  for k in params_host:
    np.testing.assert_array_equal(np.asarray(new_params[k]), np.asarray(params_host[k] + updates[k]), err_msg=k)
