"""Shared helpers of the command-line tests: run ``hclsm`` in-process and check one-line user errors."""
from __future__ import annotations

from hclsm import cli


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
