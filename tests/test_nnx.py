import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax8
from optax8.nnx import StableEmbed
from optax8.quantize import QuantizedArray
from helpers import needs_native_cpu, state_bytes

V, F = 64, 256           # table of 16384 elements: above min_8bit_size, whole blocks of 256
PER_STATE_8BIT = 1 + 4 / 256


def _tokens(shape=(3, 5), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


class _Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = StableEmbed(V, F, rngs=rngs)
    self.hidden = nnx.Linear(F, F, rngs=rngs)
    self.head = nnx.Linear(F, V, rngs=rngs)

  def __call__(self, tokens):
    return self.head(nnx.relu(self.hidden(self.embed(tokens))))


def _update(optimizer: nnx.Optimizer, model, grads):
  """``nnx.Optimizer.update`` takes ``(model, grads)`` since flax 0.11, ``(grads)`` before."""
  if "model" in inspect.signature(optimizer.update).parameters:
    optimizer.update(model, grads)
  else:
    optimizer.update(grads)


def _opt_state(optimizer: nnx.Optimizer):
  return nnx.as_pure(optimizer.opt_state)  # the optax state, without nnx's Variable wrappers


def test_params_and_output_shapes_and_dtypes():
  layer = StableEmbed(V, F, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(layer, nnx.Param))
  assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
      "stable_embedding": ((V, F), jnp.float32), "scale": ((F,), jnp.float32), "bias": ((F,), jnp.float32)}
  y = layer(_tokens())
  assert y.shape == (3, 5, F) and y.dtype == jnp.bfloat16
  assert StableEmbed(V, F, rngs=nnx.Rngs(0))(_tokens()).dtype == jnp.float32
  with pytest.raises(ValueError, match="integer dtype"):
    layer(_tokens().astype(jnp.float32))


def test_layer_norm_is_computed_in_float32():
  layer = StableEmbed(V, F, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  table = 100.0 + jax.random.normal(k1, (V, F))   # deviations of 1 on top of 100 do not survive bfloat16 math
  scale, bias = 1 + 0.1 * jax.random.normal(k2, (F,)), 0.1 * jax.random.normal(k3, (F,))
  layer.stable_embedding[...] = table.astype(jnp.bfloat16)
  layer.scale[...] = scale.astype(jnp.bfloat16)
  layer.bias[...] = bias.astype(jnp.bfloat16)
  tokens = _tokens()
  e = np.asarray(table.astype(jnp.bfloat16).astype(jnp.float32), np.float64)[np.asarray(tokens)]
  want = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-6)
  want = want * np.asarray(layer.scale[...].astype(jnp.float32)) + np.asarray(layer.bias[...].astype(jnp.float32))
  y = layer(tokens)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=2**-7, atol=1e-6)


def test_xavier_uniform_init_and_metadata():
  n, f = 1000, 64
  layer = StableEmbed(n, f, rngs=nnx.Rngs(3), embedding_metadata={"tag": "vocab"})
  a = np.asarray(layer.stable_embedding[...])
  bound = np.sqrt(6 / (n + f))
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
  assert abs(a.mean()) < 0.01 * bound and abs(a.var() / (bound**2 / 3) - 1) < 0.02
  assert layer.stable_embedding.get_metadata()["tag"] == "vocab"
  np.testing.assert_array_equal(np.asarray(layer.scale[...]), 1)
  np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0)


def test_attend_ties_the_output_layer_to_the_table():
  layer = StableEmbed(V, F, rngs=nnx.Rngs(0))
  x = layer(_tokens())
  logits = layer.attend(x)
  assert logits.shape == (3, 5, V)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(x) @ np.asarray(layer.stable_embedding[...]).T,
                             rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_used_rows_scale_and_bias():
  layer = StableEmbed(V, F, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 2], [5, 1, 9]])
  target = jax.random.normal(jax.random.key(4), (2, 3, F))
  grads = nnx.grad(lambda m: jnp.sum((m(tokens).astype(jnp.float32) - target) ** 2))(layer)
  row_norms = np.linalg.norm(np.asarray(grads["stable_embedding"][...]), axis=-1)
  used = np.zeros(V, bool)
  used[[1, 2, 5, 9]] = True
  assert (row_norms[used] > 0).all() and (row_norms[~used] == 0).all()
  assert np.abs(np.asarray(grads["scale"][...])).sum() > 0 and np.abs(np.asarray(grads["bias"][...])).sum() > 0


@pytest.mark.parametrize("graph", [True, False])
def test_table_gets_32bit_state_through_nnx_optimizer(graph):
  model = _Model(nnx.Rngs(0))
  for bits in (None, 8):   # a single bits value does not override the table's 32 bits
    optimizer = nnx.Optimizer(model, optax8.adamw8bit(1e-3, bits=bits), wrt=nnx.Param, graph=graph)
    state = _opt_state(optimizer)
    assert state_bytes(state, "stable_embedding") / (V * F) == 8.0
    kernel = state_bytes(state, "hidden") - 8 * F   # less the bias (256 elements: 32-bit)
    assert kernel / (F * F) == pytest.approx(2 * PER_STATE_8BIT) and round(kernel / (F * F), 2) == 2.03


@pytest.mark.parametrize("cls", [nnx.Optimizer, optax8.nnx.Optimizer], ids=["nnx", "optax8.nnx"])
def test_explicit_bits_win_through_nnx_optimizer(cls):
  """A per-leaf pytree made from nnx.state(model, nnx.Param) (boxed) fits init's boxed params and update's
  plain ones (update failed: "its entry ['bias'].value is not in the params")."""
  model = _Model(nnx.Rngs(0))
  eight = jax.tree.map(lambda _: 8, nnx.state(model, nnx.Param))
  stochastic = jax.tree.map(lambda _: "stochastic", nnx.state(model, nnx.Param))
  for bits in (eight, lambda params: jax.tree.map(lambda _: 8, params)):
    optimizer = cls(model, optax8.adamw8bit(1e-3, bits=bits, rounding=stochastic), wrt=nnx.Param)
    assert state_bytes(_opt_state(optimizer), "stable_embedding") / (V * F) == pytest.approx(2 * PER_STATE_8BIT)
    params = nnx.state(model, nnx.Param)
    before = nnx.as_pure(params)
    _update(optimizer, model, jax.tree.map(lambda x: jnp.full_like(x, 1.0), params))
    assert not np.array_equal(np.asarray(nnx.as_pure(nnx.state(model, nnx.Param))["hidden"]["kernel"]),
                              np.asarray(before["hidden"]["kernel"]))


def test_a_rule_on_key_paths_matches_under_nnx_optimizer():
  """docs/per_leaf.md's by_path recipe: the callable sees the params without nnx boxes, so
  path.endswith("['kernel']") picks the Linear kernels there as in a plain dict (it saw '...['kernel'].value')."""
  model = _Model(nnx.Rngs(0))
  seen = []

  def by_path(rule):
    def per_leaf(params):
      seen.extend(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
      return jax.tree_util.tree_map_with_path(lambda p, x: rule(jax.tree_util.keystr(p), x), params)
    return per_leaf

  tx = optax8.adamw8bit(1e-3, max_unorm=by_path(lambda path, x: 0.02 if path.endswith("['kernel']") else 0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert "['hidden']['kernel']" in seen and not any(path.endswith(".value") for path in seen)
  params = nnx.state(model, nnx.Param)
  before = nnx.as_pure(params)
  _update(optimizer, model, jax.tree.map(lambda x: jnp.full_like(x, 10.0), params))
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  for layer in ("hidden", "head"):
    step = np.linalg.norm(np.asarray(after[layer]["kernel"]) - np.asarray(before[layer]["kernel"]))
    bound = 1e-3 * 0.02 * np.linalg.norm(np.asarray(before[layer]["kernel"]))
    assert step <= bound * 1.01, (layer, step, bound)
  bias_step = np.linalg.norm(np.asarray(after["hidden"]["bias"]) - np.asarray(before["hidden"]["bias"]))
  assert bias_step > 1e-3 * 0.5 * np.sqrt(F)   # not bounded: the bias moves about lr per element


def test_trains_through_nnx_optimizer():
  model = _Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax8.adamw8bit(3e-3), wrt=nnx.Param)
  tokens = _tokens((8, 4))
  targets = (tokens * 7 + 3) % V

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(tokens)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    _update(optimizer, model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < 0.5 * losses[0]
  state = _opt_state(optimizer)
  assert int(state.count) == 20
  assert not isinstance(state.mu["embed"]["stable_embedding"], QuantizedArray)
  assert isinstance(state.mu["hidden"]["kernel"], QuantizedArray)


def test_state_of_boxed_params_without_nnx_optimizer():
  """tx.init/update on an nnx.State of nnx.Param: codes and absmax each in their parameter's Param (its metadata),
  as optax's moments are; update keeps the state's structure and the updates keep the boxes."""
  model = _Model(nnx.Rngs(0))
  tx = optax8.adamw8bit(1e-3)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  q = state.mu["hidden"]["kernel"]
  assert isinstance(q, QuantizedArray) and isinstance(q.codes, nnx.Param) and isinstance(q.absmax, nnx.Param)
  assert q.codes.get_metadata() == params["hidden"]["kernel"].get_metadata()
  assert jax.tree.structure(state) == jax.tree.structure(optax8.adamw8bit(1e-3).init(params))
  grads = nnx.grad(lambda m: jnp.mean(m(_tokens()) ** 2))(model)
  updates, new_state = jax.jit(tx.update)(nnx.state(grads, nnx.Param), state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  pure, _ = jax.jit(tx.update)(nnx.as_pure(nnx.state(grads, nnx.Param)), nnx.as_pure(state), nnx.as_pure(params))
  for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(updates)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  nnx.update(model, optax.apply_updates(params, updates))
  assert int(new_state.count) == 1


def test_nnx_optimizer_state_has_the_structure_of_a_plain_params_state():
  """Through nnx.Optimizer, after steps too: the optax state of plain params, in nnx's OptState boxes."""
  model = _Model(nnx.Rngs(0))
  tx = optax8.adamw8bit(1e-3, percentile_clipping={"embed": 100, "hidden": 5, "head": 5})  # embed: no history
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  plain = tx.init(nnx.as_pure(nnx.state(model, nnx.Param)))
  assert jax.tree.structure(_opt_state(optimizer)) == jax.tree.structure(plain)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(_tokens()) ** 2))(model)
    _update(optimizer, model, grads)

  step(model, optimizer)
  step(model, optimizer)
  assert jax.tree.structure(_opt_state(optimizer)) == jax.tree.structure(plain)


def test_nnx_optimizer_with_sharded_params():
  """nnx copies a Param's sharding onto its optimizer state; optax8's state arrays are built outside those boxes
  and sharded like their parameter (rows: the last axis keeps whole quantization blocks)."""
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (("a", "b"), None))
  with jax.set_mesh(mesh):
    model = nnx.Linear(F, F, kernel_init=init, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax8.adamw8bit(1e-3, percentile_clipping=5), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      grads = nnx.grad(lambda m: jnp.mean(m(jnp.ones((4, F))) ** 2))(model)
      _update(optimizer, model, grads)

    step(model, optimizer)
  state = _opt_state(optimizer)
  assert int(state[1].count) == 1 and isinstance(state[1].mu["kernel"], QuantizedArray)
  for q in (state[1].mu["kernel"], state[1].nu["kernel"]):
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("a", "b"), None))
    assert rows.is_equivalent_to(q.codes.sharding, 2) and rows.is_equivalent_to(q.absmax.sharding, 2)
  assert state[0].history["kernel"].shape == (100,)


@pytest.mark.parametrize("make_tx", [lambda: optax8.adamw8bit(3e-3, weight_decay=0.1),
                                     lambda: optax8.chain(optax.clip_by_global_norm(1.0), optax8.lion8bit(1e-3)),
                                     lambda: optax.adamw(3e-3)],
                         ids=["adamw8bit", "chain-lion8bit", "optax.adamw"])
def test_optax8_nnx_optimizer_equals_nnx_optimizer(make_tx, monkeypatch):
  """optax8.nnx.Optimizer in Flax's loop (nnx.jit, value_and_grad, update(model, grads)): the params and state of
  nnx.Optimizer with the same tx, bit for bit; the kernels write the params where the tx has a fused apply."""
  from optax8 import dispatch
  applied = []
  real_step_group = dispatch.step_group
  monkeypatch.setattr(dispatch, "step_group", lambda *a, **k: applied.append(a[4]) or real_step_group(*a, **k))
  tokens = _tokens((8, 4))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  results = []
  for cls in (nnx.Optimizer, optax8.nnx.Optimizer):
    model = _Model(nnx.Rngs(0))
    optimizer = cls(model, make_tx(), wrt=nnx.Param)
    losses = [float(step(model, optimizer)) for _ in range(3)]
    results.append((losses, nnx.state(model, nnx.Param), _opt_state(optimizer), int(optimizer.step[...])))
  (l1, p1, s1, n1), (l2, p2, s2, n2) = results
  assert l1 == l2 and n1 == n2 == 3
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (True in applied) == (optax8.fused_apply(make_tx()) is not None)


@needs_native_cpu
def test_optax8_nnx_optimizer_step_copies_and_keeps_no_more_than_nnx_optimizer_with_optax():
  """An nnx.jit train step of a 6-layer MLP: the kernels write new buffers where the backward pass still reads a
  weight, so XLA copies the parameters as often as for nnx.Optimizer(optax.adamw), with as many temporaries."""

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(512, 512, rngs=rngs) for _ in range(6)])

    def __call__(self, x):
      for layer in self.layers:
        x = jax.nn.relu(layer(x))
      return x

  def compiled(optimizer_cls, tx):
    model = MLP(nnx.Rngs(0))
    optimizer = optimizer_cls(model, tx, wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer, x):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    return step.lower(model, optimizer, jnp.ones((8, 512))).compile()

  ours = compiled(optax8.nnx.Optimizer, optax8.adamw8bit(1e-3))
  ref = compiled(nnx.Optimizer, optax.adamw(1e-3))
  assert ours.as_text().count(" copy(") <= ref.as_text().count(" copy(")
  n = 6 * (512 * 512 + 512)
  temp = lambda c: c.memory_analysis().temp_size_in_bytes / n
  assert temp(ours) <= temp(ref) + 0.25, (temp(ours), temp(ref))
