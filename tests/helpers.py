"""Shared test helpers: a small model config, and running ``hclsm`` in-process with one-line user errors."""
from __future__ import annotations

from hclsm import cli

# overrides shrinking the tiny preset's object layers to a model that trains a step in well under a second
SMALL = ["model.perception.d_model=16", "model.perception.d_world=16", "model.slots.d_slot=16",
         "model.slots.mlp_hidden=16", "model.slots.num_slots=4", "model.decoder.hidden=16",
         "model.perception.image_size=32", "model.decoder.grid_size=8", "model.decoder.resolution=16"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``hclsm ARGV`` in-process: (exit code, stdout, stderr); argparse exits become codes too."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one stderr line starting with ``error:``, no traceback, naming every needle."""
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line
