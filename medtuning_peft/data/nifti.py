"""Decoding and validating NIfTI files, and the one loader every reader shares.

:func:`load_case` turns a :class:`~medtuning_peft.data.case.CaseFiles` into a
:class:`~medtuning_peft.data.case.VolumeCase`: decode, validate (finite intensities, 3D grid, image
and label on the same grid, label values allowed), reorient to canonical ``(D, H, W)``, normalize,
optionally resample. Every error names the case and the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from .case import CaseFileMissingError, CaseFiles, CaseLoadError, VolumeCase, case_error
from .geometry import VolumeGeometry, resample_to_shape
from .preprocessing import Preprocessing, default_preprocessing, target_shape

# Two affines describe the same grid if they agree to this many mm (float32 header storage and
# different writers introduce tiny differences).
AFFINE_TOLERANCE_MM = 1e-3


def _squeeze_trailing(array: np.ndarray) -> np.ndarray:
    """Drops singleton axes after the third, e.g. ``(X, Y, Z, 1)`` -> ``(X, Y, Z)``, and the singleton time axis of
    NIfTI's vector layout (components on the 5th axis, as SimpleITK writes multi-channel images):
    ``(X, Y, Z, 1, C)`` -> ``(X, Y, Z, C)``."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0, :]  # (X, Y, Z, 1, C) -> (X, Y, Z, C)
    return array


def read_nifti(
    path: Path | str, *, case_id: str, role: str, as_label: bool = False
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Decodes a NIfTI file, turning every low-level failure into an error naming the case and file.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        case_id: Case name, for error messages.
        role: What the file is (``"image"``, ``"label"``, ``"t1ce"``), for error messages.
        as_label: Return the stored values (scaled if the header says so) instead of float32.

    Returns:
        The array in the file's voxel order (trailing singleton axes dropped, ``(X, Y, Z, 1, C)`` read as
        ``(X, Y, Z, C)``; float32 for images) and
        the nibabel image (for its affine and header).

    Warns:
        UserWarning: If the file has neither a qform nor an sform, or both and they disagree (the sform is
            used, as nibabel does); the message names the case and the file.

    Raises:
        CaseFileMissingError: If the file does not exist.
        CaseLoadError: If it is not a NIfTI file, cannot be fully decoded (e.g. truncated gzip) or
            has a zero-length axis.
    """
    path = Path(path)
    if not path.is_file():
        raise CaseFileMissingError(
            case_error(case_id, path, f"{role} file is missing", "check the dataset path and file name")
        )
    try:
        image = nib.load(str(path))
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise nib.filebasedimages.ImageFileError(f"{type(image).__name__} is not a NIfTI image")
        if as_label:
            data = np.asanyarray(image.dataobj)
        else:
            data = image.get_fdata(dtype=np.float32, caching="unchanged")
    except MemoryError:
        raise
    except Exception as error:  # nibabel, gzip, zlib and numpy all raise their own types here
        raise CaseLoadError(
            case_error(
                case_id,
                path,
                f"{role} file is not a readable NIfTI ({type(error).__name__}: {error})",
                "re-download or re-extract it (a truncated .gz usually means an interrupted download)",
            )
        ) from error
    if 0 in image.shape:  # nibabel decodes an empty grid as shape (0,), so report the header's shape
        raise CaseLoadError(
            case_error(
                case_id,
                path,
                f"{role} has shape {tuple(image.shape)} with no voxels; expected a non-empty volume",
                "re-export the volume (a zero-length axis usually comes from a failed conversion or crop)",
            )
        )
    _warn_about_ambiguous_orientation(case_id, path, role, image)
    return _squeeze_trailing(np.asarray(data)), image


def _warn_about_ambiguous_orientation(case_id: str, path: Path, role: str, image: nib.Nifti1Image) -> None:
    """Warns when software may place the file's voxels differently: no qform or sform, or the two disagree.

    nibabel (and so this loader), FSL and MONAI take the sform when its code is set; other tools (older ITK
    releases among them) take the qform. Files with neither transform have no orientation; nibabel reads them with the
    ``pixdim``-only fallback of the NIfTI standard.
    """
    header = image.header
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if qform_code == 0 and sform_code == 0:
        axes = "".join(nib.aff2axcodes(image.affine))
        problem = (
            f"{role} has neither a qform nor an sform (qform_code and sform_code are 0), so its orientation is "
            f"unknown; it is read with the pixdim-only fallback (axes {axes})"
        )
        fix = "set the sform and qform to the scanner transform (e.g. copy them from the original image)"
    elif qform_code > 0 and sform_code > 0:
        qform, sform = header.get_qform(), header.get_sform()
        difference = float(np.max(np.abs(qform - sform)))
        if difference <= AFFINE_TOLERANCE_MM:
            return
        problem = (
            f"{role}'s qform (axes {''.join(nib.aff2axcodes(qform))}, code {qform_code}) and sform (axes "
            f"{''.join(nib.aff2axcodes(sform))}, code {sform_code}) differ by up to {difference:.4g} mm; the sform "
            "is used, as nibabel, FSL and MONAI do, but tools that prefer the qform place the voxels elsewhere"
        )
        fix = "re-save the file with one transform in both (e.g. nibabel: img.set_qform(img.get_sform()))"
    else:
        return
    warnings.warn(case_error(case_id, path, problem, fix), UserWarning, stacklevel=4)


def _check_affine(case_id: str, path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CaseLoadError(
            case_error(
                case_id,
                path,
                f"affine is singular or not finite:\n{np.round(affine, 4)}",
                "repair the header's sform/qform (e.g. copy them from the matching image)",
            )
        )


def _in_other_voxel_order(shape: tuple, affine: np.ndarray, ref_shape: tuple, ref_affine: np.ndarray) -> bool:
    """Whether ``(shape, affine)`` is the grid ``(ref_shape, ref_affine)`` with its axes permuted or flipped."""
    if len(shape) != 3 or len(ref_shape) != 3:
        return False
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # a singular or non-finite affine ...
            ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.io_orientation(ref_affine))
        reordered_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)  # as img.as_reoriented(ornt)
    except (ValueError, np.linalg.LinAlgError):  # ... has no orientation
        return False
    reordered_shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(ornt):  # file axis -> axis of the reference
        reordered_shape[int(new_axis)] = shape[axis]
    return tuple(reordered_shape) == tuple(ref_shape) and np.allclose(
        reordered_affine, ref_affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM
    )


def _check_same_grid(
    case_id: str, reference: Path, ref_shape: tuple, ref_affine: np.ndarray, path: Path, shape: tuple, affine
) -> None:
    differs = tuple(shape) != tuple(ref_shape) or not np.allclose(
        affine, ref_affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM
    )
    if differs and _in_other_voxel_order(tuple(shape), affine, tuple(ref_shape), ref_affine):
        axes, ref_axes = "".join(nib.aff2axcodes(affine)), "".join(nib.aff2axcodes(ref_affine))
        raise CaseLoadError(
            case_error(
                case_id,
                path,
                f"holds the same voxels as '{reference}' in another voxel order (axes {axes}, shape "
                f"{tuple(shape)}; '{reference}' has axes {ref_axes}, shape {tuple(ref_shape)})",
                f"re-save it in the voxel order of '{reference}' (e.g. with nibabel's as_reoriented); "
                "files are not reoriented onto each other",
            )
        )
    if tuple(shape) != tuple(ref_shape):
        raise CaseLoadError(
            case_error(
                case_id,
                path,
                f"shape {tuple(shape)} differs from {tuple(ref_shape)} of '{reference}'",
                "make sure both files belong to the same case and were not cropped or resampled separately",
            )
        )
    if not np.allclose(affine, ref_affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        raise CaseLoadError(
            case_error(
                case_id,
                path,
                f"affine\n{np.round(affine, 4)}\ndiffers from that of '{reference}'\n{np.round(ref_affine, 4)}",
                "resample or re-header the file onto the image grid (the two must describe the same voxels)",
            )
        )


def _read_channels(files: CaseFiles) -> tuple[np.ndarray, nib.Nifti1Image, Path]:
    """Reads and stacks the image channels: ``(X, Y, Z, C)`` float32 in the file's voxel order."""
    channels: list[np.ndarray] = []
    reference: tuple[Path, nib.Nifti1Image] | None = None
    single = len(files.images) == 1
    for index, path in enumerate(files.images):
        role = files.channel_names[index] if not single and index < len(files.channel_names) else "image"
        data, image = read_nifti(path, case_id=files.case_id, role=role)
        if data.ndim not in ((3, 4) if single else (3,)):
            expected = "3D (or 4D with channels last)" if single else "3D"
            raise CaseLoadError(
                case_error(
                    files.case_id,
                    path,
                    f"{role} has shape {data.shape}; expected a {expected} volume",
                    "pass a volumetric NIfTI (2D slices and time series are not supported)",
                )
            )
        if not np.all(np.isfinite(data)):
            bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            raise CaseLoadError(
                case_error(
                    files.case_id,
                    path,
                    f"{role} has {bad} NaN/Inf voxels",
                    "repair or exclude the case (NaN/Inf would poison normalization and training)",
                )
            )
        _check_affine(files.case_id, Path(path), image.affine)
        if reference is None:
            reference = (Path(path), image)
        else:
            _check_same_grid(
                files.case_id,
                reference[0],
                reference[1].shape[:3],
                reference[1].affine,
                Path(path),
                data.shape,
                image.affine,
            )
        channels.append(data if data.ndim == 4 else data[..., None])  # (X, Y, Z) -> (X, Y, Z, 1)
    stacked = np.concatenate(channels, axis=-1)  # C x (X, Y, Z, 1) -> (X, Y, Z, C)
    if files.channel_names and stacked.shape[-1] != len(files.channel_names):
        raise CaseLoadError(
            case_error(
                files.case_id,
                files.images[0],
                f"image has {stacked.shape[-1]} channel(s) but the dataset declares "
                f"{len(files.channel_names)} {list(files.channel_names)}",
                "check the dataset description (e.g. 'modality' in dataset.json) against the files",
            )
        )
    assert reference is not None  # files.images is never empty (CaseFiles checks it)
    return stacked, reference[1], reference[0]


def _read_label(files: CaseFiles, ref_path: Path, ref_image: nib.Nifti1Image) -> np.ndarray:
    """Reads and validates the label: ``(X, Y, Z)`` uint8 in the file's voxel order."""
    assert files.label is not None
    path = Path(files.label)
    data, image = read_nifti(path, case_id=files.case_id, role="label", as_label=True)
    if data.ndim != 3:
        raise CaseLoadError(
            case_error(
                files.case_id,
                path,
                f"label has shape {data.shape}; expected a 3D volume",
                "pass a 3D label map with one integer class per voxel",
            )
        )
    _check_same_grid(
        files.case_id, ref_path, ref_image.shape[:3], ref_image.affine, path, data.shape, image.affine
    )
    if np.issubdtype(data.dtype, np.floating) and not (
        np.all(np.isfinite(data)) and np.array_equal(data, np.rint(data))
    ):
        bad = np.unique(data[~(np.isfinite(data) & (data == np.rint(data)))])  # sorted, NaN last
        found = ", ".join(f"{v:.9g}" for v in bad[:5]) + (
            f", ... ({bad.size} in all)" if bad.size > 5 else ""
        )
        # nibabel moves the header's scaling onto the data proxy when it loads a file
        slope, inter = (
            float(getattr(image.dataobj, name, default)) for name, default in (("slope", 1), ("inter", 0))
        )
        scaled = (slope, inter) != (1.0, 0.0)
        raise CaseLoadError(
            case_error(
                files.case_id,
                path,
                f"label has non-integer or NaN/Inf values [{found}]; expected the integers "
                f"{list(files.label_values)}"
                + (
                    f" (the header scales the stored values: scl_slope={slope:.9g}, scl_inter={inter:.9g})"
                    if scaled
                    else ""
                ),
                "store labels as integers (e.g. uint8) without scaling (scl_slope 1, scl_inter 0), not interpolated "
                "floats",
            )
        )
    values = np.unique(data)
    unexpected = sorted(set(values.tolist()) - set(files.label_values))
    if unexpected:
        raise CaseLoadError(
            case_error(
                files.case_id,
                path,
                f"label has values {[int(v) if float(v).is_integer() else v for v in unexpected]} "
                f"outside the allowed {list(files.label_values)}",
                "check that this is the segmentation of this dataset (or remap its labels)",
            )
        )
    return data.astype(np.uint8)  # exact: label_values are at most 255 (CaseFiles checks it)


def load_case(files: CaseFiles, preprocessing: Preprocessing | None = None) -> VolumeCase:
    """Decodes, validates, reorients, normalizes and (optionally) resamples one case.

    Args:
        files: The case's files.
        preprocessing: ``CTPreprocessing`` / ``MRIPreprocessing``; default
            ``default_preprocessing(files.modality, files.dataset)``.

    Returns:
        A :class:`VolumeCase` with ``image`` ``(C, D, H, W)`` float32 and ``label`` ``(D, H, W)``
        uint8 (or ``None``) in canonical orientation.

    Warns:
        UserWarning: For a file without qform and sform, or whose qform and sform disagree (see :func:`read_nifti`).

    Raises:
        CaseFileMissingError: If an image or label file is missing.
        CaseLoadError: If a file is not a readable NIfTI, is not 3D, has NaN/Inf intensities, the image
            channels and the label are not on the same grid (shape or affine), the channel count
            differs from the dataset's, or the label has values outside ``files.label_values``.
    """
    if preprocessing is None:
        preprocessing = default_preprocessing(files.modality, files.dataset)
    image_xyzc, ref_image, ref_path = _read_channels(files)
    label_xyz = _read_label(files, ref_path, ref_image) if files.label is not None else None

    geometry = VolumeGeometry.from_affine(ref_image.affine, image_xyzc.shape[:3], header=ref_image.header)
    image = geometry.to_canonical(image_xyzc)  # (X, Y, Z, C) -> (C, D, H, W)
    label = None if label_xyz is None else geometry.to_canonical(label_xyz)  # (X, Y, Z) -> (D, H, W)
    image, background = preprocessing.normalize(image)

    if preprocessing.target_spacing is not None:
        new_shape = target_shape(
            geometry.canonical_shape, geometry.original_spacing, preprocessing.target_spacing
        )
        geometry = geometry.with_shape(new_shape)
        image = resample_to_shape(image, new_shape, is_label=False)
        if label is not None:
            label = resample_to_shape(label[None], new_shape, is_label=True)[0]  # (1, D, H, W) -> (D, H, W)

    return VolumeCase(
        case_id=files.case_id,
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=None if label is None else np.ascontiguousarray(label, dtype=np.uint8),
        spacing=geometry.spacing,
        geometry=geometry,
        channel_names=tuple(files.channel_names),
        label_values=tuple(files.label_values),
        label_names=dict(files.label_names),
        background_value=float(background),
    )
