// Host entry points of the CUDA Jacobi eigensolver (raw pointers, no torch types), so that
// jacobi_cuda.cu compiles with nvcc alone and the torch glue stays in the C++ binding.
#pragma once

#include <cuda_runtime.h>

namespace q3r_jacobi {

// Floats of global scratch per matrix that the kernel needs for A on `device`: 0 when A fits
// in the block's shared memory (k up to about 235 on an H100), else k * k.
long cuda_global_floats_per_matrix(int k, int device);

// Same contract as batched_eigh_cpu, on device pointers.  vt_work: batch * k * k floats;
// a_work: batch * cuda_global_floats_per_matrix(k) floats (may be null when that is 0).
cudaError_t batched_eigh_cuda(const float* G, float* evals, float* evecs, int* sweeps,
                              float* vt_work, float* a_work, long batch, int k, int max_sweeps,
                              float tol, int device, cudaStream_t stream);

}  // namespace q3r_jacobi
