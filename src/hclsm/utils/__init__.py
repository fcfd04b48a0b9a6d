"""Small helpers shared by every layer (no model or data knowledge here)."""
