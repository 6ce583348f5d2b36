"""Intensity normalization and target spacing: CT (HU window + z-score) and MRI (z-score inside a mask).

CT windows and statistics are fixed numbers (nnU-Net's KiTS19 values by default) or, with
:func:`ct_preprocessing_from_cases`, measured as nnU-Net measures them on the foreground of the training cases.
Both configs are frozen dataclasses whose :meth:`to_dict` enters the cache key, so changing a
parameter can never return stale cached arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .case import CaseFiles

# nnU-Net's KiTS19 statistics (Isensee & Maier-Hein, "An attempt at beating the 3D U-Net", 2019):
# HU clipped to the 0.5 / 99.5 percentiles of foreground voxels, then z-scored with the foreground
# mean and standard deviation of the training set.
KITS19_HU_WINDOW: tuple[float, float] = (-79.0, 304.0)
KITS19_HU_MEAN: float = 101.0
KITS19_HU_STD: float = 76.9


def _check_target_spacing(name: str, target_spacing: tuple[float, float, float] | None) -> None:
    if target_spacing is None:
        return
    if len(target_spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in target_spacing):
        raise ValueError(
            f"{name}.target_spacing={target_spacing!r}; pass three positive mm values along (D, H, W), "
            "e.g. (3.0, 1.5, 1.5), or None to keep the file's spacing."
        )


@dataclass(frozen=True)
class CTPreprocessing:
    """CT: clip to an HU window, then z-score.

    The default reproduces nnU-Net's KiTS19 recipe: clip to [-79, 304] HU, subtract 101, divide by
    76.9 (fixed dataset statistics, so a given HU maps to the same value in every case). With
    ``mean=None`` and ``std=None`` each volume is z-scored with its own statistics after clipping.

    Attributes:
        window: ``(low, high)`` HU clip, or ``None`` for no clipping.
        mean: HU subtracted after clipping, or ``None`` for the volume mean.
        std: HU divisor after subtracting, or ``None`` for the volume standard deviation.
        target_spacing: Resample to these mm along ``(D, H, W)`` (image trilinear, label nearest), or
            ``None`` to keep the file's grid.
    """

    window: tuple[float, float] | None = KITS19_HU_WINDOW
    mean: float | None = KITS19_HU_MEAN
    std: float | None = KITS19_HU_STD
    target_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.window is not None and not (len(self.window) == 2 and self.window[0] < self.window[1]):
            raise ValueError(
                f"CTPreprocessing.window={self.window!r}; pass (low, high) HU with low < high, "
                "e.g. (-79, 304), or None."
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError(
                f"CTPreprocessing mean={self.mean!r}, std={self.std!r}: set both (fixed statistics) or "
                "neither (per-volume z-score)."
            )
        if self.std is not None and not self.std > 0:
            raise ValueError(f"CTPreprocessing.std={self.std!r}; pass a positive HU value, e.g. 76.9.")
        _check_target_spacing("CTPreprocessing", self.target_spacing)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible parameters (part of the cache key)."""
        return {"kind": "ct", **asdict(self)}

    def normalize(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Applies the window and z-score.

        Args:
            image: ``(C, D, H, W)`` HU.

        Returns:
            ``(C, D, H, W)`` float32 normalized image and the normalized value of air / the lower
            window bound (used as the background and padding value).
        """
        image = image.astype(np.float32, copy=True)
        if self.window is not None:
            np.clip(image, self.window[0], self.window[1], out=image)
        mean = float(image.mean()) if self.mean is None else float(self.mean)
        std = float(image.std()) if self.std is None else float(self.std)
        std = std if std > 0 else 1.0
        low = float(image.min()) if self.window is None else float(self.window[0])
        image -= mean
        image /= std
        return image, (low - mean) / std


MRI_MASKS = ("auto", "any", "channel", "none")
"""The values of :attr:`MRIPreprocessing.mask`."""

# nnU-Net's threshold: a z-score inside the non-zero mask when cropping to it keeps less than 3/4 of the volume.
_MASKED_FRACTION = 0.75


def nonzero_box_fraction(image: np.ndarray) -> float:
    """The share of the volume inside the bounding box of the voxels non-zero in any channel.

    Args:
        image: ``(C, D, H, W)`` intensities.

    Returns:
        A value in ``[0, 1]``; 0 for an image without a non-zero voxel.
    """
    return _box_fraction(np.any(image != 0, axis=0))  # (C, D, H, W) -> (D, H, W)


def _box_fraction(union: np.ndarray) -> float:
    """:func:`nonzero_box_fraction` of the ``(D, H, W)`` mask of voxels non-zero in any channel."""
    if not union.any():
        return 0.0
    fraction = 1.0
    for axis in range(3):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
        fraction *= (present[-1] - present[0] + 1) / union.shape[axis]
    return float(fraction)


@dataclass(frozen=True)
class MRIPreprocessing:
    """MRI: z-score each channel, over every voxel or inside a foreground mask (0 outside it).

    MRI has no absolute intensity scale, so each channel of each volume is standardized with the mean
    and standard deviation of its own voxels, or of its voxels inside a mask; voxels outside the mask are
    set to 0 (the background value). ``mask``:

    - ``"auto"`` (default): nnU-Net's rule for its z-score, per volume. When the bounding box of the voxels
      non-zero in any channel holds less than 3/4 of the volume, the zeros are background (a skull-stripped
      or masked scan) and the mask is those voxels (as ``"any"``); otherwise the zeros are dark tissue of a
      scan without an empty background (MSD hippocampus crops, prostate, heart) and every voxel counts (as
      ``"none"``). nnU-Net takes the decision once per data set, from the median of this share over its
      training cases; per volume it needs no pass over the data set and decides alike wherever a data set's
      scans are alike.
    - ``"any"``: the voxels non-zero in any channel, i.e. the skull-stripped brain (BraTS), so a zero voxel
      of one channel inside that mask is standardized like the others.
    - ``"channel"``: each channel's own non-zero voxels.
    - ``"none"``: every voxel.

    A channel that is zero everywhere inside its mask stays 0.

    Attributes:
        mask: One of :data:`MRI_MASKS`.
        target_spacing: Resample to these mm along ``(D, H, W)``, or ``None``.
    """

    mask: str = "auto"
    target_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.mask not in MRI_MASKS:
            raise ValueError(
                f"MRIPreprocessing.mask={self.mask!r}; use one of {', '.join(map(repr, MRI_MASKS))}."
            )
        _check_target_spacing("MRIPreprocessing", self.target_spacing)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible parameters (part of the cache key)."""
        return {"kind": "mri", **asdict(self)}

    def normalize(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Z-scores each channel over the voxels that :attr:`mask` selects.

        Args:
            image: ``(C, D, H, W)`` raw intensities (any numeric dtype).

        Returns:
            ``(C, D, H, W)`` float32 image (0 outside the mask) and the background value 0.
        """
        image = image.astype(np.float32, copy=True)
        mask = self.mask
        union = np.any(image != 0, axis=0) if mask in ("auto", "any") else None  # (C, D, H, W) -> (D, H, W)
        if mask == "auto":
            mask = "any" if _box_fraction(union) < _MASKED_FRACTION else "none"
        for c in range(image.shape[0]):
            inside = None if mask == "none" else union if mask == "any" else image[c] != 0
            values = image[c] if inside is None else image[c][inside]
            if values.size == 0:
                image[c] = 0.0
                continue
            std = float(values.std())
            scaled = (image[c] - float(values.mean())) / (std if std > 0 else 1.0)
            image[c] = scaled if inside is None else np.where(inside, scaled, 0.0)
        return image, 0.0


Preprocessing = CTPreprocessing | MRIPreprocessing


# Defaults per (dataset, modality); anything else falls back to the modality's entry under "".
# MSD CT tasks (liver, lung, pancreas, ...) need other windows than KiTS19: a wide window and a
# per-volume z-score are a safe default there. MRI in general (MSD tasks among them) takes nnU-Net's rule,
# which finds a masked scan by its empty background; BraTS volumes are all skull-stripped, so the brain mask
# is the voxels non-zero in any modality.
DEFAULT_PREPROCESSING: dict[tuple[str, str], CTPreprocessing | MRIPreprocessing] = {
    ("", "CT"): CTPreprocessing(),
    ("", "MRI"): MRIPreprocessing(),
    ("msd", "CT"): CTPreprocessing(window=(-1000.0, 1000.0), mean=None, std=None),
    ("brats", "MRI"): MRIPreprocessing(mask="any"),
}


def default_preprocessing(modality: str, dataset: str = "") -> Preprocessing:
    """The default preprocessing of a dataset and modality (see ``DEFAULT_PREPROCESSING``).

    Args:
        modality: ``"CT"`` or ``"MRI"``.
        dataset: ``CaseFiles.dataset`` (``"kits19"``, ``"msd"``, ``"brats"``), or ``""``.

    Raises:
        ValueError: For an unknown modality.
    """
    if modality not in ("CT", "MRI"):
        raise ValueError(f"modality={modality!r}; use 'CT' or 'MRI'.")
    return DEFAULT_PREPROCESSING.get((dataset, modality), DEFAULT_PREPROCESSING[("", modality)])


def preprocessing_from_dict(saved: dict[str, Any]) -> Preprocessing:
    """The preprocessing that ``CTPreprocessing.to_dict()`` or ``MRIPreprocessing.to_dict()`` described.

    Raises:
        ValueError: For a dict without a known ``kind`` or with fields this version does not take.
    """
    kind = saved.get("kind") if isinstance(saved, dict) else None
    if kind not in ("ct", "mri"):
        raise ValueError(f"preprocessing {saved!r} has no 'kind' 'ct' or 'mri'")
    options = {k: v for k, v in saved.items() if k != "kind"}
    for key in ("window", "target_spacing"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    try:
        return (CTPreprocessing if kind == "ct" else MRIPreprocessing)(**options)
    except TypeError as error:
        raise ValueError(
            f"preprocessing {saved!r} has fields this version does not take ({error})"
        ) from error


def ct_preprocessing_from_cases(
    training_cases: Sequence[CaseFiles],
    *,
    samples_per_case: int = 10000,
    seed: int = 1234,
    target_spacing: tuple[float, float, float] | None = None,
) -> CTPreprocessing:
    """nnU-Net's CT normalization for a dataset, measured on its training cases only.

    From each case, ``samples_per_case`` voxels with a label value above 0 are drawn (with replacement, so every
    case weighs the same); over all of them the 0.5 and 99.5 percentiles become the HU window and their mean and
    standard deviation (before clipping) the z-score, as nnU-Net's dataset fingerprint and ``CTNormalization`` do.
    Pass the training cases of the split, never validation or test cases, whose intensities must not shape the
    preprocessing.

    Args:
        training_cases: Labelled CT cases (``modality="CT"``) of the training split.
        samples_per_case: Foreground voxels drawn per case.
        seed: Seed of the draw (the result depends only on the cases, their order and the seed).
        target_spacing: Passed on to the returned :class:`CTPreprocessing`.

    Returns:
        ``CTPreprocessing(window=(p0.5, p99.5), mean, std, target_spacing)``.

    Raises:
        ValueError: If no case is given, a case is not CT or has no label (naming it), ``samples_per_case`` is
            below 1, or no case has any foreground voxel.
    """
    from .nifti import load_case  # nifti.py imports this module

    if not training_cases:
        raise ValueError("training_cases is empty; pass the labelled CT cases of the training split.")
    if samples_per_case < 1:
        raise ValueError(f"samples_per_case={samples_per_case!r}; pass a positive number, e.g. 10000.")
    raw_hu = CTPreprocessing(window=None, mean=0.0, std=1.0)
    rng = np.random.default_rng(seed)
    samples = []
    for files in training_cases:
        if files.modality != "CT" or files.label is None:
            problem = "is not CT" if files.modality != "CT" else "has no label"
            raise ValueError(
                f"case '{files.case_id}' {problem} (modality={files.modality!r}, label={files.label}); CT statistics "
                "come from the foreground of labelled CT training cases: pass only those."
            )
        case = load_case(files, raw_hu)
        foreground = case.image[
            :, case.label > 0
        ].ravel()  # (C, D, H, W) -> (C * number of foreground voxels,)
        if foreground.size:
            samples.append(rng.choice(foreground, samples_per_case, replace=True))
    if not samples:
        raise ValueError(
            f"none of the {len(training_cases)} training cases has a voxel with a label above 0; CT statistics are "
            "measured on the foreground: check the label files, or pass a CTPreprocessing with a fixed window."
        )
    pooled = np.concatenate(samples).astype(np.float64)
    low, high = (float(v) for v in np.percentile(pooled, [0.5, 99.5]))
    std = float(pooled.std())
    return CTPreprocessing(
        window=(low, high) if high > low else (low, low + 1.0),
        mean=float(pooled.mean()),
        std=std if std > 0 else 1.0,
        target_spacing=target_spacing,
    )


def target_shape(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    target_spacing: tuple[float, float, float],
) -> tuple[int, int, int]:
    """Grid shape ``(D, H, W)`` that covers the same extent at ``target_spacing`` (at least 1 voxel)."""
    return tuple(  # type: ignore[return-value]
        max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing)
    )
