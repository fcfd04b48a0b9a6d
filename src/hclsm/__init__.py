"""hclsm: object-centric world models (HCLSM, SlotSSM / OC-SlotSSM, C-JEPA + CTT) in one library."""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``hclsm.Run`` without importing torch for ``import hclsm`` alone (the CLI's start-up stays fast)
    if name == "Run":
        from hclsm.runs import Run

        return Run
    raise AttributeError(f"module 'hclsm' has no attribute {name!r}")


__all__ = ["Run", "__version__"]
