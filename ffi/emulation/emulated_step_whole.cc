// The CUDA whole-blocks step kernel compiled for the host against the CUDA
// emulation (cuda_emulation.h).
#include "../src/cuda_step_whole.cu"
