"""Very large images and outputs that cannot be written, as `medfusion predict` meets them: a
14000 x 14000 PNG (a decompression-bomb-sized file) is refused by name with the limit and the option
that raises it, and the rest of the batch is predicted; an --out that cannot be written is refused
before any prediction, and the check leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from test_predict import rgb_run, write_rgb_png  # noqa: F401  (rgb_run: a fixture)
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.data.io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DataError,
    read_image,
    set_max_image_pixels,
    writable_dir,
)

runner = CliRunner()


@pytest.fixture
def default_limit():
    set_max_image_pixels(None)
    yield
    set_max_image_pixels(None)


def _huge_png(path: Path, side: int = 14000) -> Path:
    Image.new("L", (side, side)).save(path)  # 196 M pixels, a few hundred KB on disk
    return path


def test_a_huge_image_is_refused_by_name_and_the_batch_goes_on(rgb_run, tmp_path, default_limit):  # noqa: F811
    huge = _huge_png(tmp_path / "huge.png")
    write_rgb_png(tmp_path / "good.png", 40, 40)
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "--run", str(rgb_run), str(huge), str(tmp_path / "good.png"),
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 1 and (out / "good_mask.png").exists() and not (out / "huge_mask.png").exists()
    assert f"{huge}: Image size (196000000 pixels) exceeds limit" in result.output
    assert "--max-image-pixels" in result.output and "data.max_image_pixels" in result.output
    assert "1 of 2 inputs predicted" in result.output and "Traceback" not in result.output


def test_the_limit_is_the_limit_and_can_be_raised(tmp_path, default_limit):
    write_rgb_png(tmp_path / "small.png", 40, 40)
    set_max_image_pixels(1599)  # 40 x 40 = 1600: over, though below twice the limit (Pillow only warns there)
    with pytest.raises(DataError, match=r"small\.png: Image size \(1600 pixels\) exceeds limit of 1599"):
        read_image(tmp_path / "small.png")
    set_max_image_pixels(1600)
    assert read_image(tmp_path / "small.png").shape == (40, 40, 3)
    set_max_image_pixels(None)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


def test_an_output_that_cannot_be_written_is_refused_before_any_prediction(rgb_run, tmp_path, monkeypatch):  # noqa: F811
    write_rgb_png(tmp_path / "good.png", 40, 40)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["predict", "--run", str(rgb_run), str(tmp_path / "good.png"),
                                 "--out", str(blocker / "masks")])  # fmt: skip
    assert result.exit_code == 1 and f"--out {blocker / 'masks'}: cannot write there" in result.output
    assert "predict:" not in result.output and "Traceback" not in result.output  # refused before predicting

    import medfusion.data.io as io

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "NamedTemporaryFile", read_only)  # a folder this user cannot write
    target = tmp_path / "new" / "deeper"
    with pytest.raises(DataError, match=r"--out .*deeper: cannot write there \(Permission denied\)"):
        writable_dir(target, "--out")
    assert not (tmp_path / "new").exists()  # the folders the check made are gone again


def test_preprocessing_names_the_huge_file(tmp_path, default_limit):
    import dataclasses

    from conftest import tiny_raw_params

    from medfusion.config import params_from_dict
    from medfusion.data.preprocess import preprocess_dataset

    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    write_rgb_png(raw / "images" / "ok.png", 40, 40)
    Image.new("L", (40, 40), 255).save(raw / "masks" / "ok.png")
    _huge_png(raw / "images" / "huge.png")
    Image.new("L", (14000, 14000)).save(raw / "masks" / "huge.png")
    custom = dataclasses.asdict(params_from_dict(tiny_raw_params()).data.custom)
    with pytest.raises(
        DataError, match=r"huge\.png: Image size \(196000000 pixels\) exceeds limit.*max_image_pixels"
    ):
        preprocess_dataset("custom", raw, tmp_path / "processed", 32, custom)
    assert not (tmp_path / "processed").exists()
