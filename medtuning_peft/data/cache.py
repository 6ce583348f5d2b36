"""Decode-once cache of preprocessed cases: ``.npy`` arrays memory-mapped on later loads.

Layout: ``<cache_dir>/<case_id>-<key>/`` holding ``image.npy`` (``(C, D, H, W)`` float32),
``label.npy`` (``(D, H, W)`` uint8, absent for prediction-only cases) and ``meta.json`` (geometry,
spacing, what was hashed, array shapes/dtypes/sizes/SHA-256; JSON, never pickle).

The key is a SHA-256 of the source files' absolute paths, sizes and modification times, the case
description, the preprocessing parameters and :data:`CACHE_VERSION`; changing any of them makes a
new entry, so a stale entry is never returned. An entry is written into a temporary folder and
moved into place with one ``os.replace``, so a crash leaves either the whole entry or none (plus at
most a ``.tmp-*`` folder that :meth:`CaseCache.remove_temporaries` deletes). An entry whose metadata
or arrays do not match (truncated, edited, wrong version) is detected on load and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .case import CaseFiles, VolumeCase
from .geometry import VolumeGeometry
from .nifti import load_case
from .preprocessing import Preprocessing, default_preprocessing

# Bump when the meaning of cached arrays changes (loader, orientation or normalization code).
CACHE_VERSION = 1
TEMPORARY_PREFIX = ".tmp-"


class CacheEntryError(RuntimeError):
    """A cache entry is incomplete or does not match its metadata (it is then rebuilt)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fingerprint(path: Path) -> dict[str, Any]:
    stat = os.stat(path)  # raises FileNotFoundError for a missing file
    return {"path": str(Path(path).absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_bytes_durably(path: Path, writer) -> None:
    with open(path, "wb") as handle:
        writer(handle)
        handle.flush()
        os.fsync(handle.fileno())


class CaseCache:
    """Decode-once store of preprocessed cases.

    Args:
        cache_dir: Folder for the entries (created).
        verify_checksums: Also compare each array file's SHA-256 with the metadata on every load
            (reads the whole file; off by default, where sizes, shapes and dtypes are checked).

    Example:
        >>> cache = CaseCache("outputs/cache")
        >>> cases = cache.load_many(list_kits19_cases("data/kits19"))  # decodes once, later runs mmap
    """

    def __init__(self, cache_dir: str | Path, *, verify_checksums: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.verify_checksums = verify_checksums

    def key(self, files: CaseFiles, preprocessing: Preprocessing | None = None) -> str:
        """Hex SHA-256 identifying the preprocessed arrays of ``files`` under ``preprocessing``.

        Raises:
            FileNotFoundError: If a source file is missing.
        """
        preprocessing = preprocessing or default_preprocessing(files.modality, files.dataset)
        sources = [_fingerprint(Path(p)) for p in files.images]
        if files.label is not None:
            sources.append(_fingerprint(Path(files.label)))
        payload = {
            "cache_version": CACHE_VERSION,
            "case": files.to_dict(),
            "sources": sources,
            "preprocessing": preprocessing.to_dict(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def entry_dir(self, files: CaseFiles, preprocessing: Preprocessing | None = None) -> Path:
        """Folder of the entry for ``files`` under ``preprocessing`` (it may not exist yet)."""
        safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", files.case_id)
        return self.cache_dir / f"{safe_id}-{self.key(files, preprocessing)[:20]}"

    def load(self, files: CaseFiles, preprocessing: Preprocessing | None = None) -> VolumeCase:
        """Returns the preprocessed case, decoding the NIfTI files only if no valid entry exists.

        Args:
            files: The case's files.
            preprocessing: Default ``default_preprocessing(files.modality, files.dataset)``.

        Returns:
            :class:`VolumeCase` whose ``image`` ``(C, D, H, W)`` and ``label`` ``(D, H, W)`` are
            read-only memory maps.

        Raises:
            CaseFileMissingError, CaseLoadError: As :func:`~medtuning_peft.data.nifti.load_case`.
        """
        preprocessing = preprocessing or default_preprocessing(files.modality, files.dataset)
        try:
            entry = self.entry_dir(files, preprocessing)
        except FileNotFoundError:
            return load_case(files, preprocessing)  # raises the case-naming missing-file error
        if entry.exists():
            try:
                return self._read_entry(entry, files)
            except (CacheEntryError, OSError, ValueError, KeyError, TypeError) as error:
                warnings.warn(f"rebuilding corrupt cache entry '{entry}': {error}", stacklevel=2)
                shutil.rmtree(entry, ignore_errors=True)
        case = load_case(files, preprocessing)
        self._write_entry(entry, case, files, preprocessing)
        return self._read_entry(entry, files)

    def load_many(
        self, files: Iterable[CaseFiles], preprocessing: Preprocessing | None = None
    ) -> list[VolumeCase]:
        """:meth:`load` for each case, in order."""
        return [self.load(f, preprocessing) for f in files]

    def remove_temporaries(self, older_than_s: float = 3600.0) -> int:
        """Deletes ``.tmp-*`` folders left by crashed writers that are older than ``older_than_s``.

        Returns:
            How many were deleted.
        """
        removed = 0
        now = time.time()
        for path in self.cache_dir.glob(f"{TEMPORARY_PREFIX}*"):
            try:
                if now - path.stat().st_mtime >= older_than_s:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _write_entry(
        self, entry: Path, case: VolumeCase, files: CaseFiles, preprocessing: Preprocessing
    ) -> None:
        temporary = self.cache_dir / f"{TEMPORARY_PREFIX}{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            arrays = {"image": case.image}
            if case.label is not None:
                arrays["label"] = case.label
            described = {}
            for name, array in arrays.items():
                path = temporary / f"{name}.npy"
                _write_bytes_durably(path, lambda handle, a=array: np.save(handle, np.ascontiguousarray(a)))
                described[name] = {
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "bytes": path.stat().st_size,
                    "sha256": _sha256(path),
                }
            meta = {
                "cache_version": CACHE_VERSION,
                "key": self.key(files, preprocessing),
                "case": files.to_dict(),
                "preprocessing": preprocessing.to_dict(),
                "spacing": list(case.spacing),
                "background_value": case.background_value,
                "geometry": case.geometry.to_dict(),
                "arrays": described,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            text = json.dumps(meta, indent=1)
            _write_bytes_durably(temporary / "meta.json", lambda handle: handle.write(text.encode()))
            try:
                os.replace(temporary, entry)  # atomic: the entry appears complete or not at all
            except OSError:
                if not entry.exists():
                    raise
                # Another process finished the same entry first; keep theirs.
                shutil.rmtree(temporary, ignore_errors=True)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def _read_entry(self, entry: Path, files: CaseFiles) -> VolumeCase:
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CacheEntryError(f"meta.json unreadable ({error})") from error
        if meta.get("cache_version") != CACHE_VERSION:
            raise CacheEntryError(f"cache_version {meta.get('cache_version')} != {CACHE_VERSION}")
        arrays: dict[str, np.ndarray] = {}
        for name, info in meta["arrays"].items():
            path = entry / f"{name}.npy"
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                raise CacheEntryError(f"'{path}' is missing or has the wrong size")
            if self.verify_checksums and _sha256(path) != info["sha256"]:
                raise CacheEntryError(f"'{path}' does not match its SHA-256")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
                raise CacheEntryError(f"'{path}' has shape {array.shape} {array.dtype}, expected {info}")
            arrays[name] = array
        if "image" not in arrays or (files.label is not None) != ("label" in arrays):
            raise CacheEntryError("image or label array missing from the entry")
        return VolumeCase(
            case_id=files.case_id,
            image=arrays["image"],
            label=arrays.get("label"),
            spacing=tuple(float(s) for s in meta["spacing"]),  # type: ignore[arg-type]
            geometry=VolumeGeometry.from_dict(meta["geometry"]),
            channel_names=tuple(files.channel_names),
            label_values=tuple(files.label_values),
            label_names=dict(files.label_names),
            background_value=float(meta["background_value"]),
        )


def load_cases(
    files: Iterable[CaseFiles],
    preprocessing: Preprocessing | None = None,
    cache_dir: str | Path | None = None,
) -> list[VolumeCase]:
    """Loads cases through a :class:`CaseCache` in ``cache_dir``, or directly if ``cache_dir`` is None.

    Args:
        files: Cases from a reader's ``list_*_cases``.
        preprocessing: Default per case from its modality and dataset.
        cache_dir: Cache folder, or ``None`` to decode every time (in-memory arrays).

    Returns:
        One :class:`VolumeCase` per input, in order.
    """
    if cache_dir is None:
        return [load_case(f, preprocessing) for f in files]
    return CaseCache(cache_dir).load_many(files, preprocessing)
