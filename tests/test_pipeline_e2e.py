"""`medfusion quickstart` end to end in a temporary copy of the repository (git + DVC + MLflow).

The quickstart trains its default entries (CASNet, one ablation, U-Net) through DVC; every other
entry goes through the same library functions in tests/test_all_entries.py."""

from __future__ import annotations

import copy
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, copy_repo

from medfusion.config import read_yaml
from medfusion.quickstart import DEFAULT_MODELS

pytestmark = pytest.mark.slow

ENTRIES = [*DEFAULT_MODELS["casnet"], *DEFAULT_MODELS["baselines"]]  # casnet, casnet_wo_br, unet


def _load_params(repo: Path) -> dict:
    """params.yaml as DVC reads it: YAML 1.2, where the quickstart's bare `compile: off` is the string
    "off" (PyYAML's YAML 1.1 reads false, and dumping that back would change the param for DVC)."""
    return read_yaml(repo / "params.yaml")


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def quickstart_repo(tmp_path_factory) -> tuple[Path, dict, str]:
    repo = tmp_path_factory.mktemp("repo")
    env = copy_repo(repo)
    result = _run([sys.executable, "-m", "medfusion.cli", "quickstart", "--name", "qs-test"], repo, env)
    return repo, env, result.stdout


def test_quickstart_writes_tables_figures_claims_and_keeps_params(quickstart_repo):
    repo, _, stdout = quickstart_repo
    assert "reports/tables/table1.md" in stdout and "mlflow ui --backend-store-uri sqlite:///" in stdout
    assert "medfusion/synthetic: http://127.0.0.1:5000/#/experiments/" in stdout  # links to the runs table
    assert "?workflowType=machine_learning" in stdout
    assert (repo / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    tables = repo / "reports" / "tables"
    table1, table2 = (tables / "table1.md").read_text(), (tables / "table2.md").read_text()
    assert "`synthetic`" in table1 and "`synthetic_volumes`" in table2
    assert "per test case = one volume rebuilt from its slice predictions" in table2.lower()
    assert "hd95 (mm)" in table2.lower() and "hd95 (px)" in table1.lower()  # spacing known for NIfTI only
    assert "organ = labels 1+2 (tumour included)" in table2  # nested regions, as LiTS is scored
    for table in (table1, table2):  # scored as the field scores: at each case's original geometry
        assert "at each case's original" in table and "eval.resolution: original" in table
    assert "| Dice | Dice global | IoU |" in table2 and "Dice global" not in table1  # pooled over volumes
    for model in [
        "casnet",
        *DEFAULT_MODELS["baselines"],
    ]:  # CASNet and the baselines; ablations in tables 3-4
        for cls in ("organ", "lesion"):
            assert f"| {model} | {cls} | mean ± std over runs |" in table2
            assert f"| {model} | {cls} | fold ensemble |" in table2
    for name in ("table1", "table2", "table3", "table4", "statistics"):
        assert (tables / f"{name}.md").exists() and (tables / f"{name}.csv").exists()
    assert "| casnet_wo_br | use_boundary=False | blob |" in (tables / "table3.md").read_text()
    assert "| casnet_wo_br | use_boundary=False | lesion |" in (tables / "table4.md").read_text()
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    overlap = [
        c[k] for ds in metrics.values() for m in ds.values() for c in m.values() for k in ("dice", "iou")
    ]
    assert overlap and all(0.0 <= v <= 1.0 for v in overlap)
    assert set(metrics["synthetic"]) == set(ENTRIES)
    assert metrics["synthetic"]["unet"]["blob"]["dice"] > 0.6  # it learned, not just ran
    assert metrics["synthetic"]["casnet"]["blob"]["dice"] > 0.6
    for d in ("synthetic", "synthetic_volumes"):
        for kind in ("bars", "qualitative", "curves"):
            assert (repo / "reports" / "figures" / f"{kind}_{d}.png").read_bytes()[:4] == b"\x89PNG"
    claims = (repo / "reports" / "claims.md").read_text()
    assert "35" in claims and "7.8" in claims and "not run" in claims
    efficiency = (repo / "reports" / "efficiency.md").read_text()
    assert all(f"| {m} |" in efficiency for m in ENTRIES) and "RTX 3090" in efficiency
    assert "ISA " in efficiency and "threads, torch" in efficiency  # where it was timed
    per_case = (repo / "data" / "eval" / "synthetic_volumes" / "casnet" / "per_case.csv").read_text()
    assert ",ensemble," in per_case and ",post,original" in per_case and ",raw,original" in per_case


def test_stats_compare_casnet_with_every_other_entry(quickstart_repo):
    repo, _, _ = quickstart_repo
    import pandas as pd

    tests = pd.read_csv(repo / "reports" / "stats.csv")
    assert set(zip(tests["dataset"], tests["class"], strict=True)) == {
        ("synthetic", "blob"),
        ("synthetic_volumes", "organ"),
        ("synthetic_volumes", "lesion"),
    }
    assert (tests["reference"] == "casnet").all() and set(tests["metric"]) == {"dice", "iou", "hd95"}
    dice = tests[(tests["dataset"] == "synthetic") & (tests["metric"] == "dice")]
    assert sorted(dice["model"]) == sorted(ENTRIES[1:]) and (dice["n_cases"] == 14).all()
    for column in ("p_t", "p_t_holm", "p_wilcoxon", "p_wilcoxon_holm"):
        assert tests[column].dropna().between(0, 1).all()
    assert (tests["p_t_holm"].dropna() >= tests.loc[tests["p_t_holm"].notna(), "p_t"] - 1e-12).all()
    statistics = (repo / "reports" / "tables" / "statistics.md").read_text()
    assert "| blob | Dice (%) | unet | 14 |" in statistics
    over_runs = pd.read_csv(repo / "reports" / "stats_runs.csv")  # 2 folds x 1 seed: 2 paired runs
    assert (over_runs["n_runs"] == 2).all() and set(over_runs["model"]) == set(ENTRIES[1:])
    assert "## Over runs" in statistics and "| blob | Dice | unet | 2 |" in statistics


def test_mlflow_store_has_experiments_parents_children_and_test_metrics(quickstart_repo):
    repo, _, _ = quickstart_repo
    db = sqlite3.connect(repo / "mlflow.db")
    experiments = {name for (name,) in db.execute("select name from experiments")}
    assert {"medfusion/synthetic", "medfusion/synthetic_volumes"} <= experiments
    tags = db.execute("select run_uuid, key, value from tags").fetchall()
    parents = {r for r, k, v in tags if k == "mlflow.runName" and v in ENTRIES}
    children = {r for r, k, _ in tags if k == "mlflow.parentRunId"}
    assert len(parents) == 6 and len(children) == 12  # 2 datasets x 3 entries x (1 parent, 2 folds x 1 seed)
    assert {v for r, k, v in tags if k == "dvc.exp_name"} == {"qs-test"}
    metric_keys = {(r, k) for r, k in db.execute("select run_uuid, key from metrics")}
    # grouped names (train/..., val/..., test/...): the UI's charts come in those groups
    assert all((p, "test/dice_organ") in metric_keys or (p, "test/dice_blob") in metric_keys for p in parents)
    assert all((c, "val/dice") in metric_keys and (c, "train/loss") in metric_keys for c in children)
    volumes = {r for r, k in metric_keys if k == "test/dice_organ"}
    assert volumes and all((r, "test/global_dice_lesion") in metric_keys for r in volumes)  # pooled Dice
    assert not any(k in ("val_dice", "train_loss") or k.startswith("test_") for _, k in metric_keys)
    notes = {v for r, k, v in tags if k == "mlflow.note.content" and r in parents | children}
    assert len(notes) == 1 and "train.epochs" in notes.pop()  # the quickstart's 6 epochs, not the paper's 100
    assert {v for r, k, v in tags if k == "mlflow.source.name" and r in parents} == {"pipeline/train.py"}
    inputs = db.execute("select destination_id from inputs where source_type = 'DATASET'").fetchall()
    assert parents | children <= {r for (r,) in inputs}  # every run records the processed dataset it saw
    computed = {
        k: v for r, k, v in tags if r in children and k in ("amp_dtype", "precision_reason", "compile")
    }
    assert computed["compile"] == "off" and computed["precision_reason"]  # how each run computed
    experiment_kinds = db.execute("select value from experiment_tags where key = 'mlflow.experimentKind'")
    assert {v for (v,) in experiment_kinds} == {"custom_model_development"}  # the UI opens on the runs

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for child in children:  # each child's own files; its weights by link, not by copy
        names = {a.path for a in client.list_artifacts(child)}
        assert {"history.json", "config.json", "checkpoint.json"} <= names and "model.pt" not in names
    run_names = {r: v for r, k, v in tags if k == "mlflow.runName"}
    figured = {r for r in parents if any(a.path.endswith(".png") for a in client.list_artifacts(r))}
    assert figured == {r for r in parents if run_names[r] == "casnet"}  # once per dataset
    for r in parents:  # every parent has its own per-case table; a dataset's figures are on one parent
        assert "per_case.csv" in {a.path for a in client.list_artifacts(r)}


def _find_key(tree, key: str) -> list:
    """Every value of `key` anywhere in a parsed JSON tree."""
    if isinstance(tree, dict):
        return ([tree[key]] if key in tree else []) + [v for x in tree.values() for v in _find_key(x, key)]
    if isinstance(tree, list):
        return [v for x in tree for v in _find_key(x, key)]
    return []


def test_dvc_sees_the_experiment_and_reruns_only_what_changed(quickstart_repo):
    repo, env, _ = quickstart_repo
    shown = _run(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert "qs-test" in shown
    # each evaluate stage's own metrics (Dice/IoU per class), beside the report's headline
    for dataset in ("synthetic", "synthetic_volumes"):
        assert f"data/metrics/{dataset}/casnet.json" in shown and f"data/metrics/{dataset}/unet.json" in shown
    found = _find_key(json.loads(shown), "data/metrics/synthetic/casnet.json")  # the experiment's values
    assert found and 0.0 <= found[0]["data"]["synthetic"]["casnet"]["dice"]["blob"]["post"] <= 1.0
    _run(["dvc", "exp", "apply", "qs-test"], repo, env)
    assert "up to date" in _run(["dvc", "status"], repo, env).stdout
    repro = _run(["dvc", "repro"], repo, env).stdout
    assert "Running stage" not in repro
    params = _load_params(repo)
    params["unet"]["base_channels"] += 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(_run(["dvc", "status", "--json"], repo, env).stdout))
    assert changed == {"train@synthetic-unet", "train@synthetic_volumes-unet"}
    dry = _run(["dvc", "repro", "--dry"], repo, env).stdout
    would_run = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
    # evaluate, efficiency, stats and report follow when the train outputs change; nothing upstream reruns
    assert would_run == {"train@synthetic-unet", "train@synthetic_volumes-unet"}

    # the ablation switch users type: only the CASNet entries are out of date
    _run(["git", "checkout", "params.yaml"], repo, env)
    _run(["dvc", "exp", "apply", "qs-test"], repo, env)
    params = _load_params(repo)
    params["model"]["use_boundary"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(_run(["dvc", "status", "--json"], repo, env).stdout))
    casnet_entries = DEFAULT_MODELS["casnet"]
    assert changed == {
        f"train_casnet@{d}-{m}" for d in ("synthetic", "synthetic_volumes") for m in casnet_entries
    }


def test_settings_that_cannot_change_a_result_retrain_nothing(quickstart_repo):
    """The out-of-memory advice `-S eval.batch_size=8`, more loader workers, another executor: each
    leaves no train stage out of date, and a forced train stage skips every finished run (same hash)."""
    repo, env, _ = quickstart_repo
    _run(["git", "checkout", "params.yaml"], repo, env)
    _run(["dvc", "exp", "apply", "qs-test"], repo, env)
    applied = _load_params(repo)
    changes = (("eval", "batch_size", 8), ("train", "num_workers", 3), ("executor", "processes", 2))
    everything = copy.deepcopy(applied)
    for section, key, value in changes:
        assert applied[section][key] != value  # a real change
        params = copy.deepcopy(applied)
        params[section][key] = everything[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(_run(["dvc", "status", "--json"], repo, env).stdout))
        assert not {s for s in changed if s.startswith("train")}, (section, key, changed)
        if section == "executor":  # no stage depends on it at all
            assert changed == set(), changed
    (repo / "params.yaml").write_text(yaml.safe_dump(everything, sort_keys=False))
    forced = _run(["dvc", "repro", "-f", "--single-item", "train@synthetic-unet"], repo, env).stdout
    assert forced.count("finished earlier with this config and code, skipped") == 2, forced[-2000:]


def test_transfer_stage_onto_a_second_custom_dataset(quickstart_repo, tmp_path):
    """eval.transfer through DVC: the quickstart's synthetic models scored on a named custom dataset
    with other image sizes and a field of view; only the transfer, stats and report stages (and the
    cheap fetch/preprocess that read data.custom, with unchanged outputs) run; the table lists it."""
    import numpy as np
    from PIL import Image

    repo, env, _ = quickstart_repo
    _run(["git", "checkout", "params.yaml"], repo, env)
    _run(["dvc", "exp", "apply", "qs-test"], repo, env)
    clinic = tmp_path / "clinic"
    for d in ("images", "masks", "fov"):
        (clinic / d).mkdir(parents=True)
    for k, path in enumerate(sorted((repo / "data" / "raw" / "synthetic" / "images").iterdir())[:5]):
        w, h = 48 + 6 * k, 40 + 4 * k
        Image.open(path).convert("RGB").resize((w, h)).save(clinic / "images" / f"case{k}.png")
        mask = Image.open(repo / "data" / "raw" / "synthetic" / "masks" / f"{path.stem}.png").resize(
            (w, h), Image.NEAREST
        )
        Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(clinic / "masks" / f"case{k}.png")
        fov = np.zeros((h, w), np.uint8)
        fov[2:-2, 2:-2] = 255
        Image.fromarray(fov).save(clinic / "fov" / f"case{k}.png")
    params = _load_params(repo)
    params["data"]["custom"] = {"clinic": {**params["data"]["custom"], "title": "Second centre"}}
    params["data"]["sources"]["clinic"] = str(clinic)
    params["eval"]["transfer"] = {"synthetic": ["clinic"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = _run(["dvc", "repro", "--dry"], repo, env).stdout
    would_run = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
    assert "transfer@synthetic" in would_run and not {
        s for s in would_run if s.startswith(("train", "evaluate"))
    }
    _run(["dvc", "repro"], repo, env)
    table = (repo / "reports" / "tables" / "generalisation.md").read_text()
    assert "`synthetic` → `clinic` (FOV)" in table
    for entry in ENTRIES:
        assert f"| `{entry}` |" in table
        per_case = (
            repo / "data" / "eval" / "transfer" / "synthetic" / "clinic" / entry / "per_case.csv"
        ).read_text()
        assert "ensemble" in per_case and "case4" in per_case
    assert "up to date" in _run(["dvc", "status"], repo, env).stdout


def test_dvc_plots_draw_every_runs_curves_offline(quickstart_repo):
    """dvc.yaml's top-level plots: one chart per run keyed by epoch (and the DRGO terms of CASNet's runs),
    in an HTML page that loads nothing from the network."""
    repo, env, _ = quickstart_repo
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], repo, env).stdout)
    data = shown["data"]
    runs = json.loads((repo / "data" / "runs" / "synthetic" / "unet" / "summary.json").read_text())["runs"]
    for model in ("unet", "casnet"):
        for run in runs:
            name = f"data/curves/synthetic/{model}/fold{run['fold']}_seed{run['seed']}.tsv"
            values = data[name][0]["content"]["data"]["values"]
            assert {v["field"] for v in values} == {"train_loss", "val_loss", "val_dice"}
            epochs = sorted({int(v["epoch"]) for v in values})
            assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2  # every epoch, from 1
    assert any(k.startswith("data/drgo_curves/synthetic/casnet/") for k in data)
    assert not any(k.startswith("data/drgo_curves/synthetic/unet/") for k in data)
    assert not shown.get("errors"), shown.get("errors")
    _run(["dvc", "plots", "show", "-o", "plots_html"], repo, env)
    page = (repo / "plots_html" / "index.html").read_text()
    assert "vegaEmbed" in page and "cdn.jsdelivr" not in page and "<script src=" not in page


def test_mlflow_has_a_model_per_parent_and_the_registered_one_predicts_as_medfusion_predict(
    quickstart_repo, monkeypatch
):
    """Each (dataset, entry) parent logged its fold ensemble; each dataset's CASNet is registered with
    alias `newest` (no `champion`: the quickstart is not the paper protocol); loaded from the registry,
    it predicts a synthetic image exactly as `medfusion predict` does."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from PIL import Image

    repo, env, _ = quickstart_repo
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    models = client.search_logged_models(experiment_ids=experiments, max_results=100)
    parents = {r.info.run_id for r in client.search_runs(experiments, "tags.mlflow.runName = 'casnet'")}
    assert len(models) >= 6 and parents <= {m.source_run_id for m in models}  # 2 datasets x 3 entries
    for dataset in ("synthetic", "synthetic_volumes"):
        assert client.get_model_version_by_alias(f"medfusion_{dataset}_casnet", "newest").version
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias(f"medfusion_{dataset}_casnet", "champion")
    image_path = sorted((repo / "data" / "raw" / "synthetic" / "images").iterdir())[0]
    image = np.asarray(Image.open(image_path).convert("RGB"))
    monkeypatch.chdir(repo)  # the weights are the repository's (data/runs), as DVC keeps them
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/medfusion_synthetic_casnet@newest")
    mask = model.predict(image[None])[0]
    out = repo / "predicted"
    _run([sys.executable, "-m", "medfusion.cli", "predict", "--run", "data/runs/synthetic/casnet",
          str(image_path), "--out", str(out)], repo, env)  # fmt: skip
    assert np.array_equal(mask, np.asarray(Image.open(out / f"{image_path.stem}_mask.png")))


def test_a_colleague_gets_the_experiment_through_git_and_a_dvc_remote(quickstart_repo, tmp_path):
    """The README's sharing round trip with a local-folder DVC remote: push the experiment, clone,
    pull it, and get the same checkpoints and metrics, with nothing to rerun once `dvc repro source` has
    remade the links to the data sources."""
    repo, env, _ = quickstart_repo
    origin, store, clone = tmp_path / "origin.git", tmp_path / "dvc-store", tmp_path / "clone"
    _run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)
    _run(["git", "remote", "add", "origin", str(origin)], repo, env)
    # --local: the remote applies to every revision, the experiment's too (made before it was added)
    _run(["dvc", "remote", "add", "--local", "-d", "shared", str(store)], repo, env)
    _run(["git", "push", "-q", "origin", "main"], repo, env)
    _run(["dvc", "exp", "push", "origin", "qs-test"], repo, env)
    assert any(store.rglob("*")), "nothing reached the DVC remote"

    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    _run(["dvc", "remote", "add", "--local", "-d", "shared", str(store)], clone, env)
    _run(["dvc", "exp", "pull", "origin", "qs-test"], clone, env)
    _run(["dvc", "exp", "apply", "qs-test"], clone, env)
    _run(["dvc", "pull"], clone, env)
    weights = "data/runs/synthetic/casnet/fold0_seed0/model.pt"
    assert (clone / weights).read_bytes() == (repo / weights).read_bytes()
    assert json.loads((clone / "reports" / "metrics.json").read_text()) == json.loads(
        (repo / "reports" / "metrics.json").read_text()
    )
    # data/sources/<name> is neither in git nor cached (medfusion/data/sources.py): only its links are missing
    missing = set(json.loads(_run(["dvc", "status", "--json"], clone, env).stdout))
    assert missing == {f"{s}@{d}" for s in ("source", "fetch") for d in ("synthetic", "synthetic_volumes")}
    remade = _run(["dvc", "repro", "source"], clone, env).stdout
    assert "Running stage 'source@synthetic'" in remade and "Running stage 'fetch" not in remade
    assert "up to date" in _run(["dvc", "status"], clone, env).stdout
