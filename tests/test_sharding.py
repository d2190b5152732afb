"""optax8 on an 8-device CPU mesh: shard-local kernels, state shardings, Explicit-mode types."""

import functools

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
# FSDP shards the rows of every matrix, tensor parallelism its columns. At block_size 256 a block is a
# 16 x 16 tile, so any shards of a multiple of 16 hold whole blocks: "e" (256 x 256, as Flax's Gemma
# example shards embeddings) is split into shards 32 wide.
LAYOUTS = {"fsdp": P("x", None), "tp": P(None, "x")}
OPTIMIZERS = {
    "adamw": lambda: optax8.adamw8bit(1e-2, weight_decay=1e-2, min_8bit_size=256),
    # stochastic rounding draws from each element's index in its whole leaf, whatever shard holds it
    "adamw-stochastic": lambda: optax8.adamw8bit(1e-2, weight_decay=1e-2, min_8bit_size=256, rounding="stochastic"),
    "lamb": lambda: optax8.lamb8bit(1e-2, weight_decay=1e-2, min_8bit_size=256),
    "lars": lambda: optax8.lars8bit(1e-2, weight_decay=1e-2, min_8bit_size=256),
}


def _mesh(axis_type, shape=(8,), names=("x",)):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.standard_normal((128, 2048)).astype(np.float32),
          "e": rng.standard_normal((256, 256)).astype(np.float32),
          "b": rng.standard_normal((2048,)).astype(np.float32),
          "s": rng.standard_normal((8,)).astype(np.float32)}   # 32-bit state (below min_8bit_size)


def _specs(layout):
  return {"w": LAYOUTS[layout], "e": LAYOUTS[layout], "b": P("x"), "s": P("x")}


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
  host = np.random.default_rng(0).standard_normal((64, 2048)).astype(np.float32)
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
  assert sharding.keeps_blocks(256, 8, 16) and not sharding.keeps_blocks(64, 8, 16)   # tiles: 32, 8 per shard


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
    leaf = next(k for k in ("w", "e", "b", "s") if f"'{k}'" in path)
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, specs[leaf]), x.ndim), (path, x.sharding)
    assert not x.sharding.is_fully_replicated, path
  assert init_types == new_types
  assert "all-gather" not in hlo
  if not opt.startswith("adamw"):   # trust ratios: per-shard partial sums of squares, combined by an all-reduce
    assert "all-reduce" in hlo

  # Codes, absmax and float32 state match the single-device step bit for bit. AdamW's updates do too;
  # LAMB's and LARS's norms sum their shards' partial sums in another order (float32 rounding).
  exact = opt.startswith("adamw")
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


def test_fsdp_and_tensor_parallel_at_once_at_the_default_block_size():
  """Rows over one mesh axis and columns over another (shards of 32 x 128 and 64 x 32): no all-gather, the
  state on its parameter's shards, and the single-device step bit for bit."""
  tx = OPTIMIZERS["adamw"]()
  params_host, grads_host = _tree(0), _tree(1)
  ref_params, ref_state = jax.jit(_step_fn(tx))(params_host, tx.init(params_host), grads_host)
  mesh = _mesh(AxisType.Auto, (4, 2), ("fsdp", "tp"))
  specs = {"w": P("fsdp", "tp"), "e": P("fsdp", "tp"), "b": P("fsdp"), "s": P()}
  params, grads = _put(params_host, mesh, specs), _put(grads_host, mesh, specs)
  state = tx.init(params)
  jitted = jax.jit(_step_fn(tx), donate_argnums=(1,))
  assert "all-gather" not in _hlo(jitted, params, state, grads)
  new_params, new_state = jitted(params, state, grads)
  for path, x in _state_leaves(new_state):
    leaf = next(k for k in ("w", "e", "b", "s") if f"'{k}'" in path)
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, specs[leaf]), x.ndim), (path, x.sharding)
  for (path, got), (_, want) in zip(_state_leaves(new_state), _state_leaves(ref_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=path)
  for k in params_host:
    np.testing.assert_array_equal(np.asarray(new_params[k]), np.asarray(ref_params[k]), err_msg=k)


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


@pytest.mark.parametrize("mismatch", ["replicated-grads", "replicated-state", "no-params"])
def test_explicit_mesh_inputs_of_other_shardings_are_resharded_like_optax(mismatch):
  """On an Explicit mesh, a gradient or a state (restored replicated, say) sharded unlike its parameter:
  optax's step takes it, and so does optax8's (eager and jitted, update and apply_gradients), with the
  results of the all-sharded step and the state leaving sharded like the parameter."""
  tx = optax8.adam8bit(1e-2, min_8bit_size=256) if mismatch == "no-params" else OPTIMIZERS["adamw"]()
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    params, grads = _put(_tree(0), mesh, _specs("fsdp")), _put(_tree(1), mesh, _specs("fsdp"))
    state = tx.init(params)
    want_u, want_s = jax.jit(tx.update)(grads, state, params)
    replicated = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), tree)
    if mismatch == "replicated-state":
      state = replicated(state)
    else:
      grads = replicated(grads)
    if mismatch == "no-params":
      runs = {"eager": tx.update(grads, state), "jit": jax.jit(tx.update)(grads, state)}
    else:
      applied = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
      runs = {"eager": tx.update(grads, state, params), "jit": jax.jit(tx.update)(grads, state, params),
              "apply": applied}
    for how, (u, s) in runs.items():
      want = optax.apply_updates(params, want_u) if how == "apply" else want_u
      for k in ("w", "e", "b"):
        np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(want[k]), err_msg=how)
        assert jax.typeof(u[k]).sharding.spec == jax.typeof(want[k]).sharding.spec, how
        np.testing.assert_array_equal(np.asarray(s.mu[k].codes), np.asarray(want_s.mu[k].codes), err_msg=how)
        np.testing.assert_array_equal(np.asarray(s.nu[k].absmax), np.asarray(want_s.nu[k].absmax), err_msg=how)
        assert jax.typeof(s.mu[k].codes).sharding.spec == jax.typeof(want_s.mu[k].codes).sharding.spec, how
        assert jax.typeof(s.nu[k].absmax).sharding.spec == jax.typeof(want_s.nu[k].absmax).sharding.spec, how


@pytest.mark.parametrize("bits", [8, 4])
def test_auto_mesh_gradient_sharded_unlike_the_state_moves_not_the_state(bits):
  """Params and state by rows, the gradient by columns (jit's in_shardings, an Auto mesh): like optax, the
  step moves the gradient; the codes and absmax stay on their shards (before: all gathered to every device,
  the partitioner following the gradient), and the results equal the single-device step's."""
  mesh = _mesh(AxisType.Auto, (2, 4), ("data", "model"))
  tx = optax8.adamw8bit(1e-2, min_8bit_size=0, bits=bits)
  rng = np.random.default_rng(0)
  p_host, g_host = ({"w": rng.standard_normal((256, 128)).astype(np.float32)} for _ in range(2))
  params = _put(p_host, mesh, {"w": P("model", None)})
  state = tx.init(params)
  state = jax.tree.map(lambda x: x if len(x.sharding.device_set) > 1 else
                       jax.device_put(x, NamedSharding(mesh, P())), state)   # the count, on the mesh
  in_shardings = (jax.tree.map(lambda x: x.sharding, params), jax.tree.map(lambda x: x.sharding, state),
                  {"w": NamedSharding(mesh, P(None, "model"))})
  step = jax.jit(_step_fn(tx), in_shardings=in_shardings, out_shardings=in_shardings[:2])
  grads = jax.device_put(g_host, in_shardings[2])
  hlo = _hlo(step, params, state, grads)
  moved = [line for line in hlo.splitlines()
           if any(f" {c}(" in line or f" {c}-start(" in line
                  for c in ("all-gather", "all-to-all", "collective-permute", "all-reduce"))]
  assert moved and not [line for line in moved if "u8[" in line or "f32[16,8]" in line or "f32[32,8]" in line], moved
  new_params, new_state = step(params, state, grads)
  want_params, want_state = jax.jit(_step_fn(tx))(p_host, tx.init(p_host), g_host)
  np.testing.assert_array_equal(np.asarray(new_params["w"]), np.asarray(want_params["w"]))
  np.testing.assert_array_equal(np.asarray(new_state.mu["w"].codes), np.asarray(want_state.mu["w"].codes))
  assert new_state.mu["w"].codes.sharding.is_equivalent_to(params["w"].sharding, 2)


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


@pytest.mark.parametrize("opt", ["adamw", "adamw-stochastic", "lamb"])
def test_vmapped_ensemble_with_its_own_step_counts_stays_on_its_shards(opt):
  """An ensemble (jax.vmap(tx.init), jax.vmap of the step) on a 2 x 4 mesh, the members split over 'data':
  with a step count per member, Adam's hyperparameter rows are batched too. Before, that vmapped the kernel
  unpartitioned: every operand gathered to every device and the new state replicated. Now each device
  steps its members with their own rows: no collectives, the state keeps its sharding, and each member
  equals its own unbatched step (LAMB's params to the last bits of its norms, summed per shard here)."""
  mesh = _mesh(AxisType.Auto, (2, 4), ("data", "model"))
  tx = {"adamw": lambda: optax8.adamw8bit(1e-2, weight_decay=1e-2, min_8bit_size=0),
        "adamw-stochastic": lambda: optax8.adamw8bit(1e-2, min_8bit_size=0, rounding="stochastic"),
        "lamb": lambda: optax8.lamb8bit(1e-2, min_8bit_size=0)}[opt]()
  rng = np.random.default_rng(0)
  p_host, g_host = ({"a": rng.standard_normal((4, 64, 128)).astype(np.float32)} for _ in range(2))
  step = _step_fn(tx)
  state = jax.vmap(tx.init)(p_host)
  for k in range(3):   # member k has taken k steps: counts 0, 1, 2, 3 (the rest stays as made)
    member = lambda tree, k=k: jax.tree.map(lambda x: x[k + 1], tree)
    one = member(state)
    for _ in range(k + 1):
      _, one = jax.jit(step)(member(p_host), one, member(g_host))
    state = jax.tree.map(lambda x, y, k=k: x.at[k + 1].set(y), state, one)
  field = lambda tree, name: optax.tree_utils.tree_get(tree, name)
  assert np.asarray(field(state, "count")).tolist() == [0, 1, 2, 3]
  want = [jax.jit(step)(*(jax.tree.map(lambda x, k=k: x[k], t) for t in (p_host, state, g_host)))
          for k in range(4)]
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *(None,) * (x.ndim - 2), "model")
                                                    if x.ndim == 3 else P("data")))
  params, grads, state = jax.tree.map(shard, p_host), jax.tree.map(shard, g_host), jax.tree.map(shard, state)
  vstep = jax.jit(jax.vmap(step))
  hlo = _hlo(vstep, params, state, grads)
  assert not [line for line in hlo.splitlines() if " all-gather(" in line or " all-gather-start(" in line]
  new_params, new_state = vstep(params, state, grads)
  for k in range(4):
    np.testing.assert_allclose(np.asarray(new_params["a"][k]), np.asarray(want[k][0]["a"]), err_msg=str(k),
                               rtol=2e-5 if opt == "lamb" else 0, atol=0)
    np.testing.assert_array_equal(np.asarray(field(new_state, "mu")["a"].codes[k]),
                                  np.asarray(field(want[k][1], "mu")["a"].codes), err_msg=str(k))
  codes = field(new_state, "mu")["a"].codes
  assert codes.sharding.is_equivalent_to(field(state, "mu")["a"].codes.sharding, 3)


# ---- errors ------------------------------------------------------------------


def test_a_sharding_that_splits_blocks_fails_at_init():
  mesh = _mesh(AxisType.Auto)
  # columns 8 wide per shard: narrower than a 16 x 16 tile
  params = {"layer": {"w": jax.device_put(jnp.zeros((512, 64)), NamedSharding(mesh, P(None, "x")))}}
  with pytest.raises(ValueError) as e:
    optax8.adamw8bit(1e-3).init(params)
  msg = str(e.value)
  for part in ("adamw8bit", "['layer']['w']", "P(None, 'x')", "axis 1", "shards of 8", "16 x 16", "block_size",
               "32 bits"):
    assert part in msg, (part, msg)
  # Blocks that fit the shards (8 x 8 tiles), or 32-bit state, are fine.
  state = optax8.adamw8bit(1e-3, block_size=64).init(params)
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


# ---- Flax's partitioning annotations (Flax's documented patterns) ----------------------------------------


def _param_specs_of_state(state_specs, param_specs):
  """{path: (spec of the state array, spec of its parameter)} for every codes, absmax and float32 state."""
  out = {}
  for field in ("mu", "nu"):
    for path, spec in jax.tree_util.tree_flatten_with_path(state_specs[field], is_leaf=lambda x: isinstance(x, P))[0]:
      names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
      param_path = [n for n in names if n not in ("codes", "absmax", "value")]
      param_spec = param_specs
      for n in param_path:
        param_spec = param_spec[n]
      out[f"{field}{jax.tree_util.keystr(path)}"] = (spec, param_spec)
  return out


def test_nnx_with_partitioning_annotations_reach_the_state():
  """nnx.with_partitioning / sharding_names, nnx.Optimizer, then with_sharding_constraint(state,
  nnx.get_partition_spec(state)) inside nnx.jit (Flax's guide): codes and absmax get their parameter's spec,
  and keep it through nnx.jit train steps."""
  from flax import nnx

  class DotReluDot(nnx.Module):
    def __init__(self, depth: int, rngs: nnx.Rngs):
      init_fn = nnx.initializers.lecun_normal()
      self.dot1 = nnx.Linear(depth, depth, kernel_init=nnx.with_partitioning(init_fn, (None, "model")),
                             use_bias=False, rngs=rngs)
      self.w2 = nnx.Param(init_fn(rngs.params(), (depth, depth)), sharding_names=("model", None))

    def __call__(self, x):
      return jax.nn.relu(self.dot1(x)) @ self.w2

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

  @nnx.jit
  def create_sharded_model_and_optimizer():
    model = DotReluDot(1024, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax8.adamw8bit(1e-3), wrt=nnx.Param)
    state = nnx.state(optimizer)
    sharded_state = jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
    nnx.update(optimizer, sharded_state)
    return model, optimizer

  @nnx.jit
  def train_step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  with jax.set_mesh(mesh):
    model, optimizer = create_sharded_model_and_optimizer()
    losses = [float(train_step(model, optimizer, jnp.ones((8, 1024)))) for _ in range(3)]
  assert losses[2] < losses[0]
  param_specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  state_specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(optimizer.opt_state)))
  pairs = _param_specs_of_state(state_specs, param_specs)
  assert len(pairs) == 8   # mu and nu: codes and absmax of two kernels
  for path, (spec, param_spec) in pairs.items():
    assert spec == param_spec != P(), path
  named = nnx.to_pure_dict(nnx.get_named_sharding(nnx.state(optimizer.opt_state), mesh))
  state = nnx.to_pure_dict(nnx.state(optimizer.opt_state))
  for field in ("mu", "nu"):
    for where, array in zip(jax.tree.leaves(named[field]), jax.tree.leaves(state[field])):
      assert where.is_equivalent_to(array.sharding, array.ndim)   # the arrays are where the specs say


def test_linen_with_partitioning_annotations_reach_a_train_state():
  """nn.with_partitioning, TrainState.create under jax.eval_shape, nn.get_sharding as out_shardings (Flax's linen
  guide): codes and absmax of the TrainState's opt_state get their kernel's spec, through jitted train steps."""
  import flax.linen as nn
  from flax.training import train_state

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(1024, use_bias=False,
                   kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")))(x)
      return nn.Dense(512, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", None)))(
          nn.relu(x))

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  model, x = MLP(), jnp.ones((8, 256))

  def init_fn(key, x):
    return train_state.TrainState.create(apply_fn=model.apply, params=model.init(key, x)["params"],
                                         tx=optax8.adamw8bit(1e-3))

  abstract_state = jax.eval_shape(init_fn, jax.random.key(0), x)
  state_sharding = nn.get_sharding(abstract_state, mesh)
  state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.key(0), x)

  @functools.partial(jax.jit, in_shardings=(state_sharding, None), out_shardings=state_sharding)
  def train_step(state, x):
    grads = jax.grad(lambda p: jnp.mean(state.apply_fn({"params": p}, x) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  for _ in range(2):
    state = train_step(state, x)
  assert int(state.step) == 2
  opt_state = state.opt_state
  for field in (opt_state.mu, opt_state.nu):
    for name, spec in (("Dense_0", P(None, "model")), ("Dense_1", P("model", None))):
      q = field[name]["kernel"].unbox()
      for array in (q.codes, q.absmax):
        assert NamedSharding(mesh, spec).is_equivalent_to(array.sharding, 2), (name, array.sharding)
  specs = nn.get_partition_spec(state.opt_state)
  assert specs.mu["Dense_0"]["kernel"] == P(None, "model") and specs.nu["Dense_1"]["kernel"] == P("model", None)
