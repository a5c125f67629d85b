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
            (RGB is one modality of 3 channels; T2 + ADC would be 2 of 1). CASNet encodes each
            modality separately and fuses them in its transformer.
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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetSpec] = {
    "kvasir_seg": DatasetSpec(
        name="kvasir_seg",
        title="Kvasir-SEG",
        kind="image",
        in_channels=3,
        class_names=("background", "polyp"),
        modality="rgb",
        url="https://datasets.simula.no/downloads/kvasir-seg.zip",
        checksum=None,
        access="public download; page https://datasets.simula.no/kvasir-seg/",
        test_rule="fraction",
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
        test_rule="fraction",
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
        test_rule="count:30",
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
    ),
}
