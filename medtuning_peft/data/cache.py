"""Decode-once cache of preprocessed cases: ``.npy`` arrays memory-mapped on later loads.

Layout: ``<cache_dir>/<case_id>-<key>/`` holding ``image.npy`` (``(C, D, H, W)`` float32),
``label.npy`` (``(D, H, W)`` uint8, absent for prediction-only cases) and ``meta.json`` (geometry,
spacing, what was hashed, array shapes/dtypes/sizes/SHA-256; JSON, never pickle).

The key is a SHA-256 of the source files' absolute paths, sizes, modification and inode change times
and inode numbers, the case description, the preprocessing parameters and :data:`CACHE_VERSION`;
changing any of them makes a new entry, so a stale entry is never returned. The change time and inode
catch a file replaced with the old size and modification time (``cp -p``, ``rsync -a``): no tool can
set them back. ``chmod``, ``chown`` or a new hard link change them too and cost one rebuild. An entry
is written into a temporary folder and moved into place with one ``os.replace``, so a crash leaves
either the whole entry or none (plus at most a ``.tmp-*`` folder that
:meth:`CaseCache.remove_temporaries` deletes). An entry whose metadata or arrays do not match
(truncated, edited, wrong version) is detected on load and rebuilt.

A loaded case's arrays are memory maps, and each keeps its file open while the case is in use (two per
labelled case): loading raises the process's soft limit on open files up to the hard limit as needed, and
a hard limit too low for the data set is an error that says so (the entries are kept). A cache folder
that cannot be written (full disk, quota, read-only) costs the caching only: the decoded case is
returned from memory, with a warning.

Every load sets the entry folder's modification time (its "last used" time; no array is rewritten).
Entries made for older sources, parameters or versions are never deleted by loading:
:meth:`CaseCache.entries` lists them and :meth:`CaseCache.prune` reclaims their space (stale entries,
entries unused for a given time, least recently used entries beyond a size budget).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .case import CaseFiles, VolumeCase
from .geometry import VolumeGeometry
from .nifti import load_case
from .preprocessing import Preprocessing, default_preprocessing

# Bump when the meaning of cached arrays (loader, orientation or normalization code) or of the key
# changes. 2: sources are also keyed on their inode change time and inode number.
CACHE_VERSION = 2
TEMPORARY_PREFIX = ".tmp-"
KEY_PREFIX_LENGTH = 20  # hex digits of the key in an entry's folder name
ENTRY_NAME_PATTERN = re.compile(rf"^(?P<case_id>[A-Za-z0-9_.-]+)-(?P<key>[0-9a-f]{{{KEY_PREFIX_LENGTH}}})$")
""":func:`re.match` pattern of an entry folder name, ``<case_id>-<first 20 hex digits of the key>``."""


class CacheEntryError(RuntimeError):
    """A cache entry is incomplete or does not match its metadata (it is then rebuilt)."""


# Errors of the process or the system, not of an entry: never a reason to delete or rebuild it.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
_DESCRIPTOR_MARGIN = 256  # descriptors kept free for everything else (data loader workers, logs, sockets)


def _open_descriptors() -> int | None:
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(folder))
    return None


def _reserve_descriptors(count: int) -> None:
    """Raises the soft limit on open files, up to the hard limit, so that ``count`` more memory maps fit.

    Every memory-mapped array keeps a duplicate of its file's descriptor open for as long as it lives
    (Python's ``mmap`` before 3.13 has no way around it, and NumPy gives none), so the cases of a cache hold
    one descriptor per array: a labelled case two. The usual soft limit of 1024 would stop a data set at
    about 480 cases (BraTS 2021 has 1251). Raising the soft limit up to the hard one is what ``ulimit -n``
    does in a shell; the hard limit itself is left alone.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit on handles
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    open_now = _open_descriptors()  # None: not countable here, or no descriptor left to list them with
    needed = (open_now if open_now is not None else soft) + count + _DESCRIPTOR_MARGIN
    if needed <= soft:
        return
    # Doubling keeps the number of raises small as a data set is loaded case by case.
    wanted = max(needed, 2 * soft)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    # macOS refuses a soft limit above its kernel's cap (OPEN_MAX) even under an infinite hard limit: then what is
    # needed, at least, is tried.
    for candidate in dict.fromkeys((wanted, min(needed, wanted))):
        if candidate <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
        except (ValueError, OSError):
            continue
        break


@contextlib.contextmanager
def _named_descriptor_errors(entry: Path) -> Iterator[None]:
    """Re-raise running out of open files while handling ``entry`` as an error that says what to raise."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            limits = f"soft limit {soft}, hard limit {hard}"
        except ImportError:
            limits = "the system's limit"
        raise OSError(
            error.errno,
            f"cannot open cache entry '{entry}': {error.strerror}. Each loaded case keeps its cached arrays "
            f"memory-mapped, one open file per array (two per labelled case), and this process reached {limits} "
            "on open files. Raise the hard limit (`ulimit -Hn` as root, `LimitNOFILE=` of a systemd unit, "
            "`--ulimit nofile=` of docker) and run again; the entry itself is fine and was kept",
        ) from error


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fingerprint(path: Path) -> dict[str, Any]:
    info = os.stat(path)  # raises FileNotFoundError for a missing file
    return {
        "path": str(Path(path).absolute()),
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,  # moves on at every write or utime; no tool can set it back
        "inode": info.st_ino,  # another file renamed over the old one (rsync -a)
    }


def _key(case: dict[str, Any], preprocessing: dict[str, Any]) -> str:
    """The cache key of ``CaseFiles.to_dict()`` and ``Preprocessing.to_dict()`` (stats the sources)."""
    sources = [_fingerprint(Path(p)) for p in case["images"]]
    if case["label"] is not None:
        sources.append(_fingerprint(Path(case["label"])))
    payload = {
        "cache_version": CACHE_VERSION,
        "case": case,
        "sources": sources,
        "preprocessing": preprocessing,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _safe_case_id(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)


def _entry_name(case_id: str, key: str) -> str:
    """The folder name of a case's entry under the cache key ``key`` (:data:`ENTRY_NAME_PATTERN`)."""
    return f"{_safe_case_id(case_id)}-{key[:KEY_PREFIX_LENGTH]}"


def _mark_used(entry: Path) -> None:
    """Sets the entry folder's modification time to now: its "last used" time."""
    now = time.time_ns()
    try:
        os.utime(entry, ns=(now, now))
    except PermissionError:  # someone else's entry in a shared cache: "now" needs only write access
        with contextlib.suppress(OSError):
            os.utime(entry)
    except OSError:  # read-only cache: the entry still loads, its last use is not recorded
        pass


@dataclass(frozen=True)
class CacheEntry:
    """One entry folder of a :class:`CaseCache`, as listed by :meth:`CaseCache.entries`.

    Attributes:
        path: The entry folder ``<cache_dir>/<case_id>-<key[:20]>``.
        case_id: The case it holds.
        key: Its full hex SHA-256 key (from ``meta.json``).
        size_bytes: Total size of its files.
        last_used: When it was last loaded (or written), seconds since the epoch.
        current: ``True`` if :meth:`CaseCache.load` still returns it: its cache version and source files
            (path, size, modification and change time, inode) are unchanged and, when cases were given,
            it is their entry under the given preprocessing. ``False`` if it is stale: it will never be
            loaded again. ``None`` if unknown (a source file is missing, e.g. on an unmounted drive).
        reason: Why it is stale or unknown; empty when current.
    """

    path: Path
    case_id: str
    key: str
    size_bytes: int
    last_used: float
    current: bool | None
    reason: str = ""


@dataclass
class PruneResult:
    """What :meth:`CaseCache.prune` removed (or, with ``dry_run``, would remove) and what it kept.

    Attributes:
        removed: Removed entries, in the order they were chosen.
        kept: The other entries, least recently used first.
        dry_run: Whether nothing was deleted.
    """

    removed: list[CacheEntry] = field(default_factory=list)
    kept: list[CacheEntry] = field(default_factory=list)
    dry_run: bool = False

    @property
    def removed_bytes(self) -> int:
        """Bytes freed (or that would be freed)."""
        return sum(e.size_bytes for e in self.removed)

    @property
    def kept_bytes(self) -> int:
        """Bytes left in the entries that were kept."""
        return sum(e.size_bytes for e in self.kept)


def _write_bytes_durably(path: Path, writer) -> None:
    with open(path, "wb") as handle:
        writer(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _judge(
    meta: dict[str, Any], case_id: str, key: str, expected: dict[str, set[str]], unknown: set[str]
) -> tuple[bool | None, str]:
    """``(current, reason)`` of an entry (see :attr:`CacheEntry.current`)."""
    version = meta.get("cache_version")
    if version != CACHE_VERSION:
        return False, f"cache version {version!r}; this code reads version {CACHE_VERSION}"
    if expected.get(case_id) and case_id not in unknown:
        if key in expected[case_id]:
            return True, ""
        return False, "superseded: the given case under the given preprocessing has another key"
    try:
        now = _key(meta["case"], meta["preprocessing"])
    except FileNotFoundError as error:
        return None, f"source file not found: '{error.filename}'"
    except (OSError, KeyError, TypeError, ValueError) as error:
        return None, f"sources cannot be checked: {error}"
    if now != key:
        return False, "source files changed since it was written"
    return True, ""


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
        return _key(files.to_dict(), preprocessing.to_dict())

    def entry_dir(self, files: CaseFiles, preprocessing: Preprocessing | None = None) -> Path:
        """Folder of the entry for ``files`` under ``preprocessing`` (it may not exist yet)."""
        return self.cache_dir / _entry_name(files.case_id, self.key(files, preprocessing))

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
        _reserve_descriptors(2)  # the image and label maps
        return self._load(files, preprocessing)

    def load_many(
        self, files: Iterable[CaseFiles], preprocessing: Preprocessing | None = None
    ) -> list[VolumeCase]:
        """:meth:`load` for each case, in order."""
        files = list(files)
        _reserve_descriptors(2 * len(files))  # once for the whole list: counting open files lists them all
        return [self._load(f, preprocessing) for f in files]

    def _load(self, files: CaseFiles, preprocessing: Preprocessing | None) -> VolumeCase:
        preprocessing = preprocessing or default_preprocessing(files.modality, files.dataset)
        try:
            key = self.key(files, preprocessing)
        except FileNotFoundError:
            return load_case(files, preprocessing)  # raises the case-naming missing-file error
        entry = self.cache_dir / _entry_name(files.case_id, key)
        with _named_descriptor_errors(entry):
            if entry.exists():
                try:
                    case = self._read_entry(entry, files)
                except (CacheEntryError, OSError, ValueError, KeyError, TypeError) as error:
                    if isinstance(error, OSError) and error.errno in _RESOURCE_ERRNOS:
                        raise  # the process's limits, not the entry's fault: kept
                    warnings.warn(f"rebuilding corrupt cache entry '{entry}': {error}", stacklevel=3)
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    _mark_used(entry)
                    return case
            case = load_case(files, preprocessing)
            # Keyed on the sources as they were before decoding: a file edited meanwhile makes the entry stale.
            try:
                self._write_entry(entry, key, case, files, preprocessing)
            except OSError as error:
                if error.errno in _RESOURCE_ERRNOS:
                    raise
                # A full disk, a quota or a read-only shared cache: the case is decoded, so it is used from memory.
                warnings.warn(
                    f"cannot write cache entry '{entry}' ({error}); case '{files.case_id}' is used from memory "
                    "this time and decoded again next time",
                    stacklevel=3,
                )
                return case
            return self._read_entry(entry, files)

    def entries(
        self, cases: Iterable[CaseFiles] | None = None, preprocessing: Preprocessing | None = None
    ) -> list[CacheEntry]:
        """The complete entries in the cache folder, least recently used first.

        A folder counts as an entry only if it is a real folder (not a symbolic link) named
        ``<case_id>-<key[:20]>`` (:data:`ENTRY_NAME_PATTERN`) whose ``meta.json`` parses and names that
        case id and key, and it holds only regular files: ``meta.json`` and the ``<name>.npy`` arrays the
        metadata lists. Anything else in the cache folder (``.tmp-*`` folders of writers, user files,
        links) is not listed, so :meth:`prune` never deletes it.

        Args:
            cases: The cases in use. An entry with one of their case ids is current only if it is the
                entry :meth:`load` returns for that case under ``preprocessing``; entries of other case
                ids are judged on their own cache version and source files.
            preprocessing: As :meth:`load` (default per case); only together with ``cases``.

        Returns:
            One :class:`CacheEntry` per entry folder, least recently used first.

        Raises:
            ValueError: If ``preprocessing`` is given without ``cases``.
            OSError: If the cache folder cannot be listed.
        """
        if preprocessing is not None and cases is None:
            raise ValueError(
                "CaseCache.entries: preprocessing was given without cases; pass the cases it applies to."
            )
        expected: dict[str, set[str]] = {}
        unknown: set[str] = set()  # case ids with a missing source file: their current key is unknown
        for files in cases or ():
            try:
                expected.setdefault(files.case_id, set()).add(self.key(files, preprocessing))
            except FileNotFoundError:
                unknown.add(files.case_id)
        found = []
        with os.scandir(self.cache_dir) as listing:
            for item in listing:
                entry = self._inspect(Path(item.path), expected, unknown)
                if entry is not None:
                    found.append(entry)
        return sorted(found, key=lambda e: (e.last_used, e.path.name))

    def prune(
        self,
        *,
        stale: bool = False,
        older_than_s: float | None = None,
        max_bytes: int | None = None,
        cases: Iterable[CaseFiles] | None = None,
        preprocessing: Preprocessing | None = None,
        dry_run: bool = False,
    ) -> PruneResult:
        """Deletes stale, unused or least recently used entries to reclaim disk space.

        The rules apply in this order, each to the entries the previous ones kept:

        1. ``stale``: entries that will never be loaded again (:attr:`CacheEntry.current` is ``False``):
           another cache version, changed source files, or, with ``cases``, an entry of one of their case
           ids other than the one :meth:`load` returns under ``preprocessing`` (for instance one made with
           other preprocessing parameters).
        2. ``older_than_s``: entries not loaded for longer than this many seconds.
        3. ``max_bytes``: least recently used entries until the entries total at most this many bytes.

        Only folders listed by :meth:`entries` are deleted. Each is first renamed to a ``.tmp-*`` name
        and then deleted, so an interrupted prune never leaves a half-deleted entry under an entry name
        (at most a temporary that :meth:`remove_temporaries` deletes). Folders being written are
        ``.tmp-*`` temporaries and are never touched; an entry loaded after it was listed is kept. A
        process that has an entry memory-mapped keeps reading it (POSIX); its space is freed when that
        process closes it.

        Args:
            stale: Delete the entries that are not current (rule 1).
            older_than_s: Delete the entries last used more than this many seconds ago (rule 2).
            max_bytes: Size budget of the entries in bytes (rule 3).
            cases: The cases in use, to find the entries other preprocessing made (see :meth:`entries`).
            preprocessing: As :meth:`load`; only together with ``cases``.
            dry_run: Delete nothing; return what would be deleted.

        Returns:
            :class:`PruneResult` with the removed and the kept entries.

        Raises:
            ValueError: If no rule is given, ``older_than_s`` or ``max_bytes`` is negative, or
                ``preprocessing`` is given without ``cases``.
        """
        if not stale and older_than_s is None and max_bytes is None:
            raise ValueError(
                "CaseCache.prune: nothing to prune by; pass stale=True, older_than_s or max_bytes."
            )
        if older_than_s is not None and not older_than_s >= 0:
            raise ValueError(
                f"CaseCache.prune: older_than_s={older_than_s!r}; pass a number of seconds >= 0."
            )
        if max_bytes is not None and not max_bytes >= 0:
            raise ValueError(f"CaseCache.prune: max_bytes={max_bytes!r}; pass a number of bytes >= 0.")
        now = time.time()
        result = PruneResult(dry_run=dry_run)
        kept: list[CacheEntry] = []

        def remove(entry: CacheEntry) -> bool:
            outcome = True if dry_run else self._remove(entry)
            if outcome:
                result.removed.append(entry)
            elif outcome is False:  # in use or not removable: it stays
                kept.append(entry)
            return bool(outcome)

        candidates = []
        for entry in self.entries(cases, preprocessing):  # least recently used first
            if (stale and entry.current is False) or (
                older_than_s is not None and now - entry.last_used > older_than_s
            ):
                remove(entry)
            else:
                candidates.append(entry)
        total = sum(e.size_bytes for e in [*kept, *candidates])
        for entry in candidates:
            if max_bytes is None or total <= max_bytes:
                kept.append(entry)
            elif remove(entry):
                total -= entry.size_bytes
        result.kept = sorted(kept, key=lambda e: (e.last_used, e.path.name))
        return result

    def remove_temporaries(self, older_than_s: float = 3600.0, *, dry_run: bool = False) -> int:
        """Deletes ``.tmp-*`` folders left by crashed writers that are older than ``older_than_s``.

        Args:
            older_than_s: Minimum age in seconds (younger ones may belong to a running writer).
            dry_run: Delete nothing; count what would be deleted.

        Returns:
            How many were deleted (or would be).
        """
        removed = 0
        now = time.time()
        for path in self.cache_dir.glob(f"{TEMPORARY_PREFIX}*"):
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode) and now - info.st_mtime >= older_than_s:  # never a link
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed

    def _inspect(self, path: Path, expected: dict[str, set[str]], unknown: set[str]) -> CacheEntry | None:
        """The :class:`CacheEntry` of ``path``, or None if it is not a complete entry folder."""
        if path.name.startswith(TEMPORARY_PREFIX) or ENTRY_NAME_PATTERN.match(path.name) is None:
            return None
        try:
            if not stat.S_ISDIR(path.lstat().st_mode) or not stat.S_ISREG(
                (path / "meta.json").lstat().st_mode
            ):
                return None
            meta = json.loads((path / "meta.json").read_text())
            case_id, key = meta["case"]["case_id"], meta["key"]
            if not (
                isinstance(case_id, str)
                and isinstance(key, str)
                and re.fullmatch(r"[0-9a-f]{64}", key)
                and path.name == _entry_name(case_id, key)
                and isinstance(meta["arrays"], dict)
            ):
                return None
            allowed = {"meta.json", *(f"{name}.npy" for name in meta["arrays"])}
            size = 0
            with os.scandir(path) as contents:
                for item in contents:
                    if item.name not in allowed or not item.is_file(follow_symlinks=False):
                        return None
                    size += item.stat(follow_symlinks=False).st_size
            last_used = path.lstat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):  # ValueError: bad JSON or encoding
            return None
        current, reason = _judge(meta, case_id, key, expected, unknown)
        return CacheEntry(path, case_id, key, size, last_used, current, reason)

    def _remove(self, entry: CacheEntry) -> bool | None:
        """Renames ``entry`` to a temporary name, then deletes it.

        Returns:
            True if removed; False if kept (loaded since it was listed, or not removable: warns);
            None if another process removed it meanwhile.
        """
        doomed = self.cache_dir / (
            f"{TEMPORARY_PREFIX}{entry.path.name}-removed-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        try:
            if entry.path.lstat().st_mtime != entry.last_used:
                return False  # loaded since it was listed: in use
            os.rename(entry.path, doomed)  # the entry disappears whole, then its files are deleted
        except FileNotFoundError:
            return None
        except OSError as error:
            warnings.warn(f"cannot remove cache entry '{entry.path}': {error}", stacklevel=3)
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _write_entry(
        self, entry: Path, key: str, case: VolumeCase, files: CaseFiles, preprocessing: Preprocessing
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
                "key": key,
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
            if isinstance(error, OSError) and error.errno in _RESOURCE_ERRNOS:
                raise
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
