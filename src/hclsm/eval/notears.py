"""Linear NOTEARS (Zheng et al., NeurIPS 2018): a structure-learning baseline run on true trajectories.

``notears_linear(X)`` fits a weighted adjacency ``W`` (d x d, ``W[i, j]`` = edge i -> j) to samples
``X`` (n x d) by minimising the least-squares score of the linear SEM ``X ~ X W`` plus ``lambda1 |W|_1``
subject to ``h(W) = tr(exp(W * W)) - d = 0`` (acyclic), with the augmented Lagrangian
``f + alpha h + rho / 2 h^2``. ``W`` is split into non-negative parts ``W+ - W-`` so the l1 term is
smooth and L-BFGS-B with bounds solves each inner problem; the diagonal is held at 0. After each inner
solve ``rho`` grows tenfold until h fell below a quarter of its previous value, then ``alpha += rho h``.
Weights with ``|w| < w_threshold`` are cut at the end. Defaults are the paper's demo (lambda1 0.1,
threshold 0.3).

``trajectory_graph`` applies it to one physics episode: the variables are the objects, the samples are
frames x coordinates of the chosen kinematic quantity (positions, velocities or accelerations by finite
differences), the reference's state-based route to a graph without perception.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import expm
from scipy.optimize import minimize

KINEMATICS = ("position", "velocity", "acceleration")


def notears_linear(x: np.ndarray, lambda1: float = 0.1, w_threshold: float = 0.3, max_iter: int = 100,
                   h_tol: float = 1e-8, rho_max: float = 1e16) -> np.ndarray:
    """X (n, d) samples -> W (d, d) float64, ``W[i, j] != 0`` for an edge i -> j (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    x = x - x.mean(axis=0, keepdims=True)
    rho, alpha, h = 1.0, 0.0, np.inf

    def adjacency(w: np.ndarray) -> np.ndarray:
        return (w[:d * d] - w[d * d:]).reshape(d, d)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        a = adjacency(w)
        resid = x - x @ a  # (n, d)
        loss = 0.5 / n * float((resid ** 2).sum())
        e = expm(a * a)  # (d, d)
        h_a = float(np.trace(e)) - d
        grad = -x.T @ resid / n + (rho * h_a + alpha) * e.T * a * 2.0  # (d, d)
        value = loss + 0.5 * rho * h_a * h_a + alpha * h_a + lambda1 * float(w.sum())
        return value, np.concatenate([grad.ravel() + lambda1, -grad.ravel() + lambda1])

    diag = np.eye(d, dtype=bool).ravel()
    bounds = [(0.0, 0.0) if on_diag else (0.0, None) for on_diag in np.concatenate([diag, diag])]
    w = np.zeros(2 * d * d)
    for _ in range(max_iter):
        while rho < rho_max:
            sol = minimize(objective, w, jac=True, method="L-BFGS-B", bounds=bounds)
            a = adjacency(sol.x)
            h_new = float(np.trace(expm(a * a))) - d
            if h_new > 0.25 * h:
                rho *= 10.0
            else:
                break
        w, h = sol.x, h_new
        alpha += rho * h
        if h <= h_tol or rho >= rho_max:
            break
    a = adjacency(w)
    a[np.abs(a) < w_threshold] = 0.0
    return a


def trajectory_samples(positions: np.ndarray, kind: str) -> np.ndarray:
    """positions (T, K, 2) of one episode -> samples (n, K): the ``kind`` quantity (see ``KINEMATICS``) of every
    frame and coordinate, frames where an object is missing (NaN) dropped."""
    if kind not in KINEMATICS:
        raise ValueError(f"kind must be one of {KINEMATICS}, got {kind!r}")
    q = np.asarray(positions, dtype=np.float64)
    for _ in range(KINEMATICS.index(kind)):
        q = q[1:] - q[:-1]  # finite differences per frame
    samples = q.transpose(0, 2, 1).reshape(-1, q.shape[1])  # (T' * 2, K)
    return samples[np.isfinite(samples).all(axis=1)]


def trajectory_graph(positions: np.ndarray, kind: str = "velocity", lambda1: float = 0.1,
                     w_threshold: float = 0.3) -> np.ndarray:
    """NOTEARS on one episode's true trajectories -> (K, K) bool, [i, j] = edge i -> j. The samples are
    standardised per object, so the threshold is in units of the objects' own spread."""
    x = trajectory_samples(positions, kind)
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
    return notears_linear(x, lambda1=lambda1, w_threshold=w_threshold) != 0.0
