"""The element-wise optimizers against optax's float32 ones (bitsandbytes' own test protocol)."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
import pytest

import optax8
from optax8.optimizers import REGISTRY

# The test arguments of each registered optimizer (learning rate first), given to it and to its optax namesake.
ARGS = {
    "adam8bit": (1e-3, {}),
    "adamw8bit": (1e-3, dict(weight_decay=1e-2)),
    "lion8bit": (1e-4, {}),
    "sgd8bit": (1e-2, dict(momentum=0.9)),
    "rmsprop8bit": (3e-4, {}),
    "adagrad8bit": (1e-2, {}),
    "lamb8bit": (1e-3, dict(weight_decay=1e-2)),
    "lars8bit": (1e-1, dict(weight_decay=1e-3)),
    "ademamix8bit": (1e-3, dict(weight_decay=1e-2)),
}
# Optimizers whose update is not element-wise are compared with their namesake in their own test module.
ELSEWHERE = {"muon8bit": "test_muon.py (Newton-Schulz orthogonalises whole matrices)"}
assert set(ARGS) | set(ELSEWHERE) == set(REGISTRY), "give every registered optimizer test arguments"


def _entry(name):
  """(optax8 factory of the 8-bit options, optax float32 reference, names of the state fields to compare)."""
  entry, (lr, kwargs) = REGISTRY[name], ARGS[name]
  return (lambda **k: entry.make(lr, **kwargs, **k), lambda: entry.reference(lr, **kwargs), entry.state_fields)


OPTIMIZERS = {name.removesuffix("8bit"): _entry(name) for name in ARGS}
NAMES = list(OPTIMIZERS)


def fields(state, name):
  """The leaves of every NamedTuple field called ``name`` in an optimizer state, as float32 arrays."""
  found = []

  def visit(x):
    if isinstance(x, optax8.QuantizedArray):
      return
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      for f in x._fields:
        v = getattr(x, f)
        if f == name:
          found.extend(optax8.dequantize(l) if isinstance(l, optax8.QuantizedArray) else l.astype(jnp.float32)
                       for l in jax.tree.leaves(v, is_leaf=lambda l: isinstance(l, optax8.QuantizedArray)))
        else:
          visit(v)
    elif isinstance(x, (tuple, list)):
      for v in x:
        visit(v)
    elif isinstance(x, dict):
      for v in x.values():
        visit(v)

  visit(state)
  return found


def replace_fields(state, name, values):
  """``state`` with the leaves of its fields called ``name`` replaced, in order, by ``values``."""
  values = iter(values)

  def visit(x):
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      return type(x)(*[jax.tree.map(lambda l: next(values), getattr(x, f)) if f == name
                       else visit(getattr(x, f)) for f in x._fields])
    if isinstance(x, (tuple, list)):
      return type(x)(visit(v) for v in x)
    if isinstance(x, dict):
      return {k: visit(v) for k, v in x.items()}
    return x

  return visit(state)


@jax.jit
def not_close(a, b):
  return jnp.sum(~jnp.isclose(a, b, atol=3e-3, rtol=1e-3))


@jax.jit
def param_errors(p, r):
  err = jnp.abs(p.astype(jnp.float32) - r)
  return err.mean(), (err / (jnp.abs(r) + 1e-9)).mean()


def _step_fn(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


def roundtrip(state):
  """Save and load through numpy bytes: the same pytree of the same bits."""
  leaves, treedef = jax.tree.flatten(state)
  buf = io.BytesIO()
  np.savez(buf, *[np.asarray(x) for x in leaves])
  buf.seek(0)
  loaded = np.load(buf)
  return jax.tree.unflatten(treedef, [jnp.asarray(loaded[f"arr_{i}"]) for i in range(len(leaves))])


# bnb's shapes, with 256 rows of 4097 instead of 1024: the odd width (a one-element block ending each row) is what
# that shape tests, and a quarter of the rows keeps the suite's time down
@pytest.mark.parametrize("shape", [(1024, 32), (1024, 1024), (256, 4097)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", NAMES)
def test_fifty_steps_against_float32_optax(name, dtype, shape):
  """bnb's protocol: p ~ 0.1 randn, g ~ 0.01 randn, 50 steps against the float32 optimizer.

  After each step both optimizers continue from the same point, as in bnb's
  test: the reference takes the dequantized 8-bit states, and both take the
  reference's parameters rounded to ``dtype``; so each step's error is
  measured, not the drift of two trajectories.
  """
  make, make_ref, state_names = OPTIMIZERS[name]
  tx, ref = make(), make_ref()
  key = jax.random.key(0)
  p = (jax.random.normal(key, shape, jnp.float32) * 0.1).astype(dtype)
  params, ref_params = {"w": p}, {"w": p.astype(jnp.float32)}
  state, ref_state = tx.init(params), ref.init(ref_params)
  step, ref_step = _step_fn(tx), _step_fn(ref)
  for t in range(50):
    g = jax.random.normal(jax.random.fold_in(key, t + 1), shape, jnp.float32).astype(dtype) * 0.01
    params, state = step(params, state, {"w": g})
    ref_params, ref_state = ref_step(ref_params, ref_state, {"w": g.astype(jnp.float32)})
    for field in state_names:
      ours = fields(state, field)
      for a, b in zip(ours, fields(ref_state, field), strict=True):
        count = int(not_close(a, b))
        assert count < 20, (field, t, count)
      ref_state = replace_fields(ref_state, field, ours)
    err, rel = map(float, param_errors(params["w"], ref_params["w"]))
    if dtype == jnp.bfloat16:
      assert err <= 1.7e-4 and rel <= 1.6e-3, (t, err, rel)
    else:
      assert err < 6e-5 and rel < 6e-4, (t, err, rel)
    synced = ref_params["w"].astype(dtype)
    params, ref_params = {"w": synced}, {"w": synced.astype(jnp.float32)}
    if (t + 1) % 10 == 0:
      loaded = roundtrip(state)
      assert jax.tree.structure(loaded) == jax.tree.structure(state)
      for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
      state = loaded


@pytest.mark.parametrize("name", NAMES)
def test_bits32_equals_optax(name):
  make, make_ref, _ = OPTIMIZERS[name]
  tx, ref = make(bits=32), make_ref()
  key = jax.random.key(1)
  params = {"w": jax.random.normal(key, (64, 300)) * 0.1, "b": jnp.zeros((300,)), "s": jnp.ones(())}
  state, ref_state, ref_params = tx.init(params), ref.init(params), params
  step, ref_step = _step_fn(tx), _step_fn(ref)
  for t in range(5):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, t), x.shape) * 0.01, params)
    params, state = step(params, state, grads)
    ref_params, ref_state = ref_step(ref_params, ref_state, grads)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_per_parameter(name):
  make, _, state_names = OPTIMIZERS[name]
  params = {"w": jnp.zeros((1024, 1024))}
  n = 1024 * 1024
  state = jax.eval_shape(make().init, params)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  per_state = 1 + 4 / 256
  assert abs(nbytes / n - len(state_names) * per_state) < 1e-3, nbytes / n
  state32 = jax.eval_shape(make(bits=32).init, params)
  assert abs(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state32)) / n - 4 * len(state_names)) < 1e-3


def _mlp_data(n=2048, d=32, classes=8):
  key = jax.random.key(42)
  x = jax.random.normal(key, (n, d))
  w = jax.random.normal(jax.random.fold_in(key, 1), (d, classes))
  y = jnp.argmax(x @ w + 0.5 * jax.random.normal(jax.random.fold_in(key, 2), (n, classes)), -1)
  return x, y


def _mlp_loss(params, x, y):
  h = jax.nn.gelu(x @ params["w1"] + params["b1"])
  h = jax.nn.gelu(h @ params["w2"] + params["b2"])
  logits = h @ params["w3"] + params["b3"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_small_model_trains_to_the_same_loss_with_8bit_and_32bit_adamw():
  x, y = _mlp_data()
  key = jax.random.key(3)
  ks = jax.random.split(key, 3)
  init = {"w1": jax.random.normal(ks[0], (32, 256)) / np.sqrt(32), "b1": jnp.zeros(256),
          "w2": jax.random.normal(ks[1], (256, 256)) / 16, "b2": jnp.zeros(256),
          "w3": jax.random.normal(ks[2], (256, 8)) / 16, "b3": jnp.zeros(8)}
  losses = {}
  for bits in (8, 32):
    tx = optax8.adamw8bit(3e-3, weight_decay=1e-2, bits=bits)
    state = tx.init(init)
    assert isinstance(state.mu["w2"], optax8.QuantizedArray) == (bits == 8)

    @jax.jit
    def step(params, state, xb, yb):
      loss, grads = jax.value_and_grad(_mlp_loss)(params, xb, yb)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    params = init
    for t in range(300):
      i = (t * 128) % 2048
      params, state, _ = step(params, state, x[i:i + 128], y[i:i + 128])
    losses[bits] = float(_mlp_loss(params, x, y))
  assert losses[32] < 0.5 * float(_mlp_loss(init, x, y))
  # 8 bits trains as well as 32: no worse than 2% above, and not far below (a run that trains differently)
  assert 0.95 * losses[32] <= losses[8] <= 1.02 * losses[32], losses


_MASK = {"w": True, "b": False, "e": True}


def _is_matrix(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


def _alpha_warmup(count):
  return jnp.minimum(count / 5, 1.0) * 5


@pytest.mark.parametrize("ours,theirs", [
    (lambda: optax8.adamw8bit(1e-2, weight_decay=0.1, mask=_MASK, bits=32),
     lambda: optax.adamw(1e-2, weight_decay=0.1, mask=_MASK)),
    (lambda: optax8.adamw8bit(1e-2, weight_decay=0.1, mask=_is_matrix, bits=32),
     lambda: optax.adamw(1e-2, weight_decay=0.1, mask=_is_matrix)),
    (lambda: optax8.lamb8bit(1e-2, weight_decay=0.1, mask=_MASK, bits=32),
     lambda: optax.lamb(1e-2, weight_decay=0.1, mask=_MASK)),
    (lambda: optax8.lars8bit(1e-1, weight_decay=0.1, weight_decay_mask=_MASK, trust_ratio_mask=_is_matrix, bits=32),
     lambda: optax.lars(1e-1, weight_decay=0.1, weight_decay_mask=_MASK, trust_ratio_mask=_is_matrix)),
    (lambda: optax8.lion8bit(1e-3, weight_decay=0.1, mask=_is_matrix, bits=32),
     lambda: optax.lion(1e-3, weight_decay=0.1, mask=_is_matrix)),
    (lambda: optax8.ademamix8bit(optax.linear_schedule(1e-2, 1e-3, 10), weight_decay=0.1, mask=_MASK,
                                 alpha=_alpha_warmup, bits=32),
     lambda: contrib.ademamix(optax.linear_schedule(1e-2, 1e-3, 10), weight_decay=0.1, mask=_MASK,
                              alpha=_alpha_warmup)),
], ids=["adamw-mask", "adamw-callable-mask", "lamb-mask", "lars-masks", "lion-callable-mask", "ademamix-schedules"])
def test_masks_and_schedules_match_optax(ours, theirs):
  """Weight-decay and trust-ratio masks (pytrees and callables) and schedules, as optax applies them."""
  params = {"w": jnp.ones((64, 128)) * 0.1, "b": jnp.full((128,), 0.05), "e": jnp.ones((10, 16)) * 0.2}
  a, b = ours(), theirs()
  sa, sb, pa, pb = a.init(params), b.init(params), params, params
  for t in range(6):
    g = jax.tree.map(lambda x: jnp.sin(x * (t + 1) * 7 + jnp.arange(x.size).reshape(x.shape)) * 0.01, pa)
    ua, sa = a.update(g, sa, pa)
    ub, sb = b.update(g, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):   # lr 1e-2: float32 rounding of the updates
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=5e-7)
