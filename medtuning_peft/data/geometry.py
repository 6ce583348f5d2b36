"""Canonical orientation, resampling, and the way back onto a file's original voxel grid.

Canonical orientation is read from each file's affine with nibabel's orientation utilities, never
assumed from the axis order. The canonical axis codes are ``("S", "P", "L")`` in nibabel's
convention (a code names the direction in which the index *increases*):

- D (axis 0): inferior -> superior (the axial / slice axis),
- H (axis 1): anterior -> posterior,
- W (axis 2): patient right -> patient left.

An axial slice ``image[c, d]`` shown with ``imshow`` therefore appears in the radiological
convention (anterior at the top, the patient's right on the viewer's left). KiTS19 files (codes
I, P, L) come out with only the slice axis reversed; RAS files (MSD) are transposed and flipped.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

CANONICAL_AXCODES: tuple[str, str, str] = ("S", "P", "L")


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """Orientation transform from a file's voxel axes to the canonical ``(D, H, W)`` axes.

    Args:
        affine: ``(4, 4)`` voxel -> RAS+ mm affine of the file.

    Returns:
        ``(3, 2)`` nibabel orientation transform (for ``nibabel.orientations.apply_orientation``).
    """
    source = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    return nio.ornt_transform(source, nio.axcodes2ornt(CANONICAL_AXCODES))


def resample_to_shape(array: np.ndarray, shape: tuple[int, int, int], *, is_label: bool) -> np.ndarray:
    """Resamples a channel-first volume to a new spatial shape with MONAI's ``Resize``.

    Images use trilinear interpolation, labels nearest neighbour (``nearest-exact``); both with the
    pixel-area convention (``align_corners=False``), so voxel ``i`` of the output is centred at
    ``(i + 0.5) * old / new - 0.5`` of the input (see :attr:`VolumeGeometry.affine`).

    Args:
        array: ``(C, D, H, W)`` array.
        shape: Output ``(D, H, W)``.
        is_label: Nearest-neighbour if ``True`` (dtype kept), trilinear float32 otherwise.

    Returns:
        ``(C, *shape)`` array.
    """
    from monai.transforms import Resize

    if tuple(array.shape[1:]) == tuple(shape):
        return array
    if is_label:
        out = Resize(spatial_size=shape, mode="nearest-exact", dtype=np.float32)(array.astype(np.float32))
        return np.rint(np.asarray(out)).astype(array.dtype)
    out = Resize(spatial_size=shape, mode="trilinear", align_corners=False, dtype=np.float32)(
        array.astype(np.float32, copy=False)
    )
    return np.asarray(out, dtype=np.float32)


def _header_class(name: str) -> type:
    classes = {"Nifti1Header": nib.Nifti1Header, "Nifti2Header": nib.Nifti2Header}
    if name not in classes:
        raise ValueError(f"header_class={name!r} is not supported; use one of {sorted(classes)}.")
    return classes[name]


@dataclass
class VolumeGeometry:
    """Everything needed to map canonical arrays back onto the original file's voxel grid.

    Attributes:
        original_shape: Spatial shape of the file's array, in the file's voxel order.
        original_affine: ``(4, 4)`` voxel -> RAS+ mm affine of the file.
        transform: ``(3, 2)`` nibabel orientation transform, file axes -> canonical axes.
        canonical_shape: ``(D, H, W)`` after reorientation, before resampling.
        shape: ``(D, H, W)`` of the case's arrays (after resampling; equals ``canonical_shape``
            when no target spacing was requested).
        header: Raw NIfTI header bytes of the reference file (written back by :meth:`to_nifti`).
        header_class: ``"Nifti1Header"`` or ``"Nifti2Header"``.
    """

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    transform: np.ndarray
    canonical_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    header: bytes | None = None
    header_class: str = "Nifti1Header"

    @classmethod
    def from_affine(
        cls,
        affine: np.ndarray,
        original_shape: tuple[int, ...],
        header: nib.Nifti1Header | None = None,
    ) -> VolumeGeometry:
        """Builds the geometry of a file (no resampling yet).

        Args:
            affine: ``(4, 4)`` voxel -> RAS+ mm affine.
            original_shape: Spatial shape (first three axes) of the file's array.
            header: The file's NIfTI header, kept so outputs can be written with it.
        """
        transform = canonical_transform(affine)
        spatial = tuple(int(s) for s in original_shape[:3])
        canonical = tuple(spatial[int(i)] for i in np.argsort(transform[:, 0]))
        blob, header_class = None, "Nifti1Header"
        if header is not None:
            blob = bytes(header.binaryblock)
            header_class = "Nifti2Header" if isinstance(header, nib.Nifti2Header) else "Nifti1Header"
        return cls(
            original_shape=spatial,  # type: ignore[arg-type]
            original_affine=np.asarray(affine, dtype=np.float64).copy(),
            transform=transform,
            canonical_shape=canonical,  # type: ignore[arg-type]
            shape=canonical,  # type: ignore[arg-type]
            header=blob,
            header_class=header_class,
        )

    @property
    def is_resampled(self) -> bool:
        """Whether the case's arrays are on a resampled grid."""
        return tuple(self.shape) != tuple(self.canonical_shape)

    @property
    def reoriented_affine(self) -> np.ndarray:
        """``(4, 4)`` affine of the canonical grid before resampling."""
        return self.original_affine @ nio.inv_ornt_aff(self.transform, self.original_shape)

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` voxel -> RAS+ mm affine of the case's arrays (canonical, after resampling)."""
        scale = np.asarray(self.canonical_shape, float) / np.asarray(self.shape, float)
        step = np.eye(4)
        step[:3, :3] = np.diag(scale)
        step[:3, 3] = (scale - 1.0) / 2.0  # pixel-area convention of resample_to_shape
        return self.reoriented_affine @ step

    @property
    def original_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm of the original file, in canonical ``(D, H, W)`` order."""
        sizes = nib.affines.voxel_sizes(self.reoriented_affine)
        return tuple(float(s) for s in sizes)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm of the case's arrays along ``(D, H, W)``."""
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))  # type: ignore[return-value]

    def with_shape(self, shape: tuple[int, int, int]) -> VolumeGeometry:
        """Copy whose arrays are resampled to ``shape`` (``(D, H, W)``)."""
        return VolumeGeometry(
            original_shape=self.original_shape,
            original_affine=self.original_affine,
            transform=self.transform,
            canonical_shape=self.canonical_shape,
            shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
            header=self.header,
            header_class=self.header_class,
        )

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Maps an array in the file's voxel order onto the case's grid.

        Args:
            array: ``(X, Y, Z)`` (a label map; nearest-neighbour if resampled) or ``(X, Y, Z, C)``
                (channel-last, as MSD stores it). Integer and bool arrays are resampled by nearest
                neighbour, float arrays trilinearly.

        Returns:
            ``(D, H, W)`` or ``(C, D, H, W)``.

        Raises:
            ValueError: If the spatial shape is not ``original_shape``.
        """
        if tuple(array.shape[:3]) != tuple(self.original_shape) or array.ndim not in (3, 4):
            raise ValueError(
                f"array shape {array.shape} does not match the file grid {self.original_shape} "
                "(+ optional trailing channel axis); pass an array in the original file's voxel order."
            )
        out = nio.apply_orientation(array, self.transform)  # (X, Y, Z[, C]) -> (D, H, W[, C])
        if array.ndim == 3:
            out = out[None]  # (D, H, W) -> (1, D, H, W)
        else:
            out = np.moveaxis(out, -1, 0)  # (D, H, W, C) -> (C, D, H, W)
        is_label = not np.issubdtype(array.dtype, np.floating)
        out = resample_to_shape(np.ascontiguousarray(out), self.shape, is_label=is_label)
        return out[0] if array.ndim == 3 else out

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Maps an array on the case's grid back onto the original file's voxel grid.

        The exact inverse of the loader's reorientation; if the case was resampled, the array is first
        resampled back to the original resolution (nearest neighbour for integer/bool arrays,
        trilinear for float arrays).

        Args:
            array: ``(D, H, W)`` (e.g. a predicted label map) or ``(C, D, H, W)`` (e.g. probabilities).

        Returns:
            ``(X, Y, Z)`` or ``(X, Y, Z, C)`` in the file's voxel order and exact shape, same dtype.

        Raises:
            ValueError: If the spatial shape is not ``shape``.
        """
        if array.ndim not in (3, 4) or tuple(array.shape[-3:]) != tuple(self.shape):
            raise ValueError(
                f"array shape {array.shape} does not match the case grid (D, H, W) = {self.shape} "
                "(with an optional leading channel axis); pass an array on the loaded case's grid."
            )
        channels = array if array.ndim == 4 else array[None]  # (D, H, W) -> (1, D, H, W)
        is_label = not np.issubdtype(array.dtype, np.floating)
        channels = resample_to_shape(channels, self.canonical_shape, is_label=is_label)
        channels = np.moveaxis(channels, 0, -1)  # (C, D, H, W) -> (D, H, W, C)
        inverse = nio.ornt_transform(
            nio.axcodes2ornt(CANONICAL_AXCODES), nio.io_orientation(self.original_affine)
        )
        out = np.ascontiguousarray(nio.apply_orientation(channels, inverse))  # (D, H, W, C) -> (X, Y, Z, C)
        return out[..., 0] if array.ndim == 3 else out

    def nifti_header(self) -> nib.Nifti1Header | None:
        """A copy of the original file's NIfTI header, or ``None`` if it was not kept."""
        if self.header is None:
            return None
        return _header_class(self.header_class)(binaryblock=self.header)

    def to_nifti(self, array: np.ndarray, dtype: np.dtype | type | None = None) -> nib.Nifti1Image:
        """Wraps a canonical array as a NIfTI image on the original file's grid, affine and header.

        Args:
            array: ``(D, H, W)`` or ``(C, D, H, W)`` on the case grid (see :meth:`to_original`).
            dtype: On-disk dtype; defaults to ``uint8`` for integer/bool arrays, else ``float32``.

        Returns:
            A ``Nifti1Image`` (``Nifti2Image`` if the source was NIfTI-2) whose data has the original
            shape (a 3D array keeps the source's trailing singleton axes, ``(X, Y, Z, 1)``) and whose affine
            equals the original affine.
        """
        data = self.to_original(array)
        if dtype is None:
            dtype = np.float32 if np.issubdtype(data.dtype, np.floating) else np.uint8
        data = data.astype(dtype, copy=False)
        header = self.nifti_header()
        image_class = nib.Nifti2Image if self.header_class == "Nifti2Header" else nib.Nifti1Image
        if header is None:
            image = image_class(data, self.original_affine)
        else:
            source_shape = tuple(int(n) for n in header.get_data_shape())
            if data.ndim == 3 and len(source_shape) > 3 and set(source_shape[3:]) == {1}:
                data = data.reshape(source_shape)  # (X, Y, Z) -> (X, Y, Z, 1, ...), as the source file
            header.set_data_shape(data.shape)
            header["cal_min"], header["cal_max"] = 0, 0
            image = image_class(data, self.original_affine, header=header)
        image.set_data_dtype(dtype)
        image.header.set_slope_inter(1.0, 0.0)
        return image

    def save_nifti(self, array: np.ndarray, path: str | Path, dtype: np.dtype | type | None = None) -> Path:
        """Writes :meth:`to_nifti` of ``array`` to ``path`` (``.nii`` or ``.nii.gz``) and returns it.

        The file is written under a temporary name and renamed into place: a crash leaves the old file or none.
        """
        from ..io_utils import atomic_path

        path = Path(path)
        image = self.to_nifti(array, dtype=dtype)
        with atomic_path(path) as tmp:
            nib.save(image, str(tmp))
        return path

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible representation (the header as base64)."""
        return {
            "original_shape": list(self.original_shape),
            "original_affine": self.original_affine.tolist(),
            "transform": self.transform.tolist(),
            "canonical_shape": list(self.canonical_shape),
            "shape": list(self.shape),
            "header": None if self.header is None else base64.b64encode(self.header).decode("ascii"),
            "header_class": self.header_class,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VolumeGeometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            original_shape=tuple(int(s) for s in data["original_shape"]),  # type: ignore[arg-type]
            original_affine=np.asarray(data["original_affine"], dtype=np.float64),
            transform=np.asarray(data["transform"], dtype=np.float64),
            canonical_shape=tuple(int(s) for s in data["canonical_shape"]),  # type: ignore[arg-type]
            shape=tuple(int(s) for s in data["shape"]),  # type: ignore[arg-type]
            header=None if data["header"] is None else base64.b64decode(data["header"]),
            header_class=data.get("header_class", "Nifti1Header"),
        )
