import jax
import jax.numpy as jnp
import numpy as np
from jax import export

import optax8
from optax8 import dispatch
from optax8.kernels import native


def test_backends_report_each_platform():
  b = dispatch.backends()
  assert b["tpu"] == "jax" and b["rocm"] == "jax"
  for p in ("cpu", "cuda"):
    assert b[p] == ("native" if native.available(p) else "jax")


def test_one_lowering_serves_cpu_and_cuda():
  """The backend is picked per platform inside the lowered module, not in Python."""
  f = jax.jit(lambda x: optax8.dequantize(optax8.quantize(x, 64), jnp.bfloat16))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 100)), jnp.float32)
  checks = [export.DisabledSafetyCheck.custom_call(t) for t in native.TARGETS]
  exp = export.export(f, platforms=["cpu", "cuda"], disabled_checks=checks)(x)
  assert exp.platforms == ("cpu", "cuda")
  text = exp.mlir_module()
  assert ("optax8_quantize" in text) == (native.available("cpu") or native.available("cuda"))
  np.testing.assert_array_equal(np.asarray(exp.call(x), np.float32), np.asarray(f(x), np.float32))
