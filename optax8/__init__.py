"""optax8: 8-bit optimizers for JAX and Optax.

Block-wise 8-bit quantization of optimizer state (Dettmers et al., 2022) with
native CPU and CUDA kernels registered through the XLA FFI and a pure-JAX
reference backend.
"""

from optax8.dispatch import backends
from optax8.layout import DEFAULT_BLOCK_SIZE, absmax_shape
from optax8.maps import SIGNED, UNSIGNED, dynamic_map
from optax8.quantize import QuantizedArray, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "QuantizedArray",
    "SIGNED",
    "UNSIGNED",
    "__version__",
    "absmax_shape",
    "backends",
    "dequantize",
    "dynamic_map",
    "quantize",
]
