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
