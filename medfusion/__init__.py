"""medfusion: MedFusion-TransNet (CASNet + DRGO) and baselines for medical image segmentation."""

__version__ = "0.1.0"
