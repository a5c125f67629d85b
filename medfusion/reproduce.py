"""`medfusion reproduce --profile NAME`: the whole DVC pipeline under a committed profile of params
overrides (profiles/NAME.yaml), on real data, with its outputs kept under the profile's own folder.

A profile is a YAML file with
    params:    {dotted.key: value}, given to `dvc exp run -S key=value` (YAML flow style);
    data_root: where the datasets are (relative to the repository root or absolute); `${data_root}`
               in a value is replaced by it, and `--data-root` overrides it;
    out_dir:   where the report's outputs are copied when the experiment has finished.

The experiment runs as the quickstart's does (`dvc exp run --temp`, then applied to the workspace,
params.yaml put back; interrupted, the workspace is left as it was: medfusion.quickstart). Then
reports/{tables,figures,claims.md,metrics.json,summary.csv,stats*.csv,efficiency.*} are copied into
`out_dir` (one rename: an interrupted copy leaves the previous folder whole), beside RUN.md, which
records the command, the overrides, the machine (CPU model and ISA), the wall time and the commit.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import yaml

from medfusion.common import UserError, atomic_write
from medfusion.config import read_yaml
from medfusion.data.io import atomic_dir

PROFILE_DIR = "profiles"
# What the report, stats and efficiency stages write under reports/ (dvc.yaml), copied to out_dir.
REPORT_OUTPUTS = (
    "tables", "figures", "claims.md", "metrics.json", "summary.csv", "stats.csv", "stats_runs.csv",
    "efficiency.md", "efficiency.csv",
)  # fmt: skip
_PLACEHOLDER = re.compile(r"\$\{data_root\}")
_REF = re.compile(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/(?P<name>[^/]+)")  # how DVC keeps an experiment
_PLAIN = re.compile(r"[A-Za-z0-9_./:+-]+")  # a string Hydra and YAML both read as itself unquoted


class ProfileError(UserError, ValueError):
    """A profile that does not exist or cannot be run as written."""


def profile_path(root: Path, name: str) -> Path:
    """profiles/<name>.yaml under `root`, or `name` itself where it is a path to a YAML file."""
    given = Path(name)
    if given.suffix in (".yaml", ".yml") and given.is_file():
        return given
    path = root / PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / PROFILE_DIR).glob("*.yaml"))
        raise ProfileError(f"profile {name!r}: no {path}; the profiles are {known} (or give a .yaml path)")
    return path


def override_value(value: Any) -> str:
    """A value as `dvc exp run -S key=value` takes it (YAML flow style; strings quoted where Hydra's
    override grammar or YAML would read them as something else). The quickstart's, a profile's and a
    grid's overrides all go through it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, str):  # DVC reads -S values with Hydra's override grammar, then as YAML
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        if same and _PLAIN.fullmatch(value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'" if "'" in value else f"'{value}'"
    return str(value)


def load_profile(root: Path, name: str, data_root: Path | None = None) -> dict:
    """The profile `name` as {"path", "overrides" (["key=value", ...]), "data_root", "out_dir", "missing"
    (data sources named in the profile that are not folders)}.

    Raises:
        ProfileError: no such profile, or no `params` mapping in it.
    """
    path = profile_path(root, name)
    raw = read_yaml(path) or {}
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ProfileError(f"{path}: expected a `params:` mapping of dotted keys to values")
    base = Path(data_root) if data_root is not None else Path(raw.get("data_root", "data"))
    base = (base if base.is_absolute() else root / base).resolve()
    overrides, missing = [], []
    for key, value in params.items():
        if isinstance(value, str) and _PLACEHOLDER.search(value):
            value = _PLACEHOLDER.sub(str(base), value)
            if key.startswith("data.sources.") and not Path(value).exists():
                missing.append(f"{key} = {value}")
        overrides.append(f"{key}={override_value(value)}")
    out_dir = root / raw.get("out_dir", f"reports/{path.stem}")
    return {"path": path, "overrides": overrides, "data_root": base, "out_dir": out_dir, "missing": missing}


def experiment_refs(root: Path) -> dict[str, str]:
    """{experiment name: commit} of every DVC experiment of the repository (refs/exps/, newest per name)."""
    out = subprocess.run(
        ["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname) %(objectname)", "refs/exps"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found: dict[str, str] = {}
    for line in out.splitlines():
        ref, commit = line.split()
        m = _REF.fullmatch(ref)
        if m and m["name"] not in found:
            found[m["name"]] = commit
    return found


def keep_outputs(root: Path, out_dir: Path, run_record: str, commit: str | None = None) -> list[str]:
    """Copy the report's outputs into `out_dir` (replaced whole, by one rename) with RUN.md =
    `run_record`: from the experiment's `commit` (its git-tracked reports/, whatever the workspace
    holds), or from root/reports. -> the names copied."""
    if commit is not None:
        with tempfile.TemporaryDirectory() as scratch:
            archive = subprocess.run(
                ["git", "archive", "--format=tar", commit, "reports"],
                cwd=root,
                capture_output=True,
                check=True,
            ).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(scratch, filter="data")
            return keep_outputs(Path(scratch), out_dir, run_record)
    copied = []
    with atomic_dir(out_dir) as tmp:
        for name in REPORT_OUTPUTS:
            source = root / "reports" / name
            if source.is_dir():
                shutil.copytree(source, tmp / name)
            elif source.is_file():
                shutil.copy2(source, tmp / name)
            else:
                continue
            copied.append(name)
        atomic_write(tmp / "RUN.md", run_record)
    return copied


def _environment_line() -> str:
    """Python, torch and the sha256 of requirements.lock (the exact versions installed from it)."""
    from medfusion.provenance import environment

    env = environment()
    lock = env["requirements_lock_sha256"]
    return (
        f"Python {env['python']}, torch {env['torch']}; requirements.lock sha256 `{lock}`"
        if lock
        else f"Python {env['python']}, torch {env['torch']}; no requirements.lock"
    )


def run_record(profile: dict, command: str, machine: str, minutes: float, commit: str, when: str) -> str:
    """RUN.md: how the outputs beside it were made."""
    lines = [
        f"# `{profile['path'].stem}`: how these outputs were made",
        "",
        f"- Command: `{command}` (profile `{profile['path'].name}`), in one `dvc exp run --temp`.",
        f"- Machine: {machine}.",
        f"- Wall time: {minutes:.1f} min for the whole pipeline (fetch to report), finished {when}.",
        f"- Code: git commit `{commit}`.",
        f"- Environment: {_environment_line()}.",
        f"- Data: {profile['data_root']}.",
        "",
        "Overrides of params.yaml (everything else is the paper protocol of params.yaml):",
        "",
        *[f"    -S {o}" for o in profile["overrides"]],
        "",
    ]
    return "\n".join(lines)
