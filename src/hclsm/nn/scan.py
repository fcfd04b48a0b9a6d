"""Selective scan: the recurrence at the heart of a Mamba-style SSM, behind one function.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (per channel d, state n)
    y_t = sum_n C_t[n] * h_t[d, n]

Shapes are time-major with channels last, like every (B, T, ...) tensor in hclsm:
``u``, ``delta`` (B, L, D); ``A`` (D, N) (negative); ``B``, ``C`` (B, L, N); optional ``initial_state``
(B, D, N). Returns ``y`` (B, L, D) in ``u``'s dtype and, with ``return_state``, the final state (B, D, N)
in fp32. The recurrence always runs in fp32 (bf16 decays lose the state within a few dozen steps).

Backends (``backend=``):

* ``"reference"``: the readable sequential loop (autograd through it).
* ``"chunked"``: the fast path for CPU (works on any device). The sequence is cut into tiles of batch
  rows x a few time steps, small enough to stay in cache (2 MB per tile buffer on CPU); a tile's decays
  and states are materialised in fp32 in preallocated buffers, stepped with one in-place ``addcmul_``
  per time step, and contracted with batched matmuls. The backward is hand-written: the reverse-time
  recurrence of dL/dh tile by tile (last tile first), recomputing each tile's states from the state that
  entered it (kept by the forward). Memory is the inputs plus one (B, D, N) state per time-tile boundary,
  as in the fused CUDA kernel; nothing of size (B, L, D, N) is allocated.
* ``"triton"``: a fused GPU kernel (``hclsm.nn.scan_triton``; needs the ``triton`` package).
* ``"auto"``: ``"triton"`` for CUDA tensors when triton imports, else ``"chunked"``.

Decays are computed as ``exp2(delta * A * log2(e))`` (as the CUDA kernel does): PyTorch's fp32 ``exp2`` is
about 4x faster than ``exp`` on CPU; the two differ by about |delta * A| ulp, well inside the tests'
1e-5 tolerance for any decay that is not already negligible.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.autograd.function import once_differentiable

BACKENDS = ("auto", "reference", "chunked", "triton")
LOG2E = math.log2(math.e)
_TILE_ELEMENTS = {"cpu": 1 << 19}  # elements per (rows, steps, N, D) tile buffer: 2 MB, in cache on CPU (measured)
_MAX_TILE_ELEMENTS = 1 << 26  # other devices: large tiles, few kernel launches
_TILE_STEPS = 8  # preferred steps per tile: more rows per step amortise the per-op cost of the time loops


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
    if not ys:  # an empty sequence: no outputs (still in the graph of u and delta), the state is the initial one
        return (delta * u)[:, :0], h
    return torch.stack(ys, dim=1), h


def _tile_shape(bsz: int, length: int, step_elements: int, device: torch.device) -> tuple[int, int]:
    """(batch rows, time steps) per tile, so that one tile buffer holds about the device's tile size:
    up to ``_TILE_STEPS`` steps of as many rows as fit, longer tiles when the rows run out."""
    budget = _TILE_ELEMENTS.get(device.type, _MAX_TILE_ELEMENTS)
    rows = max(1, min(bsz, budget // (min(length, _TILE_STEPS) * step_elements)))
    return rows, max(1, min(length, budget // (rows * step_elements)))


def _tile_states(u: torch.Tensor, delta: torch.Tensor, A2: torch.Tensor, B: torch.Tensor,
                 h0: torch.Tensor | None, decay: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Fill ``decay`` with one tile's decays and ``H`` with its states, both (b, l, N, D); returns delta * u.

    ``u``, ``delta`` (b, l, D) and ``B`` (b, l, N) are fp32, ``A2`` is ``A * log2(e)`` as (N, D), ``h0``
    is the state entering the tile as (b, N, D) or None for zeros.
    """
    z = delta * u
    torch.mul(delta[:, :, None, :], A2, out=decay).exp2_()
    torch.mul(z[:, :, None, :], B[:, :, :, None], out=H)
    if h0 is not None:
        H[:, 0].addcmul_(decay[:, 0], h0)
    hs, decays = H.unbind(1), decay.unbind(1)
    for t in range(1, len(hs)):
        hs[t].addcmul_(decays[t], hs[t - 1])
    return z


def _buffers(count: int, elements: int, like: torch.Tensor) -> list[torch.Tensor]:
    return [torch.empty(elements, dtype=torch.float32, device=like.device) for _ in range(count)]


def _view(buf: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first prod(shape) elements of a flat workspace buffer, as a contiguous tensor of ``shape``."""
    return buf[:math.prod(shape)].view(shape)


class _ChunkedScan(torch.autograd.Function):
    """The ``"chunked"`` backend: cache-sized tiles, a hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        bsz, length, d = u.shape
        n = A.shape[1]
        rows, steps = _tile_shape(bsz, length, n * d, u.device)
        starts = range(0, length, steps)
        A2 = (A.float() * LOG2E).t().contiguous()
        keep = any(ctx.needs_input_grad)
        y = u.new_empty(bsz, length, d)
        h_last = torch.empty(bsz, n, d, dtype=torch.float32, device=u.device)
        ckpt = torch.empty(len(starts) - 1 if keep else 0, bsz, n, d, dtype=torch.float32, device=u.device)
        decay_buf, H_buf = _buffers(2, rows * steps * n * d, u)
        for r0 in range(0, bsz, rows):
            rs = slice(r0, r0 + rows)
            h = None if h0 is None else h0[rs].float().transpose(1, 2)
            for i, t0 in enumerate(starts):
                ts = slice(t0, t0 + steps)
                if i and keep:
                    ckpt[i - 1, rs] = h
                b, l = u[rs, ts].shape[:2]
                H = _view(H_buf, b, l, n, d)
                _tile_states(u[rs, ts].float(), delta[rs, ts].float(), A2, B[rs, ts].float(), h,
                             _view(decay_buf, b, l, n, d), H)
                y[rs, ts] = torch.bmm(C[rs, ts].float().reshape(b * l, 1, n), H.view(b * l, n, d)).view(b, l, d)
                h = h_last[rs]
                h.copy_(H[:, -1])
        ctx.save_for_backward(u, delta, A, B, C, h0, ckpt)
        ctx.tile = rows, steps
        return y, h_last.transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        with torch.autocast(dy.device.type, enabled=False):  # .backward() may be called under autocast
            return _chunked_backward(*ctx.saved_tensors, *ctx.tile, dy, dh_last)


def _chunked_backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      h0: torch.Tensor | None, ckpt: torch.Tensor, rows: int, steps: int, dy: torch.Tensor,
                      dh_last: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``_ChunkedScan`` w.r.t. (u, delta, A, B, C, h0): tiles of ``rows`` x ``steps``, last first."""
    bsz, length, d = u.shape
    n = A.shape[1]
    starts = range(0, length, steps)
    A2 = (A.float() * LOG2E).t().contiguous()
    At = A.float().t().contiguous()
    f32 = dict(dtype=torch.float32, device=u.device)
    du = torch.empty(bsz, length, d, **f32)
    ddelta, dB, dC = torch.empty_like(du), torch.empty(bsz, length, n, **f32), torch.empty(bsz, length, n, **f32)
    dA = torch.zeros(1, n * d, **f32)  # the gradient of A, transposed and flattened
    ones = torch.ones(1, rows * steps, **f32)  # sums over a tile's (row, step) pairs as a matmul
    dh0 = None if h0 is None else torch.empty(bsz, n, d, **f32)
    decay_buf, H_buf, G_buf, tmp_buf = _buffers(4, rows * steps * n * d, u)
    carry = torch.empty(rows, n, d, **f32)
    for r0 in range(0, bsz, rows):
        rs = slice(r0, r0 + rows)
        dh = dh_last[rs].float().transpose(1, 2)  # autograd passes zeros when the state is unused
        for i in reversed(range(len(starts))):
            ts = slice(starts[i], starts[i] + steps)
            u_t, delta_t, B_t, C_t = u[rs, ts].float(), delta[rs, ts].float(), B[rs, ts].float(), C[rs, ts].float()
            dy_t = dy[rs, ts].float()
            b, l = u_t.shape[:2]
            if i:
                h_in = ckpt[i - 1, rs]
            else:
                h_in = None if h0 is None else h0[rs].float().transpose(1, 2)
            decay, H, G, tmp = (_view(buf, b, l, n, d) for buf in (decay_buf, H_buf, G_buf, tmp_buf))
            z = _tile_states(u_t, delta_t, A2, B_t, h_in, decay, H)
            # G_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) G_{t+1}; dh carries the last term into the tile
            torch.mul(dy_t[:, :, None, :], C_t[:, :, :, None], out=G)
            G[:, -1].add_(dh)
            gs, decays = G.unbind(1), decay.unbind(1)
            for t in range(l - 1, 0, -1):
                gs[t - 1].addcmul_(decays[t], gs[t])
            M = decay.mul_(G)  # exp(delta_t A) G_t, then times h_{t-1}: dL/d(delta_t A)
            dh = carry[:b]
            dh.copy_(M[:, 0])
            M[:, 1:].mul_(H[:, :-1])
            if h_in is None:
                M[:, 0].zero_()
            else:
                M[:, 0].mul_(h_in)
            bl = b * l
            dC[rs, ts] = torch.bmm(dy_t.reshape(bl, 1, d), H.view(bl, n, d).transpose(1, 2)).view(b, l, n)
            dB[rs, ts] = torch.bmm(z.view(bl, 1, d), G.view(bl, n, d).transpose(1, 2)).view(b, l, n)
            dz = torch.bmm(B_t.reshape(bl, 1, n), G.view(bl, n, d)).view(b, l, d)
            torch.mul(dz, delta_t, out=du[rs, ts])
            torch.sum(torch.mul(M, At, out=tmp), -2, out=ddelta[rs, ts]).addcmul_(dz, u_t)
            dA.addmm_(ones[:, :bl], torch.mul(M, delta_t[:, :, None, :], out=tmp).view(bl, n * d))
        if dh0 is not None:
            dh0[rs] = dh
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.view(n, d).t().to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if dh0 is None else dh0.transpose(1, 2).to(h0.dtype))


@functools.cache
def triton_available() -> bool:
    """Whether the ``"triton"`` backend can be used (the ``triton`` package imports)."""
    try:
        import hclsm.nn.scan_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_shapes(u, delta, A, B, C, initial_state) -> None:
    bsz, length, d = u.shape
    n = A.shape[-1]
    expected = {"delta": (delta, (bsz, length, d)), "A": (A, (d, n)), "B": (B, (bsz, length, n)),
                "C": (C, (bsz, length, n))}
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (bsz, d, n))
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {shape}")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   initial_state: torch.Tensor | None = None, return_state: bool = False, backend: str = "auto"):
    """Run the selective scan with ``backend`` (see the module docstring for shapes).

    Any strides are accepted (non-contiguous inputs are copied for the tiled backends), and so are empty
    sizes: an empty sequence gives no outputs and returns ``initial_state`` (zeros without one)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_shapes(u, delta, A, B, C, initial_state)
    if backend == "auto":
        backend = "triton" if u.is_cuda and triton_available() else "chunked"
    if backend == "triton" and not triton_available():
        raise ImportError("selective_scan backend 'triton' needs the triton package (pip install triton)")
    if backend != "reference":
        if min(*u.shape, A.shape[-1]) == 0:  # nothing to scan: the fast paths assume every size >= 1
            backend = "reference"
        else:  # the tiled kernels index memory as contiguous (B, L, D) / (B, L, N) rows; a copy only when needed
            u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
            initial_state = None if initial_state is None else initial_state.contiguous()
    with torch.autocast(u.device.type, enabled=False):  # fp32 on purpose: autocast would run the contractions in bf16
        if backend == "reference":
            y, h = selective_scan_reference(u, delta, A, B, C, initial_state)
        elif backend == "chunked":
            y, h = _ChunkedScan.apply(u, delta, A, B, C, initial_state)
        else:
            from hclsm.nn.scan_triton import selective_scan_triton
            y, h = selective_scan_triton(u, delta, A, B, C, initial_state)
    y = y.to(u.dtype)
    return (y, h) if return_state else y
