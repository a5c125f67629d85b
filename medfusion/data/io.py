"""Reading and writing images, masks and volumes: the one module that knows file formats.

2-D (`IMAGE_SUFFIXES`): PNG, JPEG, TIFF, BMP, GIF and PPM/PGM/PBM through Pillow, with EXIF orientation
applied; TIFFs that Pillow cannot read or reads wrongly go through tifffile (`_tiff_by_tifffile`:
more than one sample under a MinIsBlack/MinIsWhite photometric, more than 8 bits per sample).
Multi-frame files (multi-page TIFF, animated GIF) are refused: one file is one 2-D image. 3-D: NIfTI
through nibabel, reoriented to the closest canonical (RAS+) orientation (`read_nifti`; `from_canonical`
turns a prediction back into the file's own axes), MetaImage (.mhd + data file or .mha, compressed or
not: PROMISE12's format) through SimpleITK. Every reader raises `DataError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from medfusion.common import UserError, atomic_write


class DataError(UserError, ValueError):
    """A problem with an input file, naming the file and what was expected."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm")
_TIFF_SUFFIXES = (".tif", ".tiff")


class _Refused(Exception):
    """A readable file that is not one 2-D image (the message says why); becomes a DataError."""


DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own limit (about 9459 x 9459)
MAX_PIXELS_HOW = (
    "if the image is genuine, raise the limit: data.max_image_pixels in params.yaml, "
    "--max-image-pixels for medfusion predict and evaluate"
)


def set_max_image_pixels(limit: int | None) -> None:
    """The most pixels a 2-D file may have (None: DEFAULT_MAX_IMAGE_PIXELS). Larger files are refused
    when opened, before their pixels are decoded: Pillow's guard against decompression bombs (a small
    file that unpacks to gigabytes), made a refusal at the limit itself rather than at twice it."""
    Image.MAX_IMAGE_PIXELS = int(limit) if limit else DEFAULT_MAX_IMAGE_PIXELS


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """More than 8 bits (or floats) to uint8, scaled by the image's maximum (0 stays 0); 1-bit to 0/255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    arr = arr.astype(np.float32)
    hi = float(arr.max(initial=0.0)) or 1.0
    return np.rint(np.clip(arr, 0, None) / hi * 255).astype(np.uint8)


def _tiff_by_tifffile(path: Path):
    """The TIFF's first page when tifffile must read it instead of Pillow, else None.

    Raises `_Refused` for a multi-page TIFF."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        pages = len(tif.pages)
        if pages > 1:
            raise _Refused(f"a multi-page TIFF ({pages} pages); expected one 2-D image per file")
        page = tif.pages[0]
        samples, photometric = int(page.samplesperpixel), int(page.photometric)
        grey = photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
        if not ((samples > 1 and grey) or int(page.bitspersample) > 8):
            return None
        try:
            arr = page.asarray()
        except ValueError as err:  # a compression tifffile cannot decode without imagecodecs
            raise _Refused(
                f"tifffile cannot decode it ({err}); `pip install imagecodecs` adds the codecs"
            ) from err
        if int(page.planarconfig) == int(tifffile.PLANARCONFIG.SEPARATE) and arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)  # (samples, H, W) -> (H, W, samples)
        if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            arr = np.iinfo(arr.dtype).max - arr if arr.dtype.kind in "ui" else arr.max() - arr
        return arr


def _array_image(arr: np.ndarray) -> Image.Image:
    """A tifffile array as the Pillow image it stands for: 1 sample grey, 2 grey + alpha, 3 RGB, 4 RGBA."""
    arr = _to_uint8(arr)
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    samples = arr.shape[2]
    if samples not in (1, 2, 3, 4):
        raise _Refused(f"{samples} samples per pixel; expected 1 (grey), 3 (RGB), or either with alpha")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[samples]
    return Image.fromarray(np.ascontiguousarray(arr if samples > 1 else arr[..., 0]), mode)


def _open_2d(path: Path, what: str):
    """Open `path` as one 2-D image (EXIF orientation applied): a Pillow image, or a (H, W) array of
    16-bit values (grey TIFF/PNG with more than 8 bits, before scaling). `what` names it in errors."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # over the limit is refused (Pillow only warns below twice it)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _open_2d_file(path)
    except _Refused as err:
        raise DataError(f"{path}: {err}") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: {err} ({MAX_PIXELS_HOW})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from err


def _open_2d_file(path: Path):
    """`_open_2d` without its error handling."""
    if path.suffix.lower() in _TIFF_SUFFIXES:
        arr = _tiff_by_tifffile(path)
        if arr is not None:
            if arr.ndim == 2 and arr.dtype.kind in "ui":
                return arr  # one 16-bit channel: the caller scales an image, checks a mask's values
            return _array_image(arr)
    with Image.open(path) as img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            raise _Refused(f"{frames} frames (a multi-page or animated file); expected one 2-D image")
        img.load()
        img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(img)
    if img.mode == "F":
        return _array_image(np.asarray(img))
    return img


def read_image(path: Path, gray: bool = False) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB, or (H, W) uint8 when `gray` (Pillow's luma for colour).

    Alpha is dropped; a palette image is expanded to its colours; more than 8 bits per sample are
    scaled to 8 by the image's maximum. Formats and refusals: see the module's docstring."""
    img = _open_2d(path, "image")
    if isinstance(img, np.ndarray):
        arr = _to_uint8(img)
        return arr if gray else np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    return np.asarray(img.convert("L" if gray else "RGB"))


def _palette_values(img: Image.Image) -> tuple[np.ndarray, bool]:
    """A palette mask's values: its indices (the classes) when the palette has colours; the grey levels
    when every entry it uses is grey (R = G = B), as GIF stores any grey image. -> (values, indices?)"""
    indices = np.asarray(img).astype(np.uint8)
    entries = np.asarray(img.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    used = np.unique(indices)
    if used.size and used.max() < len(entries):
        rgb = entries[used]
        if (rgb == rgb[:, :1]).all():  # a grey image stored as a palette
            return entries[:, 0][indices], False
    return indices, True


def read_label_image(path: Path, with_palette: bool = False):
    """Read a 2-D label image as (H, W) uint8 grey values (no thresholding: see preprocess.read_label_2d).

    A palette mask gives its indices (a palette of greys only: its grey levels, see `_palette_values`);
    16-bit masks must hold values below 256; a colour mask its luma.
    `with_palette`: -> (values, whether they are palette indices)."""
    img = _open_2d(path, "mask")
    palette = False
    if isinstance(img, np.ndarray):
        if img.max(initial=0) > 255:
            raise DataError(f"{path}: 16-bit label values up to {img.max()}; expected class indices")
        values = img.astype(np.uint8)
    elif img.mode == "P":  # palette masks store the class index
        values, palette = _palette_values(img)
    else:
        values = np.asarray(img.convert("L"))
    return (values, palette) if with_palette else values


def write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def read_nifti(
    path: Path, ndim: int = 3, with_affine: bool = False, integers: bool = False, canonical: bool = True
):
    """Read a NIfTI volume as (D, H, W) float32 (slices first) and its spacing (z, y, x) in mm.

    `canonical` (the default): the voxels are first reoriented to the closest canonical orientation
    (RAS+: x to the patient's right... left, y to anterior, z to superior; nibabel's `io_orientation`,
    axis permutations and flips only, no resampling), so that scans stored in any orientation give
    the same slicing (D = superior axis) and in-plane layout; the spacing follows the axes.
    ndim=4 reads a multi-modal volume (X, Y, Z, M) as (M, D, H, W). `with_affine` also returns the
    file's own 4x4 affine as nested lists (`from_canonical` + `write_nifti` write a prediction back
    in the file's space). `integers` (label maps): a file stored as integers without scaling is
    returned in its own integer type (a uint8 label volume of 10^8 voxels stays 100 MB instead of
    400 MB as float32); others as float32.

    Raises:
        DataError: unreadable, or not `ndim`-dimensional (e.g. a 4-D volume where 3-D is expected).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        slope, inter = (
            img.header.get_slope_inter() if hasattr(img.header, "get_slope_inter") else (None, None)
        )
        unscaled = slope in (None, 1.0) and inter in (None, 0.0)
        if integers and unscaled and np.issubdtype(img.get_data_dtype(), np.integer):
            data = np.asarray(img.dataobj.get_unscaled())
        else:
            data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several unrelated types for bad files
        raise DataError(f"{path}: cannot read NIfTI ({err})") from err
    if data.ndim != ndim:
        what = "3-D volume" if ndim == 3 else f"{ndim}-D volume (x, y, z, modality)"
        raise DataError(f"{path}: expected a {what}, got shape {data.shape}")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if canonical:
        ornt = nib.orientations.io_orientation(img.affine)
        if not np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
            data = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
            moved = [0.0, 0.0, 0.0]
            for axis, (target, _flip) in enumerate(ornt):
                moved[int(target)] = zooms[axis]
            zooms = moved
    sx, sy, sz = zooms
    if ndim == 4:
        volume = np.transpose(data, (3, 2, 1, 0))  # (X, Y, Z, M) -> (M, Z, Y, X)
    else:
        volume = np.transpose(data, (2, 1, 0))  # (X, Y, Z) -> (Z, Y, X)
    if with_affine:
        return volume, (sz, sy, sx), np.asarray(img.affine, dtype=float).tolist()
    return volume, (sz, sy, sx)


def from_canonical(volume: np.ndarray, affine: list) -> np.ndarray:
    """A (D, H, W) array in the canonical axes `read_nifti` gives, back in the axes of the file whose
    `affine` it came from (for `write_nifti` with that affine): the inverse of its reorientation."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    xyz = nib.orientations.apply_orientation(np.transpose(volume, (2, 1, 0)), back)
    return np.ascontiguousarray(np.transpose(xyz, (2, 1, 0)))


def nifti_affine(path: Path) -> np.ndarray:
    """The 4x4 affine of a NIfTI file (its header only)."""
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).affine, dtype=float)
    except Exception as err:
        raise DataError(f"{path}: cannot read NIfTI ({err})") from err


def write_nifti(
    path: Path, volume: np.ndarray, spacing: tuple[float, float, float], affine: list | None = None
) -> None:
    """Write (D, H, W) `volume` (or (M, D, H, W) modalities) with spacing (z, y, x) as NIfTI.

    `affine` (4x4), when given, is written as is (a prediction in its image's space)."""
    import nibabel as nib

    affine = np.asarray(affine) if affine is not None else np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    axes = (2, 1, 0) if volume.ndim == 3 else (3, 2, 1, 0)
    nib.save(nib.Nifti1Image(np.transpose(volume, axes), affine), str(path))


METAIMAGE_SUFFIXES = (".mhd", ".mha")


def is_metaimage(path: Path) -> bool:
    return Path(path).suffix.lower() in METAIMAGE_SUFFIXES


def _metaimage_header_check(path: Path) -> None:
    """A detached, uncompressed .mhd header checked against its data file before SimpleITK reads it
    (SimpleITK's own message for a short data file names neither file nor sizes)."""
    try:
        header = dict(
            (k.strip(), v.strip())
            for k, v in (
                line.split("=", 1) for line in path.read_text(errors="replace").splitlines() if "=" in line
            )
        )
    except OSError as err:
        raise DataError(f"{path}: cannot read MetaImage header ({err})") from err
    data_file = header.get("ElementDataFile", "")
    if header.get("CompressedData", "False").lower() == "true" or data_file in ("", "LOCAL", "LIST"):
        return
    sizes = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
             "MET_FLOAT": 4, "MET_DOUBLE": 8}  # fmt: skip
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        count = int(np.prod(dims)) * int(header.get("ElementNumberOfChannels", "1"))
        expected = count * sizes[header["ElementType"]]
    except (KeyError, ValueError):
        return  # SimpleITK says what is wrong with the header
    raw = path.parent / data_file
    if raw.is_file() and raw.stat().st_size != expected:
        raise DataError(
            f"{raw}: {raw.stat().st_size} bytes; header {path.name} says {expected} "
            f"(DimSize {dims}, {header['ElementType']})"
        )


def read_metaimage(path: Path, integers: bool = False) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a MetaImage (.mhd + data file, or one .mha; compressed or not) with SimpleITK as (D, H, W)
    and spacing (z, y, x) in mm: float32, or with `integers` (label maps) the stored integer type.

    Raises:
        DataError: unreadable, a data file of the wrong size, or not a 3-D scalar volume.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.suffix.lower() == ".mhd":
        _metaimage_header_check(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if "ERROR" in line or "rror" in line]
        raise DataError(f"{path}: cannot read MetaImage ({lines[-1] if lines else err})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: a {image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()} "
            "component(s) per voxel; expected a 3-D scalar volume"
        )
    volume = sitk.GetArrayFromImage(image)  # (z, y, x)
    if not (integers and volume.dtype.kind in "ui"):
        volume = volume.astype(np.float32, copy=False)
    sx, sy, sz = image.GetSpacing()
    return volume, (sz, sy, sx)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and a rename: never half-written."""
    atomic_write(path, text)


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Fill a sibling temp folder, then swap it in for `out_dir`: a crash or a full disk leaves the
    previous `out_dir` as it was (or none), never a half-written one.

    Yields the temp folder to write into. A full disk raises OSError(ENOSPC) naming `out_dir`.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                err.errno,
                f"no space left writing {out_dir} ({err}); nothing was replaced, free space and rerun",
            ) from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def writable_dir(path: Path, option: str) -> Path:
    """Check, before any work, that files can be written in the output folder `path`: create it (with
    its parents), write and remove a file in it, and remove again the folders it had to create, so
    that an output that cannot be written is said at once, not after every prediction, and a check
    leaves nothing behind.

    Raises:
        DataError: naming the command's `option`, the folder and the system's reason."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise DataError(
            f"{option} {path}: cannot write there ({err.strerror or err}); choose a folder you can write to"
        ) from None
    finally:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
    return path


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from err


def read_history(path: Path) -> list[dict]:
    """The per-epoch rows of a run's history.json (`{"precision": ..., "epochs": [...]}`)."""
    history = read_json(path)
    return history["epochs"] if isinstance(history, dict) else history


def file_sha256(path: str | Path) -> str:
    """The file's sha256, read in 1 MiB blocks (memory: one block)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
