"""Evaluation datasets in their standard layouts, a user's labelled folder, their label sets, and the table of
named splits."""

from emerdiff.data.datasets import (
    ADE20K150,
    VOC2012,
    Cityscapes19,
    Cityscapes27,
    CocoObject,
    CocoStuff27,
    CocoStuff171,
    DatasetNotFoundError,
    EmptySplitError,
    LabelError,
    ListedSplit,
    PascalContext59,
    PascalContext459,
    Sample,
    SegmentationDataset,
    resize_and_center_crop,
)
from emerdiff.data.folder import LabelledFolder
from emerdiff.data.labels import DatasetMetadata, load_metadata, voc_colormap
from emerdiff.data.registry import DATASETS, DatasetSpec, build_dataset, dataset_metadata, dataset_spec

__all__ = [
    "ADE20K150",
    "DATASETS",
    "VOC2012",
    "Cityscapes19",
    "Cityscapes27",
    "CocoObject",
    "CocoStuff27",
    "CocoStuff171",
    "DatasetMetadata",
    "DatasetNotFoundError",
    "DatasetSpec",
    "EmptySplitError",
    "LabelError",
    "LabelledFolder",
    "ListedSplit",
    "PascalContext59",
    "PascalContext459",
    "Sample",
    "SegmentationDataset",
    "build_dataset",
    "dataset_metadata",
    "dataset_spec",
    "load_metadata",
    "resize_and_center_crop",
    "voc_colormap",
]
