"""What real training feeds an optimizer: diverging gradients, mixed precision,
empty and scalar leaves, shard_map, eager debugging, vmap, bad options.

The contract (docs/inputs.md): no input gives a silent wrong answer; what
optax accepts, optax8 accepts; every bad input gets an error that names the
leaf or the option, raised when the step is traced.
"""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax8
from optax8 import dispatch, maps
from test_alias import NAMES, OPTIMIZERS
from helpers import per_element

FMAX = float(np.finfo(np.float32).max)
IS_Q = lambda x: isinstance(x, optax8.QuantizedArray)


@pytest.fixture(params=["native", "jax"])
def backend(request, monkeypatch):
  """Runs a test on the native kernels and again on the pure-JAX backend."""
  if request.param == "jax":
    monkeypatch.setattr(dispatch, "_native_branches", lambda fn: {})
    jax.clear_caches()   # traces made with the native branches must not be reused
  yield request.param
  if request.param == "jax":
    jax.clear_caches()


def run(tx, params, grads, steps=1, state=None):
  """``steps`` jitted update + apply_updates steps; returns (params, state, last update)."""
  state = tx.init(params) if state is None else state
  step = jax.jit(tx.update)
  u = None
  for i in range(steps):
    g = grads(i) if callable(grads) else grads
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state, u


def dequantized(state):
  """The state with every QuantizedArray as its float32 values (the bits=32 state's structure)."""
  return jax.tree.map(lambda l: optax8.dequantize(l) if IS_Q(l) else l, state, is_leaf=IS_Q)


# ---- 1. a diverging gradient --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spike", [1e19, 1e20, 3e38])
def test_one_huge_gradient_moves_params_no_more_than_optax(name, spike):
  """A single huge finite gradient element, then ordinary steps: every element moves as far as
  with optax's float32 optimizer (up to quantization error), never by ~spike."""
  ours, ref, _ = OPTIMIZERS[name]
  lr_steps = 5e-2   # slack: 5 steps of a learning rate up to 1e-2 (LARS: the trust ratio keeps it small)
  params = {"w": jnp.ones((8192,), jnp.float32)}

  def grads(i):
    g = jnp.full((8192,), 1e-2, jnp.float32).at[1::2].set(-1e-2)
    return {"w": g.at[5].set(spike) if i == 0 else g}

  p8, state, _ = run(ours(min_8bit_size=0), params, grads, steps=5)
  p32, _, _ = run(ref(), params, grads, steps=5)
  moved8 = np.abs(np.asarray(p8["w"]) - 1)
  moved32 = np.abs(np.asarray(p32["w"]) - 1)
  assert np.all(np.isfinite(moved8))
  assert np.all(moved8 <= 1.05 * moved32 + lr_steps), (moved8.max(), moved32.max())
  for leaf in jax.tree.leaves(state, is_leaf=IS_Q):
    if IS_Q(leaf):
      assert np.all(np.isfinite(np.asarray(leaf.absmax)))


@pytest.mark.parametrize("name", ["lars8bit", "muon8bit"])
def test_a_huge_gradient_scales_a_norm_based_step_instead_of_zeroing_the_leaf(name):
  """One 1e20 in a matrix: the leaf's norm would overflow (optax.lars and optax.contrib.muon then give the
  whole leaf a zero update, Muon for the following steps too). optax8's norms are finite up to float32's
  largest value: every element still moves, on this step and the next, by a finite amount."""
  tx = getattr(optax8, name)(1e-2, min_8bit_size=0)
  params = {"w": jnp.ones((32, 64))}
  clean = jnp.full((32, 64), 1e-2).at[::2].set(-1e-2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in (clean.at[0, 5].set(1e20), clean):
    u, state = update({"w": g}, state, params)
    u = np.asarray(u["w"])
    assert np.all(np.isfinite(u)) and np.count_nonzero(u) == u.size, np.count_nonzero(u)
    params = optax.apply_updates(params, {"w": u})


@pytest.mark.parametrize("name", ["lamb8bit", "lars8bit"])
@pytest.mark.parametrize("bits", [8, 32])
def test_params_whose_norm_overflows_get_a_finite_trust_ratio(name, bits):
  """Params near 1e20 (||p|| overflows float32): optax.lamb and optax.lars give infinite updates."""
  tx = getattr(optax8, name)(1e-3, min_8bit_size=0, bits=bits)
  params = {"w": jnp.full((1024,), 1e20).at[::3].set(-3e19)}
  grads = {"w": jnp.full((1024,), 1e-2)}
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, u)
  assert np.all(np.isfinite(np.asarray(u["w"]))) and np.all(np.isfinite(np.asarray(new["w"])))
  assert np.count_nonzero(np.asarray(u["w"])) == 1024


@pytest.mark.parametrize("conditional", [True, False], ids=["cpu", "other-platforms"])
def test_leaf_norms_are_finite_up_to_float32s_largest_value(conditional):
  """fused.norm's two forms (XLA:CPU's conditional, the two sums elsewhere): the plain sum of squares where it
  is finite, else that of x * 2**-80; non-finite elements count as 0; jitted and vmapped alike."""
  from optax8.fused import _norm
  rng = np.random.default_rng(0)
  x = rng.standard_normal(4096).astype(np.float32)
  cases = {"ordinary": x * 1e-2, "small": x * 1e-15, "one spike": (x * 1e-2).copy(), "huge": x * 1e30,
           "nonfinite": (x * 1e-2).copy(), "zeros": np.zeros(4096, np.float32)}
  cases["one spike"][7] = 1e20
  cases["nonfinite"][[3, 9, 11]] = [np.inf, np.nan, -np.inf]
  norm = jax.jit(lambda a: _norm((a,), lambda a: a, conditional))
  for name, a in cases.items():
    finite = np.where(np.isfinite(a), a, 0).astype(np.float64)
    want = np.sqrt(np.sum(finite**2))
    got = float(norm(jnp.asarray(a)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-37, err_msg=name)
    if name in ("ordinary", "nonfinite"):   # the plain sum, as before
      assert got == float(jnp.sqrt(jnp.sum(jnp.where(jnp.isfinite(a), jnp.asarray(a) ** 2, 0)))), name
  batch = jnp.stack([jnp.asarray(cases["one spike"]), jnp.asarray(cases["ordinary"])])
  np.testing.assert_allclose(jax.vmap(lambda a: _norm((a,), lambda a: a, conditional))(batch),
                             [norm(batch[0]), norm(batch[1])], rtol=1e-6)


SPECIALS = [0.0, 1e-45, -1e-40, 1.17e-38, 1e-30, 1e-8, 1.8e19, -1.85e19, 1e30, 3.4e38, -FMAX, np.inf, -np.inf,
            np.nan]
VALUES = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
                   st.sampled_from(SPECIALS))


@st.composite
def gradients(draw):
  """(2, 256) float32: normal values at a scale from 1e-40 to 1e30, with up to 32 elements anywhere in
  float32's range (subnormals, values that square to inf, inf, NaN) at drawn places."""
  scale = draw(st.sampled_from([1e-40, 1e-30, 1e-8, 1e-2, 1.0, 1e10, 1e19, 1e30]))
  g = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(512) * scale
  for i, v in draw(st.lists(st.tuples(st.integers(0, 511), VALUES), max_size=32)):
    g[i] = v
  return g.astype(np.float32).reshape(2, 256)


def _half_gap(kind: str) -> float:
  m = maps.dynamic_map(kind).astype(np.float64)
  return float(np.max(np.diff(m)) / 2)


@pytest.mark.parametrize("name", NAMES)
@hypothesis.given(g=gradients())
@hypothesis.settings(max_examples=25, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
def test_any_gradient_gives_a_finite_step_and_a_state_within_the_quantization_bound(name, g):
  """Gradients from the whole float32 range (subnormals, values that square to inf, inf, NaN):

  - from a fresh state, the 8-bit update and new params are finite wherever optax's float32
    ones are (they are finite everywhere);
  - from a warm state, the 8-bit step equals the float32 step (bits=32) taken from the
    dequantized state up to float32 rounding (XLA may contract the float32 rule's multiply-adds),
    on both paths, and each new 8-bit state is within half a code gap (times its block's absmax)
    of the float32 step's state.
  """
  ours, ref, _ = OPTIMIZERS[name]
  tx8 = ours(min_8bit_size=0)
  f8, f32, fref = _compiled(name)
  params = {"w": jnp.asarray(np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256))}
  grads = {"w": jnp.asarray(g)}

  u8, s8, p8 = f8(grads, tx8.init(params), params)
  uref, _, pref = fref(grads, ref().init(params), params)
  for ours_, theirs in ((u8, uref), (p8, pref)):
    finite = np.isfinite(np.asarray(theirs["w"]))
    assert np.all(np.isfinite(np.asarray(ours_["w"]))[finite])
  assert np.all(np.isfinite(np.asarray(u8["w"]))) and np.all(np.isfinite(np.asarray(p8["w"])))

  warm = {"w": jnp.asarray(np.cos(np.arange(512, dtype=np.float32)).reshape(2, 256) * 1e-2)}
  _, s8, _ = f8(warm, tx8.init(params), params)
  u8, new8, p8 = f8(grads, s8, params)
  u32, new32, p32 = f32(grads, dequantized(s8), params)
  # Roundings of a multiply-add can cancel, so atol scales with the step; 1e-30 covers XLA's GPU backend,
  # which keeps subnormals where the kernels flush them (a subnormal gradient's update is below 1e-30).
  for a, b in ((u8, u32), (p8, p32)):
    b = np.asarray(b["w"])
    np.testing.assert_allclose(np.asarray(a["w"]), b, rtol=2e-6, atol=2e-6 * np.max(np.abs(b)) + 1e-30)
  for q, x in zip(jax.tree.leaves(new8, is_leaf=IS_Q), jax.tree.leaves(new32)):
    if not IS_Q(q):   # the step count, clipping history
      continue
    absmax = np.abs(per_element(q.absmax, q.codes.shape, q.block_size))   # signed for the signed map
    assert np.all(np.isfinite(absmax))
    error = np.abs(np.asarray(optax8.dequantize(q), np.float64) - np.asarray(x, np.float64))
    bound = (_half_gap(q.kind) + 2.0**-20) * absmax + np.finfo(np.float32).tiny   # + a few roundings
    assert np.all(error <= bound), (q.kind, error.max())


@functools.cache
def _compiled(name):
  """Jitted (update, state, new params) of the 8-bit, 32-bit and optax optimizers."""
  ours, ref, _ = OPTIMIZERS[name]

  def make(tx):
    def f(g, s, p):
      u, s = tx.update(g, s, p)
      return u, s, optax.apply_updates(p, u)
    return jax.jit(f)

  return make(ours(min_8bit_size=0)), make(ours(bits=32)), make(ref())


# ---- 2. mixed precision -------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "lamb", "ademamix"])
@pytest.mark.parametrize("pdtype", [jnp.float16, jnp.bfloat16])
def test_apply_gradients_uses_float32_gradients_as_given(name, pdtype, backend):
  """16-bit params with float32 grads: apply_gradients and update + apply_updates give the same
  state bit for bit, and params that differ at most by the final rounding to the param dtype."""
  tx = OPTIMIZERS[name][0](min_8bit_size=0)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((4, 300)), pdtype)}
  g = rng.standard_normal((4, 300)).astype(np.float32) * 1e-3
  g[0, :5] = [1e5, -1e5, 7e4, 3e-9, 1.0001]   # beyond float16's range, below its precision
  grads = {"w": jnp.asarray(g)}
  state = tx.init(params)
  p_apply, s_apply = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
  u, s_update = jax.jit(tx.update)(grads, state, params)
  assert u["w"].dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(s_apply), jax.tree.leaves(s_update)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  exact = np.asarray(params["w"], np.float32) + np.asarray(u["w"])
  assert p_apply["w"].dtype == pdtype
  np.testing.assert_array_equal(np.asarray(p_apply["w"], np.float32), np.asarray(exact.astype(pdtype), np.float32))
  # the state saw the float32 gradient: its first moment's absmax follows 1e5, not float16's inf
  first = jax.tree.leaves(s_update, is_leaf=IS_Q)[1]
  assert np.all(np.isfinite(np.asarray(first.absmax))) and float(np.max(first.absmax)) >= 1e2


# ---- 3, 7. empty and scalar leaves ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_empty_and_python_scalar_leaves_work_as_in_optax(name):
  ours, ref, _ = OPTIMIZERS[name]
  params = {"empty": jnp.zeros((0, 8), jnp.float32), "scalar": 0.5, "w": jnp.ones((64, 80), jnp.float32)}
  grads = {"empty": jnp.zeros((0, 8), jnp.float32), "scalar": 0.25, "w": jnp.full((64, 80), 1e-2, jnp.float32)}
  for kwargs in (dict(min_8bit_size=0), dict(min_8bit_size=0, percentile_clipping=5)):
    tx = ours(**kwargs)
    state = tx.init(params)
    u, _ = jax.jit(tx.update)(grads, state, params)
    new, _ = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
    arrays = lambda t: jax.tree.map(jnp.asarray, t)   # some of optax's optimizers need arrays
    u_ref, _ = ref().update(arrays(grads), ref().init(arrays(params)), arrays(params))
    assert u["empty"].shape == (0, 8) and new["empty"].shape == (0, 8)
    assert u["scalar"].shape == () and u["scalar"].dtype == jnp.float32
    np.testing.assert_allclose(float(u["scalar"]), float(u_ref["scalar"]), rtol=1e-5)
    np.testing.assert_allclose(float(new["scalar"]), 0.5 + float(u["scalar"]), rtol=1e-6)


def test_percentile_clipping_passes_an_empty_leaf_through():
  tx = optax8.percentile_clipping(5)
  tree = {"empty": jnp.zeros((0, 3)), "w": jnp.ones(3)}
  out, _ = jax.jit(tx.update)(tree, tx.init(tree))
  assert out["empty"].shape == (0, 3)
  global_tx = optax8.percentile_clipping(5, per_leaf=False)
  out, _ = jax.jit(global_tx.update)({"empty": jnp.zeros((0,))}, global_tx.init({"empty": jnp.zeros((0,))}))
  assert out["empty"].shape == (0,)


# ---- 4, 5, 6. shard_map, disable_jit, vmap -------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py makes 8 CPU devices)")
@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "rmsprop", "adagrad", "ademamix"])
def test_inside_shard_map_the_step_equals_the_unsharded_one(name, backend):
  """A manual-parallel train step (shard_map, check_vma on): the element-wise optimizers give
  the unsharded result (LAMB's and LARS's norms are the shard's there, as with optax)."""
  mesh = jax.make_mesh((8,), ("x",))
  rows = NamedSharding(mesh, P("x"))
  rng = np.random.default_rng(1)
  params = jax.device_put(jnp.asarray(rng.standard_normal((128, 512)), jnp.float32), rows)   # 16 rows a shard
  grads = jax.device_put(jnp.asarray(rng.standard_normal((128, 512)) * 1e-2, jnp.float32), rows)
  tx = OPTIMIZERS[name][0](min_8bit_size=0)
  state = tx.init(params)
  specs = jax.tree.map(lambda a: P("x") if a.ndim == 2 else P(), state)
  step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(P("x"), specs, P("x")), out_specs=(P("x"), specs)))
  u, new = step(grads, state, params)
  u0, new0 = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(u0))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  quant = jax.jit(jax.shard_map(lambda x: optax8.dequantize(optax8.quantize(x)), mesh=mesh, in_specs=P("x"),
                                out_specs=P("x")))
  np.testing.assert_array_equal(np.asarray(quant(params)), np.asarray(optax8.dequantize(optax8.quantize(params))))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py makes 8 CPU devices)")
@pytest.mark.parametrize("spec", [P("x", None), P(None, "x")], ids=["rows", "columns"])
def test_inside_shard_map_4_bit_states_of_a_leaf_split_by_columns_or_rows(spec, backend):
  """4-bit codes pack the last axis two a byte; their static ``columns`` is the whole leaf's width, so a
  shard of columns inside shard_map was refused ("4-bit codes of shape (64, 16) do not hold 256 columns").
  Now it steps the shard, gives the unsharded result (whole blocks per shard) and returns the state with
  the whole leaf's columns, as it came in."""
  mesh = jax.make_mesh((8,), ("x",))
  rng = np.random.default_rng(2)
  where = NamedSharding(mesh, spec)
  params, grads = (jax.device_put(jnp.asarray(rng.standard_normal((64, 256)) * s, jnp.float32), where)
                   for s in (1.0, 1e-2))
  tx = optax8.adamw8bit(1e-2, bits=4, min_8bit_size=0)
  state = tx.init(params)
  specs = jax.tree.map(lambda a: spec if a.ndim == 2 else P(), state)
  step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(spec, specs, spec), out_specs=(spec, specs)))
  u, new = step(grads, state, params)
  u0, new0 = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(u0))
  assert jax.tree.structure(new) == jax.tree.structure(new0) and new.mu.columns == 256
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py makes 8 CPU devices)")
def test_inside_shard_map_a_state_made_outside_for_a_leaf_whose_shard_is_small_says_why():
  """min_8bit_size is compared with the leaf the optimizer sees: inside shard_map, the shard. A state made
  outside (8-bit: 16,384 elements) met 32-bit shards (2,048) with an error that did not say so."""
  mesh = jax.make_mesh((8,), ("x",))
  params = jax.device_put(jnp.ones((256, 64)), NamedSharding(mesh, P("x")))
  tx = optax8.adamw8bit(1e-2)
  state = tx.init(params)
  specs = jax.tree.map(lambda a: P("x") if a.ndim == 2 else P(), state)
  step = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(P("x"), specs, P("x")), out_specs=(P("x"), specs)))
  with pytest.raises(ValueError, match=r"2048 elements here, fewer than min_8bit_size 4096: inside shard_map"):
    step(params, state, params)


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars", "ademamix"])
def test_under_disable_jit_the_step_runs_eagerly_and_equals_the_jitted_one(name, backend):
  tx = OPTIMIZERS[name][0](min_8bit_size=0, percentile_clipping=50)
  params = {"a": jnp.linspace(-1, 1, 600).reshape(2, 300), "b": jnp.ones(7)}
  grads = jax.tree.map(lambda p: jnp.cos(p * 7) * 1e-2, params)
  state = tx.init(params)
  jitted = jax.jit(tx.update)(grads, state, params)
  with jax.disable_jit():
    eager = tx.update(grads, tx.init(params), params)
    applied, _ = optax8.apply_gradients(tx, grads, state, params)
    x = optax8.dequantize(optax8.quantize(params["a"]))
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    if backend == "native" and jax.default_backend() == "cpu":
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:   # jitted, XLA may contract the pure-JAX rule's multiply-adds (openxla/xla#41579) and, on a GPU,
      # sum the clipping norms in another order; eager it cannot
      b = np.asarray(b, np.float32)
      np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=1e-6, atol=1e-6 * np.max(np.abs(b)))
  np.testing.assert_allclose(np.asarray(applied["a"]), np.asarray(params["a"] + jitted[0]["a"]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(optax8.dequantize(optax8.quantize(params["a"]))))


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_under_disable_jit_later_steps_keep_the_jitted_states(name, backend):
  """Five steps eagerly and jitted from the same inputs: the native kernels' states bit for bit; Adam's
  updates within 1e-4 relative from step 3 (JAX rounds its bias correction 1 - b2**t otherwise eagerly,
  as with optax.adam), Lion's (no bias correction) bit for bit."""
  exact = backend == "native" and jax.default_backend() == "cpu"
  tx = OPTIMIZERS[name][0](min_8bit_size=0)
  params = {"a": jnp.linspace(-1, 1, 600).reshape(2, 300)}
  grads = jax.tree.map(lambda p: jnp.cos(p * 7) * 1e-2, params)
  jitted = eager = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(5):
    u_jit, jitted = update(grads, jitted, params)
    with jax.disable_jit():
      u_eager, eager = tx.update(grads, eager, params)
    if name == "lion" and exact:
      np.testing.assert_array_equal(np.asarray(u_eager["a"]), np.asarray(u_jit["a"]))
    np.testing.assert_allclose(np.asarray(u_eager["a"]), np.asarray(u_jit["a"]), rtol=1e-4)
    if exact:
      for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_over_an_empty_batch_gives_the_empty_result(backend):
  roundtrip = jax.vmap(lambda x: optax8.dequantize(optax8.quantize(x)))
  assert roundtrip(jnp.ones((0, 256))).shape == (0, 256)
  codes = jax.vmap(lambda x: optax8.quantize(x, 64).absmax)(jnp.ones((0, 3, 200), jnp.bfloat16))
  assert codes.shape == (0, 1, 25)   # each example's 8 x 8 tiles
  assert roundtrip(jnp.ones((3, 256))).shape == (3, 256)


# ---- 8. LARS's max_unorm -----------------------------------------------------------------


def test_lars_max_unorm_bounds_the_update_but_not_the_momentum():
  lr, bound = 1e-1, 1e-3
  params = {"w": jnp.linspace(0.5, 1.5, 8192)}
  grads = {"w": jnp.linspace(-1, 1, 8192)}
  free = optax8.lars8bit(lr, trust_coefficient=1.0)
  clipped = optax8.lars8bit(lr, trust_coefficient=1.0, max_unorm=bound)
  _, s_free, u_free = run(free, params, grads)
  _, s_clip, u_clip = run(clipped, params, grads)
  p_norm = float(jnp.linalg.norm(params["w"]))
  assert float(jnp.linalg.norm(u_free["w"])) > 2 * lr * bound * p_norm
  np.testing.assert_allclose(float(jnp.linalg.norm(u_clip["w"])), lr * bound * p_norm, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s_free), jax.tree.leaves(s_clip)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["lamb8bit", "muon8bit"])
def test_max_unorm_bounds_updates_whose_norm_a_post_step_sets(name):
  """LAMB's trust ratio (||u|| = lr ||p||) and Muon's orthogonalisation set the update's norm after the
  direction: max_unorm, applied to the direction, did nothing. It bounds their update now."""
  p = {"w": 0.01 * jax.random.normal(jax.random.key(0), (64, 80)), "b": 0.01 * jnp.ones(70)}
  g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), p)
  ratios = {}
  for bound in (None, 1e-3):
    tx = getattr(optax8, name)(0.1, weight_decay=0.0, max_unorm=bound, min_8bit_size=0)
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    ratios[bound] = {k: float(jnp.linalg.norm(u[k]) / (0.1 * jnp.linalg.norm(p[k]))) for k in p}
  assert all(r > 0.5 for r in ratios[None].values()), ratios
  for k, r in ratios[1e-3].items():
    assert r == pytest.approx(1e-3, rel=1e-4), (k, ratios)


# ---- 9, 10. dtypes ----------------------------------------------------------------------------


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)


def test_float64_gradients_are_used_in_float32(x64, backend):
  """jax_enable_x64 with float32 params: the step computes in float32, the update keeps float64."""
  tx = optax8.adamw8bit(1e-3, min_8bit_size=0)
  params = {"layer": {"kernel": jnp.linspace(-1, 1, 512, dtype=jnp.float32).reshape(2, 256)}}
  g32 = {"layer": {"kernel": jnp.linspace(1, -1, 512, dtype=jnp.float32).reshape(2, 256) * 1e-2}}
  g64 = jax.tree.map(lambda x: x.astype(jnp.float64), g32)
  state = tx.init(params)
  u64, s64 = jax.jit(tx.update)(g64, state, params)
  u32, s32 = jax.jit(tx.update)(g32, state, params)
  assert u64["layer"]["kernel"].dtype == jnp.float64
  np.testing.assert_array_equal(np.asarray(u64["layer"]["kernel"]), np.asarray(u32["layer"]["kernel"], np.float64))
  new, _ = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(g64, state, params)
  assert new["layer"]["kernel"].dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(s64), jax.tree.leaves(s32)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_numpy_float64_params_get_the_state_of_their_float32_arrays(name, backend):
  """NumPy arrays are float64 (np.random, np.ones); with x64 off JAX takes them as float32. init saw float64
  and kept 32-bit state, the jitted update saw float32 and refused that state ("the state has 32-bit state
  where the optimizer keeps 8-bit state"). Now both see float32: 8-bit state, and the run of the float32
  arrays bit for bit, jitted and eager, as optax takes such params."""
  rng = np.random.default_rng(0)
  params, grads = {"w": rng.standard_normal((128, 128))}, {"w": rng.standard_normal((128, 128)) * 1e-2}
  as32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  tx = OPTIMIZERS[name][0]()
  state = tx.init(params)
  assert isinstance(optax.tree_utils.tree_get(state, "mu")["w"], optax8.QuantizedArray)
  want = jax.jit(tx.update)(as32(grads), tx.init(as32(params)), as32(params))
  for got in (jax.jit(tx.update)(grads, state, params), tx.update(grads, state, params)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
def test_params_of_another_tree_are_named_as_the_problem(name):
  """adam8bit has no weight decay and no mask, yet params with an extra key were reported as "the
  weight-decay mask does not have the structure of the updates"."""
  tx = OPTIMIZERS[name][0]()
  params = {"w": jnp.ones((64, 64)), "b": jnp.ones(64)}
  with pytest.raises(ValueError, match=r"params does not have the structure of the updates.*'extra'"):
    tx.update(params, tx.init(params), {**params, "extra": jnp.ones(3)})


@pytest.mark.parametrize("name", NAMES)
def test_integer_leaves_are_refused_by_path_at_trace_time(name):
  tx = OPTIMIZERS[name][0]()
  params = {"layer": {"kernel": jnp.ones((4, 4)), "step": jnp.zeros((), jnp.int32)}}
  with pytest.raises(TypeError,
                     match=r"leaf \['layer'\]\['step'\] has dtype int32: only floating-point and complex leaves"):
    tx.init(params)
  state = tx.init({"layer": {"kernel": jnp.ones((4, 4)), "step": jnp.zeros(())}})
  bad = {"layer": {"kernel": jnp.ones((4, 4)), "step": jnp.zeros((), jnp.int32)}}
  with pytest.raises(TypeError, match=r"\['layer'\]\['step'\].*only floating-point and complex leaves"):
    jax.jit(tx.update).lower(bad, state, bad)


# ---- 11. options: one rule -------------------------------------------------------------------

BAD_OPTIONS = [
    ("max_unorm", "0.1", TypeError, r"max_unorm must be a number, got str"),
    ("max_unorm", math.nan, ValueError, r"max_unorm must be a finite number >= 0, got nan"),
    ("max_unorm", -1.0, ValueError, r"max_unorm must be a finite number >= 0"),
    ("bits", True, TypeError, r"bits must be an int, got bool"),
    ("bits", "8", TypeError, r"bits must be an int, got str"),
    ("bits", 2, ValueError, r"bits must be 4, 8 or 32, got 2"),
    ("block_size", 100, ValueError, r"block_size.*power of two"),
    ("block_size", 256.5, TypeError, r"block_size must be an int"),
    ("min_8bit_size", -1, ValueError, r"min_8bit_size must be an int >= 0"),
    ("min_8bit_size", "4096", TypeError, r"min_8bit_size must be a number, got str"),
    ("percentile_clipping", 101, ValueError, r"percentile_clipping must be in \[0, 100\]"),
    ("percentile_clipping", math.nan, ValueError, r"percentile_clipping must be in \[0, 100\], got nan"),
    ("learning_rate", "1e-3", TypeError, r"learning_rate must be a number, got str"),
    ("learning_rate", math.nan, ValueError, r"learning_rate must be a finite number, got nan"),
    ("learning_rate", math.inf, ValueError, r"learning_rate must be a finite number, got inf"),
    ("learning_rate", False, TypeError, r"learning_rate must be a number, got bool"),
    ("b1", 1.0, ValueError, r"b1 must be in \[0, 1\), got 1.0"),
    ("b1", np.float32(np.nan), ValueError, r"b1 must be in \[0, 1\), got nan"),
    ("b2", "0.999", TypeError, r"b2 must be a number, got str"),
    ("eps", -1e-8, ValueError, r"eps must be a finite number >= 0"),
    ("weight_decay", math.nan, ValueError, r"weight_decay must be a finite number, got nan"),
    ("b1", jnp.ones(3), TypeError, r"b1 must be a number \(a numeric scalar\), got an array of shape \(3,\)"),
]


@pytest.mark.parametrize("option,value,error,match", BAD_OPTIONS,
                         ids=[f"{o}={v!r}"[:40] for o, v, _, _ in BAD_OPTIONS])
def test_bad_options_are_refused_where_the_optimizer_is_built(option, value, error, match):
  kwargs = {"learning_rate": 1e-3, option: value}
  with pytest.raises(error, match="adamw8bit: " + match):
    optax8.adamw8bit(**kwargs)


@pytest.mark.parametrize("name", ["adamw", "lion", "lamb"])
def test_a_negative_learning_rate_ascends_as_in_optax(name):
  """optax takes a learning rate (and a weight decay) of either sign; so does optax8 (it refused them):
  the update of -lr is minus that of lr, the state the same."""
  params = {"w": jnp.linspace(-1, 1, 4096).reshape(64, 64)}
  grads = {"w": jnp.cos(params["w"] * 7) * 1e-2}
  make = getattr(optax8, f"{name}8bit")
  up, down = make(1e-2, weight_decay=-1e-3), make(-1e-2, weight_decay=-1e-3)
  u, s = jax.jit(up.update)(grads, up.init(params), params)
  v, t = jax.jit(down.update)(grads, down.init(params), params)
  np.testing.assert_array_equal(np.asarray(v["w"]), -np.asarray(u["w"]))
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(t)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("factory,option,value,match", [
    (optax8.sgd8bit, "momentum", 1.5, r"sgd8bit: momentum must be in \[0, 1\]"),
    (optax8.rmsprop8bit, "decay", -0.1, r"rmsprop8bit: decay must be in \[0, 1\]"),
    (optax8.adagrad8bit, "initial_accumulator_value", -1.0, r"initial_accumulator_value must be a finite"),
    (optax8.lars8bit, "trust_coefficient", math.nan, r"lars8bit: trust_coefficient must be"),
    (optax8.ademamix8bit, "alpha", math.inf, r"ademamix8bit: alpha must be a finite number"),
    (optax8.lion8bit, "b2", 1.0, r"lion8bit: b2 must be in \[0, 1\)"),
])
def test_each_optimizer_checks_its_hyperparameters(factory, option, value, match):
  with pytest.raises(ValueError, match=match):
    factory(1e-2, **{option: value})


def test_traced_hyperparameters_are_checked_for_shape_and_dtype_only():
  tx = optax.inject_hyperparams(optax8.adamw8bit)(learning_rate=1e-3, b1=0.9, max_unorm=0.5)
  params = {"w": jnp.ones((64, 80))}
  state = tx.init(params)
  u, state = jax.jit(tx.update)(params, state, params)
  assert np.all(np.isfinite(np.asarray(u["w"])))
  schedule = optax8.adamw8bit(optax.linear_schedule(1e-3, 0.0, 100), min_8bit_size=0)
  assert schedule.init(params) is not None
