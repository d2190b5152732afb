// The CUDA fused step handlers compiled for the host against the CUDA emulation
// (cuda_emulation.h), exported under the same names as the CUDA library.
#include "../src/cuda_step.cu"
