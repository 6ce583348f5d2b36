"""Training crops: requested shape, foreground bias, padding, reproducibility; whole-volume items."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medtuning_peft.data import (
    CaseCache,
    CropDataset,
    VolumeCase,
    VolumeDataset,
    classes_to_labels,
    labels_to_classes,
    list_kits19_cases,
    write_synthetic_kits19,
)

CROP = (16, 24, 24)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_kits19(root / "kits", num_cases=3, shape=(24, 64, 64))
    return CaseCache(root / "cache").load_many(list_kits19_cases(root / "kits"))


def test_crops_have_the_requested_shape_and_types(cases):
    dataset = CropDataset(cases, CROP, samples_per_case=2)
    assert len(dataset) == 6
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 1, *CROP) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (3, *CROP) and batch["label"].dtype == torch.int64
    assert batch["case_id"] == ["case_00000", "case_00001", "case_00002"]


def test_crops_are_biased_to_foreground(cases):
    def foreground_share(probability):
        dataset = CropDataset(cases, CROP, samples_per_case=20, foreground_probability=probability, seed=1)
        return np.mean([(dataset[i]["label"] > 0).any().item() for i in range(len(dataset))])

    assert foreground_share(1.0) == 1.0
    assert foreground_share(1.0) > foreground_share(0.0) + 0.3


def test_class_ratios_target_the_tumour(cases):
    dataset = CropDataset(cases, CROP, samples_per_case=10, class_ratios=(0, 0, 1), seed=2)
    assert all((dataset[i]["label"] == 2).any() for i in range(len(dataset)))


def test_items_are_reproducible_per_seed_epoch_and_index(cases):
    dataset = CropDataset(cases, CROP, seed=7)
    first = dataset[1]
    torch.testing.assert_close(dataset[1]["image"], first["image"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["image"], first["image"])
    dataset.set_epoch(0)
    workers = DataLoader(dataset, batch_size=1, num_workers=2)
    torch.testing.assert_close(list(workers)[1]["image"][0], first["image"])


@pytest.mark.parametrize("crop", [CROP, (32, 24, 24)], ids=["inside", "padded"])
def test_precomputed_crop_centres_give_the_crops_workers_would_find_themselves(cases, crop, monkeypatch):
    lazy = CropDataset(cases, crop, seed=3, samples_per_case=2)
    ready = CropDataset(cases, crop, seed=3, samples_per_case=2)
    ready.precompute_crop_centres()
    assert sorted(ready._indices) == [0, 1, 2]
    # Inherited by the workers: no label is scanned again when items are drawn.
    monkeypatch.setattr(ready, "_crop_centre_indices", lambda i, label: ready._indices[i])
    for i in range(len(lazy)):
        torch.testing.assert_close(ready[i]["image"], lazy[i]["image"])
        torch.testing.assert_close(ready[i]["label"], lazy[i]["label"])


def test_items_never_alias_the_cached_arrays(cases):
    before = np.array(cases[0].image)
    dataset = CropDataset(cases[:1], CROP, flip_prob=0.0, intensity_scale=0, intensity_shift=0)
    item = dataset[0]
    item["image"].add_(100.0)  # in-place edits of an item stay in the item
    item["label"].fill_(7)
    np.testing.assert_array_equal(cases[0].image, before)
    assert dataset[0]["image"].max() < 50


def test_small_volumes_are_padded_with_the_background_value(cases):
    big = (32, 24, 24)  # deeper than the 24-slice volumes
    dataset = CropDataset(cases[:1], big, foreground_probability=0.0, intensity_scale=0, intensity_shift=0)
    item = dataset[0]
    assert item["image"].shape == (1, *big)
    padded_slices = item["image"][0, :4]  # symmetric padding: 4 slices on each side
    torch.testing.assert_close(padded_slices, torch.full_like(padded_slices, cases[0].background_value))


def test_intensity_jitter_is_drawn_per_channel_and_leaves_the_label():
    """Each MRI sequence is standardized on its own; identical channels must leave with different jitter."""
    rng = np.random.default_rng(0)
    channel = rng.normal(size=(1, *CROP)).astype(np.float32)
    label = (rng.random(CROP) < 0.3).astype(np.uint8)
    case = VolumeCase(
        "four", np.repeat(channel, 4, axis=0), label, (1.0, 1.0, 1.0), None, ("a", "b", "c", "d")
    )
    dataset = CropDataset([case], CROP, samples_per_case=8, flip_prob=0.0, intensity_prob=1.0)
    for item in (dataset[i] for i in range(len(dataset))):
        image = item["image"]
        assert all(not torch.allclose(image[0], image[c]) for c in range(1, 4))
        torch.testing.assert_close(item["label"], torch.from_numpy(label).long())


def test_volume_dataset_gives_whole_volumes(cases):
    item = VolumeDataset(cases)[0]
    assert item["image"].shape == (1, 24, 64, 64) and item["label"].shape == (24, 64, 64)
    assert item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), cases[0].label)


def test_unlabelled_cases_are_refused_for_training(cases):
    unlabelled = type(cases[0])(**{**cases[0].__dict__, "label": None})
    with pytest.raises(ValueError, match="no label"):
        CropDataset([unlabelled], CROP)
    assert "label" not in VolumeDataset([unlabelled])[0]


def test_label_class_mapping_round_trips():
    label = np.array([[[0, 1, 2, 4]]], np.uint8)
    classes = labels_to_classes(label, (0, 1, 2, 4))
    np.testing.assert_array_equal(classes, [[[0, 1, 2, 3]]])
    np.testing.assert_array_equal(classes_to_labels(classes, (0, 1, 2, 4)), label)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"crop_size": (16, 16)}, "crop_size"), ({"foreground_probability": 1.5}, "foreground_probability")],
)
def test_invalid_options_name_the_field(cases, kwargs, message):
    options = {"crop_size": CROP, **kwargs}
    with pytest.raises(ValueError, match=message):
        CropDataset(cases, **options)
