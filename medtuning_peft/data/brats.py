"""BraTS 2019 / 2020 reader: four MRI modalities (flair, t1, t1ce, t2) and a segmentation per case.

Layouts (either may sit one or two folders below ``data_dir``):

- 2019: ``HGG/BraTS19_<id>/BraTS19_<id>_{flair,t1,t1ce,t2,seg}.nii.gz`` (and ``LGG/``).
- 2020: ``BraTS20_Training_NNN/BraTS20_Training_NNN_{flair,t1,t1ce,t2,seg}.nii``; validation cases
  (``BraTS20_Validation_NNN``) have no ``seg`` and are prediction-only.

Files are matched by their modality suffix, ``.nii`` or ``.nii.gz``, case-insensitively, not by the
folder name, because the official releases are irregular: BraTS20_Training_355's segmentation is
``W39_1998.09.19_Segm.nii``. A ``*_Segm.nii(.gz)`` file, or failing that the only other NIfTI whose
name contains "seg", is taken as the segmentation.

Channels are stacked in the fixed order (flair, t1, t1ce, t2). Labels: 0 background, 1 necrotic /
non-enhancing tumour core, 2 peritumoral edema, 4 enhancing tumour (the datasets in ``transforms.py``
turn them into class indices 0-3). Default preprocessing: per-modality z-score inside the brain mask
(voxels non-zero in any modality), background 0.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .case import (
    CaseFileMissingError,
    CaseFiles,
    CaseLoadError,
    NoCasesError,
    VolumeCase,
    case_error,
    check_folder,
)
from .nifti import load_case
from .preprocessing import Preprocessing

BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
BRATS_LABELS: dict[int, str] = {
    0: "background",
    1: "necrotic and non-enhancing tumor core",
    2: "peritumoral edema",
    4: "enhancing tumor",
}
_ROLE_PATTERN = re.compile(r"_(flair|t1ce|t1|t2|seg|segm)\.nii(\.gz)?$", re.IGNORECASE)
_NIFTI_PATTERN = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_SEARCH_DEPTH = 3  # data_dir/<release>/<HGG|LGG>/<case>


def _is_nifti_file(path: Path) -> bool:
    """A NIfTI file of the case, not a macOS metadata file (``._<name>``, also found under ``__MACOSX/``)."""
    return path.is_file() and _NIFTI_PATTERN.search(path.name) is not None and not path.name.startswith("._")


def _role(name: str) -> str | None:
    match = _ROLE_PATTERN.search(name)
    if match is None:
        return None
    role = match.group(1).lower()
    return "seg" if role == "segm" else role


def brats_case_files(case_dir: str | Path, *, require_label: bool = False) -> CaseFiles:
    """Describes one BraTS case folder.

    Args:
        case_dir: Folder holding the case's NIfTI files.
        require_label: Raise if the segmentation is missing instead of treating the case as
            prediction-only.

    Returns:
        :class:`CaseFiles` with the four modalities in (flair, t1, t1ce, t2) order; a missing modality
        is listed under its expected name and reported when loading.

    Raises:
        CaseLoadError: If two files claim the same modality (e.g. both ``.nii`` and ``.nii.gz``).
        CaseFileMissingError: If ``require_label`` and no segmentation is found.
    """
    case_dir = Path(case_dir)
    case_id = case_dir.name
    found: dict[str, list[Path]] = {}
    unmatched: list[Path] = []
    for path in sorted(case_dir.iterdir()):
        if not _is_nifti_file(path):
            continue
        role = _role(path.name)
        if role is None:
            unmatched.append(path)
        else:
            found.setdefault(role, []).append(path)
    if "seg" not in found:
        guesses = [p for p in unmatched if "seg" in p.name.lower()]
        if len(guesses) == 1:
            found["seg"] = guesses
    for role, paths in found.items():
        if len(paths) > 1:
            raise CaseLoadError(
                case_error(
                    case_id,
                    paths[0],
                    f"{len(paths)} files claim the {role} role: {[p.name for p in paths]}",
                    "keep one file per modality in the case folder",
                )
            )
    label = found.get("seg", [None])[0]
    if label is None and require_label:
        raise CaseFileMissingError(
            case_error(
                case_id,
                case_dir / f"{case_id}_seg.nii.gz",
                "segmentation file is missing (require_label=True)",
                "restore the *_seg.nii(.gz) file, or pass require_label=False for prediction-only cases",
            )
        )
    images = tuple(found.get(m, [case_dir / f"{case_id}_{m}.nii.gz"])[0] for m in BRATS_MODALITIES)
    return CaseFiles(
        case_id=case_id,
        images=images,
        label=label,
        channel_names=BRATS_MODALITIES,
        label_values=tuple(BRATS_LABELS),
        label_names=dict(BRATS_LABELS),
        modality="MRI",
        dataset="brats",
    )


def is_brats_case_dir(path: str | Path) -> bool:
    """Whether ``path`` is one BraTS case folder (it holds a ``*_{flair,t1,t1ce,t2}.nii(.gz)`` file)."""
    path = Path(path)
    try:
        return any(_role(p.name) in BRATS_MODALITIES for p in path.iterdir() if _is_nifti_file(p))
    except OSError:
        return False


def is_one_brats_case(path: str | Path) -> bool:
    """Whether ``path`` is one case on its own: its sequence files share one case name, the folder's or one with
    several sequences. Several patients' scans of one sequence (``a_t1.nii.gz``, ``b_t1.nii.gz``) are not."""
    path = Path(path)
    try:
        names = [p.name for p in path.iterdir() if _is_nifti_file(p) and not p.name.startswith(".")]
    except OSError:
        return False
    sequences = {
        (name[: match.start()], _role(name))
        for name in names
        if (match := _ROLE_PATTERN.search(name)) is not None and _role(name) in BRATS_MODALITIES
    }
    cases = {case for case, _ in sequences}
    return len(cases) == 1 and (len(sequences) > 1 or cases == {path.name})


def brats_case_dirs(data_dir: str | Path) -> list[Path]:
    """The BraTS case folders under ``data_dir``, sorted by case id (what :func:`list_brats_cases` lists).

    A case folder is any folder up to three levels below ``data_dir`` holding a file named
    ``*_{flair,t1,t1ce,t2}.nii(.gz)``; symbolic links to folders are followed (each folder is listed once).

    Raises:
        FileNotFoundError: If ``data_dir`` does not exist.
        NoCasesError: If no case folder is found (a CaseLoadError).
        CaseLoadError: If two case folders share a name.
    """
    data_dir = Path(data_dir)
    check_folder(data_dir, "BraTS data_dir", "pass the release folder.")
    case_dirs: list[Path] = []
    base_depth = len(data_dir.parts)
    visited: set[str] = set()
    # Symlinked folders are followed (a subset or fold folder made of links to the release's cases); the search
    # depth bounds the walk and each real folder is visited once, so a link back to an ancestor ends it.
    for root, dirs, _ in os.walk(data_dir, followlinks=True):
        root_path = Path(root)
        real = os.path.realpath(root_path)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        dirs.sort()
        if is_brats_case_dir(root_path):
            case_dirs.append(root_path)
            dirs.clear()  # a case folder holds no cases
        elif len(root_path.parts) - base_depth >= _SEARCH_DEPTH:
            dirs.clear()
    if not case_dirs:
        raise NoCasesError(
            f"BraTS data_dir '{data_dir}' holds no case folder (a folder with *_flair.nii(.gz), "
            "*_t1.nii(.gz), ...). Fix: pass the release folder, e.g. MICCAI_BraTS2020_TrainingData."
        )
    names: dict[str, Path] = {}
    for path in case_dirs:
        if path.name in names:
            raise CaseLoadError(
                f"BraTS case '{path.name}' appears twice: '{names[path.name]}' and '{path}'. "
                "Fix: keep one copy of each case under data_dir."
            )
        names[path.name] = path
    return [names[n] for n in sorted(names)]


def list_brats_cases(data_dir: str | Path, *, require_label: bool = False) -> list[CaseFiles]:
    """Finds BraTS 2019 (``HGG/``, ``LGG/``) or 2020 case folders under ``data_dir``.

    A case folder is any folder up to three levels below ``data_dir`` holding a file named
    ``*_{flair,t1,t1ce,t2}.nii(.gz)``; symbolic links to folders are followed (each folder is listed once).

    Args:
        data_dir: Release folder (e.g. ``MICCAI_BraTS2020_TrainingData``) or a folder above it.
        require_label: Raise for a case without segmentation instead of listing it as prediction-only.

    Returns:
        One :class:`CaseFiles` per case, sorted by case id.

    Raises:
        FileNotFoundError: If ``data_dir`` does not exist.
        NoCasesError: If no case folder is found (a CaseLoadError).
        CaseLoadError: If two case folders share a name, or a case holds two files of one role.
        CaseFileMissingError: If ``require_label`` and a case has no segmentation.
    """
    return [brats_case_files(d, require_label=require_label) for d in brats_case_dirs(data_dir)]


def load_brats_case(case: str | Path | CaseFiles, preprocessing: Preprocessing | None = None) -> VolumeCase:
    """Loads one BraTS case in canonical orientation.

    Args:
        case: A case folder or its :class:`CaseFiles`.
        preprocessing: Default ``MRIPreprocessing(mask="any")`` (z-score inside the brain mask).

    Returns:
        :class:`VolumeCase`: ``image`` ``(4, D, H, W)`` float32 (flair, t1, t1ce, t2), ``label``
        ``(D, H, W)`` uint8 in {0, 1, 2, 4} or ``None``.

    Raises:
        CaseFileMissingError: If a modality file is missing (the message names it).
        CaseLoadError: For an unreadable file, a non-3D volume, NaN/Inf, modalities or segmentation on
            different grids (shape or affine), or label values outside {0, 1, 2, 4}.
    """
    files = case if isinstance(case, CaseFiles) else brats_case_files(case)
    return load_case(files, preprocessing)
