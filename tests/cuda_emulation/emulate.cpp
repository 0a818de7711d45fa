// Builds csrc/jacobi_cuda.cu for the CPU (see cuda_runtime.h beside this file) and exposes
// its host entry point to ctypes. The test passes the kernel source with the two CUDA-only
// spellings rewritten (dynamic shared memory, the <<<...>>> launch); everything else is the
// file as it is compiled for the GPU.
#include "kernel_for_cpu.inc"

extern "C" int emulated_batched_eigh(const float* G, float* evals, float* evecs, int* sweeps, long batch,
                                     int k, int max_sweeps, float tol, int optin_shared_bytes, int sm_count) {
  emu::optin_shared_bytes = optin_shared_bytes;
  emu::sm_count = sm_count;
  long a_floats = q3r_jacobi::cuda_global_floats_per_matrix(k, 0);
  std::vector<float> vt_work(static_cast<size_t>(batch) * k * k), a_work(static_cast<size_t>(batch) * a_floats + 1);
  return q3r_jacobi::batched_eigh_cuda(G, evals, evecs, sweeps, vt_work.data(), a_work.data(), batch, k,
                                       max_sweeps, tol, 0, nullptr);
}
