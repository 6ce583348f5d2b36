"""MSD reader: dataset.json drives channels, labels and splits; 4D channel-last images; mixed dtypes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from paths import HIPPOCAMPUS

from medtuning_peft.cli import main
from medtuning_peft.data import (
    CaseLoadError,
    CTPreprocessing,
    MRIPreprocessing,
    list_msd_cases,
    load_msd_case,
    read_msd_task,
)

needs_hippocampus = pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="MSD hippocampus sample not present")


def _write_task(root: Path, modality: dict, labels: dict, training: list, test: list | None = None) -> Path:
    description = {"name": "Toy", "modality": modality, "labels": labels, "training": training}
    if test is not None:
        description["test"] = test
    (root / "dataset.json").write_text(json.dumps(description))
    return root


@needs_hippocampus
def test_hippocampus_task_reads_channels_labels_and_pairs():
    task = read_msd_task(HIPPOCAMPUS)
    assert task.channel_names == ("MRI",) and task.modality == "MRI"
    assert task.label_names == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert len(task.training) == 200 and task.test == ()
    assert all(c.label is not None and c.label_values == (0, 1, 2) for c in task.training)
    assert task.training[0].case_id == "hippocampus_004"


@needs_hippocampus
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_hippocampus_cases_of_either_dtype_load_normalized(dtype):
    case_files = next(
        c for c in list_msd_cases(HIPPOCAMPUS) if str(nib.load(c.images[0]).get_data_dtype()) == dtype
    )
    case = load_msd_case(case_files)
    raw = nib.load(case_files.images[0])
    assert case.image.dtype == np.float32 and case.image.shape == (1, *case.shape)
    assert case.shape == tuple(raw.shape[::-1])  # RAS (x, y, z) -> (D, H, W) = (z, y, x)
    assert set(np.unique(case.label)) <= {0, 1, 2} and (case.label > 0).any()
    # A crop without an empty background: z-scored over every voxel (its zero voxels are tissue).
    assert abs(float(case.image.mean())) < 1e-4 and abs(float(case.image.std()) - 1.0) < 1e-3
    np.testing.assert_array_equal(
        case.geometry.to_original(case.label), np.asarray(nib.load(case_files.label).dataobj)
    )


def test_four_channel_image_keeps_modality_order_and_test_cases_have_no_label(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTs").mkdir()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    channels = np.stack([np.full((6, 7, 8), c + 1, np.float32) for c in range(4)], -1)  # (x, y, z, C)
    channels[0, 0, 0] = 0.0
    channels[1, 0, 0] = (9, 9, 9, 9)
    nib.save(nib.Nifti1Image(channels, affine), tmp_path / "imagesTr/toy_001.nii.gz")
    nib.save(nib.Nifti1Image(channels, affine), tmp_path / "imagesTs/toy_002.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.uint8), affine), tmp_path / "labelsTr/toy_001.nii.gz")
    _write_task(
        tmp_path,
        {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        [{"image": "./imagesTr/toy_001.nii.gz", "label": "./labelsTr/toy_001.nii.gz"}],
        ["./imagesTs/toy_002.nii.gz"],
    )
    task = read_msd_task(tmp_path)
    assert task.channel_names == ("FLAIR", "T1w", "t1gd", "T2w") and task.num_classes == 4
    case = load_msd_case(task.training[0], MRIPreprocessing(mask="channel"))
    assert case.image.shape == (4, 8, 7, 6) and case.channel_names == task.channel_names
    # Channel c was filled with c + 1 except one outlier voxel of 9: after the per-channel z-score the
    # outlier is the maximum of every channel, and the zero voxel of channel 0 stays 0.
    for c in range(4):
        assert np.unravel_index(np.argmax(case.image[c]), case.shape) == (0, 6, 4)  # x=1, y=0, z=0
    assert case.image[0, 0, 6, 5] == 0.0  # x=0, y=0, z=0
    test_case = load_msd_case(list_msd_cases(tmp_path, split="test")[0])
    assert test_case.label is None and test_case.case_id == "toy_002"


def test_channel_count_must_match_modality(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "imagesTr/a.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "labelsTr/a.nii.gz")
    _write_task(
        tmp_path,
        {"0": "MRI"},
        {"0": "bg", "1": "fg"},
        [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
    )
    with pytest.raises(CaseLoadError, match=r"case 'a'.*a\.nii\.gz.*2 channel\(s\).*1 \['MRI'\]"):
        load_msd_case(list_msd_cases(tmp_path)[0])


def test_ct_task_defaults_to_a_wide_window_per_volume_zscore(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    image = np.linspace(-2000, 2000, 5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "imagesTr/liver_0.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), np.eye(4)), tmp_path / "labelsTr/liver_0.nii.gz")
    _write_task(
        tmp_path,
        {"0": "CT"},
        {"0": "background", "1": "liver", "2": "cancer"},
        [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}],
    )
    task = read_msd_task(tmp_path)
    assert task.modality == "CT" and task.default_preprocessing() == CTPreprocessing(
        (-1000, 1000), None, None
    )
    case = load_msd_case(task.training[0])
    assert abs(float(case.image.mean())) < 1e-4 and abs(float(case.image.std()) - 1.0) < 1e-3


def test_dataset_json_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        read_msd_task(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "training": []}))
    with pytest.raises(CaseLoadError, match="field 'labels' is missing"):
        read_msd_task(tmp_path)
    _write_task(tmp_path, {"0": "CT"}, {"0": "bg"}, [{"image": "imagesTr/a.nii.gz"}])
    with pytest.raises(CaseLoadError, match=r"training\[0\].*needs 'image' and 'label'"):
        read_msd_task(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(CaseLoadError, match="not valid JSON"):
        read_msd_task(tmp_path)


_PAIR = {"image": "./imagesTr/a_001.nii.gz", "label": "./labelsTr/a_001.nii.gz"}
_VALID = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "A"}, "training": [_PAIR]}

# (change to a valid dataset.json, what the error must say after naming dataset.json)
_MALFORMED = {
    "labels-without-background": ({"labels": {"1": "A", "2": "P"}}, r"field 'labels' .*no \"0\""),
    "labels-keys-collide": ({"labels": {"0": "bg", "1": "A", "01": "B"}}, r"'labels' .*'1' and '01'"),
    "label-name-is-a-list": ({"labels": {"0": "bg", "1": ["x"]}}, r"labels\['1'\] is \['x'\].*name string"),
    "label-name-is-null": ({"labels": {"0": "bg", "1": None}}, r"labels\['1'\] is None.*name string"),
    "label-beyond-uint8": ({"labels": {"0": "bg", "300": "x"}}, r"'labels' has value 300.*0\.\.255"),
    "label-key-negative": ({"labels": {"0": "bg", "-1": "x"}}, r"'labels' has key '-1'"),
    "modality-empty": ({"modality": {}}, r"field 'modality' is empty"),
    "modality-keys-gap": ({"modality": {"0": "T1", "2": "T2"}}, r"'modality' has keys \[0, 2\].*0\.\.1"),
    "training-empty": ({"training": []}, r"field 'training' is an empty list"),
    "training-image-int": ({"training": [{"image": 5, "label": "l.nii.gz"}]}, r"training\[0\]\.image is 5"),
    "training-image-null": (
        {"training": [_PAIR, {"image": None, "label": "l.nii.gz"}]},
        r"training\[1\]\.image is None",
    ),
    "training-label-not-nifti": (
        {"training": [{"image": "i.nii.gz", "label": "l.mha"}]},
        r"training\[0\]\.label is 'l\.mha'.*\.nii",
    ),
    "training-duplicate": (
        {"training": [_PAIR, _PAIR]},
        r"training\[1\] repeats case 'a_001' of training\[0\]",
    ),
    "training-label-shared": (
        {"training": [_PAIR, {"image": "imagesTr/a_002.nii.gz", "label": "labelsTr/a_001.nii.gz"}]},
        r"training\[1\]\.label is 'labelsTr/a_001\.nii\.gz', the label of training\[0\] too",
    ),
    "training-labels-swapped": (
        {
            "training": [
                {"image": "imagesTr/a_001.nii.gz", "label": "labelsTr/a_002.nii.gz"},
                {"image": "imagesTr/a_002.nii.gz", "label": "labelsTr/a_001.nii.gz"},
            ]
        },
        r"training\[0\]\.label is 'labelsTr/a_002\.nii\.gz', the label file of case 'a_002' \(training\[1\]\)",
    ),
    "test-is-a-string": ({"test": "imagesTs"}, r"field 'test' is a str, expected a list"),
    "test-entry-without-image": ({"test": [{"img": "b.nii.gz"}]}, r"test\[0\] is \{'img'.*without 'image'"),
    "test-entry-int": ({"test": [3]}, r"test\[0\] is 3; expected a \.nii"),
    "test-repeats-training": ({"test": ["imagesTs/a_001.nii.gz"]}, r"test\[0\] repeats case 'a_001'"),
}


@pytest.mark.parametrize("change, message", _MALFORMED.values(), ids=_MALFORMED.keys())
def test_malformed_dataset_json_is_refused_naming_the_file_and_field(tmp_path, change, message):
    (tmp_path / "dataset.json").write_text(json.dumps({**_VALID, **change}))
    with pytest.raises(CaseLoadError, match=re.escape(str(tmp_path / "dataset.json")) + ".*" + message):
        read_msd_task(tmp_path)


def test_label_files_named_otherwise_than_their_images_are_read(tmp_path):
    # Decathlon names a label after its image, but a label of another name that no other case claims is fine.
    training = [
        {"image": "imagesTr/a_001.nii.gz", "label": "labelsTr/a_001_seg.nii.gz"},
        {"image": "imagesTr/a_002.nii.gz", "label": "labelsTr/a_002_seg.nii.gz"},
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({**_VALID, "training": training}))
    task = read_msd_task(tmp_path)
    assert [c.label.name for c in task.training] == ["a_001_seg.nii.gz", "a_002_seg.nii.gz"]


@pytest.mark.parametrize("top_level", [42, [], "text", None])
def test_dataset_json_that_is_not_an_object_is_refused(tmp_path, top_level):
    (tmp_path / "dataset.json").write_text(json.dumps(top_level))
    with pytest.raises(CaseLoadError, match=r"dataset\.json': top level is a \w+; expected a JSON object"):
        read_msd_task(tmp_path)


def test_verify_data_reports_a_malformed_dataset_json_instead_of_checking_cases(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text(json.dumps({**_VALID, "test": "imagesTs"}))
    assert main(["verify-data", "--task", "msd", "--data-dir", str(tmp_path), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "field 'test' is a str" in captured.err and str(tmp_path / "dataset.json") in captured.err
    assert "checked" not in captured.out
