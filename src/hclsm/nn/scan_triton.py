"""The ``"triton"`` selective-scan backend: fused forward and backward GPU kernels.

Same contract as :func:`hclsm.nn.scan.selective_scan` (shapes in its module docstring). Importing this
module imports ``triton``; :mod:`hclsm.nn.scan` does so only when the backend is asked for. With
``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter (how the tests check
them on a machine without a GPU).

Both kernels run one program per (batch row, block of ``BLOCK_D`` channels) and keep the program's
(BLOCK_D, N) state in registers while they walk the sequence, so the (B, L, D, N) decays and states are
never written in full:

* forward: a time loop that streams u, delta, B, C in and y out, and writes the state entering every
  chunk of ``chunk`` steps (about sqrt(L)) as a checkpoint when a backward will follow;
* backward: chunks in reverse; each chunk's states are recomputed from its checkpoint into a small
  per-program scratch, then a reverse-time loop carries dL/dh_t (``dh``) and produces du and d(delta)
  directly, per-program partial sums of dA, and per-(row, channel block) partial sums of dB and dC,
  which are reduced by the caller (deterministic: no atomics).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

LOG2E = math.log2(math.e)


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, h_last_ptr, ckpt_ptr,
                     L, D, N, n_chunks, chunk,
                     HAS_H0: tl.constexpr, KEEP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_ok, n_ok = d < D, n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    dn = d[:, None] * N + n[None, :]
    A2 = tl.load(A_ptr + dn, mask=dn_ok, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
    if HAS_H0:
        h = tl.load(h0_ptr + b * D * N + dn, mask=dn_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(0, n_chunks):
        if KEEP:
            tl.store(ckpt_ptr + (b * n_chunks + c) * D * N + dn, h, mask=dn_ok)
        for t in range(c * chunk, tl.minimum(c * chunk + chunk, L)):
            row = b * L + t
            u = tl.load(u_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(y_ptr + row * D + d, tl.sum(h * Ct[None, :], axis=1), mask=d_ok)
    tl.store(h_last_ptr + b * D * N + dn, h, mask=dn_ok)


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, dh_last_ptr, ckpt_ptr, scratch_ptr,
                     du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dh0_ptr,
                     L, D, N, n_chunks, chunk,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    n_dblocks = tl.num_programs(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_ok, n_ok = d < D, n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    dn = d[:, None] * N + n[None, :]
    A = tl.load(A_ptr + dn, mask=dn_ok, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634  # log2(e)
    # this program's scratch: the states entering each step of the current chunk, (chunk, BLOCK_D, BLOCK_N)
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    scratch = scratch_ptr + (b * n_dblocks + pd) * chunk * BLOCK_D * BLOCK_N + tile
    part = (b * n_dblocks + pd) * L  # row of the (B, n_dblocks, L, N) partial sums of dB and dC
    dh = tl.load(dh_last_ptr + b * D * N + dn, mask=dn_ok, other=0.0).to(tl.float32)  # dL/dh_t, carried back
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * chunk
        steps = tl.minimum(chunk, L - t0)
        h = tl.load(ckpt_ptr + (b * n_chunks + c) * D * N + dn, mask=dn_ok, other=0.0)
        for k in range(0, steps):
            row = b * L + t0 + k
            u = tl.load(u_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(scratch + k * BLOCK_D * BLOCK_N, h)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        tl.debug_barrier()
        for kk in range(0, steps):
            k = steps - 1 - kk
            t = t0 + k
            row = b * L + t
            u = tl.load(u_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)
            h_prev = tl.load(scratch + k * BLOCK_D * BLOCK_N)
            decay = tl.exp2(dt[:, None] * A2)
            g = dh + dy[:, None] * Ct[None, :]  # dL/dh_t
            m = g * decay * h_prev  # dL/d(delta_t * A)
            dz = tl.sum(g * Bt[None, :], axis=1)  # dL/d(delta_t * u_t)
            tl.store(du_ptr + row * D + d, dz * dt, mask=d_ok)
            tl.store(ddelta_ptr + row * D + d, dz * u + tl.sum(m * A, axis=1), mask=d_ok)
            dA += m * dt[:, None]
            tl.store(dB_ptr + (part + t) * N + n, tl.sum(g * (dt * u)[:, None], axis=0), mask=n_ok)
            tl.store(dC_ptr + (part + t) * N + n, tl.sum(h * dy[:, None], axis=0), mask=n_ok)
            dh = g * decay
            h = h_prev
        tl.debug_barrier()  # the next chunk's recompute overwrites the scratch
    tl.store(dh0_ptr + b * D * N + dn, dh, mask=dn_ok)
    tl.store(dA_ptr + b * D * N + dn, dA, mask=dn_ok)


def _config(length: int, d: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_N, chunk, n_chunks): about 1024 state elements per program, chunks of ~sqrt(L) steps."""
    block_n = triton.next_power_of_2(n)
    block_d = min(triton.next_power_of_2(d), max(4, 1024 // block_n))
    chunk = math.isqrt(max(length, 1) - 1) + 1  # ceil(sqrt(L))
    return block_d, block_n, chunk, triton.cdiv(length, chunk)


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        u, delta, A, B, C = (x.contiguous() for x in (u, delta, A, B, C))
        h0 = None if h0 is None else h0.contiguous()
        bsz, length, d = u.shape
        n = A.shape[1]
        block_d, block_n, chunk, n_chunks = _config(length, d, n)
        keep = any(ctx.needs_input_grad)
        y = torch.empty_like(u)
        h_last = torch.empty(bsz, d, n, dtype=torch.float32, device=u.device)
        ckpt = torch.empty(bsz, n_chunks if keep else 0, d, n, dtype=torch.float32, device=u.device)
        _scan_fwd_kernel[(bsz, triton.cdiv(d, block_d))](
            u, delta, A, B, C, h_last if h0 is None else h0, y, h_last, ckpt, length, d, n, n_chunks, chunk,
            HAS_H0=h0 is not None, KEEP=keep, BLOCK_D=block_d, BLOCK_N=block_n)
        ctx.save_for_backward(u, delta, A, B, C, ckpt)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return y, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        u, delta, A, B, C, ckpt = ctx.saved_tensors
        bsz, length, d = u.shape
        n = A.shape[1]
        block_d, block_n, chunk, n_chunks = _config(length, d, n)
        n_dblocks = triton.cdiv(d, block_d)
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA, dh0 = torch.empty(bsz, d, n, **f32), torch.empty(bsz, d, n, **f32)
        dB, dC = torch.empty(bsz, n_dblocks, length, n, **f32), torch.empty(bsz, n_dblocks, length, n, **f32)
        scratch = torch.empty(bsz * n_dblocks * chunk * block_d * block_n, **f32)
        _scan_bwd_kernel[(bsz, n_dblocks)](
            u, delta, A, B, C, dy.contiguous(), dh_last.float().contiguous(), ckpt, scratch,
            du, ddelta, dA, dB, dC, dh0, length, d, n, n_chunks, chunk, BLOCK_D=block_d, BLOCK_N=block_n)
        return (du, ddelta, dA.sum(0).to(A.dtype), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype),
                None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype))


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, initial_state: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in u's dtype, final fp32 state), differentiable in every input."""
    if not u.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton selective-scan backend needs CUDA tensors (got {u.device}; "
                         "TRITON_INTERPRET=1 runs it on CPU tensors, slowly)")
    return _TritonScan.apply(u, delta, A, B, C, initial_state)
