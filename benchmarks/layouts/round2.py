"""Round 2: direct (unpadded) factors vs packed, Adam epilogue, gram tiles."""
import sys
import torch, triton, triton.language as tl
from round1 import proj_b_kernel, proj_a_kernel, apply_kernel, GROUPS, K, bench

@triton.jit
def gram_kernel(U, B, C, m, k, sub, sur, suk, sbb, scb, PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """C^T[j, i] = sum_r U[r, i] B[r, j], B (m, k) row-major, stored transposed."""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    nkc = tl.cdiv(k, BK)
    offs_i = (pid // nkc) * BK + tl.arange(0, BK)
    offs_j = (pid % nkc) * BK + tl.arange(0, BK)
    U += b * sub; B += b * sbb; C += b * scb
    acc = tl.zeros((BK, BK), tl.float32)
    for r0 in range(0, m, BM):
        offs_m = r0 + tl.arange(0, BM)
        bt = tl.load(B + offs_m[None, :] * k + offs_j[:, None], mask=offs_j[:, None] < k, other=0.0)  # (BK_j, BM)
        u = tl.load(U + offs_m[:, None] * sur + offs_i[None, :] * suk, mask=offs_i[None, :] < k, other=0.0)  # (BM, BK_i)
        acc = tl.dot(bt, u, acc, input_precision=PREC)
    tl.store(C + offs_j[:, None] * k + offs_i[None, :], acc, mask=(offs_j[:, None] < k) & (offs_i[None, :] < k))

def main():
    torch.manual_seed(0)
    dev = "cuda"
    data = []
    for bsz, m, n in GROUPS:
        X = torch.randn(bsz, m, n, device=dev) * 0.02
        U = torch.linalg.qr(torch.randn(bsz, m, K, device=dev))[0].contiguous()
        V = torch.linalg.qr(torch.randn(bsz, n, K, device=dev))[0].contiguous()
        data.append((X, U, V))
    def record(name, ms, err):
        print(f"{name:72s} {ms*1e3:9.1f} us  err {err:.2e}", flush=True)
    kp = (K + 31) // 32 * 32
    for prec in sys.argv[1].split(","):
        # projB direct V (n, k) vs padded
        for (bm, bn, bk, kpad, w, st) in [(128, 64, 64, 0, 8, 3), (128, 64, 64, 1, 8, 3), (128, 64, 32, 0, 8, 4), (128, 32, 64, 0, 8, 4),
                                          (256, 32, 64, 0, 8, 3), (128, 64, 128, 0, 8, 2)]:
            t = err = 0
            try:
                for X, U, V in data:
                    bsz, m, n = X.shape
                    if kpad:
                        Vs = torch.zeros(bsz, n, kp, device=dev); Vs[..., :K] = V
                    else:
                        Vs = V
                    Bo = torch.empty(bsz, m, K, device=dev)
                    grid = (triton.cdiv(m, bm) * triton.cdiv(K, bk), bsz)
                    f = lambda: proj_b_kernel[grid](X, Vs, Bo, m, n, K, X.stride(0), X.stride(1), Vs.stride(0), Vs.stride(1), 1, Bo.stride(0),
                                                    prec, bm, bn, bk, 0, True, num_warps=w, num_stages=st)
                    f(); t += bench(f)
                    err = max(err, ((Bo - X @ V).norm() / (X @ V).norm()).item())
                record(f"projB {prec} BM{bm} BN{bn} BK{bk} kpad{kpad} w{w} s{st}", t, err)
            except Exception as e:
                print("projB fail", bm, bn, bk, kpad, type(e).__name__, str(e)[:200])
        # projA mode1: U direct (m,k) [MN-major], U padded (m,kp) [MN-major], Ut (kp,m) [K-major]
        for (bm, bn, bk, lay, w, st) in [(32, 128, 64, "direct", 4, 4), (32, 128, 64, "pad", 4, 4), (32, 128, 64, "ut", 4, 4),
                                         (64, 128, 64, "direct", 8, 3), (32, 256, 64, "ut", 8, 3), (64, 64, 64, "ut", 4, 4),
                                         (32, 128, 32, "direct", 4, 4)]:
            t = err = 0
            try:
                for X, U, V in data:
                    bsz, m, n = X.shape
                    if lay == "ut":
                        Us = torch.zeros(bsz, kp, m, device=dev); Us[:, :K] = U.mT; sur, suk = 1, m
                    elif lay == "pad":
                        Us = torch.zeros(bsz, m, kp, device=dev); Us[..., :K] = U; sur, suk = kp, 1
                    else:
                        Us = U; sur, suk = K, 1
                    Ao = torch.empty(bsz, n, K, device=dev)
                    grid = (triton.cdiv(n, bn) * triton.cdiv(K, bk), bsz)
                    f = lambda: proj_a_kernel[grid](X, Us, Ao, m, n, K, X.stride(0), X.stride(1), Us.stride(0), sur, suk, Ao.stride(0),
                                                    prec, bm, bn, bk, 1, num_warps=w, num_stages=st)
                    f(); t += bench(f)
                    ref = X.mT @ U
                    err = max(err, ((Ao - ref).norm() / ref.norm()).item())
                record(f"projA {prec} BM{bm} BN{bn} BK{bk} {lay} w{w} s{st}", t, err)
            except Exception as e:
                print("projA fail", bm, bn, bk, lay, type(e).__name__, str(e)[:200])
        # gram
        for (bm, bk, w, st) in [(64, 64, 4, 3), (32, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3)]:
            t = err = 0
            for X, U, V in data:
                bsz, m, n = X.shape
                Bm = X @ V
                Ct = torch.empty(bsz, K, K, device=dev)
                grid = (triton.cdiv(K, bk) ** 2, bsz)
                f = lambda: gram_kernel[grid](U, Bm, Ct, m, K, U.stride(0), K, 1, Bm.stride(0), Ct.stride(0), prec, bm, bk, num_warps=w, num_stages=st)
                f(); t += bench(f)
                ref = (U.mT @ Bm).mT
                err = max(err, ((Ct - ref).norm() / ref.norm()).item())
            record(f"gram {prec} BM{bm} BK{bk} w{w} s{st}", t, err)
        # apply: direct unpadded factors (masked) vs padded, plain and with Adam epilogue
        for (bm, bn, bk, kpad, adam, w, st) in [(128, 128, 32, 1, 0, 8, 3), (128, 128, 32, 0, 0, 8, 3), (128, 64, 32, 0, 0, 8, 3),
                                                (128, 128, 32, 1, 1, 8, 3), (128, 64, 32, 1, 1, 8, 3), (128, 128, 32, 0, 1, 8, 3),
                                                (128, 64, 32, 0, 1, 8, 3), (64, 128, 32, 1, 1, 4, 3), (128, 128, 16, 1, 1, 8, 4),
                                                (128, 64, 32, 1, 1, 4, 3)]:
            t = err = 0
            try:
                for X, U, V in data:
                    bsz, m, n = X.shape
                    kk = kp if kpad else K
                    if kpad:
                        Lp = torch.zeros(bsz, m, kp, device=dev); Lp[..., :K] = U
                        Rp = torch.zeros(bsz, n, kp, device=dev); Rp[..., :K] = V
                    else:
                        Lp, Rp = U, V
                    Xc = X.clone()
                    Out = torch.empty_like(X)
                    G = torch.randn_like(X); M = torch.zeros_like(X); S = torch.zeros_like(X)
                    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), bsz)
                    even = bool(kpad) and kp % bk == 0
                    f = lambda: apply_kernel[grid](Xc, Out, Lp, Rp, Lp, Rp, m, n, kk, X.stride(0), X.stride(1), Lp.stride(0),
                                                   Rp.stride(0), kk, kk, prec, bm, bn, bk, 0, even, 1, G, M, S, bool(adam),
                                                   num_warps=w, num_stages=st)
                    f(); t += bench(f)
                    if not adam:
                        ref = X + 2 * U @ V.mT
                        err = max(err, ((Out - ref).norm() / (ref - X).norm()).item())
                record(f"apply {prec} BM{bm} BN{bn} BK{bk} kpad{kpad} adam{adam} w{w} s{st}", t, err)
            except Exception as e:
                print("apply fail", bm, bn, bk, kpad, adam, type(e).__name__, str(e)[:300])
        # plain fused-Adam traffic alone (torch) for reference
        if prec == sys.argv[1].split(",")[0]:
            ps = [X.clone() for X, _, _ in data]; gs = [torch.randn_like(p) for p in ps]
            ms = [torch.zeros_like(p) for p in ps]; vs = [torch.zeros_like(p) for p in ps]
            st = [torch.tensor(1.0, device=dev) for _ in ps]
            f = lambda: torch._fused_adamw_(ps, gs, ms, vs, [], st, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.05, eps=1e-8,
                                            amsgrad=False, maximize=False)
            record("torch fused AdamW on the same tensors", bench(f), 0.0)

if __name__ == "__main__":
    main()
