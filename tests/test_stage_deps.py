"""Stage dependencies that cannot drift: every medfusion/pipeline module a DVC stage's script imports
(its import closure, from the code's syntax trees) is among the stage's `deps`, file or folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from medfusion.provenance import import_closure


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def uncovered(stage: dict, root: Path = REPO) -> list[str]:
    """The modules of the stage's import closure that no entry of its deps covers."""
    script = re.search(r"python -m (pipeline\.\w+)", stage["cmd"])
    assert script, f"stage command {stage['cmd']!r} runs no pipeline module"
    files = [
        p.relative_to(root).as_posix()
        for p in import_closure([Path(*script[1].split(".")).with_suffix(".py")], root)
    ]
    deps = [str(d).rstrip("/") for d in stage.get("deps", [])]
    return [f for f in files if not any(f == d or f.startswith(d + "/") for d in deps)]


@pytest.mark.parametrize("name", sorted(_stages()))
def test_every_module_a_stage_imports_is_a_dependency(name):
    missing = uncovered(_stages()[name])
    assert not missing, (
        f"dvc.yaml stage {name!r} imports {', '.join(missing)} but does not list them in its deps: "
        "an edit there would leave the stage 'up to date'"
    )


def test_the_check_names_a_removed_dependency():
    stage = dict(_stages()["train"])
    stage["deps"] = [d for d in stage["deps"] if d != "medfusion/models"]
    assert "medfusion/models/unet.py" in uncovered(stage)
