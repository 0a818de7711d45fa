// The pieces of the parallel-order cyclic Jacobi eigensolver that the CPU and CUDA
// implementations share, so that both run the same rotations in the same order.
//
// Algorithm (symmetric A, k x k, eigenvectors accumulated as the rows of Vt):
//   pad k to an even m; one sweep = m - 1 rounds of the round-robin ("circle method",
//   Brent-Luk) tournament; in a round the m/2 pairs (p, q) are disjoint, so all their
//   rotations are computed from the same A and applied at once:
//       A <- J^T A J,   Vt <- J^T Vt,   J = the product of the round's Givens rotations.
//   A pair is rotated only when |a_pq| > tol * sqrt(|a_pp a_qq|) and above an absolute
//   floor; a sweep starts only if some pair is above threshold.  The relative criterion
//   keeps small eigenvalues of graded (Gram) matrices accurate; the floor stops rounding
//   noise next to zero eigenvalues from keeping the iteration alive.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define Q3R_HD __host__ __device__ __forceinline__
#else
#define Q3R_HD inline
#endif

namespace q3r_jacobi {

// Player sitting at `position` (0 .. m-1) in round `round` (0 .. m-2) of the circle method:
// player 0 stays, the others rotate.  Position i plays position m - 1 - i.
Q3R_HD int player_at(int position, int round, int m) {
  if (position == 0) return 0;
  return 1 + (position - 1 + round) % (m - 1);
}

// The pair played at table `table` (0 .. m/2 - 1) in `round`, ordered p < q.
Q3R_HD void round_pair(int table, int round, int m, int* p, int* q) {
  int a = player_at(table, round, m);
  int b = player_at(m - 1 - table, round, m);
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// Whether a_pq is large enough to rotate away.
Q3R_HD bool needs_rotation(float app, float aqq, float apq, float tol, float abs_floor) {
  float mag = fabsf(apq);
  // (the square roots taken apart: |a_pp a_qq| overflows float32 once the diagonal passes
  // ~1.8e19, and against an infinite bound no pair would ever be rotated)
  return mag > abs_floor && mag > tol * (sqrtf(fabsf(app)) * sqrtf(fabsf(aqq)));
}

// Rutishauser's stable rotation that zeroes a_pq:
//   theta = (a_qq - a_pp) / (2 a_pq),  t = sign(theta) / (|theta| + sqrt(theta^2 + 1)),
//   c = 1 / sqrt(t^2 + 1),  s = t c;  then a_pp -= t a_pq, a_qq += t a_pq, a_pq = 0.
// With J = [[c, s], [-s, c]] on rows/columns (p, q), J^T A J has a zero (p, q) entry.
Q3R_HD void rotation(float app, float aqq, float apq, float* c, float* s, float* t) {
  float theta = (aqq - app) / (2.0f * apq);
  float tt;
  if (fabsf(theta) > 1e18f) {
    tt = 0.5f / theta;  // theta^2 would overflow; t ~ 1 / (2 theta)
  } else {
    tt = 1.0f / (fabsf(theta) + sqrtf(theta * theta + 1.0f));
    if (theta < 0.0f) tt = -tt;
  }
  float cc = 1.0f / sqrtf(tt * tt + 1.0f);
  *c = cc;
  *s = tt * cc;
  *t = tt;
}

// Default absolute floor for |a_pq|: far below anything fp32 can resolve next to the
// largest diagonal entry, and never zero.
Q3R_HD float absolute_floor(float max_abs_diag) {
  const float tiny = 1.17549435e-38f;  // FLT_MIN
  float f = 1e-12f * max_abs_diag;
  return f > tiny ? f : tiny;
}

}  // namespace q3r_jacobi
