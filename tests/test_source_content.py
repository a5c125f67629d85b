"""A local data source is tracked by its content: data/sources/<name> links to data.sources.<name>,
fetch depends on that link and DVC hashes the files it points to (medfusion/data/sources.py).

The DVC tests run in a temporary copy of the repository (git + DVC, as tests/test_pipeline_e2e.py
makes it): a custom folder with a truncated image (the user's story: the stale copy kept the old
"truncated" error until `dvc repro -f`), and a copy of the real Kvasir-SEG."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SHARED_DATASETS, copy_repo
from PIL import Image

from medfusion.data.sources import SourceError, read_source, restore_links, write_source

KVASIR = SHARED_DATASETS / "kvasir_seg"


def test_a_copy_becomes_a_link_and_no_copy_a_record(tmp_path):
    copy = tmp_path / "copy"
    (copy / "images").mkdir(parents=True)
    (copy / "images" / "a.png").write_bytes(b"x")
    out = tmp_path / "data" / "sources" / "custom"
    write_source("custom", copy, out)
    assert out.is_symlink() and read_source(out) == copy
    write_source("custom", None, out)  # back to a download: the link is replaced, not followed
    assert not out.is_symlink() and read_source(out) is None
    assert (copy / "images" / "a.png").read_bytes() == b"x"
    write_source("custom", copy, out)
    write_source("custom", copy / "images" / "a.png", out)  # an archive: a link to a file
    assert read_source(out) == copy / "images" / "a.png" and (copy / "images" / "a.png").exists()


def test_a_missing_copy_names_the_key_and_keeps_the_old_link(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    out = tmp_path / "custom"
    write_source("custom", copy, out)
    with pytest.raises(SourceError, match=r"data\.sources\.custom = .*gone.* does not exist"):
        write_source("custom", tmp_path / "gone", out)
    assert read_source(out) == copy
    out.unlink()
    out.write_text("not json")
    with pytest.raises(SourceError, match="not a source record"):
        read_source(out)


def test_links_missing_after_an_applied_experiment_are_remade_from_dvc_lock(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    lock = {"schema": "2.0", "stages": {
        f"source@{name}": {"cmd": "...", "params": {"params.yaml": {"data.sources": {"custom": str(copy),
                                                                                   "gone": str(tmp_path / "gone")}}}}
        for name in ("custom", "synthetic", "gone", "kept")
    } | {"fetch@custom": {"cmd": "..."}}}  # fmt: skip
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    kept = tmp_path / "data" / "sources" / "kept"
    kept.parent.mkdir(parents=True)
    kept.write_text("mine")
    assert restore_links(tmp_path) == ["custom", "synthetic"]
    assert read_source(tmp_path / "data" / "sources" / "custom") == copy
    assert read_source(tmp_path / "data" / "sources" / "synthetic") is None
    assert not (tmp_path / "data" / "sources" / "gone").exists() and kept.read_text() == "mine"
    assert restore_links(tmp_path / "nowhere") == []


def _dvc(repo: Path, env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, (
            f"dvc {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _changed(repo: Path, env: dict, stage: str) -> list[str]:
    """The stages `dvc status --with-deps <stage>` (the stage and its upstream) shows as changed."""
    return sorted(json.loads(_dvc(repo, env, "status", "--json", "--with-deps", stage).stdout))


def _workspace(tmp_path: Path, datasets: list[str], sources: dict[str, str]) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"] = datasets
    params["data"]["sources"].update(sources)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo, env


def _png(path: Path, value: int, rgb: bool) -> None:
    shape = (24, 24, 3) if rgb else (24, 24)
    array = np.zeros(shape, np.uint8)
    array[6:18, 6:18] = value
    Image.fromarray(array).save(path)


@pytest.mark.slow
def test_an_edit_in_a_custom_folder_shows_fetch_and_repro_reads_the_new_files(tmp_path):
    folder = tmp_path / "F"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(4):
        _png(folder / "images" / f"c{i}.png", 200, rgb=True)
        _png(folder / "masks" / f"c{i}.png", 255, rgb=False)
    good = (folder / "images" / "c0.png").read_bytes()
    (folder / "images" / "c0.png").write_bytes(good[: len(good) // 2])  # truncated
    repo, env = _workspace(tmp_path, ["custom"], {"custom": str(folder)})

    failed = _dvc(repo, env, "repro", "preprocess@custom", ok=False)
    assert failed.returncode != 0 and "c0.png" in failed.stdout + failed.stderr
    assert _changed(repo, env, "preprocess@custom") == ["preprocess@custom"]  # fetch is up to date

    (folder / "images" / "c0.png").write_bytes(good)  # the user fixes the file in place
    assert _changed(repo, env, "preprocess@custom") == ["fetch@custom", "preprocess@custom", "source@custom"]
    _dvc(repo, env, "repro", "preprocess@custom")
    assert (repo / "data" / "raw" / "custom" / "images" / "c0.png").read_bytes() == good
    assert _changed(repo, env, "preprocess@custom") == []

    _png(folder / "images" / "c4.png", 90, rgb=True)  # a file added
    _png(folder / "masks" / "c4.png", 255, rgb=False)
    assert "fetch@custom" in _changed(repo, env, "fetch@custom")
    _dvc(repo, env, "repro", "fetch@custom")
    assert (repo / "data" / "raw" / "custom" / "images" / "c4.png").exists()

    for sub in ("images", "masks"):  # and removed
        (folder / sub / "c4.png").unlink()
    assert "fetch@custom" in _changed(repo, env, "fetch@custom")
    _dvc(repo, env, "repro", "fetch@custom")
    assert not (repo / "data" / "raw" / "custom" / "images" / "c4.png").exists()
    assert _changed(repo, env, "fetch@custom") == []
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"c{i}.png" for i in range(4)]


@pytest.mark.skipif(not KVASIR.is_dir(), reason=f"{KVASIR} not present (real-data test)")
@pytest.mark.slow
def test_a_kvasir_copy_is_refetched_when_its_files_change_and_not_otherwise(tmp_path):
    copy = tmp_path / "Kvasir-SEG"
    for sub in ("images", "masks"):
        shutil.copytree(KVASIR / sub, copy / sub)
    repo, env = _workspace(tmp_path, ["kvasir_seg"], {"kvasir_seg": str(copy)})
    _dvc(repo, env, "repro", "fetch@kvasir_seg")
    fetched = json.loads((repo / "data" / "raw" / "kvasir_seg" / "FETCHED.json").read_text())
    assert fetched["cases"] == 1000 and fetched["source"] == str(copy)
    assert _changed(repo, env, "fetch@kvasir_seg") == []

    moved = tmp_path / "elsewhere"  # the copy moved: DVC cannot follow the link (README, troubleshooting)
    copy.rename(moved)
    gone = _dvc(repo, env, "repro", "fetch@kvasir_seg", ok=False)
    assert gone.returncode != 0 and "data/sources/kvasir_seg" in gone.stderr
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["sources"]["kvasir_seg"] = str(moved)  # pointed at its new place: the same files,
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # nothing to fetch again
    moved_run = _dvc(repo, env, "repro", "fetch@kvasir_seg").stdout
    assert (
        "Running stage 'source@kvasir_seg'" in moved_run
        and "Running stage 'fetch@kvasir_seg'" not in moved_run
    )
    assert _changed(repo, env, "fetch@kvasir_seg") == []

    mask = moved / "masks" / sorted(p.name for p in (moved / "masks").iterdir())[0]
    original = mask.read_bytes()
    mask.write_bytes(original[:-100])  # a re-encoded / damaged mask: not the official release
    assert _changed(repo, env, "fetch@kvasir_seg") == ["fetch@kvasir_seg", "source@kvasir_seg"]
    refused = _dvc(repo, env, "repro", "fetch@kvasir_seg", ok=False)
    assert "do not match the official release" in refused.stdout + refused.stderr
    mask.write_bytes(original)
    _dvc(repo, env, "repro", "fetch@kvasir_seg")
    assert _changed(repo, env, "fetch@kvasir_seg") == []
