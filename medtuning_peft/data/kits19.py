"""KiTS19 reader: ``<data_dir>/case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``.

Labels: 0 background, 1 kidney, 2 tumor. Cases without ``segmentation.nii.gz`` (the official test
cases 210-299) are prediction-only. KiTS19 stores the slice axis first with a permuted and flipped
affine (orientation codes I, P, L); the loader reads the affine, so the arrays come out in the
canonical orientation of ``geometry.py`` like every other dataset.

Default preprocessing: :class:`~medtuning_peft.data.preprocessing.CTPreprocessing` (clip to
[-79, 304] HU, subtract 101, divide by 76.9, as nnU-Net does for KiTS19), no resampling.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from .case import CaseFileMissingError, CaseFiles, CaseLoadError, VolumeCase, case_error, check_folder
from .nifti import load_case
from .preprocessing import Preprocessing

KITS19_LABELS: dict[int, str] = {0: "background", 1: "kidney", 2: "tumor"}
KITS19_CASE_PATTERN = re.compile(r"^case_\d{5}$")
_STEMS = ("imaging", "segmentation")


def _find(case_dir: Path, stem: str) -> Path | None:
    found = [case_dir / f"{stem}{suffix}" for suffix in (".nii.gz", ".nii")]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise CaseLoadError(
            case_error(
                case_dir.name,
                found[0],
                f"{len(found)} files claim the {stem} role: {[p.name for p in found]}",
                f"keep one {stem}.nii or {stem}.nii.gz in the case folder",
            )
        )
    return found[0] if found else None


def _looks_like_case(path: Path) -> bool:
    if path.name.startswith(".") or KITS19_CASE_PATTERN.match(path.name):
        return False
    if path.name.lower().startswith("case"):
        return True
    return any((path / f"{stem}{suffix}").is_file() for stem in _STEMS for suffix in (".nii.gz", ".nii"))


def skipped_kits19_folders(data_dir: str | Path) -> list[Path]:
    """Folders of ``data_dir`` that look like cases but are not named ``case_XXXXX`` (5 digits).

    A folder counts if its name starts with "case" (``case_00000_old``, ``Case_1``) or it holds an
    ``imaging`` or ``segmentation`` NIfTI; hidden folders do not. :func:`list_kits19_cases` skips them
    with a warning.

    Args:
        data_dir: Folder holding ``case_XXXXX`` folders.

    Returns:
        The skipped folders, sorted by name.
    """
    return sorted(p for p in Path(data_dir).iterdir() if p.is_dir() and _looks_like_case(p))


def kits19_case_files(case_dir: str | Path, *, require_label: bool = False) -> CaseFiles:
    """Describes one KiTS19 case folder.

    Args:
        case_dir: ``.../case_XXXXX`` holding ``imaging.nii(.gz)`` and optionally
            ``segmentation.nii(.gz)``.
        require_label: Raise if the segmentation is missing instead of treating the case as
            prediction-only.

    Returns:
        The case's :class:`CaseFiles` (a missing ``imaging`` file is reported when loading).

    Raises:
        CaseLoadError: If both ``.nii`` and ``.nii.gz`` exist for the imaging or the segmentation.
        CaseFileMissingError: If ``require_label`` and the segmentation is missing.
    """
    case_dir = Path(case_dir)
    image = _find(case_dir, "imaging") or case_dir / "imaging.nii.gz"
    label = _find(case_dir, "segmentation")
    if label is None and require_label:
        raise CaseFileMissingError(
            case_error(
                case_dir.name,
                case_dir / "segmentation.nii.gz",
                "label file is missing (require_label=True)",
                "use cases 00000-00209 for training, or pass require_label=False for prediction-only cases",
            )
        )
    return CaseFiles(
        case_id=case_dir.name,
        images=(image,),
        label=label,
        channel_names=("CT",),
        label_values=tuple(KITS19_LABELS),
        label_names=dict(KITS19_LABELS),
        modality="CT",
        dataset="kits19",
    )


def kits19_case_dirs(data_dir: str | Path) -> list[Path]:
    """The ``case_XXXXX`` folders of a KiTS19 data directory, sorted (what :func:`list_kits19_cases` lists).

    Warns:
        UserWarning: For folders that look like cases but are not named ``case_XXXXX`` (see
            :func:`skipped_kits19_folders`); they are not listed.

    Raises:
        FileNotFoundError: If ``data_dir`` does not exist.
        CaseLoadError: If it holds no ``case_XXXXX`` folder.
    """
    data_dir = Path(data_dir)
    check_folder(data_dir, "KiTS19 data_dir", "pass the folder of case_XXXXX.")
    case_dirs = sorted(p for p in data_dir.iterdir() if p.is_dir() and KITS19_CASE_PATTERN.match(p.name))
    skipped = [p.name for p in skipped_kits19_folders(data_dir)]
    if not case_dirs:
        raise CaseLoadError(
            f"KiTS19 data_dir '{data_dir}' holds no case_XXXXX folder"
            + (f" (skipped folders not named case_XXXXX: {skipped})" if skipped else "")
            + ". Fix: pass the folder that contains case_00000/, case_00001/, ... (in the KiTS19 "
            "repository that is 'data/')."
        )
    if skipped:
        warnings.warn(
            f"KiTS19 data_dir '{data_dir}': skipping {len(skipped)} folder(s) not named case_XXXXX "
            f"(5 digits): {skipped}. Rename a folder to case_XXXXX if it is a case, or move it out of "
            "data_dir.",
            stacklevel=3,
        )
    return case_dirs


def list_kits19_cases(data_dir: str | Path, *, require_label: bool = False) -> list[CaseFiles]:
    """Lists the ``case_XXXXX`` folders of a KiTS19 data directory, sorted by case id.

    Args:
        data_dir: Folder holding ``case_XXXXX`` folders (the KiTS19 repository's ``data/``).
        require_label: Raise for a case without segmentation instead of listing it as prediction-only.

    Returns:
        One :class:`CaseFiles` per case folder.

    Warns:
        UserWarning: For folders that look like cases but are not named ``case_XXXXX`` (see
            :func:`skipped_kits19_folders`); they are not listed.

    Raises:
        FileNotFoundError: If ``data_dir`` does not exist.
        CaseLoadError: If it holds no ``case_XXXXX`` folder, or a case has both ``.nii`` and
            ``.nii.gz`` files for the imaging or the segmentation.
        CaseFileMissingError: If ``require_label`` and a case has no segmentation.
    """
    return [kits19_case_files(d, require_label=require_label) for d in kits19_case_dirs(data_dir)]


def load_kits19_case(case: str | Path | CaseFiles, preprocessing: Preprocessing | None = None) -> VolumeCase:
    """Loads one KiTS19 case in canonical orientation.

    Args:
        case: A ``case_XXXXX`` folder or its :class:`CaseFiles`.
        preprocessing: Default ``CTPreprocessing()`` (KiTS19 window + z-score, no resampling).

    Returns:
        :class:`VolumeCase`: ``image`` ``(1, D, H, W)`` float32, ``label`` ``(D, H, W)`` uint8 in
        {0, 1, 2} or ``None``.

    Raises:
        CaseFileMissingError: If ``imaging.nii.gz`` is missing.
        CaseLoadError: For an unreadable file, a non-3D volume, NaN/Inf, image/label grid mismatch or
            label values outside {0, 1, 2}; the message names the case and the file.
    """
    files = case if isinstance(case, CaseFiles) else kits19_case_files(case)
    return load_case(files, preprocessing)
