"""Scorers: one score per (KV head, token) from the observation window's queries and the keys."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

def window_scores(
    q: torch.Tensor, k: torch.Tensor, kernel_size: int = 1, pooling: str = "avg"
) -> torch.Tensor:
    """psi[h, i] = sum over window queries j of attention(j -> i), averaged over the GQA group.

    ``q``: [Hq, Wq, D] post-RoPE queries of the last Wq prompt tokens (query head ``h*g + i`` belongs
    to KV head ``h``, as in vLLM/HF); ``k``: [H, N, D]. Causal: window query j sits at position
    N - Wq + j. Softmax in fp32 with scale 1/sqrt(D). Then optional 1-D pooling over the N - Wq
    tokens before the window with 'same' zero padding (left (k-1)//2, right k//2), as SnapKV and
    kvpress pool ``attn[..., :-window]``; the window's scores are returned unpooled. Returns
    float32 [H, N].
    """
    hq, wq, d = q.shape
    h, n, _ = k.shape
    if hq % h or not 1 <= wq <= n:
        raise ValueError(f"window_scores: q {tuple(q.shape)} incompatible with k {tuple(k.shape)}")
    g = hq // h
    logits = torch.matmul(q.float().reshape(h, g * wq, d) * d**-0.5, k.float().transpose(1, 2))
    # Only the last Wq keys can lie in a window query's future.
    future = torch.ones(wq, wq, dtype=torch.bool, device=k.device).triu_(1).repeat(g, 1)
    logits[:, :, n - wq :].masked_fill_(future, -math.inf)
    # softmax in place, then sum over rows as one mat-vec with 1/(Z*g): fewer passes over [H, g*Wq, N]
    logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    inv_z = logits.sum(-1).mul_(g).reciprocal_()
    psi = torch.bmm(inv_z[:, None, :], logits)[:, 0]
    if kernel_size <= 1 or n == wq:
        return psi
    # As SnapKV and kvpress: pool the keys before the window only (zero padding at the window
    # boundary); the window's own scores stay raw (every policy keeps the window anyway).
    return torch.cat([pool_scores(psi[:, : n - wq], kernel_size, pooling), psi[:, n - wq :]], dim=1)


def pool_scores(psi: torch.Tensor, kernel_size: int, pooling: str = "avg") -> torch.Tensor:
    """1-D pooling over the token axis of [H, N] scores, output length N (SnapKV's smoothing)."""
    if kernel_size <= 1:
        return psi
    x = F.pad(psi[:, None], ((kernel_size - 1) // 2, kernel_size // 2))  # scores >= 0: zero pad is safe
    if pooling == "avg":
        x = F.avg_pool1d(x, kernel_size, stride=1)
    elif pooling == "max":
        x = F.max_pool1d(x, kernel_size, stride=1)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return x[:, 0]


class Scorer(Protocol):
    def score(self, query: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor: ...


@dataclass
class WindowAttention:
    """Observation-window attention (SnapKV, MadaKV's psi; kernel_size=1 for H2O/LOOK-M)."""

    kernel_size: int = 5
    pooling: str = "avg"

    def score(self, query, key):
        return window_scores(query, key, self.kernel_size, self.pooling)


@dataclass
class Recency:
    """Later tokens first (StreamingLLM)."""

    def score(self, query, key):
        h, n, _ = key.shape
        return torch.arange(n, device=key.device, dtype=torch.float64).expand(h, n)


