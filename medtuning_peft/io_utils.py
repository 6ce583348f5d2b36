"""Crash-safe file writes and integrity checks of saved files; standard library only.

Every file the package writes goes to a temporary name in the target's directory, is flushed and
``fsync``-ed, then renamed over the target with :func:`os.replace`. A rename within one file system is
atomic, so a crash (exception, kill, power loss) leaves either the previous file or none, never a
half-written one. Temporary names start with :data:`PARTIAL_PREFIX` so readers can skip them and
:func:`remove_partials` can clean up after a crash.

Typical use::

    with atomic_path("out/case_001.nii.gz") as tmp:    # a library that writes to a path
        nib.save(image, tmp)
    with atomic_open("out/metrics.csv", "w") as f:      # a file object
        f.write(text)
    atomic_write_json("out/metrics.json", metrics)
    with atomic_directory("out/model") as tmp:          # a whole directory
        model.save_pretrained(tmp)

and, before loading weights, :func:`check_safetensors` detects a truncated or corrupt file without
reading its tensors.

What these write gets the permissions a plain ``open()`` / ``mkdir()`` would give it: the umask's default
for a new file or folder, an overwritten file's own mode. Writers that create private files (safetensors
0.8's ``save_file``, which transformers' and accelerate's savers call, makes every file 0600) would otherwise
leave a model that colleagues on the same machine cannot read.

This module imports only the standard library, so it is cheap to import and safe to use anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "PARTIAL_PREFIX",
    "CorruptFileError",
    "atomic_directory",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_json_file",
    "check_safetensors",
    "check_writable",
    "default_permissions",
    "fsync_directory",
    "is_partial",
    "read_json_file",
    "remove_partials",
    "safetensors_header",
]

PARTIAL_PREFIX = ".~partial-"
"""Prefix of temporary names: ``.~partial-<token>.<final name>`` (hidden; keeps the final extension)."""

# safetensors: 8-byte little-endian header length, JSON header, then the tensor bytes.
_SAFETENSORS_MAX_HEADER = 100_000_000
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}


class CorruptFileError(ValueError):
    """A saved file is truncated, corrupt or not of the expected format; the message names the file."""


def is_partial(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary file or directory left by an interrupted atomic write."""
    return Path(path).name.startswith(PARTIAL_PREFIX)


def _partial_sibling(target: Path) -> Path:
    return target.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:12]}.{target.name}")


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flushes a directory entry (a rename in it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _umask() -> int:
    """The process umask. Linux reports it; elsewhere ``os.umask`` must set it to read it, so it is set to a
    restrictive value for that instant (a file another thread creates meanwhile is private, not public)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_permissions(path: str | os.PathLike) -> Path:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open()`` / ``mkdir()``
    would: ``0o666`` (files) or ``0o777`` (folders) less the umask. For trees this package has just written
    (a saved model, a checkpoint) before they are renamed into place. Links are left alone. Returns the path.
    """
    path = Path(path)
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_symlink():
        return path
    if not path.is_dir():
        os.chmod(path, file_mode)
        return path
    for root, dirs, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dir_mode)
    os.chmod(path, dir_mode)
    return path


def _settle_mode(tmp: Path, target: Path) -> None:
    """The mode ``target`` gets from a plain write: its own when it exists, the umask's default otherwise."""
    try:
        os.chmod(tmp, os.stat(target).st_mode & 0o7777)
    except FileNotFoundError:
        default_permissions(tmp)


def _check_target(target: Path) -> Path:
    target = Path(target).expanduser().absolute()
    if target.is_dir():
        raise IsADirectoryError(f"'{target}' is a directory; pass a file path to write.")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"The folder of '{target}' does not exist; create '{target.parent}' first or fix the path."
        )
    return target


def check_writable(target: str | os.PathLike) -> Path:
    """Check, before any work, that :func:`atomic_path` can write ``target``.

    Creates and deletes a partial file next to ``target``, so a read-only folder or mount, missing write
    permission or a full inode table is found now rather than after the work whose result it would hold.

    Args:
        target: the final file path.

    Returns:
        ``target`` as an absolute path.

    Raises:
        IsADirectoryError: when ``target`` is a directory.
        FileNotFoundError: when ``target``'s folder does not exist.
        PermissionError: when nothing can be written in ``target``'s folder (the message gives the reason).
    """
    target = _check_target(Path(target))
    probe = _partial_sibling(target)
    try:
        with open(probe, "xb"):
            pass
    except OSError as error:
        raise PermissionError(
            f"Cannot write in the folder '{target.parent}' ({error.strerror or error}); make it writable or "
            "choose another folder."
        ) from error
    _remove(probe)
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``target`` that replaces ``target`` when the block succeeds.

    For libraries that write to a path (``nibabel.save``, ``safetensors.torch.save_file``). The temporary
    name ends with ``target``'s name, so extension-based writers (``.nii.gz``) pick the right format.

    Args:
        target: the final file path; its folder must exist.

    Yields:
        The temporary path (nothing exists there yet).

    Raises:
        IsADirectoryError: when ``target`` is a directory.
        FileNotFoundError: when ``target``'s folder does not exist, or the block wrote nothing.
    """
    target = _check_target(Path(target))
    tmp = _partial_sibling(target)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(
                f"Nothing was written to the temporary file '{tmp}' for '{target}'; write the file to the "
                "path the context yields."
            )
        _settle_mode(tmp, target)
        _fsync_file(tmp)
        os.replace(tmp, target)
        fsync_directory(target.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``target`` when the block succeeds.

    Args:
        target: the final file path; its folder must exist.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: text encoding (ignored in binary mode).

    Yields:
        The open file object.

    Raises:
        ValueError: for a mode other than ``"w"`` / ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode={mode!r}; use 'w' (text) or 'wb' (binary).")
    with atomic_path(target) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically; returns the path."""
    with atomic_open(target, "wb") as f:
        f.write(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically; returns the path."""
    with atomic_open(target, "w", encoding=encoding) as f:
        f.write(text)
    return Path(target)


def atomic_write_json(target: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON (sorted keys, trailing newline) to ``target`` atomically; returns the path.

    The data is serialized before anything touches the disk, so an unserializable value leaves the
    previous file as it was.

    Raises:
        TypeError: when ``data`` is not JSON-serializable (the message names the target).
    """
    try:
        text = json.dumps(data, indent=indent, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise TypeError(f"Cannot write '{target}': the data is not plain JSON ({error}).") from error
    return atomic_write_text(target, text)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary directory next to ``target`` that replaces ``target`` when the block succeeds.

    On success every file inside is ``fsync``-ed and the directory renamed into place (an existing
    ``target`` is first moved aside, then deleted). On failure the temporary directory is deleted and
    ``target`` is left as it was.

    Args:
        target: the final directory.
        overwrite: replace an existing ``target``; False raises instead.

    Yields:
        The temporary directory (empty).

    Raises:
        FileExistsError: when ``target`` is a file, or exists and ``overwrite`` is False.
    """
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"'{target}' exists and is a file; pass a directory path.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"'{target}' exists; remove it or pass overwrite=True.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_sibling(target)
    tmp.mkdir()
    old: Path | None = None  # the earlier target while it is moved aside
    try:
        yield tmp
        default_permissions(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_directory(root)
        if target.exists():
            old = _partial_sibling(target)
            os.replace(target, old)
            os.replace(tmp, target)
            moved_aside, old = old, None
            _remove(moved_aside)
        else:
            os.replace(tmp, target)
        fsync_directory(target.parent)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            # Failed (or interrupted) between the two renames: put the earlier directory back, so it is
            # never left only under a partial name that remove_partials would delete.
            os.replace(old, target)
        _remove(tmp)
        raise


def remove_partials(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that interrupted atomic writes left in ``directory``.

    Returns:
        The removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if is_partial(p)]
    for path in removed:
        _remove(path)
    return removed


# -----------------------------------------------------------------------------------------------------
# Integrity checks (read headers only, never the weights)
# -----------------------------------------------------------------------------------------------------


def read_json_file(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file, naming the file in every error.

    Args:
        path: the file.
        what: what the file is, for messages (``"segmenter_config.json"``).

    Raises:
        FileNotFoundError: when the file does not exist.
        CorruptFileError: when it is not valid UTF-8 JSON (e.g. truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(
            f"{what} '{path}' is not valid JSON ({error}); the save was probably interrupted or the file "
            "edited by hand. Restore it from the original save."
        ) from error


def check_json_file(path: str | os.PathLike, what: str = "JSON file") -> None:
    """Raise :class:`CorruptFileError` (naming the file) when ``path`` is not valid JSON."""
    read_json_file(path, what)


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets), weights unread.

    Raises:
        FileNotFoundError: when the file does not exist.
        CorruptFileError: when the header is missing, truncated or not valid JSON.
    """
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, bytes after the header)`` of a safetensors file."""
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file '{path}' does not exist.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(
                f"safetensors file '{path}' is {size} bytes, too short for a header; it is truncated. "
                "Re-save or re-download it."
            )
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise CorruptFileError(
                f"safetensors file '{path}' declares a {length}-byte header but holds {size} bytes; it is "
                "truncated or not a safetensors file. Re-save or re-download it."
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(
            f"safetensors file '{path}' has an unreadable header ({error}); it is corrupt or not a "
            "safetensors file. Re-save or re-download it."
        ) from error
    if not isinstance(header, dict):
        raise CorruptFileError(f"safetensors file '{path}' has a header that is not a JSON object.")
    return header, size - 8 - length


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Check that a safetensors file is complete, without reading its tensors.

    Every tensor's byte range must match its dtype and shape, and the ranges must exactly fill the file
    after the header: a file cut short by a crash or an interrupted download is caught here, before a
    loader sees it.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The header (see :func:`safetensors_header`).

    Raises:
        FileNotFoundError: when the file does not exist.
        CorruptFileError: naming the file and the problem.
    """
    path = Path(path)
    header, data_size = _read_header(path)
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for dim in shape:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptFileError(
                f"safetensors file '{path}': entry {name!r} is malformed ({error!r}); re-save the file."
            ) from error
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and stop - begin != numel * itemsize:
            raise CorruptFileError(
                f"safetensors file '{path}': tensor {name!r} ({dtype}, shape {shape}) spans {stop - begin} "
                f"bytes instead of {numel * itemsize}; the file is corrupt. Re-save it."
            )
        end = max(end, stop)
    if end != data_size:
        raise CorruptFileError(
            f"safetensors file '{path}' holds {data_size} bytes of tensor data but its header describes "
            f"{end}; it is {'truncated' if data_size < end else 'corrupt'} (an interrupted save or "
            "download). Re-save or re-download it."
        )
    return header
