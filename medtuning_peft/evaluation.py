"""Whole-volume inference and segmentation metrics with each challenge's conventions.

MONAI computes the numbers (``compute_dice``, ``compute_hausdorff_distance``, ``sliding_window_inference``);
this module supplies what MONAI leaves open: which labels make up each scored region, what an empty mask
scores, and how windows and flips are combined.

Conventions (one table, :data:`CHALLENGES`):

=========  =====================  ===========================================================  =============
task       label values           regions scored (Dice and HD95 each, plus their mean)          HD95 pooling
=========  =====================  ===========================================================  =============
kits19     0 bg, 1 kidney, 2      kidney = {1, 2} (the kidney counts its tumor), tumor = {2};  ``"max"``
           tumor                  ``dice_mean`` is the KiTS19 composite Dice
brats      0, 1 NCR/NET, 2 ED,    ET = {4}, TC = {1, 4}, WT = {1, 2, 4}  (BraTS 2019 / 2020)    ``"union"``
           4 ET
msd        keys of dataset.json   one region per foreground label, named after the class       ``"max"``
           ``labels``
=========  =====================  ===========================================================  =============

HD95 pooling: both variants start from MONAI's surface distances (edge voxels = the mask minus its erosion by
the face-connected neighbourhood; for each edge voxel of one mask, the Euclidean distance in mm to the nearest
edge voxel of the other) and take the 95th percentile with linear interpolation. ``"max"`` takes it over each
direction and keeps the larger, as MONAI's ``compute_hausdorff_distance(percentile=95)`` does (DeepMind's
``surface-distance`` also keeps the larger direction, but weights each distance by its surface element's area);
``"union"`` takes it over both directions pooled, as medpy's ``hd95`` does, which
nnU-Net's BraTS evaluation runs (the organisers' CaPTk tool is separate C++ code). The two differ when
the directions have different numbers of edge voxels (:func:`hd95`). KiTS19 and the MSD rank on Dice (the
MSD also on NSD), not on HD95.

Empty masks, for every task: both empty -> Dice 1 and HD95 0 mm; only one empty -> Dice 0 and
HD95 373.13 mm (the BraTS value: the diagonal of a 240 x 240 x 155 mm volume). MONAI itself returns
NaN there. For KiTS19 this scores a case without tumour in either map as tumour Dice 1; the KiTS19 starter
code meant 0 there (its division by zero gives NaN in numpy); the official cases all have a tumour.

Label maps are single cases of shape (D, H, W) (2D (H, W) also works), numpy or torch, and ``spacing``
gives the voxel size in mm *in the same axis order as the array* (take it from the affine of the
array as loaded, not from the header's nominal axis order).

Typical use::

    probs = sliding_window_predict(model, volume, roi_size=128, flip_tta=True)  # (B, K, D, H, W)
    pred = probabilities_to_labels(probs, BRATS.label_values)[0]  # (D, H, W) in {0, 1, 2, 4}
    pred = postprocess_brats_et(pred)
    scores = evaluate_case("brats", pred, gt, spacing=(1.0, 1.0, 1.0))
    table = summarize([scores, ...])
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance

__all__ = [
    "BRATS",
    "CHALLENGES",
    "KITS19",
    "HD95_POOLINGS",
    "ONE_EMPTY_HD95_MM",
    "REFERENCE_OVERLAP",
    "ChallengeSpec",
    "dice",
    "evaluate_case",
    "get_challenge",
    "hd95",
    "msd_challenge",
    "postprocess_brats_et",
    "probabilities_to_labels",
    "sliding_window_predict",
    "summarize",
]

ArrayLike = np.ndarray | torch.Tensor

ONE_EMPTY_HD95_MM = 373.13
"""HD95 (mm) when exactly one of prediction / ground truth is empty: sqrt(240^2 + 240^2 + 155^2), the
diagonal of the BraTS volume, as used by the BraTS evaluation."""

REFERENCE_OVERLAP = 1.0 - 42 / 128
"""Window overlap of the reference recipe: 128^3 windows moved by a stride of 42 voxels.

MONAI's step is ``int(roi_size * (1 - overlap))`` = int(128 * 0.328125) = 42 exactly; for another window
size and stride use ``1 - stride / roi_size``."""

# The 8 flip combinations of the 3 spatial axes of a (B, K, D, H, W) tensor: none, D, H, W, DH, DW, HW, DHW.
_FLIP_DIMS: tuple[tuple[int, ...], ...] = tuple(
    dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)
)
_BLEND_MODES = ("gaussian", "constant")

HD95_POOLINGS = ("max", "union")
"""How :func:`hd95` combines the two directed surface-distance sets: the larger of their 95th percentiles
(``"max"``, MONAI) or the 95th percentile of both pooled (``"union"``, medpy, as nnU-Net's BraTS evaluation)."""


# --------------------------------------------------------------------------------------------------------
# Challenge table
# --------------------------------------------------------------------------------------------------------


def _check_pooling(pooling: str, name: str) -> None:
    if pooling not in HD95_POOLINGS:
        close = difflib.get_close_matches(str(pooling), HD95_POOLINGS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{name}={pooling!r} is not an HD95 pooling; valid values are {list(HD95_POOLINGS)}.{hint}"
        )


@dataclass(frozen=True)
class ChallengeSpec:
    """How one challenge turns a label map into scored regions.

    Attributes:
        name: task name, as in :data:`CHALLENGES`.
        label_values: every value a prediction or ground truth may contain, background (0) included.
        regions: region name -> the label values whose union forms the region (a binary mask).
        empty_dice: Dice when prediction and ground truth of a region are both empty.
        both_empty_hd95: HD95 in mm when both are empty.
        one_empty_hd95: HD95 in mm when exactly one is empty.
        hd95_pooling: how the two directed surface-distance sets are combined, one of :data:`HD95_POOLINGS`.
    """

    name: str
    label_values: tuple[int, ...]
    regions: Mapping[str, tuple[int, ...]]
    empty_dice: float = 1.0
    both_empty_hd95: float = 0.0
    one_empty_hd95: float = ONE_EMPTY_HD95_MM
    hd95_pooling: str = "max"

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", MappingProxyType(dict(self.regions)))  # read-only table
        _check_pooling(self.hd95_pooling, "hd95_pooling")
        if 0 not in self.label_values:
            raise ValueError(
                f"label_values of {self.name!r} must contain background 0; got {self.label_values}."
            )
        if not self.regions:
            raise ValueError(f"regions of {self.name!r} is empty; give at least one foreground region.")
        for region, values in self.regions.items():
            unknown = sorted(set(values) - set(self.label_values) | ({0} & set(values)))
            if unknown:
                raise ValueError(
                    f"region {region!r} of {self.name!r} uses label values {unknown}; regions take "
                    f"foreground values from label_values={self.label_values} (never 0)."
                )


KITS19 = ChallengeSpec(
    name="kits19",
    label_values=(0, 1, 2),
    regions={"kidney": (1, 2), "tumor": (2,)},
)
BRATS = ChallengeSpec(
    name="brats",
    label_values=(0, 1, 2, 4),
    regions={"et": (4,), "tc": (1, 4), "wt": (1, 2, 4)},
    hd95_pooling="union",
)


def msd_challenge(labels: Mapping[int | str, str] | None) -> ChallengeSpec:
    """Build the spec of one Medical Segmentation Decathlon task from its ``dataset.json`` labels.

    Every foreground label becomes one region, named after its class in lower snake case
    (``"non-enhancing tumor"`` -> ``"non_enhancing_tumor"``).

    Args:
        labels: the ``"labels"`` dict of ``dataset.json``, label value -> class name, e.g.
            ``{"0": "background", "1": "edema"}``. Keys may be ``str`` or ``int``.

    Returns:
        The :class:`ChallengeSpec` named ``"msd"``.

    Raises:
        ValueError: if ``labels`` is missing or empty, has a key that is not an integer, has no foreground
            label, or two class names give the same region name.
    """
    if labels is None:
        raise ValueError("task 'msd' needs labels: pass the 'labels' dict of the task's dataset.json.")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(
            f"labels must be the non-empty 'labels' dict of the MSD dataset.json (value -> class name, "
            f"e.g. {{'0': 'background', '1': 'edema'}}); got {labels!r}."
        )
    regions: dict[str, tuple[int, ...]] = {}
    values = {0}
    for key, class_name in labels.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"labels key {key!r} is not an integer label value; labels maps value -> class name as in "
                f"dataset.json ('1': 'edema'), not class name -> value."
            ) from None
        values.add(value)
        if value == 0:
            continue
        region = re.sub(r"[^0-9a-z]+", "_", str(class_name).lower()).strip("_") or f"label_{value}"
        if region in regions:
            raise ValueError(
                f"labels gives two classes the region name {region!r} (values {regions[region][0]} and "
                f"{value}); rename one class."
            )
        regions[region] = (value,)
    if not regions:
        raise ValueError(f"labels has no foreground label (a value other than 0); got {dict(labels)}.")
    return ChallengeSpec(name="msd", label_values=tuple(sorted(values)), regions=regions)


def _fixed(spec: ChallengeSpec) -> Callable[[Mapping[int | str, str] | None], ChallengeSpec]:
    def build(labels: Mapping[int | str, str] | None) -> ChallengeSpec:
        if labels is not None:
            raise ValueError(
                f"labels is only read by task 'msd'; the {spec.name!r} regions are fixed "
                f"({dict(spec.regions)}). Pass labels=None."
            )
        return spec

    return build


CHALLENGES: dict[str, Callable[[Mapping[int | str, str] | None], ChallengeSpec]] = {
    "kits19": _fixed(KITS19),
    "brats": _fixed(BRATS),
    "msd": msd_challenge,
}
"""Task name -> builder of its :class:`ChallengeSpec` from the optional ``labels`` dict."""


def get_challenge(task: str, labels: Mapping[int | str, str] | None = None) -> ChallengeSpec:
    """Look up the conventions of a task.

    Args:
        task: one of the keys of :data:`CHALLENGES` (``"kits19"``, ``"brats"``, ``"msd"``).
        labels: the MSD ``dataset.json`` labels dict; only for ``task="msd"``, where it is required.

    Returns:
        The task's :class:`ChallengeSpec`.

    Raises:
        ValueError: for an unknown task (with the closest valid name), for ``labels`` given to a task with
            fixed regions, or for missing / malformed MSD labels.
    """
    key = str(task).strip().lower()
    if key not in CHALLENGES:
        close = difflib.get_close_matches(key, CHALLENGES, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"task={task!r} is not a known task; valid names are {sorted(CHALLENGES)}.{hint}")
    return CHALLENGES[key](labels)


# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


# Integer dtypes that torch holds but whose comparisons (isin) are not implemented: uint16 / uint32 / uint64
# label maps, common in NIfTI files, are widened to int64.
_WIDENED = (torch.uint16, torch.uint32, torch.uint64) if hasattr(torch, "uint16") else ()


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """numpy array or tensor -> tensor (no copy when possible); unsigned dtypes wider than 8 bits become int64."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        if not x.dtype.isnative:  # big-endian NIfTI data: torch takes native byte order only
            x = x.astype(x.dtype.newbyteorder("="))
        try:
            t = torch.from_numpy(np.ascontiguousarray(x))
        except TypeError:  # numpy dtypes this torch lacks
            return torch.from_numpy(x.astype(np.int64))
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor; got {type(x).__name__}.")
    return t.to(torch.int64) if t.dtype in _WIDENED else t


def _check_pair(pred: torch.Tensor, gt: torch.Tensor, pred_name: str, gt_name: str) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"{pred_name} and {gt_name} must have the same shape; got {pred_name} {tuple(pred.shape)} and "
            f"{gt_name} {tuple(gt.shape)}. Resample the prediction onto the ground-truth grid first."
        )
    if pred.ndim not in (2, 3):
        raise ValueError(
            f"{pred_name} must be one case's spatial map (D, H, W) or (H, W); got shape {tuple(pred.shape)}. "
            f"Squeeze the batch / channel axes, or take the argmax over K first."
        )


def _as_mask(x: ArrayLike, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dtype == torch.bool:
        return t
    if not ((t == 0) | (t == 1)).all():
        values = torch.unique(t[(t != 0) & (t != 1)]).tolist()[:10]
        raise ValueError(
            f"{name} must be a binary mask (bool or 0/1); it also holds values {values}. Build the mask from "
            f"a label map first, e.g. label_map == 2."
        )
    return t != 0


def _as_label_map(x: ArrayLike, name: str, spec: ChallengeSpec) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dtype == torch.bool:  # a binary label map: 0 background, 1 the first class
        t = t.to(torch.uint8)
    allowed = torch.tensor(spec.label_values, dtype=t.dtype, device=t.device)
    inside = torch.isin(t, allowed)
    if not inside.all():
        bad = torch.unique(t[~inside]).tolist()
        hint = " BraTS 2021+ writes ET as 3: map 3 -> 4 first." if spec.name == "brats" and 3 in bad else ""
        raise ValueError(
            f"{name} holds label values {bad[:10]} outside the {spec.name!r} label set "
            f"{list(spec.label_values)}.{hint}"
        )
    return t


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    if np.ndim(spacing) != 1:
        raise ValueError(
            f"spacing must be a sequence of {ndim} voxel sizes in mm, one per axis of the label map; "
            f"got {spacing!r}."
        )
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(
            f"spacing must have one value per axis of the label map ({ndim}); got {len(values)} values "
            f"{values}. Give the voxel size in mm in the array's axis order."
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be positive finite mm; got {values}.")
    return values


# --------------------------------------------------------------------------------------------------------
# Metric primitives
# --------------------------------------------------------------------------------------------------------


def dice(pred_mask: ArrayLike, gt_mask: ArrayLike, empty_value: float = 1.0) -> float:
    """Dice coefficient 2|P & G| / (|P| + |G|) of two binary masks, computed by MONAI.

    Args:
        pred_mask: predicted mask, bool or 0/1, shape (D, H, W) or (H, W); numpy or torch.
        gt_mask: ground-truth mask of the same shape.
        empty_value: returned when both masks are empty (MONAI gives NaN there). When only one is
            empty the Dice is 0.

    Returns:
        The Dice as a Python float in [0, 1] (or ``empty_value``).

    Raises:
        TypeError: if a mask is neither a numpy array nor a tensor.
        ValueError: if the shapes differ, are not 2D / 3D, or a mask holds values other than 0 / 1.
    """
    pred, gt = _as_mask(pred_mask, "pred_mask"), _as_mask(gt_mask, "gt_mask")
    _check_pair(pred, gt, "pred_mask", "gt_mask")
    if not gt.any():
        return float(empty_value) if not pred.any() else 0.0
    gt = gt.to(pred.device)
    # (D, H, W) -> (B=1, C=1, D, H, W): MONAI's batch-first, channel-first layout.
    score = compute_dice(pred[None, None], gt[None, None], include_background=True, ignore_empty=True)
    return float(score.item())


def hd95(
    pred_mask: ArrayLike,
    gt_mask: ArrayLike,
    spacing: Sequence[float],
    both_empty: float = 0.0,
    one_empty: float = ONE_EMPTY_HD95_MM,
    pooling: str = "max",
) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between the surfaces of two binary masks.

    MONAI finds the surfaces and distances: the edge voxels of each mask (the mask minus its erosion by the
    face-connected neighbourhood, the volume border counting as background) and, for each edge voxel of one
    mask, the Euclidean distance in mm (using ``spacing``) to the nearest edge voxel of the other. The 95th
    percentile (linear interpolation) is then taken per ``pooling``:

    - ``"max"``: of each directed set, keeping the larger; MONAI's
      ``compute_hausdorff_distance(percentile=95)``.
    - ``"union"``: of both sets pooled; medpy's ``hd95``, as run by nnU-Net's BraTS evaluation.

    Example: pred one voxel, gt a column of 5 voxels along D with 2 mm slices and pred at one end. The
    distances are {0} from pred and {0, 2, 4, 6, 8} mm from gt: ``"max"`` gives 7.6 mm, ``"union"``
    (percentile of {0, 0, 2, 4, 6, 8}) gives 7.5 mm. Runs on the CPU.

    Args:
        pred_mask: predicted mask, bool or 0/1, shape (D, H, W) or (H, W); numpy or torch.
        gt_mask: ground-truth mask of the same shape.
        spacing: voxel size in mm per axis, in the masks' axis order (length 3 for (D, H, W)).
        both_empty: returned when both masks are empty (MONAI gives NaN).
        one_empty: returned when exactly one mask is empty (MONAI gives NaN); default 373.13 mm.
        pooling: ``"max"`` or ``"union"`` (:data:`HD95_POOLINGS`).

    Returns:
        HD95 in mm as a Python float.

    Raises:
        TypeError: if a mask is neither a numpy array nor a tensor.
        ValueError: if the shapes differ or are not 2D / 3D, a mask is not binary, ``spacing`` does not
            hold one positive value per axis, or ``pooling`` is unknown.
    """
    _check_pooling(pooling, "pooling")
    pred, gt = _as_mask(pred_mask, "pred_mask"), _as_mask(gt_mask, "gt_mask")
    _check_pair(pred, gt, "pred_mask", "gt_mask")
    spacing = _check_spacing(spacing, pred.ndim)
    pred_any, gt_any = bool(pred.any()), bool(gt.any())
    if not (pred_any or gt_any):
        return float(both_empty)
    if not (pred_any and gt_any):
        return float(one_empty)
    with warnings.catch_warnings():
        # MONAI 1.5+ calls its own deprecated `always_return_as_numpy` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        # MONAI crops both masks to their union's bounding box first; distances are unchanged by it.
        _, (pred_to_gt, gt_to_pred), _ = get_edge_surface_distance(
            pred.cpu(), gt.cpu(), distance_metric="euclidean", spacing=list(spacing), symmetric=True
        )
    # MONAI's compute_hausdorff_distance offers only the "max" pooling, so both poolings are taken here from
    # MONAI's distances; float64 as numpy's percentile, which medpy uses.
    pred_to_gt, gt_to_pred = torch.as_tensor(pred_to_gt).double(), torch.as_tensor(gt_to_pred).double()
    if pooling == "union":
        distance = torch.quantile(torch.cat([pred_to_gt, gt_to_pred]), 0.95)
    else:
        distance = torch.maximum(torch.quantile(pred_to_gt, 0.95), torch.quantile(gt_to_pred, 0.95))
    return float(distance)


# --------------------------------------------------------------------------------------------------------
# Per-case evaluation and summary
# --------------------------------------------------------------------------------------------------------


def evaluate_case(
    task: str,
    pred: ArrayLike,
    gt: ArrayLike,
    spacing: Sequence[float],
    labels: Mapping[int | str, str] | None = None,
    *,
    with_hd95: bool = True,
) -> dict[str, float]:
    """Score one case with the task's regions and empty-mask conventions.

    Post-processing (e.g. :func:`postprocess_brats_et`) is not applied here; apply it to ``pred`` first.

    Args:
        task: ``"kits19"``, ``"brats"`` or ``"msd"`` (see :data:`CHALLENGES`).
        pred: predicted label map of shape (D, H, W) (or (H, W)) with the task's label values, numpy or torch.
        gt: ground-truth label map of the same shape.
        spacing: voxel size in mm per axis, in the arrays' axis order.
        labels: the MSD ``dataset.json`` labels dict (value -> class name); required for ``"msd"``,
            refused for the other tasks.
        with_hd95: also compute HD95 (the slow part on large volumes).

    Returns:
        ``{"dice_<region>": ..., "dice_mean": ..., "hd95_<region>": ..., "hd95_mean": ...}`` in region order,
        HD95 in mm, pooled as the task's ``hd95_pooling`` says (brats ``"union"``, others ``"max"``).
        Regions: kits19 ``kidney, tumor`` (``dice_mean`` is the KiTS19 composite), brats ``et, tc, wt``,
        msd one per foreground class name. No value is NaN.

    Raises:
        TypeError: if ``pred`` or ``gt`` is neither a numpy array nor a tensor.
        ValueError: for an unknown task or bad ``labels`` (see :func:`get_challenge`), shape mismatch,
            label values outside the task's set, or ``spacing`` of the wrong length.
    """
    spec = get_challenge(task, labels)
    pred_t, gt_t = _as_tensor(pred, "pred"), _as_tensor(gt, "gt")
    _check_pair(pred_t, gt_t, "pred", "gt")
    spacing = _check_spacing(spacing, pred_t.ndim)
    pred_t, gt_t = _as_label_map(pred_t, "pred", spec), _as_label_map(gt_t, "gt", spec)
    gt_t = gt_t.to(pred_t.device)

    masks = {}
    for region, values in spec.regions.items():
        allowed_pred = torch.tensor(values, dtype=pred_t.dtype, device=pred_t.device)
        allowed_gt = torch.tensor(values, dtype=gt_t.dtype, device=gt_t.device)
        masks[region] = (torch.isin(pred_t, allowed_pred), torch.isin(gt_t, allowed_gt))

    scores = {f"dice_{r}": dice(p, g, empty_value=spec.empty_dice) for r, (p, g) in masks.items()}
    scores["dice_mean"] = float(np.mean(list(scores.values())))
    if with_hd95:
        distances = {
            f"hd95_{r}": hd95(
                p,
                g,
                spacing,
                both_empty=spec.both_empty_hd95,
                one_empty=spec.one_empty_hd95,
                pooling=spec.hd95_pooling,
            )
            for r, (p, g) in masks.items()
        }
        scores.update(distances)
        scores["hd95_mean"] = float(np.mean(list(distances.values())))
    return scores


def summarize(per_case: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and median of every metric over cases.

    NaN or infinite values are refused, not skipped: dropping a case from one metric would bias that
    metric toward the cases a model gets right, and under the conventions of :func:`evaluate_case` no
    value is ever NaN, so one signals a bug upstream.

    Args:
        per_case: one dict per case, as returned by :func:`evaluate_case`; all with the same keys.

    Returns:
        ``{metric: {"mean": ..., "std": ..., "median": ...}}`` in the key order of the first case. ``std`` is
        the population standard deviation (numpy's default, ``ddof=0``).

    Raises:
        ValueError: if ``per_case`` is empty, the cases have different keys, or a value is NaN / infinite.
    """
    if len(per_case) == 0:
        raise ValueError("per_case is empty; pass one metrics dict per evaluated case.")
    keys = list(per_case[0])
    for index, case in enumerate(per_case):
        if set(case) != set(keys):
            missing, extra = sorted(set(keys) - set(case)), sorted(set(case) - set(keys))
            raise ValueError(
                f"per_case[{index}] has different metrics from per_case[0]: missing {missing}, extra "
                f"{extra}. Evaluate every case with the same task and options."
            )
        for key in keys:
            if not math.isfinite(float(case[key])):
                raise ValueError(
                    f"per_case[{index}][{key!r}] is {case[key]}; every metric must be finite. Use "
                    f"evaluate_case, whose empty-mask conventions never give NaN or inf."
                )
    summary = {}
    for key in keys:
        values = np.asarray([float(case[key]) for case in per_case], dtype=np.float64)
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "median": float(np.median(values)),
        }
    return summary


def postprocess_brats_et(
    pred: ArrayLike, min_voxels: int = 500, counted_on: ArrayLike | None = None
) -> ArrayLike:
    """Relabel a small predicted enhancing tumor (label 4) as necrosis / non-enhancing tumor (label 1).

    A case whose prediction has fewer than ``min_voxels`` ET voxels most often has no ET at all, where any
    ET voxel costs Dice 0 and HD95 373.13 mm; relabelling keeps them in the tumor core.

    Args:
        pred: one case's BraTS label map (D, H, W) with values in {0, 1, 2, 4}, numpy or torch. Not modified.
        min_voxels: ET is kept when it has at least this many voxels; 0 disables the rule.
        counted_on: the same prediction on the grid whose voxels ``min_voxels`` counts, when ``pred`` is on
            another: the image file's grid for a prediction made on a grid resampled to a target spacing
            (``case.geometry.to_original(pred)``); 500 voxels of 2 mm are 4,000 of 1 mm. Default: ``pred``.

    Returns:
        A relabelled copy of the same type, dtype and shape as ``pred``.

    Raises:
        TypeError: if ``pred`` is neither a numpy array nor a tensor, or ``min_voxels`` is not an int.
        ValueError: if ``min_voxels`` is negative or ``pred`` holds values outside {0, 1, 2, 4}.
    """
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, int | np.integer):
        raise TypeError(f"min_voxels must be an int number of voxels; got {min_voxels!r}.")
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0 (0 disables the rule); got {min_voxels}.")
    labels = _as_label_map(pred, "pred", BRATS)
    counted = labels if counted_on is None else _as_label_map(counted_on, "counted_on", BRATS)
    out = pred.copy() if isinstance(pred, np.ndarray) else pred.clone()
    if int((counted == 4).sum()) < min_voxels:
        out[out == 4] = 1
    return out


# --------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------


def _window_probabilities(
    window: torch.Tensor,
    model: torch.nn.Module,
    flip_dims: tuple[tuple[int, ...], ...],
    num_classes: int | None,
) -> torch.Tensor:
    """(B, C, D, H, W) windows -> (B, K, D, H, W) softmax, averaged over flips (flip, predict, unflip)."""
    total = None
    for dims in flip_dims:
        logits = model(window.flip(dims) if dims else window)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"model must return one logits tensor (B, K, D, H, W); got {type(logits).__name__}. Wrap "
                f"models with deep supervision to return the full-resolution output only."
            )
        expected = (window.shape[0], num_classes or logits.shape[1], *window.shape[2:])
        if logits.ndim != 5 or tuple(logits.shape) != expected or logits.shape[1] < 2:
            raise ValueError(
                f"model output has shape {tuple(logits.shape)} for a window of shape {tuple(window.shape)}; "
                f"expected logits (B, K, D, H, W) = {expected} at the window's resolution with K >= 2 "
                f"classes (num_classes={num_classes})."
            )
        probs = torch.softmax(logits.float(), dim=1)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    return total / len(flip_dims)


def sliding_window_predict(
    model: torch.nn.Module,
    volume: torch.Tensor,
    roi_size: int | Sequence[int],
    overlap: float = REFERENCE_OVERLAP,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    flip_tta: bool = False,
    num_classes: int | None = None,
    *,
    device: torch.device | str | None = None,
    padding_value: float = 0.0,
) -> torch.Tensor:
    """Class probabilities of a whole volume from a model that sees fixed-size windows.

    Each window's logits go through a softmax; overlapping windows are blended by MONAI's
    ``sliding_window_inference`` (Gaussian weights, sigma = roi / 8, favour window centres). A ``roi_size``
    larger than the volume works: MONAI pads the input with ``padding_value`` and crops the output back.

    With ``flip_tta`` every window is also predicted flipped along each of the 8 combinations of the D, H, W
    axes, each softmax is flipped back and the 8 are averaged (8x the compute). The model is put in eval
    mode for the call and its previous mode restored; gradients are off.

    Args:
        model: maps (B, C, D, H, W) inputs to logits (B, K, D, H, W) of the same spatial size.
        volume: (B, C, D, H, W) float tensor (a numpy array is converted; integer and float64 input, e.g.
            nibabel's ``get_fdata()``, is cast to float32).
        roi_size: window size, one int for a cube or (D, H, W). Reference recipe: 128.
        overlap: fraction of a window shared with the next one, in [0, 1). The default
            :data:`REFERENCE_OVERLAP` = 1 - 42/128 = 0.671875 is the reference stride of 42 for 128^3 windows.
        sw_batch_size: windows per model call.
        mode: ``"gaussian"`` or ``"constant"`` (plain average) blending.
        flip_tta: average over the 8 flip combinations.
        num_classes: if given, the number K of output channels the model must return.
        device: where the stitched output lives (default: the volume's device); e.g. ``"cpu"`` keeps a
            whole-volume output out of GPU memory. Windows run on the model's device.
        padding_value: the input value outside the volume, where a side of ``roi_size`` exceeds it. Pass the
            value training crops were padded with, ``VolumeCase.background_value`` (normalized air for CT,
            0 for MRI): the model should see at the border what it saw in training.

    Returns:
        Probabilities of shape (B, K, D, H, W), float32, summing to 1 over K.

    Raises:
        TypeError: if ``volume`` is not a tensor / array, or the model does not return one tensor.
        ValueError: if ``volume`` is not 5D, ``roi_size``, ``overlap``, ``sw_batch_size`` or ``mode`` is
            invalid, or the model output does not have the expected shape (incl. ``num_classes``).
    """
    volume = _as_tensor(volume, "volume")
    if volume.ndim != 5:
        raise ValueError(
            f"volume must have shape (B, C, D, H, W); got {tuple(volume.shape)}. Add batch / channel axes "
            f"with volume[None] as needed."
        )
    if volume.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # integers, float64 (get_fdata)
        volume = volume.float()
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(roi_size)
    if len(roi) != 3 or not all(isinstance(r, int | np.integer) and r > 0 for r in roi):
        raise ValueError(
            f"roi_size must be a positive int or three positive ints (D, H, W); got {roi_size!r}."
        )
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1); got {overlap}. For a stride s use 1 - s / roi_size.")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be an int >= 1; got {sw_batch_size!r}.")
    if mode not in _BLEND_MODES:
        close = difflib.get_close_matches(str(mode), _BLEND_MODES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"mode={mode!r} is not a blend mode; valid modes are {list(_BLEND_MODES)}.{hint}")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included) for a softmax; got {num_classes}.")

    parameter = next(model.parameters(), None)
    sw_device = parameter.device if parameter is not None else volume.device
    flip_dims = _FLIP_DIMS if flip_tta else ((),)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = sliding_window_inference(
                volume,
                roi_size=roi,
                sw_batch_size=sw_batch_size,
                predictor=partial(
                    _window_probabilities, model=model, flip_dims=flip_dims, num_classes=num_classes
                ),
                overlap=overlap,
                mode=mode,
                cval=float(padding_value),
                sw_device=sw_device,
                device=device if device is not None else volume.device,
            )
    finally:
        model.train(was_training)
    return torch.as_tensor(probs)


def probabilities_to_labels(probs: torch.Tensor, label_values: Sequence[int] | None = None) -> torch.Tensor:
    """Argmax over classes, optionally mapping channel index k to ``label_values[k]``.

    Args:
        probs: (B, K, D, H, W) probabilities or logits.
        label_values: the label written for each of the K channels, e.g. ``BRATS.label_values`` = (0, 1, 2, 4)
            for a model whose channel 3 predicts ET. Default: the channel index itself.

    Returns:
        (B, D, H, W) int64 label maps.

    Raises:
        ValueError: if ``probs`` is not 5D or ``label_values`` does not have K entries.
    """
    if probs.ndim != 5:
        raise ValueError(f"probs must have shape (B, K, D, H, W); got {tuple(probs.shape)}.")
    index = probs.argmax(dim=1)  # (B, K, D, H, W) -> (B, D, H, W)
    if label_values is None:
        return index
    if len(label_values) != probs.shape[1]:
        raise ValueError(
            f"label_values must give one label per class channel (K={probs.shape[1]}); got "
            f"{len(label_values)} values {tuple(label_values)}."
        )
    return torch.as_tensor(label_values, dtype=torch.int64, device=index.device)[index]
