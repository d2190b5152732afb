"""bits=4: 4-bit states, two codes a byte (optax8.maps' 4-bit maps, optax8.layout's packing), on every optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax8
from optax8 import maps
from optax8.kernels import jax_backend, native
from optax8.layout import absmax_shape, packed_shape

from helpers import ROOT, load_script, needs_native_cpu, pure_jax_steps, reference_quantize
from test_alias import ARGS
from optax8.optimizers import REGISTRY

CASES = {**{name: (REGISTRY[name].make, lr, kwargs) for name, (lr, kwargs) in ARGS.items()},
         "muon8bit": (optax8.muon8bit, 2e-2, {})}


def _moments(state):
  return [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax8.QuantizedArray))
          if isinstance(x, optax8.QuantizedArray)]


@pytest.mark.parametrize("kind", maps.MAP4_KINDS)
@pytest.mark.parametrize("shape", [(7,), (300,), (5, 33), (2, 16, 40), (64, 128)])
def test_quantize_packs_two_codes_a_byte_and_matches_the_reference(kind, shape):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32) * np.exp(rng.uniform(-8, 2, shape)).astype(np.float32)
  if kind == maps.UNSIGNED4:
    x = np.abs(x)
  q = optax8.quantize(x, 128, kind=kind)
  assert q.codes.shape == packed_shape(shape) and q.codes.dtype == jnp.uint8 and q.shape == shape
  assert q.absmax.shape == absmax_shape(shape, 128) and q.bits == 4
  codes = np.asarray(jax_backend.unpack4(q.codes, shape[-1]))
  want_codes, want_absmax = reference_quantize(x, 128, kind)
  np.testing.assert_array_equal(codes, want_codes)
  np.testing.assert_array_equal(np.asarray(q.absmax), want_absmax)
  np.testing.assert_array_equal(np.asarray(jax_backend.pack4(jnp.asarray(codes))), np.asarray(q.codes))
  # the round trip is within half a gap of the map times |absmax|
  values = maps.dynamic_map(kind)
  back = np.asarray(optax8.dequantize(q))
  np.testing.assert_array_equal(back, np.asarray(jax.jit(optax8.dequantize)(q)))
  gap = np.max(np.diff(values))
  extent = np.abs(np.asarray(optax8.dequantize(optax8.QuantizedArray(
      jnp.full(q.codes.shape, 0xFF, jnp.uint8), q.absmax, 128, kind, shape[-1]))))   # |absmax| per element
  assert np.all(np.abs(back - x) <= gap / 2 * extent * (1 + 1e-6) + 1e-30)
  if kind == maps.UNSIGNED4:   # a positive value never comes back as 0
    assert np.all(back[x > 0] > 0)


def test_four_bit_maps():
  for kind in maps.MAP4_KINDS:
    m = maps.dynamic_map(kind)
    assert m.shape == (16,) and np.all(np.diff(m) > 0) and m[-1] == 1 and 0 in m
  assert maps.dynamic_map(maps.SIGNED4)[0] < -0.88   # +1 and -0.8875: the signed absmax keeps the extreme exact
  assert maps.dynamic_map(maps.UNSIGNED4)[1] == np.float32(0.00325)
  assert maps.POSITIVE_FLOOR[maps.UNSIGNED4] == 1 and maps.SIGNS_ABSMAX[maps.SIGNED4]
  assert maps.with_bits(maps.UNSIGNED, 4) == maps.UNSIGNED4 and maps.with_bits(maps.SIGNED4, 8) == maps.SIGNED


def test_quantize_errors():
  with pytest.raises(ValueError, match="4-bit codes .* rank >= 1, got a scalar"):
    optax8.quantize(jnp.float32(1.0), kind=maps.SIGNED4)
  q = optax8.quantize(jnp.ones((4, 10)), 128, kind=maps.SIGNED4)
  with pytest.raises(ValueError, match="4-bit codes of shape \\(4, 5\\) do not hold 12 columns"):
    optax8.dequantize(optax8.QuantizedArray(q.codes, q.absmax, 128, maps.SIGNED4, 12))
  with pytest.raises(ValueError, match="map kind must be one of"):
    optax8.quantize(jnp.ones(4), kind="signed2")


def test_adam_state_is_at_most_1_07_bytes_a_parameter():
  params = {"w": jnp.zeros((1024, 1024)), "e": jnp.zeros((50257, 64)), "b": jnp.zeros(4096)}
  state = jax.eval_shape(optax8.adamw8bit(1e-3, bits=4).init, params)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  n = sum(x.size for x in jax.tree.leaves(params))
  assert total / n <= 1.07, total / n
  assert all(q.kind in maps.MAP4_KINDS and q.block_size == 128 for q in _moments(state))


def assert_states_close(a, b):
  """4-bit states equal but for float32 rounding: absmax to 1e-6, codes a step apart at a few elements."""
  qa, qb = _moments(a), _moments(b)
  assert len(qa) == len(qb)
  for x, y in zip(qa, qb):
    np.testing.assert_allclose(np.asarray(x.absmax), np.asarray(y.absmax), rtol=1e-6)
    cx, cy = (np.asarray(jax_backend.unpack4(q.codes, q.shape[-1])).astype(int) for q in (x, y))
    assert np.abs(cx - cy).max() <= 1 and np.mean(cx != cy) < 1e-2


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_optimizer_steps_4_bit_state_close_to_its_32_bit_step(name):
  make, lr, kwargs = CASES[name]
  make = functools.partial(make, lr, **kwargs)
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32),
            "v": jnp.asarray(rng.standard_normal(4096), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  tx4, tx32 = make(bits=4), make(bits=32)
  s4, s32 = tx4.init(params), tx32.init(params)
  assert _moments(s4) and all(q.bits == 4 for q in _moments(s4))
  update = jax.jit(tx4.update)
  apply = jax.jit(lambda g, s, p: optax8.apply_gradients(tx4, g, s, p))
  for _ in range(3):
    u4, n4 = update(grads, s4, params)
    p4, m4 = apply(grads, s4, params)
    # the pure-JAX step: the two paths' XLA programs may fuse a multiply-add differently (float32 rounding)
    assert_states_close(n4, m4)
    for k in params:
      np.testing.assert_allclose(np.asarray(p4[k]), np.asarray(optax.apply_updates(params, u4)[k]), rtol=1e-6,
                                 atol=1e-7)
    u32, s32 = jax.jit(tx32.update)(grads, s32, params)
    for k in params:
      a, b = np.asarray(u4[k]), np.asarray(u32[k])
      cos = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
      assert cos > 0.9, (k, cos)
    s4 = n4
    grads = jax.tree.map(lambda g: g * 0.9 + 0.1, grads)


def _optax_problem(problem):
  if problem == "parabola":
    start, end = jnp.array([-1.0, 10.0, 1.0]), jnp.array([1.0, -1.0, 1.0])
    return start, end, lambda x: jnp.sum((x - end) ** 2)
  from test_optax_conventions import rosenbrock
  return jnp.zeros(2), jnp.ones(2), rosenbrock


FOUR_BIT_PROBLEMS = [("adamw8bit", dict(learning_rate=1e-1)), ("sgd8bit", dict(learning_rate=1e-3, momentum=0.9)),
                     ("lamb8bit", dict(learning_rate=1e-3)), ("rmsprop8bit", dict(learning_rate=5e-3)),
                     ("adagrad8bit", dict(learning_rate=1.0)), ("lars8bit", dict(learning_rate=1.0)),
                     ("lion8bit", dict(learning_rate=1e-2, weight_decay=1e-4, rounding="stochastic"))]


LION_STALLS = pytest.mark.xfail(strict=True, reason="lion8bit at 4 bits ends at (0.931, 0.881) on Rosenbrock, "
                                "even with stochastic rounding: it stays in Lion's two-step cycles in 99.5% of the "
                                "steps (float32: 94%), as 15 even levels rounded stochastically do "
                                "(benchmarks/lion_rosenbrock.py --four-bit)")


@pytest.mark.parametrize("name, kwargs, problem", [
    pytest.param(n, k, problem, id=f"{n}{'-stochastic' if 'rounding' in k else ''}-{problem}",
                 marks=[LION_STALLS] if n == "lion8bit" and problem == "rosenbrock" else [])
    for n, k in FOUR_BIT_PROBLEMS for problem in ("parabola", "rosenbrock")])
def test_four_bit_converges_on_optax_problems(name, kwargs, problem):
  """optax's test (10,000 steps to within 3e-2) at 4 bits. Lion rounds its momentum stochastically: its change
  per step, 1% of it, is far below half a 4-bit gap, so rounded to nearest it freezes (see the next test)."""
  from test_optax_conventions import final_point
  start, end, loss = _optax_problem(problem)
  tx = REGISTRY[name].make(**kwargs, min_8bit_size=0, bits=4)
  np.testing.assert_allclose(np.asarray(final_point(tx, loss, start, 10_000)), end, rtol=3e-2, atol=3e-2)


def test_lion_at_4_bits_stays_in_its_two_step_cycles():
  """Why Lion at 4 bits misses Rosenbrock's minimum: every run, float32 included, mostly jumps between two points
  and moves on when its momentum tips a sign; at 4 bits, and with 15 even levels rounded stochastically, that
  happens in a few of the steps float32 and 8 bits take it."""
  bench = load_script(ROOT / "benchmarks" / "lion_rosenbrock.py")
  runs = {**bench.RUNS, **bench.FOUR_BIT_RUNS}
  share = {name: bench.cycling(bench.path(runs[name](), 10_000))[2000:].mean()
           for name in ("optax.lion (float32)", "optax8.lion8bit, 8 bits, stochastic",
                        "optax8.lion8bit, 4 bits, stochastic", "15 even levels, stochastic (seed 0)")}
  assert 0.5 < share["optax.lion (float32)"] < 0.96 and share["optax8.lion8bit, 8 bits, stochastic"] < 0.96, share
  assert share["optax8.lion8bit, 4 bits, stochastic"] > 0.98, share
  assert share["15 even levels, stochastic (seed 0)"] > 0.98, share


def test_lion_at_4_bits_rounded_to_nearest_freezes_its_momentum():
  from test_optax_conventions import final_point
  start, end, loss = _optax_problem("parabola")
  tx = optax8.lion8bit(1e-2, weight_decay=1e-4, min_8bit_size=0, bits=4)
  assert np.abs(np.asarray(final_point(tx, loss, start, 10_000)) - end).max() > 1.0


def test_bits_per_leaf_mix_4_8_and_32():
  rng = np.random.default_rng(2)
  params = {"a": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
            "c": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)}
  grads = jax.tree.map(lambda p: p * 0.1, params)
  mixed = optax8.adam8bit(1e-3, bits={"a": 4, "b": 8, "c": 32})
  state = mixed.init(params)
  assert state.mu["a"].kind == maps.SIGNED4 and state.nu["a"].kind == maps.UNSIGNED4
  assert state.mu["b"].kind == maps.SIGNED and state.mu["c"].dtype == jnp.float32
  u, _ = jax.jit(mixed.update)(grads, state, params)
  for k, bits in (("a", 4), ("b", 8), ("c", 32)):
    alone = optax8.adam8bit(1e-3, bits=bits)
    want, _ = jax.jit(alone.update)(grads, alone.init(params), params)
    np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(want[k]))
  with pytest.raises(ValueError, match=r"bits of leaf \['b'\] must be 4, 8 or 32, got 2"):
    optax8.adam8bit(1e-3, bits={"a": 4, "b": 2, "c": 32}).init(params)
  # a state made with other bits is refused with the leaf's path
  with pytest.raises(ValueError, match=r"leaf \['a'\]: the state has 4-bit state where the optimizer keeps 8-bit"):
    optax8.adam8bit(1e-3).update(grads, state, params)


def test_stochastic_rounding_of_4_bit_states_is_unbiased():
  x = jnp.full((128,), 0.3, jnp.float32).at[0].set(1.0)   # 0.3 lies between 0.2125 and 0.4375
  vs = []
  for step in range(200):
    u = optax8.rounding.uniform(optax8.rounding.element_index(optax8.rounding.index_vectors(x.shape)),
                                optax8.rounding.state_key(step, 0, 0))
    codes, absmax = jax_backend.quantize(x, 128, maps.SIGNED4, 1, u)
    q = optax8.QuantizedArray(codes, absmax, 128, maps.SIGNED4, x.shape[-1])
    vs.append(np.asarray(optax8.dequantize(q))[1:])
  mean = np.mean(vs)
  assert set(np.unique(np.asarray(vs))) <= {np.float32(0.2125), np.float32(0.4375)}
  assert abs(mean - 0.3) < 0.005
  tx = optax8.adamw8bit(1e-3, bits=4, rounding="stochastic")
  params = {"w": jnp.ones((64, 128))}
  u, s = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert s.mu["w"].kind == maps.SIGNED4 and np.all(np.isfinite(np.asarray(u["w"])))


def test_checkpoint_round_trip_and_check_state():
  import flax.serialization
  params = {"w": jnp.ones((64, 130)), "b": jnp.ones(4096)}
  tx = optax8.adamw8bit(1e-3, bits=4)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(jax.tree.map(lambda p: p * 0.1, params), state, params)
  blob = flax.serialization.to_bytes(state)
  back = flax.serialization.from_bytes(tx.init(params), blob)
  jax.tree.map(np.testing.assert_array_equal, back, state)
  optax8.check_state(back, jax.eval_shape(tx.init, params))
  with pytest.raises(ValueError, match=r"signed4 map, the optimizer the signed map \(the state has 4-bit codes"):
    optax8.check_state(state, jax.eval_shape(optax8.adamw8bit(1e-3, block_size=128).init, params))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_4_bit_step_equals_the_single_device_step(axis_type, rounding):
  """Each device steps its shards (FSDP, tensor parallel) with the draws of the whole leaf: the native kernel
  gives the single device's bits; the pure-JAX step, XLA's fusions of each shape, float32 rounding apart."""
  from test_sharding import _mesh, _put
  rng = np.random.default_rng(4)
  params = {"w": rng.standard_normal((128, 2048)).astype(np.float32), "b": rng.standard_normal(2048).astype(
      np.float32)}
  grads = jax.tree.map(lambda x: x * 0.01, params)
  tx = optax8.adamw8bit(1e-3, weight_decay=1e-2, min_8bit_size=256, bits=4, rounding=rounding)
  step = jax.jit(lambda p, s, g: optax8.apply_gradients(tx, g, s, p))
  want, want_state = step(params, tx.init(params), grads)
  for spec in (P("x", None), P(None, "x")):
    mesh = _mesh(axis_type)
    with jax.set_mesh(mesh):
      specs = {"w": spec, "b": P("x")}
      p, g = _put(params, mesh, specs), _put(grads, mesh, specs)
      state = tx.init(p)
      assert state.mu["w"].codes.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)
      got, got_state = step(p, state, g)
    if native.available("cpu"):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                   (got, got_state), (want, want_state))
    for k in params:
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7)
    assert_states_close(got_state, want_state)


def test_nnx_optimizer_trains_with_4_bit_state():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(256, 64, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (32, 256))
  y = jax.random.normal(jax.random.key(2), (32, 64))
  opt = optax8.nnx.Optimizer(model, optax8.adamw8bit(1e-2, bits=4), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x) - y)))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(20)]
  assert losses[-1] < 0.7 * losses[0]
  codes = [x for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.dtype == jnp.uint8]
  assert [tuple(x.shape) for x in codes] == [(256, 32)] * 2   # mu and nu of the (256, 64) kernel, two codes a byte


def test_a_last_axis_sharded_into_odd_lengths_is_refused_at_4_bits():
  from test_sharding import _mesh
  mesh = _mesh(AxisType.Auto)
  w = jax.device_put(jnp.ones((16, 24)), NamedSharding(mesh, P(None, "x")))   # 3 columns a shard
  with pytest.raises(ValueError, match=r"leaf \['w'\] .* split into shards of an odd length, and 4-bit codes pack"):
    optax8.adam8bit(1e-3, bits=4, block_size=1, min_8bit_size=0).init({"w": w})
  optax8.adam8bit(1e-3, bits=8, block_size=1, min_8bit_size=0).init({"w": w})   # 8-bit codes do not pack


@needs_native_cpu
def test_the_native_cpu_kernel_steps_4_bit_states_as_the_pure_jax_step(monkeypatch):
  """On XLA:CPU 4-bit leaves are stepped by the native handler (one call for the matrix, one for the vector: their
  blocks differ; no pure-JAX loop), with the pure-JAX
  step's results (to float32 rounding of the rule; tests/test_step_kernels.py compares the kernels)."""
  rng = np.random.default_rng(6)
  params = {"w": jnp.asarray(rng.standard_normal((96, 250)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(1001), jnp.float32)}
  grads = jax.tree.map(lambda p: p * 0.1, params)
  tx = optax8.adamw8bit(1e-3, bits=4, min_8bit_size=0)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))
  hlo = step.lower(grads, state, params).compile().as_text()
  assert hlo.count('custom_call_target="optax8_step"') == 2 and "while" not in hlo
  got, got_state = step(grads, state, params)
  with pure_jax_steps(monkeypatch):
    step = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))
    assert 'custom_call_target="optax8_step"' not in step.lower(grads, state, params).compile().as_text()
    want, want_state = step(grads, state, params)
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7)
  assert_states_close(got_state, want_state)


def test_every_path_gives_the_same_4_bit_step():
  """jit, disable_jit, vmap (each example as alone) and inject_hyperparams with bits static."""
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.standard_normal((64, 130)), jnp.float32)}
  grads = jax.tree.map(lambda p: p * 0.1, params)
  tx = optax8.adamw8bit(1e-3, bits=4)
  state = tx.init(params)
  u, s = jax.jit(tx.update)(grads, state, params)
  with jax.disable_jit():
    u_eager, s_eager = tx.update(grads, state, params)
  np.testing.assert_allclose(np.asarray(u_eager["w"]), np.asarray(u["w"]), rtol=1e-6, atol=1e-9)
  assert_states_close(s_eager, s)
  batch = lambda t: jax.tree.map(lambda x: jnp.stack([x, x]), t)
  u_vmap, _ = jax.vmap(tx.update)(batch(grads), batch(state), batch(params))
  np.testing.assert_allclose(np.asarray(u_vmap["w"][1]), np.asarray(u["w"]), rtol=1e-6, atol=1e-9)
  injected = optax8.inject_hyperparams(optax8.adamw8bit, static_args=("bits",))(learning_rate=1e-3, bits=4)
  u_inj, s_inj = jax.jit(injected.update)(grads, injected.init(params), params)
  # the injected hyperparameters are float32 arrays: the bias corrections round once more
  np.testing.assert_allclose(np.asarray(u_inj["w"]), np.asarray(u["w"]), rtol=1e-4, atol=1e-9)
  assert _moments(s_inj)[0].kind == maps.SIGNED4


def test_4_bit_states_with_bfloat16_params_rounded_stochastically():
  """The smallest footprint: bfloat16 params (2 bytes) and 4-bit AdamW state (1.06 bytes)."""
  params = {"w": jnp.full((64, 256), 1.0, jnp.bfloat16)}
  tx = optax8.adamw8bit(1e-4, weight_decay=0.0, bits=4, param_rounding="stochastic")
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))
  p = params
  for _ in range(50):
    p, state = step(jax.tree.map(jnp.ones_like, p), state, p)
  mean = float(jnp.mean(p["w"].astype(jnp.float32)))
  assert abs(mean - (1 - 50 * 1e-4)) < 5e-4   # rounded to nearest, every element would stay 1
  n = p["w"].size
  assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((p, state))) / n < 3.1
