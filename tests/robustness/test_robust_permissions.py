"""Outputs on a shared server: every file the pipeline writes atomically (JSON, Markdown, CSV through
`atomic_write`, figures) gets the mode a plain `open()` would give it under the user's umask, not
mkstemp's owner-only 0600, so that the other users of a lab server can read the reports."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.figure
import pytest

from medfusion.common import atomic_write, plain_file_mode
from medfusion.data.io import write_json
from medfusion.figures import save_figure


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_outputs_have_the_mode_a_plain_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        expected = _mode(tmp_path / "plain.txt")
        assert plain_file_mode() == expected
        atomic_write(tmp_path / "table.md", "| a |\n")
        atomic_write(tmp_path / "blob.bin", b"\0")
        write_json(tmp_path / "eval.json", {"dice": 0.9})
        save_figure(matplotlib.figure.Figure(), tmp_path / "figure.png")
    finally:
        os.umask(old)
    for name in ("table.md", "blob.bin", "eval.json", "figure.png"):
        assert _mode(tmp_path / name) == expected, (name, oct(_mode(tmp_path / name)), oct(expected))
