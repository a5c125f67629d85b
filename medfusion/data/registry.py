"""The datasets medfusion knows, as plain data: `DATASETS` maps a params.yaml name to its spec.

Light on purpose (no numpy, no torch): `medfusion.config` imports it to validate names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about one dataset.

    Attributes:
        name: the params.yaml name.
        title: human-readable name for reports.
        kind: "image" (each file is one 2-D test case) or "volume" (each 3-D volume is one test case;
            training and inference run slice by slice, metrics are computed on the rebuilt volume).
        in_channels: channels fed to the network.
        class_names: label index -> name; index 0 is background.
        modality: "rgb", "ct" or "mri"; selects intensity preprocessing.
        url: official download address, None where the data is registration-only.
        checksum: "md5:<hex>" or "sha256:<hex>" of the download, or "manifest:<hex>" (sha256 of the
            sorted per-file sha256 manifest of the extracted files) where no official checksum exists.
        access: how to obtain the data when it cannot be downloaded (registration pages).
        test_rule: how the held-out test set is chosen, by patient group:
            "fraction" (cv.test_fraction of the groups, seeded), "last:N" (the last N groups in sorted
            order: the paper's fixed CHASE_DB1 split) or "count:N" (N groups, seeded).
        modalities: how many imaging modalities the in_channels hold, as equal consecutive groups
            (RGB is one modality of 3 channels; T2 + ADC are 2 of 1). CASNet encodes each
            modality separately and fuses them in its transformer.
        mirrors: further download addresses, tried in order after `url`.
        layout: the expected file layout, quoted in error messages and `medfusion fetch --help`.
        cases: the number of labelled cases of the official release (None where it varies): a local
            folder with another count is used but reported.
        note: what a reader of the results must know (printed under the dataset's table).
        mask_threshold: 2-D grey masks are binarised at > this value (`custom`'s data.custom.mask_threshold);
            None: masks must hold class indices or {0, 255} (JPEG masks: see preprocess.read_label_2d).
        channel_files: image files per case (a custom nnU-Net raw dataset's <case>_0000, _0001, ...:
            one grey image or one volume per channel, stacked in that order); 1 elsewhere.
        quantitative_channels: channels of quantitative maps (msd_prostate's ADC): scaled to their
            percentiles only, without N4 or CLAHE. Every other channel of a volume is a weighted
            image (N4 for MRI, CLAHE after the window).
        regions: what is scored, as (name, labels) pairs: a region is the union of its labels in both
            the prediction and the ground truth. Empty (the default): each foreground class alone.
            LiTS is scored as the field scores it: liver = labels 1 and 2 (the whole liver, tumour
            included), tumour = label 2.
        collection: (name, case pattern) of the source collection the cases are drawn from, where it is
            known: datasets of one collection share cases, matched by the collection's case number (the
            pattern's group 1 in the case id: lits17's volume-N and msd_liver's liver_N are LiTS volume
            N). None: unknown (eval.transfer then compares the raw image files, `medfusion.transfer`).
    """

    name: str
    title: str
    kind: str
    in_channels: int
    class_names: tuple[str, ...]
    modality: str
    url: str | None
    checksum: str | None
    access: str
    test_rule: str
    modalities: int = 1
    mirrors: tuple[str, ...] = ()
    layout: str = ""
    cases: int | None = None
    note: str = ""
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    mask_threshold: int | None = None
    custom: bool = False  # the user's own data (data.custom), read by the custom layouts
    channel_files: int = 1
    quantitative_channels: tuple[int, ...] = ()
    collection: tuple[str, str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def scored_regions(self) -> dict[str, list[int]]:
        """Region name -> the labels it is the union of (see `regions`)."""
        return scored_regions(self.class_names, self.regions)


def scored_regions(
    class_names: tuple[str, ...] | list[str], regions: tuple | dict | None = None
) -> dict[str, list[int]]:
    """Region name -> labels: `regions` as given, or each foreground class alone when empty."""
    if regions:
        return {name: sorted(labels) for name, labels in dict(regions).items()}
    return {name: [c] for c, name in enumerate(class_names) if c > 0}


LITS_REGIONS = (("liver", (1, 2)), ("tumour", (2,)))


DATASETS: dict[str, DatasetSpec] = {
    "kvasir_seg": DatasetSpec(
        name="kvasir_seg",
        title="Kvasir-SEG",
        kind="image",
        in_channels=3,
        class_names=("background", "polyp"),
        modality="rgb",
        url="https://datasets.simula.no/downloads/kvasir-seg.zip",
        checksum=None,  # no official checksum: the extracted files are checked against FINGERPRINTS
        access="public download; page https://datasets.simula.no/kvasir-seg/",
        test_rule="fraction",  # cv.test_fraction = 0.2: the paper's 80/20
        layout="Kvasir-SEG/images/*.jpg + Kvasir-SEG/masks/*.jpg with the same names (the official zip)",
        cases=1000,
    ),
    "chase_db1": DatasetSpec(
        name="chase_db1",
        title="CHASE_DB1",
        kind="image",
        in_channels=3,
        class_names=("background", "vessel"),
        modality="rgb",
        url="https://researchdata.kingston.ac.uk/96/1/CHASEDB1.zip",
        checksum=None,
        access="public download; page https://researchdata.kingston.ac.uk/96/",
        test_rule="last:4",  # children 11-14 = the last 8 images (paper: first 20 train, last 8 test)
        mirrors=("https://staffnet.kingston.ac.uk/~ku15565/CHASE_DB1/assets/CHASEDB1.zip",),
        layout="Image_NN[LR].jpg + Image_NN[LR]_1stHO.png (+ _2ndHO.png, the second observer), in one folder",
        cases=28,
    ),
    "promise12": DatasetSpec(
        name="promise12",
        title="PROMISE12",
        kind="volume",
        in_channels=1,
        class_names=("background", "prostate"),
        modality="mri",
        url=None,
        checksum=None,
        access="registration-only at https://promise12.grand-challenge.org (the 50 labelled training cases)",
        test_rule="fraction",  # 10 of the 50 labelled cases, seeded: the challenge's test labels are hidden
        layout="CaseNN.mhd/.raw + CaseNN_segmentation.mhd/.raw (any folder depth)",
        cases=50,
    ),
    "lits17": DatasetSpec(
        name="lits17",
        title="LiTS17",
        kind="volume",
        in_channels=1,
        class_names=("background", "liver", "tumour"),
        modality="ct",
        url=None,
        checksum=None,
        access="registration-only at https://competitions.codalab.org/competitions/17094 (LiTS challenge)",
        test_rule="count:30",  # 30 test volumes, seeded; the other 101 of the 131 train (the paper: 100/30)
        layout="volume-N.nii[.gz] + segmentation-N.nii[.gz] (any folder depth)",
        cases=131,
        note="30 test volumes of the 131 labelled ones, seeded; the other 101 train (the paper says 100/30).",
        regions=LITS_REGIONS,
        collection=("LiTS", r"volume-(\d+)"),
    ),
    "msd_prostate": DatasetSpec(
        name="msd_prostate",
        title="MSD Task05 Prostate (T2 + ADC; a different cohort from PROMISE12)",
        kind="volume",
        in_channels=2,
        class_names=("background", "prostate"),  # whole gland = peripheral (1) + transition (2) zone
        modality="mri",
        url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task05_Prostate.tar",
        checksum="md5:35138f08b1efaef89d7424d2bcc928db",
        access="public download (Medical Segmentation Decathlon, CC BY-SA 4.0); page http://medicaldecathlon.com/",
        test_rule="fraction",
        modalities=2,
        quantitative_channels=(1,),  # ADC
        layout="Task05_Prostate/imagesTr/prostate_NN.nii.gz (4-D: T2, ADC) + labelsTr/prostate_NN.nii.gz",
        cases=32,
        note=(
            "A public alternative to PROMISE12, not PROMISE12: another cohort (32 cases, T2 + ADC, whole "
            "gland = PZ + TZ). Its numbers are not comparable with the paper's PROMISE12 figures."
        ),
    ),
    "msd_liver": DatasetSpec(
        name="msd_liver",
        title="MSD Task03 Liver (the LiTS training volumes)",
        kind="volume",
        in_channels=1,
        class_names=("background", "liver", "tumour"),
        modality="ct",
        url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task03_Liver.tar",
        checksum="md5:a90ec6c4aa7f6a3d087205e23d4e6397",
        access="public download (Medical Segmentation Decathlon, CC BY-SA 4.0, about 28 GB); page http://medicaldecathlon.com/",
        test_rule="count:30",
        layout="Task03_Liver/imagesTr/liver_N.nii.gz + labelsTr/liver_N.nii.gz",
        cases=131,
        note=(
            "The LiTS training volumes as redistributed by the Decathlon; the split (30 test volumes, "
            "seeded) is ours, the paper's is not published."
        ),
        regions=LITS_REGIONS,
        collection=("LiTS", r"liver_(\d+)"),  # liver_N is LiTS volume-N
    ),
    "synthetic": DatasetSpec(
        name="synthetic",
        title="synthetic (generated polyp-like 2-D images)",
        kind="image",
        in_channels=3,
        class_names=("background", "blob"),
        modality="rgb",
        url=None,
        checksum=None,
        access="generated from data.synthetic",
        test_rule="fraction",
    ),
    "synthetic_volumes": DatasetSpec(
        name="synthetic_volumes",
        title="synthetic volumes (generated CT-like NIfTI)",
        kind="volume",
        in_channels=1,
        class_names=("background", "organ", "lesion"),
        modality="ct",
        url=None,
        checksum=None,
        access="generated from data.synthetic",
        test_rule="fraction",
        regions=(("organ", (1, 2)), ("lesion", (2,))),  # scored as LiTS: its lesions lie in the organ
    ),
}

CUSTOM_LAYOUT = (
    "images/ + masks/ (or labels/) with matching file stems: 2-D PNG/JPEG/TIFF/BMP/GIF/PPM/PGM images and masks "
    "(data.custom.kind: image), or NIfTI image/label volumes (kind: volume); or nnU-Net's raw layout "
    "(dataset.json + imagesTr/<case>_0000<ending>[, <case>_0001<ending>, ... with data.custom.channels] + "
    "labelsTr/<case><ending>)"
)

# What each intensity family means for a custom dataset: channels and the `modality` preprocessing key.
CUSTOM_MODALITIES = {"rgb": ("rgb", 3), "gray": ("gray", 1), "ct": ("ct", 1), "mri": ("mri", 1)}


def custom_spec(custom: dict, name: str = "custom") -> DatasetSpec:
    """The spec of the user's own dataset from params.yaml's `data.custom` (validated by medfusion.config).

    Keys: kind (image | volume), modality (rgb | gray for 2-D; ct | mri for volumes; gray also for
    2-D slices of CT or MRI already windowed), class_names (index 0 is background), title,
    mask_threshold (optional: grey 2-D masks binarised at > it), channels (optional, 1: image files
    per case in nnU-Net's raw layout; M files give M channels, each its own modality for CASNet, each
    preprocessed as `modality` says: CT windowed, MRI N4-corrected, grey images CLAHE'd).
    """
    modality, channels = CUSTOM_MODALITIES[custom["modality"]]
    files = int(custom.get("channels", 1))
    return DatasetSpec(
        name=name,
        title=custom.get("title") or name,
        kind=custom["kind"],
        in_channels=channels * files,
        class_names=tuple(custom["class_names"]),
        modality=modality,
        url=None,
        checksum=None,
        access=f"your own data: set data.sources.{name} to its folder",
        test_rule="fraction",
        layout=CUSTOM_LAYOUT,
        mask_threshold=custom.get("mask_threshold"),
        custom=True,
        modalities=files,
        channel_files=files,
    )


def dataset_spec(name: str, custom: dict | None = None) -> DatasetSpec:
    """The spec of dataset `name`; `custom` (params.yaml's description of the user's dataset `name`:
    data.custom, or data.custom.<name>) defines `custom` and every name the registry does not know."""
    if name == "custom" or (custom is not None and name not in DATASETS):
        if custom is None:
            raise KeyError("dataset 'custom' needs params.yaml's data.custom section")
        return custom_spec(custom, name)
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_NAMES)}") from None


DATASET_NAMES = (*DATASETS, "custom")
