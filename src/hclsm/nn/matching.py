"""Differentiable set alignment on device: log-domain Sinkhorn and a hard permutation from it.

Used wherever two slot sets must be put in correspondence (EMA target slots vs online slots, predicted
slots vs goal slots): ``sinkhorn`` gives the entropic optimal-transport plan between two equal-size
sets with uniform marginals, ``sinkhorn_match`` turns it into a permutation with no CPU round trip.
"""
from __future__ import annotations

import torch


def pairwise_cost(a: torch.Tensor, b: torch.Tensor, kind: str = "sqeuclidean") -> torch.Tensor:
    """(B, N, M) cost between rows of ``a`` (B, N, D) and ``b`` (B, M, D): squared distance or 1 - cosine."""
    if kind == "sqeuclidean":
        return torch.cdist(a.float(), b.float()).pow(2)
    if kind == "cosine":
        a = torch.nn.functional.normalize(a.float(), dim=-1)
        b = torch.nn.functional.normalize(b.float(), dim=-1)
        return 1 - a @ b.transpose(1, 2)
    raise ValueError(f"unknown cost kind {kind!r}; use 'sqeuclidean' or 'cosine'")


def sinkhorn(cost: torch.Tensor, epsilon: float = 0.05, iterations: int = 50) -> torch.Tensor:
    """Transport plan (B, N, M) with row sums 1/N and column sums 1/M for ``cost`` (B, N, M).

    Log-domain iterations in fp32 (stable for small ``epsilon``); the cost is scaled by its per-sample
    mean so ``epsilon`` is relative. Differentiable with respect to ``cost``.
    """
    c = cost.float()
    c = c / c.detach().flatten(1).mean(-1).clamp_min(1e-12)[:, None, None]
    n, m = c.shape[-2:]
    log_a = torch.full(c.shape[:-1], -float(torch.log(torch.tensor(float(n)))), device=c.device)
    log_b = torch.full(c.shape[:-2] + (m,), -float(torch.log(torch.tensor(float(m)))), device=c.device)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    k = -c / epsilon
    for _ in range(iterations):
        f = log_a - torch.logsumexp(k + g[:, None, :], dim=2)
        g = log_b - torch.logsumexp(k + f[:, :, None], dim=1)
    return torch.exp(k + f[:, :, None] + g[:, None, :])


def plan_to_permutation(plan: torch.Tensor) -> torch.Tensor:
    """(B, N) long: a one-to-one assignment ``perm[b, i] = j`` from a square plan (B, N, N).

    Greedy on the plan's entries in decreasing order (vectorised over the batch, N steps): on a plan
    that is close to a permutation matrix this is that permutation.
    """
    b, n, _ = plan.shape
    p = plan.detach().clone().float()
    perm = torch.full((b, n), -1, dtype=torch.long, device=p.device)
    rows = torch.arange(b, device=p.device)
    for _ in range(n):
        flat = p.flatten(1).argmax(dim=1)
        i, j = flat // n, flat % n
        perm[rows, i] = j
        p[rows, i, :] = -1.0
        p[rows, :, j] = -1.0
    return perm


def sinkhorn_match(a: torch.Tensor, b: torch.Tensor, kind: str = "sqeuclidean", epsilon: float = 0.05,
                   iterations: int = 50) -> torch.Tensor:
    """Permutation (B, N) aligning set ``b`` to set ``a`` (both (B, N, D)): ``b[perm[i]]`` matches ``a[i]``."""
    if a.shape != b.shape:
        raise ValueError(f"sinkhorn_match needs two sets of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return plan_to_permutation(sinkhorn(pairwise_cost(a, b, kind), epsilon, iterations))


def permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, ...) reordered along dim 1 by ``perm`` (B, N)."""
    idx = perm.reshape(perm.shape + (1,) * (x.dim() - 2)).expand(perm.shape + x.shape[2:])
    return x.gather(1, idx)
