"""Deterministic synthetic abdominal CT in the KiTS19 layout, for demos and tests without real data.

Each case is an elliptic torso in air: a subcutaneous fat ring, soft tissue, a vertebra behind the
centre, a liver on the patient's right, and two kidneys beside the spine (label 1) with one or two
tumours inside them (label 2) at a lower HU than the contrast-enhanced kidney. The left kidney sits
higher and is larger than the right one (as in most patients), so a left/right or up/down mistake in
orientation handling is detectable. Files are written slice axis first with KiTS19's permuted,
flipped affine (orientation codes I, P, L) unless another orientation is requested.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from .geometry import CANONICAL_AXCODES

# Hounsfield units of the synthetic tissues.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_LIVER = 60.0
HU_BONE = 700.0
HU_KIDNEY_RANGE = (150.0, 200.0)  # contrast-enhanced parenchyma
HU_TUMOR_RANGE = (60.0, 110.0)  # hypo-enhancing renal tumour
HU_NOISE_STD = 12.0

KITS19_AXCODES: tuple[str, str, str] = ("I", "P", "L")


def _ellipsoid(grid: tuple[np.ndarray, ...], center: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid; grid and arguments in mm along (D, H, W)."""
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, semi_axes)) <= 1.0


def synthetic_kits19_case(
    shape: tuple[int, int, int] = (48, 96, 96),
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generates one case in canonical orientation (D inferior->superior, H ant->post, W right->left).

    Args:
        shape: ``(D, H, W)`` voxels.
        spacing: mm along ``(D, H, W)``.
        rng: Random generator (default: seeded with 0).

    Returns:
        ``image`` ``(D, H, W)`` int16 HU and ``label`` ``(D, H, W)`` uint8 (0 bg, 1 kidney, 2 tumour).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    extent = np.asarray(shape, float) * np.asarray(spacing, float)  # mm along (D, H, W)
    # Voxel-centre coordinates in mm, broadcastable: (D, 1, 1), (1, H, 1), (1, 1, W).
    grid = tuple(g * s for g, s in zip(np.ogrid[tuple(slice(0.5, n) for n in shape)], spacing))
    centre = extent / 2 + np.array(
        [0.0, rng.uniform(-0.03, 0.03) * extent[1], rng.uniform(-0.03, 0.03) * extent[2]]
    )

    # Torso: elliptic cylinder along D (infinite semi-axis along D), with a fat ring.
    torso_axes = np.array([np.inf, 0.36 * extent[1], 0.45 * extent[2]]) * np.array(
        [1, *rng.uniform(0.95, 1.05, 2)]
    )
    body = np.broadcast_to(_ellipsoid(grid, centre, torso_axes), shape)
    inner = np.broadcast_to(_ellipsoid(grid, centre, torso_axes * np.array([1, 0.86, 0.9])), shape)
    image = np.full(shape, HU_AIR, dtype=np.float64)
    image[body] = HU_FAT
    image[inner] = HU_SOFT_TISSUE

    # Liver: patient's right (low W), anterior-superior.
    liver_centre = centre + np.array([0.3 * extent[0], -0.1 * torso_axes[1], -0.45 * torso_axes[2]])
    liver = _ellipsoid(
        grid, liver_centre, np.array([0.3 * extent[0], 0.5 * torso_axes[1], 0.35 * torso_axes[2]])
    )
    image[liver & inner] = HU_LIVER

    # Vertebra: posterior midline, along D.
    spine_centre = centre + np.array([0.0, 0.62 * torso_axes[1], 0.0])
    spine_axes = np.array([np.inf, 0.14 * torso_axes[1], 0.11 * torso_axes[2]])
    image[np.broadcast_to(_ellipsoid(grid, spine_centre, spine_axes), shape)] = HU_BONE

    # Kidneys beside the spine; the left one (high W) higher and larger than the right one.
    label = np.zeros(shape, dtype=np.uint8)
    kidneys = []
    for side, height, size in ((-1.0, 0.40, 0.85), (1.0, 0.60, 1.0)):
        k_centre = np.array(
            [
                height * extent[0] + rng.uniform(-0.03, 0.03) * extent[0],
                centre[1] + 0.38 * torso_axes[1] + rng.uniform(-0.04, 0.04) * torso_axes[1],
                centre[2] + side * (0.42 + rng.uniform(-0.03, 0.03)) * torso_axes[2],
            ]
        )
        k_axes = (
            size
            * rng.uniform(0.9, 1.1, 3)
            * np.array([0.21 * extent[0], 0.22 * torso_axes[1], 0.19 * torso_axes[2]])
        )
        mask = _ellipsoid(grid, k_centre, k_axes) & inner
        image[mask] = rng.uniform(*HU_KIDNEY_RANGE)
        label[mask] = 1
        kidneys.append((k_centre, k_axes))

    # One or two tumours of varied size, each centred inside a randomly chosen kidney.
    tumour_hu = rng.uniform(*HU_TUMOR_RANGE)
    for _ in range(int(rng.integers(1, 3))):
        k_centre, k_axes = kidneys[int(rng.integers(0, 2))]
        offset = rng.uniform(-0.5, 0.5, 3) * k_axes
        radius = rng.uniform(0.3, 0.8) * float(k_axes.min())
        tumour = _ellipsoid(grid, k_centre + offset, np.full(3, radius)) & _ellipsoid(
            grid, k_centre, 1.15 * k_axes
        )
        tumour &= inner
        image[tumour] = tumour_hu
        label[tumour] = 2

    image += rng.normal(0.0, HU_NOISE_STD, size=shape)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return image, label


def canonical_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """``(4, 4)`` voxel -> RAS+ affine of a canonical ``(D, H, W)`` grid centred on the origin.

    D increases toward superior (+z), H toward posterior (-y), W toward the patient's left (-x).
    """
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = spacing[0], -spacing[1], -spacing[2], 1.0
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, float) - 1) / 2)
    return affine


def write_nifti_in_orientation(
    array: np.ndarray, affine: np.ndarray, path: Path, axcodes: tuple[str, str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """Writes a canonical ``(D, H, W)`` array to ``path`` stored in the voxel order ``axcodes``.

    Returns:
        The stored array and its affine.
    """
    transform = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), nio.axcodes2ornt(axcodes))
    stored = np.ascontiguousarray(nio.apply_orientation(array, transform))  # (D, H, W) -> file order
    stored_affine = affine @ nio.inv_ornt_aff(transform, array.shape)
    image = nib.Nifti1Image(stored, stored_affine)
    image.set_data_dtype(array.dtype)
    nib.save(image, str(path))
    return stored, stored_affine


def write_synthetic_kits19(
    out_dir: str | Path,
    num_cases: int = 16,
    shape: tuple[int, int, int] = (48, 96, 96),
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
    seed: int = 0,
    num_unlabelled: int = 0,
    axcodes: tuple[str, str, str] = KITS19_AXCODES,
) -> list[Path]:
    """Writes a synthetic dataset in the KiTS19 layout, identical for identical arguments.

    ``out_dir/case_XXXXX/imaging.nii.gz`` (int16 HU) and ``segmentation.nii.gz`` (uint8: 0 bg,
    1 kidney, 2 tumour) for the first ``num_cases - num_unlabelled`` cases; the last ``num_unlabelled``
    cases have no segmentation (prediction-only, like KiTS19's test cases). Case ``k`` depends only on
    ``(seed, k)``, not on ``num_cases``. A ``synthetic_kits19.json`` records the arguments. Existing
    ``case_XXXXX`` folders beyond ``num_cases`` are left in place: write into an empty folder.

    Args:
        out_dir: Output folder (created).
        num_cases: Number of cases.
        shape: ``(D, H, W)`` voxels in canonical orientation (stored as ``axcodes``).
        spacing: mm along ``(D, H, W)``.
        seed: Random seed.
        num_unlabelled: How many of the cases are written without segmentation.
        axcodes: Voxel order of the stored files; default KiTS19's ``("I", "P", "L")`` (slice axis
            first, flipped).

    Returns:
        The case folders, sorted.

    Raises:
        ValueError: For non-positive sizes or ``num_unlabelled > num_cases``.
    """
    if num_cases < 1 or not 0 <= num_unlabelled <= num_cases:
        raise ValueError(
            f"num_cases={num_cases}, num_unlabelled={num_unlabelled}; need num_cases >= 1 and "
            "0 <= num_unlabelled <= num_cases."
        )
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape={shape!r}; pass three sizes (D, H, W) of at least 16 voxels each.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={spacing!r}; pass three positive mm values along (D, H, W).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine = canonical_affine(shape, spacing)
    case_dirs = []
    for index in range(num_cases):
        image, label = synthetic_kits19_case(shape, spacing, np.random.default_rng([seed, index]))
        case_dir = out_dir / f"case_{index:05d}"
        case_dir.mkdir(exist_ok=True)
        write_nifti_in_orientation(image, affine, case_dir / "imaging.nii.gz", axcodes)
        segmentation = case_dir / "segmentation.nii.gz"
        if index < num_cases - num_unlabelled:
            write_nifti_in_orientation(label, affine, segmentation, axcodes)
        elif segmentation.exists():
            segmentation.unlink()
        case_dirs.append(case_dir)
    description = {
        "description": "Synthetic abdominal CT in the KiTS19 layout (medtuning_peft.data.synthetic); not patient data.",
        "labels": {"0": "background", "1": "kidney", "2": "tumor"},
        "num_cases": num_cases,
        "num_unlabelled": num_unlabelled,
        "shape_dhw": list(shape),
        "spacing_dhw_mm": list(spacing),
        "seed": seed,
        "axcodes": list(axcodes),
    }
    (out_dir / "synthetic_kits19.json").write_text(json.dumps(description, indent=2) + "\n")
    return case_dirs
