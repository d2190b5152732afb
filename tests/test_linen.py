import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import optax8
from optax8.linen import StableEmbed
from optax8.quantize import QuantizedArray
from helpers import state_bytes

V, F = 64, 256           # table of 16384 elements: above min_8bit_size, whole blocks of 256
PER_STATE_8BIT = 1 + 4 / 256


def _tokens(shape=(3, 5), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def _reference(table, scale, bias, tokens, eps=1e-6):
  e = np.asarray(table, np.float64)[np.asarray(tokens)]
  y = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + eps)
  return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def test_optax8_imports_its_flax_submodules_on_first_use():
  code = ("import sys, optax8; assert 'optax8.linen' not in sys.modules and 'optax8.nnx' not in sys.modules; "
          "assert optax8.linen.StableEmbed and optax8.nnx.StableEmbed and 'flax.nnx' in sys.modules; "
          "import optax8.linen, optax8.nnx")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  with pytest.raises(AttributeError, match="no attribute 'lineen'"):
    optax8.lineen  # noqa: B018


def test_params_and_output_shapes_and_dtypes():
  layer = StableEmbed(V, F, dtype=jnp.bfloat16)
  tokens = _tokens()
  variables = layer.init(jax.random.key(0), tokens)
  params = variables["params"]
  assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
      "stable_embedding": ((V, F), jnp.float32), "scale": ((F,), jnp.float32), "bias": ((F,), jnp.float32)}
  y = layer.apply(variables, tokens)
  assert y.shape == (3, 5, F) and y.dtype == jnp.bfloat16
  assert layer.apply(variables, jnp.int32(7)).shape == (F,)
  with pytest.raises(ValueError, match="integer dtype"):
    layer.apply(variables, tokens.astype(jnp.float32))


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_is_computed_in_float32(param_dtype):
  layer = StableEmbed(V, F, dtype=jnp.bfloat16, param_dtype=param_dtype)
  tokens = _tokens()
  params = layer.init(jax.random.key(0), tokens)["params"]
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  # Rows with a large common offset: a LayerNorm in bfloat16 would lose the small deviations.
  params = {"stable_embedding": (100.0 + jax.random.normal(k1, (V, F))).astype(param_dtype),
            "scale": (1 + 0.1 * jax.random.normal(k2, (F,))).astype(param_dtype),
            "bias": (0.1 * jax.random.normal(k3, (F,))).astype(param_dtype)}
  y = layer.apply({"params": params}, tokens)
  want = _reference(params["stable_embedding"].astype(jnp.float32), params["scale"].astype(jnp.float32),
                    params["bias"].astype(jnp.float32), tokens)
  assert y.dtype == jnp.bfloat16
  # within one bfloat16 ulp of the float32 result (deviations of 1 on top of 100 do not survive bfloat16 math)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=2**-7, atol=1e-6)
  y32 = StableEmbed(V, F, param_dtype=param_dtype, dtype=jnp.float32).apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(y32), want, rtol=1e-4, atol=1e-4)


def test_epsilon_and_float32_default_dtype():
  layer = StableEmbed(V, F, epsilon=1.0)
  tokens = _tokens()
  params = layer.init(jax.random.key(0), tokens)["params"]
  y = layer.apply({"params": params}, tokens)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), _reference(params["stable_embedding"], params["scale"], params["bias"],
                                                       tokens, eps=1.0), rtol=1e-5, atol=1e-6)


def test_xavier_uniform_init():
  n, f = 1000, 64
  table = StableEmbed(n, f).init(jax.random.key(3), _tokens())["params"]["stable_embedding"]
  bound = np.sqrt(6 / (n + f))
  a = np.asarray(table)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
  assert abs(a.mean()) < 0.01 * bound and abs(a.var() / (bound**2 / 3) - 1) < 0.02


def test_custom_initializers():
  params = StableEmbed(V, F, embedding_init=jax.nn.initializers.zeros, scale_init=jax.nn.initializers.zeros,
                       bias_init=jax.nn.initializers.ones).init(jax.random.key(0), _tokens())["params"]
  assert not params["stable_embedding"].any() and not params["scale"].any() and params["bias"].all()


def test_attend_ties_the_output_layer_to_the_table():
  layer = StableEmbed(V, F)
  tokens = _tokens()
  variables = layer.init(jax.random.key(0), tokens)
  x = layer.apply(variables, tokens)
  logits = layer.apply(variables, x, method=StableEmbed.attend)
  assert logits.shape == (3, 5, V)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(x) @ np.asarray(variables["params"]["stable_embedding"]).T,
                             rtol=1e-4, atol=1e-4)
  logits16 = StableEmbed(V, F, dtype=jnp.bfloat16).apply(variables, x, method=StableEmbed.attend)
  assert logits16.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="features"):
    layer.apply(variables, x[..., :-1], method=StableEmbed.attend)


def test_gradients_reach_the_used_rows_scale_and_bias():
  layer = StableEmbed(V, F, dtype=jnp.bfloat16)
  tokens = jnp.array([[1, 2, 2], [5, 1, 9]])
  variables = layer.init(jax.random.key(0), tokens)
  target = jax.random.normal(jax.random.key(4), (2, 3, F))

  def loss(params):
    return jnp.sum((layer.apply({"params": params}, tokens).astype(jnp.float32) - target) ** 2)

  grads = jax.grad(loss)(variables["params"])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  row_norms = np.linalg.norm(np.asarray(grads["stable_embedding"]), axis=-1)
  used = np.zeros(V, bool)
  used[[1, 2, 5, 9]] = True
  assert (row_norms[used] > 0).all() and (row_norms[~used] == 0).all()
  assert np.abs(np.asarray(grads["scale"])).sum() > 0 and np.abs(np.asarray(grads["bias"])).sum() > 0


class _Model(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = StableEmbed(V, F, name="embed")(tokens)
    x = nn.relu(nn.Dense(F, name="hidden")(x))
    return nn.Dense(V, name="head")(x)


def _params():
  return _Model().init(jax.random.key(0), _tokens())["params"]


OPTIMIZERS = {  # name: (factory, number of states per parameter)
    "adam8bit": (lambda **kw: optax8.adam8bit(1e-3, **kw), 2),
    "adamw8bit": (lambda **kw: optax8.adamw8bit(1e-3, **kw), 2),
    "lion8bit": (lambda **kw: optax8.lion8bit(1e-3, **kw), 1),
    "sgd8bit": (lambda **kw: optax8.sgd8bit(1e-3, momentum=0.9, **kw), 1),
    "rmsprop8bit": (lambda **kw: optax8.rmsprop8bit(1e-3, **kw), 1),
    "adagrad8bit": (lambda **kw: optax8.adagrad8bit(1e-3, **kw), 1),
    "lamb8bit": (lambda **kw: optax8.lamb8bit(1e-3, **kw), 2),
    "lars8bit": (lambda **kw: optax8.lars8bit(1e-3, **kw), 1),
    "ademamix8bit": (lambda **kw: optax8.ademamix8bit(1e-3, **kw), 3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_table_gets_32bit_state_in_every_optimizer(name):
  make, n_states = OPTIMIZERS[name]
  params = _params()
  for kw in ({}, {"bits": 8}):   # a single bits value does not override the table's 32 bits
    state = make(**kw).init(params)
    assert state_bytes(state, "stable_embedding") == 4 * n_states * V * F
    assert state_bytes(state, "hidden") == pytest.approx(n_states * (PER_STATE_8BIT * F * F + 4 * F))


def test_adamw8bit_state_bytes_per_parameter():
  params = _params()
  state = optax8.adamw8bit(1e-3).init(params)
  assert state_bytes(state, "stable_embedding") / (V * F) == 8.0
  assert state_bytes(state.mu, "hidden") + state_bytes(state.nu, "hidden") == state_bytes(state, "hidden")
  kernel = state_bytes(state, "hidden") - 8 * F   # less the bias (256 elements: 32-bit)
  assert kernel / (F * F) == pytest.approx(2 * PER_STATE_8BIT) and round(kernel / (F * F), 2) == 2.03


def test_explicit_bits_win_over_the_table_default():
  params = _params()
  eight = jax.tree.map(lambda _: 8, params)
  for bits in (eight, lambda p: jax.tree.map(lambda _: 8, p)):
    state = optax8.adamw8bit(1e-3, bits=bits).init(params)
    assert state_bytes(state, "stable_embedding") / (V * F) == pytest.approx(2 * PER_STATE_8BIT)
  head32 = {"embed": 8, "hidden": 8, "head": 32}
  state = optax8.adamw8bit(1e-3, bits=head32).init(params)
  assert state_bytes(state, "stable_embedding") / (V * F) == pytest.approx(2 * PER_STATE_8BIT)
  assert state_bytes(state, "head") == 8 * (F * V + V)
  state = optax8.adamw8bit(1e-3, bits=32).init(params)
  assert state_bytes(state, "hidden") == 8 * (F * F + F)


def test_trains_a_linen_model_with_the_table_in_32_bits():
  model, tx = _Model(), optax8.adamw8bit(3e-3)
  tokens = _tokens((8, 4))
  targets = (tokens * 7 + 3) % V
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits = model.apply({"params": p}, tokens)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, state = optax8.apply_gradients(tx, grads, state, params)
    return params, state, loss

  losses = []
  for _ in range(20):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  assert not isinstance(state.mu["embed"]["stable_embedding"], QuantizedArray)
  assert isinstance(state.mu["hidden"]["kernel"], QuantizedArray)


@pytest.mark.parametrize("make_tx", [lambda: optax8.adamw8bit(3e-3, weight_decay=0.1, min_8bit_size=1024),
                                     lambda: optax.adamw(3e-3)], ids=["adamw8bit", "optax.adamw"])
def test_optax8_train_state_equals_flax_train_state(make_tx):
  """optax8.linen.TrainState: created and stepped as Flax's, bit for bit, fused where the tx allows it."""
  from flax.training import train_state
  model, params = _Model(), _params()
  tokens = _tokens((8, 4))

  @jax.jit
  def step(state):
    grads = jax.grad(lambda p: jnp.mean(state.apply_fn({"params": p}, tokens) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  states = []
  for cls in (train_state.TrainState, optax8.linen.TrainState):
    state = cls.create(apply_fn=model.apply, params=params, tx=make_tx())
    for _ in range(3):
      state = step(state)
    states.append(state)
  assert int(states[1].step) == 3 and isinstance(states[1], optax8.linen.TrainState)
  for a, b in zip(jax.tree.leaves((states[0].params, states[0].opt_state)),
                  jax.tree.leaves((states[1].params, states[1].opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
