"""The ``medtuning`` command line: predict, evaluate, verify-data, push, cache.

::

    medtuning predict --model runs/kits/model --input scans/ --output predictions/ --preview
    medtuning evaluate --pred predictions/ --labels /data/kits19/data --task kits19 --output metrics.json
    medtuning verify-data --task brats --data-dir /data/MICCAI_BraTS2020_TrainingData
    medtuning push --model runs/kits/model --repo-id my-org/kits19-swin --dataset kits19
    medtuning cache --prune-stale --max-size 200 --dry-run

Every command checks its inputs case by case: a bad file (truncated ``.nii.gz``, not a NIfTI, 2D or 4D
where 3D is expected, NaN/Inf voxels, mismatched grids, unexpected labels) is reported with the case, the
file, the problem and the fix; no output is written for that case (a file of it left by an earlier run is
named), the other cases still run, and the command exits with status 1 after listing every failed case.
Outputs are written atomically (:mod:`medtuning_peft.io_utils`). Exit status: 0 success, 1 failed cases or
inputs, 2 bad arguments.

Heavy libraries (torch, MONAI) load inside the commands, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .io_utils import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
)

__all__ = ["TASKS", "build_parser", "main", "png_bytes"]

TASKS = ("kits19", "brats", "msd")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
REFERENCE_OVERLAP = 1.0 - 42 / 128  # evaluation.REFERENCE_OVERLAP: 128^3 windows, stride 42
_LABEL_SUFFIXES = ("_seg", "_segmentation", "_label", "_labels", "_gt")
_PREVIEW_SLICES = 3
_PREVIEW_MIN_SIDE = 160
# Class colours of previews (class 0 is not drawn): red, green, yellow, blue, orange, purple, cyan, magenta.
_PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)


class CommandError(Exception):
    """A problem that stops a whole command (not one case); printed, exit status 1."""


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _case_id(path: Path) -> str | None:
    """The case name of a NIfTI file (its name without ``.nii`` / ``.nii.gz``), or None for other files."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _nifti_files(directory: Path) -> dict[str, list[Path]]:
    """NIfTI files directly in ``directory`` by case name (hidden and partial files skipped)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        case_id = _case_id(path)
        if case_id is not None and path.is_file() and not path.name.startswith("."):
            found.setdefault(case_id, []).append(path)
    return found


def _is_one_kits19_case(directory: Path, role: str = "imaging") -> bool:
    """Whether ``directory`` is one KiTS19 case folder: it holds ``imaging.nii(.gz)`` (or ``role``'s file) and no
    other NIfTI file than ``imaging`` and ``segmentation`` (a folder of scans, one of them named imaging, is not)."""
    names = set(_nifti_files(directory))
    return role in names and names <= {"imaging", "segmentation"}


def _unique(found: dict[str, list[Path]], what: str) -> dict[str, Path]:
    duplicates = {k: v for k, v in found.items() if len(v) > 1}
    if duplicates:
        listing = "; ".join(", ".join(f"'{p}'" for p in paths) for paths in duplicates.values())
        raise CommandError(f"{what}: several files share a case name ({listing}); keep one file per case.")
    return {k: v[0] for k, v in found.items()}


def _strip_label_suffix(case_id: str) -> str:
    """``x_seg`` / ``x_label`` / ... -> ``x``: the case a label file belongs to."""
    return next((case_id[: -len(s)] for s in _LABEL_SUFFIXES if case_id.endswith(s)), case_id)


def _is_label_name(case_id: str) -> bool:
    """Whether a NIfTI file's case name marks it as a label map: ``segmentation`` (KiTS19), ``x_seg``, ..."""
    return case_id.lower() == "segmentation" or _strip_label_suffix(case_id) != case_id


def _failure_report(command: str, failures: dict[str, str], total: int) -> None:
    print(f"medtuning {command}: {len(failures)} of {total} case(s) failed:", file=sys.stderr)
    for case_id, message in failures.items():
        print(f"  - {case_id}: {message}", file=sys.stderr)


# -----------------------------------------------------------------------------------------------------
# predict
# -----------------------------------------------------------------------------------------------------


def _prediction_cases(input_path: Path, split: str) -> tuple[list[Any], str]:
    """The cases under ``--input``, with labels dropped, and a description of the layout."""
    from .data import (
        CaseFiles,
        CaseLoadError,
        NoCasesError,
        brats_case_files,
        is_one_brats_case,
        kits19_case_files,
        list_brats_cases,
        list_kits19_cases,
        read_msd_task,
    )
    from .data.kits19 import KITS19_CASE_PATTERN

    def plain(case_id: str, path: Path) -> CaseFiles:
        return CaseFiles(case_id=case_id, images=(path,), label=None, channel_names=(), label_values=(0,))

    if input_path.is_file():
        case_id = _case_id(input_path)
        if case_id is None:
            raise CommandError(
                f"--input '{input_path}' is not a NIfTI file: expected a .nii or .nii.gz file or a folder."
            )
        return [plain(case_id, input_path)], "file"
    if not input_path.is_dir():
        raise CommandError(f"--input '{input_path}' does not exist; pass a NIfTI file or a folder.")
    try:
        if (input_path / "dataset.json").is_file():
            task = read_msd_task(input_path)
            use = ("test" if task.test else "training") if split == "auto" else split
            cases = list(task.test if use == "test" else task.training)
            layout = f"MSD task '{task.name}', {use} images"
            if not cases:  # --split test on a task without test images (training is never empty)
                raise CommandError(
                    f"--input '{input_path}' (MSD task '{task.name}'): dataset.json lists no {use} images; "
                    "pass --split training (or auto) to segment its training images."
                )
        elif any(d.is_dir() and KITS19_CASE_PATTERN.match(d.name) for d in input_path.iterdir()):
            cases, layout = list_kits19_cases(input_path), "KiTS19 case folders"
        elif _is_one_kits19_case(input_path):  # imaging (+ segmentation): one case named after the folder
            cases, layout = [kits19_case_files(os.path.abspath(input_path))], "a KiTS19 case folder"
        elif is_one_brats_case(input_path):  # its modality files are one case, not one case each
            cases, layout = [brats_case_files(input_path)], "a BraTS case folder"
        elif files := _nifti_files(input_path):
            found = _unique(files, f"--input '{input_path}'")
            images = {k: p for k, p in found.items() if not _is_label_name(k)}
            skipped = sorted(p.name for k, p in found.items() if k not in images)
            if not images:
                raise CommandError(
                    f"--input folder '{input_path}' holds only label maps by their names ({skipped}: "
                    f"segmentation, or a name ending in {' / '.join(_LABEL_SUFFIXES)}), no image to segment. "
                    "Pass the folder of images, or one file as --input to segment it anyway."
                )
            if skipped:
                _log(
                    f"--input '{input_path}': skipping {len(skipped)} label map(s) by their names: {skipped}. "
                    "Pass one file as --input to segment it anyway."
                )
            cases, layout = [plain(k, p) for k, p in images.items()], "NIfTI files"
        else:
            try:
                cases, layout = list_brats_cases(input_path), "BraTS case folders"
            except NoCasesError:  # no layout fits: said below
                cases, layout = [], ""
    except CaseLoadError as error:
        raise CommandError(f"--input '{input_path}': {error}") from error
    if not cases:
        raise CommandError(
            f"--input folder '{input_path}' holds no case: no .nii/.nii.gz file, no dataset.json (MSD) and "
            "no "
            "KiTS19 (case_XXXXX/) or BraTS case folder. Pass a NIfTI file or a folder of them."
        )
    return [dataclasses.replace(c, label=None) for c in cases], layout


def _preprocessing(config: dict[str, Any], model: str, modality: str | None, files: Any) -> Any:
    from .data import default_preprocessing, preprocessing_from_dict

    saved = config.get("preprocessing")
    if isinstance(saved, dict) and saved.get("kind") in ("ct", "mri"):
        try:
            return preprocessing_from_dict(saved)
        except ValueError as error:
            raise CommandError(
                f"segmenter_config.json of --model '{model}' has preprocessing {saved} that this version "
                f"cannot rebuild ({error}); install the medtuning_peft version that saved the model."
            ) from error
    if saved is not None:
        raise CommandError(
            f"segmenter_config.json of --model '{model}' has preprocessing {saved!r}; expected the output of "
            "CTPreprocessing.to_dict() or MRIPreprocessing.to_dict() (a dict with 'kind')."
        )
    if modality is not None:
        return default_preprocessing(modality)
    if files.dataset:  # a data set layout (KiTS19, MSD, BraTS) knows its modality
        return None  # load_case uses the data set's default
    raise CommandError(
        f"segmenter_config.json of --model '{model}' records no preprocessing; pass --modality CT or MRI "
        "to use that modality's default normalization (or save the model with "
        "build_segmenter(preprocessing=CTPreprocessing().to_dict()))."
    )


def _check_dims(files: Any, in_channels: int) -> str | None:
    """Why a single-file case cannot feed the model (from the header only), or None."""
    import nibabel as nib

    from .data.case import case_error

    path = files.images[0]
    try:
        shape = tuple(nib.load(str(path)).shape)
    except Exception:  # unreadable: load_case reports it with the details
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if in_channels == 1 and len(shape) == 4:
        problem = f"image is 4D with shape {shape}; this model takes 1 channel and expects a 3D volume"
        fix = "pass one 3D volume per case (split time series and multi-channel files)"
    elif in_channels > 1 and len(shape) == 3:
        problem = f"image is a 3D volume {shape}; this model takes {in_channels} channels"
        fix = f"pass a 4D file with the {in_channels} channels on the last axis (the MSD layout)"
    elif in_channels > 1 and len(shape) == 4 and shape[3] != in_channels:
        problem = f"image has {shape[3]} channels (shape {shape}); this model takes {in_channels}"
        fix = f"pass a 4D file with the {in_channels} channels on the last axis, in training order"
    else:
        return None
    return case_error(files.case_id, path, problem, fix)


def _preview_rgb(image: Any, classes: Any) -> Any:
    """Axial slices of ``image`` (D, H, W) with ``classes`` (D, H, W) overlaid: (h, w, 3) uint8."""
    import numpy as np

    depth = image.shape[0]
    foreground = np.nonzero(classes.reshape(depth, -1).any(axis=1))[0]
    source = foreground if foreground.size else np.arange(depth)
    picks = sorted({int(source[int(q * (source.size - 1))]) for q in (0.25, 0.5, 0.75)})[:_PREVIEW_SLICES]
    low, high = (float(v) for v in np.percentile(image, [1, 99]))
    gray = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    palette = np.asarray(_PALETTE, dtype=np.float32)
    scale = max(1, min(8, math.ceil(_PREVIEW_MIN_SIDE / max(1, min(image.shape[1:])))))
    tiles = []
    for d in picks:
        rgb = np.repeat(gray[d][..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)
        labelled = classes[d] > 0
        colour = palette[classes[d] % len(_PALETTE)]  # (H, W) -> (H, W, 3)
        rgb[labelled] = 0.45 * rgb[labelled] + 0.55 * colour[labelled]
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)  # nearest upscaling
        tiles += [rgb, np.zeros((rgb.shape[0], 4, 3), np.float32)]
    return np.concatenate(tiles[:-1], axis=1).round().astype(np.uint8)


def png_bytes(rgb: Any) -> bytes:
    """Encode an ``(h, w, 3)`` uint8 array as a PNG (8-bit RGB, no filtering); standard library only.

    Raises:
        ValueError: when ``rgb`` is not ``(h, w, 3)`` uint8.
    """
    import numpy as np

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"png_bytes expects an (h, w, 3) uint8 array, got shape {rgb.shape} {rgb.dtype}.")
    height, width = rgb.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def _check_output_file(flag: str, path: Path) -> None:
    """Refuse an output file that cannot be written (a folder, no parent folder, read-only), naming ``flag``."""
    try:
        check_writable(path)
    except OSError as error:
        raise CommandError(f"{flag} '{path}': {error}") from error


def _output_paths(cases: list[Any], output: Path, created: list[Path]) -> dict[str, Path]:
    """The label map file of every case; creates the folders they need, appending them to ``created``."""
    ids = [c.case_id for c in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise CommandError(f"--input holds several cases named {repeated}; case names must be unique.")
    if _case_id(output) is not None:
        if len(cases) != 1:
            raise CommandError(
                f"--output '{output}' is a file name but --input holds {len(cases)} cases; pass a folder."
            )
        targets = {ids[0]: output}
    elif output.exists() and not output.is_dir():
        raise CommandError(
            f"--output '{output}' exists and is not a folder; pass a folder or a .nii.gz name."
        )
    else:
        targets = {i: output / f"{i}.nii.gz" for i in ids}
    inputs = {Path(p).resolve() for c in cases for p in c.images}
    clobbered = sorted(str(t) for t in targets.values() if t.resolve() in inputs)
    if clobbered:
        raise CommandError(f"--output would overwrite input image(s) {clobbered}; write to another folder.")
    for folder in sorted({t.parent for t in targets.values()}):
        missing = [f for f in (folder, *folder.parents) if not f.exists()]
        try:
            for new_folder in reversed(missing):  # outermost first
                try:
                    new_folder.mkdir()
                except FileExistsError:  # made meanwhile by someone else: not ours to remove
                    continue
                created.append(new_folder)
        except OSError as error:
            raise CommandError(
                f"--output '{output}': cannot create the folder '{folder}' ({error.strerror or error}); create "
                "it, or pass a folder you can write to."
            ) from error
    for target in {t.parent: t for t in targets.values()}.values():  # one check per folder
        try:
            check_writable(target)
        except OSError as error:
            raise CommandError(f"--output '{output}': {error}") from error
    return targets


def _device(text: str | None) -> str:
    """The ``--device`` to run on, checked before any work: cpu, cuda or cuda:N (when visible), mps (when available)."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise CommandError(
            f"--device '{text}' is not a device ({error}); use cpu, cuda, cuda:N or mps."
        ) from error
    if device.type not in ("cpu", "cuda", "mps"):
        raise CommandError(
            f"--device '{text}': '{device.type}' devices are not supported; use cpu, cuda, cuda:N or mps."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {text}: Apple's MPS backend is not available here; use --device cpu.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {text}: no CUDA GPU is visible; use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CommandError(
            f"--device {text}: only {torch.cuda.device_count()} CUDA GPU(s) are visible (cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1})."
        )
    return text


def _check_roi(roi: tuple[int, ...], model: Any, source: str) -> None:
    """Refuse windows the backbone cannot embed: every side positive, H and W at least the smallest slice it takes
    (one patch; SegFormer more, :func:`~medtuning_peft.volumetric.min_slice_size`)."""
    from .volumetric import min_slice_size

    mh, mw = min_slice_size(model.backbone)
    if len(roi) == 3 and min(roi) >= 1 and roi[1] >= mh and roi[2] >= mw:
        return
    raise CommandError(
        f"{source} is {list(roi)}; expected D H W with D >= 1, H >= {mh} and W >= {mw} (the smallest slice the "
        f"backbone embeds). Pass e.g. --roi-size {max(roi[0], 1) if roi else 1} {max(32, mh)} {max(32, mw)}, or "
        "the training crop size."
    )


def _preview_path(output: Path) -> Path:
    case_id = _case_id(output) or output.name
    return output.with_name(f"{case_id}.png")


def _et_min_voxels(
    args: argparse.Namespace, configs: dict[str, dict[str, Any]], label_values: list[int]
) -> int:
    """BraTS' small-ET rule to apply: ``--et-min-voxels``, else what training validated the models with (0: none)."""
    if args.et_min_voxels is None:
        recorded = {source: int(config.get("brats_et_min_voxels") or 0) for source, config in configs.items()}
        if len(set(recorded.values())) > 1:
            raise CommandError(
                f"the --model models were validated with different BraTS small-ET rules ({recorded}: enhancing "
                "tumour voxels below which it is relabelled as necrosis); pass --et-min-voxels N to choose one."
            )
        return next(iter(recorded.values()))
    if args.et_min_voxels and sorted(label_values) != [0, 1, 2, 4]:
        raise CommandError(
            f"--et-min-voxels applies to BraTS models (labels 0, 1, 2, 4); --model '{args.model[0]}' writes "
            f"labels {label_values}."
        )
    return args.et_min_voxels


def _overlap_of(args: argparse.Namespace, configs: dict[str, dict[str, Any]]) -> float:
    """``--overlap``, else the window overlap training validated the models with, else the reference's."""
    if args.overlap is not None:
        return args.overlap
    recorded = {}
    for source, config in configs.items():
        value = config.get("sw_overlap")  # recorded by training.py
        if value is not None and not (isinstance(value, float | int) and 0.0 <= value < 1.0):
            raise CommandError(
                f"segmenter_config.json of --model '{source}' has sw_overlap {value!r}; expected a fraction in "
                "[0, 1). Restore it, or pass --overlap."
            )
        recorded[source] = value
    values = set(recorded.values())
    if len(values) > 1:  # a model without a record (saved outside training.py) disagrees as well
        shown = {k: "not recorded" if v is None else v for k, v in recorded.items()}
        raise CommandError(
            f"the --model models were validated with different window overlaps ({shown}); pass --overlap to "
            "choose one."
        )
    value = values.pop()
    return REFERENCE_OVERLAP if value is None else float(value)


# What the models of an ensemble must share: the same input and the same classes, in the same order.
_ENSEMBLE_FIELDS = ("in_channels", "num_classes", "label_values", "channel_names", "preprocessing")


def _check_ensemble(configs: dict[str, dict[str, Any]]) -> None:
    """Refuse to average models that see different inputs or predict different classes."""
    (first, reference), *others = configs.items()

    from .data import channel_key

    def field(config: dict[str, Any], name: str) -> Any:
        if name == "label_values":
            return [int(v) for v in config.get("label_values") or range(int(config["num_classes"]))]
        if name == "channel_names":  # one spelling per sequence: BraTS' "t1ce" is the Decathlon's "t1gd"
            return [channel_key(n) for n in config.get(name) or ()] or None
        return config.get(name) or None

    for source, config in others:
        for name in _ENSEMBLE_FIELDS:
            if name == "channel_names" and not (field(config, name) and field(reference, name)):
                continue  # recorded by the training engine only; the channel count is compared anyway
            if field(config, name) != field(reference, name):
                raise CommandError(
                    f"--model '{source}' cannot be averaged with --model '{first}': segmenter_config.json "
                    f"field '{name}' is {field(config, name)!r} there and {field(reference, name)!r} here. "
                    "Ensemble models trained on the same data with the same preprocessing and labels (e.g. the "
                    "folds of one cross-validation)."
                )


def _load_models(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """``--model`` source -> loaded segmenter, with CUDA graphs enabled when asked."""
    from .volumetric import from_pretrained

    models = {}
    for source in args.model:
        try:
            model = from_pretrained(source, device=device, revision=args.revision)
        except Exception as error:
            raise CommandError(f"cannot load --model '{source}': {type(error).__name__}: {error}") from error
        if args.cuda_graphs:
            from .tuners.med_adapter import enable_cuda_graphs, has_med_adapter

            if not has_med_adapter(model):
                raise CommandError(f"--cuda-graphs: --model '{source}' has no Med-Adapter to graph.")
            enable_cuda_graphs(model)
        models[source] = model
    return models


def _channel_orders(cases: list[Any], model_names: tuple[str, ...]) -> dict[str, list[int]]:
    """Case id -> the channel indices that put the case's named channels in the model's order, where that order
    differs (an MSD task listing (ADC, T2) for a model trained on (T2, ADC)); warns where the names differ."""
    from .data import channel_order

    orders: dict[str, list[int]] = {}
    said: set[tuple[str, ...]] = set()
    for case in cases:
        names = tuple(case.channel_names)
        if not names or len(names) != len(model_names):  # unnamed (plain files), or refused for their count
            continue
        order = channel_order(names, model_names)
        same = order == list(range(len(names)))
        if order is not None and not same:
            orders[case.case_id] = order
        if same or names in said:
            continue
        said.add(names)
        if order is None:
            _log(
                f"warning: --input channels {list(names)} are not the model's {list(model_names)} (as recorded in "
                "its segmenter_config.json); predicting with them in their order. Check that they are the same "
                "sequences."
            )
        else:
            _log(f"--input channels {list(names)} are given to the model in its order {list(model_names)}.")
    return orders


def _remove_empty_folders(folders: list[Path]) -> None:
    """Removes those of ``folders`` (created by this command, outermost first) that are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # not empty (something was written there) or already gone
            folder.rmdir()


def _cmd_predict(args: argparse.Namespace) -> int:
    if len(set(args.model)) != len(args.model):
        raise CommandError(f"--model names a model twice ({args.model}); name each model once.")
    device = _device(args.device)
    if args.cuda_graphs and not device.startswith("cuda"):  # before the (possibly downloaded) model loads
        raise CommandError(f"--cuda-graphs needs a CUDA device; --device is {device}.")
    cases, layout = _prediction_cases(Path(args.input), args.split)
    created: list[Path] = []  # output folders this run made: removed again if nothing lands in them
    try:
        outputs = _output_paths(cases, Path(args.output), created)
        return _predict(args, device, cases, layout, outputs)
    finally:
        _remove_empty_folders(created)


def _predict(
    args: argparse.Namespace, device: str, cases: list[Any], layout: str, outputs: dict[str, Path]
) -> int:
    """Loads the model and writes the label map of every case to ``outputs``; returns the exit status."""
    import nibabel as nib
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .data import load_case
    from .evaluation import postprocess_brats_et, sliding_window_predict

    models = _load_models(args, device)
    configs = {source: model.segmenter_config for source, model in models.items()}
    _check_ensemble(configs)
    source, config = next(iter(configs.items()))  # the fields the models share
    in_channels = int(config["in_channels"])
    num_classes = int(config["num_classes"])
    label_values = [int(v) for v in config.get("label_values") or range(num_classes)]
    windows = {}  # --model source -> window (D, H, W): each model's training crop unless --roi-size
    for name, model in models.items():
        roi = tuple(args.roi_size or configs[name].get("crop_size") or ())
        if len(roi) != 3:
            raise CommandError(
                f"segmenter_config.json of --model '{name}' records no crop_size; pass --roi-size D H W "
                "(the training crop size)."
            )
        _check_roi(roi, model, "--roi-size" if args.roi_size else f"crop_size of --model '{name}'")
        windows[name] = roi
    declared = {len(c.channel_names) for c in cases if c.channel_names}
    if declared and declared != {in_channels}:
        raise CommandError(
            f"--input '{args.input}' ({layout}) has {sorted(declared)} channel(s) per case but the model "
            "takes "
            f"{in_channels}; use a model trained on this data set's modalities."
        )
    # Recorded by training.py (the named ones agree, _check_ensemble); a model saved otherwise may have none.
    names = next((tuple(c["channel_names"]) for c in configs.values() if c.get("channel_names")), ())
    orders = _channel_orders(cases, names)
    if len(names) != in_channels:
        names = ("image",) if in_channels == 1 else tuple(f"channel {i}" for i in range(in_channels))
    values = tuple(sorted(set(label_values) | {0}))
    cases = [
        dataclasses.replace(c, channel_names=c.channel_names or names, label_values=values) for c in cases
    ]
    preprocessing = _preprocessing(config, source, args.modality, cases[0])
    overlap = _overlap_of(args, configs)
    dtype = np.uint8 if max(label_values) <= 255 else np.int16
    et_min_voxels = _et_min_voxels(args, configs, label_values)
    if et_min_voxels:  # BraTS' label values 0, 1, 2, 4 (_et_min_voxels)
        class_of = np.zeros(max(label_values) + 1, dtype=np.int64)  # label value -> class index k
        class_of[label_values] = np.arange(len(label_values))
    shown = sorted(set(windows.values()))
    print(
        f"medtuning predict: {len(cases)} case(s) ({layout}) on {device}"
        f"{f', {len(models)} models averaged' if len(models) > 1 else ''}, "
        f"window {shown[0] if len(shown) == 1 else shown}, overlap {overlap}"  # exact: 0.671875 is stride 42
        f"{', flip TTA' if args.flip_tta else ''}",
        file=sys.stderr,
    )

    failures: dict[str, str] = {}
    for files in tqdm(cases, desc="predict", unit="case", disable=args.no_progress or None):
        target = outputs[files.case_id]
        written_now: list[Path] = []  # this case's files this run wrote (the others are from earlier runs)
        try:
            problem = _check_dims(files, in_channels) if len(files.images) == 1 else None
            if problem is not None:
                raise ValueError(problem)
            case = load_case(files, preprocessing)
            image = case.image if files.case_id not in orders else case.image[orders[files.case_id]]
            volume = torch.from_numpy(np.ascontiguousarray(image))[None]  # (C, D, H, W) -> (1, C, D, H, W)
            total = None  # (1, K, D, H, W): the models' summed probabilities, whose argmax is their mean's
            for name, model in models.items():
                probs = sliding_window_predict(
                    model,
                    volume,
                    roi_size=windows[name],
                    overlap=overlap,
                    sw_batch_size=args.sw_batch_size,
                    flip_tta=args.flip_tta,
                    num_classes=num_classes,
                    device="cpu",
                    padding_value=case.background_value,  # what training crops were padded with
                )
                total = probs if total is None else total.add_(probs)
            classes = total.argmax(dim=1)[0].numpy()  # (1, K, D, H, W) -> (D, H, W)
            labels = np.asarray(label_values, dtype=dtype)[classes]
            if et_min_voxels:  # counted on the image file's grid, also for a model with a target spacing
                original = case.geometry.to_original(labels) if case.geometry.is_resampled else None
                labels = postprocess_brats_et(labels, et_min_voxels, counted_on=original)
                classes = class_of[labels]  # the preview shows the labels written
            image = case.geometry.to_nifti(labels, dtype=dtype)
            try:
                with atomic_path(target) as tmp:
                    nib.save(image, str(tmp))
            except OSError as error:
                raise OSError(
                    f"case '{files.case_id}': cannot write the label map '{target}' (--output): "
                    f"{error.strerror or error}"
                ) from error
            written_now.append(target)
            if args.preview:
                atomic_write_bytes(_preview_path(target), png_bytes(_preview_rgb(case.image[0], classes)))
        except Exception as error:  # one bad case must not stop the batch
            message = (
                str(error)
                if str(error).startswith("case '")
                else (f"case '{files.case_id}', file '{files.images[0]}': {type(error).__name__}: {error}")
            )
            # Atomic writes leave an earlier run's file of the case in place: evaluate would score it.
            stale = [f for f in (target, _preview_path(target)) if f not in written_now and f.exists()]
            if stale:
                scored = "; medtuning evaluate would score its label map" if target in stale else ""
                message += (
                    f" (--output still holds {[str(f) for f in stale]} from an earlier run, not overwritten"
                    f"{scored}: remove them or predict the case again)"
                )
            failures[files.case_id] = message
            _log(f"FAILED {message}")
    written = len(cases) - len(failures)
    print(f"medtuning predict: wrote {written} label map(s) to '{args.output}'.", file=sys.stderr)
    if failures:
        _failure_report("predict", failures, len(cases))
        return 1
    return 0


# -----------------------------------------------------------------------------------------------------
# evaluate
# -----------------------------------------------------------------------------------------------------


def _label_files(labels: Path) -> tuple[dict[str, Path], Path | None]:
    """Label files by case name, and the ``dataset.json`` found with them (MSD)."""
    from .data import (
        CaseLoadError,
        NoCasesError,
        brats_case_files,
        is_one_brats_case,
        kits19_case_files,
        list_brats_cases,
        list_kits19_cases,
        read_msd_task,
    )
    from .data.kits19 import KITS19_CASE_PATTERN

    dataset_json = next(
        (p for p in (labels / "dataset.json", labels.parent / "dataset.json") if p.is_file()), None
    )
    if labels.is_file():
        case_id = _case_id(labels)
        if case_id is None:
            raise CommandError(f"--labels '{labels}' is not a NIfTI file or a folder.")
        return {_strip_label_suffix(case_id): labels}, dataset_json
    if not labels.is_dir():
        raise CommandError(f"--labels '{labels}' does not exist; pass the folder of ground-truth label maps.")
    try:
        if (labels / "dataset.json").is_file():
            found = {c.case_id: c.label for c in read_msd_task(labels).training}
        elif any(d.is_dir() and KITS19_CASE_PATTERN.match(d.name) for d in labels.iterdir()):
            found = {c.case_id: c.label for c in list_kits19_cases(labels) if c.label is not None}
        elif _is_one_kits19_case(labels) or _is_one_kits19_case(labels, "segmentation"):
            case = kits19_case_files(os.path.abspath(labels))
            found = {case.case_id: case.label} if case.label is not None else {}
        elif is_one_brats_case(labels):
            case = brats_case_files(labels)
            found = {case.case_id: case.label} if case.label is not None else {}
        elif files := _nifti_files(labels):
            by_case: dict[str, list[Path]] = {}
            for case_id, path in _unique(files, f"--labels '{labels}'").items():
                by_case.setdefault(_strip_label_suffix(case_id), []).append(path)
            for case_id, paths in by_case.items():
                if len(paths) > 1:
                    raise CommandError(
                        f"--labels '{labels}': {len(paths)} files name case '{case_id}' "
                        f"({', '.join(p.name for p in paths)}); keep one label map per case there (images "
                        "belong in another folder)."
                    )
            found = {case_id: paths[0] for case_id, paths in by_case.items()}
        else:
            try:
                found = {c.case_id: c.label for c in list_brats_cases(labels) if c.label is not None}
            except NoCasesError:  # no layout fits: said below
                found = {}
    except CaseLoadError as error:
        raise CommandError(f"--labels '{labels}': {error}") from error
    if not found:
        raise CommandError(
            f"--labels '{labels}' holds no label map: no .nii/.nii.gz file, no MSD dataset.json and no "
            "KiTS19/BraTS case folder with a segmentation."
        )
    return found, dataset_json


def _read_label_map(path: Path, case_id: str, role: str, allowed: Sequence[int]) -> tuple[Any, Any]:
    import numpy as np

    from .data import CaseLoadError, read_nifti
    from .data.case import case_error

    data, image = read_nifti(path, case_id=case_id, role=role, as_label=True)
    if data.ndim != 3:
        raise CaseLoadError(
            case_error(
                case_id, path, f"{role} has shape {data.shape}; expected a 3D label map", "pass 3D files"
            )
        )
    if np.issubdtype(data.dtype, np.floating) and not (
        np.all(np.isfinite(data)) and np.array_equal(data, np.rint(data))
    ):
        raise CaseLoadError(
            case_error(case_id, path, f"{role} has non-integer or NaN/Inf values", "store labels as integers")
        )
    data = data.astype(np.int64)
    unexpected = sorted(set(np.unique(data).tolist()) - set(allowed))
    if unexpected:
        raise CaseLoadError(
            case_error(
                case_id,
                path,
                f"{role} has values {unexpected} outside the task's labels {list(allowed)}",
                "check --task (and --dataset-json for MSD) or remap the labels",
            )
        )
    return data, image


def _score_case(
    case_id: str, pred_path: Path | None, gt_path: Path, args: argparse.Namespace, spec: Any, labels: Any
) -> dict[str, float]:
    """The metrics of one case; ``pred_path`` None scores an empty prediction (``--missing empty``)."""
    import nibabel as nib
    import numpy as np

    from .data import CaseLoadError
    from .data.case import case_error
    from .data.nifti import AFFINE_TOLERANCE_MM, _check_same_grid, _in_other_voxel_order
    from .evaluation import evaluate_case

    gt, gt_image = _read_label_map(gt_path, case_id, "label", spec.label_values)
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(gt_image.affine))  # in array axis order
    if pred_path is None:
        empty = np.zeros_like(gt)
        return evaluate_case(args.task, empty, gt, spacing, labels=labels, with_hd95=not args.no_hd95)
    pred, pred_image = _read_label_map(pred_path, case_id, "prediction", spec.label_values)
    if _in_other_voxel_order(pred.shape, pred_image.affine, gt.shape, gt_image.affine):
        # e.g. re-saved in RAS order by another tool: the data layer's message names the reorder fix
        _check_same_grid(
            case_id, gt_path, gt.shape, gt_image.affine, pred_path, pred.shape, pred_image.affine
        )
    if pred.shape != gt.shape:
        raise CaseLoadError(
            case_error(
                case_id,
                pred_path,
                f"prediction shape {pred.shape} differs from shape {gt.shape} of label '{gt_path}'",
                "predict on the original image (medtuning predict writes the input's grid)",
            )
        )
    if not np.allclose(pred_image.affine, gt_image.affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        raise CaseLoadError(
            case_error(
                case_id,
                pred_path,
                f"prediction affine\n{np.round(pred_image.affine, 4)}\ndiffers from that of label "
                f"'{gt_path}'\n"
                f"{np.round(gt_image.affine, 4)}",
                "predict on the original image, or re-header the prediction onto the label's grid",
            )
        )
    return evaluate_case(args.task, pred, gt, spacing, labels=labels, with_hd95=not args.no_hd95)


def _format_table(per_case: dict[str, dict[str, float]], summary: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(per_case.values())))
    rows = [["case", *keys]]
    rows += [[case, *(f"{scores[k]:.4f}" for k in keys)] for case, scores in per_case.items()]
    rows += [[stat, *(f"{summary[k][stat]:.4f}" for k in keys)] for stat in ("mean", "std", "median")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1 : 1 + len(per_case)], rule, *lines[1 + len(per_case) :]])


def _csv_text(per_case: dict[str, dict[str, float]], summary: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(per_case.values())))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", *keys])
    for case, scores in per_case.items():
        writer.writerow([case, *(repr(float(scores[k])) for k in keys)])
    for stat in ("mean", "std", "median"):
        writer.writerow([stat, *(repr(float(summary[k][stat])) for k in keys)])
    return buffer.getvalue()


_MISSING_LEVEL = {"fail": "FAILED", "empty": "note", "skip": "note"}
_MISSING_MEANING = {
    "fail": "the summary covers only the predicted cases. Pass --missing empty to score each as an empty "
    "prediction (as the challenges score a case without a submission), or --missing skip to score only the "
    "predicted cases (e.g. one fold against all labels).",
    "empty": "each is scored as an empty prediction and counted in the summary (--missing empty).",
    "skip": "they are left out of the summary (--missing skip).",
}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .evaluation import get_challenge, summarize
    from .io_utils import read_json_file

    for flag, value in (("--output", args.output), ("--csv", args.csv)):
        if value:  # before any scoring: a bad destination would otherwise show only at the end
            _check_output_file(flag, Path(value))
    pred_dir, labels_dir = Path(args.pred), Path(args.labels)
    if pred_dir.is_file() and _case_id(pred_dir) is not None:
        preds = {_case_id(pred_dir): pred_dir}
    elif pred_dir.is_dir():
        preds = _unique(_nifti_files(pred_dir), f"--pred '{pred_dir}'")
    elif pred_dir.exists():
        raise CommandError(
            f"--pred '{pred_dir}' is not a NIfTI file; pass a .nii/.nii.gz label map or the folder written by "
            "medtuning predict."
        )
    else:
        raise CommandError(
            f"--pred '{pred_dir}' does not exist; pass the folder written by medtuning predict."
        )
    if not preds:
        raise CommandError(f"--pred folder '{pred_dir}' holds no .nii/.nii.gz prediction.")
    gts, found_json = _label_files(labels_dir)
    if pred_dir.is_file():  # one prediction file scores that one case: the other labels are not missing
        gts = {case_id: path for case_id, path in gts.items() if case_id in preds}

    labels = None
    if args.task == "msd":
        source = Path(args.dataset_json) if args.dataset_json else found_json
        if source is None:
            raise CommandError(
                "--task msd needs the task's labels: pass --dataset-json PATH (the MSD dataset.json), or "
                "keep "
                "dataset.json in or above the --labels folder."
            )
        try:
            labels = read_json_file(source, "dataset.json")["labels"]
        except (KeyError, TypeError) as error:
            raise CommandError(
                f"'{source}' has no 'labels' dict; pass the task's MSD dataset.json."
            ) from error
        except (OSError, ValueError) as error:
            raise CommandError(str(error)) from error
    elif args.dataset_json:
        raise CommandError(f"--dataset-json is only read by --task msd; the {args.task} labels are fixed.")
    try:
        spec = get_challenge(args.task, labels)
    except ValueError as error:
        raise CommandError(str(error)) from error

    # A labelled case without a prediction is never left out of the summary unnoticed: it fails the command,
    # is scored as an empty prediction, or is left out on request (one fold's predictions against all labels).
    missing = sorted(set(gts) - set(preds))
    to_score = sorted(set(preds) | set(missing if args.missing == "empty" else ()))
    per_case: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    for case_id in tqdm(to_score, desc="evaluate", unit="case", disable=args.no_progress or None):
        pred_path, gt_path = preds.get(case_id), gts.get(case_id)
        if gt_path is None:
            failures[case_id] = (
                f"prediction '{pred_path}' has no label map named '{case_id}' under '{labels_dir}'"
            )
            continue
        try:
            per_case[case_id] = _score_case(case_id, pred_path, gt_path, args, spec, labels)
        except Exception as error:  # one bad case must not stop the others
            text = str(error)
            failures[case_id] = (
                text if text.startswith("case '") else f"case '{case_id}': {type(error).__name__}: {text}"
            )
            _log(f"FAILED {failures[case_id]}")

    if per_case:
        summary = summarize(list(per_case.values()))
        print(_format_table(per_case, summary))
        result = {
            "task": args.task,
            "predictions": str(pred_dir),
            "labels": str(labels_dir),
            "regions": {k: list(v) for k, v in spec.regions.items()},
            "num_cases": len(per_case),
            "summary": summary,
            "per_case": per_case,
            "failed": failures,
            "missing_predictions": missing,
            "missing_policy": args.missing,  # --missing: fail, empty (scored as empty predictions) or skip
        }
        if args.output:
            atomic_write_json(args.output, result)
            print(f"wrote {args.output}", file=sys.stderr)
        if args.csv:
            atomic_write_text(args.csv, _csv_text(per_case, summary))
            print(f"wrote {args.csv}", file=sys.stderr)
    if missing:
        print(
            f"medtuning evaluate: {_MISSING_LEVEL[args.missing]}: {len(missing)} of {len(gts)} labelled "
            f"case(s) have no prediction in '{pred_dir}' (first: {missing[:5]}); "
            + _MISSING_MEANING[args.missing],
            file=sys.stderr,
        )
    if failures:
        _failure_report("evaluate", failures, len(to_score))
    if not per_case:
        print("medtuning evaluate: no case could be scored; nothing written.", file=sys.stderr)
    return 1 if failures or not per_case or (missing and args.missing == "fail") else 0


# -----------------------------------------------------------------------------------------------------
# verify-data
# -----------------------------------------------------------------------------------------------------


def _verify_case(files: Any, require_label: bool) -> list[str]:
    """Every problem of one case (each message names the case and the file)."""
    import warnings

    import numpy as np

    from .data import CaseLoadError, read_nifti
    from .data.case import case_error
    from .data.nifti import _check_affine, _check_same_grid

    problems: list[str] = []
    reference: tuple[Path, tuple[int, ...], Any] | None = None

    def check(test: Callable[..., None], *args: Any) -> None:
        """Runs one of the data layer's checks (what training's loader refuses), recording its message."""
        try:
            test(files.case_id, *args)
        except CaseLoadError as error:
            problems.append(str(error))

    def read(path: Path, **options: Any) -> tuple[Any, Any]:
        """read_nifti; what it only warns about (no orientation, a qform and an sform that disagree) is recorded
        as a problem."""
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            result = read_nifti(path, case_id=files.case_id, **options)
        problems.extend(str(w.message) for w in warned if issubclass(w.category, UserWarning))
        return result

    single = len(files.images) == 1
    channels, readable = 0, True
    for index, path in enumerate(files.images):
        role = files.channel_names[index] if not single and index < len(files.channel_names) else "image"
        try:
            data, image = read(path, role=role)
        except CaseLoadError as error:
            problems.append(str(error))
            readable = False
            continue
        if data.ndim not in ((3, 4) if single else (3,)):
            problems.append(
                case_error(
                    files.case_id,
                    path,
                    f"{role} has shape {data.shape}; expected a 3D volume"
                    + (" (or 4D with channels last)" if single else ""),
                    "pass a volumetric NIfTI",
                )
            )
            readable = False
            continue
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            problems.append(
                case_error(
                    files.case_id, path, f"{role} has {bad} NaN/Inf voxels", "repair or exclude the case"
                )
            )
        affine = image.affine
        check(_check_affine, Path(path), affine)
        if reference is None:
            reference = (Path(path), tuple(data.shape[:3]), affine)
        else:
            check(_check_same_grid, *reference, Path(path), tuple(data.shape[:3]), affine)
        channels += data.shape[3] if data.ndim == 4 else 1
        del data
    if readable and files.channel_names and channels != len(files.channel_names):
        declared = len(files.channel_names)
        fix = "add the missing modalities" if channels < declared else f"pass images of {declared} channel(s)"
        if files.dataset == "msd":
            fix += " or fix dataset.json 'modality'"
        problems.append(
            case_error(
                files.case_id,
                files.images[0],
                f"found {channels} channel(s) but the data set declares {declared} {list(files.channel_names)}",
                fix,
            )
        )

    if files.label is None:
        if require_label:
            # Where the reader looks for it (KiTS19: segmentation.nii.gz; BraTS: <case>_seg.nii.gz).
            expected = {"kits19": "segmentation.nii.gz", "brats": f"{files.case_id}_seg.nii.gz"}.get(
                files.dataset
            )
            where = Path(files.images[0]).parent / expected if expected else None
            problems.append(
                case_error(
                    files.case_id,
                    where,
                    "label file not found" if where else "has no label file",
                    "add the segmentation or drop the case",
                )
            )
        return problems
    try:
        label, image = read(files.label, role="label", as_label=True)
    except CaseLoadError as error:
        return [*problems, str(error)]
    path = Path(files.label)
    if label.ndim != 3:
        problems.append(
            case_error(
                files.case_id, path, f"label has shape {label.shape}; expected 3D", "pass a 3D label map"
            )
        )
        return problems
    if reference is not None:
        check(_check_same_grid, *reference, path, tuple(label.shape), image.affine)
    if np.issubdtype(label.dtype, np.floating) and not (
        np.all(np.isfinite(label)) and np.array_equal(label, np.rint(label))
    ):
        problems.append(
            case_error(
                files.case_id, path, "label has non-integer or NaN/Inf values", "store labels as integers"
            )
        )
    else:
        unexpected = sorted(set(np.unique(label).astype(np.int64).tolist()) - set(files.label_values))
        if unexpected:
            problems.append(
                case_error(
                    files.case_id,
                    path,
                    f"label has values {unexpected} outside the allowed {list(files.label_values)}",
                    "check that this is this data set's segmentation",
                )
            )
    return problems


def _cmd_verify_data(args: argparse.Namespace) -> int:
    import warnings

    from tqdm.auto import tqdm

    from .data import CaseLoadError, brats_case_files, kits19_case_files, read_msd_task
    from .data.brats import brats_case_dirs
    from .data.kits19 import kits19_case_dirs, skipped_kits19_folders

    if args.output:  # before any case: a bad destination would otherwise show only at the end
        _check_output_file("--output", Path(args.output))
    data_dir = Path(args.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise CommandError(
            f"--data-dir '{data_dir}' is a file; pass the data set's folder (KiTS19 data/, BraTS release "
            "folder or MSD task folder)."
        )
    skipped: list[Path] = []
    unlabeled_by_design: set[str] = set()  # MSD test images: the Decathlon gives them no label
    problems: dict[str, list[str]] = {}
    cases = []
    try:
        if args.task == "kits19":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the skipped folders are reported as problems below
                case_dirs = kits19_case_dirs(data_dir)
            skipped = skipped_kits19_folders(data_dir)
        elif args.task == "brats":
            case_dirs = brats_case_dirs(data_dir)
        else:
            task = read_msd_task(data_dir)
            cases = [*task.training, *task.test]
            unlabeled_by_design = {c.case_id for c in task.test}
    except (CaseLoadError, FileNotFoundError) as error:
        raise CommandError(f"--data-dir '{data_dir}' ({args.task}): {error}") from error
    if args.task != "msd":
        # Case by case: one folder that cannot be listed (two files for one role) is one problem among the others.
        case_files = kits19_case_files if args.task == "kits19" else brats_case_files
        for folder in case_dirs:
            try:
                cases.append(case_files(folder))
            except CaseLoadError as error:
                problems[folder.name] = [str(error)]
    listed = len(cases) + len(problems)

    for files in tqdm(cases, desc="verify-data", unit="case", disable=args.no_progress or None):
        found = _verify_case(files, args.require_labels and files.case_id not in unlabeled_by_design)
        if found:
            problems[files.case_id] = found
    for folder in skipped:
        problems[folder.name] = [
            f"folder '{folder}' is not named case_XXXXX (5 digits), so it is skipped. Fix: rename it to "
            "case_XXXXX if it is a case, or move it out of --data-dir"
        ]
    unlabeled = sum(
        1 for c in cases if c.label is None and (not args.require_labels or c.case_id in unlabeled_by_design)
    )
    count = sum(len(v) for v in problems.values())
    note = f", {unlabeled} without label (prediction-only)" if unlabeled else ""
    print(f"medtuning verify-data: checked {listed} {args.task} case(s) in '{data_dir}'{note}.")
    if args.output:
        atomic_write_json(
            args.output,
            {"task": args.task, "data_dir": str(data_dir), "cases": listed, "problems": problems},
        )
    if not problems:
        print("No problems found.")
        return 0
    print(f"{count} problem(s) in {len(problems)} case(s):", file=sys.stderr)
    for case_id, found in problems.items():
        print(f"{case_id}:", file=sys.stderr)
        for message in found:
            print("  - " + message.replace("\n", "\n    "), file=sys.stderr)
    return 1


# -----------------------------------------------------------------------------------------------------
# push
# -----------------------------------------------------------------------------------------------------


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import build_model_card, check_push, files_to_upload, push_to_hub

    try:
        if args.dry_run:
            check_push(args.model, args.repo_id)  # what a real push checks, short of the network
            card = build_model_card(
                args.model,
                metrics=args.metrics,
                dataset=args.dataset,
                license=args.license,
                repo_id=args.repo_id,
                revision=args.revision,
            )
            print(card)
            print("Files that would be uploaded:", *files_to_upload(args.model), sep="\n  ", file=sys.stderr)
            return 0
        info = push_to_hub(
            args.model,
            args.repo_id,
            token=args.token,
            private=True if args.private else None,  # unset: the Hub's default for the user or organization
            commit_message=args.commit_message,
            commit_description=args.commit_description,
            create_pr=args.create_pr,
            dataset=args.dataset,
            metrics=args.metrics,
            license=args.license,
            revision=args.revision,
        )
    except Exception as error:
        raise CommandError(
            f"push of '{args.model}' to '{args.repo_id}' failed: {type(error).__name__}: {error}"
        ) from error
    print(f"medtuning push: uploaded '{args.model}' to {getattr(info, 'commit_url', args.repo_id)}")
    return 0


# -----------------------------------------------------------------------------------------------------
# cache
# -----------------------------------------------------------------------------------------------------

_CACHE_DIR_HELP = (
    "the cache folder given to training as --cache-dir (default: $MEDTUNING_CACHE, else "
    "$XDG_CACHE_HOME/medtuning_peft, else ~/.cache/medtuning_peft; its arrays/ subfolder holds the "
    "entries), or a folder given to load_cases(cache_dir=...)"
)


def _size(num_bytes: float) -> str:
    """``num_bytes`` in decimal units: ``812 B``, ``12.3 MB``, ``4.6 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{int(num_bytes)} B"


def _cache_folder(cache_dir: str | None, *, writable: bool) -> Path:
    """The folder holding the entries: ``<cache_dir>/arrays`` when it exists (training), else ``cache_dir``."""
    if cache_dir is None:
        from .training import default_cache_dir

        root = default_cache_dir()
        named = f"the default cache folder '{root}' (from $MEDTUNING_CACHE, $XDG_CACHE_HOME or ~/.cache)"
    else:
        root = Path(cache_dir).expanduser()
        named = f"--cache-dir '{root}'"
    fix = "pass --cache-dir with the folder given to training as --cache-dir or to load_cases(cache_dir=...)"
    if not root.exists():
        raise CommandError(f"{named} does not exist; {fix}.")
    if not root.is_dir():
        raise CommandError(f"{named} is not a folder; {fix}.")
    folder = root / "arrays" if (root / "arrays").is_dir() else root
    if not os.access(folder, os.R_OK | os.X_OK):
        raise CommandError(
            f"cache folder '{folder}' cannot be read (permission denied); run as a user who can read it."
        )
    if writable and not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(
            f"cache folder '{folder}' is not writable, so nothing can be removed from it; run as its owner "
            "or use --dry-run to see what would be removed."
        )
    return folder


def _state(entry: Any) -> str:
    return {True: "current", False: "stale", None: "unknown"}[entry.current]


def _count(entries: list[Any]) -> str:
    """``3 entries, 1.2 GB``."""
    size = _size(sum(e.size_bytes for e in entries))
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, {size}"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _cmd_cache(args: argparse.Namespace) -> int:
    pruning = args.prune_stale or args.prune_older_than is not None or args.max_size is not None
    if args.dry_run and not pruning:
        print(
            "medtuning cache: error: --dry-run shows what a prune would remove; add --prune-stale, "
            "--prune-older-than DAYS or --max-size GB.",
            file=sys.stderr,
        )
        return 2
    folder = _cache_folder(args.cache_dir, writable=pruning and not args.dry_run)

    from .data.cache import TEMPORARY_PREFIX, CaseCache

    cache = CaseCache(folder)
    result, temporaries = None, 0
    try:
        entries = cache.entries()
        others = sum(1 for p in folder.iterdir() if not p.name.startswith(TEMPORARY_PREFIX)) - len(entries)
        if pruning:
            result = cache.prune(
                stale=args.prune_stale,
                older_than_s=None if args.prune_older_than is None else args.prune_older_than * 86400.0,
                max_bytes=None if args.max_size is None else int(args.max_size * 1e9),
                dry_run=args.dry_run,
            )
            temporaries = cache.remove_temporaries(dry_run=args.dry_run)
    except OSError as error:
        raise CommandError(f"cache folder '{folder}': {error}") from error

    removing = "would remove" if args.dry_run else "removed"
    removed = {e.path for e in result.removed} if result else set()
    header = ["last used", "size", "state", "case", "entry", "note"]
    shown = entries if args.list or result is None else result.removed
    rows = [
        [
            time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)),
            _size(e.size_bytes),
            _state(e),
            e.case_id,
            e.path.name,
            e.reason,
        ]
        for e in shown
    ]
    if result is not None:  # which entries go: (action, *columns)
        header.insert(0, "action")
        rows = [[removing if e.path in removed else "kept", *row] for e, row in zip(shown, rows)]
    print(f"medtuning cache: '{folder}'")
    if rows:
        _print_table(header, rows)
    by_state = {s: [e for e in entries if _state(e) == s] for s in ("current", "stale", "unknown")}
    detail = "; ".join(f"{state}: {_count(found)}" for state, found in by_state.items() if found)
    print(f"total: {_count(entries)}" + (f" ({detail})" if detail else ""))
    if result is not None:
        print(f"{removing}: {_count(result.removed)}")
        print(f"{'would keep' if args.dry_run else 'kept'}: {_count(result.kept)}")
        if temporaries:
            print(
                f"{removing}: {temporaries} {TEMPORARY_PREFIX}* folder(s) of interrupted writes (over an hour old)"
            )
    if others > 0:
        print(f"left alone: {others} other item(s) in '{folder}' that are not cache entries")
    return 0


# -----------------------------------------------------------------------------------------------------
# Parser
# -----------------------------------------------------------------------------------------------------


def _overlap(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1); for a stride s use 1 - s / window.")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer.")
    return value


def _voxel_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a number of voxels >= 0; pass e.g. 500, or 0 for off."
        )
    return value


def _non_negative(what: str, example: str) -> Callable[[str], float]:
    """An argparse type: a finite number >= 0 of ``what``, refused with ``example`` in the message."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"'{text}' is not a number of {what} >= 0; pass e.g. {example}.")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``medtuning`` argument parser (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="medtuning",
        description="Run, score, check and share Med-Adapter segmenters on 3D medical images (NIfTI).",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="segment NIfTI volumes with a saved model",
        description="Segment NIfTI volumes with a saved segmenter: the model's saved preprocessing, "
        "sliding-window inference over the whole volume, and a label map written on the input's exact grid "
        "(shape, affine, header). Bad cases are reported and skipped; exit status 1 if any failed.",
    )
    predict.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="model directory (save_pretrained) or Hub id 'org/name'. Several models (e.g. the folds of one "
        "cross-validation, trained with the same preprocessing and labels) are ensembled: their class "
        "probabilities are averaged, each model predicting with its own training crop as window",
    )
    predict.add_argument("--revision", help="Hub revision of the --model Hub ids (branch, tag or commit)")
    predict.add_argument(
        "--input",
        required=True,
        help="a .nii/.nii.gz file; a folder of them (label maps named segmentation or *_seg, *_label, ... are "
        "skipped); an MSD task folder (dataset.json); KiTS19 case_XXXXX folders (or one); or BraTS case folders "
        "(or one). Multi-channel models take one 4D file per case, channels last (MSD)",
    )
    predict.add_argument(
        "--output",
        required=True,
        help="a .nii.gz file name (single case) or a folder (<case>.nii.gz per case)",
    )
    predict.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    predict.add_argument("--flip-tta", action="store_true", help="average over the 8 flips (8x slower)")
    predict.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the Med-Adapters' kernels as CUDA graphs (CUDA only; the same labels, fewer kernel launches)",
    )
    predict.add_argument(
        "--overlap",
        type=_overlap,
        help="window overlap in [0, 1) (default: the --sw-overlap training validated the model with, recorded "
        f"with it; else {REFERENCE_OVERLAP}, the reference stride 42 for 128-voxel windows)",
    )
    predict.add_argument(
        "--sw-batch-size", type=_positive, default=1, help="windows per forward pass (default 1)"
    )
    predict.add_argument(
        "--roi-size",
        type=_positive,
        nargs=3,
        metavar=("D", "H", "W"),
        help="window size (default: the model's crop_size)",
    )
    predict.add_argument(
        "--modality",
        choices=("CT", "MRI"),
        help="default normalization for models saved without preprocessing",
    )
    predict.add_argument(
        "--split",
        choices=("auto", "training", "test"),
        default="auto",
        help="images of an MSD task folder to segment (default: test if listed, else training)",
    )
    predict.add_argument(
        "--et-min-voxels",
        type=_voxel_count,
        metavar="N",
        help="BraTS: relabel a predicted enhancing tumour of fewer than N voxels as necrosis, 0: off (default: "
        "the value the model was validated with, recorded by training, 500 unless changed)",
    )
    predict.add_argument(
        "--preview", action="store_true", help="also write <case>.png: labels over 3 axial slices"
    )
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(func=_cmd_predict)

    evaluate = commands.add_parser(
        "evaluate",
        help="score predictions against labels with the challenge's conventions",
        description="Dice and HD95 per case and summary (mean, std, median) with each challenge's regions "
        "and empty-mask rules. Predictions and labels are matched by case name; shape or affine mismatches, "
        "unexpected label values and predictions without a label are reported per case (exit status 1), "
        "and so are labelled cases without a prediction unless --missing says how to score them.",
    )
    evaluate.add_argument(
        "--pred", required=True, help="folder of predicted label maps (<case>.nii.gz), or one such file"
    )
    evaluate.add_argument(
        "--labels",
        required=True,
        help="ground truth: a folder of label files (e.g. MSD labelsTr), an MSD task folder, KiTS19 case "
        "folders (or one) or BraTS case folders (or one)",
    )
    evaluate.add_argument("--task", required=True, choices=TASKS, help="challenge conventions")
    evaluate.add_argument(
        "--dataset-json", help="MSD dataset.json giving the labels (default: found with --labels)"
    )
    evaluate.add_argument("--output", help="write per-case metrics and the summary to this JSON file")
    evaluate.add_argument("--csv", help="write per-case metrics and the summary to this CSV file")
    evaluate.add_argument("--no-hd95", action="store_true", help="Dice only (HD95 is the slow part)")
    evaluate.add_argument(
        "--missing",
        choices=("fail", "empty", "skip"),
        default="fail",
        help="a labelled case without a prediction: fail (exit status 1, default), empty (score it as an "
        "empty prediction, as the challenges do), skip (leave it out: one fold's predictions against all "
        "labels)",
    )
    # The flag of earlier releases, whose default was to skip: it asked for what is now the default.
    evaluate.add_argument(
        "--require-all", action="store_const", const="fail", dest="missing", help=argparse.SUPPRESS
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_evaluate)

    verify = commands.add_parser(
        "verify-data",
        help="check every case of a data set before a long run",
        description="Check every case: files present and readable, 3D, no NaN/Inf, modalities complete, "
        "image "
        "and label on the same grid (shape and affine), label values expected. Lists every problem at once; "
        "exit status 1 if any.",
    )
    verify.add_argument("--task", required=True, choices=TASKS, help="data set layout")
    verify.add_argument(
        "--data-dir", required=True, help="KiTS19 data/, BraTS release folder, or MSD task folder"
    )
    verify.add_argument(
        "--require-labels",
        action="store_true",
        help="a case without label is a problem (MSD: a training case; its test images have none)",
    )
    verify.add_argument("--output", help="also write the problems to this JSON file")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(func=_cmd_verify_data)

    push = commands.add_parser(
        "push",
        help="upload a saved model with a generated model card to the Hugging Face Hub",
        description="Generate a model card (task, labels, data set and licence, metrics, settings, parameters, "
        "usage, citations) and upload it as the repository's README.md, with the saved segmenter's safetensors "
        "and JSON files (no other file of the folder), in one commit. The card is built in memory: nothing is "
        "written into the model folder (a README.md there is not uploaded); --dry-run prints it.",
    )
    push.add_argument("--model", required=True, help="model directory written by save_pretrained")
    push.add_argument("--repo-id", required=True, help="Hub repository 'org/name'")
    push.add_argument("--dataset", help="kits19, brats, msd, msd-hippocampus, or a data set name")
    push.add_argument("--metrics", help="metrics JSON (default: metrics.json in or above --model)")
    push.add_argument("--license", help="Hub licence id of the card (default: the data set's)")
    push.add_argument("--token", help="Hub token with write access (default: the logged-in user's)")
    push.add_argument(
        "--private",
        action="store_true",
        help="create the repository as private (default: the Hub's default for your account or organization)",
    )
    push.add_argument("--revision", help="branch to push to")
    push.add_argument("--commit-message", default="Upload Med-Adapter segmenter (medtuning_peft)")
    push.add_argument("--commit-description", help="longer description of the commit")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check of a real push, print the card and the file list; upload nothing",
    )
    push.set_defaults(func=_cmd_push)

    cache = commands.add_parser(
        "cache",
        help="list the decoded-volume cache and reclaim its space",
        description="List the entries of the decode-once cache (case, size, last use, whether current) and "
        "remove stale, unused or least recently used ones. An entry is stale when its source files or the "
        "cache version changed: it is never loaded again. Entries of other preprocessing parameters stay "
        "until unused or over the size budget (CaseCache.prune(cases=...) removes them by case). Only "
        "complete entry folders are removed, never other files or links; a removed entry is rebuilt when "
        "next needed. A prune also deletes the .tmp-* folders of interrupted writes older than an hour.",
    )
    cache.add_argument("--cache-dir", metavar="DIR", help=_CACHE_DIR_HELP)
    cache.add_argument(
        "--list", action="store_true", help="print every entry (the default when nothing is pruned)"
    )
    cache.add_argument(
        "--prune-stale",
        action="store_true",
        help="remove entries that can never be loaded again (source files changed, older cache version)",
    )
    cache.add_argument(
        "--prune-older-than",
        type=_non_negative("days", "30 or 0.5"),
        metavar="DAYS",
        help="remove entries not used for more than DAYS days",
    )
    cache.add_argument(
        "--max-size",
        type=_non_negative("gigabytes", "200 or 0.5"),
        metavar="GB",
        help="then remove least recently used entries until the cache holds at most GB gigabytes (1e9 bytes)",
    )
    cache.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    cache.set_defaults(func=_cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``medtuning``; returns the exit status.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except CommandError as error:
        print(f"medtuning: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("medtuning: interrupted; finished outputs are complete, none is half-written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
