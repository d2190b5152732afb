"""The CUDA handlers without a GPU: compiled for the host against the CUDA
emulation (ffi/emulation: one fiber per CUDA thread, real barriers and warp
shuffles, a random order between barriers), registered as CPU FFI targets
and compared with the CPU handlers bit for bit.

The library is built with ``OPTAX8_CUDA_EMULATION=ON`` (CI sets it). The
kernels run with the FFI thread's flush-to-zero mode, which XLA:CPU sets as
the CUDA build's ``-ftz=true`` does on a GPU.
"""

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax8
from optax8 import layout, maps, rounding
from optax8.kernels import algorithms, native
from helpers import DTYPES
from test_alias import NAMES, OPTIMIZERS

pytestmark = pytest.mark.cuda_emulated

LIB = native.LIB_DIR / "liboptax8_cuda_emulated.so"
SUFFIX = "_emulated"
ALGORITHMS = algorithms.table()
ALGOS = {a.name: a for a in ALGORITHMS}

if not LIB.exists():
  if os.environ.get("OPTAX8_EXPECT_NATIVE", "") not in ("", "0"):
    raise RuntimeError(f"{LIB} is missing: build with OPTAX8_CUDA_EMULATION=ON")
  pytest.skip("the emulated CUDA library is not built (OPTAX8_CUDA_EMULATION=ON)", allow_module_level=True)


@functools.cache
def library():
  """Loads the emulated CUDA handlers and registers them as CPU targets ``optax8_*_emulated``."""
  assert native.available("cpu")
  lib = ctypes.CDLL(str(LIB))
  for target in native.TARGETS:
    jax.ffi.register_ffi_target(target + SUFFIX, jax.ffi.pycapsule(getattr(lib, target + "_cuda")), platform="cpu")
  return lib


def both(fn, *args):
  """fn(target_suffix)(*args) jitted with the CPU handlers and with the emulated CUDA ones, as numpy."""
  library()
  return [jax.tree.map(np.asarray, jax.jit(fn(suffix))(*args)) for suffix in ("", SUFFIX)]


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))


# ---- quantize and dequantize -------------------------------------------------------


@pytest.mark.parametrize("kind", maps.MAP_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((300, 777), 256), ((3, 5000), 2048), ((7, 33), 16), ((257,), 64),
                                         ((2, 8192), 4096), ((64, 100), 1), ((4, 1024), 128)])
def test_quantize_and_dequantize_match_the_cpu_handlers(kind, dtype, shape, block):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
  x.flat[::97] = np.nan
  x.flat[::89] = np.inf
  x.flat[::83] = 1e-40   # subnormal: flushed on both
  x = np.asarray(x.astype(dtype))
  map_id = maps.map_id(kind)
  q_cpu, q_emu = both(lambda s: lambda x: native.quantize(x, block, map_id, "optax8_quantize" + s), x)
  assert_same(q_cpu, q_emu)
  for out in DTYPES:
    d_cpu, d_emu = both(lambda s: lambda c, a: native.dequantize(c, a, block, map_id, out, "optax8_dequantize" + s),
                        *q_cpu)
    assert_same(d_cpu, d_emu)


# ---- the fused step ------------------------------------------------------------------

HYPER = dict(scale=-1e-2, b1=0.9, b2=0.999, b3=0.9999, eps=1e-8, weight_decay=1e-2, alpha=5.0, coupled_decay=1e-3,
             pre_scale=-1e-2, inv_bias1=1 / (1 - 0.9**3), inv_bias2=1 / (1 - 0.999**3), inv_bias1_next=1 / (1 - 0.9**4))
# Whole blocks of 128 to 4096 (matrices cut into whole tiles, vectors into whole runs) take the
# whole-blocks kernel (one to eight warps a block), the others the general one.
STEP_CASES = [((64, 1000), 256), ((3, 5, 513), 64), ((5, 8200), 4096), ((7, 33), 16), ((10, 3), 1),
              ((40, 2048), 256), ((16, 1024), 128), ((48, 80), 256), ((64, 1024), 512), ((2, 32, 3072), 1024),
              ((16384,), 2048), ((128, 256), 4096), ((12288,), 4096)]


def _leaf(rng, algo, dtype, shape, block, with_params, special=False):
  g = (rng.standard_normal(shape) * 0.5).astype(np.float32)
  if special:   # NaN, inf, a gradient whose square overflows, subnormals
    g.flat[3::97], g.flat[5::89], g.flat[7::83], g.flat[11::79] = np.nan, -np.inf, 1e20, 1e-40
  p = rng.standard_normal(shape).astype(np.float32).astype(dtype) if with_params else None
  states = []   # any codes, and absmax over many magnitudes (with all-zero blocks)
  for _ in algo.states:
    codes = rng.integers(0, 256, shape, dtype=np.uint8)
    absmax = (10.0 ** rng.uniform(-8, 1, layout.absmax_shape(shape, block))).astype(np.float32)
    absmax.flat[::5] = 0
    states.append((codes, absmax))
  with np.errstate(over="ignore"):   # 1e20 is inf in float16
    g = g.astype(dtype)
  return np.asarray(g), None if p is None else np.asarray(p), tuple(states)


def _hypers(n, nesterov=0.0):
  return np.stack([np.asarray(algorithms.hyper_vector(**HYPER, nesterov=nesterov))] * n)


@pytest.mark.parametrize("shape,block", STEP_CASES)
@pytest.mark.parametrize("mode", ["update", "params", "apply"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_step_matches_the_cpu_handler(algo, dtype, mode, shape, block):
  rng = np.random.default_rng(int(algo) * 7 + len(shape))
  leaf = _leaf(rng, algo, dtype, shape, block, mode != "update", special=block == 256)
  apply = mode == "apply"
  out = both(lambda s: lambda h, l: native.step(int(algo), h[0], *l, block, apply, "optax8_step" + s),
             _hypers(1, nesterov=float(block == 64)), leaf)
  assert_same(*out)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("leaves", [1, 64, 200])
def test_a_group_of_leaves_matches_the_cpu_handler(leaves, in_place):
  """One call over many leaves of odd sizes, some smaller than a block; apply mode, the new params written over
  the params or to their own buffers. (optax8 groups at most 64 leaves a call; XLA takes about 40 ms per leaf to
  compile a call, hence 200 and not more.)"""
  rng = np.random.default_rng(leaves)
  group = [_leaf(rng, ALGOS["adam"], np.float32, (int(rng.integers(1, 4)), int(rng.integers(1, 700))), 256, True)
           for _ in range(leaves)]
  out = both(lambda s: lambda h, ls: native.step_group(int(ALGOS["adam"]), h, ls, 256, True, "optax8_step" + s,
                                                       in_place=in_place), _hypers(leaves), group)
  assert_same(*out)


def test_whole_blocks_written_to_their_own_buffers_match_the_cpu_handler():
  """Apply mode of the whole-blocks kernel with the new params in buffers of their own (not over the params)."""
  rng = np.random.default_rng(5)
  group = [_leaf(rng, ALGOS["adam"], np.float32, (32, 256), 256, True) for _ in range(3)]
  out = both(lambda s: lambda h, ls: native.step_group(int(ALGOS["adam"]), h, ls, 256, True, "optax8_step" + s,
                                                       in_place=False), _hypers(3), group)
  assert_same(*out)


@pytest.mark.parametrize("shape,block", [((3, 8, 600), 256), ((4, 6, 512), 256), ((2, 3, 2048), 1024)])
def test_vmapped_hyperparameters_match_the_cpu_handler(shape, block):
  """A batch of hyperparameter rows (vmap): each applies to its own slice of the rows."""
  rng = np.random.default_rng(11)
  g, p, states = _leaf(rng, ALGOS["adam"], np.float32, shape, block, True)
  hypers = np.stack([np.asarray(algorithms.hyper_vector(**{**HYPER, "scale": -1e-2 * (i + 1), "b1": 0.8 + 0.05 * i}))
                     for i in range(shape[0])])
  out = both(lambda s: jax.vmap(lambda h, g, p, st: native.step(int(ALGOS["adam"]), h, g, p, st, block, False,
                                                                "optax8_step" + s)), hypers, g, p, states)
  assert_same(*out)


def _stochastic_hypers(n):
  return np.stack([np.asarray(algorithms.hyper_vector(**HYPER, rounding_step=12345.0 + i,
                                                      rounding_seed=float(0xABCDEF))) for i in range(n)])


@pytest.mark.parametrize("shape,block", STEP_CASES)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_stochastic_rounding_matches_the_cpu_handler(algo, shape, block):
  """rounding='stochastic' (optax8.rounding) in both CUDA kernels: the CPU handler's bits, and other codes than
  round to nearest."""
  rng = np.random.default_rng(int(algo) * 5 + len(shape))
  leaf = _leaf(rng, algo, np.float32, shape, block, True, special=block == 256)
  index = rounding.index_vectors(shape)
  out = both(lambda s: lambda h, l: native.step_group(int(algo), h, [l], block, True, "optax8_step" + s,
                                                      indices=[index])[0], _stochastic_hypers(1), leaf)
  assert_same(*out)
  nearest = both(lambda s: lambda h, l: native.step(int(algo), h[0], *l, block, True, "optax8_step" + s),
                 _stochastic_hypers(1), leaf)[1]
  if algo.states and np.prod(shape) >= 1000:
    assert np.mean(out[1][1][0][0] != nearest[1][0][0]) > 0.01


def test_vmapped_stochastic_rounding_matches_the_cpu_handler():
  """A batch of hyperparameter rows with stochastic rounding: each example's rows draw with its own key."""
  rng = np.random.default_rng(12)
  shape, block = (3, 8, 600), 256
  g, p, states = _leaf(rng, ALGOS["adam"], np.float32, shape, block, True)
  index = rounding.index_vectors(shape[1:])
  out = both(lambda s: jax.vmap(lambda h, g, p, st: native.step_group(
      int(ALGOS["adam"]), h[None], [(g, p, st)], block, False, "optax8_step" + s, indices=[index])[0]),
             _stochastic_hypers(3), g, p, states)
  assert_same(*out)


@pytest.mark.parametrize("states", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape,block", STEP_CASES)
def test_param_rounding_matches_the_cpu_handler(shape, block, states):
  """The new bfloat16 params rounded stochastically (round_params) in both CUDA kernels: the CPU handler's bits,
  from bfloat16 buffers and from float32 ones (float32 gradients), and other params than rounding to nearest."""
  rng = np.random.default_rng(len(shape) * 3 + block)
  algo = ALGOS["adam"]
  g, p, st = _leaf(rng, algo, jnp.bfloat16, shape, block, True, special=block == 256)
  hypers = np.stack([np.asarray(algorithms.hyper_vector(**HYPER, rounding_step=12345.0, rounding_seed=float(0xABC),
                                                        param_rounding_step=77.0))])
  index = rounding.index_vectors(shape)
  for grads in (g, g.astype(np.float32)):
    out = both(lambda s: lambda h, l: native.step_group(int(algo), h, [l], block, True, "optax8_step" + s,
                                                        indices=[index], round_states=states == "stochastic",
                                                        round_params=True)[0], hypers, (grads, p, st))
    assert_same(*out)
    assert out[1][0].dtype == jnp.bfloat16
  nearest = both(lambda s: lambda h, l: native.step(int(algo), h[0], *l, block, True, "optax8_step" + s),
                 hypers, (g, p, st))[1]
  if np.prod(shape) >= 1000:
    assert np.mean(out[1][0] != nearest[0]) > 0.01


@pytest.fixture
def cuda_handlers(monkeypatch):
  """The whole library (dispatch, optimizers) on the emulated CUDA handlers instead of the CPU ones."""
  library()
  for name in ("quantize", "dequantize", "step_group"):
    target = "optax8_" + name.removesuffix("_group") + SUFFIX
    monkeypatch.setattr(native, name, functools.partial(getattr(native, name), target=target))
  jax.clear_caches()
  yield
  jax.clear_caches()


@pytest.mark.parametrize("name,rounding,bits", [(name, "nearest", 8) for name in NAMES] +
                         [(name, rounding, bits) for name in ("adamw", "lion")
                          for rounding, bits in (("stochastic", 8), ("nearest", 4))])
def test_optimizers_on_the_emulated_handlers_match_the_cpu_ones(name, rounding, bits, request):
  """The nine optimizers (grouped leaves, 8-bit and 32-bit leaves, update and apply) for three steps; two of them
  with stochastic rounding and with 4-bit states (the kernel tests above take every algorithm)."""
  tx = OPTIMIZERS[name][0](min_8bit_size=256, rounding=rounding, bits=bits)
  rng = np.random.default_rng(3)
  params = {f"p{i}": (rng.standard_normal((i + 1, 300 * i + 7)) * 0.1).astype(np.float32) for i in range(6)}
  grads = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in params.items()}

  def three_steps():
    p, state, out = params, tx.init(params), []
    for _ in range(3):
      u, state = jax.jit(tx.update)(grads, state, p)
      p = optax.apply_updates(p, u)
      out.append(jax.jit(lambda g, s, p: optax8.apply_gradients(tx, g, s, p))(grads, state, p))
    return jax.tree.map(np.asarray, (p, state, out))

  want = three_steps()
  request.getfixturevalue("cuda_handlers")
  got = three_steps()
  assert_same(got, want)


def test_a_bad_leaf_fails_the_call_before_any_kernel_runs():
  """Every leaf of a call is checked before the first launch, so an error leaves nothing half-updated."""
  lib = library()
  lib.optax8_emulation_launches.restype = ctypes.c_int64
  rng = np.random.default_rng(0)
  good = _leaf(rng, ALGOS["lion"], np.float32, (4, 512), 256, True)
  codes, absmax = good[2][0]
  bad = (good[0], good[1], ((codes, absmax[:, :1]),))   # an absmax of the wrong shape
  before = lib.optax8_emulation_launches()
  with pytest.raises(Exception, match=r"leaf 1\b|absmax shape"):
    jax.block_until_ready(jax.jit(lambda h, ls: native.step_group(int(ALGOS["lion"]), h, ls, 256, False,
                                                                  "optax8_step" + SUFFIX))(_hypers(3), [good, bad, good]))
  assert lib.optax8_emulation_launches() == before


FOUR_BIT_CASES = [(shape, block) for shape, block in STEP_CASES if layout.tile(block)[1] % 2 == 0] + [
    ((7, 33), 8), ((5, 130), 128)]


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("shape,block", FOUR_BIT_CASES)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_4_bit_states_match_the_cpu_handler(algo, shape, block, stochastic):
  """bits=4 in both CUDA kernels (half-byte reads; whole-blocks rows as one 2-byte access per 4 codes; the general
  kernel's bytes packed through shared memory, an odd last column's high half 0): the CPU handler's bits."""
  rng = np.random.default_rng(int(algo) * 3 + len(shape))
  g, p, states = _leaf(rng, algo, np.float32, shape, block, True, special=block == 256)
  states = tuple((c[..., :(shape[-1] + 1) // 2], a) for c, a in states)   # any bytes are two 4-bit codes
  options = dict(bits=4, indices=[rounding.index_vectors(shape)] if stochastic else None)
  out = both(lambda s: lambda h, l: native.step_group(int(algo), h, [l], block, True, "optax8_step" + s,
                                                      **options)[0], _stochastic_hypers(1), (g, p, states))
  assert_same(*out)
  if shape[-1] % 2:
    for codes, _ in out[1][1]:
      assert not np.any(codes[..., -1] >> 4)


# ---- the emulation itself catches synchronisation bugs ---------------------------------


@pytest.mark.parametrize("which,bug", [(0, "a missing __syncthreads"), (1, "a wrong shuffle mask"),
                                       (2, "an overwrite race")])
def test_the_emulation_catches_planted_bugs(which, bug):
  lib = library()
  assert lib.optax8_emulation_planted(which, 0) == 0, f"the correct kernel for {bug} failed"
  results = [lib.optax8_emulation_planted(which, 1) for _ in range(5)]
  assert all(r != 0 for r in results), (bug, results)
