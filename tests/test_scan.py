"""Selective-scan backends against the sequential reference: values, final state, every gradient, causality.

The ``"triton"`` backend runs on CUDA when there is a GPU, else through Triton's CPU interpreter
(``TRITON_INTERPRET=1`` while these tests run, on tiny shapes); it is skipped when ``triton`` is not
installed (it is not a test dependency: the wheel is ~290 MB, ~1 GB installed).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

from hclsm.nn import scan
from hclsm.nn.scan import selective_scan, selective_scan_reference
from hclsm.nn.ssm import SelectiveSSM

NAMES = ("u", "delta", "A", "B", "C", "initial_state")


@pytest.fixture(scope="module")
def triton_device() -> Iterator[str]:
    """The device the triton backend is tested on; without a GPU, Triton's interpreter is on for the module."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton to test the GPU kernel, in the interpreter on CPU)")
    if torch.cuda.is_available():
        yield "cuda"
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # read when the kernels are decorated and when they are launched
        yield "cpu"


@pytest.fixture(params=["reference", "chunked", "auto", "triton"])
def backend(request) -> tuple[str, str]:
    """(backend name, device)."""
    if request.param == "triton":
        return "triton", request.getfixturevalue("triton_device")
    return request.param, "cpu"


def inputs(bsz: int, length: int, d: int, n: int, dtype=torch.float32, h0: bool = True, device: str = "cpu",
           seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Leaf tensors with the ranges a Mamba block feeds the scan (delta > 0 from a softplus, A < 0)."""
    g = torch.Generator().manual_seed(seed)
    xs = {"u": torch.randn(bsz, length, d, generator=g),
          "delta": torch.nn.functional.softplus(torch.randn(bsz, length, d, generator=g) - 1),
          "A": -torch.rand(d, n, generator=g) * 2 - 0.05,
          "B": torch.randn(bsz, length, n, generator=g), "C": torch.randn(bsz, length, n, generator=g),
          "initial_state": torch.randn(bsz, d, n, generator=g) if h0 else None}
    return {k: None if v is None else v.to(device, dtype if k != "A" else torch.float32).requires_grad_()
            for k, v in xs.items()}


def run(xs: dict, backend: str, seed: int = 1, autocast: bool = False) -> dict[str, torch.Tensor]:
    """y, the final state and the gradient of a loss on both w.r.t. every input, in fp32 on CPU; with
    ``autocast`` the forward runs under bf16 autocast (the backward after it, as in training)."""
    for x in xs.values():
        if x is not None:
            x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, h = selective_scan(**xs, return_state=True, backend=backend)
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g).to(y.device)
    wh = torch.randn(h.shape, generator=g).to(h.device)
    ((y.float() * wy).sum() + (h * wh).sum()).backward()
    out = {"y": y, "state": h} | {f"d{k}": x.grad for k, x in xs.items() if x is not None}
    return {k: v.detach().float().cpu() for k, v in out.items()}


def assert_close(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        scale = want[k].abs().max().clamp_min(1e-6)
        err = (got[k] - want[k]).abs().max() / scale
        assert err <= tol, f"{k}: max error {err:.2e} of scale {scale:.2e} > {tol}"


@pytest.mark.parametrize("h0", [True, False])
def test_matches_reference_fp32(backend, h0):
    name, device = backend
    shape = (2, 5, 8, 4) if name == "triton" else (3, 11, 16, 8)
    xs = inputs(*shape, h0=h0, device=device)
    want = run(inputs(*shape, h0=h0), "reference")
    assert_close(run(xs, name), want, 1e-5)


def test_matches_reference_bf16(backend):
    """bf16 inputs: the scan still runs in fp32; y and the gradients come back in the inputs' dtypes."""
    name, device = backend
    shape = (2, 5, 8, 4) if name == "triton" else (3, 11, 16, 8)
    xs = inputs(*shape, dtype=torch.bfloat16, device=device)
    y, h = selective_scan(**xs, return_state=True, backend=name)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    got = run(xs, name)
    assert all(xs[k].grad.dtype == xs[k].dtype for k in NAMES)
    want = run({k: v.detach().float().requires_grad_() for k, v in xs.items()}, "reference")
    assert_close(got, want, 2e-2)


def test_triton_several_channel_blocks_and_odd_sizes(triton_device):
    """D split over 3 programs (partial dB/dC sums reduced), N not a power of two, L over 3 chunks."""
    xs = inputs(2, 7, 40, 33, device=triton_device)
    assert_close(run(xs, "triton"), run(inputs(2, 7, 40, 33), "reference"), 1e-5)


@pytest.mark.parametrize("tile, shape", [(2 * 9 * 16 * 8, (2, 9)), (2 * 8 * 16 * 8, (2, 8)), (4 * 16 * 8, (1, 4)),
                                         (16 * 8, (1, 1))])
def test_chunked_tiles(monkeypatch, tile, shape):
    """(rows, steps) tiles over 5 rows x 9 steps: partial row blocks, partial time tiles, 1-step tiles. The
    checkpointed states and the gradient carried between tiles give the result of one tile."""
    monkeypatch.setitem(scan._TILE_ELEMENTS, "cpu", tile)
    assert scan._tile_shape(5, 9, 16 * 8, torch.device("cpu")) == shape
    assert_close(run(inputs(5, 9, 16, 8), "chunked"), run(inputs(5, 9, 16, 8), "reference"), 1e-5)


def test_only_the_state_or_only_y_used():
    """Gradients flow when only the final state, or only y, is in the loss."""
    for backend in ("chunked", "reference"):
        xs = inputs(2, 6, 8, 4)
        y, h = selective_scan(**xs, return_state=True, backend=backend)
        h.sum().backward()
        assert xs["u"].grad is not None and xs["u"].grad[:, 0].abs().sum() > 0
    for backend in ("chunked", "reference"):
        xs = inputs(2, 6, 8, 4)
        selective_scan(**xs, backend=backend).sum().backward()
        assert xs["initial_state"].grad.abs().sum() > 0


def test_past_is_blind_to_the_future(backend):
    name, device = backend
    xs = {k: v.detach() for k, v in inputs(2, 8, 8, 4, device=device).items()}
    y = selective_scan(**xs, backend=name)
    t = 4
    late = {k: v.clone() for k, v in xs.items()}
    for k in ("u", "delta", "B", "C"):
        late[k][:, t + 1:] = late[k][:, t + 1:] * 3 + 1
    y2 = selective_scan(**late, backend=name)
    assert torch.equal(y[:, :t + 1], y2[:, :t + 1])
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_bad_arguments():
    xs = inputs(2, 4, 8, 4)
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(**xs, backend="pscan")
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(**(xs | {"B": xs["B"][..., :3]}))
    with pytest.raises(ValueError, match="initial_state has shape"):
        selective_scan(**(xs | {"initial_state": xs["initial_state"][:1]}))


@pytest.mark.parametrize("name", ["reference", "chunked"])
def test_autocast_does_not_lower_the_scan(name):
    """Under bf16 autocast (how training runs) the scan still runs in fp32, forward and backward."""
    assert_close(run(inputs(2, 6, 8, 4), name, autocast=True), run(inputs(2, 6, 8, 4), name), 1e-6)


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(scan, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="needs the triton package"):
        selective_scan(**inputs(1, 2, 4, 2), backend="triton")
    selective_scan(**inputs(1, 2, 4, 2), backend="auto")  # falls back to the CPU path


def test_reference_loop_is_the_definition():
    """One step by hand: h1 = exp(delta A) h0 + delta u B, y = C . h1."""
    xs = {k: v.detach() for k, v in inputs(1, 1, 3, 2).items()}
    y, h = selective_scan_reference(**xs)
    want = torch.exp(xs["delta"][0, 0, :, None] * xs["A"]) * xs["initial_state"][0] \
        + (xs["delta"] * xs["u"])[0, 0, :, None] * xs["B"][0, 0]
    assert torch.allclose(h[0], want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(y[0, 0], want @ xs["C"][0, 0], rtol=1e-6, atol=1e-6)


def test_ssm_block_backends_agree():
    torch.manual_seed(0)
    block = SelectiveSSM(d_model=16, d_state=8)
    seq = torch.randn(3, 10, 16)
    outs = []
    for backend in ("reference", "chunked"):
        block.zero_grad()
        out = block(seq, backend=backend)
        out.square().sum().backward()
        outs.append((out.detach(), block.A_log.grad.clone(), block.in_proj.weight.grad.clone()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bench_textbook_loop_is_the_same_scan():
    """The baseline ``hclsm bench scan`` times against computes the same y as the reference."""
    from hclsm.bench.scan import _textbook_loop

    xs = {k: v.detach() for k, v in inputs(2, 5, 4, 3).items() if k != "initial_state"}
    y, _ = selective_scan_reference(**xs)
    assert torch.allclose(_textbook_loop(**xs), y, rtol=1e-5, atol=1e-6)


# ---- odd tensors: the public function takes any strides and empty sizes ---------------------------------

def _strided(x: torch.Tensor | None, how: str) -> torch.Tensor | None:
    """The same values as ``x`` in a non-contiguous layout (a leaf, so its gradient is checked too)."""
    if x is None:
        return None
    if how == "transposed":  # stored (..., last, middle) and viewed back
        y = x.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    else:  # every other element of a twice-as-wide buffer
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x.detach()
        y = wide[..., ::2]
    assert not y.is_contiguous()
    return y.requires_grad_()


@pytest.mark.parametrize("backend_name", ["chunked", "reference"])
@pytest.mark.parametrize("how", ["transposed", "sliced"])
def test_non_contiguous_inputs(backend_name, how):
    """Issue 31: the chunked backend (the CPU default) failed in backward on a non-contiguous delta (a ``view``
    of its tiles). Every input non-contiguous: the same values and gradients as contiguous inputs."""
    want = run(inputs(3, 11, 5, 4), "reference")
    xs = {k: _strided(v, how) for k, v in inputs(3, 11, 5, 4).items()}
    assert_close(run(xs, backend_name), want, 1e-5)
    xs = inputs(3, 11, 5, 4)
    xs["delta"] = _strided(xs["delta"], how)  # the reported case: delta alone
    assert_close(run(xs, backend_name), want, 1e-5)


@pytest.mark.parametrize("backend_name", ["chunked", "reference", "auto"])
@pytest.mark.parametrize("shape", [(0, 5, 4, 3), (2, 0, 4, 3), (2, 5, 0, 3), (2, 5, 4, 0)],
                         ids=["no-batch", "no-steps", "no-channels", "no-state"])
def test_empty_sizes(backend_name, shape):
    """Empty batch, sequence, channels or state: the right shapes (an empty sequence returns the initial state),
    gradients that flow, and no error."""
    for h0 in (True, False):
        xs = inputs(*shape, h0=h0)
        y, h = selective_scan(**xs, return_state=True, backend=backend_name)
        b, length, d, n = shape
        assert y.shape == (b, length, d) and h.shape == (b, d, n)
        if length == 0:
            want = xs["initial_state"] if h0 else torch.zeros(b, d, n)
            assert torch.equal(h.detach(), want.detach())
        (y.sum() + h.sum()).backward() if (y.requires_grad or h.requires_grad) else None
        if h0 and length == 0 and b * d * n:
            assert torch.equal(xs["initial_state"].grad, torch.ones(b, d, n))


def test_ssm_block_on_an_empty_sequence():
    ssm = SelectiveSSM(8, 4)
    y, (conv, h) = ssm(torch.randn(2, 0, 8), return_state=True)
    assert y.shape == (2, 0, 8) and conv.shape == (2, ssm.d_inner, ssm.d_conv - 1) and h.shape == (2, ssm.d_inner, 4)
    assert torch.equal(h, torch.zeros_like(h))
    x = torch.randn(2, 6, 8).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous (B, L, d)
    assert torch.allclose(ssm(x), ssm(x.contiguous()), atol=1e-6)
