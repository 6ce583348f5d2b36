"""CT normalization measured as nnU-Net measures it: on the foreground of the training cases given, and only those."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtuning_peft.data import CaseFiles, ct_preprocessing_from_cases, load_case

SHAPE = (20, 30, 40)


def _ct_case(folder: Path, name: str, foreground_hu: np.ndarray, *, labelled: bool = True) -> CaseFiles:
    """Air (-1000 HU) with a bone slab (3000 HU) outside the label and ``foreground_hu`` under label 1."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full(SHAPE, -1000.0, np.float32)
    image[:, :, :5] = 3000.0
    label = np.zeros(SHAPE, np.uint8)
    where = np.unravel_index(
        np.arange(foreground_hu.size) + SHAPE[1] * SHAPE[2], SHAPE
    )  # after the first slice
    image[where], label[where] = foreground_hu, 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{name}_ct.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"{name}_seg.nii.gz")
    return CaseFiles(
        case_id=name,
        images=(folder / f"{name}_ct.nii.gz",),
        label=(folder / f"{name}_seg.nii.gz") if labelled else None,
        channel_names=("CT",),
        label_values=(0, 1),
        modality="CT",
    )


def test_ct_window_and_zscore_come_from_the_foreground_of_the_training_cases_only(tmp_path):
    # A small and a large foreground weigh the same, as in nnU-Net's fingerprint: pooled HU uniform on 0..1999.
    small = _ct_case(tmp_path, "train_a", np.arange(0, 1000, 4, dtype=np.float32))
    large = _ct_case(tmp_path, "train_b", np.tile(np.arange(1000, 2000, dtype=np.float32), 5))
    validation = _ct_case(tmp_path, "val_c", np.full(3000, 400.0, np.float32))
    fitted = ct_preprocessing_from_cases([small, large])
    np.testing.assert_allclose(fitted.window, (10.0, 1990.0), atol=12.0)  # not the air or the bone outside
    np.testing.assert_allclose((fitted.mean, fitted.std), (1000.0, 577.0), atol=12.0)
    assert ct_preprocessing_from_cases([small, large]) == fitted  # the same draw every time
    assert ct_preprocessing_from_cases([small, large, validation]) != fitted  # what is passed is what counts
    only_small = ct_preprocessing_from_cases([small])
    np.testing.assert_allclose(only_small.window, (4.0, 994.0), atol=12.0)
    image = load_case(small, only_small).image[0]
    assert image.min() == pytest.approx((only_small.window[0] - only_small.mean) / only_small.std, abs=1e-4)


def test_ct_statistics_refuse_cases_they_cannot_measure(tmp_path):
    unlabelled = _ct_case(tmp_path, "test_007", np.arange(100, dtype=np.float32), labelled=False)
    with pytest.raises(ValueError, match=r"case 'test_007' has no label.*pass only those"):
        ct_preprocessing_from_cases([unlabelled])
    with pytest.raises(ValueError, match=r"training_cases is empty"):
        ct_preprocessing_from_cases([])
    empty = _ct_case(tmp_path, "train_empty", np.zeros(0, np.float32))
    with pytest.raises(ValueError, match=r"none of the 1 training cases has a voxel with a label above 0"):
        ct_preprocessing_from_cases([empty])
