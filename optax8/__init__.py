"""optax8: 8-bit optimizers for JAX and Optax.

Block-wise 8-bit quantization of optimizer state (Dettmers et al., 2022) with
native CPU and CUDA kernels registered through the XLA FFI and a pure-JAX
reference backend.

The Flax layers live in the submodules `optax8.linen` and
`optax8.nnx` (``pip install optax8[flax]``), imported on first use.
"""

import importlib

from optax8.apply import (FusedGradientTransformation, apply_gradients, chain, fused_apply, inject_hyperparams,
                          partition)
from optax8.checkpoint import check_state
from optax8.clipping import PercentileClippingState, percentile_clipping
from optax8.dispatch import backends
from optax8.layout import DEFAULT_BLOCK_SIZE, absmax_shape
from optax8.low_precision import ParamRoundingState, param_rounding
from optax8.maps import SIGNED, UNSIGNED, dynamic_map
from optax8.offload import offload
from optax8.options import STABLE_EMBEDDING
from optax8.quantize import QuantizedArray, dequantize, quantize
from optax8 import optimizers
from optax8.optimizers import *  # noqa: F403  (every optimizer module's __all__)

__version__ = "0.1.0"

_SUBMODULES = ("linen", "nnx")  # need flax: imported on first attribute access

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FusedGradientTransformation",
    "PercentileClippingState",
    "apply_gradients",
    "chain",
    "check_state",
    "offload",
    "param_rounding",
    "ParamRoundingState",
    "partition",
    "percentile_clipping",
    "QuantizedArray",
    "SIGNED",
    "STABLE_EMBEDDING",
    "UNSIGNED",
    "__version__",
    "absmax_shape",
    "backends",
    "dequantize",
    "dynamic_map",
    "fused_apply",
    "inject_hyperparams",
    "quantize",
] + optimizers.__all__


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"optax8.{name}")
  raise AttributeError(f"module 'optax8' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES))
