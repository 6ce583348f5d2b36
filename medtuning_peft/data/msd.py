"""Medical Segmentation Decathlon reader: any task described by its ``dataset.json``.

``modality`` gives the channels (a 4D image stores them on its *last* axis), ``labels`` the classes,
``training`` the image/label pairs (``imagesTr/``, ``labelsTr/``) and ``test`` the images without
labels (``imagesTs/``). Intensities may be uint8 in some files and float32 in others; both are read
as float32.

Default preprocessing: tasks whose channels are all CT use
:class:`~medtuning_peft.data.preprocessing.CTPreprocessing` with a wide window [-1000, 1000] HU and
a per-volume z-score (the KiTS19 window and statistics would be wrong for, e.g., lung or liver); for
nnU-Net's normalization pass
:func:`~medtuning_peft.data.preprocessing.ct_preprocessing_from_cases` of the training split's cases. All other tasks (MRI) use
:class:`~medtuning_peft.data.preprocessing.MRIPreprocessing` with nnU-Net's rule for its z-score (``mask="auto"``):
each channel over every voxel, or, in a volume whose non-zero voxels' bounding box holds less than 3/4 of it
(brain tumour: skull-stripped), over the voxels non-zero in any channel, zero voxels outside staying 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .case import MAX_LABEL_VALUE, CaseFiles, CaseLoadError, VolumeCase, check_folder
from .nifti import load_case
from .preprocessing import Preprocessing, default_preprocessing


@dataclass(frozen=True)
class MSDTask:
    """A Decathlon task read from its ``dataset.json``.

    Attributes:
        name: ``name`` field of ``dataset.json``.
        data_dir: Folder holding ``dataset.json``.
        channel_names: Channel names in ``modality`` order (``("MRI",)``, ``("FLAIR", "T1w", ...)``).
        label_names: ``{value: name}`` from ``labels``.
        modality: ``"CT"`` if every channel is CT, else ``"MRI"``.
        training: Labelled cases.
        test: Prediction-only cases.
    """

    name: str
    data_dir: Path
    channel_names: tuple[str, ...]
    label_names: dict[int, str]
    modality: str
    training: tuple[CaseFiles, ...]
    test: tuple[CaseFiles, ...]

    @property
    def num_classes(self) -> int:
        """Number of label values K (background included)."""
        return len(self.label_names)

    def default_preprocessing(self) -> Preprocessing:
        """Wide-window per-volume CT z-score for CT tasks, ``MRIPreprocessing()`` otherwise."""
        return default_preprocessing(self.modality, "msd")


_FORMAT_FIX = "repair dataset.json to the Decathlon format"
_KEY_PATTERN = re.compile(r"[0-9]+")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _error(path: Path, where: str, problem: str, fix: str = _FORMAT_FIX) -> CaseLoadError:
    return CaseLoadError(f"'{path}': {where} {problem}. Fix: {fix}.")


def _field(data: dict[str, Any], key: str, path: Path, kind: type) -> Any:
    if key not in data:
        raise CaseLoadError(
            f"'{path}': field '{key}' is missing. Fix: use a Decathlon dataset.json with "
            "'modality', 'labels' and 'training' entries."
        )
    if not isinstance(data[key], kind):
        raise CaseLoadError(
            f"'{path}': field '{key}' is a {type(data[key]).__name__}, expected a {kind.__name__}. "
            "Fix: repair dataset.json to the Decathlon format."
        )
    return data[key]


def _int_keys(mapping: dict[str, Any], field: str, path: Path) -> dict[int, Any]:
    """``{"0": v, "1": w}`` -> ``{0: v, 1: w}``; refuses non-integer keys and keys naming one value twice."""
    result: dict[int, Any] = {}
    spelled: dict[int, str] = {}
    for key, value in mapping.items():
        if not _KEY_PATTERN.fullmatch(key):
            raise _error(
                path, f"field '{field}'", f'has key {key!r}; expected non-negative integer keys like "0", "1"'
            )
        number = int(key)
        if number in spelled:
            raise _error(
                path,
                f"field '{field}'",
                f"has keys {spelled[number]!r} and {key!r} for the same value {number}",
                f"keep one entry per value in '{field}'",
            )
        spelled[number] = key
        if not isinstance(value, str) or not value.strip():
            raise _error(path, f"{field}[{key!r}]", f"is {value!r}; expected a non-empty name string")
        result[number] = value
    return result


def _channel_names(modality: dict[str, Any], path: Path) -> tuple[str, ...]:
    channels = _int_keys(modality, "modality", path)
    if not channels:
        raise _error(
            path,
            "field 'modality'",
            "is empty; expected one entry per image channel",
            'list the channels, e.g. {"0": "CT"} or {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}',
        )
    if sorted(channels) != list(range(len(channels))):
        raise _error(
            path,
            "field 'modality'",
            f"has keys {sorted(channels)}; expected the channel indices 0..{len(channels) - 1}",
            "number the channels 0, 1, ... in the order of the image's last axis",
        )
    return tuple(channels[c] for c in range(len(channels)))


def _label_names(labels: dict[str, Any], path: Path) -> dict[int, str]:
    names = _int_keys(labels, "labels", path)
    if 0 not in names:
        raise _error(
            path,
            "field 'labels'",
            f'has keys {sorted(names)} but no "0"; expected the background label "0" and one key per class',
            'add "0": "background" to \'labels\'',
        )
    if max(names) > MAX_LABEL_VALUE:
        raise _error(
            path,
            "field 'labels'",
            f"has value {max(names)}; expected label values 0..{MAX_LABEL_VALUE} (label maps are read as uint8)",
            "renumber the classes below 256",
        )
    return dict(sorted(names.items()))


def _nifti_path(value: Any, where: str, path: Path) -> str:
    if not isinstance(value, str) or not value.endswith(_NIFTI_SUFFIXES):
        raise _error(
            path,
            where,
            f"is {value!r}; expected a .nii or .nii.gz path relative to the task folder",
        )
    return value


def _case_id(relative: str) -> str:
    name = Path(relative).name
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _entries(data: dict[str, Any], path: Path) -> list[tuple[str, str, str | None]]:
    """``training`` then ``test`` as ``(where, image, label)``, label ``None`` for test; all checked."""
    training = _field(data, "training", path, list)
    if not training:
        raise _error(
            path,
            "field 'training'",
            'is an empty list; expected at least one {"image": ..., "label": ...} entry',
            "list the labelled cases of imagesTr/ and labelsTr/",
        )
    test = _field(data, "test", path, list) if "test" in data else []
    entries: list[tuple[str, str, str | None]] = []
    for index, entry in enumerate(training):
        where = f"training[{index}]"
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise CaseLoadError(
                f"'{path}': {where}={entry!r} needs 'image' and 'label'. Fix: repair dataset.json."
            )
        image = _nifti_path(entry["image"], f"{where}.image", path)
        entries.append((where, image, _nifti_path(entry["label"], f"{where}.label", path)))
    for index, entry in enumerate(test):
        where = f"test[{index}]"
        if isinstance(entry, dict):
            if "image" not in entry:
                raise _error(
                    path, where, f"is {entry!r} without 'image'; expected a path or {{\"image\": path}}"
                )
            entries.append((where, _nifti_path(entry["image"], f"{where}.image", path), None))
        else:
            entries.append((where, _nifti_path(entry, where, path), None))
    seen: dict[str, str] = {}
    for where, image, _ in entries:
        case_id = _case_id(image)
        if case_id in seen:
            raise _error(
                path,
                where,
                f"repeats case '{case_id}' of {seen[case_id]}; expected each case once",
                "remove the duplicate entry (or give the two images different file names)",
            )
        seen[case_id] = where
    # A label map must belong to its own image: one label file listed for two images, or the label of another
    # listed case, is a slip in dataset.json that would train on wrong labels without any other sign.
    label_of: dict[str, str] = {}
    for where, image, label in entries:
        if label is None:
            continue
        key = str(PurePosixPath(label))  # "./labelsTr/a.nii.gz" and "labelsTr/a.nii.gz" are one file
        if key in label_of:
            raise _error(
                path,
                f"{where}.label",
                f"is '{label}', the label of {label_of[key]} too; expected each image to have its own label map",
                "give each training image its own label file",
            )
        label_of[key] = where
        owner = seen.get(_case_id(label))
        if owner is not None and owner != where:
            raise _error(
                path,
                f"{where}.label",
                f"is '{label}', the label file of case '{_case_id(label)}' ({owner}), not of this entry's image "
                f"'{image}'",
                "pair each image with its own label file",
            )
    return entries


def read_msd_task(data_dir: str | Path) -> MSDTask:
    """Reads a Decathlon task folder.

    Args:
        data_dir: Folder holding ``dataset.json`` (e.g. ``Task04_Hippocampus``).

    Returns:
        The :class:`MSDTask`; files are checked when a case is loaded.

    Raises:
        FileNotFoundError: If ``dataset.json`` is missing.
        CaseLoadError: If ``dataset.json`` is not valid JSON or not a Decathlon description; the
            message names the file and the field (``labels``, ``training[3].image``, ...):
            ``modality`` must map channel indices 0..C-1 to names, ``labels`` must map integer values
            0..255 (background ``"0"`` included) to names, ``training`` must be a non-empty list of
            ``{"image", "label"}`` paths and ``test`` (optional) a list of image paths, with no case
            listed twice, no label file given to two images and no image given another listed case's
            label file (``labelsTr/a_002.nii.gz`` for ``imagesTr/a_001.nii.gz``).
    """
    data_dir = Path(data_dir)
    path = data_dir / "dataset.json"
    check_folder(data_dir, "MSD task folder", "pass a Decathlon task folder (with dataset.json).")
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; pass a Decathlon task folder (with dataset.json).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaseLoadError(
            f"'{path}' is not valid JSON ({error}). Fix: repair or re-download it."
        ) from error
    if not isinstance(data, dict):
        raise _error(
            path,
            "top level",
            f"is a {type(data).__name__}; expected a JSON object with 'modality', 'labels' and 'training'",
        )
    channel_names = _channel_names(_field(data, "modality", path, dict), path)
    label_names = _label_names(_field(data, "labels", path, dict), path)
    entries = _entries(data, path)
    kind = "CT" if all(name.upper() == "CT" for name in channel_names) else "MRI"
    common = {
        "channel_names": channel_names,
        "label_values": tuple(label_names),
        "label_names": label_names,
        "modality": kind,
        "dataset": "msd",
    }
    cases = [
        CaseFiles(
            case_id=_case_id(image),
            images=(data_dir / image,),
            label=None if label is None else data_dir / label,
            **common,
        )
        for _, image, label in entries
    ]
    return MSDTask(
        name=str(data.get("name", data_dir.name)),
        data_dir=data_dir,
        channel_names=channel_names,
        label_names=label_names,
        modality=kind,
        training=tuple(c for c in cases if c.label is not None),
        test=tuple(c for c in cases if c.label is None),
    )


def list_msd_cases(data_dir: str | Path, split: str = "training") -> list[CaseFiles]:
    """Cases of a Decathlon task.

    Args:
        data_dir: Folder holding ``dataset.json``.
        split: ``"training"`` (labelled) or ``"test"`` (prediction-only).

    Returns:
        The split's :class:`CaseFiles` in ``dataset.json`` order.

    Raises:
        ValueError: For an unknown split.
    """
    if split not in ("training", "test"):
        raise ValueError(f"split={split!r}; use 'training' or 'test'.")
    task = read_msd_task(data_dir)
    return list(task.training if split == "training" else task.test)


def load_msd_case(files: CaseFiles, preprocessing: Preprocessing | None = None) -> VolumeCase:
    """Loads one Decathlon case in canonical orientation.

    Args:
        files: From :func:`list_msd_cases` / :func:`read_msd_task`.
        preprocessing: Default ``default_preprocessing(files.modality, "msd")`` (see module docstring).

    Returns:
        :class:`VolumeCase`: ``image`` ``(C, D, H, W)`` float32 with C = number of ``modality``
        entries, ``label`` ``(D, H, W)`` uint8 or ``None``.

    Raises:
        CaseFileMissingError: If a file is missing.
        CaseLoadError: As :func:`~medtuning_peft.data.nifti.load_case` (also for a channel count that
            differs from ``modality``).
    """
    return load_case(files, preprocessing)
