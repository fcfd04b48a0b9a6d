"""Where a training step's time goes, part by part (``hclsm bench throughput``).

Models mark their parts with ``scope(name)`` (a ``torch.profiler.record_function``; free when no profiler
runs); ``profile_step`` also marks each direct child module of the model it is given. One
``train_step`` then runs under the PyTorch profiler and every operator's CPU time goes to a part:

* a forward operator to the innermost part around it, except that a loss part (``loss/NAME``) owns
  everything inside it (the ``rollout`` term's dynamics steps and decodes are the rollout's cost);
* a backward operator to the part of the forward operator it differentiates (the autograd sequence number
  links the two), so "decoder" means the decoder's forward and backward;
* the optimizer's work (clipping, AdamW, the EMA update) to ``optimizer``; anything unmarked to ``other``.

The profiler's own overhead inflates many small operators, so the shares are approximate; the step time
quoted next to them is measured without it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

PREFIX = "hclsm::"
LOSS = "loss/"  # parts whose name starts with this own everything inside them
OPTIMIZER = "optimizer"


@contextmanager
def scope(name: str) -> Iterator[None]:
    """Mark the work inside as part ``name`` for ``profile_step`` (a no-op cost when nothing profiles)."""
    with record_function(PREFIX + name):
        yield


@contextmanager
def child_scopes(model: nn.Module) -> Iterator[None]:
    """Every direct child module of ``model`` marked as the part of its attribute name while inside."""
    handles = []
    for name, child in model.named_children():
        def pre(_m: nn.Module, _args: tuple, _name: str = name) -> None:
            _m._hclsm_scope = record_function(PREFIX + _name)  # type: ignore[attr-defined]
            _m._hclsm_scope.__enter__()

        def post(_m: nn.Module, _args: tuple, _out: object) -> None:
            _m._hclsm_scope.__exit__(None, None, None)  # type: ignore[attr-defined]

        handles += [child.register_forward_pre_hook(pre), child.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _owner(intervals: list[tuple[int, int, str]], start: int, end: int) -> str | None:
    """The part of an operator running from ``start`` to ``end``: the outermost loss part around it, else the
    innermost part, else None. ``intervals`` are the parts' (start, end, name), sorted by start."""
    loss, inner = None, None
    for s, e, name in intervals:
        if s > start:
            break
        if e < end:
            continue
        if name.startswith(LOSS):
            loss = loss or name
        else:
            inner = name  # later starts are nested deeper
    return loss or inner


def attribute(events: list) -> dict[str, float]:
    """Milliseconds of CPU time per part from a profiler's ``events()`` (see the module docstring)."""
    parts = sorted((e.time_range.start, e.time_range.end, e.name[len(PREFIX):]) for e in events
                   if e.name.startswith(PREFIX))
    backward, optimizer = "autograd::engine::evaluate_function", "Optimizer."

    def top(e):  # the outermost backward or optimizer call an operator runs under (itself included), if any
        found, p = None, e
        while p is not None:
            if p.name.startswith((backward, optimizer)):
                found = p
            p = p.cpu_parent
        return found

    totals: Counter[str] = Counter()
    forward_part: dict[int, str] = {}  # autograd sequence number -> the part of the forward operator
    later = []
    for e in events:
        if e.name.startswith(PREFIX):
            continue
        under = top(e)
        if under is not None:
            if under is e:  # the outermost backward / optimizer call: its whole time, once
                later.append(e)
            continue
        owner = _owner(parts, e.time_range.start, e.time_range.end) or "other"
        if e.sequence_nr >= 0:
            forward_part.setdefault(e.sequence_nr, owner)
        totals[owner] += e.self_cpu_time_total
    for e in later:
        part = OPTIMIZER if e.name.startswith(optimizer) else forward_part.get(e.sequence_nr, "other")
        totals[part] += e.cpu_time_total
    return {k: v / 1000 for k, v in totals.most_common()}


def profile_parts(model: nn.Module, step: Callable[[], object]) -> dict[str, float]:
    """Milliseconds per part of one ``step()`` (a training step of ``model``), its child modules marked."""
    with child_scopes(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return attribute(prof.events())


def shares(parts: Mapping[str, float]) -> dict[str, float]:
    """Each part's share of their sum."""
    total = sum(parts.values()) or 1.0
    return {k: v / total for k, v in parts.items()}
