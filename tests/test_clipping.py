"""percentile_clipping against a numpy transcription of bitsandbytes' rule, and as an optimizer option."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8.optimizers import REGISTRY


class Reference:
  """bitsandbytes' percentile clipping of one tensor (history 100 there), in numpy float64."""

  def __init__(self, percentile, history):
    self.percentile, self.history, self.h, self.t = percentile, history, np.zeros(history), 0

  def scale(self, g):
    self.t += 1
    sq = float(np.sum(np.square(np.asarray(g, np.float64))))
    if self.t == 1:
      self.h[:] = sq
    else:
      self.h[self.t % self.history] = sq
    clip = np.sqrt(np.sort(self.h)[min(int(self.percentile * self.history / 100), self.history - 1)])
    norm = np.sqrt(sq)
    return clip / norm if norm > clip else 1.0


def gradients(steps, seed=0, spikes=()):
  """{"w", "b"} gradients whose norms drift a little from step to step; ``spikes``: steps scaled by 100."""
  out = []
  for t in range(steps):
    k = jax.random.split(jax.random.key(seed * 1000 + t), 2)
    s = (100.0 if t in spikes else 1.0) * (1 + 0.3 * np.sin(t))
    out.append({"w": s * jax.random.normal(k[0], (16, 32)), "b": 0.1 * s * jax.random.normal(k[1], (32,))})
  return out


def test_matches_the_reference_per_leaf():
  tx = optax8.percentile_clipping(percentile=20, history=10)
  update = jax.jit(tx.update)
  state = tx.init(gradients(1)[0])
  refs = {k: Reference(20, 10) for k in ("w", "b")}
  clipped = 0
  for g in gradients(25, spikes=(12, 20)):
    u, state = update(g, state)
    for k, ref in refs.items():
      s = ref.scale(g[k])
      clipped += s < 1
      np.testing.assert_allclose(np.asarray(u[k]), np.asarray(g[k]) * s, rtol=2e-6)
      if s == 1:
        np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(g[k]))
    np.testing.assert_allclose(np.asarray(state.history["w"]), refs["w"].h, rtol=1e-5)
  assert 4 <= clipped < 40


def test_a_spike_is_scaled_to_the_recent_percentile_norm_and_ordinary_gradients_pass():
  """Ordinary gradients of one norm (sign flips of one vector) pass bit for bit; a spike gets their norm."""
  tx = optax8.percentile_clipping(5, 100)
  update = jax.jit(tx.update)
  key = jax.random.key(1)
  g0 = jax.random.normal(key, (8, 64))
  state = tx.init({"w": g0})
  for t in range(120):
    g = {"w": g0 * jnp.sign(jax.random.normal(jax.random.fold_in(key, t), g0.shape))}
    u, state = update(g, state)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(g["w"]))
  u, state = update({"w": g0 * 1000.0}, state)
  np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(g0), rtol=1e-5, atol=1e-7)


def test_a_spike_among_varying_norms_is_scaled_to_their_percentile():
  """At percentile 95 most ordinary gradients pass; the spike gets the 95th percentile of the last 99 norms."""
  history, percentile = 100, 95
  tx = optax8.percentile_clipping(percentile, history)
  update = jax.jit(tx.update)
  key = jax.random.key(2)
  norms = np.asarray(1.0 + 0.5 * jax.random.uniform(key, (150,)))   # ordinary steps: norm in [1, 1.5]
  g0 = jax.random.normal(jax.random.fold_in(key, 1), (8, 64))
  g0 = g0 / jnp.linalg.norm(g0)
  state, ref, passed = tx.init({"w": g0}), Reference(percentile, history), 0
  for n in norms:
    g = {"w": g0 * n}
    u, state = update(g, state)
    if ref.scale(g["w"]) == 1.0:
      np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(g["w"]))
      passed += 1
  assert passed >= 0.9 * len(norms)
  u, state = update({"w": g0 * 1000.0}, state)
  recent = np.sort(np.square(np.concatenate([norms[-(history - 1):], [1000.0]])))
  expected_norm = np.sqrt(recent[percentile])
  assert 1.4 <= expected_norm <= 1.5
  assert float(jnp.linalg.norm(u["w"])) == pytest.approx(expected_norm, rel=1e-5)
  np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(g0) * expected_norm, rtol=1e-5, atol=1e-7)


def test_global_norm_scales_all_leaves_alike():
  tx = optax8.percentile_clipping(10, 10, per_leaf=False)
  update = jax.jit(tx.update)
  gs = gradients(20, seed=2, spikes=(15,))
  state = tx.init(gs[0])
  assert state.history.shape == (10,)
  ref, scales = Reference(10, 10), []
  for g in gs:
    u, state = update(g, state)
    scales.append(ref.scale(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])))
    for k in g:
      np.testing.assert_allclose(np.asarray(u[k]), np.asarray(g[k]) * scales[-1], rtol=2e-6)
  assert min(scales) < 0.02 and scales.count(1.0) >= 3


def test_per_leaf_differs_from_global():
  """A spike of the bias alone: per leaf only the bias is cut down; by the global norm, the weights too."""
  gs = gradients(12, seed=3)
  gs[-1] = dict(gs[-1], b=gs[-1]["b"] * 1000)
  outs = {}
  for per_leaf in (True, False):
    tx = optax8.percentile_clipping(5, 10, per_leaf=per_leaf)
    update = jax.jit(tx.update)
    state = tx.init(gs[0])
    for g in gs:
      u, state = update(g, state)
    outs[per_leaf] = u
  ratio = lambda u, k: float(jnp.linalg.norm(u[k]) / jnp.linalg.norm(gs[-1][k]))
  assert ratio(outs[True], "w") > 0.5 and ratio(outs[True], "b") < 0.01
  assert ratio(outs[False], "w") < 0.1 and ratio(outs[False], "b") == pytest.approx(ratio(outs[False], "w"))


def test_percentile_per_leaf_and_100_is_off():
  gs = gradients(12, seed=4, spikes=(11,))
  for percentile in ({"w": 5, "b": 100}, lambda p: {"w": 5, "b": None}):
    tx = optax8.percentile_clipping(percentile, 10)
    state = tx.init(gs[0])
    assert isinstance(state.history["b"], optax.MaskedNode) and state.history["w"].shape == (10,)
    for g in gs:
      u, state = jax.jit(tx.update)(g, state)
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(gs[-1]["b"]))
    assert float(jnp.linalg.norm(u["w"])) < float(jnp.linalg.norm(gs[-1]["w"])) / 10


def test_non_finite_elements_stay_out_of_the_history():
  g = gradients(3, seed=5)
  tx = optax8.percentile_clipping(5, 10)
  update = jax.jit(tx.update)
  state = tx.init(g[0])
  bad = dict(g[0], w=g[0]["w"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf))
  u, state = update(bad, state)   # the first step fills the history with the finite elements' norm
  finite = g[0]["w"].at[0, 0].set(0).at[1, 1].set(0)
  np.testing.assert_allclose(np.asarray(state.history["w"]), float(jnp.sum(finite**2)), rtol=1e-6)
  assert np.isnan(u["w"][0, 0]) and np.isposinf(u["w"][1, 1])   # passed on for the optimizer to zero
  huge = dict(g[1], w=g[1]["w"] * 1e30)   # the squared norm overflows float32
  u, state = update(huge, state)
  assert all(bool(jnp.all(jnp.isfinite(h))) for h in jax.tree.leaves(state.history))
  assert float(jnp.linalg.norm(u["w"])) == pytest.approx(np.sqrt(float(state.history["w"][0])), rel=1e-5)
  u, state = update(g[2], state)
  assert bool(jnp.all(jnp.isfinite(u["w"])))


def test_dtype_jit_and_no_recompile():
  gs = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g) for g in gradients(6, seed=6, spikes=(5,))]
  tx = optax8.percentile_clipping(5, 4)
  traces = []

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state)

  state = tx.init(gs[0])
  for g in gs:
    u, state = step(g, state)
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, g)
  assert len(traces) == 1
  assert float(jnp.linalg.norm(u["w"].astype(jnp.float32))) < float(jnp.linalg.norm(gs[-1]["w"].astype(jnp.float32)))


def test_inject_hyperparams_changes_the_percentile_without_recompiling():
  gs = gradients(10, seed=7, spikes=(9,))
  tx = optax.inject_hyperparams(optax8.percentile_clipping)(percentile=5.0, history=8)
  step = jax.jit(tx.update)
  state = tx.init(gs[0])
  for g in gs[:-1]:
    _, state = step(g, state)
  clipped, _ = step(gs[-1], state)
  state.hyperparams["percentile"] = jnp.asarray(100.0, state.hyperparams["percentile"].dtype)
  off, _ = step(gs[-1], state)
  assert float(jnp.linalg.norm(clipped["w"])) < float(jnp.linalg.norm(gs[-1]["w"])) / 10
  np.testing.assert_array_equal(np.asarray(off["w"]), np.asarray(gs[-1]["w"]))
  assert step._cache_size() == 1


def test_bad_arguments():
  g = gradients(1)[0]
  with pytest.raises(ValueError, match=r"percentile of leaf \['b'\] must be in \[0, 100\], got 120"):
    optax8.percentile_clipping({"w": 5, "b": 120}).init(g)
  with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\], got -1"):
    optax8.percentile_clipping(-1)
  with pytest.raises(TypeError, match="per_leaf=False"):
    optax8.percentile_clipping({"w": 5, "b": 5}, per_leaf=False)
  with pytest.raises(ValueError, match="history must be an int >= 1"):
    optax8.percentile_clipping(5, 0)
  with pytest.raises(ValueError, match=r"no value for leaf \['w'\]"):
    optax8.percentile_clipping({"b": 5}).init(g)


# ---- the optimizers' percentile_clipping option -----------------------------------

OPTIMIZERS = {
    "adamw8bit": dict(weight_decay=1e-2),
    "lion8bit": {},
    "sgd8bit": dict(momentum=0.9, weight_decay=1e-3),
    "rmsprop8bit": dict(momentum=0.5),
    "lars8bit": dict(weight_decay=1e-3),
}


def params():
  k = jax.random.split(jax.random.key(9), 2)
  return {"w": jax.random.normal(k[0], (16, 32)) * 0.1, "b": jax.random.normal(k[1], (32,)) * 0.1}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_option_equals_chaining_the_transformation(name):
  make = lambda **k: getattr(optax8, name)(1e-2, min_8bit_size=256, **OPTIMIZERS[name], **k)
  percentile = {"w": 10, "b": 100}
  tx = make(percentile_clipping=percentile)
  ref = optax.chain(optax8.percentile_clipping(percentile), make())
  p = params()
  state, ref_state = tx.init(p), ref.init(p)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
  for g in gradients(8, seed=8, spikes=(7,)):
    u, state = update(g, state, p)
    r, ref_state = ref_update(g, ref_state, p)
    for a, b in zip(jax.tree.leaves((u, state)), jax.tree.leaves((r, ref_state))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_option_keeps_apply_gradients_fused():
  tx = optax8.adamw8bit(1e-2, min_8bit_size=256, percentile_clipping=5)
  assert isinstance(tx, optax8.FusedGradientTransformation)
  p = params()
  s1 = s2 = tx.init(p)
  p1 = p2 = p
  apply = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))
  for g in gradients(6, seed=10, spikes=(5,)):
    u, s1 = jax.jit(tx.update)(g, s1, p1)
    p1 = optax.apply_updates(p1, u)
    p2, s2 = apply(g, s2, p2)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_default_and_100_leave_the_state_unchanged(name):
  make = lambda **k: getattr(optax8, name)(1e-2, **k)
  p = params()
  structure = jax.tree.structure(make().init(p))
  assert jax.tree.structure(make(percentile_clipping=100).init(p)) == structure
  assert jax.tree.structure(make(percentile_clipping={"w": 100, "b": None}).init(p)) == structure
  state = make(percentile_clipping=5).init(p)
  assert jax.tree.structure(state) != structure


def test_option_on_sgd_without_momentum():
  tx = optax8.sgd8bit(0.1, percentile_clipping=5)
  g = gradients(4, seed=11, spikes=(3,))
  state = tx.init(params())
  for x in g:
    u, state = jax.jit(tx.update)(x, state)
  assert float(jnp.linalg.norm(u["w"])) < 0.1 * float(jnp.linalg.norm(g[-1]["w"])) / 10
