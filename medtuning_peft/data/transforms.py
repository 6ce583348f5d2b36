"""Training crops and validation volumes as torch datasets, built from MONAI dictionary transforms.

Training pipeline per item: pad to at least the crop size (image with the case's background value,
label with 0) -> foreground-biased random crop (``RandCropByPosNegLabeld``, or
``RandCropByLabelClassesd`` with per-class ratios) -> independent random flips per axis
(``RandFlipd``) -> intensity scale and shift (``RandScaleIntensityd``, ``RandShiftIntensityd``), drawn
per channel: each MRI sequence is standardized on its own, so each gets its own jitter (as in the
reference recipe's augmentation).

Crop centres are drawn from per-case voxel indices computed once (numpy, on first use) and handed to
MONAI through ``fg_indices_key``/``bg_indices_key`` (``indices_key`` for class ratios), so an item
never scans, copies or converts the whole volume: only the crop is read from the cached memory map.
Each index group is subsampled to at most ``max_indices_per_group`` voxels (a fixed uniform subset
per case), which bounds memory on large volumes without biasing where crops land.

Randomness is seeded per item from ``(seed, epoch, index)``, so an epoch is reproducible whatever the
number of ``DataLoader`` workers; call :meth:`CropDataset.set_epoch` each epoch for fresh crops.

Labels leave the datasets as *class indices*: the position of each voxel's value in the case's
``label_values`` (identity for KiTS19/MSD; BraTS 0, 1, 2, 4 -> 0, 1, 2, 3). Use
:func:`classes_to_labels` to map predictions back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from monai.utils.type_conversion import convert_to_tensor
from torch.utils.data import Dataset

from .case import VolumeCase


def labels_to_classes(label: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Maps label values to class indices (their position in ``label_values``).

    Args:
        label: ``(D, H, W)`` integer label map with values in ``label_values``.
        label_values: Sorted allowed values, e.g. ``(0, 1, 2, 4)``.

    Returns:
        ``(D, H, W)`` int64 class indices in ``[0, len(label_values))``.
    """
    values = np.asarray(label_values, dtype=np.int64)
    if np.array_equal(values, np.arange(len(values))):
        return np.asarray(label, dtype=np.int64)
    return np.searchsorted(values, np.asarray(label)).astype(np.int64)


def classes_to_labels(classes: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`labels_to_classes`: ``(D, H, W)`` class indices -> uint8 label values."""
    return np.asarray(label_values, dtype=np.uint8)[np.asarray(classes, dtype=np.int64)]


def _check_crop_size(crop_size: Sequence[int]) -> tuple[int, int, int]:
    if len(crop_size) != 3 or any(int(s) < 1 for s in crop_size):
        raise ValueError(f"crop_size={tuple(crop_size)!r}; pass three positive voxel counts (D, H, W).")
    return tuple(int(s) for s in crop_size)  # type: ignore[return-value]


def build_train_transforms(
    crop_size: Sequence[int],
    *,
    foreground_probability: float = 0.67,
    class_ratios: Sequence[float] | None = None,
    flip_axes: Sequence[int] = (0, 1, 2),
    flip_prob: float = 0.5,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
    intensity_prob: float = 0.5,
    precomputed_indices: bool = False,
) -> Compose:
    """The random part of the training pipeline (after padding), on ``{"image", "label"}`` dicts.

    Args:
        crop_size: ``(D, H, W)`` of the crops.
        foreground_probability: Chance that a crop is centred on a foreground (label > 0) voxel
            (``pos / (pos + neg)`` of ``RandCropByPosNegLabeld``); nnU-Net uses 0.33, 0.67 favours the
            small KiTS19 structures. Ignored if ``class_ratios`` is given.
        class_ratios: Relative chance of centring a crop on each class index (e.g. ``(1, 1, 2)`` for
            background, kidney, tumor); uses ``RandCropByLabelClassesd``.
        flip_axes: Spatial axes (0 = D, 1 = H, 2 = W) flipped independently.
        flip_prob: Chance of each flip.
        intensity_scale: ``RandScaleIntensityd`` factor range ``±intensity_scale``, drawn per channel.
        intensity_shift: ``RandShiftIntensityd`` offset range ``±intensity_shift``, drawn per channel.
        intensity_prob: Chance of each intensity transform.
        precomputed_indices: Read crop-centre candidates from the dict instead of scanning the label:
            flat ``(D, H, W)`` indices under ``"fg_indices"`` and ``"bg_indices"``, or a list of one
            array per class index under ``"class_indices"`` with ``class_ratios``.

    Returns:
        A MONAI ``Compose``; input image ``(C, D, H, W)`` and label ``(1, D, H, W)`` (class indices
        when ``class_ratios`` is given and indices are not precomputed) at least ``crop_size``;
        output a one-element list of dicts cropped to ``crop_size``.

    Raises:
        ValueError: For an invalid crop size, probability or axis.
    """
    crop_size = _check_crop_size(crop_size)
    for name, value in (
        ("foreground_probability", foreground_probability),
        ("flip_prob", flip_prob),
        ("intensity_prob", intensity_prob),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r}; pass a probability in [0, 1].")
    if any(a not in (0, 1, 2) for a in flip_axes):
        raise ValueError(f"flip_axes={tuple(flip_axes)!r}; spatial axes are 0 (D), 1 (H), 2 (W).")
    keys = ["image", "label"]
    if class_ratios is not None:
        if len(class_ratios) < 2 or min(class_ratios) < 0 or sum(class_ratios) <= 0:
            raise ValueError(
                f"class_ratios={tuple(class_ratios)!r}; pass one non-negative weight per class index "
                "(at least 2, not all zero), e.g. (1, 1, 2)."
            )
        crop = RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=crop_size,
            ratios=list(class_ratios),
            num_classes=len(class_ratios),
            num_samples=1,
            indices_key="class_indices" if precomputed_indices else None,
            warn=False,
        )
    else:
        crop = RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=crop_size,
            pos=foreground_probability,
            neg=1.0 - foreground_probability,
            num_samples=1,
            fg_indices_key="fg_indices" if precomputed_indices else None,
            bg_indices_key="bg_indices" if precomputed_indices else None,
        )
    transforms: list[Any] = [crop]
    transforms += [RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in flip_axes]
    if intensity_scale > 0:
        transforms.append(
            RandScaleIntensityd("image", factors=intensity_scale, prob=intensity_prob, channel_wise=True)
        )
    if intensity_shift > 0:
        transforms.append(
            RandShiftIntensityd("image", offsets=intensity_shift, prob=intensity_prob, channel_wise=True)
        )
    return Compose(transforms)


class CropDataset(Dataset):
    """Random training crops from preprocessed cases.

    Item ``i`` is a crop of case ``i % len(cases)``; ``len = len(cases) * samples_per_case``.

    Args:
        cases: Labelled cases (e.g. from :class:`~medtuning_peft.data.cache.CaseCache`).
        crop_size: ``(D, H, W)`` of every crop; smaller volumes are padded.
        samples_per_case: Crops per case per epoch.
        seed: Base seed; item randomness derives from ``(seed, epoch, index)``.
        max_indices_per_group: Crop-centre candidates kept per case and group (foreground,
            background, or each class).
        **transform_options: Passed to :func:`build_train_transforms` (``foreground_probability``,
            ``class_ratios``, ``flip_axes``, ``flip_prob``, ``intensity_*``).

    Items:
        ``{"image": float32 (C, D, H, W), "label": int64 (D, H, W) class indices, "case_id": str}``.

    Raises:
        ValueError: If ``cases`` is empty, a case has no label, or cases differ in channel count.
    """

    def __init__(
        self,
        cases: Sequence[VolumeCase],
        crop_size: Sequence[int],
        *,
        samples_per_case: int = 1,
        seed: int = 0,
        max_indices_per_group: int = 50_000,
        **transform_options: Any,
    ) -> None:
        if not cases:
            raise ValueError("cases is empty; pass at least one labelled VolumeCase.")
        unlabelled = [c.case_id for c in cases if c.label is None]
        if unlabelled:
            raise ValueError(
                f"cases {unlabelled[:5]} have no label; training crops need labels (use VolumeDataset "
                "for prediction-only cases)."
            )
        if len({c.num_channels for c in cases}) != 1:
            raise ValueError(
                f"cases have different channel counts {sorted({c.num_channels for c in cases})}; "
                "load them with the same dataset reader."
            )
        if samples_per_case < 1:
            raise ValueError(f"samples_per_case={samples_per_case}; pass a positive integer.")
        self.cases = list(cases)
        self.crop_size = _check_crop_size(crop_size)
        self.samples_per_case = samples_per_case
        self.seed = seed
        self.epoch = 0
        if max_indices_per_group < 1:
            raise ValueError(f"max_indices_per_group={max_indices_per_group}; pass a positive integer.")
        self.max_indices_per_group = max_indices_per_group
        self.class_ratios = transform_options.get("class_ratios")
        self.transforms = build_train_transforms(
            self.crop_size, precomputed_indices=True, **transform_options
        )
        self._indices: dict[int, dict[str, Any]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose crops ``__getitem__`` returns (deterministic per epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def _padding(self, case: VolumeCase) -> list[SpatialPadd]:
        """Pads image (background value) and label (0) to at least the crop size; ``[]`` if not needed."""
        if all(n >= c for n, c in zip(case.shape, self.crop_size)):
            return []
        return [
            SpatialPadd("image", self.crop_size, value=float(case.background_value)),
            SpatialPadd("label", self.crop_size, value=0),
        ]

    def _crop_centre_indices(self, case_index: int, label: np.ndarray) -> dict[str, Any]:
        """Flat ``(D, H, W)`` indices of crop-centre candidates of one case, computed once."""
        if case_index not in self._indices:
            case = self.cases[case_index]
            classes = labels_to_classes(label, case.label_values)
            rng = np.random.default_rng([self.seed, case_index])

            def subset(mask: np.ndarray) -> np.ndarray:
                flat = np.flatnonzero(mask)
                if flat.size > self.max_indices_per_group:
                    flat = np.sort(rng.choice(flat, self.max_indices_per_group, replace=False))
                return flat

            if self.class_ratios is not None:
                groups = {"class_indices": [subset(classes == k) for k in range(len(self.class_ratios))]}
            else:
                groups = {"fg_indices": subset(classes > 0), "bg_indices": subset(classes == 0)}
            self._indices[case_index] = groups
        return self._indices[case_index]

    def precompute_crop_centres(self) -> None:
        """Find every case's crop-centre candidates now.

        Call it before DataLoader worker processes start: they inherit them, where each worker of each epoch's
        loader would otherwise scan every label volume again.
        """
        for case_index, case in enumerate(self.cases):
            self._crop_centre_indices(case_index, np.asarray(self._padded(case)["label"][0]))

    def _padded(self, case: VolumeCase) -> dict[str, Any]:
        """The case as ``{"image": (C, D, H, W), "label": (1, D, H, W)}`` tensors, padded to the crop size."""
        with warnings.catch_warnings():
            # Cached arrays are read-only memory maps; the tensors below are views that are only read
            # (crop, then copies by flips/intensity/clone), never written.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            sample: dict[str, Any] = {
                "image": torch.as_tensor(np.asarray(case.image)),  # (C, D, H, W), no copy
                "label": torch.as_tensor(np.asarray(case.label))[None],  # (D, H, W) -> (1, D, H, W)
            }
        for pad in self._padding(case):
            sample = pad(sample)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_index = index % len(self.cases)
        case = self.cases[case_index]
        sample = self._padded(case)
        sample.update(self._crop_centre_indices(case_index, np.asarray(sample["label"][0])))
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        self.transforms.set_random_state(seed=int(state))
        crop = self.transforms(sample)[0]
        image = convert_to_tensor(crop["image"], dtype=torch.float32, track_meta=False)
        label = np.asarray(convert_to_tensor(crop["label"][0], track_meta=False))  # (1, D, H, W) -> (D, H, W)
        return {
            "image": image.clone(),  # own memory, never a view of the cache
            "label": torch.from_numpy(labels_to_classes(label, case.label_values)),
            "case_id": case.case_id,
        }


class VolumeDataset(Dataset):
    """Whole preprocessed volumes for validation and prediction (use with ``batch_size=1``).

    Args:
        cases: Cases, labelled or prediction-only.

    Items:
        ``{"image": float32 (C, D, H, W), "label": int64 (D, H, W) class indices, "case_id": str}``;
        ``"label"`` is absent for prediction-only cases. ``dataset.cases[i].geometry`` maps a
        prediction back onto the original file.
    """

    def __init__(self, cases: Sequence[VolumeCase]) -> None:
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.array(case.image, dtype=np.float32)),
            "case_id": case.case_id,
        }
        if case.label is not None:
            item["label"] = torch.from_numpy(labels_to_classes(case.label, case.label_values))
        return item
