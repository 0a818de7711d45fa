// CPU implementation of the batched parallel-order cyclic Jacobi eigensolver.
// It runs the same rounds, pairs, thresholds and rotations as jacobi_cuda.cu, so CI (which
// has no GPU) tests the numerics of the native algorithm on every run.  One matrix per task
// of at::parallel_for; within a matrix the round's rotations are applied row phase, then
// column phase (the CUDA kernel applies both to 2 x 2 blocks at once: same math, different
// rounding order).

#include "jacobi_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "jacobi_common.h"

namespace q3r_jacobi {
namespace {

struct Rotation {
  int p, q;
  bool active;
  float c, s, new_pp, new_qq;
};

bool any_above_threshold(const float* A, int k, float tol, float floor) {
  for (int i = 0; i < k; ++i)
    for (int j = i + 1; j < k; ++j)
      if (needs_rotation(A[i * k + i], A[j * k + j], A[i * k + j], tol, floor)) return true;
  return false;
}

void plan_round(const float* A, int k, int m, int round, float tol, float floor,
                std::vector<Rotation>& rots) {
  for (int table = 0; table < m / 2; ++table) {
    Rotation& r = rots[table];
    round_pair(table, round, m, &r.p, &r.q);
    r.active = false;
    r.c = 1.0f;
    r.s = 0.0f;
    if (r.q >= k) continue;  // the dummy player of an odd k sits this round out
    float app = A[r.p * k + r.p], aqq = A[r.q * k + r.q], apq = A[r.p * k + r.q];
    if (!needs_rotation(app, aqq, apq, tol, floor)) continue;
    float t;
    rotation(app, aqq, apq, &r.c, &r.s, &t);
    r.active = true;
    r.new_pp = app - t * apq;
    r.new_qq = aqq + t * apq;
  }
}

// rows p, q of a row-major matrix with `cols` columns: row_p <- c row_p - s row_q, row_q <- s row_p + c row_q
void rotate_rows(float* M, int cols, const Rotation& r) {
  float* rp = M + static_cast<long>(r.p) * cols;
  float* rq = M + static_cast<long>(r.q) * cols;
  for (int j = 0; j < cols; ++j) {
    float x = rp[j], y = rq[j];
    rp[j] = r.c * x - r.s * y;
    rq[j] = r.s * x + r.c * y;
  }
}

// Returns the number of sweeps performed.  A (k x k, row-major) is overwritten: its diagonal
// holds the eigenvalues; Vt (k x k) receives the eigenvectors as rows.
int solve_one(float* A, float* Vt, int k, int max_sweeps, float tol) {
  std::fill(Vt, Vt + static_cast<long>(k) * k, 0.0f);
  for (int i = 0; i < k; ++i) Vt[i * k + i] = 1.0f;
  if (k < 2) return 0;
  const int m = k + (k & 1);
  float max_diag = 0.0f;
  for (int i = 0; i < k; ++i) max_diag = std::max(max_diag, std::fabs(A[i * k + i]));
  const float floor = absolute_floor(max_diag);
  std::vector<Rotation> rots(m / 2);
  int sweep = 0;
  for (; sweep < max_sweeps; ++sweep) {
    if (!any_above_threshold(A, k, tol, floor)) break;
    for (int round = 0; round < m - 1; ++round) {
      plan_round(A, k, m, round, tol, floor, rots);
      for (const Rotation& r : rots)
        if (r.active) {
          rotate_rows(A, k, r);
          rotate_rows(Vt, k, r);
        }
      for (int i = 0; i < k; ++i) {  // column phase, row by row for locality
        float* row = A + static_cast<long>(i) * k;
        for (const Rotation& r : rots) {
          if (!r.active) continue;
          float x = row[r.p], y = row[r.q];
          row[r.p] = r.c * x - r.s * y;
          row[r.q] = r.s * x + r.c * y;
        }
      }
      for (const Rotation& r : rots) {  // the 2 x 2 block is known exactly: no rounding residue
        if (!r.active) continue;
        A[r.p * k + r.p] = r.new_pp;
        A[r.q * k + r.q] = r.new_qq;
        A[r.p * k + r.q] = 0.0f;
        A[r.q * k + r.p] = 0.0f;
      }
    }
  }
  return sweep;
}

}  // namespace

void batched_eigh_cpu(const float* G, float* evals, float* evecs, int* sweeps, long batch, int k,
                      int max_sweeps, float tol) {
  const long kk = static_cast<long>(k) * k;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> A(kk), Vt(kk);
    std::vector<int> order(k);
    for (int64_t b = begin; b < end; ++b) {
      std::copy(G + b * kk, G + (b + 1) * kk, A.begin());
      sweeps[b] = solve_one(A.data(), Vt.data(), k, max_sweeps, tol);
      std::iota(order.begin(), order.end(), 0);
      // descending eigenvalues; ties keep their index order
      std::stable_sort(order.begin(), order.end(),
                       [&](int x, int y) { return A[x * k + x] > A[y * k + y]; });
      float* w = evals + b * k;
      float* E = evecs + b * kk;
      for (int col = 0; col < k; ++col) {
        int src = order[col];
        w[col] = A[src * k + src];
        for (int row = 0; row < k; ++row) E[row * k + col] = Vt[src * k + row];
      }
    }
  });
}

}  // namespace q3r_jacobi
