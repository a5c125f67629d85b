import copy
import dataclasses

import pytest
import yaml
from conftest import REPO, raw_params, with_key

from medfusion.config import ConfigError, baseline_names, load_params, model_sections, params_from_dict
from medfusion.data.registry import DATASET_NAMES
from medfusion.entries import resolve_entry, resolve_model
from medfusion.models import MODELS


def test_params_yaml_is_the_paper_protocol():
    p = load_params(REPO / "params.yaml")
    assert p.datasets == ["kvasir_seg", "promise12", "chase_db1", "lits17"]
    assert p.data.image_size == 256
    assert (p.cv.n_folds, p.cv.seeds) == (5, [0, 1, 2])
    assert (p.train.optimizer, p.train.scheduler, p.train.lr, p.train.batch_size) == (
        "adam",
        "cosine",
        1e-4,
        16,
    )
    assert (p.train.epochs, p.train.patience) == (100, 10)


def test_every_model_in_params_builds():
    p = load_params(REPO / "params.yaml")
    assert set(p.models.baselines) == set(MODELS) - {"casnet"} == set(baseline_names())
    assert set(model_sections()) == {"model", *baseline_names()}  # every registered model has its section
    assert p.model_names[:5] == ["casnet", "casnet_wo_hfe", "casnet_wo_ca", "casnet_wo_br", "casnet_wo_drgo"]
    for name in p.model_names:
        spec = resolve_model(p, name)
        assert spec.architecture in MODELS
        spec.build(3, 2)
    assert set(p.data.sources) <= set(DATASET_NAMES)


def test_ablation_entries_override_the_model_section():
    p = load_params(REPO / "params.yaml")
    kwargs = {name: resolve_model(p, name).kwargs for name in p.model_names}
    assert kwargs["casnet_wo_hfe"]["use_hfe"] is False and kwargs["casnet"]["use_hfe"] is True
    assert kwargs["casnet_wo_ca"]["use_attention"] is False
    assert "use_boundary" not in kwargs["casnet_wo_br"] and "drgo" not in kwargs["casnet"]  # loss settings
    wo_br, full = (resolve_entry(p, "kvasir_seg", n) for n in ("casnet_wo_br", "casnet"))
    assert wo_br.drgo.use_boundary is False and full.drgo.use_boundary is True
    wo_drgo = resolve_entry(p, "kvasir_seg", "casnet_wo_drgo")  # the same network, trained with L_seg only
    assert wo_drgo.drgo is None and wo_drgo.model == full.model and not wo_drgo.boundary
    assert wo_drgo.run_hash("d", {}, 0, 0) != full.run_hash("d", {}, 0, 0)
    assert full.model.kwargs["modalities"] == 1 and full.architecture == "casnet"
    assert resolve_entry(p, "kvasir_seg", "unet").drgo is None  # the paper trains baselines with L_seg
    assert kwargs["transunet"]["image_size"] == 256 and kwargs["medt"]["image_size"] == 256
    assert "image_size" not in kwargs["unet"]  # only constructors that take it


def test_drgo_settings_mirror_the_drgo_section():
    """DRGOSettings is built from the drgo section by name: the same keys, plus use_boundary."""
    import dataclasses

    from medfusion.config import DRGOParams
    from medfusion.losses.drgo import DRGOSettings

    assert {f.name for f in dataclasses.fields(DRGOSettings)} == {
        f.name for f in dataclasses.fields(DRGOParams)
    } | {"use_boundary"}


def _with(path: str, value, delete: bool = False) -> dict:
    return with_key(raw_params(), path, value, delete)


@pytest.mark.parametrize(
    ("path", "value", "delete", "message"),
    [
        ("train.epoch", 3, False, "unknown key(s) ['train.epoch']"),
        ("train.epochs", None, True, "missing key(s) ['train.epochs']"),
        ("train.epochs", "ten", False, "train.epochs: expected int, got str 'ten'"),
        ("train.epochs", 0, False, "train.epochs = 0; expected an integer >= 1"),
        ("train.lr", True, False, "train.lr: expected float"),
        (
            "models.baselines",
            ["unet", "resnet"],
            False,
            "models.baselines[1] = 'resnet'; expected one of ['attention_unet', 'deeplabv3', 'medt', 'segnet'",
        ),
        (
            "models.casnet",
            ["casnet", "casnet_wo_x"],
            False,
            "models.casnet[1] = 'casnet_wo_x'; expected a key of",
        ),
        ("ablations.casnet_wo_hfe", {"use_hfee": False}, False, "ablations.casnet_wo_hfe.use_hfee = False"),
        (
            "ablations.casnet_wo_hfe",
            {"use_hfe": "no"},
            False,
            "ablations.casnet_wo_hfe.use_hfe: expected bool",
        ),
        ("ablations.unet", {"use_hfe": False}, False, "ablations.unet = 'unet'; expected a name that is not"),
        ("model.transformer_dim", 100, False, "model.transformer_dim = 100; expected a multiple of 8"),
        ("model.transformer_scales", [4], False, "model.transformer_scales = [4]"),
        ("model.modalities", 0, False, "model.modalities = 0"),
        ("deeplabv3.output_stride", 32, False, "deeplabv3.output_stride = 32; expected 8 or 16"),
        (
            "transunet.num_heads",
            5,
            False,
            "transunet.hidden_size = 768; expected a multiple of transunet.num_heads",
        ),
        ("medt.heads", 16, False, "medt.base_channels = 32; expected a multiple of 4 with"),
        ("medt.blocks", [1], False, "medt.blocks = [1]; expected a list of at least two"),
        ("data.image_size", 240, False, "data.image_size = 240; expected a multiple of 64 for medt"),
        ("datasets", ["kvasir"], False, "datasets[0] = 'kvasir'; expected one of"),
        ("data.image_size", 100, False, "data.image_size = 100; expected a multiple of 16"),
        ("train.device", "tpu", False, "train.device = 'tpu'; expected one of ['auto', 'cpu', 'cuda']"),
        ("cv.seeds", [], False, "cv.seeds = []"),
        ("model.atrous_rates", [1, "two"], False, "model.atrous_rates[1]: expected int"),
        ("data.sources.kvasir", None, False, "data.sources.kvasir"),
        (
            "data.custom.paper_dataset",
            "lits",
            False,
            "data.custom.paper_dataset = 'lits'; expected null or one of",
        ),
    ],
)
def test_bad_params_name_the_key(path, value, delete, message):
    with pytest.raises(ConfigError) as err:
        params_from_dict(_with(path, value, delete))
    assert message in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_params_are_frozen():
    p = load_params(REPO / "params.yaml")
    with pytest.raises(AttributeError):
        p.train.epochs = 1


def test_params_yaml_is_read_as_dvc_reads_it(tmp_path):
    """`dvc exp run -S train.compile=off` writes a bare `compile: off`: a string in YAML 1.2 (DVC), and
    so for load_params; only true/false are booleans (YAML 1.1's on/off/yes/no are not)."""
    text = (REPO / "params.yaml").read_text()
    assert "  compile: auto" in text and "  cpu_bf16: auto" in text and "  channels_last: auto" in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  compile: auto", "  compile: off"))
    assert load_params(path).train.compile == "off"
    assert yaml.safe_load(path.read_text())["train"]["compile"] is False  # what YAML 1.1 would have said
    path.write_text(text.replace("  cpu_bf16: auto", "  cpu_bf16: on"))
    with pytest.raises(ConfigError, match=r"train.cpu_bf16: expected bool or 'auto', got str 'on'"):
        load_params(path)
    path.write_text(text.replace("  cpu_bf16: auto", "  cpu_bf16: false"))
    assert load_params(path).train.cpu_bf16 is False
    raw = copy.deepcopy(raw_params())
    raw["train"]["compile"] = True
    with pytest.raises(ConfigError, match="train.compile"):
        params_from_dict(raw)


def test_a_custom_section_without_paper_dataset_reads_as_null():
    """paper_dataset came after custom sections were written: leaving it out is not an error."""
    raw = raw_params()
    del raw["data"]["custom"]["paper_dataset"]
    assert params_from_dict(raw).data.custom.paper_dataset is None
    del raw["data"]["custom"]["title"]  # every other key is still required
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['data.custom.title'\]"):
        params_from_dict(raw)


def test_params_yaml_is_the_paper_protocol_and_runs_say_where_they_differ():
    from medfusion.config import PAPER_PROTOCOL, load_params, protocol_differences, protocol_note

    params = load_params(REPO / "params.yaml")
    assert protocol_differences(params) == {}  # the defaults are METHOD.md's protocol
    assert "no setting differs" in protocol_note(params)
    short = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=6))
    assert protocol_differences(short) == {"train.epochs": (6, PAPER_PROTOCOL["train.epochs"])}
    assert "train.epochs = 6 (paper: 100)" in protocol_note(short)
