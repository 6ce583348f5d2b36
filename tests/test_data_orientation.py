"""Canonical orientation comes from the affine, and geometry maps arrays back onto the file exactly."""

from __future__ import annotations

import dataclasses
import json
import re

import nibabel as nib
import numpy as np
import pytest
from paths import HIPPOCAMPUS, KITS_CT_SAMPLE, SHARED_DATA

from medtuning_peft.data import (
    CaseFiles,
    CaseLoadError,
    CTPreprocessing,
    VolumeGeometry,
    default_preprocessing,
    list_kits19_cases,
    load_case,
    read_msd_task,
)

IDENTITY_CT = CTPreprocessing(window=None, mean=0.0, std=1.0)


def _affine(columns, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, dtype=float).T  # one column per file axis
    affine[:3, 3] = origin
    return affine


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rotation


# Each layout: file shape, affine columns (world RAS+ direction of each file axis, in mm), and the
# expected canonical array written out by hand (D = inferior->superior, H = anterior->posterior,
# W = patient right->left), and the expected (D, H, W) spacing.
LAYOUTS = {
    # KiTS19: slice axis first, every axis flipped (codes I, P, L).
    "kits19_IPL": ((10, 20, 30), [(0, 0, -3), (0, -1.5, 0), (-2, 0, 0)], lambda a: a[::-1], (3, 1.5, 2)),
    # MSD / NIfTI-canonical RAS: x right, y anterior, z superior.
    "RAS": (
        (30, 20, 10),
        [(2, 0, 0), (0, 1.5, 0), (0, 0, 3)],
        lambda a: a.transpose(2, 1, 0)[:, ::-1, ::-1],
        (3, 1.5, 2),
    ),
    # DICOM-like LPS (BraTS-style): x left, y posterior, z superior.
    "LPS": ((30, 20, 10), [(-2, 0, 0), (0, -1.5, 0), (0, 0, 3)], lambda a: a.transpose(2, 1, 0), (3, 1.5, 2)),
    # Fully permuted: axis 0 anterior, axis 1 superior, axis 2 right.
    "ASR": (
        (20, 10, 30),
        [(0, 1.5, 0), (0, 0, 3), (2, 0, 0)],
        lambda a: a.transpose(1, 0, 2)[:, ::-1, ::-1],
        (3, 1.5, 2),
    ),
}


def _write_case(tmp_path, shape, affine, rng) -> tuple[CaseFiles, np.ndarray, np.ndarray]:
    image = rng.normal(0, 100, size=shape).astype(np.float32)
    label = rng.integers(0, 3, size=shape).astype(np.uint8)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    files = CaseFiles(
        case_id="case_x",
        images=(tmp_path / "image.nii.gz",),
        label=tmp_path / "label.nii.gz",
        channel_names=("CT",),
        label_values=(0, 1, 2),
    )
    return files, image, label


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_canonical_orientation_follows_the_affine_not_the_axis_order(tmp_path, layout):
    shape, columns, expected, spacing = LAYOUTS[layout]
    files, image, label = _write_case(tmp_path, shape, _affine(columns), np.random.default_rng(0))
    case = load_case(files, IDENTITY_CT)
    np.testing.assert_array_equal(case.label, expected(label))
    np.testing.assert_allclose(case.image[0], expected(image), rtol=0, atol=1e-4)
    np.testing.assert_allclose(case.spacing, spacing)
    assert nib.aff2axcodes(case.geometry.affine) == ("S", "P", "L")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_to_original_restores_the_exact_file_array(tmp_path, layout):
    shape, columns, _, _ = LAYOUTS[layout]
    files, _, label = _write_case(tmp_path, shape, _affine(columns), np.random.default_rng(1))
    case = load_case(files, IDENTITY_CT)
    restored = case.geometry.to_original(case.label)
    assert restored.shape == label.shape and restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, label)
    np.testing.assert_array_equal(case.geometry.to_canonical(label), case.label)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_canonical_voxels_map_to_the_same_world_points(tmp_path, layout):
    shape, columns, _, _ = LAYOUTS[layout]
    affine = _affine(columns)
    # Each file voxel stores its own flat index, so the loaded image tells where each voxel came from.
    flat_index = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    nib.save(nib.Nifti1Image(flat_index, affine), tmp_path / "image.nii.gz")
    files = CaseFiles("c", (tmp_path / "image.nii.gz",), None, ("CT",), (0, 1))
    case = load_case(files, IDENTITY_CT)
    source = np.stack(np.unravel_index(case.image[0].astype(np.int64).ravel(), shape), -1)  # (N, 3)
    canonical = np.indices(case.shape).reshape(3, -1).T  # (N, 3) in the same C order
    np.testing.assert_allclose(
        nib.affines.apply_affine(case.geometry.affine, canonical),
        nib.affines.apply_affine(affine, source),
        atol=1e-6,
    )


@pytest.mark.parametrize("layout", ["kits19_IPL", "LPS"])  # axes permuted and flipped; flipped only
def test_label_stored_in_another_voxel_order_is_refused_with_the_reorder_fix(tmp_path, layout):
    shape, columns, _, _ = LAYOUTS[layout]
    files, _, _ = _write_case(tmp_path, shape, _affine(columns), np.random.default_rng(7))
    nib.save(nib.as_closest_canonical(nib.load(files.label)), files.label)  # the same voxels, in RAS order
    with pytest.raises(CaseLoadError) as error:
        load_case(files, IDENTITY_CT)
    message = str(error.value)
    assert re.search(
        r"label\.nii\.gz'.*the same voxels as '.*image\.nii\.gz' in another voxel order", message
    )
    assert "(axes RAS" in message and "re-save it in the voxel order of" in message
    assert "cropped" not in message and "resample" not in message


def test_oblique_affine_uses_the_nearest_axes(tmp_path):
    shape, columns, expected, _ = LAYOUTS["kits19_IPL"]
    affine = _rotation_z(12.0) @ _affine(columns)
    files, _, label = _write_case(tmp_path, shape, affine, np.random.default_rng(3))
    case = load_case(files, IDENTITY_CT)
    np.testing.assert_array_equal(case.label, expected(label))
    np.testing.assert_array_equal(case.geometry.to_original(case.label), label)


def test_saved_prediction_has_the_original_grid_affine_and_header(tmp_path):
    shape, columns, _, _ = LAYOUTS["kits19_IPL"]
    affine = _affine(columns)
    files, _, label = _write_case(tmp_path, shape, affine, np.random.default_rng(4))
    case = load_case(files, IDENTITY_CT)
    out = case.geometry.save_nifti(case.label, tmp_path / "prediction.nii.gz")
    saved = nib.load(out)
    assert saved.shape == shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), label)
    assert int(saved.header["sform_code"]) == int(nib.load(files.images[0]).header["sform_code"])


def test_saved_prediction_keeps_a_trailing_singleton_axis_of_the_image(tmp_path):
    # Some converters write 3D scans as (X, Y, Z, 1); the prediction must have the scan's exact shape.
    shape, columns, _, _ = LAYOUTS["RAS"]
    affine = _affine(columns)
    files, image, label = _write_case(tmp_path, shape, affine, np.random.default_rng(5))
    nib.save(nib.Nifti1Image(image[..., None], affine), tmp_path / "image.nii.gz")
    case = load_case(files, IDENTITY_CT)
    saved = nib.load(case.geometry.save_nifti(case.label, tmp_path / "prediction.nii.gz"))
    assert saved.shape == (*shape, 1)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), label[..., None])


def test_resampled_case_maps_back_to_the_original_shape(tmp_path):
    shape = (12, 40, 36)  # I, P, L at 3 x 1 x 1 mm
    affine = _affine([(0, 0, -3), (0, -1, 0), (-1, 0, 0)])
    grid = np.indices(shape).astype(float)
    blob = ((grid[0] - 6) * 3) ** 2 + (grid[1] - 15) ** 2 + (grid[2] - 22) ** 2 < 10**2
    label = blob.astype(np.uint8)
    image = np.where(blob, 200.0, 0.0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    files = CaseFiles("c", (tmp_path / "image.nii.gz",), tmp_path / "label.nii.gz", ("CT",), (0, 1))
    case = load_case(files, CTPreprocessing(window=None, mean=0.0, std=1.0, target_spacing=(2.0, 2.0, 2.0)))
    assert case.shape == (18, 20, 18)
    np.testing.assert_allclose(case.spacing, (2.0, 2.0, 2.0))
    assert case.geometry.is_resampled
    restored = case.geometry.to_original(case.label)
    assert restored.shape == shape
    dice = 2 * np.sum(restored & label) / (restored.sum() + label.sum())
    assert dice > 0.9
    # The resampled grid covers the same physical extent: the blob centre stays put.
    centre_world = nib.affines.apply_affine(affine, np.argwhere(label).mean(0))
    centre_case = nib.affines.apply_affine(case.geometry.affine, np.argwhere(case.label).mean(0))
    np.testing.assert_allclose(centre_case, centre_world, atol=1.0)


def test_geometry_survives_json(tmp_path):
    shape, columns, _, _ = LAYOUTS["ASR"]
    files, _, label = _write_case(tmp_path, shape, _affine(columns), np.random.default_rng(5))
    geometry = load_case(files, IDENTITY_CT).geometry
    again = VolumeGeometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
    np.testing.assert_array_equal(again.original_affine, geometry.original_affine)
    assert again.header == geometry.header and again.shape == geometry.shape
    np.testing.assert_array_equal(again.to_original(again.to_canonical(label)), label)


def test_wrong_shape_for_to_original_names_the_expected_grid(tmp_path):
    shape, columns, _, _ = LAYOUTS["RAS"]
    files, _, _ = _write_case(tmp_path, shape, _affine(columns), np.random.default_rng(6))
    geometry = load_case(files, IDENTITY_CT).geometry
    with pytest.raises(ValueError, match=r"\(10, 20, 30\)"):
        geometry.to_original(np.zeros((30, 20, 10), np.uint8))


def _write_with_forms(path, data, qform, qform_code, sform, sform_code) -> None:
    image = nib.Nifti1Image(data, None)
    image.set_qform(qform, qform_code)
    image.set_sform(sform, sform_code)
    nib.save(image, path)


def test_qform_and_sform_that_disagree_are_reported_and_the_sform_is_used(tmp_path):
    shape, columns, expected, _ = LAYOUTS["RAS"]
    sform = _affine(columns)
    qform = sform @ np.diag([-1.0, 1.0, 1.0, 1.0])  # the first axis runs the other way: left and right swap
    rng = np.random.default_rng(8)
    label = rng.integers(0, 3, size=shape).astype(np.uint8)
    _write_with_forms(tmp_path / "image.nii.gz", label.astype(np.float32), qform, 1, sform, 1)
    _write_with_forms(tmp_path / "label.nii.gz", label, qform, 1, sform, 1)
    files = CaseFiles("case_x", (tmp_path / "image.nii.gz",), tmp_path / "label.nii.gz", ("CT",), (0, 1, 2))
    with pytest.warns(UserWarning) as record:
        case = load_case(files, IDENTITY_CT)
    messages = [str(w.message) for w in record]
    assert any(
        re.search(
            r"case 'case_x', file '.*image\.nii\.gz': image's qform \(axes LAS.*sform \(axes RAS.*sform is used",
            m,
        )
        for m in messages
    )
    assert any("label.nii.gz': label's qform" in m for m in messages)
    np.testing.assert_array_equal(case.label, expected(label))  # the sform's orientation
    saved = nib.load(case.geometry.save_nifti(case.label, tmp_path / "prediction.nii.gz"))
    np.testing.assert_array_equal(np.asarray(saved.dataobj), label)
    np.testing.assert_allclose(saved.get_sform(), sform, atol=1e-5)
    np.testing.assert_allclose(saved.get_qform(), qform, atol=1e-5)  # the source's header, as it was


def test_file_without_qform_or_sform_is_reported(tmp_path):
    shape, columns, _, _ = LAYOUTS["RAS"]
    data = np.random.default_rng(9).normal(size=shape).astype(np.float32)
    _write_with_forms(tmp_path / "image.nii.gz", data, _affine(columns), 0, _affine(columns), 0)
    files = CaseFiles("case_x", (tmp_path / "image.nii.gz",), None, ("CT",), (0, 1))
    with pytest.warns(
        UserWarning, match=r"case 'case_x', file '.*image\.nii\.gz': image has neither a qform nor"
    ):
        load_case(files, IDENTITY_CT)


REAL_LABELLED_FILES = {
    "kits19_layout_ct": lambda: list_kits19_cases(KITS_CT_SAMPLE)[0],
    "msd_hippocampus_mri": lambda: read_msd_task(HIPPOCAMPUS).training[0],
}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="real sample data not present")
@pytest.mark.parametrize("target_spacing", [None, (1.3, 0.7, 2.1)], ids=["file_grid", "resampled"])
@pytest.mark.parametrize("source", sorted(REAL_LABELLED_FILES))
def test_real_label_written_back_matches_the_source_file_voxel_for_voxel(tmp_path, source, target_spacing):
    files = REAL_LABELLED_FILES[source]()
    preprocessing = dataclasses.replace(
        default_preprocessing(files.modality, files.dataset), target_spacing=target_spacing
    )
    case = load_case(files, preprocessing)
    saved = nib.load(case.geometry.save_nifti(case.label, tmp_path / "prediction.nii.gz"))
    original = nib.load(files.label)
    truth, written = np.asarray(original.dataobj), np.asarray(saved.dataobj)
    assert saved.shape == original.shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved.affine, original.affine, atol=1e-5)
    for form in ("qform_code", "sform_code"):
        assert int(saved.header[form]) == int(original.header[form])
    if target_spacing is None:
        np.testing.assert_array_equal(written, truth)
    else:  # nearest-neighbour there and back: no new values, each structure where it was
        assert set(np.unique(written)) <= set(files.label_values)
        for value in files.label_values[1:]:
            if (truth == value).any():
                dice = (
                    2
                    * np.sum((written == value) & (truth == value))
                    / ((written == value).sum() + (truth == value).sum())
                )
                assert dice > 0.85, (value, dice)
