"""Get a dataset into data/raw/<name>: generate it, copy a verified local copy, or download it.

Whatever the route, the result appears atomically: files are assembled in a temporary sibling
folder and renamed into place at the end, so a half-finished fetch never looks finished.
There is no fallback: a dataset that cannot be had stops with `FetchError`, naming the dataset,
the URL tried and the params key / CLI option that points it at a local copy.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from medfusion.config import SyntheticParams
from medfusion.data.io import write_json
from medfusion.data.registry import DATASETS, DatasetSpec
from medfusion.data.synthetic import write_synthetic_images, write_synthetic_volumes

# sha256 of the sorted "<sha256>  <relative path>" lines of the image and label files; no official
# checksum is published for these archives, so we check what was extracted against these.
FINGERPRINTS = {
    "kvasir_seg": "010f104f211d4f8779ca72ce88868b6a6f71e6fd2216bd67511acd984b5d6043",
    "chase_db1": "3327799e07b78318181353b7a7e58fa86bd08ad3cee118f9f51abf5e121653dc",
}


class FetchError(RuntimeError):
    """A dataset could not be had; the message says what to do."""


def _pairs_flat(root: Path, image_glob: str, label_for: Callable[[Path], Path]) -> list[Path]:
    files = []
    for image in sorted(root.glob(image_glob)):
        label = label_for(image)
        if not label.exists():
            raise FetchError(f"{image}: no label file {label.name} beside it")
        files += [image, label]
    return files


def mask_path(spec: DatasetSpec, root: Path, image: Path) -> Path:
    """The mask of a 2-D image: same name under masks/ (Kvasir-SEG's JPEG), PNG for `synthetic`."""
    name = image.stem + ".png" if spec.name == "synthetic" else image.name
    return root / "masks" / name


def dataset_files(spec: DatasetSpec, root: Path) -> tuple[Path, list[Path]]:
    """The dataset's top folder under `root` and its files, checked for completeness (every image has its label).

    Raises:
        FetchError: when the layout is not the dataset's, naming what was expected.
    """
    if spec.name in ("kvasir_seg", "synthetic"):
        if not (root / "images").is_dir() and (root / "Kvasir-SEG" / "images").is_dir():
            root = root / "Kvasir-SEG"  # the official zip has one top folder
        if not (root / "images").is_dir() or not (root / "masks").is_dir():
            raise FetchError(f"{root}: expected {spec.title}'s images/ and masks/ folders")
        images = [
            p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        ]
        masks = [mask_path(spec, root, image) for image in images]
        for image, mask in zip(images, masks, strict=True):
            if not mask.exists():
                raise FetchError(f"{image}: no mask {mask.relative_to(root)}")
        if not images:
            raise FetchError(f"{root}/images: no images found")
        return root, images + masks
    if spec.name == "chase_db1":
        files = _pairs_flat(root, "Image_*[LR].jpg", lambda p: p.with_name(p.stem + "_1stHO.png"))
        files += sorted(root.glob("Image_*_2ndHO.png"))
    elif spec.name == "promise12":
        files = []
        for header in sorted(root.rglob("Case[0-9][0-9].mhd")):
            label = header.with_name(header.stem + "_segmentation.mhd")
            group = [header, header.with_suffix(".raw"), label, label.with_suffix(".raw")]
            missing = [p.name for p in group if not p.exists()]
            if missing:
                raise FetchError(f"{header}: missing {missing} beside it")
            files += group
    elif spec.name in ("lits17", "synthetic_volumes"):
        files = []
        for volume in sorted(root.rglob("volume-*.nii*")):
            label = volume.with_name(volume.name.replace("volume-", "segmentation-"))
            if not label.exists():
                raise FetchError(f"{volume}: no label {label.name} beside it")
            files += [volume, label]
    else:
        raise FetchError(f"dataset {spec.name!r} has no file layout")
    if not files:
        raise FetchError(f"{root}: no {spec.title} files found; see `medfusion fetch --help` for the layouts")
    return root, files


def fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 of the sorted '<sha256>  <path relative to root>' lines of `files`."""
    lines = []
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        lines.append(f"{digest}  {f.relative_to(root).as_posix()}\n")
    lines.sort(key=lambda line: line.split("  ", 1)[1])
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _copy_files(spec: DatasetSpec, source: Path, dest: Path) -> dict:
    root, files = dataset_files(spec, source)
    digest = fingerprint(root, files)
    expected = FINGERPRINTS.get(spec.name)
    if expected and digest != expected:
        raise FetchError(
            f"{spec.name}: the files under {source} do not match the official release (fingerprint {digest[:12]}..., "
            f"expected {expected[:12]}...): a changed, partial or re-encoded copy. Point data.sources.{spec.name} "
            "at an unmodified copy."
        )
    for f in tqdm(files, desc=f"copy {spec.name}", unit="file", leave=False):
        target = dest / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return {"files": len(files), "fingerprint": digest}


def download(url: str, dest: Path, retries: int = 3, timeout: float = 60.0) -> None:
    """Download `url` to `dest` with a progress bar, resuming a partial `dest.part` and retrying.

    Raises:
        FetchError: after `retries` failed attempts, with the last reason.
    """
    part = dest.with_name(dest.name + ".part")
    last = ""
    for attempt in range(1, retries + 1):
        start = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if start and response.status != 206:  # server ignored the range: start over
                    start = 0
                total = int(response.headers.get("Content-Length", 0)) + start or None
                with (
                    open(part, "ab" if start else "wb") as f,
                    tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=dest.name) as bar,
                ):
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            part.replace(dest)
            return
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            last = str(getattr(err, "reason", err))
            if attempt < retries:
                time.sleep(2 * attempt)
    raise FetchError(last)


def safe_extract_zip(archive: Path, dest: Path) -> None:
    """Extract `archive` into `dest`, refusing absolute paths, '..' escapes and symlinks."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise FetchError(
                    f"{archive}: member {info.filename!r} escapes the target folder; refusing to extract"
                )
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise FetchError(f"{archive}: member {info.filename!r} is a symlink; refusing to extract")
        zf.extractall(dest)


def fetch_dataset(name: str, out_dir: Path, source: str | Path | None, synthetic: SyntheticParams) -> dict:
    """Fill `out_dir` with dataset `name`; returns the record written to out_dir/FETCHED.json.

    Args:
        name: a key of DATASETS.
        out_dir: data/raw/<name>; replaced atomically.
        source: a local copy (folder or the official archive), or None to generate / download.
        synthetic: generator settings for the synthetic datasets.
    """
    spec = DATASETS[name]
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if name == "synthetic":
            write_synthetic_images(tmp, synthetic.num_images, synthetic.seed)
            record = {"generated": True, "seed": synthetic.seed, "num_images": synthetic.num_images}
        elif name == "synthetic_volumes":
            write_synthetic_volumes(tmp, synthetic.num_volumes, synthetic.slices_per_volume, synthetic.seed)
            record = {"generated": True, "seed": synthetic.seed, "num_volumes": synthetic.num_volumes}
        elif source is not None:
            record = {"source": str(source), **_from_local(spec, Path(source), tmp)}
        else:
            record = {"source": spec.url, **_from_url(spec, tmp)}
        write_json(tmp / "FETCHED.json", record)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _from_local(spec: DatasetSpec, source: Path, dest: Path) -> dict:
    if not source.exists():
        raise FetchError(f"{spec.name}: local copy {source} does not exist (data.sources.{spec.name})")
    if source.is_file() and zipfile.is_zipfile(source):
        unpacked = dest.with_name(dest.name + ".unzipped")
        shutil.rmtree(unpacked, ignore_errors=True)
        try:
            safe_extract_zip(source, unpacked)
            return _copy_files(spec, unpacked, dest)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
    if not source.is_dir():
        raise FetchError(f"{spec.name}: local copy {source} is neither a folder nor a zip archive")
    return _copy_files(spec, source, dest)


def _from_url(spec: DatasetSpec, dest: Path) -> dict:
    how = (
        f"Point it at a local copy: set data.sources.{spec.name} in params.yaml "
        f"(or `dvc exp run -S data.sources.{spec.name}=PATH`), or run `medfusion fetch {spec.name} --source PATH`."
    )
    if spec.url is None:
        raise FetchError(f"dataset {spec.name} ({spec.title}) cannot be downloaded: {spec.access}. {how}")
    downloads = dest.parent / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / re.sub(r"[^A-Za-z0-9._-]", "_", spec.url.rsplit("/", 1)[-1])
    if not archive.exists():
        try:
            download(spec.url, archive)
        except FetchError as err:
            raise FetchError(f"dataset {spec.name}: could not download {spec.url} ({err}). {how}") from err
    try:
        return _from_local(spec, archive, dest)
    except FetchError as err:
        archive.unlink(missing_ok=True)  # a bad archive must not be reused
        raise FetchError(
            f"dataset {spec.name}: downloaded archive from {spec.url} is not usable: {err}"
        ) from err
