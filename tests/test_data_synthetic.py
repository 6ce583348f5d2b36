"""Synthetic KiTS-layout data: deterministic per seed, CT-like, stored like KiTS19, loads via the reader."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medtuning_peft.data import CTPreprocessing, list_kits19_cases, load_kits19_case, write_synthetic_kits19

SHAPE = (24, 48, 48)


def _arrays(case_dir):
    return [
        np.asarray(nib.load(case_dir / name).dataobj) for name in ("imaging.nii.gz", "segmentation.nii.gz")
    ]


def test_same_seed_gives_identical_files(tmp_path):
    first = write_synthetic_kits19(tmp_path / "a", num_cases=2, shape=SHAPE, seed=3)
    second = write_synthetic_kits19(tmp_path / "b", num_cases=2, shape=SHAPE, seed=3)
    for a, b in zip(first, second):
        assert (a / "imaging.nii.gz").read_bytes() == (b / "imaging.nii.gz").read_bytes()
        assert (a / "segmentation.nii.gz").read_bytes() == (b / "segmentation.nii.gz").read_bytes()


def test_different_seeds_and_cases_differ(tmp_path):
    a = write_synthetic_kits19(tmp_path / "a", num_cases=2, shape=SHAPE, seed=0)
    b = write_synthetic_kits19(tmp_path / "b", num_cases=1, shape=SHAPE, seed=1)
    assert not np.array_equal(_arrays(a[0])[1], _arrays(b[0])[1])
    assert not np.array_equal(_arrays(a[0])[1], _arrays(a[1])[1])


def test_case_depends_only_on_seed_and_index(tmp_path):
    few = write_synthetic_kits19(tmp_path / "few", num_cases=1, shape=SHAPE)
    many = write_synthetic_kits19(tmp_path / "many", num_cases=3, shape=SHAPE)
    np.testing.assert_array_equal(_arrays(few[0])[0], _arrays(many[0])[0])


def test_files_are_stored_like_kits19(tmp_path):
    case_dir = write_synthetic_kits19(tmp_path, num_cases=1, shape=SHAPE, spacing=(3.0, 2.0, 2.0))[0]
    image = nib.load(case_dir / "imaging.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("I", "P", "L") and image.shape == SHAPE
    np.testing.assert_allclose(image.header.get_zooms(), (3.0, 2.0, 2.0))
    assert image.get_data_dtype() == np.int16
    assert nib.load(case_dir / "segmentation.nii.gz").get_data_dtype() == np.uint8


def test_intensities_look_like_contrast_ct(tmp_path):
    write_synthetic_kits19(tmp_path, num_cases=2, shape=SHAPE)
    for files in list_kits19_cases(tmp_path):
        case = load_kits19_case(files, CTPreprocessing(window=None, mean=0.0, std=1.0))
        hu, label = case.image[0], case.label
        assert set(np.unique(label)) == {0, 1, 2}
        assert np.median(hu[:, 0, :]) < -900  # air in front of the body
        assert 140 < np.median(hu[label == 1]) < 210  # enhancing kidney
        assert 50 < np.median(hu[label == 2]) < 120  # hypo-enhancing tumour
        tissue = hu[(label == 0) & (hu > -300)]
        assert np.any(np.abs(tissue + 100) < 30) and np.any(np.abs(tissue - 40) < 30)  # fat, soft tissue


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("P", "I", "R")])
def test_other_storage_orientations_load_to_the_same_arrays(tmp_path, axcodes):
    reference = load_kits19_case(write_synthetic_kits19(tmp_path / "kits", num_cases=1, shape=SHAPE)[0])
    other_dir = write_synthetic_kits19(tmp_path / "other", num_cases=1, shape=SHAPE, axcodes=axcodes)[0]
    assert nib.aff2axcodes(nib.load(other_dir / "imaging.nii.gz").affine) == axcodes
    other = load_kits19_case(other_dir)
    np.testing.assert_array_equal(other.label, reference.label)
    np.testing.assert_allclose(other.image, reference.image)


def test_invalid_arguments_say_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="num_unlabelled"):
        write_synthetic_kits19(tmp_path, num_cases=2, num_unlabelled=3)
    with pytest.raises(ValueError, match="at least 16"):
        write_synthetic_kits19(tmp_path, shape=(8, 32, 32))
