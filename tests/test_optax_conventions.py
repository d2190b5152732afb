"""Every optimizer follows optax's conventions: wrappers, jit, vmap, dtypes, errors.

Params are {"w": (64, 128), "b": (128,), "scalar": ()} with min_8bit_size=1024,
so ``w`` has 8-bit state and the others float32 state.
"""

import functools
import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8.optimizers import REGISTRY
from helpers import ROOT, load_script


MIN_8BIT = 1024
LR = 1e-2


class Case(NamedTuple):
  name: str
  factory: Callable        # optax8 optimizer, learning rate first
  kwargs: dict             # small hyperparameters besides the learning rate
  reference: Callable      # optax's namesake, same argument names

  def make(self, learning_rate=LR, **extra):
    return self.factory(learning_rate, **{**self.kwargs, "min_8bit_size": MIN_8BIT, **extra})


# Small hyperparameters of each registered optimizer besides the learning rate (for it and its optax namesake).
KWARGS = {
    "adam8bit": {},
    "adamw8bit": dict(weight_decay=1e-2),
    "lion8bit": dict(weight_decay=1e-2),
    "sgd8bit": dict(momentum=0.9),
    "rmsprop8bit": {},
    "adagrad8bit": {},
    "lamb8bit": dict(weight_decay=1e-2),
    "lars8bit": dict(weight_decay=1e-3, trust_coefficient=0.02),
    "ademamix8bit": dict(b3=0.999, alpha=2.0),
    "muon8bit": dict(weight_decay=1e-2),
}
assert set(KWARGS) == set(REGISTRY), f"give test arguments to {sorted(set(REGISTRY) - set(KWARGS))}"
CASES = [Case(name, REGISTRY[name].make, KWARGS[name], REGISTRY[name].reference) for name in KWARGS]
BY_NAME = {c.name: c for c in CASES}
cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
# Optimizers whose state is one fused state over all leaves (muon8bit's partitions matrices and the rest, and
# test_muon.py compares it with optax.contrib.muon).
FUSED = [c for c in CASES if c.name != "muon8bit"]
fused_cases = pytest.mark.parametrize("case", FUSED, ids=[c.name for c in FUSED])


def params(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"w": jax.random.normal(k[0], (64, 128), jnp.float32).astype(dtype),
          "b": (0.1 * jax.random.normal(k[1], (128,), jnp.float32)).astype(dtype),
          "scalar": jnp.asarray(0.5, dtype)}


def grads(seed, dtype=jnp.float32, scale=1.0):
  k = jax.random.split(jax.random.key(100 + seed), 3)
  shapes = {"w": (64, 128), "b": (128,), "scalar": ()}
  return {name: (scale * jax.random.normal(kk, shape, jnp.float32)).astype(dtype)
          for kk, (name, shape) in zip(k, sorted(shapes.items()))}


def is_quantized(x):
  return isinstance(x, optax8.QuantizedArray)


def avals(tree):
  """(structure, [(shape, dtype)]) of a tree."""
  return jax.tree.structure(tree), [(tuple(jnp.shape(x)), jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b, rtol=1e-6, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=rtol, atol=atol)


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@functools.cache
def jitted_update(tx):
  return jax.jit(tx.update)


def run_steps(tx, ps, gs):
  """Jitted updates of ``tx`` for the gradients ``gs`` at fixed params."""
  update = jitted_update(tx)
  state, out = tx.init(ps), []
  for g in gs:
    u, state = update(g, state, ps)
    out.append(u)
  return out, state


@functools.cache
def default_opt(name):
  """One optimizer object per case, so that its jitted update compiles once."""
  return BY_NAME[name].make()


@functools.cache
def reference_run(name, seeds, dtype=jnp.float32):
  """(updates, final state) of the default optimizer on grads(seed) for each seed."""
  return run_steps(default_opt(name), params(dtype), [grads(s, dtype) for s in seeds])


# ---- signatures and wrappers -------------------------------------------------


@cases
def test_signature_matches_optax(case):
  """optax's positional arguments and defaults, then keyword-only 8-bit options."""
  positional = lambda fn: {k: v.default for k, v in inspect.signature(fn).parameters.items()
                           if v.kind == v.POSITIONAL_OR_KEYWORD}
  assert positional(case.factory) == positional(case.reference)
  keyword = {k for k, v in inspect.signature(case.factory).parameters.items() if v.kind == v.KEYWORD_ONLY}
  assert {"bits", "block_size", "min_8bit_size"} <= keyword


@cases
def test_chain_with_clip_by_global_norm(case):
  p, g = params(), grads(1, scale=10.0)
  opt = default_opt(case.name)
  tx = optax.chain(optax.clip_by_global_norm(1.0), opt)
  (u,), _ = run_steps(tx, p, [g])
  assert all_finite(u)
  clipped, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)
  (ref,), _ = run_steps(opt, p, [clipped])
  assert_trees_close(u, ref, rtol=1e-6, atol=LR * 1e-6)


@cases
def test_masked(case):
  p, gs = params(), [grads(1), grads(2)]
  opt = default_opt(case.name)
  tx = optax.masked(opt, {"w": True, "b": False, "scalar": True})
  state = tx.init(p)
  nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  assert any(isinstance(x, optax.MaskedNode) for x in nodes)
  us, _ = run_steps(tx, p, gs)
  refs, _ = reference_run(case.name, (1, 2))
  for u, ref, g in zip(us, refs, gs):
    np.testing.assert_array_equal(u["b"], g["b"])  # masked out: passed through
    np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-6)
    np.testing.assert_allclose(u["scalar"], ref["scalar"], rtol=1e-6)


@cases
def test_partition(case):
  p, gs = params(), [grads(1), grads(2)]
  opt = default_opt(case.name)
  tx = optax.partition({"opt": opt, "frozen": optax.set_to_zero()},
                       {"w": "opt", "b": "frozen", "scalar": "opt"})
  us, _ = run_steps(tx, p, gs)
  refs, _ = reference_run(case.name, (1, 2))
  for u, ref in zip(us, refs):
    np.testing.assert_array_equal(u["b"], 0)
    np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-6)
    np.testing.assert_allclose(u["scalar"], ref["scalar"], rtol=1e-6)


def injected(case, learning_rate=LR):
  return optax.inject_hyperparams(case.factory, static_args=("min_8bit_size",))(
      learning_rate=learning_rate, min_8bit_size=MIN_8BIT, **case.kwargs)


# optax computes 1 - b in float64 for Python floats but in float32 for the
# injected float32 arrays (1 - 0.999 differs by 1.3e-5 relative), as optax's
# own optimizers do under inject_hyperparams.
INJECT_RTOL = 2e-5


@cases
def test_inject_hyperparams_matches(case):
  p, gs = params(), [grads(i) for i in range(3)]
  us, _ = run_steps(injected(case), p, gs)
  refs, _ = reference_run(case.name, (0, 1, 2))
  for u, ref in zip(us, refs):
    assert_trees_close(u, ref, rtol=INJECT_RTOL, atol=LR * 1e-6)


@cases
def test_inject_hyperparams_learning_rate_change_does_not_recompile(case):
  p, gs = params(), [grads(i) for i in range(4)]
  tx = injected(case)
  traces = []

  @jax.jit
  def step(g, state, params):
    traces.append(1)
    return tx.update(g, state, params)

  state, us = tx.init(p), []
  for i, g in enumerate(gs):
    if i == 2:
      lr = state.hyperparams["learning_rate"]
      state.hyperparams["learning_rate"] = jnp.asarray(LR / 4, lr.dtype)
    u, state = step(g, state, p)
    us.append(u)
  assert len(traces) == 1
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(LR / 4)
  schedule = lambda count: jnp.where(count >= 2, LR / 4, LR)
  refs, _ = run_steps(case.make(schedule), p, gs)
  for u, ref in zip(us, refs):
    assert_trees_close(u, ref, rtol=INJECT_RTOL, atol=LR * 1e-6)


@cases
def test_multi_steps(case):
  p, g1, g2 = params(), grads(1), grads(2)
  opt = default_opt(case.name)
  tx = optax.MultiSteps(opt, every_k_schedule=2, should_skip_update_fn=optax.skip_not_finite)
  step = jax.jit(tx.update)
  state = tx.init(p)
  u, state = step(g1, state, p)
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
  # a NaN gradient is skipped: zero updates, nothing accumulated, inner state kept
  bad = dict(g2, w=g2["w"].at[3, 5].set(jnp.nan))
  u, skipped = step(bad, state, p)
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
  for field in ("mini_step", "gradient_step", "inner_opt_state", "acc_grads"):
    assert_trees_equal(getattr(skipped, field), getattr(state, field))
  u, state = step(g2, skipped, p)
  assert int(state.gradient_step) == 1 and int(state.mini_step) == 0
  mean = jax.tree.map(lambda a, b: a + (b - a) / 2, g1, g2)
  (ref,), ref_state = run_steps(opt, p, [mean])
  assert_trees_close(u, ref, rtol=1e-6)
  assert_trees_equal(state.inner_opt_state, ref_state)


@cases
def test_apply_if_finite(case):
  p, g1, g2 = params(), grads(1), grads(2)
  opt = default_opt(case.name)
  tx = optax.apply_if_finite(opt, 2)
  step = jax.jit(tx.update)
  s0 = tx.init(p)
  u, s1 = step(g1, s0, p)
  bad = dict(g2, b=g2["b"].at[7].set(jnp.inf), w=g2["w"].at[0, 0].set(jnp.nan))
  u, s2 = step(bad, s1, p)
  new_p = optax.apply_updates(p, u)
  assert_trees_equal(new_p, p)  # params unchanged
  assert int(s2.notfinite_count) == 1 and not bool(s2.last_finite)
  assert_trees_equal(s2.inner_state, s1.inner_state)  # state not poisoned
  u, s3 = step(g2, s2, p)
  assert int(s3.notfinite_count) == 0 and all_finite(u)
  refs, ref_state = reference_run(case.name, (1, 2))
  assert_trees_close(u, refs[1], rtol=1e-6)
  assert_trees_equal(s3.inner_state, ref_state)


@cases
def test_extra_keyword_arguments_are_ignored(case):
  p, g = params(), grads(1)
  opt = default_opt(case.name)
  state = opt.init(p)
  u, s = opt.update(g, state, p, extra_kwarg=1)
  ref, ref_s = opt.update(g, state, p)
  assert_trees_equal(u, ref)
  assert_trees_equal(s, ref_s)


# ---- jit, dtypes, state ----------------------------------------------------


@cases
def test_second_jitted_step_does_not_recompile(case):
  p = params()
  opt = default_opt(case.name)
  traces = []

  @jax.jit
  def step(g, state, params):
    traces.append(1)
    return opt.update(g, state, params)

  state = opt.init(p)
  for i in range(3):
    _, state = step(grads(i), state, p)
  assert len(traces) == 1
  if hasattr(step, "_cache_size"):
    assert step._cache_size() == 1


@cases
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"])
def test_updates_keep_the_gradient_dtype(case, dtype):
  (u1, u2), state = reference_run(case.name, (1, 2), dtype)
  g = grads(1, dtype)
  for u in (u1, u2):
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, g)
    assert all_finite(u)
  assert avals(state) == avals(default_opt(case.name).init(params(dtype)))
  # close to the float32 run (inputs differ by the dtype's rounding)
  (r1, _), _ = reference_run(case.name, (1, 2))
  up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  assert_trees_close(up(u1), r1, rtol=2e-2, atol=LR * 1e-2)


@cases
def test_state_avals_are_stable_and_lax_cond_works(case):
  p = params()
  opt = default_opt(case.name)
  s0 = opt.init(p)
  _, s1 = jitted_update(opt)(grads(1), s0, p)
  assert avals(s0) == avals(s1)
  assert any(is_quantized(x) for x in jax.tree.leaves(s0, is_leaf=is_quantized))
  pick = jax.jit(lambda pred, a, b: jax.lax.cond(pred, lambda: a, lambda: b))
  assert_trees_equal(pick(True, s0, s1), s0)
  assert_trees_equal(pick(False, s0, s1), s1)


@cases
def test_init_on_shape_dtype_structs_and_under_eval_shape(case):
  p = params()
  opt = default_opt(case.name)
  concrete = opt.init(p)
  structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
  assert avals(opt.init(structs)) == avals(concrete)
  assert avals(jax.eval_shape(opt.init, p)) == avals(concrete)
  assert avals(jax.eval_shape(opt.init, structs)) == avals(concrete)


def moment_fields(state):
  """The per-param trees of a fused state (all fields but count)."""
  return [getattr(state, f) for f in state._fields if f != "count"]


@fused_cases
def test_tree_map_params(case):
  p = params()
  opt = default_opt(case.name)
  _, state = jitted_update(opt)(grads(1), opt.init(p), p)
  zeros = optax.tree.map_params(opt, jnp.zeros_like, state)
  assert avals(zeros) == avals(state)
  assert int(zeros.count) == 1  # not a params tree: untouched
  for field in moment_fields(zeros):
    assert set(field) == {"w", "b", "scalar"}
    assert is_quantized(field["w"]) and field["w"].block_size == 256
    # f maps the codes and the absmax of an 8-bit leaf
    np.testing.assert_array_equal(field["w"].codes, 0)
    np.testing.assert_array_equal(field["w"].absmax, 0)
    np.testing.assert_array_equal(optax8.dequantize(field["w"]), 0)
  u, _ = jitted_update(opt)(grads(2), zeros, p)
  assert all_finite(u)

  # a sharding-like transform sees arrays of the param's shape and the absmax'
  structs = optax.tree.map_params(opt, lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  for field in moment_fields(structs):
    assert field["w"].codes.shape == (64, 128) and field["w"].codes.dtype == jnp.uint8
    assert field["w"].absmax.shape == (4, 8) and field["w"].absmax.dtype == jnp.float32   # 16 x 16 tiles
    assert field["b"].shape == (128,) and field["b"].dtype == jnp.float32
  assert isinstance(structs.count, jax.Array)

  # specs given per param: 8-bit leaves are whole leaves with is_leaf
  specs = {"w": "spec_w", "b": "spec_b", "scalar": "spec_s"}
  mapped = optax.tree.map_params(opt, lambda _, spec: spec, state, specs, is_leaf=is_quantized)
  for field in moment_fields(mapped):
    assert field == specs


@cases
def test_vmap_over_an_ensemble_equals_separate_runs(case):
  members = 3
  ps = [params(seed=i) for i in range(members)]
  gss = [[grads(10 * i + k) for k in range(2)] for i in range(members)]
  opt = default_opt(case.name)
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  P = stack(ps)
  S = jax.vmap(opt.init)(P)
  update = jax.jit(jax.vmap(opt.update))
  Us = []
  for k in range(2):
    U, S = update(stack([gs[k] for gs in gss]), S, P)
    Us.append(U)
  for i in range(members):
    us, s = run_steps(opt, ps[i], gss[i])
    member = jax.tree.map(lambda x: x[i], S)
    assert avals(member) == avals(s)
    assert_trees_close(member, s, rtol=1e-6)  # uint8 codes compare exactly
    for k in range(2):
      assert_trees_close(jax.tree.map(lambda x: x[i], Us[k]), us[k], rtol=1e-6, atol=1e-9)


# ---- derivatives through the step (meta-learning) ---------------------------


META_TARGET = jax.random.normal(jax.random.key(3), (64, 256))


def _meta_loss(lr, make, apply=False, dtype=jnp.float32, steps=5, **kwargs):
  """The loss after ``steps`` steps from the learning rate ``lr`` (optax's meta-learning pattern)."""
  loss = lambda p: jnp.mean((p["w"].astype(jnp.float32) - META_TARGET) ** 2)
  tx = make(learning_rate=lr, **kwargs)
  params = {"w": jnp.full((64, 256), 0.1, dtype)}
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.grad(loss)(params)
    if apply:
      params, state = optax8.apply_gradients(tx, grads, state, params)
    else:
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
  return loss(params)


@pytest.mark.parametrize("apply", [False, True], ids=["update", "apply_gradients"])
@pytest.mark.parametrize("name, kwargs", [("adamw", {}), ("lion", {}), ("adamw", {"bits": 4}),
                                          ("adamw", {"rounding": "stochastic"})], ids=["adamw", "lion", "4bit", "sr"])
def test_the_gradient_through_8_bit_steps_is_the_pure_jax_steps(monkeypatch, name, kwargs, apply):
  """jax.grad through steps of 8-bit state (native kernels: the derivatives of the pure-JAX step, which
  computes the same values; codes carry none), close to optax's namesake; jax.jvp agrees."""
  make = optax8.inject_hyperparams(REGISTRY[f"{name}8bit"].make, static_args=("bits",))
  grad = jax.jit(jax.grad(lambda lr: _meta_loss(lr, make, apply, **kwargs)))
  native = grad(1e-2)
  _, forward = jax.jvp(lambda lr: _meta_loss(lr, make, apply, **kwargs), (1e-2,), (1.0,))
  reference = jax.grad(lambda lr: _meta_loss(lr, optax.inject_hyperparams(getattr(optax, name))))(1e-2)
  monkeypatch.setattr(optax8.dispatch, "_native_branches", lambda fn: {})
  jax.clear_caches()
  try:
    pure = jax.jit(jax.grad(lambda lr: _meta_loss(lr, make, apply, **kwargs)))(1e-2)
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert np.isfinite(native) and abs(native) > 1
  np.testing.assert_allclose(native, pure, rtol=1e-5)
  np.testing.assert_allclose(forward, native, rtol=1e-4)
  np.testing.assert_allclose(native, reference, rtol=2e-2 if kwargs.get("bits") == 4 else 2e-3)


def test_the_gradient_through_stochastically_rounded_params_is_the_expectations():
  """bfloat16 params rounded stochastically: E[round(x)] = x, so the derivative is that of x cast to
  bfloat16, the one of rounding to nearest (not the zero of the bits' arithmetic)."""
  make = optax8.inject_hyperparams(optax8.lion8bit)
  for apply in (False, True):
    grads = [jax.grad(lambda lr: _meta_loss(lr, make, apply, jnp.bfloat16, param_rounding=r))(1e-2)
             for r in ("stochastic", "nearest")]
    assert abs(grads[0]) > 1
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-2)


# ---- convergence --------------------------------------------------------------

STEPS = 500
# kwargs, learning rate for the parabola, learning rate for Rosenbrock; all with
# a cosine decay to 0 over STEPS.
CONVERGENCE = {
    "adam8bit": ({}, 0.1, 0.3),
    "adamw8bit": (dict(weight_decay=1e-4), 0.1, 0.3),
    "lion8bit": (dict(weight_decay=0.0), 0.02, 0.03),
    "sgd8bit": (dict(momentum=0.9), 0.05, 0.001),
    "rmsprop8bit": ({}, 0.03, 0.03),
    "adagrad8bit": ({}, 0.5, 1.0),
    "lamb8bit": ({}, 0.03, 0.1),
    "lars8bit": (dict(trust_coefficient=0.02), 0.3, 0.3),
    "ademamix8bit": (dict(b3=0.999, alpha=2.0), 0.1, 0.1),
}
assert set(CONVERGENCE) == {c.name for c in FUSED}


def final_point(tx, loss, x0, steps=STEPS):
  """Where ``steps`` steps of ``tx`` on ``loss`` from ``x0`` end."""
  @jax.jit
  def run(x0):
    def body(carry, _):
      x, s = carry
      u, s = tx.update(jax.grad(loss)(x), s, x)
      return (optax.apply_updates(x, u), s), None
    (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)
    return x
  return run(x0)


def final_loss(tx, loss, x0, steps=STEPS):
  return float(loss(final_point(tx, loss, x0, steps)))


def both(case, lr, kwargs):
  sched = optax.cosine_decay_schedule(lr, STEPS)
  return case.factory(sched, **kwargs), case.reference(sched, **kwargs)


TARGET = jax.random.normal(jax.random.key(7), (4096,))


def parabola(x):
  return jnp.sum((x - TARGET) ** 2)


def rosenbrock(x):
  return jnp.sum((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2)


@fused_cases
def test_converges_on_a_parabola(case):
  kwargs, lr, _ = CONVERGENCE[case.name]
  opt, ref = both(case, lr, kwargs)
  x0 = jnp.zeros(4096)
  assert all(is_quantized(x) for x in moment_fields(opt.init(x0)))  # 8-bit at the default min_8bit_size
  loss0 = float(parabola(x0))
  loss, ref_loss = final_loss(opt, parabola, x0), final_loss(ref, parabola, x0)
  assert loss < 1e-3 * loss0
  assert loss <= 2 * ref_loss + 1e-5 * loss0, (loss, ref_loss)


@fused_cases
def test_converges_on_rosenbrock(case):
  kwargs, _, lr = CONVERGENCE[case.name]
  opt, ref = both(case, lr, kwargs)
  x0 = jnp.array([-1.0, 1.0])
  assert not any(is_quantized(x) for x in jax.tree.leaves(opt.init(x0), is_leaf=is_quantized))
  loss0 = float(rosenbrock(x0))
  loss, ref_loss = final_loss(opt, rosenbrock, x0), final_loss(ref, rosenbrock, x0)
  assert loss < 0.05 * loss0
  # float32 state: the same run as optax up to rounding (which LAMB's and
  # LARS's normalised steps amplify over many steps)
  assert loss <= 2 * ref_loss + 1e-2 * loss0, (loss, ref_loss)


@fused_cases
def test_converges_on_batched_rosenbrock(case):
  kwargs, _, lr = CONVERGENCE[case.name]
  opt, ref = both(case, lr, kwargs)
  k1, k2 = jax.random.split(jax.random.key(3))
  # The two coordinates as two leaves: stacked as the rows of one (2, 4096) matrix, the blocks (tiles of a
  # matrix) would mix coordinates whose moments differ by orders of magnitude.
  x0 = (jax.random.uniform(k1, (4096,), minval=-1.2, maxval=-0.8),
        jax.random.uniform(k2, (4096,), minval=0.8, maxval=1.2))
  assert all(is_quantized(q) for field in moment_fields(opt.init(x0)) for q in field)
  loss0 = float(rosenbrock(x0))
  loss, ref_loss = final_loss(opt, rosenbrock, x0), final_loss(ref, rosenbrock, x0)
  assert loss < 0.25 * loss0
  assert loss <= 1.5 * ref_loss + 1e-3 * loss0, (loss, ref_loss)


def optax_rosenbrock_end(tx):
  """optax's own test problem: Rosenbrock from (0, 0), 10,000 steps; the final point."""
  return np.asarray(final_point(tx, rosenbrock, jnp.zeros(2), 10_000))


# optax's own test of its optimizers (optax/_src/alias_test.py): each learning rate as there, 10,000 steps
# from optax's start to within rtol = atol = 3e-2 of the minimum; AdEMAMix (optax.contrib) with Adam's.
OPTAX_PROBLEMS = [("sgd8bit", dict(learning_rate=1e-3, momentum=0.9)), ("adagrad8bit", dict(learning_rate=1.0)),
                  ("adam8bit", dict(learning_rate=1e-1)), ("adamw8bit", dict(learning_rate=1e-1)),
                  ("lars8bit", dict(learning_rate=1.0)), ("lamb8bit", dict(learning_rate=1e-3)),
                  ("lion8bit", dict(learning_rate=1e-2, weight_decay=1e-4)), ("rmsprop8bit", dict(learning_rate=5e-3)),
                  ("rmsprop8bit", dict(learning_rate=5e-3, momentum=0.9)), ("ademamix8bit", dict(learning_rate=1e-1))]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("problem", ["parabola", "rosenbrock"])
@pytest.mark.parametrize("name, kwargs", [
    pytest.param(n, k, id=f"{n}-{'-'.join(map(str, k.values()))}") for n, k in OPTAX_PROBLEMS])
def test_converges_where_optax_does_on_optax_problems(name, kwargs, problem, rounding):
  case = next(c for c in CASES if c.name == name)
  if problem == "parabola":
    start, end = jnp.array([-1.0, 10.0, 1.0]), jnp.array([1.0, -1.0, 1.0])
    loss = lambda x: jnp.sum((x - end) ** 2)
  else:
    start, end, loss = jnp.zeros(2), jnp.ones(2), rosenbrock
  ref = np.asarray(final_point(case.reference(**kwargs), loss, start, 10_000))
  np.testing.assert_allclose(ref, end, rtol=3e-2, atol=3e-2)   # optax's own test
  ours = np.asarray(final_point(case.factory(**kwargs, min_8bit_size=0, rounding=rounding), loss, start, 10_000))
  np.testing.assert_allclose(ours, end, rtol=3e-2, atol=3e-2)


def test_lamb8bit_reaches_the_rosenbrock_minimum_like_optax():
  """With round to nearest, LAMB's second moment, about 4e-9 of its block's maximum, rounded to code 0 and
  m / (sqrt(v) + eps) was off by orders of magnitude: the run ended at (0.027, 0.0008). The unsigned map
  keeps code 0 for zero (optax8.maps.POSITIVE_FLOOR)."""
  end = optax_rosenbrock_end(optax8.lamb8bit(1e-3, min_8bit_size=0))
  np.testing.assert_allclose(end, optax_rosenbrock_end(optax.lamb(1e-3)), rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(end, [1.0, 1.0], rtol=3e-2, atol=3e-2)


def test_lion8bit_reaches_the_rosenbrock_minimum_like_optax():
  """The signed map has +1 but no -1. With a positive absmax (bitsandbytes' rule, written in jnp in
  benchmarks/lion_rosenbrock.py), a block whose largest momentum is negative loses 0.7% of it at every
  requantization and the run stops at (0.931, 0.883), as bitsandbytes' Lion8bit does. The signed map's absmax
  takes the sign of its largest element (optax8.maps.SIGNS_ABSMAX)."""
  bench = load_script(ROOT / "benchmarks" / "lion_rosenbrock.py")
  ends = {name: bench.path(make(), 10_000)[-1] for name, make in bench.RUNS.items()}
  ours, bnb_rule = ends["optax8.lion8bit (signed absmax)"], ends["bnb rule (positive absmax)"]
  np.testing.assert_allclose(ours, optax_rosenbrock_end(optax8.lion8bit(1e-2, weight_decay=1e-4, min_8bit_size=0)))
  np.testing.assert_allclose(ours, ends["optax.lion (float32)"], rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(ours, [1.0, 1.0], rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(bnb_rule, [0.9315, 0.8828], atol=1e-3)   # the stall


# ---- bits=32 is optax ---------------------------------------------------------


@cases
def test_bits32_equals_optax(case):
  p, gs = params(), [grads(i) for i in range(3)]
  us, _ = run_steps(case.make(bits=32), p, gs)
  refs, _ = run_steps(case.reference(LR, **case.kwargs), p, gs)
  for u, ref in zip(us, refs):
    assert_trees_close(u, ref, rtol=1e-5, atol=LR * 1e-6)


# ---- bad input ------------------------------------------------------------------


@cases
def test_gradient_tree_with_another_structure(case):
  p = params()
  opt = default_opt(case.name)
  state = opt.init(p)
  g = grads(1)
  del g["b"]
  with pytest.raises(ValueError, match="structure"):
    opt.update(g, state, {k: p[k] for k in g})


@cases
def test_gradient_leaf_with_the_wrong_shape(case):
  p = params()
  opt = default_opt(case.name)
  state = opt.init(p)
  g = dict(grads(1), w=jnp.ones((64, 64)))
  with pytest.raises(ValueError, match=r"\['w'\]"):
    opt.update(g, state, dict(p, w=jnp.ones((64, 64))))
  with pytest.raises(ValueError, match=r"\['w'\]"):
    jax.jit(opt.update)(g, state, p)


@cases
def test_integer_gradient(case):
  p = params()
  opt = default_opt(case.name)
  state = opt.init(p)
  g = dict(grads(1), b=jnp.ones((128,), jnp.int32))
  with pytest.raises(TypeError, match=r"\['b'\].*int32"):
    opt.update(g, state, p)


def test_state_of_another_optimizer():
  p = params()
  state = optax8.adam8bit(1e-3, min_8bit_size=MIN_8BIT).init(p)
  with pytest.raises(TypeError, match="ScaleByLion8bitState"):
    optax8.lion8bit(1e-3, min_8bit_size=MIN_8BIT).update(grads(1), state, p)


def test_state_with_another_block_size():
  p = params()
  state = optax8.adam8bit(1e-3, block_size=128, min_8bit_size=MIN_8BIT).init(p)
  with pytest.raises(ValueError, match="block_size"):
    optax8.adam8bit(1e-3, block_size=256, min_8bit_size=MIN_8BIT).update(grads(1), state, p)


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit", "lamb8bit", "lars8bit"])
def test_missing_params(name):
  opt = BY_NAME[name].make()
  with pytest.raises(ValueError, match="params"):
    opt.update(grads(1), opt.init(params()))


@pytest.mark.parametrize("name", sorted(n for n, o in REGISTRY.items() if o.reference is not None))
def test_arguments_optax_annotates_as_scalar_or_schedule_are_annotated_so(name):
  """optax's own tests (contrib) read the ScalarOrSchedule annotation to decide which arguments take schedules."""
  optimizer = REGISTRY[name]
  ours = inspect.signature(optimizer.make, eval_str=True).parameters
  theirs = inspect.signature(optimizer.reference).parameters
  scheduled = [arg for arg, p in theirs.items() if p.annotation == optax.ScalarOrSchedule]
  assert "learning_rate" in scheduled
  for arg in scheduled:
    if arg in ours:
      assert ours[arg].annotation == optax.ScalarOrSchedule, arg
