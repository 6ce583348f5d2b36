"""Case records shared by every reader: where a case's files are, what a loaded case holds, errors.

A reader (``kits19.py``, ``msd.py``, ``brats.py``) only *lists* cases as :class:`CaseFiles`; one
loader (:func:`medtuning_peft.data.nifti.load_case`) decodes any of them into a :class:`VolumeCase`,
and the cache (``cache.py``) keys on the same :class:`CaseFiles`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .geometry import VolumeGeometry


MAX_LABEL_VALUE = 255  # label maps are decoded to uint8 (VolumeCase.label)


class CaseLoadError(ValueError):
    """A case's files cannot be turned into a valid volume; the message names the case and the file."""


class NoCasesError(CaseLoadError):
    """A data folder that holds no case of the layout it was read as (another layout may fit it)."""


class CaseFileMissingError(CaseLoadError, FileNotFoundError):
    """A file a case needs does not exist (also a ``FileNotFoundError``)."""


# Spellings of one MRI sequence across the BraTS releases (RSNA-ASNR-MICCAI 2021: FLAIR, T1w, T1wCE, T2w; 2023+: t2f,
# t1n, t1c, t2w), the Decathlon (FLAIR, T1w, t1gd, T2w) and other releases, after lower-casing, spelling "*" as
# "star" (T2* is T2-star, another sequence than T2) and dropping everything but letters and digits.
_SAME_CHANNEL = {"t2f": "flair", "t2flair": "flair", "t2wflair": "flair", "t1w": "t1", "t1n": "t1"}
_SAME_CHANNEL |= {"t1gd": "t1ce", "t1c": "t1ce", "t1wce": "t1ce", "t1post": "t1ce", "t1contrast": "t1ce"}
_SAME_CHANNEL |= {"t2w": "t2", "t2starw": "t2star"}


def channel_key(name: str) -> str:
    """One spelling per channel: ``"T1w"``, ``"t1n"`` and ``"T1"`` -> ``"t1"``; ``"FLAIR"``, ``"t2f"`` -> ``"flair"``;
    ``"T1wCE"``, ``"t1gd"`` -> ``"t1ce"``; ``"T2*"``, ``"T2-star"`` -> ``"t2star"`` (not ``"t2"``)."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower().replace("*", "star"))
    return _SAME_CHANNEL.get(key, key)


def channel_order(names: Sequence[str], expected: Sequence[str]) -> list[int] | None:
    """Indices into ``names`` that put them in the order of ``expected``, comparing :func:`channel_key` spellings.

    Returns:
        e.g. ``[1, 0]`` for ``names=("ADC", "T2")`` and ``expected=("T2", "ADC")``; None when ``names`` are not
        the channels of ``expected`` (other names, or as many of them).
    """
    keys, wanted = [channel_key(n) for n in names], [channel_key(n) for n in expected]
    if len(set(keys)) != len(keys) or sorted(keys) != sorted(wanted):
        return None
    return [keys.index(k) for k in wanted]


def check_folder(path: Path, what: str, fix: str) -> None:
    """Raise ``FileNotFoundError`` naming ``what`` and ``path``, and whether it is missing or a file, unless it is a
    folder; ``fix`` says what to pass instead."""
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{what} '{path}' {state}; {fix}")


def case_error(case_id: str, path: Path | str | None, problem: str, fix: str) -> str:
    """Formats an error message that names the case, the file, the problem and the fix."""
    where = f"case '{case_id}'" + (f", file '{path}'" if path is not None else "")
    return f"{where}: {problem}. Fix: {fix}"


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case and what their contents are allowed to be.

    Attributes:
        case_id: Unique case name within its dataset (``case_00012``, ``hippocampus_004``).
        images: One path per channel file. A single path may hold a 4D image whose *last* axis is the
            channel (the MSD convention); several paths are stacked in the given order (BraTS).
        label: Segmentation file, or ``None`` for a prediction-only case.
        channel_names: Name of each channel after stacking, e.g. ``("CT",)`` or
            ``("flair", "t1", "t1ce", "t2")``.
        label_values: Every value a label voxel may take, sorted, background first
            (``(0, 1, 2)`` for KiTS19, ``(0, 1, 2, 4)`` for BraTS); at most 255 when ``label`` is given
            (labels are decoded to uint8).
        label_names: Human-readable name of each label value.
        modality: ``"CT"`` or ``"MRI"``; selects the default preprocessing.
        dataset: Which reader listed the case (``"kits19"``, ``"msd"``, ``"brats"``); informational.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    channel_names: tuple[str, ...]
    label_values: tuple[int, ...]
    label_names: dict[int, str] = field(default_factory=dict, compare=False, hash=False)
    modality: str = "CT"
    dataset: str = ""

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(f"CaseFiles(case_id={self.case_id!r}): images is empty; pass at least one path.")
        if list(self.label_values) != sorted(set(self.label_values)) or self.label_values[:1] != (0,):
            raise ValueError(
                f"CaseFiles(case_id={self.case_id!r}): label_values={self.label_values} must be sorted, "
                "unique and start with background 0."
            )
        if self.label is not None and self.label_values[-1] > MAX_LABEL_VALUE:
            raise ValueError(
                f"CaseFiles(case_id={self.case_id!r}): label_values={self.label_values} go above "
                f"{MAX_LABEL_VALUE}, but label '{self.label}' is read as uint8 (VolumeCase.label); remap "
                f"the label files to values 0..{MAX_LABEL_VALUE} (e.g. 0, 1, 2, ...) and pass those."
            )
        if self.modality not in ("CT", "MRI"):
            raise ValueError(
                f"CaseFiles(case_id={self.case_id!r}): modality={self.modality!r}; use 'CT' or 'MRI'."
            )

    @property
    def has_label(self) -> bool:
        """Whether the case has a segmentation (``False`` for prediction-only cases)."""
        return self.label is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible description (absolute paths), used in cache keys and metadata."""
        return {
            "case_id": self.case_id,
            "images": [str(Path(p).absolute()) for p in self.images],
            "label": None if self.label is None else str(Path(self.label).absolute()),
            "channel_names": list(self.channel_names),
            "label_values": list(self.label_values),
            "label_names": {str(k): v for k, v in self.label_names.items()},
            "modality": self.modality,
            "dataset": self.dataset,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseFiles:
        """Inverse of :meth:`to_dict`."""
        return cls(
            case_id=data["case_id"],
            images=tuple(Path(p) for p in data["images"]),
            label=None if data["label"] is None else Path(data["label"]),
            channel_names=tuple(data["channel_names"]),
            label_values=tuple(int(v) for v in data["label_values"]),
            label_names={int(k): v for k, v in data.get("label_names", {}).items()},
            modality=data.get("modality", "CT"),
            dataset=data.get("dataset", ""),
        )


@dataclass
class VolumeCase:
    """One decoded, preprocessed case in canonical orientation.

    Canonical orientation (see ``geometry.CANONICAL_AXCODES``): D runs inferior -> superior, H
    anterior -> posterior, W patient right -> patient left.

    Attributes:
        case_id: Case name.
        image: ``(C, D, H, W)`` float32, normalized intensities (may be a read-only memory map when it
            comes from the cache).
        label: ``(D, H, W)`` uint8 with values in ``label_values``, or ``None`` (prediction-only case).
        spacing: Voxel size in mm along ``(D, H, W)`` of ``image`` (after any resampling).
        geometry: How to map arrays on this grid back onto the original file's voxel grid.
        channel_names: Name of each of the C channels.
        label_values: Allowed label values, background first.
        label_names: Name of each label value.
        background_value: Image value outside the body after normalization (CT: the normalized lower
            window bound; MRI: 0); used to pad crops.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    geometry: VolumeGeometry
    channel_names: tuple[str, ...] = ("image",)
    label_values: tuple[int, ...] = (0, 1)
    label_names: dict[int, str] = field(default_factory=dict)
    background_value: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(D, H, W)``."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        """Number of image channels C."""
        return int(self.image.shape[0])
