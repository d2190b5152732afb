import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax8
from optax8 import dispatch
from optax8.kernels import algorithms, jax_step, native
from helpers import needs_native_cpu


@pytest.mark.parametrize("built,runtime,ok", [
    ((0, 3), (0, 3), True),
    ((0, 3), (0, 5), True),    # older headers on a newer jaxlib
    ((0, 5), (0, 3), False),   # newer headers would crash the backend
    ((0, 3), (1, 0), False),
    ((1, 0), (0, 9), False),
    ((0, 3), None, False),
])
def test_compatible(built, runtime, ok):
  assert native.compatible(built, runtime) is ok


def test_runtime_ffi_api_is_read_from_jaxlib_headers():
  api = native.runtime_ffi_api()
  assert api is not None and api[0] == 0 and api[1] >= 3


def _run(code, cwd, **env):
  """Runs code in a fresh interpreter, outside the source tree (so the installed optax8 is imported)."""
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=300, cwd=cwd)


@needs_native_cpu
def test_incompatible_library_warns_and_falls_back_to_jax(tmp_path):
  r = _run("""
      import warnings
      import numpy as np
      from optax8.kernels import native, jax_backend
      native.runtime_ffi_api = lambda: (0, 2)   # a jaxlib older than the build
      import optax8
      with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b = optax8.backends()
      assert b["cpu"] == "jax", b
      assert any("cannot be used" in str(x.message) and "FFI API" in str(x.message) for x in w), w
      x = np.linspace(-3, 3, 1000, dtype=np.float32).reshape(4, 250)
      q = optax8.quantize(x, 64)
      c, a = jax_backend.quantize(x, 64, "signed", 8)   # tiles of 8 x 8
      assert (np.asarray(q.codes) == np.asarray(c)).all()
      print("fallback ok")
      """, tmp_path)
  assert r.returncode == 0, r.stderr
  assert "fallback ok" in r.stdout


def test_disable_native_runs_pure_jax(tmp_path):
  r = _run("""
      import numpy as np, optax8
      assert optax8.backends() == {"cpu": "jax", "cuda": "jax", "rocm": "jax", "tpu": "jax"}, optax8.backends()
      x = np.ones((3, 300), np.float32)
      assert np.allclose(optax8.dequantize(optax8.quantize(x)), x)
      print("jax ok")
      """, tmp_path, OPTAX8_DISABLE_NATIVE="1")
  assert r.returncode == 0, r.stderr
  assert "jax ok" in r.stdout


@needs_native_cpu
def test_handler_rejects_inconsistent_shapes_with_an_error():
  codes = jnp.zeros((4, 1024), jnp.uint8)
  absmax = jnp.ones((4, 2), jnp.float32)  # a block size of 512, called with 256
  with pytest.raises(Exception, match=r"absmax shape \(4, 2\) does not fit values shape \(4, 1024\)"):
    jax.block_until_ready(native.dequantize(codes, absmax, 256, 0, jnp.float32))
  with pytest.raises(Exception, match="map_kind"):
    jax.block_until_ready(native.dequantize(codes, jnp.ones((4, 4)), 256, 7, jnp.float32))
  # the backend is still alive
  np.testing.assert_array_equal(optax8.quantize(jnp.ones((2, 8)), 8).codes, 255)


@pytest.mark.skipif(os.environ.get("OPTAX8_EXPECT_NATIVE") != "1", reason="set OPTAX8_EXPECT_NATIVE=1 to require native libraries")
def test_expected_native_libraries_are_built_and_used():
  assert optax8.backends()["cpu"] == "native", native.library("cpu").reason
  if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
    info = native.build_info()
    assert info["cuda"]["built"], info
    assert (native.LIB_DIR / "liboptax8_cuda.so").exists()


@pytest.mark.skipif(not (native.LIB_DIR / "liboptax8_cuda.so").exists(), reason="no CUDA library built")
def test_the_cuda_library_is_not_loaded_without_a_jax_cuda_backend(tmp_path):
  """On a machine where JAX has no CUDA backend the CUDA runtime is not even loaded (no probe, no log noise)."""
  r = _run("""
      import jax, optax8
      from optax8.kernels import native
      try:
        has_cuda = bool(jax.devices("cuda"))
      except RuntimeError:
        has_cuda = False
      lib = native.library("cuda")
      loaded = "liboptax8_cuda.so" in open("/proc/self/maps").read()
      print("state", has_cuda, lib.available, loaded, lib.reason)
      """, tmp_path)
  assert r.returncode == 0, r.stderr
  has_cuda, available, loaded = r.stdout.split("state ")[1].split()[:3]
  if has_cuda == "False":
    assert (available, loaded) == ("False", "False"), r.stdout
    assert "JAX has no CUDA backend" in r.stdout


@needs_native_cpu
def test_the_library_reports_the_rules_it_was_built_with():
  for a in algorithms.table():
    assert native.has_rule("cpu", a), a


@needs_native_cpu
def test_a_rule_the_library_was_not_built_with_runs_on_pure_jax_with_a_warning():
  """A new (or changed) row runs on the pure-JAX backend until the library is rebuilt: never another rule."""
  def direction(h, g, s):
    s[0] = h[algorithms.Hyper.B1] * s[0] + g
    return jnp.sign(s[0])

  n = len(algorithms.table())
  row = algorithms.register(algorithms.Algorithm(n, "signum_test", (optax8.SIGNED,), direction, "return g;"))
  try:
    hyper = algorithms.hyper_vector(scale=-1e-2, b1=0.9)
    g = jax.random.normal(jax.random.key(0), (4, 512))
    m = optax8.quantize(jax.random.normal(jax.random.key(1), (4, 512)) * 1e-2)
    with pytest.warns(RuntimeWarning, match="without the current rule of algorithm 'signum_test'"):
      u, ((codes, absmax),) = jax.jit(lambda h, g, c, a: dispatch.step(row.id, h, g, None, ((c, a),), 256))(
          hyper, g, m.codes, m.absmax)
    want_u, ((want_codes, want_absmax),) = jax_step.step(row, hyper, g, None, ((m.codes, m.absmax),), 256)
    np.testing.assert_array_equal(u, want_u)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(absmax, want_absmax)
    assert not native.has_rule("cpu", row)
  finally:
    del algorithms._TABLE[row.id]
