"""Normalization as nnU-Net does it: CT measured on the foreground of the training cases given, and only those;
MRI z-scored over the whole volume unless an empty background marks a masked (skull-stripped) scan."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtuning_peft.data import (
    CaseFiles,
    CTPreprocessing,
    MRIPreprocessing,
    ct_preprocessing_from_cases,
    list_msd_cases,
    load_case,
    load_msd_case,
    preprocessing_from_dict,
)
from medtuning_peft.data.preprocessing import nonzero_box_fraction

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


HIPPOCAMPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "msd_hippocampus_sample"


def test_mri_zeros_of_a_scan_without_background_are_its_darkest_tissue():
    # The MSD hippocampus crops have no empty background: their few 0-valued voxels are the darkest tissue.
    # Left out of the statistics and set to 0 (the mean) they would become bright specks; with the default
    # they keep their place as the darkest voxels, and the volume has mean 0 and standard deviation 1.
    checked = 0
    for files in list_msd_cases(HIPPOCAMPUS):
        raw = np.asarray(nib.load(files.images[0]).dataobj, dtype=np.float64)
        if not (raw == 0).any():
            continue
        case = load_msd_case(files)
        image = np.asarray(case.image[0], dtype=np.float64)
        darkest = image.min()
        assert np.count_nonzero(image == darkest) == np.count_nonzero(raw == 0)
        expected_zero = (0.0 - raw.mean()) / raw.std()
        assert darkest == pytest.approx(expected_zero, rel=1e-4) and darkest < -1.0
        assert image.mean() == pytest.approx(0.0, abs=1e-4) and image.std() == pytest.approx(1.0, rel=1e-4)
        checked += 1
    assert checked >= 5


def _brain(shape=(24, 32, 32), channels=2) -> np.ndarray:
    """A skull-stripped scan: a brain-shaped block of positive intensities in a zero background."""
    rng = np.random.default_rng(0)
    image = np.zeros((channels, *shape), np.float32)
    image[:, 4:20, 6:26, 8:24] = rng.uniform(100.0, 900.0, (channels, 16, 20, 16))
    image[1, 10, 12, 12] = 0.0  # a zero voxel of one channel inside the brain
    return image


def test_mri_auto_mask_follows_nnunets_cropping_rule():
    brain = _brain()
    assert nonzero_box_fraction(brain) == pytest.approx((16 * 20 * 16) / (24 * 32 * 32))
    masked, background = MRIPreprocessing().normalize(brain)
    np.testing.assert_array_equal(masked, MRIPreprocessing(mask="any").normalize(brain)[0])
    assert background == 0.0 and (masked[:, :4] == 0).all()
    inside = np.any(brain != 0, axis=0)
    for c in range(2):
        assert masked[c][inside].mean() == pytest.approx(0.0, abs=1e-5)
        assert masked[c][inside].std() == pytest.approx(1.0, rel=1e-5)
    assert masked[1, 10, 12, 12] < -1.0  # standardized like the brain around it, not set to the mean
    # The brain filling 3/4 of the volume or more: no empty background, every voxel counts.
    full = brain[:, 4:20, 6:26, 8:24].copy()
    full[0, 0, 0, :3] = 0.0
    assert nonzero_box_fraction(full) == 1.0
    whole = MRIPreprocessing().normalize(full)[0]
    np.testing.assert_array_equal(whole, MRIPreprocessing(mask="none").normalize(full)[0])
    assert whole[0].mean() == pytest.approx(0.0, abs=1e-5) and whole[0].std() == pytest.approx(1.0, rel=1e-5)
    assert whole[0, 0, 0, :3].max() < whole[0].min() + 1e-6  # the zeros are the darkest, as in the raw scan


def test_mri_channel_mask_and_bad_mask():
    brain = _brain()
    per_channel = MRIPreprocessing(mask="channel").normalize(brain)[0]
    assert per_channel[1, 10, 12, 12] == 0.0  # a channel's own zero is outside its mask
    assert nonzero_box_fraction(np.zeros((1, 4, 4, 4))) == 0.0
    assert (MRIPreprocessing().normalize(np.zeros((1, 4, 4, 4)))[0] == 0).all()
    with pytest.raises(ValueError, match="mask='brain'.*'auto', 'any', 'channel', 'none'"):
        MRIPreprocessing(mask="brain")


def test_preprocessing_is_rebuilt_from_its_dict_as_saved_with_a_model():
    for preprocessing in (
        CTPreprocessing(window=(-79.0, 304.0), mean=101.0, std=76.9, target_spacing=(3.0, 1.5, 1.5)),
        MRIPreprocessing(mask="none"),
    ):
        saved = json.loads(json.dumps(preprocessing.to_dict()))  # lists, as in segmenter_config.json
        assert preprocessing_from_dict(saved) == preprocessing
    with pytest.raises(ValueError, match="no 'kind'"):
        preprocessing_from_dict({"mask": "auto"})
    with pytest.raises(ValueError, match="fields this version does not take"):
        preprocessing_from_dict({"kind": "mri", "mask": "auto", "bias_field": True})
    with pytest.raises(ValueError, match="mask='brain'"):
        preprocessing_from_dict({"kind": "mri", "mask": "brain"})
