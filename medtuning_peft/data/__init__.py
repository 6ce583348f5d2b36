"""Readers, preprocessing, cache and datasets for 3D medical segmentation volumes.

Every reader lists cases as :class:`CaseFiles`; :func:`load_case` (or :class:`CaseCache`, which
decodes each case once) turns them into :class:`VolumeCase` records with ``image`` ``(C, D, H, W)``
float32 and ``label`` ``(D, H, W)`` uint8 in canonical orientation (D inferior->superior,
H anterior->posterior, W right->left; see ``geometry.py``). ``case.geometry.to_original`` maps a
prediction back onto the original file.
"""

from .brats import (
    BRATS_LABELS,
    BRATS_MODALITIES,
    brats_case_files,
    is_brats_case_dir,
    is_one_brats_case,
    list_brats_cases,
    load_brats_case,
)
from .cache import CACHE_VERSION, CacheEntry, CaseCache, PruneResult, load_cases
from .case import (
    CaseFileMissingError,
    CaseFiles,
    CaseLoadError,
    NoCasesError,
    VolumeCase,
    channel_key,
    channel_order,
)
from .geometry import CANONICAL_AXCODES, VolumeGeometry, canonical_transform, resample_to_shape
from .kits19 import KITS19_LABELS, kits19_case_files, list_kits19_cases, load_kits19_case
from .msd import MSDTask, list_msd_cases, load_msd_case, read_msd_task
from .nifti import load_case, read_nifti
from .preprocessing import (
    MRI_MASKS,
    CTPreprocessing,
    MRIPreprocessing,
    Preprocessing,
    ct_preprocessing_from_cases,
    default_preprocessing,
    preprocessing_from_dict,
)
from .splits import patient_id, split_cases
from .synthetic import synthetic_kits19_case, write_synthetic_kits19
from .transforms import (
    CropDataset,
    VolumeDataset,
    build_train_transforms,
    classes_to_labels,
    labels_to_classes,
)

__all__ = [
    "BRATS_LABELS",
    "BRATS_MODALITIES",
    "CACHE_VERSION",
    "CANONICAL_AXCODES",
    "CTPreprocessing",
    "CacheEntry",
    "CaseCache",
    "CaseFileMissingError",
    "CaseFiles",
    "CaseLoadError",
    "CropDataset",
    "KITS19_LABELS",
    "MRI_MASKS",
    "MRIPreprocessing",
    "MSDTask",
    "NoCasesError",
    "Preprocessing",
    "PruneResult",
    "VolumeCase",
    "VolumeDataset",
    "VolumeGeometry",
    "brats_case_files",
    "build_train_transforms",
    "canonical_transform",
    "channel_key",
    "channel_order",
    "classes_to_labels",
    "ct_preprocessing_from_cases",
    "default_preprocessing",
    "preprocessing_from_dict",
    "is_brats_case_dir",
    "is_one_brats_case",
    "kits19_case_files",
    "labels_to_classes",
    "list_brats_cases",
    "list_kits19_cases",
    "list_msd_cases",
    "load_brats_case",
    "load_case",
    "load_cases",
    "load_kits19_case",
    "load_msd_case",
    "patient_id",
    "read_msd_task",
    "read_nifti",
    "resample_to_shape",
    "split_cases",
    "synthetic_kits19_case",
    "write_synthetic_kits19",
]
