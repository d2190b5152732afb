// The CUDA quantize and dequantize handlers compiled for the host against the CUDA emulation
// (cuda_emulation.h), exported under the same names as the CUDA library.
#include "../src/cuda_quantize.cu"
