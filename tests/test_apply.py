"""apply_gradients: the kernel writes the new parameters; temporaries of a train step."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8 import dispatch
from helpers import needs_native_cpu
from test_alias import NAMES, OPTIMIZERS


def _params(dtype=jnp.float32):
  key = jax.random.key(0)
  return {"w": (jax.random.normal(key, (64, 256)) * 0.1).astype(dtype), "b": jnp.zeros((256,), dtype),
          "v": (jax.random.normal(key, (3, 4096)) * 0.1).astype(dtype)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", NAMES)
def test_apply_gradients_equals_update_then_apply_updates(name, dtype):
  tx = OPTIMIZERS[name][0](min_8bit_size=1024)
  params = _params(dtype)
  s1 = s2 = tx.init(params)
  p1 = p2 = params
  for t in range(3):
    grads = jax.tree.map(lambda x: (jax.random.normal(jax.random.key(t), x.shape) * 0.01).astype(x.dtype), params)
    u, s1 = jax.jit(tx.update)(grads, s1, p1)
    p1 = optax.apply_updates(p1, u)
    p2, s2 = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, s2, p2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      assert a.dtype == b.dtype
      # the kernel rounds p + u once; apply_updates rounds u, then p + u
      tol = 0 if dtype == jnp.float32 else 2.0**-7
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 1e-3)
    p2 = p1   # continue from the same point
    s2 = s1


def test_apply_gradients_falls_back_for_other_transformations():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax8.adamw8bit(1e-3))
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  p, _ = optax8.apply_gradients(tx, grads, state, params)
  u, _ = tx.update(grads, state, params)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(optax.apply_updates(params, u))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _fused_steps(tx, steps=3):
  """(params, state) after ``steps`` of tx.update + apply_updates and of optax8.apply_gradients, jitted."""
  params = _params()
  out = []
  for apply in (False, True):
    p, s = params, tx.init(params)
    for t in range(steps):
      grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape) * 0.01, params)
      if apply:
        p, s = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, s, p)
      else:
        u, s = jax.jit(tx.update)(grads, s, p)
        p = optax.apply_updates(p, u)
    out.append((p, s))
  return out


def test_the_fused_apply_survives_rebuilding_the_transformation():
  tx = optax8.adamw8bit(1e-3, min_8bit_size=1024)
  assert isinstance(tx, optax8.FusedGradientTransformation) and optax8.fused_apply(tx) is not None
  for rebuilt in (optax.GradientTransformationExtraArgs(tx.init, tx.update), tx._replace(init=tx.init),
                  optax.with_extra_args_support(tx)):
    assert optax8.fused_apply(rebuilt) is optax8.fused_apply(tx)
  assert optax8.fused_apply(optax.adamw(1e-3)) is None
  assert list(inspect.signature(tx.update).parameters)[:3] == ["updates", "state", "params"]


@pytest.mark.parametrize("make, exact", [
    (lambda: optax8.chain(optax.clip_by_global_norm(1e-3), optax8.adamw8bit(1e-3, min_8bit_size=1024)), True),
    (lambda: optax8.offload(optax8.chain(optax.scale(0.5), optax8.lion8bit(1e-3, min_8bit_size=1024))), True),
    (lambda: optax8.rmsprop8bit(1e-3, momentum=0.9, min_8bit_size=1024), True),
    (lambda: optax8.partition({"8bit": optax8.adamw8bit(1e-3, min_8bit_size=1024), "sgd": optax.sgd(1e-2, 0.9)},
                              {"w": "8bit", "b": "sgd", "v": "8bit"}), False),
    (lambda: optax8.inject_hyperparams(optax8.adamw8bit, static_args=("min_8bit_size",))(
        learning_rate=optax.linear_schedule(1e-3, 1e-4, 3), min_8bit_size=1024), True),
    (lambda: optax8.inject_hyperparams(lambda learning_rate: optax8.chain(
        optax.clip(1e-3), optax8.lion8bit(learning_rate, min_8bit_size=1024)))(learning_rate=1e-3), True),
], ids=["chain", "offload-chain", "rmsprop-momentum", "partition", "inject", "inject-chain"])
def test_chains_keep_the_fused_apply_with_the_same_results(make, exact, monkeypatch):
  """Where pure-JAX code adds the update (optax.sgd), XLA may contract p + lr * m into one
  multiply-add in one program and not in the other: equal to float32 rounding there."""
  tx = make()
  assert optax8.fused_apply(tx) is not None
  calls = []
  real_step_group = dispatch.step_group
  monkeypatch.setattr(dispatch, "step_group", lambda *a, **k: calls.append(a[4]) or real_step_group(*a, **k))
  (p1, s1), (p2, s2) = _fused_steps(tx)
  assert True in calls   # the kernels wrote the parameters
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    if exact or a.dtype == jnp.uint8:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  assert jax.tree.structure(optax8.chain(optax.identity(), optax8.adam8bit(1e-3)).init(_params())) == \
      jax.tree.structure(optax.chain(optax.identity(), optax8.adam8bit(1e-3)).init(_params()))


def test_inject_hyperparams_is_optax_with_the_fused_apply():
  """Same state as optax.inject_hyperparams; a changed learning rate reaches the fused apply
  without retracing; update stays optax's update."""
  make = lambda inject: inject(optax8.adamw8bit, static_args=("min_8bit_size",))(learning_rate=1e-3,
                                                                                     min_8bit_size=1024)
  tx, reference = make(optax8.inject_hyperparams), make(optax.inject_hyperparams)
  params = _params()
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(reference.init(params))
  traces = []

  @jax.jit
  def step(g, s, p):
    traces.append(1)
    return optax8.apply_gradients(tx, g, s, p)

  p1, s1 = p2, s2 = params, tx.init(params)
  for t in range(3):
    if t == 2:
      s1.hyperparams["learning_rate"] = s2.hyperparams["learning_rate"] = jnp.asarray(2.5e-4, jnp.float32)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape) * 0.01, params)
    p1, s1 = step(grads, s1, p1)
    u, s2 = jax.jit(reference.update)(grads, s2, p2)
    p2 = optax.apply_updates(p2, u)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(traces) == 1 and int(s1.count) == 3


def _compiled_train_step(tx, fused_apply, layers=4):
  key = jax.random.key(0)
  params = {}
  for i in range(layers):
    params[f"w{i}"] = jax.random.normal(jax.random.fold_in(key, i), (512, 512)) * 0.05
    params[f"b{i}"] = jnp.zeros((512,))
  x = jnp.ones((8, 512))

  def mlp(params, x):
    for i in range(layers):
      x = jax.nn.relu(x @ params[f"w{i}"] + params[f"b{i}"])
    return jnp.mean(x**2)

  def step(params, state, x):
    grads = jax.grad(mlp)(params, x)
    if fused_apply:
      return optax8.apply_gradients(tx, grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x).compile()
  return compiled, sum(p.size for p in jax.tree.leaves(params))


def _temp_bytes(tx, fused_apply):
  compiled, n = _compiled_train_step(tx, fused_apply)
  return compiled.memory_analysis().temp_size_in_bytes / n


@needs_native_cpu
def test_train_step_temporaries_close_to_optax():
  """No parameter-sized float32 temporaries: at most 1 byte per parameter above optax.adamw."""
  ours = _temp_bytes(optax8.adamw8bit(1e-3, weight_decay=1e-2), False)
  ref = _temp_bytes(optax.adamw(1e-3, weight_decay=1e-2), False)
  assert ours - ref <= 1.0, (ours, ref)


@needs_native_cpu
def test_fused_train_step_copies_params_no_more_than_optax():
  """A step that computes its gradients reads each parameter in its backward pass: the kernels then write
  new buffers, and XLA copies each parameter at most once, as for optax.adamw (not twice)."""
  ours, n = _compiled_train_step(optax8.adamw8bit(1e-3, weight_decay=1e-2), True, layers=8)
  ref, _ = _compiled_train_step(optax.adamw(1e-3, weight_decay=1e-2), False, layers=8)
  assert ours.as_text().count(" copy(") <= ref.as_text().count(" copy(")
  temp = lambda c: c.memory_analysis().temp_size_in_bytes / n
  assert temp(ours) <= temp(ref) + 0.25, (temp(ours), temp(ref))


def test_overwritable_where_every_reader_leads_to_the_gradient():
  seen = []

  def step(p, q, r):
    g = jax.grad(lambda p, q: jnp.sum((p * q) ** 2), argnums=(0, 1))(p, q)
    later = r * 2   # a reader of r that leads to no gradient
    seen.extend(optax8.apply.overwritable([p, q, r], [g[0], g[1], g[1]]))
    return later

  jax.jit(step)(jnp.ones(3), jnp.ones(3), jnp.ones(3))
  # the gradient of p reads q, and that of q reads p: the backward pass of each reads the other
  assert seen == [False, False, True]
  seen.clear()

  def step2(p, q):
    g = jax.grad(lambda p: jnp.sum(p ** 2))(p)   # only p's own gradient reads p
    seen.extend(optax8.apply.overwritable([p, q], [g, g]))
    return g

  jax.jit(step2)(jnp.ones(3), jnp.ones(3))
  assert seen == [True, True]
  assert optax8.apply.overwritable([jnp.ones(3)], [jnp.ones(3)]) == [True]


@needs_native_cpu
def test_separate_apply_step_writes_params_in_place():
  """A (params, state, grads) step: apply_gradients needs no copies and no parameter-sized temporaries."""
  params = {f"w{i}": jnp.zeros((256, 1024)) for i in range(4)}
  tx = optax8.adamw8bit(1e-3, weight_decay=1e-2)
  step = jax.jit(lambda p, s, g: optax8.apply_gradients(tx, g, s, p), donate_argnums=(0, 1))
  compiled = step.lower(params, tx.init(params), params).compile()
  assert " copy(" not in compiled.as_text()
  n = sum(p.size for p in jax.tree.leaves(params))
  assert compiled.memory_analysis().temp_size_in_bytes < 0.01 * n


def test_inject_hyperparams_of_an_optax_optimizer_applies_its_updates():
  tx = optax8.inject_hyperparams(optax.adam)(learning_rate=1e-2)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  p, s = optax8.apply_gradients(tx, grads, state, params)
  u, s_ref = tx.update(grads, state, params)
  for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((optax.apply_updates(params, u), s_ref))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
