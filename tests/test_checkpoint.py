"""Checkpoints of 8-bit state: orbax and flax.serialization round trips, sizes on disk, mismatched optimizers."""

import gc
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import optax8

OPTIMIZERS = {
    "adamw8bit": lambda **kw: optax8.adamw8bit(1e-2, weight_decay=1e-2, **{"min_8bit_size": 1024, **kw}),
    "chain": lambda **kw: optax.chain(optax.clip_by_global_norm(1.0), optax8.lion8bit(1e-3, min_8bit_size=1024)),
    "offload": lambda **kw: optax8.offload(optax8.adamw8bit(1e-2, min_8bit_size=1024)),
    "adamw-4bit": lambda **kw: optax8.adamw8bit(1e-2, weight_decay=1e-2, bits=4, min_8bit_size=1024),
}


def _params(rows=64):
  return {"w": jax.random.normal(jax.random.key(0), (rows, 512)) * 0.1, "b": jnp.zeros((512,))}


def _trained(tx, params, steps=2):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape), params)
    _, state = update(grads, state, params)
  return state


def _save(path, state):
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
  return path


def _restore(path, target):
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path, target)


def _metadata(path):
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.metadata(path).item_metadata


def _abstract(tx, params, sharding):
  """The abstract state ``tx.init`` makes, each leaf placed by ``sharding(leaf)``."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding(a)),
                      jax.eval_shape(tx.init, params))


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)   # NamedTuples, QuantizedArray block_size and kind
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_orbax_restore_with_abstract_target_is_exact(name, tmp_path):
  tx, params = OPTIMIZERS[name](), _params()
  state = _trained(tx, params)
  path = _save(tmp_path / "state", state)
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
  device = SingleDeviceSharding(jax.devices()[0], memory_kind=kinds.pop())
  target = _abstract(tx, params, lambda _: device)
  optax8.check_state(_metadata(path), target)
  restored = _restore(path, target)
  _assert_identical(state, restored)
  assert {x.sharding for x in jax.tree.leaves(restored)} == {device}
  is_q = lambda x: isinstance(x, optax8.QuantizedArray)
  assert sum(map(is_q, jax.tree.leaves(restored, is_leaf=is_q))) == (1 if name == "chain" else 2)


def test_orbax_restore_onto_four_devices_rows_sharded(tmp_path):
  tx, params = OPTIMIZERS["adamw8bit"](), _params()
  state = _trained(tx, params)
  path = _save(tmp_path / "state", state)
  mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
  rows = lambda a: NamedSharding(mesh, P("x") if a.ndim and a.shape[0] % 4 == 0 else P())
  target = _abstract(tx, params, rows)
  restored = _restore(path, target)
  _assert_identical(state, restored)
  assert restored.mu["w"].codes.sharding.spec == restored.mu["w"].absmax.sharding.spec == P("x")
  assert restored.mu["w"].codes.addressable_shards[0].data.shape == (16, 512)
  for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert x.sharding == t.sharding
  sharded_params = jax.tree.map(lambda p: jax.device_put(p, rows(p)), params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-2), sharded_params)
  _assert_identical(jax.jit(tx.update)(grads, state, params), jax.jit(tx.update)(grads, restored, sharded_params))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets them)")
def test_a_checkpoint_moves_between_fsdp_tensor_parallel_and_one_device_bit_for_bit(tmp_path):
  """The block layout depends on the shapes only: a state trained under FSDP (rows over 8 devices) restores
  under tensor parallelism (columns over 8, shards 32 wide for the 256-wide leaf) and on one device, equal bit
  for bit, and the next step from each restored state equals the next step under FSDP."""
  tx = optax8.adamw8bit(1e-2, weight_decay=1e-2)
  params = {"w": jax.random.normal(jax.random.key(0), (128, 512)) * 0.1,
            "e": jax.random.normal(jax.random.key(1), (256, 256)) * 0.1, "b": jnp.zeros((512,))}
  mesh = jax.make_mesh((8,), ("x",))
  fsdp = lambda a: NamedSharding(mesh, P("x") if a.ndim == 2 else P())
  tp = lambda a: NamedSharding(mesh, P(None, "x") if a.ndim == 2 else P())
  one = lambda a: SingleDeviceSharding(jax.devices()[0])
  on = lambda tree, where: jax.tree.map(lambda a: jax.device_put(a, where(a)), tree)
  grads = [jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape), params) for t in range(3)]
  update = jax.jit(tx.update)
  state = tx.init(on(params, fsdp))
  for t in range(2):
    _, state = update(on(grads[t], fsdp), state, on(params, fsdp))
  assert state.mu["w"].absmax.shape == (8, 32) and state.mu["e"].absmax.shape == (16, 16)   # 16 x 16 tiles
  path = _save(tmp_path / "state", state)
  want_updates, want_state = update(on(grads[2], fsdp), state, on(params, fsdp))
  for where in (tp, one):
    # the target: the state's structure with the new placement (absmax on its parameter's mesh axes)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where(a) if a.ndim == 2
                                                         else NamedSharding(mesh, P()) if where is tp else one(a)),
                          jax.eval_shape(tx.init, params))
    restored = _restore(path, target)
    _assert_identical(state, restored)
    if where is tp:
      assert restored.mu["e"].codes.sharding.spec == P(None, "x")
      assert restored.mu["e"].codes.addressable_shards[0].data.shape == (256, 32)
    updates, new_state = update(on(grads[2], where), restored, on(params, where))
    _assert_identical((want_updates, want_state), (updates, new_state))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flax_serialization_round_trip_is_exact(name):
  tx, params = OPTIMIZERS[name](), _params()
  state = _trained(tx, params)
  target = tx.init(params)
  _assert_identical(state, serialization.from_bytes(target, serialization.to_bytes(state)))
  state_dict = serialization.to_state_dict(state)
  leaf = state_dict["mu"]["w"] if name != "chain" else state_dict["1"]["mu"]["w"]
  assert set(leaf) == {"codes", "absmax"}
  _assert_identical(state, serialization.from_state_dict(target, state_dict))
  optax8.check_state(state_dict, target)


def _directory_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_8bit_adamw_on_disk_is_at_most_0_3_of_optax_adamw(tmp_path):
  params = {"w": jax.random.normal(jax.random.key(0), (512, 1024)) * 0.1, "b": jnp.zeros((1024,))}
  sizes = {}
  for name, tx in [("optax.adamw", optax.adamw(1e-3)), ("optax8.adamw8bit", optax8.adamw8bit(1e-3))]:
    sizes[name] = _directory_bytes(_save(tmp_path / name, _trained(tx, params)))
  print(f"orbax checkpoint of the AdamW state of {512 * 1024 + 1024} parameters: {sizes} "
        f"(ratio {sizes['optax8.adamw8bit'] / sizes['optax.adamw']:.3f})")
  assert sizes["optax8.adamw8bit"] <= 0.3 * sizes["optax.adamw"], sizes


# (options of the optimizer that restores, the parameters it is built for, what the errors name)
MISMATCHES = {
    "block_size": ({"block_size": 128}, _params(), r"\['w'\].*block_size"),
    "bits": ({"bits": 32}, _params(), r"\['w'\].*(8-bit|32-bit).*bits or min_8bit_size"),
    "4 bits": ({"bits": 4}, _params(), r"\['w'\].*8-bit (codes|state) where the optimizer keeps 4-bit.*other bits"),
    "min_8bit_size": ({"min_8bit_size": 1 << 20}, _params(), r"\['w'\].*(8-bit|32-bit).*bits or min_8bit_size"),
    "shape": ({}, _params(rows=32), r"\['w'\].*(shape|gradient)"),
}


# orbax's failed restore leaves coroutines behind, reported when they are collected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", MISMATCHES)
def test_state_of_another_optimizer_is_a_clear_error(case, tmp_path):
  options, new_params = MISMATCHES[case][:2]
  leaf = MISMATCHES[case][2]
  params = _params()
  state = _trained(OPTIMIZERS["adamw8bit"](), params, steps=1)
  path = _save(tmp_path / "state", state)
  new_tx = OPTIMIZERS["adamw8bit"](**options)
  device = SingleDeviceSharding(jax.devices()[0])
  target = _abstract(new_tx, new_params, lambda _: device)
  # before restoring: the checkpoint's metadata against the new optimizer
  with pytest.raises(ValueError, match="check_state: the state does not fit the optimizer:\n.*" + leaf):
    optax8.check_state(_metadata(path), target)
  # orbax itself refuses the target (shape or tree structure), it never restores wrong numbers
  with pytest.raises(ValueError):
    _restore(path, target)
  gc.collect()   # the failed restore's pending reads, while the warning filter applies
  # a state restored with the old target and stepped by the new optimizer: update names the leaf
  grads = jax.tree.map(jnp.ones_like, new_params)
  with pytest.raises(ValueError, match="adamw8bit: leaf " + leaf):
    new_tx.update(grads, _restore(path, _abstract(OPTIMIZERS["adamw8bit"](), params, lambda _: device)), new_params)
  # flax: from_bytes refuses 8-bit leaves that do not fit, check_state the rest
  with pytest.raises(ValueError, match=r"(QuantizedArray at 'mu/w'|\['w'\]).*"):
    optax8.check_state(serialization.from_bytes(new_tx.init(new_params), serialization.to_bytes(state)),
                       new_tx.init(new_params))


def test_check_state_finds_inconsistent_quantized_arrays():
  tx, params = OPTIMIZERS["adamw8bit"](), _params()
  state = tx.init(params)
  bad = state._replace(mu={**state.mu, "w": optax8.QuantizedArray(state.mu["w"].codes, state.mu["w"].absmax, 128)})
  with pytest.raises(ValueError, match=r"\.mu\['w'\]: absmax shape \(4, 32\) does not fit the shape \(64, 512\) "
                                       r"with block_size 128 \(blocks of 8 x 16: expected \(8, 32\)\)"):
    optax8.check_state(bad, jax.eval_shape(tx.init, params))
  with pytest.raises(ValueError, match=r"\.nu\['w'\]: the state uses the signed map, the optimizer the unsigned"):
    optax8.check_state(state._replace(nu=state.mu), state)
  with pytest.raises(ValueError, match=r"\.count: dtype float32, the optimizer expects int32"):
    optax8.check_state(state._replace(count=jnp.zeros([], jnp.float32)), state)
  with pytest.raises(ValueError, match=r"\.mu\['w'\]: the state has a 32-bit array where the optimizer keeps 8-bit"):
    optax8.check_state(OPTIMIZERS["adamw8bit"](bits=32).init(params), state)


@pytest.mark.parametrize("flax_first", [False, True], ids=["optax8-first", "flax-first"])
def test_import_does_not_load_flax_and_serialization_works_in_either_order(flax_first):
  script = textwrap.dedent(f"""
      import sys
      if {flax_first}:
        from flax import serialization
      import jax.numpy as jnp
      import optax8
      assert {flax_first} or not any(m == "flax" or m.startswith("flax.") for m in sys.modules)
      from flax import serialization
      q = optax8.quantize(jnp.arange(512.0).reshape(2, 256))
      d = serialization.to_state_dict({{"q": q}})
      assert set(d["q"]) == {{"codes", "absmax"}}, d
      back = serialization.from_state_dict({{"q": q}}, d)["q"]
      assert (back.codes == q.codes).all() and back.block_size == 256
  """)
  subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def _nnx_training_state(tx):
  from flax import nnx
  model = nnx.Linear(512, 1024, rngs=nnx.Rngs(0))
  return nnx.state(nnx.Optimizer(model, tx, wrt=nnx.Param)), nnx.state(model, nnx.Param)


def _linen_training_state(tx):
  import flax.linen as nn
  from flax.training import train_state
  init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
  params = nn.Dense(1024, kernel_init=init).init(jax.random.key(0), jnp.ones((1, 512)))["params"]
  return train_state.TrainState.create(apply_fn=None, params=params, tx=tx), params


@pytest.mark.parametrize("make", [_nnx_training_state, _linen_training_state], ids=["nnx.Optimizer", "TrainState"])
def test_check_state_reads_flax_training_checkpoints(make, tmp_path):
  """orbax's metadata of nnx.state(optimizer) (a 'value' level per Variable) and of a TrainState (with linen's
  Partitioned boxes) fits the optimizer, boxed or plain params; other options are refused naming the leaf."""
  make_tx = lambda **kw: optax8.adamw8bit(1e-3, **{"min_8bit_size": 1024, **kw})
  training_state, params = make(make_tx())
  metadata = _metadata(_save(tmp_path / "ckpt", training_state))
  plain = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                       is_leaf=lambda x: hasattr(x, "unbox"))
  for target in (params, plain):
    optax8.check_state(metadata, jax.eval_shape(make_tx().init, target))
  optax8.check_state(metadata, jax.eval_shape(lambda: make(make_tx())[0]))
  kernel = r"\['kernel'\]"
  for options, problem in (({"block_size": 128}, "block_size"), ({"bits": 32}, "bits or min_8bit_size")):
    with pytest.raises(ValueError, match=f"(?s)check_state: the state does not fit the optimizer:\n.*{kernel}.*{problem}"):
      optax8.check_state(metadata, jax.eval_shape(make_tx(**options).init, params))


def test_check_state_finds_the_optimizer_in_a_checkpoint_of_model_and_optimizer():
  """A checkpoint of the model (with Dropout's RNG keys) and the optimizer together, as a dict or as
  nnx.state((model, optimizer)): check_state compares its opt_state (it compared every leaf and failed on the
  keys: "Cannot interpret 'key<fry>' as a data type")."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(512, 256, rngs=rngs)
      self.dropout = nnx.Dropout(0.1, rngs=rngs)

  make_tx = lambda **kw: optax8.adamw8bit(1e-3, **{"min_8bit_size": 1024, **kw})
  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  for tree in ({"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, nnx.state((model, optimizer))):
    optax8.check_state(tree, jax.eval_shape(make_tx().init, params))
    with pytest.raises(ValueError, match=r"\['kernel'\].*another block_size"):
      optax8.check_state(tree, jax.eval_shape(make_tx(block_size=128).init, params))
