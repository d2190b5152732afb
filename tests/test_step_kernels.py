"""The fused step kernels: native CPU against the pure-JAX reference."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import optax8
from optax8 import dispatch, maps, rounding
from optax8.kernels import jax_backend, jax_step, native
from optax8.kernels import algorithms
from optax8.kernels.algorithms import hyper_vector
from helpers import DTYPES, needs_native_cpu

GENERATED = pathlib.Path(__file__).resolve().parent.parent / "ffi" / "include" / "optax8"
ALGORITHMS = algorithms.table()
ALGOS = {a.name: a for a in ALGORITHMS}

HYPER = dict(scale=-1e-3, b1=0.9, b2=0.999, b3=0.9999, eps=1e-8, eps_root=1e-12, weight_decay=1e-2,
             coupled_decay=1e-3, inv_bias1=10.0, inv_bias2=1000.0, inv_bias1_next=5.26, alpha=5.0, pre_scale=0.5)


def test_the_generated_native_dispatch_is_up_to_date(tmp_path):
  """ffi/include/optax8/algorithms.h and algorithm_rules.inc are what the table of algorithms writes."""
  for path in algorithms.write(tmp_path):
    checked_in = GENERATED / path.name
    assert checked_in.read_text() == path.read_text(), "run: python -m optax8.kernels.algorithms"


def test_every_algorithm_has_a_dense_id_and_a_rule_in_both_languages():
  assert [a.id for a in ALGORITHMS] == list(range(len(ALGORITHMS)))
  rules = (GENERATED / "algorithm_rules.inc").read_text()
  for a in ALGORITHMS:
    assert f"A == {a.cxx_name})" in rules and callable(a.direction)


def _case(algo, shape, dtype, block_size, seed=0, nonfinite=True):
  rng = np.random.default_rng(seed)
  g = rng.standard_normal(shape) * 0.01
  if nonfinite and g.size > 3:
    flat = g.reshape(-1)
    flat[[0, g.size // 2, g.size - 1]] = [np.nan, np.inf, -np.inf]
  g = jnp.asarray(g, dtype)
  p = jnp.asarray(rng.standard_normal(shape) * 0.1, dtype)
  states = []
  for kind in algo.states:
    x = rng.standard_normal(shape) * 0.01
    q = optax8.quantize(jnp.asarray(x**2 if kind == "unsigned" else x, jnp.float32), block_size, kind)
    states.append((q.codes, q.absmax))
  return g, p, tuple(states)


def _run(backend, algo, hyper, g, p, states, block_size):
  fn = native.step if backend == "native" else jax_step.step
  return jax.jit(lambda h, g, p, s: fn(int(algo), h, g, p, s, block_size))(hyper, g, p, states)


def assert_steps_agree(a, b):
  """Same codes except within float32 rounding of a boundary (one code apart), updates to float32 rounding."""
  (u1, s1), (u2, s2) = a, b
  assert u1.dtype == u2.dtype
  u1, u2 = np.asarray(u1, np.float32), np.asarray(u2, np.float32)
  scale = np.max(np.abs(u2)) + 1e-30
  ulp = 2.0**-7 if a[0].dtype == jnp.bfloat16 else 2.0**-10 if a[0].dtype == jnp.float16 else 2.0**-22
  subnormal = 2.0**-24 if a[0].dtype == jnp.float16 else 0.0
  np.testing.assert_allclose(u1, u2, rtol=ulp, atol=4e-7 * scale + subnormal)
  for (c1, a1), (c2, a2) in zip(s1, s2):
    np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), rtol=2e-6, atol=1e-6 * float(np.max(np.asarray(a2))))
    diff = np.abs(np.asarray(c1, np.int32) - np.asarray(c2, np.int32))
    # any element may sit on a boundary: one in a small array, 0.1% of a large one
    assert diff.max() <= 1 and (diff > 0).sum() <= max(1, 1e-3 * diff.size), (diff.max(), (diff > 0).sum())


@needs_native_cpu
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape,block_size", [((64, 1000), 256), ((3, 5, 513), 64), ((7,), 2048), ((4, 4096), 2048)])
def test_native_step_matches_jax(algo, dtype, shape, block_size):
  g, p, states = _case(algo, shape, dtype, block_size)
  hyper = hyper_vector(**HYPER, nesterov=1.0 if shape[0] == 64 else 0.0)
  assert_steps_agree(_run("native", algo, hyper, g, p, states, block_size),
                     _run("jax", algo, hyper, g, p, states, block_size))


@needs_native_cpu
@settings(max_examples=25)
# a case one code apart (one element on a boundary)
@example(algo=next(a for a in ALGORITHMS if a.name == "momentum"), rows=1, cols=428, log_block=1, seed=0,
         with_params=True)
@given(algo=st.sampled_from(ALGORITHMS), rows=st.integers(1, 4), cols=st.integers(1, 700),
       log_block=st.integers(0, 11), seed=st.integers(0, 2**16), with_params=st.booleans())
def test_native_step_matches_jax_on_any_layout(algo, rows, cols, log_block, seed, with_params):
  g, p, states = _case(algo, (rows, cols), jnp.float32, 2**log_block, seed)
  hyper = hyper_vector(**HYPER)
  p = p if with_params else None
  assert_steps_agree(_run("native", algo, hyper, g, p, states, 2**log_block),
                     _run("jax", algo, hyper, g, p, states, 2**log_block))


CPU_ISAS = ("scalar", "avx2", "avx512")


@needs_native_cpu
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_every_cpu_isa_gives_the_same_bits(algo, dtype, monkeypatch):
  """OPTAX8_CPU_ISA caps the CPU loops (scalar, AVX2, AVX-512, where the CPU has them): the same bits on each."""
  # rows of 700: full blocks, a short last block and a tail of 700 % 16 elements
  g, p, states = _case(algo, (5, 700), dtype, 256)
  hyper = hyper_vector(**HYPER)
  ref = _run("jax", algo, hyper, g, p, states, 256)
  results = {}
  for isa in CPU_ISAS:
    monkeypatch.setenv("OPTAX8_CPU_ISA", isa)
    results[isa] = _run("native", algo, hyper, g, p, states, 256)
    assert_steps_agree(results[isa], ref)
  for isa in CPU_ISAS[:-1]:
    for a, b in zip(jax.tree.leaves(results[isa]), jax.tree.leaves(results["avx512"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=isa)


@needs_native_cpu
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
@pytest.mark.parametrize("shape,block_size", [((5, 700), 256), ((3, 5, 513), 64), ((1000,), 128), ((64, 4096), 2048)])
def test_stochastic_rounding_native_matches_jax_on_every_isa(algo, shape, block_size, monkeypatch):
  """rounding='stochastic' (optax8.rounding) in the CPU handler: the pure-JAX step's codes (to float32 rounding of
  the rule, as with round to nearest), the same bits on every ISA, and other codes than round to nearest."""
  g, p, states = _case(algo, shape, jnp.float32, block_size)
  hyper = hyper_vector(**HYPER, rounding_step=12345.0, rounding_seed=float(0xABCDEF))
  index = rounding.index_vectors(shape)
  ref = jax.jit(lambda h, g, p, s: jax_step.step(algo.id, h, g, p, s, block_size, index=index))(hyper, g, p, states)
  nearest = _run("jax", algo, hyper, g, p, states, block_size)
  results = {}
  for isa in CPU_ISAS:
    monkeypatch.setenv("OPTAX8_CPU_ISA", isa)
    results[isa] = jax.jit(lambda h, g, p, s: native.step_group(algo.id, h[None], [(g, p, s)], block_size,
                                                                indices=[index])[0])(hyper, g, p, states)
    assert_steps_agree(results[isa], ref)
  for isa in CPU_ISAS[:-1]:
    for a, b in zip(jax.tree.leaves(results[isa]), jax.tree.leaves(results["avx512"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=isa)
  changed = [np.mean(np.asarray(c1) != np.asarray(c2)) for (c1, _), (c2, _) in zip(ref[1], nearest[1])]
  assert max(changed) > 0.01, changed


@needs_native_cpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("absmax", [1.0, -0.5, 2.0**-30])
def test_stochastic_rounding_keeps_map_values_and_rounds_between_neighbours(bits, absmax, monkeypatch):
  """Momentum with b1 = 1 and g = 0 keeps its state: a state at a map value keeps its code on every ISA (the
  AVX-512 loop finds the value at or below v in a table, the others from the nearest code); a state halfway
  between two map values gets one of them."""
  algo, kind = ALGOS["momentum"], maps.with_bits(maps.SIGNED, bits)
  values = maps.dynamic_map(kind)
  codes = np.tile(np.arange(len(values), dtype=np.uint8), (16, 256 // len(values)))   # every code, tiles of 16
  x = values[codes] * np.float32(absmax)
  mid = (values[codes[:, 1:]].astype(np.float64) + values[codes[:, :-1]]) / 2 * absmax
  x[:, 1::2] = mid[:, ::2][:, :x[:, 1::2].shape[1]]   # odd columns: halfway to the code below
  block = 256 if bits == 8 else 128
  q = optax8.quantize(jnp.asarray(x, jnp.float32), block, kind)
  g = jnp.zeros(x.shape, jnp.float32)
  hyper = hyper_vector(scale=-1e-3, b1=1.0, pre_scale=1.0, rounding_step=3.0, rounding_seed=5.0)
  index = rounding.index_vectors(x.shape)
  results = []
  for isa in CPU_ISAS:
    monkeypatch.setenv("OPTAX8_CPU_ISA", isa)
    _, ((c, a),) = jax.jit(lambda h, g, s: native.step_group(algo.id, h[None], [(g, None, s)], block,
                                                             indices=[index], bits=bits)[0])(
                                                                 hyper, g, ((q.codes, q.absmax),))
    results.append(np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(q.absmax))
  for c in results[:-1]:
    np.testing.assert_array_equal(c, results[-1])
  new = np.asarray(jax_backend.unpack4(results[-1], x.shape[1]) if bits == 4 else results[-1]).astype(int)
  old = np.asarray(jax_backend.unpack4(q.codes, x.shape[1]) if bits == 4 else q.codes).astype(int)
  exact = np.isin(x, values * np.float32(absmax))
  assert exact.sum() >= x.size // 2
  np.testing.assert_array_equal(new[exact], old[exact])
  assert np.all(np.abs(new - old) <= 1)


@needs_native_cpu
@pytest.mark.parametrize("states", ["nearest", "stochastic"])
@pytest.mark.parametrize("grads", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("algo,shape,block_size", [(ALGOS["adam"], (5, 700), 256), (ALGOS["lion"], (3, 5, 513), 64),
                                                   (ALGOS["momentum"], (1000,), 128),
                                                   (ALGOS["adam"], (64, 4096), 2048)],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_param_rounding_native_matches_jax_on_every_isa(algo, shape, block_size, grads, states, monkeypatch):
  """round_params (optax8.low_precision) in the CPU handler's fused apply: the new bfloat16 params of the
  pure-JAX step (its p + u to float32 rounding of the rule), the same bits on every ISA, other params than
  rounding to nearest, and the states as without it."""
  g, p, st = _case(algo, shape, jnp.float32, block_size)
  g, p = g.astype(grads), (p + 1).astype(jnp.bfloat16)   # params near 1: bfloat16 spacing 2**-7
  hyper = hyper_vector(**{**HYPER, "scale": -1e-3}, rounding_step=12345.0, rounding_seed=float(0xABCDEF),
                       param_rounding_step=77.0)
  index = rounding.index_vectors(shape)
  stochastic = states == "stochastic"
  ref = jax.jit(lambda h, g, p, s: jax_step.step(algo.id, h, g, p, s, block_size, True, index=index,
                                                 round_states=stochastic, round_params=True))(hyper, g, p, st)
  nearest = jax.jit(lambda h, g, p, s: jax_step.step(algo.id, h, g, p, s, block_size, True, index=index,
                                                     round_states=stochastic))(hyper, g, p, st)
  results = {}
  for isa in CPU_ISAS:
    monkeypatch.setenv("OPTAX8_CPU_ISA", isa)
    results[isa] = jax.jit(lambda h, g, p, s: native.step_group(
        algo.id, h[None], [(g, p, s)], block_size, True, indices=[index], round_states=stochastic,
        round_params=True)[0])(hyper, g, p, st)
    assert results[isa][0].dtype == jnp.bfloat16
    assert_steps_agree(results[isa], ref)
    same = np.asarray(results[isa][0]).view(np.uint16) == np.asarray(ref[0]).view(np.uint16)
    assert same.mean() > 0.999, same.mean()
  for isa in CPU_ISAS[:-1]:
    for a, b in zip(jax.tree.leaves(results[isa]), jax.tree.leaves(results["avx512"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=isa)
  plain = jax.jit(lambda h, g, p, s: native.step_group(algo.id, h[None], [(g, p, s)], block_size, True,
                                                       indices=[index], round_states=stochastic)[0])(hyper, g, p, st)
  jax.tree.map(np.testing.assert_array_equal, results["avx512"][1], plain[1])
  assert np.mean(np.asarray(results["avx512"][0]) != np.asarray(nearest[0])) > 0.002   # momentum: |u| ~ 1e-5


@needs_native_cpu
def test_param_rounding_needs_apply_and_bfloat16_params():
  algo = ALGOS["adam"]
  g, p, st = _case(algo, (4, 256), jnp.float32, 256)
  index = [rounding.index_vectors(g.shape)]
  hyper = hyper_vector(**HYPER)[None]
  for p_, apply in ((p.astype(jnp.float16), True), (p, True), (p.astype(jnp.bfloat16), False)):
    with pytest.raises(ValueError, match="round_params needs apply, bfloat16 params and the index vectors"):
      native.step_group(algo.id, hyper, [(g, p_, st)], 256, apply, indices=index, round_params=True)


def _case4(algo, shape, dtype, block_size, seed=0):
  """`_case` with 4-bit states."""
  g, p, states = _case(algo, shape, dtype, block_size, seed)
  rng = np.random.default_rng(seed + 1)
  out = []
  for kind in algo.states:
    x = rng.standard_normal(shape) * 0.01
    q = optax8.quantize(jnp.asarray(x**2 if kind == "unsigned" else x, jnp.float32), block_size, kind + "4")
    out.append((q.codes, q.absmax))
  return g, p, tuple(out)


def _unpacked(result, columns):
  """A step's result with its 4-bit codes unpacked (one code a byte)."""
  u, states = result
  return u, tuple((jax_backend.unpack4(c, columns), a) for c, a in states)


@needs_native_cpu
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
@pytest.mark.parametrize("shape,block_size", [((5, 700), 128), ((3, 5, 513), 128), ((1001,), 128),
                                              ((40, 300), 2048), ((9, 30), 8)])
def test_four_bit_native_step_matches_jax_on_every_isa(algo, shape, block_size, stochastic, monkeypatch):
  """bits=4 in the CPU handler (codes unpacked, stepped as 8-bit codes of a 16-value map, packed again): the
  pure-JAX step's codes (to float32 rounding of the rule) and the same bits on every ISA; an odd last column
  leaves its byte's high half 0."""
  g, p, states = _case4(algo, shape, jnp.float32, block_size)
  hyper = hyper_vector(**HYPER, rounding_step=12345.0, rounding_seed=float(0xABCDEF))
  index = rounding.index_vectors(shape) if stochastic else None
  ref = jax.jit(lambda h, g, p, s: jax_step.step(algo.id, h, g, p, s, block_size, index=index, bits=4))(
      hyper, g, p, states)
  results = {}
  for isa in CPU_ISAS:
    monkeypatch.setenv("OPTAX8_CPU_ISA", isa)
    results[isa] = jax.jit(lambda h, g, p, s: native.step_group(
        algo.id, h[None], [(g, p, s)], block_size, indices=None if index is None else [index], bits=4)[0])(
            hyper, g, p, states)
    assert_steps_agree(_unpacked(results[isa], shape[-1]), _unpacked(ref, shape[-1]))
    for (c, _), (c0, _) in zip(results[isa][1], states):
      assert c.shape == c0.shape and c.dtype == jnp.uint8
      if shape[-1] % 2:
        assert not np.any(np.asarray(c)[..., -1] >> 4)
  for isa in CPU_ISAS[:-1]:
    for a, b in zip(jax.tree.leaves(results[isa]), jax.tree.leaves(results["avx512"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=isa)


@needs_native_cpu
def test_four_bit_native_step_refuses_blocks_of_odd_columns():
  """Two blocks never share a byte of 4-bit codes: blocks of one column are refused (dispatch steps them in JAX)."""
  algo = ALGOS["adam"]
  g, p, states = _case4(algo, (4, 6), jnp.float32, 2)
  hyper = hyper_vector(**HYPER)
  with pytest.raises(Exception, match="even number of columns"):
    jax.block_until_ready(native.step_group(algo.id, hyper[None], [(g, p, states)], 2, rows=2, bits=4))
  u, _ = jax.jit(lambda h, g, p, s: dispatch.step_group(algo.id, h[None], [(g, p, s)], 1, bits=4)[0])(
      hyper, g, p, _case4(algo, (4, 6), jnp.float32, 1)[2])
  assert np.isfinite(np.asarray(u)[np.isfinite(np.asarray(g))]).all()


@needs_native_cpu
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("algo", [ALGOS["adam"], ALGOS["momentum"]], ids=lambda a: a.name)
def test_nan_states_are_quantized_as_zero(algo, isa, monkeypatch):
  """A NaN hyperparameter makes NaN states: they get the code of 0, as in the pure-JAX path."""
  monkeypatch.setenv("OPTAX8_CPU_ISA", isa)
  g, p, states = _case(algo, (4, 512), jnp.float32, 256, nonfinite=False)
  hyper = hyper_vector(**{**HYPER, "b1": float("nan")})
  (_, s1), (_, s2) = (_run(b, algo, hyper, g, p, states, 256) for b in ("native", "jax"))
  for (c1, a1), (c2, a2) in zip(s1, s2):
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))


@pytest.mark.parametrize("backend", ["jax", pytest.param("native", marks=needs_native_cpu)])
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_nonfinite_gradient_zeroes_only_its_element(backend, algo):
  shape = (2, 512)
  g, p, states = _case(algo, shape, jnp.float32, 256, nonfinite=False)
  bad = g.at[0, 5].set(jnp.nan).at[1, 7].set(jnp.inf)
  hyper = hyper_vector(**HYPER)
  u_ok, s_ok = _run(backend, algo, hyper, g, p, states, 256)
  u, s = _run(backend, algo, hyper, bad, p, states, 256)
  u = np.asarray(u)
  assert u[0, 5] == 0 and u[1, 7] == 0 and np.isfinite(u).all()
  for (codes, absmax), (codes_ok, absmax_ok), kind in zip(s, s_ok, algo.states):
    assert np.isfinite(np.asarray(absmax)).all() and (np.asarray(absmax) != 0).all()
    values = np.asarray(optax8.dequantize(optax8.QuantizedArray(codes, absmax, 256, kind)))
    assert values[0, 5] == 0 and values[1, 7] == 0
    # the other elements of the blocks keep their values (to one code)
    other = np.ones(shape, bool)
    other[0, 5] = other[1, 7] = False
    ok = np.asarray(optax8.dequantize(optax8.QuantizedArray(codes_ok, absmax_ok, 256, kind)))
    np.testing.assert_allclose(values[other], ok[other], rtol=0.05, atol=float(np.max(np.abs(ok))) * 0.02)
  np.testing.assert_allclose(np.delete(u.reshape(-1), [5, 512 + 7]),
                             np.delete(np.asarray(u_ok).reshape(-1), [5, 512 + 7]), rtol=0.05, atol=1e-6)


@needs_native_cpu
def test_vmapped_native_step_uses_each_members_hyperparameters():
  algo = ALGOS["adam"]
  g, p, states = _case(algo, (3, 4, 256), jnp.float32, 64, nonfinite=False)
  hypers = jnp.stack([hyper_vector(**{**HYPER, "scale": s}) for s in (-1e-3, -2e-3, -3e-3)])
  u, _ = jax.jit(jax.vmap(lambda h, g, p, s: native.step(int(algo), h, g, p, s, 64)))(hypers, g, p, states)
  for i in range(3):
    ui, _ = _run("native", algo, hypers[i], g[i], p[i], jax.tree.map(lambda x: x[i], states), 64)
    np.testing.assert_array_equal(np.asarray(u[i]), np.asarray(ui))


@needs_native_cpu
def test_step_aliases_state_and_gradient_buffers():
  g, p, states = _case(ALGOS["adam"], (8, 256), jnp.float32, 64, nonfinite=False)
  hyper = hyper_vector(**HYPER)
  fn = jax.jit(lambda h, g, p, s: native.step(0, h, g, p, s, 64), donate_argnums=(1, 3))
  text = fn.lower(hyper, g, p, states).as_text()
  assert "tf.aliasing_output" in text or "output_operand_alias" in text


@needs_native_cpu
@pytest.mark.parametrize("bad", ["algo", "states", "absmax_shape", "params_shape"])
def test_ffi_step_rejects_bad_buffers_with_an_error(bad):
  g, p, states = _case(ALGOS["adam"], (4, 256), jnp.float32, 64, nonfinite=False)
  hyper = hyper_vector(**HYPER)
  algo, block = 0, 64
  if bad == "algo":
    algo = 17
  elif bad == "states":
    states = states[:1]
  elif bad == "absmax_shape":
    block = 128
  else:
    p = p[:, :128]
  with pytest.raises(Exception, match="optax8 step|block_size|absmax|params"):
    jax.block_until_ready(native.step(algo, hyper, g, p, states, block))


def test_dispatch_step_lowers_for_cpu_and_cuda():
  g, p, states = _case(ALGOS["lion"], (4, 256), jnp.float32, 64, nonfinite=False)
  hyper = hyper_vector(**HYPER)
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in native.TARGETS]
  exported = jax.export.export(jax.jit(lambda h, g, p, s: dispatch.step(1, h, g, p, s, 64)),
                               platforms=("cpu", "cuda"), disabled_checks=checks)(hyper, g, p, states)
  assert exported.platforms == ("cpu", "cuda")
  u, _ = exported.call(hyper, g, p, states)
  ref, _ = _run("jax", ALGOS["lion"], hyper, g, p, states, 64)
  np.testing.assert_allclose(np.asarray(u), np.asarray(ref), rtol=1e-6, atol=1e-9)


@needs_native_cpu
@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a.name)
def test_native_step_matches_jax_on_extreme_values(algo):
  """Tiny blocks (subnormal products), overflowing states (g**2 = inf), huge and tiny gradients."""
  rng = np.random.default_rng(5)
  shape = (6, 512)
  scales = np.array([1e-38, 1e-30, 1e-3, 1e15, 1e25, 1e30])[:, None]
  g = jnp.asarray(rng.standard_normal(shape) * scales, jnp.float32)
  p = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  states = []
  for kind in algo.states:
    x = rng.standard_normal(shape) * np.array([1e-36, 1e-33, 1e-2, 1e10, 1e30, 1e37])[:, None]
    q = optax8.quantize(jnp.asarray(np.abs(x) if kind == "unsigned" else x, jnp.float32), 128, kind)
    states.append((q.codes, q.absmax))
  hyper = hyper_vector(**HYPER)
  (u1, s1), (u2, s2) = (_run(b, algo, hyper, g, p, tuple(states), 128) for b in ("native", "jax"))
  np.testing.assert_array_equal(np.isfinite(np.asarray(u1)), np.isfinite(np.asarray(u2)))
  for (c1, a1), (c2, a2) in zip(s1, s2):
    np.testing.assert_array_equal(np.isfinite(np.asarray(a1)), np.isfinite(np.asarray(a2)))
    np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), rtol=2e-6)
    diff = np.abs(np.asarray(c1, np.int32) - np.asarray(c2, np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


@pytest.mark.parametrize("apply", [False, True])
@pytest.mark.parametrize("shape", [(100, 64), (37, 300), (3, 40, 50), (50000,), (4097,), (33, 128)])
@pytest.mark.parametrize("name", ["adam", "lion"])
def test_step_in_chunks_equals_the_whole_leaf_step(monkeypatch, name, shape, apply):
  """XLA:CPU's pure-JAX step takes a leaf a slice of whole blocks at a time: the same bits, partial last slice too."""
  monkeypatch.setattr(jax_step, "CHUNK_ELEMENTS", 4096)
  monkeypatch.setattr(jax_step, "UPDATE_CHUNK_ELEMENTS", 4096)
  algo = ALGOS[name]
  g, p, states = _case(algo, shape, jnp.float32, 256)
  hyper = hyper_vector(**HYPER)
  run = lambda fn: jax.jit(lambda *a: fn(int(algo), hyper, *a, 256, apply))(g, p, states)
  whole, chunked = run(jax_step.step), run(jax_step.step_in_chunks)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape", [(96, 64), (100, 64)])
@pytest.mark.parametrize("name", ["adam", "lion"])
def test_step_in_chunks_writes_the_params_over_themselves(monkeypatch, name, shape):
  """With apply, the new parameter is written over the donated parameter slice by slice, partial last slice
  too: the compiled step neither copies nor fills an array of the leaf's size."""
  monkeypatch.setattr(jax_step, "CHUNK_ELEMENTS", 1024)
  algo = ALGOS[name]
  g, p, states = _case(algo, shape, jnp.float32, 256)
  hyper = hyper_vector(**HYPER)
  fn = lambda g, p, states: jax_step.step_in_chunks(int(algo), hyper, g, p, states, 256, apply=True)
  text = jax.jit(fn, donate_argnums=1).lower(g, p, states).compile().as_text()
  leaf = "f32[%d,%d]{" % shape
  assert "while(" in text
  assert not [line for line in text.splitlines() if leaf in line and re.search(r" (copy|broadcast)\(", line)]


def test_step_in_chunks_bounds_the_temporaries(monkeypatch):
  monkeypatch.setattr(jax_step, "CHUNK_ELEMENTS", 1 << 14)
  algo = ALGOS["adam"]
  g, p, states = _case(algo, (1024, 512), jnp.float32, 256, nonfinite=False)
  hyper = hyper_vector(**HYPER)
  temp = lambda fn: jax.jit(lambda *a: fn(int(algo), hyper, *a, 256, True)).lower(
      g, p, states).compile().memory_analysis().temp_size_in_bytes / g.size
  assert temp(jax_step.step_in_chunks) < 0.5 * temp(jax_step.step), (temp(jax_step.step_in_chunks),
                                                                     temp(jax_step.step))
