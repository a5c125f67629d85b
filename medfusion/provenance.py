"""What code produced a result: the import closure of a medfusion module, its fingerprint, the git commit.

A finished run counts as finished only for the same code (`Entry.run_hash` holds `code_fingerprint`):
the fingerprint is the sha256 of the content of every `medfusion` module that training imports,
found from the code itself (`import_closure`: the `import` and `from ... import` statements of each
module's syntax tree, those inside functions too, followed from a root module), not from a hand
list, so a new module is covered the day it is imported. The same closure gives each DVC stage's
code dependencies (tests/test_stage_deps.py checks dvc.yaml against it).

What is not in a closure: code loaded by name at run time (importlib), which medfusion does not use
for its own modules, and the installed libraries (their versions: the lock file and each run's
recorded environment). Comments and docstrings count: an edit to them retrains, as DVC's hash of the
same file reruns the stage; telling a comment from code would take more trust than it saves time.

Memory: the closure's paths and one digest per module (a few kB); each file is read once per process.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import subprocess
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "medfusion"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds medfusion/ (and pipeline/)
TRAINING_ROOT = "medfusion.training.fold"  # what a run executes: run_fold and everything it imports


def module_path(name: str, root: Path = SOURCE_ROOT) -> Path | None:
    """The file of module `name` ("medfusion.models.unet") under `root`: a .py file or a package's
    __init__.py; None where there is none (a name imported from a module, not a module)."""
    base = Path(root, *name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, root: Path) -> set[str]:
    """The modules of the package (and `pipeline`) that the file at `path` imports, anywhere in it:
    `import a.b`, `from a.b import c` (c itself when it is a module), relative imports resolved."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    ours = {m for m in found if m.split(".")[0] in (PACKAGE, "pipeline")}
    with_parents = set(ours)
    for m in ours:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parts = m.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return with_parents


def import_closure(roots: Iterable[str | Path], root: Path = SOURCE_ROOT) -> list[Path]:
    """Every module file of the package reached from `roots` (module names or file paths, e.g.
    "medfusion.training.fold" or Path("pipeline/train.py")) through its imports, roots included; sorted
    paths. A name that is no file (a function imported from a module) is skipped."""
    todo: list[Path] = []
    for r in roots:
        path = Path(root, r) if isinstance(r, Path) and not Path(r).is_absolute() else r
        path = module_path(r, root) if isinstance(r, str) else Path(path)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{r}: no such module under {root}")
        todo.append(path.resolve())
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported(path, root):
            found = module_path(name, root)
            if found is not None and found.resolve() not in seen:
                todo.append(found.resolve())
    return sorted(seen)


@functools.lru_cache(maxsize=8)
def _fingerprint(roots: tuple[str, ...], root: Path) -> tuple[str, tuple[tuple[str, str], ...]]:
    files = []
    for path in import_closure(roots, root):
        rel = path.relative_to(root).as_posix()
        files.append((rel, hashlib.sha256(path.read_bytes()).hexdigest()))
    whole = hashlib.sha256("\n".join(f"{rel} {digest}" for rel, digest in files).encode()).hexdigest()
    return whole, tuple(files)


def code_fingerprint(
    roots: Iterable[str] = (TRAINING_ROOT,), root: Path = SOURCE_ROOT
) -> tuple[str, dict[str, str]]:
    """(sha256 of the closure's files, {repository-relative path: the file's sha256}) of `roots`'
    import closure; computed once per process and root set."""
    whole, files = _fingerprint(tuple(roots), Path(root).resolve())
    return whole, dict(files)


def changed_files(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """The files whose content differs between two `code_fingerprint` maps (added and removed too)."""
    if not old:
        return []
    return sorted(f for f in set(old) | set(new) if old.get(f) != new.get(f))


def git_state(root: Path = SOURCE_ROOT) -> dict[str, object]:
    """{"commit": HEAD's sha or "unknown", "dirty": whether tracked files differ from HEAD, or None
    where git or the repository is not there (an installed copy)}."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit or "unknown", "dirty": dirty}


ENVIRONMENT_PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "albumentations",
    "opencv-python-headless",
    "mlflow",
    "dvc",
)


def installed() -> list[str]:
    """'name==version' of every distribution installed in this interpreter, sorted: the `pip freeze` of
    the environment a run ran in (read from the package metadata, without running pip)."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower()] = f"{name}=={dist.version}"
    return [found[k] for k in sorted(found)]


def environment() -> dict[str, str | None]:
    """What a run computed with: Python, the key libraries' versions, CUDA and cuDNN (None without a
    GPU build), and the sha256 of requirements.lock where the source tree has one."""
    import platform
    from importlib import metadata

    import torch

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ENVIRONMENT_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    lock = SOURCE_ROOT / "requirements.lock"
    out["requirements_lock_sha256"] = (
        hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None
    )
    return out
