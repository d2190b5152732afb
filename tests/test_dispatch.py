import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


_SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np, optax8
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
x_host = np.random.default_rng(0).standard_normal((32, 1000)).astype(np.float32)   # 16 rows a shard: whole tiles
expected = optax8.quantize(x_host, 256)
for axis_type in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((2,), ("x",), axis_types=(axis_type,))
  x = jax.device_put(x_host, NamedSharding(mesh, P("x", None)))
  with jax.set_mesh(mesh):
    q = jax.jit(lambda x: optax8.quantize(x, 256))(x)
    d = jax.jit(optax8.dequantize)(q)
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(expected.codes))
  np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(expected.absmax))
  np.testing.assert_array_equal(np.asarray(d), np.asarray(optax8.dequantize(expected)))
  if axis_type == AxisType.Explicit:
    assert jax.typeof(q.codes).sharding.spec == P("x", None), jax.typeof(q.codes)
print("sharded ok")
"""


@pytest.mark.parametrize("disable_native", ["0", "1"])
def test_sharded_inputs_on_explicit_and_auto_meshes(tmp_path, disable_native):
  r = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                     env={**os.environ, "OPTAX8_DISABLE_NATIVE": disable_native})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "sharded ok" in r.stdout
