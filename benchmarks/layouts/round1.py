"""Micro-benchmark of candidate layouts/tilings for the per-step Q3R GEMMs (ViT-B shapes)."""
import os, sys, time, itertools
import torch, triton, triton.language as tl
from triton.testing import do_bench

@triton.jit
def proj_b_kernel(X, V, B, m, n, k, sxb, sx, svb, svr, svk, sbb, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, VT: tl.constexpr, ALIGN: tl.constexpr):
    """B[b] = X[b] @ V[b]; V given as (n, k) with strides (svr, svk); VT: load as (BK, BN) then trans."""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    nkc = tl.cdiv(k, BK)
    offs_m = (pid // nkc) * BM + tl.arange(0, BM)
    offs_k = (pid % nkc) * BK + tl.arange(0, BK)
    X += b * sxb; V += b * svb; B += b * sbb
    if ALIGN:
        sx = tl.multiple_of(sx, 16)
    acc = tl.zeros((BM, BK), tl.float32)
    for c0 in range(0, n, BN):
        offs_n = c0 + tl.arange(0, BN)
        x = tl.load(X + offs_m[:, None] * sx + offs_n[None, :], mask=offs_m[:, None] < m)
        if VT:
            vt = tl.load(V + offs_k[:, None] * svk + offs_n[None, :] * svr, mask=offs_k[:, None] < k)
            v = tl.trans(vt)
        else:
            v = tl.load(V + offs_n[:, None] * svr + offs_k[None, :] * svk, mask=offs_k[None, :] < k)
        acc = tl.dot(x, v, acc, input_precision=PREC)
    tl.store(B + offs_m[:, None] * k + offs_k[None, :], acc, mask=(offs_m[:, None] < m) & (offs_k[None, :] < k))

@triton.jit
def proj_a_kernel(X, U, A, m, n, k, sxb, sx, sub, sur, suk, sab, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, MODE: tl.constexpr):
    """A^T[b] = X[b]^T @ U[b] stored as At (n, k). MODE 0: ut (BK,BM) @ x (BM,BN) -> (BK,BN) stored transposed;
    MODE 1: trans(x) (BN,BM) @ u (BM,BK)."""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    nkc = tl.cdiv(k, BK)
    offs_n = (pid // nkc) * BN + tl.arange(0, BN)
    offs_k = (pid % nkc) * BK + tl.arange(0, BK)
    X += b * sxb; U += b * sub; A += b * sab
    if MODE == 0:
        acc = tl.zeros((BK, BN), tl.float32)
    else:
        acc = tl.zeros((BN, BK), tl.float32)
    for r0 in range(0, m, BM):
        offs_m = r0 + tl.arange(0, BM)
        x = tl.load(X + offs_m[:, None] * sx + offs_n[None, :], mask=offs_m[:, None] < m)
        if MODE == 0:
            ut = tl.load(U + offs_k[:, None] * suk + offs_m[None, :] * sur, mask=(offs_k[:, None] < k) & (offs_m[None, :] < m))
            acc = tl.dot(ut, x, acc, input_precision=PREC)
        else:
            u = tl.load(U + offs_m[:, None] * sur + offs_k[None, :] * suk, mask=(offs_k[None, :] < k) & (offs_m[:, None] < m))
            acc = tl.dot(tl.trans(x), u, acc, input_precision=PREC)
    if MODE == 0:
        tl.store(A + offs_n[None, :] * k + offs_k[:, None], acc, mask=offs_k[:, None] < k)
    else:
        tl.store(A + offs_n[:, None] * k + offs_k[None, :], acc, mask=offs_k[None, :] < k)

@triton.jit
def apply_kernel(X, Out, L1, R1, L2, R2, m, n, k, sxb, sx, slb, srb, sl, sr, PREC: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, RT: tl.constexpr, EVEN_K: tl.constexpr, GROUP: tl.constexpr,
                 G=None, M=None, S=None, ADAM: tl.constexpr = False):
    """Out = X + L1 @ R1^T + L2 @ R2^T with L* (m, k) and R* (n, k) row-major (row stride sl / sr)
    (RT: R* given as (k, n) row-major instead, stride sr)."""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    nct = tl.cdiv(n, BN)
    if GROUP > 1:
        nrt = tl.cdiv(m, BM)
        per = GROUP * nct
        g = pid // per
        first = g * GROUP
        gs = tl.minimum(nrt - first, GROUP)
        rt = first + (pid % per) % gs
        ct = (pid % per) // gs
    else:
        rt = pid // nct
        ct = pid % nct
    offs_m = rt * BM + tl.arange(0, BM)
    offs_n = ct * BN + tl.arange(0, BN)
    X += b * sxb; Out += b * sxb
    L1 += b * slb; L2 += b * slb; R1 += b * srb; R2 += b * srb
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, k, BK):
        offs_k = k0 + tl.arange(0, BK)
        km = offs_k < k
        if EVEN_K:
            l1 = tl.load(L1 + offs_m[:, None] * sl + offs_k[None, :])
            l2 = tl.load(L2 + offs_m[:, None] * sl + offs_k[None, :])
        else:
            l1 = tl.load(L1 + offs_m[:, None] * sl + offs_k[None, :], mask=km[None, :], other=0.0)
            l2 = tl.load(L2 + offs_m[:, None] * sl + offs_k[None, :], mask=km[None, :], other=0.0)
        if RT:
            r1 = tl.load(R1 + offs_k[:, None] * sr + offs_n[None, :], mask=km[:, None], other=0.0)
            r2 = tl.load(R2 + offs_k[:, None] * sr + offs_n[None, :], mask=km[:, None], other=0.0)
        else:
            if EVEN_K:
                r1 = tl.trans(tl.load(R1 + offs_n[:, None] * sr + offs_k[None, :]))
                r2 = tl.trans(tl.load(R2 + offs_n[:, None] * sr + offs_k[None, :]))
            else:
                r1 = tl.trans(tl.load(R1 + offs_n[:, None] * sr + offs_k[None, :], mask=km[None, :], other=0.0))
                r2 = tl.trans(tl.load(R2 + offs_n[:, None] * sr + offs_k[None, :], mask=km[None, :], other=0.0))
        acc = tl.dot(l1, r1, acc, input_precision=PREC)
        acc = tl.dot(l2, r2, acc, input_precision=PREC)
    offs = offs_m[:, None] * sx + offs_n[None, :]
    if ADAM:
        p = tl.load(X + offs)
        p = p * 0.999 - 1e-3 * (p + acc) * 0.2
        g = tl.load(G + b * sxb + offs)
        m1 = tl.load(M + b * sxb + offs)
        v1 = tl.load(S + b * sxb + offs)
        m1 = m1 + 0.1 * (g - m1)
        v1 = v1 * 0.999 + 0.001 * g * g
        p = p - 1e-3 * m1 / (tl.sqrt_rn(v1) + 1e-8)
        tl.store(X + offs, p)
        tl.store(M + b * sxb + offs, m1)
        tl.store(S + b * sxb + offs, v1)
    else:
        x = tl.load(X + offs)
        tl.store(Out + offs, x + acc)

GROUPS = [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)]
K = 153

def bench(fn):
    return do_bench(fn, warmup=5, rep=25)

def main():
    torch.manual_seed(0)
    dev = "cuda"
    prec_list = sys.argv[1].split(",") if len(sys.argv) > 1 else ["tf32x3", "tf32"]
    data = []
    for bsz, m, n in GROUPS:
        X = torch.randn(bsz, m, n, device=dev) * 0.02
        U = torch.linalg.qr(torch.randn(bsz, m, K, device=dev))[0].contiguous()
        V = torch.linalg.qr(torch.randn(bsz, n, K, device=dev))[0].contiguous()
        data.append((X, U, V))
    rows = []
    def record(name, ms, err):
        rows.append((name, ms, err)); print(f"{name:70s} {ms*1e3:9.1f} us  err {err:.2e}", flush=True)
    for prec in prec_list:
        # speed of light: cuBLAS on the same GEMMs
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        t = 0
        for X, U, V in data:
            t += bench(lambda: torch.bmm(X, V)) + bench(lambda: torch.bmm(U.mT, X))
            L = torch.cat([U, U], -1); R = torch.cat([V, V], -1)
            t += bench(lambda: torch.baddbmm(X, L, R.mT))
        record(f"cublas {prec} proj B + proj A + apply(K=2k) [allow_tf32={prec=='tf32'}]", t, 0.0)
        torch.backends.cuda.matmul.allow_tf32 = False
        # projection B variants
        for (bm, bn, bk, vt, kpad, w, st) in [(64, 64, 64, 0, 0, 8, 3), (64, 64, 64, 0, 1, 8, 3), (64, 64, 64, 1, 1, 8, 3),
                                              (128, 64, 64, 1, 1, 8, 3), (128, 32, 128, 1, 1, 8, 3), (128, 64, 128, 1, 1, 8, 2),
                                              (64, 32, 256, 1, 1, 8, 2), (128, 64, 64, 0, 1, 8, 3), (128, 32, 64, 1, 1, 4, 4)]:
            t, err = 0, 0
            try:
                for X, U, V in data:
                    bsz, m, n = X.shape
                    kp = (K + 31) // 32 * 32 if kpad else K
                    Vs = torch.zeros(bsz, kp, n, device=dev) if vt else torch.zeros(bsz, n, kp, device=dev)
                    if vt: Vs[:, :K] = V.mT
                    else: Vs[:, :, :K] = V
                    svr, svk = (1, n) if vt else (kp, 1)
                    Bo = torch.empty(bsz, m, K, device=dev)
                    grid = (triton.cdiv(m, bm) * triton.cdiv(K, bk), bsz)
                    f = lambda: proj_b_kernel[grid](X, Vs, Bo, m, n, K, X.stride(0), X.stride(1), Vs.stride(0), svr, svk, Bo.stride(0),
                                                    prec, bm, bn, bk, vt, bool(kpad), num_warps=w, num_stages=st)
                    f(); t += bench(f)
                    err = max(err, ((Bo - X @ V).norm() / (X @ V).norm()).item())
                record(f"projB {prec} BM{bm} BN{bn} BK{bk} vt{vt} kpad{kpad} w{w} s{st}", t, err)
            except Exception as e:
                print("projB fail", bm, bn, bk, vt, kpad, type(e).__name__, str(e)[:200])
        # projection A variants
        for (bm, bn, bk, mode, utp, w, st) in [(64, 64, 64, 0, 0, 8, 3), (64, 64, 64, 1, 0, 8, 3), (64, 128, 64, 1, 1, 8, 3),
                                               (64, 128, 128, 1, 1, 8, 2), (32, 128, 64, 1, 1, 4, 4), (64, 64, 64, 0, 1, 8, 3),
                                               (64, 128, 64, 0, 1, 8, 3)]:
            t, err = 0, 0
            try:
                for X, U, V in data:
                    bsz, m, n = X.shape
                    if utp:  # U^T packed (kp, m)
                        kp = (K + 31) // 32 * 32
                        Us = torch.zeros(bsz, kp, m, device=dev); Us[:, :K] = U.mT; sur, suk = 1, m
                    else:
                        Us = U; sur, suk = K, 1
                    Ao = torch.empty(bsz, n, K, device=dev)
                    grid = (triton.cdiv(n, bn) * triton.cdiv(K, bk), bsz)
                    f = lambda: proj_a_kernel[grid](X, Us, Ao, m, n, K, X.stride(0), X.stride(1), Us.stride(0), sur, suk, Ao.stride(0),
                                                    prec, bm, bn, bk, mode, num_warps=w, num_stages=st)
                    f(); t += bench(f)
                    ref = X.mT @ U
                    err = max(err, ((Ao - ref).norm() / ref.norm()).item())
                record(f"projA {prec} BM{bm} BN{bn} BK{bk} mode{mode} utpack{utp} w{w} s{st}", t, err)
            except Exception as e:
                print("projA fail", bm, bn, bk, mode, utp, type(e).__name__, str(e)[:200])
        # apply variants
        for (bm, bn, bk, rt, kpad, grp, w, st) in [(64, 64, 16, 1, 0, 1, 8, 3), (64, 64, 16, 0, 0, 1, 8, 3), (64, 64, 32, 0, 1, 1, 8, 3),
                                                   (128, 64, 32, 0, 1, 1, 8, 3), (128, 128, 32, 0, 1, 1, 8, 3), (128, 128, 32, 0, 1, 8, 8, 3),
                                                   (128, 64, 32, 0, 1, 8, 4, 4), (128, 128, 64, 0, 1, 1, 8, 2), (64, 128, 32, 0, 1, 1, 4, 4),
                                                   (128, 128, 16, 0, 1, 1, 8, 4)]:
            t, err = 0, 0
            try:
                for X, U, V in data:
                    bsz, m, n = X.shape
                    kp = (K + 31) // 32 * 32 if kpad else K
                    Lp = torch.zeros(bsz, m, kp, device=dev); Lp[..., :K] = U
                    if rt:
                        Rp = torch.zeros(bsz, kp, n, device=dev); Rp[:, :K] = V.mT; sr = n
                    else:
                        Rp = torch.zeros(bsz, n, kp, device=dev); Rp[..., :K] = V; sr = kp
                    Out = torch.empty_like(X)
                    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), bsz)
                    even = bool(kpad) and kp % bk == 0
                    f = lambda: apply_kernel[grid](X, Out, Lp, Rp, Lp, Rp, m, n, kp, X.stride(0), X.stride(1), Lp.stride(0),
                                                   Rp.stride(0), kp, sr, prec, bm, bn, bk, rt, even, grp, num_warps=w, num_stages=st)
                    f(); t += bench(f)
                    ref = X + 2 * U @ V.mT
                    err = max(err, ((Out - ref).norm() / (ref - X).norm()).item())
                record(f"apply {prec} BM{bm} BN{bn} BK{bk} rt{rt} kpad{kpad} grp{grp} w{w} s{st}", t, err)
            except Exception as e:
                print("apply fail", bm, bn, bk, rt, kpad, type(e).__name__, str(e)[:300])
    print("sum over the 3 ViT-B shape groups (48x768^2, 12x3072x768, 12x768x3072), k=153")

if __name__ == "__main__":
    main()
