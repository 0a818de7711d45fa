// pybind11 module q3r._C: the batched symmetric eigensolver for refreshes.
//
// batched_eigh(G, max_sweeps, tol) -> (evals, evecs, sweeps) dispatches on G's device.  The
// CUDA part is compiled only when setup.py / CMake define Q3R_WITH_CUDA; build_info() says
// which parts this binary holds, and source_digest the csrc/ sources it was built from (setup.py
// and CMakeLists.txt pass Q3R_SOURCE_DIGEST; q3r._native compares it with a source tree's csrc/).

#include <torch/extension.h>

#include <algorithm>
#include <climits>
#include <tuple>

#include "jacobi_cpu.h"

#ifdef Q3R_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "jacobi_cuda.h"
#endif

#ifndef Q3R_SOURCE_DIGEST
#define Q3R_SOURCE_DIGEST unknown
#endif
#define Q3R_STRINGIFY_(x) #x
#define Q3R_STRINGIFY(x) Q3R_STRINGIFY_(x)

namespace {

void check_input(const at::Tensor& G, int64_t max_sweeps, double tol) {
  TORCH_CHECK(G.dim() == 3 && G.size(1) == G.size(2),
              "batched_eigh: G must have shape (batch, k, k), got ", G.sizes());
  TORCH_CHECK(G.scalar_type() == at::kFloat, "batched_eigh: G must be float32, got ", G.scalar_type());
  TORCH_CHECK(max_sweeps >= 0, "batched_eigh: max_sweeps must be >= 0, got ", max_sweeps);
  TORCH_CHECK(tol > 0.0, "batched_eigh: tol must be > 0, got ", tol);
  TORCH_CHECK(G.size(1) <= (1 << 15), "batched_eigh: k = ", G.size(1), " is above the limit of 32768");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh_cpu(const at::Tensor& G, int64_t max_sweeps, double tol) {
  at::Tensor Gc = G.contiguous();
  const int64_t batch = Gc.size(0), k = Gc.size(1);
  at::Tensor evals = at::empty({batch, k}, Gc.options());
  at::Tensor evecs = at::empty({batch, k, k}, Gc.options());
  at::Tensor sweeps = at::empty({batch}, Gc.options().dtype(at::kInt));
  q3r_jacobi::batched_eigh_cpu(Gc.data_ptr<float>(), evals.data_ptr<float>(), evecs.data_ptr<float>(),
                               sweeps.data_ptr<int>(), batch, static_cast<int>(k),
                               static_cast<int>(max_sweeps), static_cast<float>(tol));
  return {evals, evecs, sweeps};
}

#ifdef Q3R_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh_cuda(const at::Tensor& G, int64_t max_sweeps, double tol) {
  c10::cuda::CUDAGuard guard(G.device());
  at::Tensor Gc = G.contiguous();
  const int64_t batch = Gc.size(0), k = Gc.size(1);
  const int device = G.device().index();
  at::Tensor evals = at::empty({batch, k}, Gc.options());
  at::Tensor evecs = at::empty({batch, k, k}, Gc.options());
  at::Tensor sweeps = at::empty({batch}, Gc.options().dtype(at::kInt));
  at::Tensor vt_work = at::empty({batch, k, k}, Gc.options());
  const long a_floats = q3r_jacobi::cuda_global_floats_per_matrix(static_cast<int>(k), device);
  at::Tensor a_work = at::empty({a_floats > 0 ? batch * a_floats : 0}, Gc.options());
  cudaError_t err = q3r_jacobi::batched_eigh_cuda(
      Gc.data_ptr<float>(), evals.data_ptr<float>(), evecs.data_ptr<float>(), sweeps.data_ptr<int>(),
      vt_work.data_ptr<float>(), a_floats > 0 ? a_work.data_ptr<float>() : nullptr, batch,
      static_cast<int>(k), static_cast<int>(max_sweeps), static_cast<float>(tol), device,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "batched_eigh (CUDA): ", cudaGetErrorString(err));
  return {evals, evecs, sweeps};
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_eigh(const at::Tensor& G, int64_t max_sweeps, double tol) {
  check_input(G, max_sweeps, tol);
  // the solvers count sweeps in an int: a bound past INT_MAX is no bound, not its low 32 bits
  // (2**32 truncated to 0 sweeps and returned G's diagonal as the eigenvalues)
  max_sweeps = std::min<int64_t>(max_sweeps, INT_MAX);
  if (G.is_cuda()) {
#ifdef Q3R_WITH_CUDA
    return eigh_cuda(G, max_sweeps, tol);
#else
    TORCH_CHECK(false, "batched_eigh: this q3r._C was built without CUDA support");
#endif
  }
  TORCH_CHECK(G.device().is_cpu(), "batched_eigh: unsupported device ", G.device());
  return eigh_cpu(G, max_sweeps, tol);
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef Q3R_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "q3r native extension: batched parallel-order cyclic Jacobi eigensolver";
  m.def("batched_eigh", &batched_eigh, pybind11::arg("G"), pybind11::arg("max_sweeps"), pybind11::arg("tol"),
        "Eigen-decomposition of a batch of symmetric float32 matrices (batch, k, k): returns "
        "(evals (batch, k) descending, evecs (batch, k, k) with eigenvectors as columns, sweeps (batch,) int32)");
  m.def("build_info", &build_info, "Which parts (cpu, cuda) this binary was built with");
  m.attr("source_digest") = Q3R_STRINGIFY(Q3R_SOURCE_DIGEST);
}
