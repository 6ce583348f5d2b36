"""Multi-channel volumes: each channel stays the modality it was read as, from the files to the training crops.

Per-channel z-scores make every channel look alike in mean and spread, so each channel here carries a marker
of its own (one bright voxel at a position no other channel uses) and the tests follow the markers.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtuning_peft.data import (
    BRATS_MODALITIES,
    CaseCache,
    CropDataset,
    VolumeCase,
    VolumeGeometry,
    brats_case_files,
    list_msd_cases,
    load_case,
)
from medtuning_peft.data.synthetic import canonical_affine

SHAPE = (14, 12, 10)  # (x, y, z) as stored
LPS = np.diag([-1.0, -1.0, 2.0, 1.0])  # the BraTS voxel order, z spacing 2 mm
# A permuted, flipped affine: the first file axis runs along z (the KiTS19 voxel order).
PERMUTED = np.array(
    [[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
MARKERS = ((3, 4, 5), (9, 2, 6), (6, 8, 2), (11, 6, 7))  # (x, y, z) of the bright voxel of channel 0, 1, 2, 3


def _channel(index: int, rng: np.random.Generator) -> np.ndarray:
    """A non-zero block with a different intensity scale per channel and one bright voxel at MARKERS[index]."""
    data = np.zeros(SHAPE, np.float32)
    data[1:-1, 1:-1, 1:-1] = rng.normal(100.0 * (index + 1), 5.0, (SHAPE[0] - 2, SHAPE[1] - 2, SHAPE[2] - 2))
    data[MARKERS[index]] = 100.0 * (index + 1) + 500.0
    return data


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[4:9, 3:8, 3:7] = 1
    return label


def _marker_channels(image: np.ndarray, geometry: VolumeGeometry) -> list[int]:
    """For each stored channel, the index of the marker found at its brightest voxel (in file voxel order)."""
    found = []
    for c in range(image.shape[0]):
        original = geometry.to_original(image[c])  # (D, H, W) -> (x, y, z)
        found.append(MARKERS.index(tuple(int(i) for i in np.unravel_index(np.argmax(original), SHAPE))))
    return found


def _write_brats_case(case_dir: Path, affine: np.ndarray) -> Path:
    case_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # Written in reverse modality order so that no listing or creation order lines up with the channel order.
    for index, modality in reversed(list(enumerate(BRATS_MODALITIES))):
        nib.save(
            nib.Nifti1Image(_channel(index, rng), affine), case_dir / f"{case_dir.name}_{modality}.nii.gz"
        )
    label = _label()
    label[label == 1] = 4
    nib.save(nib.Nifti1Image(label, affine), case_dir / f"{case_dir.name}_seg.nii.gz")
    return case_dir


def _write_msd_task(root: Path, modality: tuple[str, ...], affine: np.ndarray) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    image = np.stack([_channel(c, rng) for c in range(len(modality))], -1)  # C x (x, y, z) -> (x, y, z, C)
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / "case_001.nii.gz")
    nib.save(nib.Nifti1Image(_label(), affine), root / "labelsTr" / "case_001.nii.gz")
    description = {
        "name": "Toy",
        "modality": {str(c): name for c, name in enumerate(modality)},
        "labels": {"0": "background", "1": "foreground"},
        "training": [{"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(description))
    return root


@pytest.mark.parametrize("affine", [LPS, PERMUTED], ids=["lps", "permuted"])
def test_brats_channels_are_flair_t1_t1ce_t2_fresh_and_from_the_cache(tmp_path, affine):
    files = brats_case_files(_write_brats_case(tmp_path / "data" / "BraTS20_Training_001", affine))
    cache = CaseCache(tmp_path / "cache")
    for case in (cache.load(files), cache.load(files)):  # decoded, then memory-mapped
        assert case.channel_names == BRATS_MODALITIES
        assert _marker_channels(np.asarray(case.image), case.geometry) == [0, 1, 2, 3]
        for c in range(4):  # each channel standardized on its own statistics
            inside = np.asarray(case.image[c])[np.asarray(case.image[c]) != 0]
            assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std()) - 1.0) < 1e-3


@pytest.mark.parametrize("affine", [LPS, PERMUTED], ids=["lps", "permuted"])
@pytest.mark.parametrize("modality", [("T2", "ADC"), ("FLAIR", "T1w", "t1gd", "T2w")], ids=["2ch", "4ch"])
def test_msd_channels_keep_the_order_of_the_last_axis_fresh_and_from_the_cache(tmp_path, affine, modality):
    files = list_msd_cases(_write_msd_task(tmp_path / "task", modality, affine))[0]
    cache = CaseCache(tmp_path / "cache")
    for case in (cache.load(files), cache.load(files)):
        assert case.channel_names == modality
        assert _marker_channels(np.asarray(case.image), case.geometry) == list(range(len(modality)))


def test_training_crops_and_flips_move_every_channel_with_the_label():
    shape = (12, 20, 24)  # (D, H, W)
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, shape).astype(np.uint8)
    position = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    # Channel c holds (c + 1) * (flat voxel index) + label: any crop, flip or channel mix-up breaks the relation.
    image = np.stack([(c + 1) * position + label for c in range(3)]).astype(np.float32)
    case = VolumeCase(
        case_id="toy",
        image=image,
        label=label,
        spacing=(1.0, 1.0, 1.0),
        geometry=VolumeGeometry.from_affine(canonical_affine(shape, (1.0, 1.0, 1.0)), shape),
        channel_names=("a", "b", "c"),
        label_values=(0, 1, 2),
    )
    dataset = CropDataset([case], (8, 16, 16), samples_per_case=16, intensity_scale=0.0, intensity_shift=0.0)
    for index in range(len(dataset)):
        item = dataset[index]
        crop, classes = item["image"].numpy(), item["label"].numpy()
        voxel = crop[0] - classes  # (D, H, W) flat indices of the voxels the crop holds, in the crop's order
        for c in range(3):
            np.testing.assert_array_equal(crop[c], (c + 1) * voxel + classes)
        np.testing.assert_array_equal(
            label.reshape(-1)[voxel.astype(np.int64).reshape(-1)], classes.reshape(-1)
        )


def test_a_vector_layout_file_reads_as_channels_last(tmp_path):
    # NIfTI's vector layout (components on the 5th axis, a singleton time axis), as SimpleITK writes it.
    root = _write_msd_task(tmp_path / "task", ("T2", "ADC"), LPS)
    path = root / "imagesTr" / "case_001.nii.gz"
    channels_last = np.asanyarray(nib.load(str(path)).dataobj)  # (x, y, z, C)
    nib.save(nib.Nifti1Image(channels_last[:, :, :, None, :], LPS), path)  # (x, y, z, C) -> (x, y, z, 1, C)
    case = load_case(list_msd_cases(root)[0])
    assert case.image.shape[0] == 2
    assert _marker_channels(np.asarray(case.image), case.geometry) == [0, 1]
