"""What the fetch stage reads a dataset from, in a form DVC hashes by content: data/sources/<name>.

A local copy (`data.sources.<name>`, a folder or an archive) becomes a symbolic link
data/sources/<name> -> the copy's absolute path. The fetch stage depends on that link, and DVC
follows a link that is itself a dependency: it hashes the files of the folder (or the archive) the
link points to. Editing, adding or removing a file in the copy therefore shows `fetch@<name>` in
`dvc status`, and `dvc repro` fetches again; a copy moved elsewhere with the same files fetches
nothing. DVC keeps each file's hash with its size, mtime and inode, so only changed files are read
again; the first status of a 28 GB copy reads it once.

A dataset without a local copy (downloaded, or generated) gets a small JSON file instead, naming
that route, so that the dependency exists and changes when the route does.

Neither is in git (data/ is ignored: a DVC experiment commit would follow the link and commit the
copy's files) nor in DVC's cache (it would copy the copy). So where outputs arrive without the
stage having run here (`dvc exp apply` of a `--temp` experiment, a clone and `dvc pull`), the links
are missing and `dvc status` shows source@<name> and fetch@<name> until `dvc repro source` remakes
them from params.yaml (a second; the same files fetch nothing). `restore_links` remakes them from
dvc.lock instead, which is what the quickstart and `medfusion reproduce` do after applying their
experiment.

The link is written by the stage `source@<name>` from params.yaml (its only input), as an output
that DVC neither caches nor removes (`cache: false, persist: true`): DVC never copies, moves or
deletes the copy's files, and replacing the link (`os.replace` of a new link over the old one)
replaces the link, not what it points to.

Memory: none beyond a path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from medfusion.common import UserError
from medfusion.data.io import atomic_write_text

SOURCES_DIR = Path("data/sources")


class SourceError(UserError, RuntimeError):
    """data.sources.<name> names nothing usable; the message says which key and what to do."""


def write_source(name: str, source: str | Path | None, out: Path) -> str:
    """Make `out` the link to `source` (made absolute from the working directory), or, where
    `source` is None, a JSON file saying there is no local copy. Returns a one-line description.

    Raises:
        SourceError: `source` does not exist, naming the params key.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir() and not out.is_symlink():
        raise SourceError(
            f"{out} is a folder; it should be a link made by `dvc repro source@{name}`: remove it"
        )
    if source is None:
        atomic_write_text(out, json.dumps({"dataset": name, "source": None}) + "\n")
        return f"{name}: no local copy (generated or downloaded)"
    target = Path(os.path.abspath(Path(source).expanduser()))
    if not target.exists():
        raise SourceError(
            f"data.sources.{name} = {source!r}: {target} does not exist; point it at the local copy "
            f"(a folder or the official archive), or set it to null to download"
        )
    tmp = out.with_name(f".{out.name}.link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=target.is_dir())
    os.replace(tmp, out)
    return f"{name}: {out} -> {target}"


def read_source(out: Path) -> Path | None:
    """The local copy that `write_source` recorded at `out`, or None (no local copy).

    Raises:
        SourceError: `out` is missing or is neither such a link nor such a file.
    """
    out = Path(out)
    if out.is_symlink():
        return Path(os.readlink(out))
    try:
        record = json.loads(out.read_text())
        if record.get("source") is None:
            return None
    except (OSError, ValueError, AttributeError) as err:
        raise SourceError(
            f"{out}: not a source record ({err}); make it with `dvc repro source@<dataset>`"
        ) from None
    raise SourceError(f"{out}: names a source but is not a link; make it with `dvc repro source@<dataset>`")


def restore_links(root: Path) -> list[str]:
    """Remake, under `root`, each missing data/sources/<name> as dvc.lock's stage source@<name>
    recorded it (its `data.sources` param). A copy that no longer exists is left missing (`dvc repro`
    then names it). -> the names remade."""
    root = Path(root)
    try:
        stages = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return []
    remade = []
    for stage, record in stages.items():
        kind, _, name = stage.partition("@")
        out = root / SOURCES_DIR / name
        if kind != "source" or not name or out.is_symlink() or out.exists():
            continue
        sources = ((record.get("params") or {}).get("params.yaml") or {}).get("data.sources") or {}
        try:
            write_source(name, sources.get(name), out)
        except SourceError:
            continue
        remade.append(name)
    return remade
