"""BraTS 2019/2020 reader: layouts, naming irregularities, modality order, brain-mask z-score, errors."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtuning_peft.data import (
    BRATS_MODALITIES,
    CaseFileMissingError,
    CaseLoadError,
    VolumeDataset,
    brats_case_files,
    list_brats_cases,
    load_brats_case,
)

SHAPE = (12, 10, 8)  # (x, y, z), LPS like the BraTS releases
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def _brain() -> np.ndarray:
    grid = np.indices(SHAPE)
    return ((grid[0] - 6) / 5) ** 2 + ((grid[1] - 5) / 4) ** 2 + ((grid[2] - 4) / 3.5) ** 2 <= 1


def _write_case(case_dir: Path, suffix=".nii.gz", seg_name=None, skip=(), label=None, shapes=None):
    case_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(case_dir.name.encode()))
    brain = _brain()
    for index, modality in enumerate(BRATS_MODALITIES):
        if modality in skip:
            continue
        shape = (shapes or {}).get(modality, SHAPE)
        data = np.zeros(shape, np.float32)
        mask = brain[: shape[0], : shape[1], : shape[2]]
        data[mask] = rng.normal(100 * (index + 1), 10 + index, mask.sum())
        nib.save(nib.Nifti1Image(data, AFFINE), case_dir / f"{case_dir.name}_{modality}{suffix}")
    if "seg" not in skip:
        if label is None:
            label = np.zeros(SHAPE, np.uint8)
            label[5:8, 4:6, 3:5] = (1, 2, 4)[len(case_dir.name) % 3]
            label[6, 5, 4] = 4
        nib.save(nib.Nifti1Image(label, AFFINE), case_dir / (seg_name or f"{case_dir.name}_seg{suffix}"))
    return case_dir


def test_2019_layout_lists_hgg_and_lgg_cases(tmp_path):
    root = tmp_path / "MICCAI_BraTS_2019_Data_Training"
    _write_case(root / "HGG" / "BraTS19_2013_10_1")
    _write_case(root / "LGG" / "BraTS19_2013_0_1")
    (root / "name_mapping.csv").write_text("x\n")
    cases = list_brats_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS19_2013_0_1", "BraTS19_2013_10_1"]
    assert all(c.has_label and c.label_values == (0, 1, 2, 4) for c in cases)


def test_2020_layout_with_nii_files_the_355_segmentation_and_unlabelled_cases(tmp_path):
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    _write_case(root / "BraTS20_Training_001", suffix=".nii")
    _write_case(root / "BraTS20_Training_355", suffix=".nii", seg_name="W39_1998.09.19_Segm.nii")
    _write_case(root / "BraTS20_Training_370", suffix=".nii", skip=("seg",))
    cases = {c.case_id: c for c in list_brats_cases(root)}
    assert cases["BraTS20_Training_355"].label.name == "W39_1998.09.19_Segm.nii"
    assert cases["BraTS20_Training_370"].label is None
    assert load_brats_case(cases["BraTS20_Training_355"]).label.max() == 4
    with pytest.raises(CaseFileMissingError, match=r"BraTS20_Training_370.*seg"):
        list_brats_cases(root, require_label=True)


def test_modalities_stack_in_fixed_order_with_brain_mask_zscore(tmp_path):
    case = load_brats_case(_write_case(tmp_path / "BraTS20_Training_002"))
    assert case.image.shape == (4, SHAPE[2], SHAPE[1], SHAPE[0]) and case.channel_names == BRATS_MODALITIES
    brain = case.geometry.to_canonical(_brain().astype(np.uint8)).astype(bool)
    for c in range(4):
        np.testing.assert_allclose(case.image[c][brain].mean(), 0.0, atol=1e-4)
        np.testing.assert_allclose(case.image[c][brain].std(), 1.0, atol=1e-3)
        assert np.all(case.image[c][~brain] == 0.0)
    files = brats_case_files(tmp_path / "BraTS20_Training_002")
    assert [p.name.split("_")[-1] for p in files.images] == [f"{m}.nii.gz" for m in BRATS_MODALITIES]
    raw_means = [np.asarray(nib.load(p).dataobj)[_brain()].mean() for p in files.images]
    assert np.all(np.diff(raw_means) > 50)  # flair ~100, t1 ~200, t1ce ~300, t2 ~400 as written


def test_labels_become_class_indices_in_datasets(tmp_path):
    case = load_brats_case(_write_case(tmp_path / "BraTS20_Training_003"))
    assert set(np.unique(case.label)) <= {0, 1, 2, 4} and 4 in case.label
    item = VolumeDataset([case])[0]
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3} and 3 in item["label"]


def test_missing_modality_names_case_and_file(tmp_path):
    case_dir = _write_case(tmp_path / "BraTS19_TCIA01_131_1", skip=("t1ce",))
    with pytest.raises(
        CaseFileMissingError, match=r"BraTS19_TCIA01_131_1.*BraTS19_TCIA01_131_1_t1ce.*t1ce file is missing"
    ):
        load_brats_case(case_dir)


def test_modality_shape_mismatch_names_case_and_file(tmp_path):
    case_dir = _write_case(tmp_path / "BraTS20_Training_004", shapes={"t2": (12, 10, 7)})
    with pytest.raises(
        CaseLoadError, match=r"BraTS20_Training_004.*_t2\.nii\.gz.*shape \(12, 10, 7\).*_flair"
    ):
        load_brats_case(case_dir)


def test_modality_affine_mismatch_names_case_and_file(tmp_path):
    case_dir = _write_case(tmp_path / "BraTS20_Training_005")
    path = case_dir / "BraTS20_Training_005_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(path).dataobj), np.diag([1.0, -1.0, 1.0, 1.0])), path)
    with pytest.raises(CaseLoadError, match=r"BraTS20_Training_005.*_t1\.nii\.gz.*affine"):
        load_brats_case(case_dir)


def test_unexpected_label_names_case_and_file(tmp_path):
    label = np.zeros(SHAPE, np.uint8)
    label[1, 1, 1] = 3  # BraTS has no label 3
    case_dir = _write_case(tmp_path / "BraTS20_Training_006", label=label)
    with pytest.raises(
        CaseLoadError, match=r"BraTS20_Training_006.*_seg\.nii\.gz.*\[3\] outside the allowed \[0, 1, 2, 4\]"
    ):
        load_brats_case(case_dir)


def test_duplicate_modality_files_are_refused(tmp_path):
    case_dir = _write_case(tmp_path / "BraTS20_Training_007")
    _write_case(case_dir, suffix=".nii", skip=("seg",))
    with pytest.raises(CaseLoadError, match=r"BraTS20_Training_007.*2 files claim the flair role"):
        brats_case_files(case_dir)


def test_case_folders_reached_through_symbolic_links_are_listed_once(tmp_path):
    release = tmp_path / "MICCAI_BraTS2020_TrainingData"
    _write_case(release / "BraTS20_Training_001")
    _write_case(release / "BraTS20_Training_002")
    subset = tmp_path / "subset"
    subset.mkdir()
    _write_case(subset / "BraTS20_Training_003")
    for name in ("BraTS20_Training_001", "BraTS20_Training_002"):
        (subset / name).symlink_to(release / name, target_is_directory=True)
    (subset / "loop").symlink_to(subset, target_is_directory=True)  # a link back up ends the walk
    cases = list_brats_cases(subset)
    assert [c.case_id for c in cases] == [
        "BraTS20_Training_001",
        "BraTS20_Training_002",
        "BraTS20_Training_003",
    ]
    assert all(c.has_label for c in cases)
    volume = load_brats_case(cases[0])
    assert volume.image.shape[0] == len(BRATS_MODALITIES)


def test_macos_metadata_copies_of_a_release_are_not_taken_for_cases(tmp_path):
    _write_case(tmp_path / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_001")
    # A zip made on macOS holds a __MACOSX/ mirror of the release with one ._<name> file per file.
    mirror = tmp_path / "__MACOSX" / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_001"
    mirror.mkdir(parents=True)
    for role in (*BRATS_MODALITIES, "seg"):
        (mirror / f"._BraTS20_Training_001_{role}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    cases = list_brats_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS20_Training_001"]
    assert "__MACOSX" not in str(cases[0].images[0])
