"""Small models and independent oracles shared by the tests."""

from __future__ import annotations

import math

import torch
from torch import nn


class Attention(nn.Module):
    """Shaped like timm's vision_transformer.Attention: fused qkv (3d, d) and num_heads."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(C // self.num_heads)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A two-block transformer on token sequences, with a classifier head."""

    def __init__(self, dim: int = 24, heads: int = 2, depth: int = 2, in_dim: int = 5, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def dense_reweighting(W_anchor: torch.Tensor, eps: float, X: torch.Tensor) -> torch.Tensor:
    """R(X) from explicit d x d matrices, in float64: the textbook form of SPEC section 2."""
    W = W_anchor.double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    keep = S > eps
    U, S, V = U[:, keep], S[keep], Vh[keep].T
    d = eps / S - 1
    left = torch.eye(W.shape[0], dtype=torch.float64) + U @ torch.diag(d) @ U.T
    right = torch.eye(W.shape[1], dtype=torch.float64) + V @ torch.diag(d) @ V.T
    return left @ X.double() @ right


def sigma_next(W: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(W.double())
    return float(s[rank]) if s.numel() > rank else 0.0


def train_to_first_warm_refresh(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor):
    """Train 5 steps on batches of 64 (the order of the long-run probes: a permutation from
    seed 1), so that the refresh of step 5 is due; returns its target weights (copies), slice
    states (copies) and slice configs, in the order a refresh takes them."""
    import copy

    from q3r.targets import slice_views

    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    for step in range(5):
        idx = perm[64 * step: 64 * (step + 1)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    weights, states, configs = [], [], []
    for group in opt.param_groups:
        for p in group["params"]:
            if group.get("q3r"):
                weights += [v.detach().clone() for v in slice_views(p, group["slice_dim"], group["slices"])]
                states += copy.deepcopy(opt.state[p]["q3r"])
                configs += opt._group_configs(group, p)
    return weights, states, configs
