"""The CUDA handlers against the CPU results (needs a GPU)."""

import jax
import numpy as np
import pytest

import optax8
from optax8 import maps
from helpers import DTYPES, reference_quantize

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((1024, 4097), 256), ((3, 5000), 2048), ((7, 33), 16), ((257,), 64),
                                         ((2, 4096), 4096), ((64, 100), 1)])
def test_cuda_matches_cpu(kind, dtype, shape, block):
  assert optax8.backends()["cuda"] == "native"
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
  x.flat[::97] = np.nan
  x.flat[::89] = np.inf
  x = np.asarray(x.astype(dtype))
  gpu, cpu = jax.devices("cuda")[0], jax.devices("cpu")[0]
  q_gpu = optax8.quantize(jax.device_put(x, gpu), block, kind)
  q_cpu = optax8.quantize(jax.device_put(x, cpu), block, kind)
  np.testing.assert_array_equal(np.asarray(q_gpu.codes), np.asarray(q_cpu.codes))
  np.testing.assert_array_equal(np.asarray(q_gpu.absmax), np.asarray(q_cpu.absmax))
  ref_codes, _ = reference_quantize(np.asarray(x, np.float32), block, kind)
  np.testing.assert_array_equal(np.asarray(q_gpu.codes), ref_codes)
  for out in DTYPES:
    d_gpu = optax8.dequantize(q_gpu, out)
    d_cpu = optax8.dequantize(q_cpu, out)
    np.testing.assert_array_equal(np.asarray(d_gpu, np.float32), np.asarray(d_cpu, np.float32))


# ---- the fused optimizer step ------------------------------------------------

import jax.numpy as jnp  # noqa: E402

from optax8.kernels import algorithms, jax_step, native  # noqa: E402

ALGORITHMS = algorithms.table()
ALGOS = {a.name: a for a in ALGORITHMS}

# Hyperparameters of each algorithm (a few steps in, with weight decay), with
# learning rates small enough that atol 1e-7 bounds a rounding difference.
STEP_HYPER = {name: dict(kw) for name, kw in {
    "adam": dict(scale=-1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, inv_bias1=1 / (1 - 0.9**3),
                    inv_bias2=1 / (1 - 0.999**3), inv_bias1_next=1 / (1 - 0.9**4)),
    "lion": dict(scale=-1e-3, b1=0.9, b2=0.99, weight_decay=0.1),
    "momentum": dict(b1=0.9, pre_scale=-1e-2, nesterov=1, coupled_decay=1e-4),
    "rms": dict(scale=-1e-2, b2=0.9, eps=1e-8, coupled_decay=1e-4),
    "rss": dict(scale=-1e-1, eps_root=1e-7),
    "ademamix": dict(scale=-1e-2, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, weight_decay=0.01,
                     inv_bias1=1 / (1 - 0.9**5), inv_bias2=1 / (1 - 0.999**5)),
    "muon": dict(scale=-1e-2, b1=0.95, inv_bias1=1 / (1 - 0.95**3), inv_bias1_next=1 / (1 - 0.95**4), nesterov=1,
                 weight_decay=0.01),
}.items()}
assert set(STEP_HYPER) == set(ALGOS), "every algorithm of the table needs hyperparameters here"
# Rows of whole blocks of 128 to 4096 elements take the whole-blocks kernel, the others the general one.
STEP_CASES = [((64, 1000), 64), ((64, 1000), 256), ((64, 1000), 2048), ((3, 5, 513), 64), ((3, 5, 513), 256),
              ((3, 5, 513), 2048), ((7, 33), 16), ((5, 8200), 4096), ((10, 3), 1), ((3, 1024), 128),
              ((1000, 2048), 256), ((6, 1024), 512), ((2, 3072), 1024), ((4, 4096), 2048), ((2, 8192), 4096)]


def _cpu():
  return jax.devices("cpu")[0]


def _gpu():
  return jax.devices("cuda")[0]


def _hyper(algo, **extra):
  return np.asarray(algorithms.hyper_vector(**{**STEP_HYPER[algo.name], **extra}), np.float32)


def _step_inputs(algo, dtype, shape, block, seed=0, with_params=True):
  """Host arrays: hyper, g, p (or None) and the quantized states (codes, absmax) made on CPU."""
  rng = np.random.default_rng(seed)
  g = np.asarray((rng.standard_normal(shape) * 0.5).astype(np.float32).astype(dtype))
  p = np.asarray(rng.standard_normal(shape).astype(np.float32).astype(dtype)) if with_params else None
  states = []
  for kind in algo.states:
    x = rng.standard_normal(shape).astype(np.float32)
    x = x * 0.1 if kind == maps.SIGNED else (x * x) * 1e-2
    x.flat[:7] = 0  # a few zeros (and, for tiny blocks, all-zero blocks)
    q = optax8.quantize(jax.device_put(x, _cpu()), block, kind)
    states.append((np.asarray(q.codes), np.asarray(q.absmax)))
  return _hyper(algo), g, p, tuple(states)


def _put(tree, device):
  return jax.tree.map(lambda x: jax.device_put(x, device), tree)


def _run_native(algo, block, hyper, g, p, states, donate=False):
  """The CUDA handler on the GPU."""
  fn = lambda h, g, p, s: native.step(algo, h, g, p, s, block)
  args = _put((hyper, g, p, states), _gpu())
  out = jax.jit(fn, donate_argnums=(1, 3) if donate else ())(*args)
  return jax.tree.map(np.asarray, out)


def _run_oracle(algo, block, hyper, g, p, states):
  """The pure-JAX step on CPU."""
  fn = lambda h, g, p, s: jax_step.step(algo, h, g, p, s, block)
  return jax.tree.map(np.asarray, jax.jit(fn)(*_put((hyper, g, p, states), _cpu())))


def _run_native_cpu(algo, block, hyper, g, p, states):
  fn = lambda h, g, p, s: native.step(algo, h, g, p, s, block)
  return jax.tree.map(np.asarray, jax.jit(fn)(*_put((hyper, g, p, states), _cpu())))


def _assert_u_close(u, ref, dtype):
  assert u.dtype == ref.dtype
  # float32: a few ulps; 16-bit: one rounding of the float32 result apart.
  rtol = 1e-6 if np.dtype(dtype) == np.float32 else float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(ref, np.float32), rtol=rtol, atol=1e-7)


def _assert_states_close(states, ref):
  assert len(states) == len(ref)
  for (codes, absmax), (ref_codes, ref_absmax) in zip(states, ref):
    assert codes.dtype == np.uint8 and codes.shape == ref_codes.shape
    assert absmax.dtype == np.float32 and absmax.shape == ref_absmax.shape
    np.testing.assert_allclose(absmax, ref_absmax, rtol=1e-6, atol=1e-7)
    diff = np.abs(codes.astype(np.int32) - ref_codes.astype(np.int32))
    assert diff.max(initial=0) <= 1, f"codes differ by up to {diff.max()}"
    assert np.count_nonzero(diff) <= max(2, 1e-3 * diff.size), f"{np.count_nonzero(diff)} codes differ"


def _assert_same(out, ref):
  (u, states), (ref_u, ref_states) = out, ref
  np.testing.assert_array_equal(u.view(np.uint8), ref_u.view(np.uint8))
  for (codes, absmax), (ref_codes, ref_absmax) in zip(states, ref_states):
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(absmax.view(np.uint32), ref_absmax.view(np.uint32))


@pytest.mark.parametrize("shape,block", STEP_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_cuda_step_matches_oracle(algo, dtype, shape, block):
  assert native.available("cuda")
  inputs = _step_inputs(algo, dtype, shape, block, seed=int(algo))
  u, states = _run_native(algo, block, *inputs)
  ref_u, ref_states = _run_oracle(algo, block, *inputs)
  assert u.shape == shape
  _assert_u_close(u, ref_u, dtype)
  _assert_states_close(states, ref_states)
  if native.available("cpu"):  # the CPU handler does the same float32 operations: bit-identical
    _assert_same((u, states), _run_native_cpu(algo, block, *inputs))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_cuda_step_without_params(algo):
  inputs = _step_inputs(algo, np.float32, (64, 1000), 256, seed=10 + int(algo), with_params=False)
  u, states = _run_native(algo, 256, *inputs)
  ref_u, ref_states = _run_oracle(algo, 256, *inputs)
  _assert_u_close(u, ref_u, np.float32)
  _assert_states_close(states, ref_states)


@pytest.mark.parametrize("variant", [dict(nesterov=0), dict(nesterov=1)])
@pytest.mark.parametrize("algo", [ALGOS["adam"], ALGOS["momentum"]])
def test_cuda_step_nesterov_variants(algo, variant):
  hyper, g, p, states = _step_inputs(algo, np.float32, (64, 1000), 256, seed=20)
  hyper = _hyper(algo, **variant)
  u, new = _run_native(algo, 256, hyper, g, p, states)
  ref_u, ref_new = _run_oracle(algo, 256, hyper, g, p, states)
  _assert_u_close(u, ref_u, np.float32)
  _assert_states_close(new, ref_new)


@pytest.mark.parametrize("eps", [dict(eps=1e-8, eps_root=0.0), dict(eps=0.0, eps_root=1e-8)])
def test_cuda_step_rmsprop_eps_placement(eps):
  hyper, g, p, states = _step_inputs(ALGOS["rms"], np.float32, (64, 1000), 256, seed=30)
  hyper = _hyper(ALGOS["rms"], **eps)
  u, new = _run_native(ALGOS["rms"], 256, hyper, g, p, states)
  ref_u, ref_new = _run_oracle(ALGOS["rms"], 256, hyper, g, p, states)
  _assert_u_close(u, ref_u, np.float32)
  _assert_states_close(new, ref_new)


@pytest.mark.parametrize("block", [16, 256, 2048, 4096])
@pytest.mark.parametrize("algo", [ALGOS["adam"], ALGOS["ademamix"], ALGOS["lion"]])
def test_cuda_step_in_place(algo, block):
  """Donated inputs: the update overwrites the gradient and the states their old codes and absmax."""
  inputs = _step_inputs(algo, np.float32, (16, 3 * block + 5), block, seed=40)
  _assert_same(_run_native(algo, block, *inputs, donate=True), _run_native(algo, block, *inputs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_cuda_step_nonfinite_gradients(algo, dtype):
  """A NaN or +-inf gradient zeroes its element's update and states, and no other element's."""
  shape, block = (8, 700), 256
  hyper, g, p, states = _step_inputs(algo, dtype, shape, block, seed=50)
  bad = np.zeros(shape, bool)
  bad.flat[3::97] = True
  g_bad = np.array(g, np.float32)
  g_bad.flat[3::97 * 3] = np.nan
  g_bad.flat[3 + 97::97 * 3] = np.inf
  g_bad.flat[3 + 2 * 97::97 * 3] = -np.inf
  g_bad = np.asarray(g_bad.astype(dtype))
  u, new = _run_native(algo, block, hyper, g_bad, p, states)
  u32 = np.asarray(u, np.float32)
  assert np.all(u32[bad] == 0)
  assert np.all(np.isfinite(u32))
  ref_u, ref_new = _run_oracle(algo, block, hyper, g_bad, p, states)
  _assert_u_close(u, ref_u, dtype)
  _assert_states_close(new, ref_new)
  # The update of the other elements depends only on their own inputs.
  g_zero = np.array(g_bad, np.float32)
  g_zero[bad] = 0
  u_zero, _ = _run_native(algo, block, hyper, np.asarray(g_zero.astype(dtype)), p, states)
  np.testing.assert_array_equal(u32[~bad], np.asarray(u_zero, np.float32)[~bad])
  for (codes, absmax), kind in zip(new, algo.states):
    assert np.all(np.isfinite(absmax))
    values = np.asarray(optax8.dequantize(optax8.QuantizedArray(jax.device_put(codes, _cpu()),
                                                                 jax.device_put(absmax, _cpu()), block, kind)))
    assert np.all(values[bad] == 0)


@pytest.mark.parametrize("shape", [(3, 8, 600), (3, 8, 512)])
def test_cuda_step_vmapped_hyperparameters(shape):
  """A batch of hyperparameter rows (vmap): each applies to its own slice of the rows."""
  algo, block = ALGOS["adam"], 256
  _, g, p, states = _step_inputs(algo, np.float32, shape, block, seed=60)
  hyper = np.stack([_hyper(algo, scale=-1e-2 * (i + 1), b1=0.8 + 0.05 * i) for i in range(shape[0])])
  fn = jax.vmap(lambda h, g, p, s: native.step(algo, h, g, p, s, block))
  u, new = jax.tree.map(np.asarray, jax.jit(fn)(*_put((hyper, g, p, states), _gpu())))
  for i in range(shape[0]):
    sl = jax.tree.map(lambda x: x[i], (g, p, states))
    ref_u, ref_new = _run_oracle(algo, block, hyper[i], *sl)
    _assert_u_close(u[i], ref_u, np.float32)
    _assert_states_close(jax.tree.map(lambda x: x[i], new), ref_new)


def test_cuda_step_rejects_blocks_above_4096():
  inputs = _step_inputs(ALGOS["lion"], np.float32, (2, 9000), 8192)
  with pytest.raises(Exception, match="above 4096"):
    _run_native(ALGOS["lion"], 8192, *inputs)


def _three_steps_on_cpu_and_gpu(tx, rows: int, cols: int, seed: int):
  """``{"cpu": (params, state), "gpu": (params, state)}`` after three fused steps of ``tx`` on ``rows`` leaves of
  shape (i + 1, cols), as numpy."""
  rng = np.random.default_rng(seed)
  params = {f"p{i}": (rng.standard_normal((i + 1, cols)) * 0.1).astype(np.float32) for i in range(rows)}
  grads = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in params.items()}
  results = {}
  for device in (_cpu(), _gpu()):
    p, g = _put(params, device), _put(grads, device)
    state = tx.init(p)
    for _ in range(3):
      p, state = jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(g, state, p)
    results[device.platform] = jax.tree.map(np.asarray, (p, state))   # "cpu" and "gpu"
  return results


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw", "lion", "ademamix", "lamb"])
def test_cuda_optimizer_matches_cpu_with_many_leaves_and_apply(name):
  """Whole optimizers on the GPU (grouped leaves, apply_gradients) against the same on the CPU."""
  from test_alias import OPTIMIZERS
  results = _three_steps_on_cpu_and_gpu(OPTIMIZERS[name][0](min_8bit_size=256, block_size=256), 12, 700, 7)
  for k in results["cpu"][0]:
    np.testing.assert_allclose(results["gpu"][0][k], results["cpu"][0][k], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_stochastic_rounding_and_4_bit_states_match_cpu(bits):
  """rounding='stochastic' (the CUDA kernels' draws), at 8 and 4 bits, against the CPU handler's codes (all but
  a few equal: the rule's float32 rounding may differ between the devices' compilers)."""
  from test_alias import OPTIMIZERS
  tx = OPTIMIZERS["adamw"][0](min_8bit_size=256, rounding="stochastic", bits=bits)
  results = _three_steps_on_cpu_and_gpu(tx, 6, 1024, 8)
  for a, b in zip(jax.tree.leaves(results["gpu"]), jax.tree.leaves(results["cpu"])):
    if a.dtype == np.uint8:
      assert np.mean(a != b) < 1e-3
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
