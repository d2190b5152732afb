"""muon8bit against optax.contrib.muon: the same update at 32 bits, the same training at 8."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from optax import contrib

import optax8


def _mlp(seed=0, width=128):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"l1": {"kernel": jax.random.normal(k[0], (64, width)) / 8, "bias": jnp.zeros((width,))},
          "l2": {"kernel": jax.random.normal(k[1], (width, 64)) / np.sqrt(width), "bias": jnp.zeros((64,))},
          "scale": jnp.ones((3, 4, 64))}   # rank 3: AdamW's part, as in optax


# Muon on both matrices and on the rank-3 "scale" (its last two axes), AdamW on the biases.
_DIMS = {"l1": {"kernel": contrib.MuonDimensionNumbers(), "bias": None},
         "l2": {"kernel": contrib.MuonDimensionNumbers(), "bias": None},
         "scale": contrib.MuonDimensionNumbers(1, 2)}


def _loss(params, x, y):
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  out = (h @ params["l2"]["kernel"] + params["l2"]["bias"]) * params["scale"].mean((0, 1))
  return jnp.mean((out - y) ** 2)


def _data(n=1024):
  """A teacher network's outputs plus noise: the loss levels off at the noise, where runs can be compared."""
  teacher = _mlp(seed=7)
  x = jax.random.normal(jax.random.key(3), (n, 64))
  y = jnp.tanh(x @ teacher["l1"]["kernel"]) @ teacher["l2"]["kernel"]
  return x, y + 0.3 * jax.random.normal(jax.random.key(4), y.shape)


def _train(tx, steps, params=None):
  params = _mlp() if params is None else params
  x, y = _data()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, losses


def _bytes(state):
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def test_at_32_bits_twenty_steps_equal_optax_muon():
  kw = dict(weight_decay=1e-2, adam_weight_decay=1e-3)
  ours, _, our_losses = _train(optax8.muon8bit(0.02, bits=32, **kw), 20)
  ref, _, ref_losses = _train(contrib.muon(0.02, **kw), 20)
  np.testing.assert_allclose(our_losses, ref_losses, rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(ref)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("options", [dict(nesterov=False), dict(ns_coeffs="dion"), dict(adaptive=True),
                                     dict(consistent_rms=0.2), dict(preconditioning="spectral"),
                                     dict(muon_weight_dimension_numbers=_DIMS)],
                         ids=["plain", "dion", "adaptive", "consistent-rms", "spectral", "dimension-numbers"])
def test_at_32_bits_every_variant_equals_optax_muon(options):
  ours, _, _ = _train(optax8.muon8bit(0.02, bits=32, **options), 5)
  ref, _, _ = _train(contrib.muon(0.02, **options), 5)
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_scale_by_muon8bit_at_32_bits_is_optax_scale_by_muon():
  params = {"a": jax.random.normal(jax.random.key(0), (96, 64)), "b": jax.random.normal(jax.random.key(1), (64, 96))}
  dims = {"a": contrib.MuonDimensionNumbers(), "b": contrib.MuonDimensionNumbers(1, 0)}
  ours = optax8.scale_by_muon8bit(bits=32, weight_dimension_numbers=dims)
  ref = contrib.scale_by_muon(weight_dimension_numbers=dims)
  s, r = ours.init(params), ref.init(params)
  for t in range(4):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(10 + t), x.shape), params)
    u, s = jax.jit(ours.update)(g, s, params)
    v, r = jax.jit(ref.update)(g, r, params)
    for got, want in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(s.mu["a"], r.mu["a"], rtol=1e-5, atol=1e-8)


def test_at_8_bits_it_trains_like_optax_muon_with_under_half_the_state():
  steps = 150
  _, state, losses = _train(optax8.muon8bit(0.02, weight_decay=1e-3), steps)
  _, ref_state, ref_losses = _train(contrib.muon(0.02, weight_decay=1e-3), steps)
  final, ref_final = np.mean(losses[-20:]), np.mean(ref_losses[-20:])
  assert final < 0.5 * losses[0]                          # it trains
  assert abs(final - ref_final) <= 0.02 * ref_final, (final, ref_final)
  kernels = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax8.QuantizedArray))
             if isinstance(x, optax8.QuantizedArray)]
  assert len(kernels) == 2                                # both matrices' momenta are 8-bit
  assert _bytes(state) < 0.5 * _bytes(ref_state), (_bytes(state), _bytes(ref_state))


def test_in_a_chain_with_per_leaf_options_and_schedules():
  bits = lambda params: jax.tree.map(lambda x: 32 if x.shape == (64, 128) else 8, params)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax8.muon8bit(optax.linear_schedule(0.02, 0.0, 10), bits=bits, min_8bit_size=0))
  _, state, losses = _train(tx, 10)
  muon_state = state[1].inner_states["muon"].inner_state
  assert not isinstance(muon_state.mu["l1"]["kernel"], optax8.QuantizedArray)   # 32 bits by the option
  assert isinstance(muon_state.mu["l2"]["kernel"], optax8.QuantizedArray)
  assert losses[-1] < losses[0]


def test_apply_gradients_equals_update_and_apply_updates():
  tx = optax8.muon8bit(0.02)
  params, x, y = _mlp(), *_data()
  grads = jax.grad(_loss)(params, x, y)
  state = tx.init(params)
  updates, want_state = tx.update(grads, state, params)
  assert optax8.fused_apply(tx) is not None   # optax8.partition: AdamW's 8-bit leaves are written by the kernel
  got, got_state = optax8.apply_gradients(tx, grads, state, params)
  for a, b in zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((optax.apply_updates(params, updates),
                                                                      want_state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets them)")
def test_sharded_momentum_stays_on_its_shards_and_matches_one_device():
  tx = optax8.muon8bit(0.02, min_8bit_size=0)
  params, x, y = _mlp(), *_data()
  grads = jax.grad(_loss)(params, x, y)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  ref_params, ref_state = jax.jit(step)(params, tx.init(params), grads)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))   # optax's NS is not written for Explicit
  # 16-wide shards of 16 x 16 tiles: l1 by columns (64, 128), l2 by rows (128, 64)
  specs = {"l1": {"kernel": P(None, "x"), "bias": P()}, "l2": {"kernel": P("x", None), "bias": P()}, "scale": P()}
  put = lambda tree: jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)
  with jax.set_mesh(mesh):
    sharded_params, sharded_grads = put(params), put(grads)
    new_params, new_state = jax.jit(step)(sharded_params, tx.init(sharded_params), sharded_grads)
  momentum = new_state.inner_states["muon"].inner_state.mu["l1"]["kernel"]
  assert momentum.codes.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "x")), 2)
  for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):   # the momentum: element-wise
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref_params)):   # NS: sums in another order
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, error", [
    (dict(preconditioning="qr"), "unknown preconditioning 'qr'"),
    (dict(ns_coeffs="fast"), "unknown ns_coeffs preset 'fast'"),
    (dict(beta=1.5), r"beta must be in \[0, 1\)"),
    (dict(ns_steps=0), "ns_steps must be"),
    (dict(ns_coeffs="dion", ns_steps=3), "ns_coeffs has 5 rows, more than ns_steps=3"),
])
def test_bad_arguments_are_named(kwargs, error):
  with pytest.raises(ValueError, match=error):
    optax8.muon8bit(0.02, **kwargs)


def test_bad_inputs_get_errors_that_name_muon8bit_and_the_leaf():
  params = {"a": {"w": jnp.ones((16, 64))}, "b": jnp.ones(300)}
  grads = jax.tree.map(lambda x: x * 1e-2, params)
  tx = optax8.muon8bit(1e-3, min_8bit_size=0)
  state = tx.init(params)
  with pytest.raises(TypeError, match="muon8bit: expected the state of muon8bit's init .* got ScaleByAdam8bitState"):
    tx.update(grads, optax8.adam8bit(1e-3).init(params), params)
  with pytest.raises(ValueError, match="muon8bit: params does not have the structure of the updates"):
    tx.update({"a": grads["a"]}, state, params)
  flat = {"a": {"w": grads["a"]["w"].reshape(-1)}, "b": grads["b"]}
  for step in (tx.update, lambda g, s, p: optax8.apply_gradients(tx, g, s, p)):
    with pytest.raises(ValueError, match=r"muon8bit: leaf \['a'\]\['w'\]: params shape \(16, 64\) differs from the "
                                         r"gradient's \(1024,\)"):
      jax.jit(step)(flat, state, params)
  # an integer leaf (a step counter among the params) goes to the AdamW part, whose error named adamw8bit
  with pytest.raises(TypeError, match=r"muon8bit: leaf \['b'\] has dtype int32: only floating-point"):
    tx.init({**params, "b": jnp.zeros((), jnp.int32)})


def test_a_python_number_among_the_params_is_a_scalar_leaf():
  """As for the other optimizers (docs/inputs.md); optax.contrib.muon fails on it (x.ndim of a float)."""
  params = {"w": jnp.ones((16, 64)), "s": 0.5}
  tx = optax8.muon8bit(1e-3)
  u, _ = tx.update({"w": jnp.full((16, 64), 1e-2), "s": 0.25}, tx.init(params), params)
  assert u["s"].shape == () and u["s"] < 0


def test_a_huge_gradient_element_moves_params_no_more_than_optax_muon():
  """A finite 1e20: the 8-bit momentum holds it (5e18, finite) and Newton-Schulz, on the momentum scaled down
  by 2**-80, moves each element by about the learning rate, no blow-up; optax's Muon zeroes that leaf's updates."""
  params = {"w": jnp.ones((64, 128))}
  spike = jnp.full((64, 128), 1e-2).at[3, 5].set(1e20)
  grads = [{"w": spike}] + [{"w": jnp.full((64, 128), 1e-2)}] * 4
  moved = {}
  for name, tx in [("optax8", optax8.muon8bit(1e-3, min_8bit_size=0)), ("optax", contrib.muon(1e-3))]:
    p, s = params, tx.init(params)
    for g in grads:
      u, s = jax.jit(tx.update)(g, s, p)
      p = optax.apply_updates(p, u)
    moved[name] = float(jnp.max(jnp.abs(p["w"] - 1)))
  assert np.isfinite(moved["optax8"]) and moved["optax8"] <= 2 * moved["optax"] + 1e-3, moved
