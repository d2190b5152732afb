"""Complex parameters: optax's convention at 32 bits, interleaved 8-bit states, convergence, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8 import complex_leaves
from optax8.optimizers import REGISTRY
from optax8.quantize import QuantizedArray

COMPLEX = sorted(n for n, o in REGISTRY.items() if o.reference is not None and n != "muon8bit")
KWARGS = {"sgd8bit": {"momentum": 0.9}}   # with state


def _complex(shape, seed):
  re, im = jax.random.normal(jax.random.key(seed), (2, *shape))
  return (re + 1j * im).astype(jnp.complex64)


def _like(x, seed):
  """A random array like ``x``: complex for a complex leaf."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return _complex(x.shape, seed)
  return jax.random.normal(jax.random.key(seed), x.shape, x.dtype)


def _params():
  return {"w": _complex((8, 64), 1), "b": _complex((64,), 2), "s": _complex((), 3), "r": jnp.ones((64,))}


def test_real_view_round_trip_and_pair_operations():
  z = _complex((3, 5), 0).at[0, 0].set(0)
  v = complex_leaves.real_view(z)
  assert v.shape == (3, 10) and v.dtype == jnp.float32
  np.testing.assert_array_equal(v[1, 2:4], [z[1, 1].real, z[1, 1].imag])
  np.testing.assert_array_equal(complex_leaves.from_real_view(v, z.shape, z.dtype), z)
  pairs = complex_leaves.PAIRS
  np.testing.assert_allclose(complex_leaves.from_real_view(pairs.sign(v), z.shape, z.dtype), jnp.sign(z), rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(pairs.square(v)[:, ::2], jnp.abs(z) ** 2, rtol=1e-6)
  np.testing.assert_array_equal(pairs.square(v)[:, ::2], pairs.square(v)[:, 1::2])
  bad = complex_leaves.real_view(z.at[2, 4].set(complex(1.0, np.nan)))
  np.testing.assert_array_equal(pairs.finite(bad)[2, 8:10], [False, False])
  assert bool(pairs.finite(bad)[2, :8].all())


@pytest.mark.parametrize("name", COMPLEX)
def test_32bit_equals_optax_on_complex_leaves(name):
  """optax's own convention (second moments of conj(g) g, Lion's z / |z|), to float32 rounding of the
  hyperparameters (optax forms 1 - b in float64)."""
  optimizer = REGISTRY[name]
  kwargs = KWARGS.get(name, {})
  tx, ref = optimizer.make(1e-2, bits=32, **kwargs), optimizer.reference(1e-2, **kwargs)
  params = _params()
  s1, s2 = tx.init(params), ref.init(params)
  for t in range(3):
    grads = jax.tree.map(lambda x: _like(x, 10 + t), params)
    u1, s1 = jax.jit(tx.update)(grads, s1, params)
    u2, s2 = ref.update(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", COMPLEX)
def test_8bit_state_of_a_complex_leaf_is_its_real_view_quantized(name):
  make = lambda **kw: REGISTRY[name].make(1e-2, **KWARGS.get(name, {}), **kw)
  tx = make(min_8bit_size=0)
  params = {"w": _complex((8, 256), 1)}
  state = tx.init(params)
  for field in REGISTRY[name].state_fields:
    q = getattr(state, field)["w"]
    assert isinstance(q, QuantizedArray) and q.codes.shape == (8, 512) and q.absmax.shape == (1, 32)   # 16 x 16 tiles of the real view
  grads = {"w": _complex((8, 256), 2)}
  u, _ = jax.jit(tx.update)(grads, state, params)
  assert u["w"].dtype == jnp.complex64 and bool(jnp.all(jnp.isfinite(u["w"])))
  ref_u, _ = make(bits=32).update(grads, make(bits=32).init(params), params)
  # the first step from zero state: quantization of the new states only, the direction is close
  np.testing.assert_allclose(u["w"], ref_u["w"], rtol=0.1, atol=2e-3)


def test_8bit_adam_converges_on_complex_least_squares():
  a = _complex((64, 32), 0) / 8
  x_true = _complex((32,), 1)
  b = a @ x_true

  def loss(x):
    return jnp.sum(jnp.abs(a @ x - b) ** 2)

  results = {}
  for label, tx in (("optax", optax.adam(3e-2)), ("8-bit", optax8.adam8bit(3e-2, min_8bit_size=0))):
    x = jnp.zeros((32,), jnp.complex64)
    state = tx.init(x)

    @jax.jit
    def step(x, state):
      grads = jnp.conj(jax.grad(loss)(x))   # JAX's gradient of a real loss is conjugated (see JAX's FAQ)
      updates, state = tx.update(grads, state, x)
      return optax.apply_updates(x, updates), state

    for _ in range(1500):
      x, state = step(x, state)
    results[label] = float(loss(x)) / float(loss(jnp.zeros_like(x)))
  assert results["optax"] < 1e-4, results
  assert results["8-bit"] < 1e-3, results


def test_fused_apply_on_complex_leaves_equals_update():
  tx = optax8.adamw8bit(1e-2, min_8bit_size=0)
  params = _params()
  grads = jax.tree.map(lambda x: _like(x, 7), params)
  state = tx.init(params)
  u, s1 = jax.jit(tx.update)(grads, state, params)
  p2, s2 = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, params)
  for a, b in zip(jax.tree.leaves((optax.apply_updates(params, u), s1)), jax.tree.leaves((p2, s2))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_complex_errors_name_the_leaf():
  with pytest.raises(TypeError, match=r"muon8bit: leaf \['w'\] is complex"):
    optax8.muon8bit(1e-2).init({"w": _complex((64, 64), 0)})
  tx = optax8.adam8bit(1e-2)
  params = {"w": jnp.ones((64, 64))}
  with pytest.raises(TypeError, match=r"adam8bit: leaf \['w'\]: gradient dtype complex64 and parameter dtype float32"):
    tx.update({"w": _complex((64, 64), 1)}, tx.init(params), params)


def test_percentile_clipping_of_a_complex_leaf_uses_its_norm():
  """Norms of complex leaves are sqrt(sum |z|^2); the clipped gradient keeps its imaginary part."""
  tx = optax8.percentile_clipping(percentile=5.0, history=4)
  g1 = {"w": _complex((16, 16), 0)}
  g2 = jax.tree.map(lambda z: 10 * z, g1)
  state = tx.init(g1)
  _, state = tx.update(g1, state)
  clipped, state = tx.update(g2, state)
  np.testing.assert_allclose(clipped["w"], g1["w"], rtol=1e-5, atol=1e-6)
  assert clipped["w"].dtype == jnp.complex64
  np.testing.assert_allclose(float(state.history["w"][0]), float(jnp.sum(jnp.abs(g1["w"]) ** 2)), rtol=1e-5)


def test_abstract_and_sharded_complex_leaves():
  """init on ShapeDtypeStructs; a row-sharded complex leaf keeps its state sharded and steps as unsharded."""
  params = {"w": _complex((128, 128), 0)}
  tx = optax8.adamw8bit(1e-2, min_8bit_size=0)
  abstract = tx.init({"w": jax.ShapeDtypeStruct((128, 128), jnp.complex64)})
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(tx.init, params))
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets them)")
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  sharded = jax.device_put(params, rows)
  grads = {"w": _complex((128, 128), 1)}
  state = tx.init(sharded)
  assert state.mu["w"].codes.sharding.is_equivalent_to(rows, 2)
  u, new = jax.jit(tx.update)(jax.device_put(grads, rows), state, sharded)
  u_ref, new_ref = jax.jit(tx.update)(grads, tx.init(params), params)
  for a, b in zip(jax.tree.leaves((u, new)), jax.tree.leaves((u_ref, new_ref))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["adamw8bit", "lamb8bit"])   # without and with a hook over the whole leaf
def test_a_complex_element_with_a_non_finite_part_gets_a_zero_update(name):
  tx = REGISTRY[name].make(1e-2, weight_decay=0.1, min_8bit_size=0)
  params = {"w": _complex((4, 64), 0)}
  grads = {"w": _complex((4, 64), 1).at[1, 3].set(complex(np.nan, 1.0))}
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert u["w"][1, 3] == 0
  assert bool(jnp.all(jnp.isfinite(u["w"]))) and int(jnp.sum(u["w"] == 0)) == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
