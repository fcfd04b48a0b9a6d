"""hclsm: object-centric world models (HCLSM, SlotSSM / OC-SlotSSM, C-JEPA + CTT) in one library."""
from __future__ import annotations

__version__ = "0.1.0"
