"""Medical Segmentation Decathlon reader: any task described by its ``dataset.json``.

``modality`` gives the channels (a 4D image stores them on its *last* axis), ``labels`` the classes,
``training`` the image/label pairs (``imagesTr/``, ``labelsTr/``) and ``test`` the images without
labels (``imagesTs/``). Intensities may be uint8 in some files and float32 in others; both are read
as float32.

Default preprocessing: tasks whose channels are all CT use
:class:`~medtuning_peft.data.preprocessing.CTPreprocessing` with a wide window [-1000, 1000] HU and
a per-volume z-score (the KiTS19 window and statistics would be wrong for, e.g., lung or liver); pass
task-specific values for best results. All other tasks (MRI) use
:class:`~medtuning_peft.data.preprocessing.MRIPreprocessing`: per-channel z-score over that channel's
non-zero voxels, zero voxels stay 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .case import CaseFiles, CaseLoadError, VolumeCase
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


def _case_id(relative: str) -> str:
    name = Path(relative).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_msd_task(data_dir: str | Path) -> MSDTask:
    """Reads a Decathlon task folder.

    Args:
        data_dir: Folder holding ``dataset.json`` (e.g. ``Task04_Hippocampus``).

    Returns:
        The :class:`MSDTask`; files are checked when a case is loaded.

    Raises:
        FileNotFoundError: If ``dataset.json`` is missing.
        CaseLoadError: If ``dataset.json`` is not valid JSON or lacks/mistypes ``modality``,
            ``labels`` or ``training``, or a label key is not an integer.
    """
    data_dir = Path(data_dir)
    path = data_dir / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; pass a Decathlon task folder (with dataset.json).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaseLoadError(
            f"'{path}' is not valid JSON ({error}). Fix: repair or re-download it."
        ) from error
    modality = _field(data, "modality", path, dict)
    labels = _field(data, "labels", path, dict)
    training = _field(data, "training", path, list)
    test = data.get("test", [])
    try:
        channel_names = tuple(str(modality[k]) for k in sorted(modality, key=int))
        label_names = {int(k): str(v) for k, v in labels.items()}
    except ValueError as error:
        raise CaseLoadError(
            f"'{path}': 'modality' and 'labels' keys must be integers like \"0\" ({error}). "
            "Fix: repair dataset.json."
        ) from error
    kind = "CT" if all(name.upper() == "CT" for name in channel_names) else "MRI"
    common = {
        "channel_names": channel_names,
        "label_values": tuple(sorted(label_names)),
        "label_names": label_names,
        "modality": kind,
        "dataset": "msd",
    }
    cases = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise CaseLoadError(
                f"'{path}': training[{index}]={entry!r} needs 'image' and 'label'. Fix: repair dataset.json."
            )
        cases.append(
            CaseFiles(
                case_id=_case_id(entry["image"]),
                images=(data_dir / entry["image"],),
                label=data_dir / entry["label"],
                **common,
            )
        )
    test_cases = []
    for entry in test:
        relative = entry["image"] if isinstance(entry, dict) else entry
        test_cases.append(
            CaseFiles(case_id=_case_id(relative), images=(data_dir / relative,), label=None, **common)
        )
    return MSDTask(
        name=str(data.get("name", data_dir.name)),
        data_dir=data_dir,
        channel_names=channel_names,
        label_names=label_names,
        modality=kind,
        training=tuple(cases),
        test=tuple(test_cases),
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
