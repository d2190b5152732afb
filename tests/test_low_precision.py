"""bfloat16 and float16 params without master weights (optax8.low_precision): stochastic rounding of p + u."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax8
from optax8 import low_precision, rounding
from optax8.optimizers import REGISTRY

from helpers import needs_native_cpu, pure_jax_steps

from test_alias import ARGS

NARROW = [jnp.bfloat16, jnp.float16]


def _draws(shape, step):
  """Random uint32 bits per element."""
  return rounding.mix(rounding.element_index(rounding.index_vectors(shape)) ^ rounding.state_key(step, 0, 0))


def _neighbours(x, dtype):
  """The values of ``dtype`` at or below and at or above each float32 ``x``."""
  near = np.asarray(jnp.asarray(x).astype(dtype))
  n = near.astype(np.float32)
  other = np.asarray(jnp.nextafter(jnp.asarray(near), jnp.asarray(np.where(x > n, np.inf, -np.inf), dtype)))
  o = other.astype(np.float32)
  return np.minimum(n, o), np.maximum(n, o)


@pytest.mark.parametrize("dtype", NARROW, ids=["bfloat16", "float16"])
def test_stochastic_round_is_a_neighbour_and_unbiased(dtype):
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-3, 3, 2000),
                      np.asarray(jnp.asarray(rng.standard_normal(200)).astype(dtype), np.float32)]).astype(np.float32)
  lo, hi = _neighbours(x, dtype)
  exact = lo == hi
  total = np.zeros_like(x, np.float64)
  steps = 2000
  for step in range(steps):
    r = np.asarray(low_precision.stochastic_round(jnp.asarray(x), dtype, _draws(x.shape, step))).astype(np.float32)
    assert np.all((r == lo) | (r == hi))
    np.testing.assert_array_equal(r[exact], x[exact])   # representable values stay
    total += r
  mean = total / steps
  p = np.where(exact, 0, (x - lo) / np.where(exact, 1, hi - lo))
  sigma = (hi - lo) * np.sqrt(p * (1 - p) / steps)
  assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-12 * np.abs(x))
  nearest = np.asarray(jnp.asarray(x).astype(dtype)).astype(np.float32)
  assert np.mean(np.abs(mean - x) < np.abs(nearest - x) / 4) > 0.8   # far closer than rounding to nearest


@pytest.mark.parametrize("dtype", NARROW, ids=["bfloat16", "float16"])
def test_stochastic_round_keeps_what_rounding_to_nearest_gives_at_the_edges(dtype):
  big = float(jnp.finfo(dtype).max)
  x = np.asarray([np.inf, -np.inf, np.nan, 0.0, -0.0, big * 1.001, -big * 1.001, big], np.float32)
  for step in range(16):
    r = np.asarray(low_precision.stochastic_round(jnp.asarray(x), dtype, _draws(x.shape, step)).astype(jnp.float32))
    np.testing.assert_array_equal(r, np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32)))


def _bf16_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.standard_normal((64, 256)) * 0.5 + 1.0, jnp.bfloat16),
          "b": jnp.asarray(rng.standard_normal(256), jnp.bfloat16),
          "h": jnp.asarray(rng.standard_normal((16, 256)), jnp.float16),
          "f": jnp.asarray(rng.standard_normal(256), jnp.float32)}


def _grads(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def test_small_updates_are_kept_on_average_where_rounding_to_nearest_loses_them():
  """AdamW at lr 1e-4 on bfloat16 params near 1 (spacing 2**-7): rounded to nearest nothing moves; rounded
  stochastically the params follow the float32 params' path."""
  params = {"w": jnp.full((64, 256), 1.0, jnp.bfloat16)}
  target = 0.9
  loss = lambda p: 0.5 * jnp.sum(jnp.square(p["w"].astype(jnp.float32) - target))

  def train(tx, params, steps=200):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      g = jax.grad(loss)(params)
      return optax8.apply_gradients(tx, jax.tree.map(lambda x, p: x.astype(p.dtype), g, params), state, params)
    for _ in range(steps):
      params, state = step(params, state)
    return np.asarray(params["w"].astype(jnp.float32))

  make = lambda **kw: optax8.adamw8bit(1e-4, weight_decay=0.0, min_8bit_size=0, **kw)
  reference = train(make(), jax.tree.map(lambda x: x.astype(jnp.float32), params))
  nearest = train(make(), params)
  stochastic = train(make(param_rounding="stochastic"), params)
  assert abs(reference.mean() - (1 - 200 * 1e-4)) < 1e-3   # float32 params moved by 200 lr
  np.testing.assert_array_equal(nearest, 1.0)   # every update lost
  assert abs(stochastic.mean() - reference.mean()) < 2e-4


def test_update_path_and_fused_apply_give_the_same_params():
  """With float32 gradients; with bfloat16 ones the fused apply forms p + u in float32 (the kernel rounds it,
  as in every fused apply), so it equals the update path given the same gradients in float32."""
  params = _bf16_tree()
  narrow = _grads(params)
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), narrow)
  tx = optax8.adamw8bit(1e-3, param_rounding="stochastic")
  state = tx.init(params)
  u, s1 = jax.jit(tx.update)(grads, state, params)
  via_updates = optax.apply_updates(params, u)
  fused, s2 = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
  eager, _ = optax8.apply_gradients(tx, grads, state, params)
  with jax.disable_jit():
    undone = optax.apply_updates(params, tx.update(grads, state, params)[0])
  from_narrow, _ = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(narrow, state, params)
  for k in params:
    assert via_updates[k].dtype == params[k].dtype and u[k].dtype == grads[k].dtype
    for other in (fused, eager, undone):
      np.testing.assert_array_equal(np.asarray(via_updates[k]), np.asarray(other[k]))
    if k in ("w", "b"):   # the kernel rounds
      np.testing.assert_array_equal(np.asarray(via_updates[k]), np.asarray(from_narrow[k]))
  jax.tree.map(np.testing.assert_array_equal, s1, s2)
  # the float32 leaf is as without the option; the narrow ones differ from rounding to nearest
  plain = optax8.adamw8bit(1e-3)
  near = optax.apply_updates(params, jax.jit(plain.update)(grads, plain.init(params), params)[0])
  np.testing.assert_array_equal(np.asarray(via_updates["f"]), np.asarray(near["f"]))
  for k in ("w", "b", "h"):
    assert np.mean(np.asarray(via_updates[k]) != np.asarray(near[k])) > 0.01, k


@pytest.mark.parametrize("dtype", NARROW, ids=["bfloat16", "float16"])
def test_an_infinite_param_stays_itself_on_both_paths(dtype):
  """The update path returns p' - p, which was inf - inf = NaN for an infinite parameter: optax.apply_updates
  then made it NaN where the fused apply (and the update path without param_rounding) keep it."""
  p = jnp.array([jnp.inf, -jnp.inf, 1.0], dtype)
  g = -jnp.ones(3, dtype)
  tx = optax8.adamw8bit(1e-3, param_rounding="stochastic")
  state = tx.init(p)
  via_updates = optax.apply_updates(p, jax.jit(tx.update)(g, state, p)[0])
  fused, _ = optax8.apply_gradients(tx, g, state, p)
  np.testing.assert_array_equal(np.asarray(via_updates, np.float32), np.asarray(fused, np.float32))
  assert np.asarray(via_updates, np.float32)[:2].tolist() == [np.inf, -np.inf]


@needs_native_cpu
def test_the_kernel_rounds_bfloat16_params_in_the_fused_apply(monkeypatch):
  """optax8.chain hands param_rounding to the optimizer's fused apply: the native kernel rounds the bfloat16
  leaves (no rounding after it in JAX), with the pure-JAX step's params (to float32 rounding of the rule), and
  the states as without the rounding; float16 leaves are rounded in JAX after their update."""
  params = _bf16_tree()
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), _grads(params))
  tx = optax8.adamw8bit(1e-3, param_rounding="stochastic")
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))
  hlo = step.lower(grads, state, params).compile().as_text()
  assert "stochastic = 2" in hlo   # the kernel's fused apply rounds
  assert "shift-right-logical" in hlo   # the float16 leaf's draws, in JAX
  got, got_state = step(grads, state, params)
  plain = optax8.adamw8bit(1e-3)
  _, plain_state = jax.jit(lambda g, s, p: optax8.apply_gradients(plain, g, s, p))(grads, plain.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, got_state[0], plain_state)
  with pure_jax_steps(monkeypatch):
    step = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))
    assert "optax8_step" not in step.lower(grads, state, params).compile().as_text()
    want, _ = step(grads, state, params)
  for k in ("w", "b"):
    a, b = np.asarray(got[k]), np.asarray(want[k])
    assert np.mean(a.view(np.uint16) == b.view(np.uint16)) > 0.999, k
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2.0**-7)


def test_draws_differ_by_step_and_leaf_and_repeat_for_the_same_step():
  params = {"a": jnp.full((4096,), 1.0, jnp.bfloat16), "b": jnp.full((4096,), 1.0, jnp.bfloat16)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax8.sgd8bit(1e-3, momentum=0.9, param_rounding="stochastic")
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))
  p1, s1 = step(grads, state, params)
  again, _ = step(grads, state, params)
  np.testing.assert_array_equal(np.asarray(p1["a"]), np.asarray(again["a"]))
  assert np.mean(np.asarray(p1["a"]) != np.asarray(p1["b"])) > 0.05   # each leaf its own draws
  later, _ = step(grads, s1, params)   # the same params and gradients one step later
  assert np.mean(np.asarray(later["a"]) != np.asarray(p1["a"])) > 0.05


CASES = {**{name: (REGISTRY[name].make, lr, kwargs) for name, (lr, kwargs) in ARGS.items()},
         "muon8bit": (optax8.muon8bit, 2e-2, {}),
         "sgd8bit-no-momentum": (optax8.sgd8bit, 1e-2, {}),   # optax's chain, no 8-bit state
         "rmsprop8bit-momentum": (optax8.rmsprop8bit, 3e-4, {"momentum": 0.9}),
         "adamw8bit-percentile-clipping": (optax8.adamw8bit, 1e-3, {"percentile_clipping": 90})}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_optimizer_takes_param_rounding(name):
  """Every optimizer's update path and fused apply round alike; the state gains only a step count."""
  make, lr, kwargs = CASES[name]
  make = functools.partial(make, lr, **kwargs)
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.standard_normal((64, 128)) * 0.1 + 1, jnp.bfloat16),
            "v": jnp.asarray(rng.standard_normal((8192,)) * 0.1 + 1, jnp.bfloat16)}
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), _grads(params))   # see the test above
  tx = make(param_rounding="stochastic")
  state = tx.init(params)
  assert isinstance(state[-1], optax8.ParamRoundingState)
  jax.tree.map(np.testing.assert_array_equal, state[0], make().init(params))
  u, s1 = jax.jit(tx.update)(grads, state, params)
  fused, s2 = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
  jax.tree.map(np.testing.assert_array_equal, s1, s2)
  assert int(s1[-1].count) == 1
  new = optax.apply_updates(params, u)
  plain = make()
  near = optax.apply_updates(params, jax.jit(plain.update)(grads, plain.init(params), params)[0])
  for k in params:
    np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(fused[k]))
    assert new[k].dtype == jnp.bfloat16
    assert np.mean(np.asarray(new[k]) != np.asarray(near[k])) > 0.01, k


def test_param_rounding_per_leaf_and_its_errors():
  params = _bf16_tree()
  grads = _grads(params)
  mixed = optax8.lion8bit(1e-3, param_rounding={"w": "stochastic", "b": "nearest", "h": None, "f": "stochastic"})
  sr, rn = optax8.lion8bit(1e-3, param_rounding="stochastic"), optax8.lion8bit(1e-3)
  run = lambda tx: jax.jit(lambda p: optax.apply_updates(p, tx.update(grads, tx.init(p), p)[0]))(params)
  got, want_sr, want_rn = run(mixed), run(sr), run(rn)
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want_sr["w"]))
  for k in ("b", "h", "f"):   # rounded to nearest as optax.apply_updates rounds them
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want_rn[k]))
  assert rn.init(params).__class__ is optax8.ScaleByLion8bitState   # 'nearest' adds nothing
  with pytest.raises(ValueError, match=r"lion8bit: param_rounding must be one of \('nearest', 'stochastic'\), got "
                                       r"'up'"):
    optax8.lion8bit(1e-3, param_rounding="up")
  bad = optax8.lion8bit(1e-3, param_rounding={"w": "stochastic", "b": "floor", "h": None, "f": None})
  with pytest.raises(ValueError, match=r"lion8bit: param_rounding of leaf \['b'\] must be one of .* got 'floor'"):
    bad.init(params)
  alone = optax8.param_rounding()
  with pytest.raises(ValueError, match=r"param_rounding: rounding the new parameters needs them"):
    alone.update(grads, alone.init(params))
  with pytest.raises(ValueError, match=r"param_rounding: rounding must be one of .* got 'down'"):
    optax8.param_rounding("down")


def test_param_rounding_composes_with_optax_and_inject_hyperparams():
  params = _bf16_tree()
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), _grads(params))
  # after optax's own optimizer, in optax8.chain (fused apply) and optax.chain (update path), and under
  # inject_hyperparams (the option is static)
  for tx in (optax8.chain(optax.adam(1e-3), optax8.param_rounding()),
             optax.chain(optax.adam(1e-3), optax8.param_rounding()),
             optax8.inject_hyperparams(optax8.adamw8bit)(learning_rate=1e-3, param_rounding="stochastic")):
    state = tx.init(params)
    new, _ = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
    via_updates = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))(grads, state, params)
    for k in params:
      np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(via_updates[k]))
    assert isinstance(jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax8.ParamRoundingState))[-1],
                      optax8.ParamRoundingState)


def test_vmap_rounds_each_example_as_alone():
  params = _bf16_tree()
  grads = _grads(params)
  tx = optax8.adam8bit(1e-3, param_rounding="stochastic")
  state = tx.init(params)
  batch = lambda t: jax.tree.map(lambda x: jnp.stack([x, x]), t)
  u, _ = jax.vmap(tx.update)(batch(grads), batch(state), batch(params))
  one, _ = jax.jit(tx.update)(grads, state, params)
  for k in params:
    np.testing.assert_array_equal(np.asarray(u[k][1]), np.asarray(one[k]))


def test_nnx_optimizer_trains_a_bfloat16_model():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(256, 64, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (32, 256), jnp.bfloat16)
  y = jax.random.normal(jax.random.key(2), (32, 64), jnp.bfloat16)
  opt = optax8.nnx.Optimizer(model, optax8.adamw8bit(1e-2, min_8bit_size=0, param_rounding="stochastic"),
                             wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x).astype(jnp.float32) - y)))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(20)]
  assert model.kernel[...].dtype == jnp.bfloat16
  assert losses[-1] < 0.7 * losses[0]


def test_sharded_param_rounding_equals_the_single_device_one():
  from test_sharding import _mesh, _put
  rng = np.random.default_rng(4)
  params = {"w": rng.standard_normal((128, 2048)).astype(jnp.bfloat16), "b": rng.standard_normal(2048).astype(
      jnp.bfloat16)}
  grads = jax.tree.map(lambda x: (x * 0.01).astype(x.dtype), params)
  tx = optax8.adamw8bit(1e-3, weight_decay=1e-2, min_8bit_size=256, param_rounding="stochastic")
  step = jax.jit(lambda p, s, g: optax8.apply_gradients(tx, g, s, p))
  want, _ = step(params, tx.init(params), grads)
  for spec in (P("x", None), P(None, "x")):
    mesh = _mesh(AxisType.Explicit)
    with jax.set_mesh(mesh):
      specs = {"w": spec, "b": P("x")}
      p, g = _put(params, mesh, specs), _put(grads, mesh, specs)
      got, _ = step(p, tx.init(p), g)
    for k in params:
      assert got[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), got[k].ndim)
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
