"""requirements.lock: exact versions that cover pyproject.toml's dependencies and satisfy them."""

from __future__ import annotations

import tomllib

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"requirements.lock: {line!r} is not pinned exactly (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_pins_every_dependency_of_pyproject_at_a_version_it_allows():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = _lock()
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.lock has no {req.name} (pyproject.toml: {text}); run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {text}; run .ci/lock"
        )
    assert str(pins["torch"]) == "2.13.0"  # no local build tag: a GPU machine takes its CUDA build of it


def test_the_installed_environment_is_the_locked_one():
    """The README's install is `pip install --no-deps -r requirements.lock -e .`: what runs is what is locked."""
    from importlib import metadata

    for name, version in _lock().items():
        found = Version(metadata.version(name))
        assert found.public == version.public, f"{name}: installed {found}, locked {version}"


def test_the_lock_is_closed_under_requirements():
    """With --no-deps nothing else is installed: every requirement of a locked package (for this
    platform, no extras) is locked too, at a version it allows."""
    from importlib import metadata

    pins = _lock()
    for name in pins:
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"requirements.lock has {name} but not its requirement {text}; run .ci/lock"
            assert req.specifier.contains(pins[dep], prereleases=True), (
                f"requirements.lock pins {req.name}=={pins[dep]}, outside {name}'s {text}; run .ci/lock"
            )
