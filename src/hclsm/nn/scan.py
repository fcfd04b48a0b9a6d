"""Selective scan: the recurrence at the heart of a Mamba-style SSM, behind one function.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (per channel d, state n)
    y_t = sum_n C_t[n] * h_t[d, n]

Shapes are time-major with channels last, like every (B, T, ...) tensor in hclsm:
``u``, ``delta`` (B, L, D); ``A`` (D, N) (negative); ``B``, ``C`` (B, L, N); optional ``initial_state``
(B, D, N). Returns ``y`` (B, L, D) in ``u``'s dtype and, with ``return_state``, the final state (B, D, N)
in fp32. The recurrence always runs in fp32 (bf16 decays lose the state within a few dozen steps).

Backends (``backend=``): ``"reference"`` is the readable sequential loop (autograd through it);
``"auto"`` picks the fastest backend available for the tensors' device.
"""
from __future__ import annotations

import torch

BACKENDS = ("auto", "reference")


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, initial_state: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential definition, one step at a time in fp32 (autograd records every step)."""
    bsz, length, d = u.shape
    u, delta, B, C, A = u.float(), delta.float(), B.float(), C.float(), A.float()
    h = u.new_zeros(bsz, d, A.shape[1]) if initial_state is None else initial_state.float()
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)  # (B, D, N)
        h = decay * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, dim=1), h


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   initial_state: torch.Tensor | None = None, return_state: bool = False, backend: str = "auto"):
    """Run the selective scan with ``backend`` (see the module docstring for shapes)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    y, h = selective_scan_reference(u, delta, A, B, C, initial_state)
    y = y.to(u.dtype)
    return (y, h) if return_state else y
