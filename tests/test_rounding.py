"""Stochastic rounding (optax8.rounding): the draws, the rule, and the option on every optimizer and path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8 import maps, rounding
from optax8.kernels import jax_backend, jax_step

from helpers import TINY, pure_jax_steps


def _draws(n, step=0, seed=0, state=0):
  return np.asarray(rounding.uniform(jnp.arange(n, dtype=jnp.uint32), rounding.state_key(step, seed, state)))


def test_draws_are_uniform_and_each_key_gives_its_own():
  u = _draws(1 << 20)
  assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
  assert np.all((u * 2**24) == np.floor(u * 2**24))   # multiples of 2**-24
  assert abs(u.mean() - 0.5) < 2e-3 and abs(u.var() - 1 / 12) < 2e-3
  counts = np.histogram(u, bins=64, range=(0, 1))[0]
  assert np.all(np.abs(counts / (len(u) / 64) - 1) < 0.05)
  others = [_draws(1 << 20, step=1), _draws(1 << 20, seed=1), _draws(1 << 20, state=1),
            _draws(1 << 20, step=1 << 23, seed=(1 << 24) - 1)]
  for v in others:
    assert abs(np.corrcoef(u, v)[0, 1]) < 5e-3
    assert np.mean(u == v) < 1e-3
  # the same key gives the same draws, computed from floats (hyperparameter slots) or ints alike
  np.testing.assert_array_equal(_draws(1000, step=5, seed=77), np.asarray(rounding.uniform(
      jnp.arange(1000, dtype=jnp.uint32), rounding.state_key(jnp.float32(5), jnp.float32(77), 0))))


def test_index_vectors_give_each_element_its_row_major_index():
  for shape in [(7,), (3, 5), (2, 3, 4)]:
    index = rounding.element_index(rounding.index_vectors(shape))
    np.testing.assert_array_equal(np.asarray(index), np.arange(np.prod(shape)).reshape(shape))


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
def test_stochastic_codes_are_a_neighbour_and_exact_values_stay(kind):
  values = maps.dynamic_map(kind)
  rng = np.random.default_rng(0)
  low = -1.0 if kind == maps.SIGNED else 0.0
  v = np.concatenate([rng.uniform(low, 1, 4000), values, [-1.0, 1.0, 0.0]]).astype(np.float32)
  if kind == maps.UNSIGNED:
    v = np.abs(v)
  nearest = jax_backend.table_code(jnp.asarray(v), kind)
  for step in range(4):
    u = _draws(v.size, step=step)
    codes = np.asarray(jax_backend.stochastic_code(jnp.asarray(v), nearest, jnp.asarray(u), kind)).astype(int)
    below = np.searchsorted(values, v, side="right") - 1   # the map value at or below v
    above = np.minimum(below + (values[np.maximum(below, 0)] != v), 255)
    assert np.all((codes == np.maximum(below, 0)) | (codes == above))
    exact = np.isin(v, values)
    np.testing.assert_array_equal(codes[exact], np.searchsorted(values, v[exact]))
    assert np.all(codes[v < values[0]] == 0)   # -1 is below the signed map


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
def test_stochastic_rounding_is_unbiased(kind):
  """The mean of many draws' dequantized values is the value itself, where round to nearest is off by up to half
  a code gap."""
  rng = np.random.default_rng(1)
  x = rng.uniform(0.02, 0.9, (16, 16)).astype(np.float32) * (rng.choice([-1, 1], (16, 16)) if kind == maps.SIGNED
                                                               else 1)
  x[0, 0] = 1.0   # absmax 1: x is its own normalized value
  index = rounding.element_index(rounding.index_vectors(x.shape))

  def roundtrip(step):
    u = rounding.uniform(index, rounding.state_key(step, 3, 0))
    codes, absmax = jax_backend.quantize(jnp.asarray(x), 256, kind, 16, u)
    return jax_backend.dequantize(codes, absmax, 256, kind, jnp.float32, 16)

  n = 4000
  mean = np.asarray(jax.jit(jax.vmap(roundtrip))(jnp.arange(n)), np.float64).mean(0)
  values = maps.dynamic_map(kind).astype(np.float64)
  hi = np.clip(np.searchsorted(values, x), 1, 255)
  gap = values[hi] - values[hi - 1]
  # a draw's error is at most one gap: the mean's standard deviation is at most gap / (2 sqrt(n))
  assert np.all(np.abs(mean - x) <= 5 * gap / (2 * np.sqrt(n)) + 1e-7)
  codes, absmax = jax_backend.quantize(jnp.asarray(x), 256, kind, 16)
  nearest = np.asarray(jax_backend.dequantize(codes, absmax, 256, kind, jnp.float32, 16), np.float64)
  assert np.max(np.abs(nearest - x) / gap) > 0.4   # the bias that stochastic rounding removes


def _tree():
  rng = np.random.default_rng(2)
  return {"w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)}


def _codes(state):
  return [np.asarray(q.codes) for q in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax8.QuantizedArray))
          if isinstance(q, optax8.QuantizedArray)]


@pytest.mark.parametrize("make", [optax8.adamw8bit, optax8.lion8bit, optax8.rmsprop8bit], ids=lambda f: f.__name__)
def test_stochastic_steps_are_reproducible_and_differ_by_step_and_leaf(make):
  params = _tree()
  grads = {"w": params["w"] * 0.1, "v": params["w"] * 0.1}   # two leaves of equal values
  tx = make(1e-2, rounding="stochastic")
  step = jax.jit(tx.update)
  _, s1 = step(grads, tx.init(params), params)
  _, again = step(grads, tx.init(params), params)
  for a, b in zip(_codes(s1), _codes(again)):
    np.testing.assert_array_equal(a, b)
  _, near = jax.jit(make(1e-2).update)(grads, make(1e-2).init(params), params)
  assert any(np.mean(a != b) > 0.05 for a, b in zip(_codes(s1), _codes(near)))
  w, v = _codes(s1)[0::2][0], _codes(s1)[1::2][0]   # the first state of leaves "v" and "w" (sorted)
  assert np.mean(w != v) > 0.05   # each leaf has its own seed
  _, s2 = step(grads, s1._replace(count=s1.count + 7), params)
  _, s2b = step(grads, s1, params)
  assert any(np.mean(a != b) > 0.01 for a, b in zip(_codes(s2), _codes(s2b)))   # each step its own draws


def test_every_path_rounds_alike(monkeypatch):
  """update, apply_gradients, eager, disable_jit and vmap on the native CPU kernel: the same codes; the pure-JAX
  step (GPUs, TPUs) a leaf in slices and whole: the same codes, and the kernel's to float32 rounding of the rule."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.standard_normal((1024, 512)), jnp.float32)}   # two slices of 2**18 (the update's)
  grads = jax.tree.map(lambda p: p * 0.01, params)
  tx = optax8.adamw8bit(1e-2, rounding="stochastic")
  state = tx.init(params)
  update = lambda g, s, p: tx.update(g, s, p)
  _, ref = jax.jit(update)(grads, state, params)
  _, applied = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
  results = [applied, tx.update(grads, state, params)[1]]
  with jax.disable_jit():
    results.append(tx.update(grads, state, params)[1])
  batched = jax.vmap(tx.update)(jax.tree.map(lambda x: x[None], grads), jax.tree.map(lambda x: x[None], state),
                                jax.tree.map(lambda x: x[None], params))[1]
  results.append(jax.tree.map(lambda x: x[0], batched))
  for got in results:
    for a, b in zip(_codes(got), _codes(ref)):
      np.testing.assert_array_equal(a, b)

  with pure_jax_steps(monkeypatch):
    _, sliced = jax.jit(update)(grads, state, params)
    monkeypatch.setattr(jax_step, "UPDATE_CHUNK_ELEMENTS", 1 << 30)
    jax.clear_caches()
    _, whole = jax.jit(update)(grads, state, params)
  for a, b, c in zip(_codes(sliced), _codes(whole), _codes(ref)):
    np.testing.assert_array_equal(a, b)
    diff = np.abs(a.astype(int) - c.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3


def test_apply_gradients_matches_update_then_apply_updates():
  params = _tree()
  grads = jax.tree.map(lambda p: p * 0.01, params)
  tx = optax8.lion8bit(1e-3, rounding="stochastic")
  state = tx.init(params)
  p1, s1 = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
  u, s2 = jax.jit(tx.update)(grads, state, params)
  for a, b in zip(_codes(s1), _codes(s2)):
    np.testing.assert_array_equal(a, b)
  for k in params:
    np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(optax.apply_updates(params, u)[k]))


def test_rounding_per_leaf_and_its_errors():
  params = _tree()
  grads = jax.tree.map(lambda p: p * 0.01, params)
  mixed = optax8.adam8bit(1e-2, rounding={"w": "stochastic", "v": "nearest"})
  nearest, stochastic = optax8.adam8bit(1e-2), optax8.adam8bit(1e-2, rounding="stochastic")
  run = lambda tx: jax.jit(tx.update)(grads, tx.init(params), params)[1]
  got, want_v, want_w = run(mixed), run(nearest), run(stochastic)
  np.testing.assert_array_equal(np.asarray(got.mu["v"].codes), np.asarray(want_v.mu["v"].codes))
  np.testing.assert_array_equal(np.asarray(got.mu["w"].codes), np.asarray(want_w.mu["w"].codes))
  with pytest.raises(ValueError, match=r"adam8bit: rounding must be one of \('nearest', 'stochastic'\), got 'up'"):
    optax8.adam8bit(1e-2, rounding="up")
  bad = optax8.adam8bit(1e-2, rounding={"w": "stochastic", "v": "floor"})
  with pytest.raises(ValueError, match=r"rounding of leaf \['v'\] must be one of .* got 'floor'"):
    bad.init(params)   # at init, as the other per-leaf options
  # 32-bit leaves have nothing to round
  small = optax8.adam8bit(1e-2, rounding="stochastic", min_8bit_size=1 << 30)
  u, _ = jax.jit(small.update)(grads, small.init(params), params)
  ref, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
  np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(ref["w"]), rtol=1e-6, atol=1e-9)


def test_unsigned_floor_holds_under_stochastic_rounding():
  x = np.zeros((1, 256), np.float32)
  x[0, 0], x[0, 1:] = 1.0, 1e-9   # far below the first map value above 0 (3.25e-7)
  index = rounding.element_index(rounding.index_vectors(x.shape))
  for step in range(8):
    u = rounding.uniform(index, rounding.state_key(step, 0, 1))
    codes, _ = jax_backend.quantize(jnp.asarray(x), 256, maps.UNSIGNED, 1, u)
    assert np.all(np.asarray(codes)[x >= TINY] >= 1)
