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


# ---------------------------------------------------------------------------------------------------------
# Synthetic brain MRI in the BraTS 2019 / 2020 layouts
# ---------------------------------------------------------------------------------------------------------

BRATS_AXCODES: tuple[str, str, str] = ("L", "P", "S")
"""Voxel order of the BraTS releases (affine diag(-1, -1, 1)): x toward the patient's left, y posterior."""

# Mean intensity of each tissue per modality (flair, t1, t1ce, t2); arbitrary MRI units, int16 on disk.
_BRATS_TISSUES: dict[str, tuple[float, float, float, float]] = {
    "brain": (300.0, 400.0, 380.0, 250.0),
    "ventricles": (120.0, 150.0, 140.0, 600.0),
    "edema": (620.0, 330.0, 360.0, 560.0),
    "necrosis": (260.0, 180.0, 160.0, 650.0),
    "enhancing": (480.0, 390.0, 900.0, 420.0),
}
_BRATS_NOISE_FRACTION = 0.05


def synthetic_brats_case(
    shape: tuple[int, int, int] = (48, 64, 64),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rng: np.random.Generator | None = None,
    enhancing: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Generates one skull-stripped brain with a glioma, in canonical orientation.

    The brain is an ellipsoid with two ventricles, surrounded by zeros (as after skull stripping). The
    tumour is a whole-tumour ellipsoid of edema (label 2) holding a tumour core: an enhancing rim
    (label 4) around a necrotic centre (label 1); without ``enhancing`` (a lower-grade-like case) the
    core is all label 1 and there is no label 4. Contrasts follow the real modalities: edema bright
    in FLAIR and T2, the rim bright in T1ce, necrosis dark in T1 and T1ce.

    Args:
        shape: ``(D, H, W)`` voxels.
        spacing: mm along ``(D, H, W)``.
        rng: Random generator (default: seeded with 0).
        enhancing: Whether the tumour has an enhancing rim (label 4).

    Returns:
        ``image`` ``(4, D, H, W)`` int16 in (flair, t1, t1ce, t2) order, 0 outside the brain, and
        ``label`` ``(D, H, W)`` uint8 in {0, 1, 2, 4}.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    extent = np.asarray(shape, float) * np.asarray(spacing, float)  # mm along (D, H, W)
    grid = tuple(g * s for g, s in zip(np.ogrid[tuple(slice(0.5, n) for n in shape)], spacing))
    centre = extent / 2 + rng.uniform(-0.02, 0.02, 3) * extent
    brain_axes = extent * np.array([0.42, 0.44, 0.38]) * rng.uniform(0.95, 1.05, 3)
    brain = _ellipsoid(grid, centre, brain_axes)

    tissue = np.zeros(shape, dtype=np.int8)  # 0 outside, 1 brain, 2 ventricles, 3 edema, 4 necrosis, 5 rim
    tissue[brain] = 1
    for side in (-1.0, 1.0):
        v_centre = centre + np.array([0.05, -0.1, side * 0.12]) * brain_axes
        tissue[_ellipsoid(grid, v_centre, brain_axes * np.array([0.25, 0.3, 0.08])) & brain] = 2

    # Tumour in one hemisphere, off the midline; whole tumour 45-60% of the smallest brain semi-axis.
    side = 1.0 if rng.random() < 0.5 else -1.0
    t_centre = centre + brain_axes * np.array(
        [rng.uniform(-0.25, 0.25), rng.uniform(-0.3, 0.3), side * rng.uniform(0.3, 0.45)]
    )
    whole_radius = float(brain_axes.min()) * rng.uniform(0.45, 0.6)
    whole_axes = whole_radius * rng.uniform(0.85, 1.15, 3)
    core_axes = whole_axes * rng.uniform(0.55, 0.7)
    necrosis_axes = core_axes * rng.uniform(0.4, 0.6)
    label = np.zeros(shape, dtype=np.uint8)
    whole = _ellipsoid(grid, t_centre, whole_axes) & brain
    core = _ellipsoid(grid, t_centre, core_axes) & brain
    centre_mask = _ellipsoid(grid, t_centre, necrosis_axes) & brain
    tissue[whole], label[whole] = 3, 2
    if enhancing:
        tissue[core], label[core] = 5, 4
        tissue[centre_mask], label[centre_mask] = 4, 1
    else:
        tissue[core], label[core] = 4, 1

    image = np.zeros((4, *shape), dtype=np.float64)
    names = ("brain", "ventricles", "edema", "necrosis", "enhancing")
    # A smooth multiplicative bias field per modality, as MR scanners produce.
    unit = [g / e for g, e in zip(grid, extent)]
    for c in range(4):
        slope = rng.uniform(-0.15, 0.15, 3)
        bias = 1.0 + sum(s * (u - 0.5) for s, u in zip(slope, unit))
        means = np.array([0.0, *(_BRATS_TISSUES[n][c] for n in names)]) * rng.uniform(0.9, 1.1)
        channel = means[tissue] * bias
        channel += rng.normal(0.0, _BRATS_NOISE_FRACTION * means[1], size=shape)
        image[c] = np.where(brain, np.clip(channel, 1.0, None), 0.0)
    return np.rint(image).astype(np.int16), label


def write_synthetic_brats(
    out_dir: str | Path,
    num_cases: int = 8,
    shape: tuple[int, int, int] = (48, 64, 64),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    year: int = 2020,
    seed: int = 0,
    axcodes: tuple[str, str, str] = BRATS_AXCODES,
) -> list[Path]:
    """Writes a synthetic dataset in the BraTS 2019 or 2020 file layout, identical for identical arguments.

    - 2019: ``out_dir/MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/BraTS19_SYN_NNN_1/`` with
      ``BraTS19_SYN_NNN_1_{flair,t1,t1ce,t2,seg}.nii.gz``; every fourth case is a lower-grade-like case
      (``LGG``, no enhancing tumour, so the ET region is empty).
    - 2020: ``out_dir/MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/`` with
      ``BraTS20_Training_NNN_{flair,t1,t1ce,t2,seg}.nii`` (uncompressed, as released); every fourth
      case has no enhancing tumour.

    Images are int16, labels uint8 in {0, 1, 2, 4}, stored in the BraTS voxel order (``axcodes``,
    affine diagonal (-1, -1, 1) times the spacing). Case ``k`` depends only on ``(seed, k)``. A
    ``synthetic_brats.json`` records the arguments. Read the result with
    :func:`~medtuning_peft.data.brats.list_brats_cases`.

    Args:
        out_dir: Output folder (created).
        num_cases: Number of cases.
        shape: ``(D, H, W)`` voxels in canonical orientation (D inferior -> superior).
        spacing: mm along ``(D, H, W)``.
        year: 2019 or 2020 (file layout and names).
        seed: Random seed.
        axcodes: Voxel order of the stored files.

    Returns:
        The case folders, in case order.

    Raises:
        ValueError: For an unknown year, ``num_cases < 1`` or sizes below 16 voxels.
    """
    if year not in (2019, 2020):
        raise ValueError(f"year={year!r}; pass 2019 or 2020 (the BraTS file layout to write).")
    if num_cases < 1:
        raise ValueError(f"num_cases={num_cases}; pass at least 1.")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape={shape!r}; pass three sizes (D, H, W) of at least 16 voxels each.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={spacing!r}; pass three positive mm values along (D, H, W).")
    out_dir = Path(out_dir)
    affine = canonical_affine(shape, spacing)
    case_dirs = []
    for index in range(num_cases):
        enhancing = index % 4 != 3
        image, label = synthetic_brats_case(shape, spacing, np.random.default_rng([seed, index]), enhancing)
        if year == 2019:
            case_id = f"BraTS19_SYN_{index:03d}_1"
            grade = "HGG" if enhancing else "LGG"
            case_dir = out_dir / "MICCAI_BraTS_2019_Data_Training" / grade / case_id
            suffix = ".nii.gz"
        else:
            case_id = f"BraTS20_Training_{index + 1:03d}"
            case_dir = out_dir / "MICCAI_BraTS2020_TrainingData" / case_id
            suffix = ".nii"
        case_dir.mkdir(parents=True, exist_ok=True)
        for channel, modality in enumerate(("flair", "t1", "t1ce", "t2")):
            write_nifti_in_orientation(
                image[channel], affine, case_dir / f"{case_id}_{modality}{suffix}", axcodes
            )
        write_nifti_in_orientation(label, affine, case_dir / f"{case_id}_seg{suffix}", axcodes)
        case_dirs.append(case_dir)
    description = {
        "description": "Synthetic skull-stripped brain MRI with gliomas in the BraTS layout "
        "(medtuning_peft.data.synthetic); not patient data.",
        "labels": {
            "0": "background",
            "1": "necrotic and non-enhancing tumor core",
            "2": "peritumoral edema",
            "4": "enhancing tumor",
        },
        "year": year,
        "num_cases": num_cases,
        "shape_dhw": list(shape),
        "spacing_dhw_mm": list(spacing),
        "seed": seed,
        "axcodes": list(axcodes),
    }
    (out_dir / "synthetic_brats.json").write_text(json.dumps(description, indent=2) + "\n")
    return case_dirs
