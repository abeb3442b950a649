"""Data layer (SPEC §3): datasets, the Lightning data module and the target-age sampler."""

from agingnet.data.datamodule import AgingDataModule, ResumableRandomSampler, collate_faces
from agingnet.data.datasets import (
    IMAGE_EXTENSIONS,
    FFHQFolderDataset,
    PersonalFolderDataset,
    SyntheticFaces,
    load_rgb,
    parse_age,
)
from agingnet.data.sampler import TargetAgeSampler

__all__ = [
    "AgingDataModule",
    "FFHQFolderDataset",
    "IMAGE_EXTENSIONS",
    "PersonalFolderDataset",
    "ResumableRandomSampler",
    "SyntheticFaces",
    "TargetAgeSampler",
    "collate_faces",
    "load_rgb",
    "parse_age",
]
