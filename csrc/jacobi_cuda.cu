// CUDA implementation of the batched parallel-order cyclic Jacobi eigensolver: one thread
// block per matrix.  Same rounds, pairs, thresholds and rotations as jacobi_cpu.cpp.
//
// Memory: A lives in dynamic shared memory when k*k floats fit (opt-in limit, 227 KB on
// H100: k <= ~235); larger k work on a global copy of A (it stays hot in L2).  The
// eigenvector accumulator Vt joins A in shared memory when both fit (k <= 169 on H100, the
// sketch width of a rank-153 ViT-B / GPT-2 target), else it lives in global memory, rows
// contiguous, so the row rotations of a round are coalesced.
//
// Index spaces are walked with Walk2D (no integer division inside the loops): a 64-bit
// division per element cost more than the rotation itself.
//
// A round: (1) threads m/2 plan the disjoint rotations from the current A; (2) every 2 x 2
// block (pair a rows, pair b columns) gets J_a^T X J_b in registers -- no second pass and no
// barrier between the row and column updates; (3) the rows of Vt are rotated, a warp per pair.  Blocks whose
// two pairs are both idle are skipped, which is what makes warm-started (nearly diagonal)
// inputs cheap, and rounds in which no pair rotates skip both walks.

#include <algorithm>

#include "jacobi_common.h"
#include "jacobi_cuda.h"

namespace q3r_jacobi {
namespace {

constexpr int kMaxThreads = 1024;

// A round's rotation of one pair, read as one 128-bit shared-memory access instead of four
// 32-bit ones. The walks are bound by shared-memory traffic, and these reads were about a third
// of it (by a count of wavefronts, not a measurement); a warp that reads one pair for all its
// lanes (the A walk's row pair, the Vt walk's pair) can get it as a single broadcast.
struct __align__(16) PairPlan {
  float c, s;
  int p, q;
};

struct SharedPlan {
  PairPlan* pairs;
  float* new_pp;
  float* new_qq;
  int* rank;
};

__device__ SharedPlan carve_plan(float* base, int m, int k) {
  SharedPlan plan;
  int half = m / 2;
  plan.pairs = reinterpret_cast<PairPlan*>(base);  // the dynamic shared memory is 16-byte aligned
  plan.new_pp = base + 4 * half;
  plan.new_qq = base + 5 * half;
  plan.rank = reinterpret_cast<int*>(base + 6 * half);  // k entries, used at the end
  return plan;
}

// Row-major walk of a rows x cols index space with a stride of nthreads elements, starting
// at element `start`: i, j advance by a precomputed step, so the loop body divides nothing.
struct Walk2D {
  int i, j, di, dj, cols;
  __device__ Walk2D(int start, int stride, int cols_)
      : i(start / cols_), j(start % cols_), di(stride / cols_), dj(stride % cols_), cols(cols_) {}
  __device__ void next() {
    i += di;
    j += dj;
    if (j >= cols) {
      j -= cols;
      ++i;
    }
  }
};

__host__ __device__ long plan_floats(int k) {
  int m = k + (k & 1);
  return 6L * (m / 2) + k;
}

// 1024 threads per block leave at most 64 registers a thread: the bound makes the compiler
// keep to them (a launch with more would fail)
// A matrix may be served by several blocks (see choose_layout): each runs the same rounds on
// its own copy of A -- the same arithmetic, so the copies stay equal bit for bit -- and keeps
// only `vt_cols` columns of Vt, those from part * vt_cols; the first block writes the
// eigenvalues. A batch too small to fill the GPU then fills more of it, and each block's Vt
// walk shrinks.
__global__ void __launch_bounds__(kMaxThreads) jacobi_kernel(const float* __restrict__ G, float* __restrict__ evals,
                              float* __restrict__ evecs, int* __restrict__ sweeps_out,
                              float* __restrict__ vt_work, float* __restrict__ a_work, int k,
                              int max_sweeps, float tol, bool a_in_shared,
                              bool vt_in_shared, int vt_cols) {
  extern __shared__ __align__(16) float smem[];
  __shared__ unsigned int max_diag_bits;
  const long kk = static_cast<long>(k) * k;
  const int parts = (k + vt_cols - 1) / vt_cols;
  const int b = blockIdx.x / parts, part = blockIdx.x % parts;
  const int j0 = part * vt_cols, wj = min(vt_cols, k - j0);  // this block's columns of Vt
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int m = k + (k & 1);
  const int half = m / 2;

  SharedPlan plan = carve_plan(smem, m, k);
  // (global A or Vt only with one block per matrix: choose_layout)
  float* A = a_in_shared ? smem + plan_floats(k) : a_work + b * kk;
  float* Vt = vt_in_shared ? smem + plan_floats(k) + kk : vt_work + b * kk;
  const float* Gb = G + b * kk;

  if (tid == 0) max_diag_bits = 0u;
  __syncthreads();
  for (Walk2D w(tid, nthreads, k); w.i < k; w.next()) {
    const int i = w.i, j = w.j, e = i * k + j;
    float g = Gb[e];
    A[e] = g;
    // |x| of a float orders like its bit pattern, so an integer max finds the largest diagonal
    if (i == j) atomicMax(&max_diag_bits, __float_as_uint(fabsf(g)));
  }
  for (Walk2D w(tid, nthreads, wj); w.i < k; w.next()) Vt[w.i * wj + w.j] = (w.i == j0 + w.j) ? 1.0f : 0.0f;
  __syncthreads();
  const float floor = absolute_floor(__uint_as_float(max_diag_bits));

  int sweep = 0;
  for (; k >= 2 && sweep < max_sweeps; ++sweep) {
    int above = 0;
    for (Walk2D w(tid, nthreads, k); w.i < k && !above; w.next()) {
      const int i = w.i, j = w.j;
      if (j > i && needs_rotation(A[i * k + i], A[j * k + j], A[i * k + j], tol, floor)) above = 1;
    }
    if (!__syncthreads_or(above)) break;

    for (int round = 0; round < m - 1; ++round) {
      int rotates = 0;
      for (int table = tid; table < half; table += nthreads) {
        int p, q;
        round_pair(table, round, m, &p, &q);
        float c = 1.0f, s = 0.0f, npp = 0.0f, nqq = 0.0f;
        if (q < k) {
          float app = A[p * k + p], aqq = A[q * k + q], apq = A[p * k + q];
          if (needs_rotation(app, aqq, apq, tol, floor)) {
            float t;
            rotation(app, aqq, apq, &c, &s, &t);
            npp = app - t * apq;
            nqq = aqq + t * apq;
            rotates = 1;
          }
        }
        plan.pairs[table] = PairPlan{c, s, p, q};
        plan.new_pp[table] = npp;
        plan.new_qq[table] = nqq;
      }
      // A round with no rotation changes nothing: skip its two walks (most rounds of the last
      // sweep of a warm start, ~4 of 10 of the block's work there).  The barrier is the
      // same one (its result is uniform across the block), and nothing reads the plan after it.
      if (!__syncthreads_or(rotates)) continue;

      for (Walk2D w(tid, nthreads, half); w.i < half; w.next()) {
        const int ta = w.i, tb = w.j;
        const PairPlan row = plan.pairs[ta], col = plan.pairs[tb];
        const float ca = row.c, sa = row.s, cb = col.c, sb = col.s;
        bool act_a = sa != 0.0f, act_b = sb != 0.0f;
        if (!act_a && !act_b) continue;
        const int pa = row.p, qa = row.q, pb = col.p, qb = col.q;
        if (ta == tb) {  // the rotated 2 x 2 block is known exactly
          A[pa * k + pa] = plan.new_pp[ta];
          A[qa * k + qa] = plan.new_qq[ta];
          A[pa * k + qa] = 0.0f;
          A[qa * k + pa] = 0.0f;
          continue;
        }
        bool qa_ok = qa < k, qb_ok = qb < k;  // idle dummy pairs have c = 1, s = 0
        float x00 = A[pa * k + pb];
        float x01 = qb_ok ? A[pa * k + qb] : 0.0f;
        float x10 = qa_ok ? A[qa * k + pb] : 0.0f;
        float x11 = (qa_ok && qb_ok) ? A[qa * k + qb] : 0.0f;
        // right: columns (pb, qb) <- (c x_p - s x_q, s x_p + c x_q)
        float y00 = cb * x00 - sb * x01, y01 = sb * x00 + cb * x01;
        float y10 = cb * x10 - sb * x11, y11 = sb * x10 + cb * x11;
        // left: rows (pa, qa) likewise
        A[pa * k + pb] = ca * y00 - sa * y10;
        if (qb_ok) A[pa * k + qb] = ca * y01 - sa * y11;
        if (qa_ok) A[qa * k + pb] = sa * y00 + ca * y10;
        if (qa_ok && qb_ok) A[qa * k + qb] = sa * y01 + ca * y11;
      }

      // One warp per pair, its lanes along the row: the pair's plan is read once per warp and
      // pair, not once per element (the kernel is bound by shared-memory wavefronts, and the
      // per-element plan reads were half of this walk's), and an idle pair costs its warp one
      // branch instead of k / 32 masked iterations.
      for (int ta = tid / 32; ta < half; ta += nthreads / 32) {
        const PairPlan pair = plan.pairs[ta];
        const float ca = pair.c, sa = pair.s;
        if (sa == 0.0f) continue;
        const int p = pair.p, q = pair.q;
        for (int j = tid % 32; j < wj; j += 32) {
          float x = Vt[p * wj + j], y = Vt[q * wj + j];
          Vt[p * wj + j] = ca * x - sa * y;
          Vt[q * wj + j] = sa * x + ca * y;
        }
      }
      __syncthreads();
    }
  }

  // Sort descending by counting: rank(i) = #{j : d_j > d_i, or d_j == d_i and j < i}.
  for (int i = tid; i < k; i += nthreads) {
    float di = A[i * k + i];
    int r = 0;
    for (int j = 0; j < k; ++j) {
      float dj = A[j * k + j];
      r += (dj > di) || (dj == di && j < i);
    }
    plan.rank[i] = r;
  }
  __syncthreads();
  if (part == 0)
    for (int i = tid; i < k; i += nthreads) evals[static_cast<long>(b) * k + plan.rank[i]] = A[i * k + i];
  for (Walk2D w(tid, nthreads, wj); w.i < k; w.next()) {
    const int i = w.i, row = j0 + w.j;  // Vt row i = eigenvector i
    evecs[b * kk + static_cast<long>(row) * k + plan.rank[i]] = Vt[i * wj + w.j];
  }
  if (tid == 0 && part == 0) sweeps_out[b] = sweep;
}

constexpr int kMaxParts = 4;  // blocks per matrix at most

size_t shared_bytes(int k, bool a_in_shared, int vt_cols_in_shared) {
  size_t floats = plan_floats(k) + (a_in_shared ? static_cast<size_t>(k) * k : 0) +
                  static_cast<size_t>(vt_cols_in_shared) * k;
  return floats * sizeof(float);
}

struct Layout {
  bool a_in_shared, vt_in_shared;
  int vt_cols;  // columns of Vt per block: k, or less when several blocks share a matrix
  size_t smem;
};

// Where A and Vt live, and how many blocks serve a matrix: more than one only when the batch
// leaves SMs idle and A and the block's share of Vt fit in its opt-in shared memory.
Layout choose_layout(int k, long batch, int device) {
  int optin = 0, sms = 1;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) optin = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 1;
  // leave room for the kernel's static __shared__ word
  auto fits = [&](size_t bytes) { return bytes + 64 <= static_cast<size_t>(optin); };
  long parts = std::min<long>(kMaxParts, std::max<long>(1, sms / std::max<long>(batch, 1)));
  for (; parts > 1; --parts) {
    int cols = static_cast<int>((k + parts - 1) / parts);
    if (cols < k && fits(shared_bytes(k, true, cols))) return {true, true, cols, shared_bytes(k, true, cols)};
  }
  if (fits(shared_bytes(k, true, k))) return {true, true, k, shared_bytes(k, true, k)};
  if (fits(shared_bytes(k, true, 0))) return {true, false, k, shared_bytes(k, true, 0)};
  return {false, false, k, shared_bytes(k, false, 0)};
}

}  // namespace

long cuda_global_floats_per_matrix(int k, int device) {
  return choose_layout(k, 1, device).a_in_shared ? 0L : static_cast<long>(k) * k;
}

cudaError_t batched_eigh_cuda(const float* G, float* evals, float* evecs, int* sweeps,
                              float* vt_work, float* a_work, long batch, int k, int max_sweeps,
                              float tol, int device, cudaStream_t stream) {
  if (batch == 0 || k == 0) return cudaSuccess;
  const Layout layout = choose_layout(k, batch, device);
  cudaError_t err = cudaFuncSetAttribute(jacobi_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(layout.smem));
  if (err != cudaSuccess) return err;
  int m = k + (k & 1);
  long work = std::max(static_cast<long>(m / 2) * (m / 2), static_cast<long>(k));
  int threads = static_cast<int>(std::min<long>(kMaxThreads, ((work + 31) / 32) * 32));
  const long parts = (k + layout.vt_cols - 1) / layout.vt_cols;
  jacobi_kernel<<<static_cast<unsigned int>(batch * parts), threads, layout.smem, stream>>>(
      G, evals, evecs, sweeps, vt_work, a_work, k, max_sweeps, tol, layout.a_in_shared, layout.vt_in_shared,
      layout.vt_cols);
  return cudaGetLastError();
}

}  // namespace q3r_jacobi
