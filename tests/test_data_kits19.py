"""KiTS19 reader: real CT orientation, prediction-only cases, and errors that name the case and file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from paths import KITS_CT_SAMPLE
from scipy import ndimage

from medtuning_peft.cli import main
from medtuning_peft.data import (
    CaseFileMissingError,
    CaseLoadError,
    CTPreprocessing,
    kits19_case_files,
    list_kits19_cases,
    load_kits19_case,
    write_synthetic_kits19,
)

REAL_CASE = KITS_CT_SAMPLE / "case_00000"
RAW_HU = CTPreprocessing(window=None, mean=0.0, std=1.0)
KITS_AFFINE = np.array([[0, 0, -2.0, 100], [0, -2.0, 0, 120], [-3.0, 0, 0, 50], [0, 0, 0, 1]])

needs_real_ct = pytest.mark.skipif(not REAL_CASE.is_dir(), reason="real KiTS-layout CT sample not present")


def _write_case(root: Path, name="case_00000", image=None, label=None, affine=KITS_AFFINE, label_affine=None):
    case_dir = root / name
    case_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (8, 16, 16)).astype(np.float32) if image is None else image
    nib.save(nib.Nifti1Image(image, affine), case_dir / "imaging.nii.gz")
    if label is not False:
        label = (rng.random(image.shape[:3]) > 0.8).astype(np.uint8) if label is None else label
        nib.save(
            nib.Nifti1Image(label, affine if label_affine is None else label_affine),
            case_dir / "segmentation.nii.gz",
        )
    return case_dir


@needs_real_ct
def test_real_ct_kidney_mask_lands_on_kidney_tissue():
    case = load_kits19_case(REAL_CASE, RAW_HU)
    hu, kidney = case.image[0], case.label > 0
    assert case.image.shape == (1, 30, 101, 122) and case.label.shape == case.shape
    body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -500])  # per axial slice
    # Kidney parenchyma is soft tissue; the same mask misplaced by a flip would cover fat, gas or bone.
    soft = (hu[kidney] > -60) & (hu[kidney] < 120)
    assert soft.mean() > 0.97
    for axis in range(3):
        assert ((np.flip(kidney, axis) & (hu > -60) & (hu < 120)).sum() / kidney.sum()) < soft.mean() - 0.1
    assert hu[kidney].mean() > hu[body].mean() + 20
    # Anatomy in canonical orientation: the spine and kidneys are posterior (high H) of the body
    # centre, one kidney on each side of the spine (W).
    bone = (hu > 250) & body
    body_h = np.argwhere(body)[:, 1].mean()
    assert np.argwhere(bone)[:, 1].mean() > body_h + 5
    assert np.argwhere(kidney)[:, 1].mean() > body_h + 5
    spine_w = np.argwhere(bone)[:, 2].mean()
    kidney_w = np.argwhere(kidney)[:, 2]
    assert (kidney_w < spine_w - 10).sum() > 1000 and (kidney_w > spine_w + 10).sum() > 1000


@needs_real_ct
def test_real_ct_image_and_label_share_the_canonical_grid():
    case = load_kits19_case(REAL_CASE)
    image_file = nib.load(REAL_CASE / "imaging.nii.gz")
    assert nib.aff2axcodes(image_file.affine) == ("I", "P", "L")
    assert nib.aff2axcodes(case.geometry.affine) == ("S", "P", "L")
    raw = np.asarray(nib.load(REAL_CASE / "segmentation.nii.gz").dataobj)
    np.testing.assert_array_equal(case.geometry.to_original(case.label), raw)
    np.testing.assert_array_equal(case.label, raw[::-1])  # I, P, L -> S, P, L flips only the slice axis
    # Default preprocessing: KiTS19 window [-79, 304] HU, z-score with 101 / 76.9.
    assert case.image.min() == pytest.approx((-79 - 101) / 76.9, abs=1e-5)
    assert case.image.max() <= (304 - 101) / 76.9 + 1e-5
    assert case.background_value == pytest.approx((-79 - 101) / 76.9)


def test_synthetic_dataset_lists_and_loads_with_left_kidney_higher(tmp_path):
    write_synthetic_kits19(tmp_path, num_cases=3, shape=(32, 64, 64), num_unlabelled=1)
    cases = list_kits19_cases(tmp_path)
    assert [c.case_id for c in cases] == ["case_00000", "case_00001", "case_00002"]
    assert [c.has_label for c in cases] == [True, True, False]
    case = load_kits19_case(cases[0])
    components, count = ndimage.label(case.label > 0)
    assert count == 2
    centres = [np.argwhere(components == i).mean(0) for i in (1, 2)]
    right, left = sorted(centres, key=lambda c: c[2])  # W grows toward the patient's left
    assert left[0] > right[0] + 2  # the left kidney is higher (larger D = superior)
    unlabelled = load_kits19_case(cases[2])
    assert unlabelled.label is None and unlabelled.image.shape == (1, 32, 64, 64)


def test_missing_segmentation_is_prediction_only_unless_required(tmp_path):
    case_dir = _write_case(tmp_path, label=False)
    assert kits19_case_files(case_dir).label is None
    with pytest.raises(CaseFileMissingError, match=r"case_00000.*segmentation\.nii\.gz"):
        list_kits19_cases(tmp_path, require_label=True)


def test_missing_imaging_names_case_and_file(tmp_path):
    (tmp_path / "case_00007").mkdir()
    with pytest.raises(FileNotFoundError, match=r"case 'case_00007', file '.*imaging\.nii\.gz'.*missing"):
        load_kits19_case(tmp_path / "case_00007")


def test_empty_data_dir_says_what_to_pass(tmp_path):
    with pytest.raises(CaseLoadError, match="case_XXXXX"):
        list_kits19_cases(tmp_path)


def test_truncated_gzip_names_case_and_file(tmp_path):
    case_dir = _write_case(tmp_path, image=np.zeros((40, 64, 64), np.float32))
    path = case_dir / "imaging.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaseLoadError, match=r"case_00000.*imaging\.nii\.gz.*not a readable NIfTI"):
        load_kits19_case(case_dir)


def test_not_a_nifti_names_case_and_file(tmp_path):
    case_dir = _write_case(tmp_path)
    with gzip.open(case_dir / "segmentation.nii.gz", "wb") as handle:
        handle.write(b"this is not a NIfTI header" * 20)
    with pytest.raises(CaseLoadError, match=r"case_00000.*segmentation\.nii\.gz.*not a readable NIfTI"):
        load_kits19_case(case_dir)


def test_2d_image_is_rejected(tmp_path):
    case_dir = _write_case(tmp_path, image=np.zeros((16, 16), np.float32), label=False)
    with pytest.raises(CaseLoadError, match=r"case_00000.*imaging\.nii\.gz.*shape \(16, 16\).*3D"):
        load_kits19_case(case_dir)


def test_multi_channel_label_is_rejected(tmp_path):
    case_dir = _write_case(tmp_path, label=np.zeros((8, 16, 16, 2), np.uint8))
    with pytest.raises(CaseLoadError, match=r"segmentation\.nii\.gz.*shape \(8, 16, 16, 2\).*3D"):
        load_kits19_case(case_dir)


def test_shape_mismatch_names_both_files(tmp_path):
    case_dir = _write_case(tmp_path, label=np.zeros((8, 16, 15), np.uint8))
    with pytest.raises(CaseLoadError, match=r"segmentation\.nii\.gz.*shape \(8, 16, 15\).*imaging\.nii\.gz"):
        load_kits19_case(case_dir)


def test_affine_mismatch_names_both_files(tmp_path):
    flipped = KITS_AFFINE.copy()
    flipped[2, 0] = 3.0  # label slices run the other way
    case_dir = _write_case(tmp_path, label_affine=flipped)
    with pytest.raises(CaseLoadError, match=r"case_00000.*segmentation\.nii\.gz.*affine"):
        load_kits19_case(case_dir)


def test_unexpected_label_values_are_listed(tmp_path):
    label = np.zeros((8, 16, 16), np.uint8)
    label[0, 0, :2] = (3, 7)
    case_dir = _write_case(tmp_path, label=label)
    with pytest.raises(
        CaseLoadError, match=r"segmentation\.nii\.gz.*values \[3, 7\] outside the allowed \[0, 1, 2\]"
    ):
        load_kits19_case(case_dir)


def test_non_integer_label_values_are_listed_with_the_scaling_that_made_them(tmp_path):
    label = np.zeros((8, 16, 16), np.float32)
    label[0, 0, :2] = (0.5, 1.75)  # e.g. a label map resampled with linear interpolation
    case_dir = _write_case(tmp_path, label=label)
    with pytest.raises(
        CaseLoadError,
        match=r"segmentation\.nii\.gz': label has non-integer or NaN/Inf values \[0\.5, 1\.75\]; expected the "
        r"integers \[0, 1, 2\]\. Fix",
    ):
        load_kits19_case(case_dir)
    # A label map saved with a float dtype into uint8 storage: nibabel picks a scale factor (here 0.5).
    halves = np.zeros((8, 16, 16), np.float32)
    halves[0, 0, :2] = (0.5, 127.5)
    stored = nib.Nifti1Image(halves, KITS_AFFINE)
    stored.set_data_dtype(np.uint8)
    nib.save(stored, case_dir / "segmentation.nii.gz")
    with pytest.raises(CaseLoadError, match=r"values \[0\.5, 127\.5\]; .*scl_slope=0\.5, scl_inter=0\)"):
        load_kits19_case(case_dir)


def test_non_finite_intensities_are_rejected(tmp_path):
    image = np.zeros((8, 16, 16), np.float32)
    image[1, 2, 3] = np.nan
    image[2, 2, 3] = np.inf
    case_dir = _write_case(tmp_path, image=image)
    with pytest.raises(CaseLoadError, match=r"case_00000.*imaging\.nii\.gz.*2 NaN/Inf"):
        load_kits19_case(case_dir)


def test_folder_not_named_like_a_case_is_skipped_with_a_warning(tmp_path):
    _write_case(tmp_path, "case_00000")
    _write_case(tmp_path, "case_00000_old")
    _write_case(tmp_path, "backup")  # holds imaging.nii.gz
    (tmp_path / "notes").mkdir()  # unrelated folders and hidden ones are not cases
    (tmp_path / ".cache").mkdir()
    with pytest.warns(
        UserWarning, match=r"skipping 2 folder\(s\) not named case_XXXXX.*'backup', 'case_00000_old'"
    ):
        cases = list_kits19_cases(tmp_path)
    assert [c.case_id for c in cases] == ["case_00000"]


def test_only_misnamed_case_folders_are_named_in_the_error(tmp_path):
    _write_case(tmp_path, "case_0001")
    with pytest.raises(CaseLoadError, match=r"no case_XXXXX folder \(skipped .*\['case_0001'\]\)"):
        list_kits19_cases(tmp_path)


def test_verify_data_reports_a_misnamed_case_folder(tmp_path, capsys):
    _write_case(tmp_path, "case_00000")
    _write_case(tmp_path, "case_00000_old")
    assert main(["verify-data", "--task", "kits19", "--data-dir", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "case_00000_old" in err and "not named case_XXXXX" in err


@pytest.mark.parametrize("stem", ["imaging", "segmentation"])
def test_both_nii_and_nii_gz_of_one_file_are_refused(tmp_path, stem):
    case_dir = _write_case(tmp_path)
    (case_dir / f"{stem}.nii").write_bytes(gzip.decompress((case_dir / f"{stem}.nii.gz").read_bytes()))
    with pytest.raises(CaseLoadError, match=rf"case_00000.*2 files claim the {stem} role.*{stem}\.nii'\]"):
        list_kits19_cases(tmp_path)


def test_zero_size_volume_reports_its_header_shape(tmp_path, capsys):
    case_dir = _write_case(tmp_path, image=np.zeros((36, 52, 0), np.float32), label=False)
    with pytest.raises(
        CaseLoadError, match=r"case_00000.*imaging\.nii\.gz.*shape \(36, 52, 0\) with no voxels"
    ):
        load_kits19_case(case_dir)
    assert main(["verify-data", "--task", "kits19", "--data-dir", str(tmp_path), "--no-progress"]) == 1
    assert "shape (36, 52, 0) with no voxels" in capsys.readouterr().err
