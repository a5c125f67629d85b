"""The README and docs/ point at what exists: every relative link (and its #anchor) and every
repository path they name in backticks. Paths the pipeline writes (dvc.yaml's outputs, data/) and
paths with placeholders (<dataset>, *, ...) are not files of the repository and are left out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIXES = (
    "medfusion/",
    "pipeline/",
    "tests/",
    "benchmarks/",
    "tools/",
    "profiles/",
    "docs/",
    ".ci/",
    "reports/",
)
TOP = {"params.yaml", "dvc.yaml", "pyproject.toml", "requirements.lock", "install.py", "README.md"}


def _outputs() -> list[str]:
    """dvc.yaml's outputs, cut before their first ${...}: what the pipeline writes, not the repository."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("outs", "metrics", "plots"):
                    for out in value:
                        found.append(str(next(iter(out)) if isinstance(out, dict) else out).split("${")[0])
                else:
                    walk(value)

    walk(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    return [o for o in found if o]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


def _named_paths(text: str) -> set[str]:
    paths = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,:;)").split("::")[0]
        if any(c in token for c in "<>*{}$") or "..." in token:
            continue
        if token.startswith(PREFIXES) or token in TOP:
            paths.add(token)
    return paths


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_link_and_named_path_exists(page):
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            missing.append(f"link {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            missing.append(f"anchor {target}")
    outputs = _outputs()
    for path in sorted(_named_paths(text)):
        if not (REPO / path).exists() and not any(path.startswith(o.rstrip("/")) for o in outputs):
            missing.append(f"path `{path}`")
    assert not missing, f"{page.relative_to(REPO)} names what does not exist: {missing}"


def test_the_readme_stays_short_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    assert readme.count("\n") <= 160
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README does not link docs/{page.name}"
