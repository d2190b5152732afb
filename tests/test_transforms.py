"""The scale_by_* building blocks against their optax counterparts."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8

STEPS = 5
LR = 0.05


def params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"w": jax.random.normal(k[0], (64, 128)), "b": jax.random.normal(k[1], (128,)),
          "s": jnp.asarray(0.3)}


def grads(t):
  """Gradients with a persistent part and per-step noise; b[:4] is always 0."""
  base = params(seed=1)
  noise = params(seed=10 + t)
  g = jax.tree.map(lambda a, n: a + 0.7 * n, base, noise)
  return dict(g, b=g["b"].at[:4].set(0.0))


def alpha_schedule(count):
  return jnp.minimum(count, 3) * 2.0


def b3_schedule(count):
  return 0.9 + 0.09 * count / (count + 2.0)


# (id, optax8 building block, optax counterpart, kwargs of both)
BLOCKS = [
    ("adam", optax8.scale_by_adam8bit, optax.scale_by_adam, {}),
    ("adam-nesterov", optax8.scale_by_adam8bit, optax.scale_by_adam, dict(nesterov=True)),
    ("adam-eps_root", optax8.scale_by_adam8bit, optax.scale_by_adam, dict(b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8)),
    ("lion", optax8.scale_by_lion8bit, optax.scale_by_lion, {}),
    ("lion-betas", optax8.scale_by_lion8bit, optax.scale_by_lion, dict(b1=0.95, b2=0.98)),
    ("trace", optax8.trace8bit, optax.trace, dict(decay=0.9)),
    ("trace-nesterov", optax8.trace8bit, optax.trace, dict(decay=0.9, nesterov=True)),
    ("rms", optax8.scale_by_rms8bit, optax.scale_by_rms, {}),
    ("rms-eps_outside", optax8.scale_by_rms8bit, optax.scale_by_rms, dict(eps_in_sqrt=False, eps=1e-6)),
    ("rms-bias_correction", optax8.scale_by_rms8bit, optax.scale_by_rms, dict(bias_correction=True)),
    ("rms-eps_outside-bias_correction", optax8.scale_by_rms8bit, optax.scale_by_rms,
     dict(decay=0.95, eps_in_sqrt=False, bias_correction=True)),
    ("rms-initial_scale", optax8.scale_by_rms8bit, optax.scale_by_rms, dict(initial_scale=1.0)),
    ("rss", optax8.scale_by_rss8bit, optax.scale_by_rss, {}),
    ("rss-initial0", optax8.scale_by_rss8bit, optax.scale_by_rss, dict(initial_accumulator_value=0.0, eps=1e-6)),
    ("ademamix", optax8.scale_by_ademamix8bit, optax.contrib.scale_by_ademamix, {}),
    ("ademamix-small", optax8.scale_by_ademamix8bit, optax.contrib.scale_by_ademamix, dict(b3=0.99, alpha=2.0)),
    ("ademamix-schedules", optax8.scale_by_ademamix8bit, optax.contrib.scale_by_ademamix,
     dict(b3=b3_schedule, alpha=alpha_schedule)),
]
blocks = pytest.mark.parametrize("block,reference,kwargs", [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS])


@functools.cache
def jitted_update(tx):
  return jax.jit(tx.update)


def run(tx, steps=STEPS):
  """Updates and final state of ``tx`` over ``steps`` gradients at fixed params."""
  p = params()
  update = jitted_update(tx)
  state, out = tx.init(p), []
  for t in range(steps):
    u, state = update(grads(t), state, p)
    out.append(u)
  return out, state


def assert_close(ours, theirs, rtol=1e-5, atol_rel=1e-7):
  """Leafwise allclose with atol relative to the leaf's magnitude."""
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_rel * max(float(np.abs(y).max()), 1e-30))


def moment_fields(state):
  return {f: getattr(state, f) for f in state._fields if f != "count"}


@pytest.mark.parametrize("block,reference", [
    (optax8.scale_by_adam8bit, optax.scale_by_adam),
    (optax8.scale_by_lion8bit, optax.scale_by_lion),
    (optax8.trace8bit, optax.trace),
    (optax8.scale_by_rms8bit, optax.scale_by_rms),
    (optax8.scale_by_rss8bit, optax.scale_by_rss),
    (optax8.scale_by_ademamix8bit, optax.contrib.scale_by_ademamix),
], ids=lambda f: getattr(f, "__name__", ""))
def test_signature_matches_optax(block, reference):
  """optax's positional arguments and defaults, then keyword-only 8-bit options."""
  ours = inspect.signature(block).parameters
  theirs = inspect.signature(reference).parameters
  positional = lambda ps: {k: v.default for k, v in ps.items() if v.kind == v.POSITIONAL_OR_KEYWORD}
  assert positional(ours) == positional(theirs)
  keyword = {k for k, v in ours.items() if v.kind == v.KEYWORD_ONLY}
  assert {"bits", "block_size", "min_8bit_size"} <= keyword


@blocks
def test_bits32_equals_optax(block, reference, kwargs):
  us, state = run(block(**kwargs, bits=32))
  refs, ref_state = run(reference(**kwargs))
  for u, ref in zip(us, refs):
    assert_close(u, ref)
  assert int(state.count) == STEPS
  fields = moment_fields(state)
  shared = [f for f in fields if f in getattr(ref_state, "_fields", ())]
  assert shared, (state._fields, ref_state)
  for f in shared:
    assert_close(fields[f], getattr(ref_state, f))


@blocks
def test_bits8_stays_close(block, reference, kwargs):
  tx = block(**kwargs)
  state = tx.init(params())
  assert all(isinstance(field["w"], optax8.QuantizedArray) for field in moment_fields(state).values())
  assert not any(isinstance(field["b"], optax8.QuantizedArray) for field in moment_fields(state).values())
  us, _ = run(tx)
  refs, _ = run(reference(**kwargs))
  # the first update comes from the exact initial state, before quantization
  assert_close(us[0], refs[0])
  for u, ref in zip(us, refs):
    # 32-bit leaves: optax's update to float32 rounding
    assert_close({k: u[k] for k in "bs"}, {k: ref[k] for k in "bs"})
    err = np.abs(np.asarray(u["w"]) - np.asarray(ref["w"]))
    assert err.mean() < 0.02 * np.abs(np.asarray(ref["w"])).mean()
    assert np.all(np.isfinite(u["w"]))


def test_bits8_state_maps():
  state = optax8.scale_by_adam8bit().init(params())
  assert state.mu["w"].kind == optax8.SIGNED and state.nu["w"].kind == optax8.UNSIGNED
  assert state.mu["w"].codes.dtype == jnp.uint8
  assert state.mu["w"].absmax.shape == optax8.absmax_shape((64, 128), 256) == (4, 8)   # 16 x 16 tiles
  state = optax8.scale_by_ademamix8bit().init(params())
  assert [state.m1["w"].kind, state.m2["w"].kind, state.nu["w"].kind] == [optax8.SIGNED] * 2 + [optax8.UNSIGNED]


# (id, building block kwargs, fused optimizer that folds in the learning rate)
FUSED = [
    ("adam", optax8.scale_by_adam8bit, {}, functools.partial(optax8.adam8bit)),
    ("lion", optax8.scale_by_lion8bit, {}, functools.partial(optax8.lion8bit, weight_decay=0.0)),
    ("trace", optax8.trace8bit, dict(decay=0.9), functools.partial(optax8.sgd8bit, momentum=0.9)),
    ("rms", optax8.scale_by_rms8bit, {}, optax8.rmsprop8bit),
    ("rss", optax8.scale_by_rss8bit, {}, optax8.adagrad8bit),
    ("ademamix", optax8.scale_by_ademamix8bit, dict(alpha=5.0), optax8.ademamix8bit),
]
OPTAX_FULL = {"adam": optax.scale_by_adam, "lion": optax.scale_by_lion, "trace": optax.trace,
              "rms": optax.scale_by_rms, "rss": optax.scale_by_rss, "ademamix": optax.contrib.scale_by_ademamix}


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("name,block,kwargs,fused", FUSED, ids=[f[0] for f in FUSED])
def test_chain_with_scale_by_learning_rate(name, block, kwargs, fused, bits):
  chained = optax.chain(block(**kwargs, bits=bits), optax.scale_by_learning_rate(LR))
  us, state = run(chained)
  # the fused optimizer computes the same update in one kernel
  refs, fused_state = run(fused(LR, bits=bits))
  for u, ref in zip(us, refs):
    assert_close(u, ref, rtol=1e-6)
  for a, b in zip(moment_fields(state[0]).values(), moment_fields(fused_state).values()):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      if x.dtype == jnp.uint8:
        np.testing.assert_array_equal(x, y)
      else:
        np.testing.assert_allclose(x, y, rtol=1e-6)
  if bits == 32:
    refs, _ = run(optax.chain(OPTAX_FULL[name](**kwargs), optax.scale_by_learning_rate(LR)))
    for u, ref in zip(us, refs):
      assert_close(u, ref)


def test_sgd8bit_without_momentum_is_optax_sgd():
  us, state = run(optax8.sgd8bit(LR))
  refs, ref_state = run(optax.sgd(LR))
  for u, ref in zip(us, refs):
    assert_close(u, ref, rtol=0, atol_rel=0)
  assert not any(isinstance(x, optax8.QuantizedArray)
                 for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax8.QuantizedArray)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_rmsprop8bit_with_momentum_bits32_equals_optax(nesterov):
  us, _ = run(optax8.rmsprop8bit(LR, momentum=0.9, nesterov=nesterov, bits=32))
  refs, _ = run(optax.rmsprop(LR, momentum=0.9, nesterov=nesterov))
  for u, ref in zip(us, refs):
    assert_close(u, ref)


def test_rmsprop8bit_with_momentum_bits8_has_two_8bit_states():
  tx = optax8.rmsprop8bit(LR, momentum=0.9)
  state = tx.init(params())
  quantized = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax8.QuantizedArray))
               if isinstance(x, optax8.QuantizedArray)]
  assert sorted(q.kind for q in quantized) == [optax8.SIGNED, optax8.UNSIGNED]
  us, _ = run(tx)
  refs, _ = run(optax.rmsprop(LR, momentum=0.9))
  for u, ref in zip(us, refs):
    err = np.abs(np.asarray(u["w"]) - np.asarray(ref["w"]))
    assert err.mean() < 0.02 * np.abs(np.asarray(ref["w"])).mean()


def test_rmsprop8bit_centered_is_not_implemented():
  with pytest.raises(NotImplementedError, match="centered"):
    optax8.rmsprop8bit(LR, centered=True)
