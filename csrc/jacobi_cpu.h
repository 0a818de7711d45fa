// Host entry point of the CPU Jacobi eigensolver (raw pointers, no torch types).
#pragma once

namespace q3r_jacobi {

// G: batch x k x k symmetric float32 (row-major, contiguous).  Writes evals (batch x k,
// descending), evecs (batch x k x k, column j is the eigenvector of evals[j]) and the number
// of sweeps each matrix took.
void batched_eigh_cpu(const float* G, float* evals, float* evecs, int* sweeps, long batch, int k,
                      int max_sweeps, float tol);

}  // namespace q3r_jacobi
