"""``hclsm bench NAME``: named benchmarks with one output contract.

Each benchmark is a function ``fn(quick: bool, seed: int) -> BenchResult`` registered with
``@register("name")``. ``run_bench`` prints the result's readable table and then, as the **last line
of stdout**, one JSON object ``{"bench", "metrics", "config", "seconds"}``; ``--out FILE`` also
writes that object to a file. ``--quick`` is a smoke-size run (<= 60 s on 2 CPU cores).
"""
from __future__ import annotations

import difflib
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hclsm.errors import HclsmError
from hclsm.utils.atomic import atomic_write_text, check_file_out, writing


@dataclass
class BenchResult:
    metrics: dict  # flat name -> number: what thresholds are checked against
    config: dict  # what was run (sizes, seeds, machine facts)
    rows: list[dict] = field(default_factory=list)  # the readable table, one dict per row
    title: str = ""
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)  # more tables: (heading, rows), after it


_REGISTRY: dict[str, Callable[[bool, int], BenchResult]] = {}
_MODULES = ("hclsm.bench.data", "hclsm.bench.objects", "hclsm.bench.scale", "hclsm.bench.dynamics", "hclsm.bench.scan",
            "hclsm.bench.throughput",
            "hclsm.bench.causal", "hclsm.bench.causal_states", "hclsm.bench.memory", "hclsm.bench.slotssm", "hclsm.bench.slotssm_scenes",
            "hclsm.bench.planning", "hclsm.bench.cjepa")  # modules whose import registers benchmarks


def register(name: str):
    def deco(fn: Callable[[bool, int], BenchResult]):
        _REGISTRY[name] = fn
        return fn
    return deco


def available() -> list[str]:
    for m in _MODULES:
        importlib.import_module(m)
    return sorted(_REGISTRY)


def format_table(rows: list[dict]) -> str:
    """Plain-text table with one column per key (union of keys, first-seen order)."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    table = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def check_out_path(out: str | Path) -> Path:
    """Validate ``--out FILE`` up front: a file path whose parent is (or can be) a writable directory."""
    return check_file_out(out, "--out", "result.json")


def run_bench(name: str, quick: bool = False, seed: int = 0, out: str | Path | None = None) -> dict:
    """Run benchmark ``name``; prints the table and the JSON line; returns the JSON object."""
    if out is not None:
        check_out_path(out)  # fail before the benchmark runs, not after
    names = available()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HclsmError(f"unknown benchmark {name!r}{hint}; available: {', '.join(names)}")
    t0 = time.perf_counter()
    result = _REGISTRY[name](quick, seed)
    seconds = time.perf_counter() - t0
    record = {"bench": name, "metrics": result.metrics,
              "config": {**result.config, "quick": quick, "seed": seed}, "seconds": round(seconds, 3)}
    if result.title:
        print(result.title)
    if result.rows:
        print(format_table(result.rows))
    for heading, rows in result.tables:
        print(f"\n{heading}\n{format_table(rows)}")
    line = json.dumps(record, sort_keys=False)
    if out is not None:
        out = Path(out)
        with writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, line + "\n")
    print(line, flush=True)
    return record
