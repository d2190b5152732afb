"""Per-leaf options: bits, block_size and max_unorm as pytrees or callables; stable_embedding; bad input."""

import collections
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import optax8
from optax8.options import is_stable_embedding

BYTES_8BIT = 2 * (1 + 4 / 256)   # Adam: two states of one code per element and a float32 absmax per 256
BYTES_32BIT = 8.0


def is_quantized(x):
  return isinstance(x, optax8.QuantizedArray)


def bytes_8bit(x):
  """Adam's 8-bit state bytes of one leaf: codes and absmax of two states."""
  return 2 * (x.size + 4 * np.prod(optax8.absmax_shape(x.shape, 256)))


def adam_bytes_per_parameter(tx, params):
  """Bytes of Adam's mu and nu per parameter, for each top-level key of ``params``."""
  state = jax.eval_shape(tx.init, params)
  out = {}
  for key, p in params.items():
    leaves = jax.tree.leaves((state.mu[key], state.nu[key]))
    out[key] = sum(x.size * x.dtype.itemsize for x in leaves) / sum(x.size for x in jax.tree.leaves(p))
  return out


def model():
  """A small model's params: an embedding table, two blocks and a bias."""
  return {"embed": jnp.zeros((512, 32)),
          "blocks": [{"w": jnp.zeros((64, 128)), "b": jnp.zeros((128,))} for _ in range(2)],
          "head": jnp.zeros((32, 256))}


def assert_bytes(got, expected):
  assert got.keys() == expected.keys()
  for key in got:
    assert got[key] == pytest.approx(expected[key], abs=1e-3), (key, got)


# ---- bits ---------------------------------------------------------------------


def test_bits_pytree_prefix_sets_each_subtree():
  params = model()
  tx = optax8.adamw8bit(1e-3, bits={"embed": 32, "blocks": 8, "head": 32}, min_8bit_size=0)
  blocks = jax.tree.leaves(params["blocks"])
  assert_bytes(adam_bytes_per_parameter(tx, params),
               {"embed": BYTES_32BIT, "blocks": sum(map(bytes_8bit, blocks)) / sum(x.size for x in blocks),
                "head": BYTES_32BIT})
  state = tx.init(params)
  assert all(is_quantized(x) for x in jax.tree.leaves(state.mu["blocks"], is_leaf=is_quantized))


def test_bits_pytree_reaches_into_lists_and_none_means_default():
  params = model()
  bits = {"embed": None, "blocks": [32, {"w": 8, "b": 32}], "head": 8}
  state = optax8.adam8bit(1e-3, bits=bits, min_8bit_size=0).init(params)
  assert is_quantized(state.mu["embed"]) and is_quantized(state.mu["head"])
  assert not any(is_quantized(x) for x in jax.tree.leaves(state.mu["blocks"][0], is_leaf=is_quantized))
  assert is_quantized(state.mu["blocks"][1]["w"]) and not is_quantized(state.mu["blocks"][1]["b"])


def test_bits_callable_of_params():
  params = model()
  rule = lambda path, x: 32 if x.shape[0] >= 512 or x.ndim == 1 else 8   # embeddings and biases: 32-bit
  tx = optax8.adamw8bit(1e-3, bits=lambda p: jax.tree_util.tree_map_with_path(rule, p), min_8bit_size=0)
  got = adam_bytes_per_parameter(tx, params)
  assert_bytes({k: got[k] for k in ("embed", "head")}, {"embed": BYTES_32BIT, "head": BYTES_8BIT})
  state = tx.init(params)
  for block in state.mu["blocks"]:
    assert is_quantized(block["w"]) and not is_quantized(block["b"])


def test_min_8bit_size_counts_elements_of_each_leaf():
  params = {"small": jnp.zeros((15, 256)), "edge": jnp.zeros((16, 256)), "large": jnp.zeros((32, 256))}
  got = adam_bytes_per_parameter(optax8.adam8bit(1e-3, min_8bit_size=16 * 256), params)
  assert_bytes(got, {"small": BYTES_32BIT, "edge": BYTES_8BIT, "large": BYTES_8BIT})
  got = adam_bytes_per_parameter(optax8.adam8bit(1e-3, bits={"small": 8, "edge": 32, "large": 8},
                                                 min_8bit_size=16 * 256), params)
  assert_bytes(got, {"small": BYTES_32BIT, "edge": BYTES_32BIT, "large": BYTES_8BIT})


def test_min_8bit_size_uses_the_global_shape_of_sharded_params():
  mesh = jax.make_mesh((8,), ("d",))
  x = jax.device_put(jnp.zeros((128, 64)), NamedSharding(mesh, PartitionSpec("d")))  # 1024 elements per device
  state = optax8.adam8bit(1e-3, min_8bit_size=4096).init({"w": x})
  assert is_quantized(state.mu["w"]) and state.mu["w"].codes.shape == (128, 64)


def test_stable_embedding_keeps_32bit_state_whatever_the_default_bits():
  params = {"stable_embedding": jnp.zeros((64, 256)), "w": jnp.zeros((32, 256)),
            "tok": {"stable_embedding": {"embedding": jnp.zeros((256, 32))}}}
  expected = {"stable_embedding": BYTES_32BIT, "w": BYTES_8BIT, "tok": BYTES_32BIT}
  for bits in (None, 8):
    for name in ("adam8bit", "adamw8bit"):
      assert_bytes(adam_bytes_per_parameter(getattr(optax8, name)(1e-3, bits=bits), params), expected)
  for name in ("lion8bit", "lamb8bit", "ademamix8bit"):   # every optimizer: all its states
    state = getattr(optax8, name)(1e-3).init(params)
    fields = [getattr(state, f) for f in state._fields if f != "count"]
    for field in fields:
      assert is_quantized(field["w"])
      assert not is_quantized(field["stable_embedding"]) and not is_quantized(field["tok"]["stable_embedding"]
                                                                             ["embedding"])


def test_explicit_bits_pytree_or_callable_override_stable_embedding():
  params = {"stable_embedding": jnp.zeros((64, 256)), "w": jnp.zeros((32, 256))}
  for bits in ({"stable_embedding": 8, "w": 8}, lambda p: jax.tree.map(lambda _: 8, p)):
    assert_bytes(adam_bytes_per_parameter(optax8.adam8bit(1e-3, bits=bits), params),
                 {"stable_embedding": BYTES_8BIT, "w": BYTES_8BIT})
  # None in a pytree is the default, which includes the rule
  assert_bytes(adam_bytes_per_parameter(optax8.adam8bit(1e-3, bits={"stable_embedding": None, "w": 8}), params),
               {"stable_embedding": BYTES_32BIT, "w": BYTES_8BIT})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Embed:
  stable_embedding: jax.Array


def test_stable_embedding_matches_any_key_kind_anywhere_in_the_path():
  K = jax.tree_util
  assert is_stable_embedding((K.DictKey("stable_embedding"),))
  assert is_stable_embedding((K.DictKey("enc"), K.GetAttrKey("stable_embedding"), K.GetAttrKey("value")))
  assert is_stable_embedding((K.SequenceKey(0), K.DictKey("stable_embedding"), K.FlattenedIndexKey(0)))
  assert is_stable_embedding((types.SimpleNamespace(name="stable_embedding"),))   # any key with that name
  assert not is_stable_embedding((K.DictKey("stable_embedding_proj"), K.SequenceKey(0)))
  assert not is_stable_embedding(())
  state = optax8.adam8bit(1e-3).init({"enc": Embed(jnp.zeros((512, 32))), "w": jnp.zeros((64, 128))})
  assert not is_quantized(state.mu["enc"].stable_embedding) and is_quantized(state.mu["w"])


def test_dict_prefix_matches_another_mapping_by_key_path():
  params = collections.OrderedDict(embed=jnp.zeros((512, 32)), w=jnp.zeros((64, 128)))
  state = optax8.adam8bit(1e-3, bits={"embed": 32, "w": 8}).init(params)
  assert not is_quantized(state.mu["embed"]) and is_quantized(state.mu["w"])


def test_bits_inside_optax_masked():
  """Masked-out leaves arrive as MaskedNode: a prefix for the full params still fits."""
  params = {"embed": jnp.zeros((512, 32)), "w": jnp.zeros((64, 128))}
  tx = optax.masked(optax8.adam8bit(1e-3, bits={"embed": 32, "w": 32}), {"embed": False, "w": True})
  inner = tx.init(params).inner_state
  assert isinstance(inner.mu["embed"], optax.MaskedNode) and not is_quantized(inner.mu["w"])


@pytest.mark.parametrize("wrap", ["masked", "partition", "optax8.partition"])
def test_per_leaf_options_for_the_full_params_inside_a_prefix_mask(wrap):
  """A mask or labels that are a prefix of the params (``{"enc": True, "dec": False}``) replace a whole
  subtree by one MaskedNode; a per-leaf pytree for the full params still fits (it failed: "its entry
  ['dec']['b'] is not in the params"), and the leaves that are there get their own values."""
  params = {"enc": {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}, "dec": {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}}
  inner = optax8.adamw8bit(1e-3, bits={"enc": {"w": 8, "b": 32}, "dec": {"w": 4, "b": 32}}, min_8bit_size=0,
                           rounding={"enc": "stochastic", "dec": {"w": "nearest", "b": "nearest"}})
  tx = {"masked": lambda: optax.masked(inner, {"enc": True, "dec": False}),
        "partition": lambda: optax.partition({"a": inner, "b": optax.set_to_zero()}, {"enc": "a", "dec": "b"}),
        "optax8.partition": lambda: optax8.partition({"a": inner, "b": optax.set_to_zero()},
                                                     {"enc": "a", "dec": "b"})}[wrap]()
  state = tx.init(params)
  mu = optax.tree_utils.tree_get(state, "mu")
  assert is_quantized(mu["enc"]["w"]) and mu["enc"]["w"].bits == 8 and not is_quantized(mu["enc"]["b"])
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  assert np.all(np.asarray(updates["enc"]["w"]) < 0)


# ---- block_size -----------------------------------------------------------------


def test_block_size_per_leaf():
  params = {"a": jnp.zeros((8, 1024)), "b": jnp.zeros((8, 1024))}
  tx = optax8.adam8bit(1e-3, block_size={"a": 64, "b": None}, min_8bit_size=0)
  state = tx.init(params)
  assert state.mu["a"].block_size == 64 and state.mu["a"].absmax.shape == (1, 128)   # 8 x 8 tiles
  assert state.mu["b"].block_size == 256 and state.mu["b"].absmax.shape == (1, 64)   # 16 x 16 tiles (8 rows)
  grads = jax.tree.map(lambda x: x + 0.1, params)
  u, _ = jax.jit(tx.update)(grads, state, params)
  ref, _ = optax8.adam8bit(1e-3, bits=32).update(grads, optax8.adam8bit(1e-3, bits=32).init(params), params)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(ref)):   # the first step is exact in either width
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
  with pytest.raises(ValueError, match=r"\['a'\].*block_size 64.*block_size 128"):
    optax8.adam8bit(1e-3, block_size={"a": 128, "b": None}, min_8bit_size=0).update(grads, state, params)


# ---- max_unorm --------------------------------------------------------------------


def unorm_params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w": jax.random.normal(k[0], (64, 128)) * 0.02, "b": jax.random.normal(k[1], (128,)) * 0.01}


def unorm_grads(t):
  k = jax.random.split(jax.random.key(10 + t), 2)
  return {"w": jax.random.normal(k[0], (64, 128)), "b": jax.random.normal(k[1], (128,))}


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("name,lr,kwargs,decay", [
    ("adam8bit", 1e-3, {}, 0.0),
    ("adamw8bit", 1e-3, dict(weight_decay=0.1), 0.1),   # decoupled decay: not part of the measured update
    ("sgd8bit", 1e-2, dict(momentum=0.9, weight_decay=0.1), 0.0),   # coupled decay: in the direction
], ids=["adam", "adamw", "sgd-coupled"])
def test_max_unorm_scales_the_update_before_lr_down_to_max_unorm_times_param_norm(bits, name, lr, kwargs, decay):
  """u = -lr (d min(1, m ||p|| / ||d||) + wd p), with d the direction of the same run without max_unorm."""
  make = lambda **k: getattr(optax8, name)(lr, bits=bits, min_8bit_size=0, **kwargs, **k)
  max_unorm = {"w": 0.05, "b": 0}    # per leaf: the bias is not limited
  tx, plain = make(max_unorm=max_unorm), make()
  params = unorm_params()
  state, plain_state = tx.init(params), plain.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(plain_state)
  assert is_quantized(state.mu["w"] if hasattr(state, "mu") else state.trace["w"]) == (bits == 8)
  update, plain_update = jax.jit(tx.update), jax.jit(plain.update)
  limited = 0
  for t in range(4):
    g = unorm_grads(t)
    u, state = update(g, state, params)
    ref, plain_state = plain_update(g, plain_state, params)
    d = {k: -np.asarray(ref[k], np.float64) / lr - decay * np.asarray(params[k], np.float64) for k in ref}
    limit = 0.05 * np.linalg.norm(np.asarray(params["w"], np.float64))
    factor = min(1.0, limit / np.linalg.norm(d["w"]))
    limited += factor < 1
    expected_w = -lr * (d["w"] * factor + decay * np.asarray(params["w"]))
    np.testing.assert_allclose(np.asarray(u["w"]), expected_w, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(u["b"]), np.asarray(ref["b"]), rtol=1e-6, atol=1e-10)
    assert np.linalg.norm(d["w"] * factor) <= limit * (1 + 1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state)):   # states do not see max_unorm
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0 if a.dtype == jnp.uint8 else 1e-7)
  assert limited == 4


@pytest.mark.parametrize("bits", [8, 32])
def test_max_unorm_never_scales_up(bits):
  params, g = unorm_params(), unorm_grads(0)
  big = optax8.adam8bit(1e-3, bits=bits, min_8bit_size=0, max_unorm=1e6)
  plain = optax8.adam8bit(1e-3, bits=bits, min_8bit_size=0)
  u, _ = big.update(g, big.init(params), params)
  ref, _ = plain.update(g, plain.init(params), params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# ---- optax.inject_hyperparams ------------------------------------------------------


def test_inject_hyperparams_passes_pytrees_through_and_callables_as_static_args():
  params = {"embed": jnp.zeros((512, 32)), "w": jnp.zeros((64, 128))}
  grads = jax.tree.map(lambda x: x + 0.01, params)
  bits = {"embed": 32, "w": 8}
  for tx in (optax.inject_hyperparams(optax8.adamw8bit)(learning_rate=1e-3, bits=bits),
             optax.inject_hyperparams(optax8.adamw8bit, static_args=("bits",))(learning_rate=1e-3,
                                                                               bits=lambda p: bits)):
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    assert not is_quantized(state.inner_state.mu["embed"]) and is_quantized(state.inner_state.mu["w"])


def test_inject_hyperparams_max_unorm_is_a_hyperparameter():
  params, gs = unorm_params(), [unorm_grads(t) for t in range(2)]
  tx = optax.inject_hyperparams(optax8.adam8bit)(learning_rate=1e-3, min_8bit_size=0, max_unorm=0.05)
  ref = optax8.adam8bit(1e-3, min_8bit_size=0, max_unorm=0.05)
  state, ref_state = tx.init(params), ref.init(params)
  assert "max_unorm" in state.hyperparams
  for g in gs:
    u, state = jax.jit(tx.update)(g, state, params)
    r, ref_state = jax.jit(ref.update)(g, ref_state, params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-10)


# ---- bad input -------------------------------------------------------------------


BAD = [
    (dict(bits=16), ValueError, r"adamw8bit: bits must be 4, 8 or 32, got 16"),
    (dict(bits={"embed": 2, "w": 8}), ValueError, r"bits of leaf \['embed'\] must be 4, 8 or 32, got 2"),
    (dict(bits={"embed": 32}), ValueError, r"bits does not match .* no value for leaf \['w'\]"),
    (dict(bits={"embed": 32, "w": 8, "x": 8}), ValueError, r"bits does not match .* entry \['x'\] is not in"),
    (dict(bits={"embed": {"table": 32}, "w": 8}), ValueError, r"entry \['embed'\]\['table'\] is not in"),
    (dict(bits=lambda p: [32, 8]), ValueError, r"result of bits\(params\) does not match .* entry \[0\]"),
    (dict(bits={"embed": 8.5, "w": 8}), TypeError, r"adamw8bit: bits of leaf \['embed'\] must be an int"),
    (dict(block_size={"embed": 100, "w": None}), ValueError, r"block_size of leaf \['embed'\].*power of two"),
    (dict(max_unorm={"embed": -1.0, "w": 0}), ValueError, r"max_unorm of leaf \['embed'\] must be a finite number >= 0"),
    (dict(max_unorm={"embed": "0.1", "w": 0}), TypeError, r"max_unorm of leaf \['embed'\] must be a number, got str"),
    (dict(percentile_clipping={"embed": 5, "w": 101}), ValueError,
     r"percentile_clipping of leaf \['w'\] must be in \[0, 100\]"),
    (dict(min_8bit_size=-1), ValueError, r"adamw8bit: min_8bit_size must be an int >= 0, got -1"),
    (dict(min_8bit_size={"embed": 0, "w": 4096}), TypeError,
     r"adamw8bit: min_8bit_size is one int for the whole optimizer, got a dict; .* bits .* optax.partition"),
]


def _bad_id(kwargs) -> str:
  return ",".join(f"{k}={'callable' if callable(v) else v}" for k, v in kwargs.items())


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[_bad_id(k) for k, _, _ in BAD])
def test_bad_options_are_reported_at_build_or_init_with_the_leaf(kwargs, error, match):
  """One value is checked where the optimizer is built, a pytree or callable per leaf at init."""
  with pytest.raises(error, match=match):
    optax8.adamw8bit(1e-3, **kwargs).init({"embed": jnp.zeros((512, 32)), "w": jnp.zeros((64, 128))})


def test_non_float_params_are_reported_at_init():
  with pytest.raises(TypeError, match=r"\['step'\] has dtype int32"):
    optax8.adam8bit(1e-3).init({"w": jnp.zeros((4, 4)), "step": jnp.zeros((), jnp.int32)})


def test_a_state_made_without_percentile_clipping_is_named_as_such():
  params = {"w": jnp.zeros((64, 128))}
  for name in ("adamw8bit", "lion8bit"):
    state = getattr(optax8, name)(1e-3).init(params)
    tx = getattr(optax8, name)(1e-3, percentile_clipping=95)
    for step in (tx.update, lambda g, s, p: optax8.apply_gradients(tx, g, s, p)):
      with pytest.raises(TypeError, match=rf"{name}: expected the state of its init, percentile clipping's state "
                                          rf".*percentile_clipping=95.* was it made by {name} without"):
        step(params, state, params)
