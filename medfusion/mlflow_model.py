"""Each (dataset, entry) as an MLflow model: the fold ensemble, its recorded preprocessing and the
post-processing chosen on validation, behind `mlflow.pyfunc.load_model(uri).predict(images)`.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/medfusion_kvasir_seg_casnet@champion")
    masks = model.predict(images)   # (N, H, W, 3) or (N, H, W) uint8 -> (N, H, W) uint8 class indices

A 2-D model takes a batch of images of one size (N, H, W, 3) or (N, H, W), uint8 as read from their
files, and returns their masks (N, H, W): what `medfusion predict` writes for the same images
(`predict.case_mask`, one function for both). A volume model takes one volume (D, H, W) in its
stored units (CT: HU), axial slices first, and returns its mask (D, H, W).

Weights: the model does not copy the checkpoints into the MLflow store, since DVC already keeps them
(data/runs/<dataset>/<entry>, `dvc pull` fetches them) and an entry's 15 checkpoints can be
gigabytes. Its `model_config` records where they are (the folder in the repository and on the
machine that logged it) and the sha256 of every checkpoint; loading finds the folder (the recorded
absolute path, else the repository path under DVC_ROOT or the working directory) and refuses weights
whose sha256 differs, naming the `dvc pull` that fetches the right ones. The model's directory in
the store holds the MLmodel file, the signature, an input example and the requirements.

Registered: the report stage registers each dataset's CASNet ensemble as model
`<mlflow.experiment_prefix>_<dataset>_casnet`, with alias `newest` on the newest version and
`champion` on the newest one trained at the paper protocol (`config.protocol_differences` empty).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.data.io import file_sha256

try:  # the class must be importable where MLflow is installed; it is, with this package
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    PythonModel = object


def find_run_dir(config: dict[str, Any]) -> Path:
    """The ensemble's folder: the recorded absolute path, else the repository path under DVC_ROOT or
    the working directory; checked against the recorded checkpoints' sha256."""
    candidates = [Path(config["absolute_run_dir"])]
    for root in (os.environ.get("DVC_ROOT"), os.getcwd()):
        if root and config.get("run_dir"):
            candidates.append(Path(root) / config["run_dir"])
    for folder in candidates:
        if all((folder / name).is_file() for name in config["checkpoints"]):
            for name, sha in config["checkpoints"].items():
                if file_sha256(folder / name) != sha:
                    raise FileNotFoundError(
                        f"{folder / name}: its sha256 differs from the one this MLflow model recorded "
                        f"({sha[:12]}...); check out the commit that trained it "
                        f"({config.get('git_commit') or 'its tag mlflow.source.git.commit'}) and "
                        f"`dvc pull {config.get('run_dir') or folder}`"
                    )
            return folder
    raise FileNotFoundError(
        f"the checkpoints of this MLflow model are in {config.get('run_dir')} of its repository (DVC keeps "
        f"them, not the MLflow store); none of {[str(c) for c in candidates]} holds them. In a clone: "
        f"`dvc pull {config.get('run_dir')}`, then load from the repository root"
    )


class EnsembleModel(PythonModel):
    """The pyfunc flavour's model (module docstring)."""

    def load_context(self, context) -> None:
        from medfusion.hardware import resolve_precision
        from medfusion.predict import chosen_postprocess, ensemble_postprocess, load_ensemble

        config = context.model_config
        folder = find_run_dir(config)
        precision = resolve_precision(config.get("device", "auto"), config.get("cpu_bf16", "auto"), "auto")
        self.ensemble = load_ensemble(folder, precision)
        eval_json = Path(config["eval_json"]) if config.get("eval_json") else None
        chosen = chosen_postprocess(self.ensemble, eval_json if eval_json and eval_json.is_file() else None)
        self.postprocess = ensemble_postprocess(self.ensemble, chosen)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from medfusion.predict import array_case, case_mask

        array = np.asarray(model_input)
        if self.ensemble.preprocessing.kind == "volume":
            return case_mask(self.ensemble, array_case(array, self.ensemble.preprocessing), self.postprocess)[
                0
            ]
        images = array if array.ndim == 4 or (array.ndim == 3 and self._grey()) else array[None]
        return np.stack(
            [
                case_mask(
                    self.ensemble,
                    array_case(image, self.ensemble.preprocessing, f"image {i}"),
                    self.postprocess,
                )[0]
                for i, image in enumerate(images)
            ]
        )

    def _grey(self) -> bool:
        return self.ensemble.preprocessing.in_channels == 1


def model_config(run_dir: Path, eval_json: Path | None, repo: Path, git_commit: str = "") -> dict[str, Any]:
    """What `EnsembleModel.load_context` needs: where the checkpoints are and their sha256."""
    run_dir = Path(run_dir).resolve()
    try:
        in_repo = str(run_dir.relative_to(Path(repo).resolve()))
    except ValueError:
        in_repo = None
    checkpoints = {
        str(p.relative_to(run_dir)): file_sha256(p) for p in sorted(run_dir.glob("fold*/model.pt"))
    }
    return {
        "run_dir": in_repo,
        "absolute_run_dir": str(run_dir),
        "checkpoints": checkpoints,
        "eval_json": str(Path(eval_json).resolve()) if eval_json else None,
        "git_commit": git_commit,
        "device": "auto",
    }


def signature_of(example: np.ndarray):
    """Images of any size: (-1, -1, -1, 3) or (-1, -1, -1) uint8 in, (-1, -1, -1) uint8 masks out;
    a volume: (-1, -1, -1) of the example's dtype in, (-1, -1, -1) uint8 out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    shape = (-1,) * example.ndim
    return ModelSignature(
        inputs=Schema([TensorSpec(example.dtype, shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )


def log_ensemble_model(
    parent_run_id: str,
    uri: str,
    config: dict[str, Any],
    example: np.ndarray,
    registered_name: str | None = None,
    champion: bool = False,
) -> str:
    """Log the ensemble as model "model" of the parent run (signature from `example`, the input
    example itself); with `registered_name`, register it and move alias `newest` (and `champion`
    when asked) to the new version. -> the model's URI."""
    import logging
    import warnings

    import mlflow
    import torch

    from medfusion.training.tracking import _check_server, _quiet_mlflow

    _check_server(uri)
    _quiet_mlflow()
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # its note on pickling a class by reference
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    mlflow.set_tracking_uri(uri)
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", "numpy",
                    "opencv-python-headless", "scipy", "pillow", "medfusion"]  # fmt: skip
    with mlflow.start_run(run_id=parent_run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=EnsembleModel(),  # pickled without weights: load_context reads them
            model_config=config,
            signature=signature_of(example),
            input_example=example,
            pip_requirements=requirements,
        )
    if registered_name:
        client = mlflow.MlflowClient(tracking_uri=uri)
        version = mlflow.register_model(info.model_uri, registered_name).version
        client.set_registered_model_alias(registered_name, "newest", version)
        if champion:
            client.set_registered_model_alias(registered_name, "champion", version)
    return info.model_uri
