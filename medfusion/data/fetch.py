"""Get a dataset into data/raw/<name>: generate it, copy a verified local copy, or download it.

Whatever the route, the result appears atomically: files are assembled in a temporary sibling
folder and renamed into place at the end, so a half-finished fetch never looks finished.
There is no fallback: a dataset that cannot be had stops with `FetchError`, naming the dataset,
the URL tried and the params key / CLI option that points it at a local copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import time
import unicodedata
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from medfusion.common import UserError
from medfusion.config import SyntheticParams
from medfusion.data.io import IMAGE_SUFFIXES, atomic_dir, write_json
from medfusion.data.registry import CUSTOM_LAYOUT, DatasetSpec, dataset_spec
from medfusion.data.synthetic import write_synthetic_images, write_synthetic_volumes

# sha256 of the sorted "<sha256>  <relative path>" lines of the image and label files; no official
# checksum is published for these archives, so we check what was extracted against these.
FINGERPRINTS = {
    "kvasir_seg": "010f104f211d4f8779ca72ce88868b6a6f71e6fd2216bd67511acd984b5d6043",
    "chase_db1": "3327799e07b78318181353b7a7e58fa86bd08ad3cee118f9f51abf5e121653dc",
}


class FetchError(UserError, RuntimeError):
    """A dataset could not be had; the message says what to do."""


def _pairs_flat(root: Path, image_glob: str, label_for: Callable[[Path], Path]) -> list[Path]:
    files = []
    for image in sorted(root.glob(image_glob)):
        label = label_for(image)
        if not label.exists():
            raise FetchError(f"{image}: no label file {label.name} beside it")
        files += [image, label]
    return files


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _visible(paths) -> list[Path]:
    """Sorted files, without hidden ones (macOS `._name` resource forks ship inside some archives)."""
    return sorted(p for p in paths if p.is_file() and not p.name.startswith("."))


def file_stem(path: Path) -> str:
    """A file's name without its image or NIfTI suffix ('liver_3.nii.gz' -> 'liver_3')."""
    name = path.name
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def mask_path(spec: DatasetSpec, root: Path, image: Path) -> Path:
    """The mask of a 2-D image: same name under masks/ (Kvasir-SEG's JPEG), PNG for `synthetic`."""
    name = image.stem + ".png" if spec.name == "synthetic" else image.name
    return root / "masks" / name


def custom_pairs(root: Path, kind: str, channels: int = 1) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a custom dataset: images/ + masks/ (or labels/) matched by file stem, or
    nnU-Net's raw layout (`nnunet_pairs`, the image being a case's channel 0 file when `channels` > 1).
    The case id is the mask's stem.

    Raises:
        FetchError: no such folders, an image without its mask, or a file of the wrong kind.
    """
    if nnunet_root(root) is not None:
        return nnunet_pairs(nnunet_root(root), kind, channels=channels)
    if channels > 1:
        raise FetchError(
            f"{root}: data.custom.channels = {channels} needs nnU-Net's raw layout (dataset.json + "
            "imagesTr/<case>_0000<ending>, <case>_0001<ending>, ...); images/ + masks/ holds one file per case"
        )
    image_dir = root / "images"
    mask_dir = next((root / d for d in ("masks", "labels") if (root / d).is_dir()), None)
    if not image_dir.is_dir() or mask_dir is None:
        raise FetchError(f"{root}: expected images/ and masks/ (or labels/) folders; layout: {CUSTOM_LAYOUT}")
    wanted = NIFTI_SUFFIXES if kind == "volume" else IMAGE_SUFFIXES
    if not any(_visible(image_dir.iterdir())):
        raise FetchError(f"{image_dir}: no images found; layout: {CUSTOM_LAYOUT}")
    return stem_pairs(image_dir, mask_dir, wanted, f"data.custom.kind = {kind}")


NNUNET_LAYOUT = (
    "nnU-Net raw: dataset.json + imagesTr/<case>_0000<file_ending> + labelsTr/<case><file_ending> "
    "(imagesTs/ is not read: it has no labels)"
)


def nnunet_root(root: Path) -> Path | None:
    """The nnU-Net raw dataset folder at `root` (dataset.json, imagesTr/, labelsTr/), or in its one
    DatasetNNN_Name subfolder; None when `root` is not laid out so."""

    def is_raw(p: Path) -> bool:
        return (p / "dataset.json").is_file() and (p / "imagesTr").is_dir() and (p / "labelsTr").is_dir()

    if is_raw(root):
        return root
    found = [p for p in sorted(Path(root).glob("Dataset[0-9][0-9][0-9]_*")) if is_raw(p)]
    return found[0] if len(found) == 1 else None


def nnunet_description(root: Path) -> dict:
    """dataset.json of an nnU-Net raw dataset, checked: channel_names, labels (name -> one integer,
    0..K-1, background 0) and file_ending. -> {"channels": [...], "labels": [names by value], "ending"}.

    Raises:
        FetchError: a missing or malformed key, naming it and the file.
    """
    path = root / "dataset.json"
    try:
        desc = json.loads(path.read_text())
        channels = [desc["channel_names"][k] for k in sorted(desc["channel_names"], key=int)]
        labels, ending = desc["labels"], str(desc["file_ending"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FetchError(
            f"{path}: not an nnU-Net dataset.json (channel_names, labels, file_ending; {err!r})"
        ) from None
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise FetchError(
            f"{path}: labels {labels}; expected one integer per class (region-based labels are not read)"
        )
    by_value = {v: k for k, v in labels.items()}
    if sorted(by_value) != list(range(len(labels))) or by_value.get(0) != "background":
        raise FetchError(f"{path}: labels {labels}; expected background = 0 and the classes numbered 1..K-1")
    return {"channels": channels, "labels": [by_value[v] for v in range(len(labels))], "ending": ending}


def nnunet_pairs(
    root: Path, kind: str, class_names: list[str] | None = None, channels: int = 1
) -> list[tuple[Path, Path]]:
    """(imagesTr/<case>_0000<ending>, labelsTr/<case><ending>) of an nnU-Net raw dataset.

    `channels` (data.custom.channels) image files per case, _0000 to _{channels-1} (`channel_files`
    lists them from the _0000 one). With one: a 2-D RGB or grey file (nnU-Net's natural-image
    convention: channel_names R, G, B with one file), or one volume. With several, dataset.json must
    name as many channels; each file is one grey image or one volume. `class_names` (when given) must
    be dataset.json's label names in value order.

    Raises:
        FetchError: dataset.json malformed or disagreeing with data.custom, a case whose channel files
            are not _0000.._{channels-1}, a missing label, a file ending of the wrong kind.
    """
    desc = nnunet_description(root)
    ending = desc["ending"]
    named = len(desc["channels"])
    if channels > 1 and named != channels:
        raise FetchError(
            f"{root / 'dataset.json'}: channel_names {desc['channels']} ({named}); data.custom.channels is "
            f"{channels}: set data.custom.channels to {named}"
        )
    wanted = NIFTI_SUFFIXES if kind == "volume" else IMAGE_SUFFIXES
    if not ending.lower().endswith(wanted):
        raise FetchError(
            f"{root / 'dataset.json'}: file_ending {ending!r}, but data.custom.kind = {kind} expects {', '.join(wanted)}"
        )
    if class_names is not None and list(class_names) != desc["labels"]:
        raise FetchError(
            f"{root / 'dataset.json'}: labels {desc['labels']}; data.custom.class_names is {list(class_names)}: "
            f"set data.custom.class_names to {desc['labels']}"
        )
    files_of: dict[str, list[str]] = {}
    for image in _visible((root / "imagesTr").iterdir()):
        m = re.fullmatch(rf"(.+)_(\d{{4}}){re.escape(ending)}", image.name)
        if m is None:
            raise FetchError(f"{image}: not <case>_NNNN{ending}, as nnU-Net's imagesTr/ names files")
        files_of.setdefault(m.group(1), []).append(m.group(2))
    pairs = []
    wanted_files = [f"{k:04d}" for k in range(channels)]
    for case, found in sorted(files_of.items()):
        if sorted(found) != wanted_files:
            several = (
                f"set data.custom.channels to {len(found)} (and data.custom.modality to one that fits "
                "every channel)"
                if channels == 1 and sorted(found) == [f"{k:04d}" for k in range(len(found))]
                else f"every case needs _{wanted_files[0]}.._{wanted_files[-1]}{ending}"
            )
            raise FetchError(
                f"{root / 'imagesTr'}: case {case!r} has channel files {sorted(found)}; data.custom.channels "
                f"= {channels} expects {wanted_files}: {several}"
            )
        label = root / "labelsTr" / f"{case}{ending}"
        if not label.is_file():
            raise FetchError(
                f"{root / 'imagesTr' / (case + '_0000' + ending)}: no label {label.relative_to(root)}"
            )
        pairs.append((root / "imagesTr" / f"{case}_0000{ending}", label))
    if not pairs:
        raise FetchError(f"{root / 'imagesTr'}: no images found; layout: {NNUNET_LAYOUT}")
    return pairs


def channel_files(image: Path, channels: int) -> list[Path]:
    """The files of one case's channels, given its first: [image] for one channel; for several, nnU-Net's
    <case>_0000<ending> followed by <case>_0001<ending>, ... beside it.

    Raises:
        FetchError: `image` not named <case>_0000<ending>, or a channel file missing (naming it).
    """
    image = Path(image)
    if channels == 1:
        return [image]
    stem = file_stem(image)
    if not stem.endswith("_0000"):
        raise FetchError(
            f"{image}: {channels} channels are read from nnU-Net-named files <case>_0000<ending>, "
            f"<case>_0001<ending>, ...; this name is not <case>_0000<ending>"
        )
    case, ending = stem[: -len("_0000")], image.name[len(stem) :]
    files = [image.with_name(f"{case}_{k:04d}{ending}") for k in range(channels)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FetchError(f"{image}: channel files {missing} missing beside it ({channels} channels per case)")
    return files


def channel_case(image: Path) -> str | None:
    """<case> of a case given as nnU-Net channel files, named by its first (<case>_0000<ending> with
    <case>_0001<ending> beside it); None for any other file."""
    image = Path(image)
    stem = file_stem(image)
    if not stem.endswith("_0000"):
        return None
    second = image.with_name(stem[:-4] + "0001" + image.name[len(stem) :])
    return stem[: -len("_0000")] if second.is_file() else None


FOV_DIRS = ("fov", "roi")


def custom_fovs(root: Path, kind: str, pairs: list[tuple[Path, Path]]) -> dict[Path, Path]:
    """{image: its field-of-view mask} from an optional fov/ (or roi/) folder beside images/ (same
    stems; non-zero = inside); {} without one. Evaluation scores inside it.

    Raises:
        FetchError: a fov/ folder for volumes, or an image without its FOV mask.
    """
    fov_dir = next((root / d for d in FOV_DIRS if (root / d).is_dir()), None)
    if fov_dir is None:
        return {}
    if kind != "image":
        raise FetchError(f"{fov_dir}: a field-of-view folder is for 2-D images (data.custom.kind: image)")
    masks = {file_stem(m): m for m in _visible(fov_dir.iterdir())}
    found = {}
    for image, _ in pairs:
        fov = masks.get(file_stem(image))
        if fov is None:
            raise FetchError(
                f"{image}: no field-of-view mask with stem {file_stem(image)!r} in {fov_dir}; every image "
                f"needs one, or remove {fov_dir.name}/ to score whole images"
            )
        found[image] = fov
    return found


def stem_pairs(
    image_dir: Path,
    other_dir: Path,
    wanted: tuple[str, ...],
    expects: str,
    what: str = "mask",
    keep: set[Path] | None = None,
) -> list[tuple[Path, Path]]:
    """(image, its `what`) pairs: every file of `image_dir` (of the suffixes `wanted`) with the file of
    `other_dir` that has its stem ('c1.tif' <-> 'c1.png'). `expects` says who asks for `wanted`.
    `keep`: only these images, and a case given as channel files is matched by its case name
    (`channel_case`: 'c1_0000.png' <-> 'c1.png').

    Stems are compared in Unicode NFC, so that 'pólipo7' written precomposed (Windows, Linux) and
    decomposed (macOS) is one stem. Two files with one stem in either folder are refused, all of
    them listed, before anything is paired. A `what` without an image (an orphan) is named on stderr
    (up to 10); more than ORPHAN_MAX_FRACTION of them is refused as the naming mismatch it usually is.

    Raises:
        FetchError: an image of another type, an image without its `what`, duplicate stems, too many
            orphans, or no images.
    """
    images = [i for i in _visible(Path(image_dir).iterdir()) if keep is None or i in keep]
    others = _by_stem(_visible(Path(other_dir).iterdir()), file_stem, f"{what}s")
    stems = _by_stem(
        images, lambda i: (channel_case(i) if keep is not None else None) or file_stem(i), "images"
    )
    pairs = []
    for stem, image in stems.items():
        if not image.name.lower().endswith(wanted):
            kind = "NIfTI volume" if wanted == NIFTI_SUFFIXES else "2-D image"
            raise FetchError(f"{image}: not a {kind} ({', '.join(wanted)}), as {expects} expects")
        other = others.get(stem)
        if other is None:
            raise FetchError(f"{image}: no {what} with stem {stem!r} in {other_dir}")
        pairs.append((image, other))
    if not pairs:
        raise FetchError(f"{image_dir}: no images found")
    if keep is None:
        _check_orphans([others[s] for s in sorted(set(others) - set(stems))], len(others), image_dir, what)
    return pairs


ORPHAN_MAX_FRACTION = 0.1  # more masks than this without an image: refused (a naming mismatch)


def _by_stem(files: list[Path], stem_of: Callable[[Path], str], what: str) -> dict[str, Path]:
    """{NFC stem: file}; refuses two files with one stem, listing every such group."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(unicodedata.normalize("NFC", stem_of(f)), []).append(f)
    clashes = [sorted(g) for g in groups.values() if len(g) > 1]
    if clashes:
        shown = "; ".join(" and ".join(p.name for p in g) for g in clashes[:10])
        raise FetchError(
            f"{clashes[0][0].parent}: {len(clashes)} stem(s) name more than one of the {what} ({shown}"
            f"{'; ...' if len(clashes) > 10 else ''}): keep one file per case, or rename the others"
        )
    return {stem: g[0] for stem, g in groups.items()}


def _check_orphans(orphans: list[Path], total: int, image_dir: Path, what: str) -> None:
    """Name the `what` files that have no image (stderr, up to 10); refuse more than ORPHAN_MAX_FRACTION."""
    if not orphans:
        return
    shown = ", ".join(p.name for p in orphans[:10]) + (", ..." if len(orphans) > 10 else "")
    said = f"{len(orphans)} of {total} {what}s in {orphans[0].parent} have no image in {image_dir} ({shown})"
    if len(orphans) > ORPHAN_MAX_FRACTION * total:
        raise FetchError(
            f"{said}: more than {ORPHAN_MAX_FRACTION:.0%} unpaired, usually file names that differ between "
            f"the folders (a prefix, a suffix, the case): name each {what} as its image"
        )
    print(f"warning: {said}; they are not used", file=sys.stderr)


def msd_pairs(root: Path, prefix: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a Decathlon task: imagesTr/<prefix>_N.nii.gz + labelsTr/ with the same name."""
    image_dirs = sorted(p for p in root.rglob("imagesTr") if p.is_dir())
    if not image_dirs:
        raise FetchError(f"{root}: no imagesTr/ folder (a Medical Segmentation Decathlon task)")
    pairs = []
    for image in _visible(image_dirs[0].glob(f"{prefix}_*.nii*")):
        label = image.parent.parent / "labelsTr" / image.name
        if not label.exists():
            raise FetchError(f"{image}: no label {label.relative_to(root)}")
        pairs.append((image, label))
    return pairs


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
        images = [p for p in _visible((root / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
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
        for volume in _visible(root.rglob("volume-*.nii*")):
            label = volume.with_name(volume.name.replace("volume-", "segmentation-"))
            if not label.exists():
                raise FetchError(f"{volume}: no label {label.name} beside it")
            files += [volume, label]
    elif spec.name in ("msd_prostate", "msd_liver"):
        files = [f for pair in msd_pairs(root, spec.name.removeprefix("msd_")) for f in pair]
    elif spec.custom and nnunet_root(root) is not None:
        nnunet = nnunet_root(root)
        pairs = nnunet_pairs(nnunet, spec.kind, list(spec.class_names), spec.channel_files)
        files = [nnunet / "dataset.json"]
        for image, label in pairs:
            files += [*channel_files(image, spec.channel_files), label]
    elif spec.custom:
        pairs = custom_pairs(root, spec.kind, spec.channel_files)
        files = [f for pair in pairs for f in pair] + list(custom_fovs(root, spec.kind, pairs).values())
    else:
        raise FetchError(f"dataset {spec.name!r} has no file layout")
    if not files:
        raise FetchError(f"{root}: no {spec.title} files found; expected layout: {spec.layout}")
    return root, files


def fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 of the sorted '<sha256>  <path relative to root>' lines of `files`."""
    lines = []
    for f in files:
        lines.append(f"{file_digest(f, 'sha256')}  {f.relative_to(root).as_posix()}\n")
    lines.sort(key=lambda line: line.split("  ", 1)[1])
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks (archives of tens of GB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path, checksum: str) -> None:
    """Check `path` against "md5:<hex>" or "sha256:<hex>".

    Raises:
        FetchError: on a mismatch, with both digests.
    """
    algorithm, _, expected = checksum.partition(":")
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise FetchError(
            f"{path}: {algorithm} checksum {actual}, expected {expected}: the file is corrupt, "
            "truncated or not the official release"
        )


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where source and target share a file system (no second copy of 28 GB), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_files(spec: DatasetSpec, source: Path, dest: Path) -> dict:
    root, files = dataset_files(spec, source)
    record: dict = {"files": len(files)}
    if spec.cases is not None:
        record["cases"] = _count_cases(spec, files)
    expected = FINGERPRINTS.get(spec.name)
    if expected:
        digest = fingerprint(root, files)
        if digest != expected:
            raise FetchError(
                f"{spec.name}: the files under {source} do not match the official release (fingerprint "
                f"{digest[:12]}..., expected {expected[:12]}...): a changed, partial or re-encoded copy. "
                f"Point data.sources.{spec.name} at an unmodified copy."
            )
        record["fingerprint"] = digest
    for f in tqdm(files, desc=f"copy {spec.name}", unit="file", leave=False):
        _link_or_copy(f, dest / f.relative_to(root))
    return record


def download(
    url: str, dest: Path, checksum: str | None = None, retries: int = 3, timeout: float = 60.0
) -> None:
    """Download `url` to `dest` with a progress bar, resuming a partial `dest.part` and retrying.

    `dest` appears only complete and, when `checksum` is given, verified: a mismatching download is
    deleted (and a resumed one cannot be trusted either), so the next attempt starts from zero.

    Raises:
        FetchError: after `retries` failed attempts, with the last reason; or on a checksum mismatch.
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
                if total is not None and part.stat().st_size < total:
                    raise OSError(f"connection closed at {part.stat().st_size} of {total} bytes")
        except urllib.error.HTTPError as err:
            if (
                err.code == 416 and start
            ):  # range beyond the end: the part is complete (or bad: checked below)
                pass
            else:
                last = f"HTTP {err.code} {err.reason}"
                if attempt < retries:
                    time.sleep(2 * attempt)
                continue
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            last = str(getattr(err, "reason", err))
            if attempt < retries:
                time.sleep(2 * attempt)
            continue
        if checksum:
            try:
                verify_checksum(part, checksum)
            except FetchError:
                part.unlink(missing_ok=True)
                raise
        part.replace(dest)
        return
    kept = (
        f"; the {part.stat().st_size} bytes in {part} are kept and resumed next time" if part.exists() else ""
    )
    raise FetchError(f"{url}: {last} (after {retries} attempt(s){kept})")


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


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract a tar (any compression) into `dest`, refusing absolute paths, '..' escapes, links and devices.

    Every member is checked before anything is written, so a refused archive leaves nothing extracted.
    """
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                target = (dest / m.name).resolve()
                if Path(m.name).is_absolute() or not target.is_relative_to(dest.resolve()):
                    raise FetchError(
                        f"{archive}: member {m.name!r} escapes the target folder; refusing to extract"
                    )
                if m.issym() or m.islnk():
                    raise FetchError(f"{archive}: member {m.name!r} is a link; refusing to extract")
                if not (m.isfile() or m.isdir()):
                    raise FetchError(f"{archive}: member {m.name!r} is a device or pipe; refusing to extract")
            tf.extractall(dest, members=members, filter="data")
    except tarfile.TarError as err:
        raise FetchError(f"{archive}: not a readable tar archive ({err})") from err


def fetch_dataset(
    name: str,
    out_dir: Path,
    source: str | Path | None,
    synthetic: SyntheticParams,
    custom: dict | None = None,
) -> dict:
    """Fill `out_dir` with dataset `name`; returns the record written to out_dir/FETCHED.json.

    Args:
        name: a dataset name (medfusion.data.registry).
        out_dir: data/raw/<name>; replaced atomically.
        source: a local copy (folder or the official archive), or None to generate / download.
        synthetic: generator settings for the synthetic datasets.
        custom: params.yaml's data.custom, for the `custom` dataset.
    """
    spec = dataset_spec(name, custom)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if name == "synthetic":
            write_synthetic_images(tmp, synthetic.num_images, synthetic.seed)
            record = {"generated": True, "seed": synthetic.seed, "num_images": synthetic.num_images}
        elif name == "synthetic_volumes":
            write_synthetic_volumes(tmp, synthetic.num_volumes, synthetic.slices_per_volume, synthetic.seed)
            record = {"generated": True, "seed": synthetic.seed, "num_volumes": synthetic.num_volumes}
        elif source is not None:
            record = {"source": str(source), **_from_local(spec, Path(source), tmp)}
        else:
            record = _from_url(spec, tmp)
        write_json(tmp / "FETCHED.json", record)
    return record


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _from_local(spec: DatasetSpec, source: Path, dest: Path) -> dict:
    if not source.exists():
        raise FetchError(f"{spec.name}: local copy {source} does not exist (data.sources.{spec.name})")
    if source.is_file():
        is_zip, is_tar = zipfile.is_zipfile(source), _is_tar(source)
        if not (is_zip or is_tar):
            raise FetchError(f"{spec.name}: local copy {source} is neither a folder nor a zip or tar archive")
        record = {}
        if spec.checksum:
            verify_checksum(source, spec.checksum)  # before extracting anything
            record["checksum"] = spec.checksum
        unpacked = dest.with_name(dest.name + ".unpacked")
        shutil.rmtree(unpacked, ignore_errors=True)
        try:
            (safe_extract_zip if is_zip else safe_extract_tar)(source, unpacked)
            record.update(_copy_files(spec, unpacked, dest))
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
    else:
        record = _copy_files(spec, source, dest)
    found = record.get("cases")
    if found is not None and found != spec.cases:
        print(
            f"fetch {spec.name}: {source} holds {found} labelled cases; the official release has "
            f"{spec.cases}. Using what is there; results are not comparable to the full dataset's."
        )
    return record


def _count_cases(spec: DatasetSpec, files: list[Path]) -> int:
    """Labelled cases among a dataset's files (as listed by `dataset_files`)."""
    per_case = {"promise12": 4, "chase_db1": None}.get(spec.name, 2)
    if per_case is None:  # CHASE_DB1: image + 1stHO (+ 2ndHO)
        return sum(1 for f in files if re.fullmatch(r"Image_\d+[LR]\.jpg", f.name))
    return len(files) // per_case


def _from_url(spec: DatasetSpec, dest: Path) -> dict:
    how = (
        f"Point it at a local copy: set data.sources.{spec.name} in params.yaml "
        f"(or `dvc exp run -S data.sources.{spec.name}=PATH`), or run `medfusion fetch {spec.name} --source PATH`. "
        f"Expected layout: {spec.layout}."
    )
    if spec.url is None:
        raise FetchError(f"dataset {spec.name} ({spec.title}) cannot be downloaded: {spec.access}. {how}")
    downloads = dest.parent / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / re.sub(r"[^A-Za-z0-9._-]", "_", spec.url.rsplit("/", 1)[-1])
    expected = spec.checksum or (
        f"files fingerprint sha256:{FINGERPRINTS[spec.name]}"
        if spec.name in FINGERPRINTS
        else "none published"
    )
    errors = []
    for url in (spec.url, *spec.mirrors):
        if archive.exists():
            break
        try:
            download(url, archive, spec.checksum)
        except FetchError as err:
            errors.append(str(err) if url in str(err) else f"{url}: {err}")
    else:
        if not archive.exists():
            raise FetchError(
                f"dataset {spec.name}: could not download ({'; '.join(errors)}). Expected checksum: {expected}. {how}"
            )
    try:
        return {"source": spec.url, **_from_local(spec, archive, dest)}
    except FetchError as err:
        archive.unlink(missing_ok=True)  # a bad archive must not be reused
        raise FetchError(
            f"dataset {spec.name}: downloaded archive from {spec.url} is not usable: {err}"
        ) from err
