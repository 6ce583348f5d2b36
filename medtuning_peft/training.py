"""One training engine for every example: data, model, Accelerate loop, validation, checkpoints, outputs.

``examples/train_kits.py``, ``train_msd.py`` and ``train_brats.py`` only pick the dataset and its defaults;
everything else is here::

    settings = TrainSettings(dataset="kits19", data_dir="data/kits19", output_dir="runs/kits")
    metrics = train(settings)                  # or: accelerate launch examples/train_kits.py --data-dir ...

What a run does:

- Data: lists the dataset's labelled cases (KiTS19, MSD ``dataset.json``, BraTS 2019/2020), splits them with a
  seeded hold-out or k-fold split, decodes every volume once into a memory-mapped cache
  (:class:`~medtuning_peft.data.CaseCache`) and draws foreground-biased random crops with flips and intensity
  jitter (:class:`~medtuning_peft.data.CropDataset`). Without ``data_dir`` a named built-in data set is written
  first (synthetic KiTS19-like CT or BraTS-like MRI in the real file layouts) and read through the same readers.
- Distribution: Accelerate (DDP, bf16 autocast of the training steps on CUDA, gradient accumulation). Each
  process gets whole crops (volumes), never part of a volume's slices: optimizer step ``t`` consumes the global batch
  ``perm[t*G : (t+1)*G]`` of the epoch's seeded permutation, ``G = batch_size * num_processes * accumulation``,
  micro-batch ``m`` of process ``p`` taking the ``p``-th ``batch_size`` slice of the ``m``-th chunk
  (:class:`ShardedBatchSampler`). So N processes with per-process batch b see exactly the samples of one process
  accumulating N micro-batches of b, and gradients are averaged the same way.
- Recipe (the paper's): Adam with AMSGrad (fused on CPU and CUDA), weight decay 1e-5, lr 2e-3 for
  adapters, linear warm-up over the first 10 % of the steps then cosine decay, MONAI ``DiceCELoss`` (softmax,
  one-hot targets, Dice on the foreground classes only, cross-entropy on all).
- Validation: every ``val_every`` steps and at the end, sliding-window inference over whole validation volumes
  in float32 whatever the mixed precision, as ``medtuning predict`` runs (each process takes whole volumes), the
  challenge's metrics (:func:`~medtuning_peft.evaluation.evaluate_case`), gathered and summarized on the main
  process. The final predictions are written as NIfTI on the original grids;
  with ``target_spacing`` they are also scored there, against the label files, as ``medtuning evaluate`` scores
  them.
- Checkpoints: ``accelerator.save_state`` into ``output_dir/checkpoints/.step_N.partial``, then renamed to
  ``step_N`` once complete (with ``trainer_state.json``), keeping the last ``keep_checkpoints``; a step's checkpoint
  (and at the end the model) is written before its validation, so a failure or Ctrl-C there loses no training.
  ``resume`` continues from the newest checkpoint with the same step, model, optimizer, scheduler and RNG states
  (validating a step whose validation did not finish).
  Accelerate writes model weights as safetensors but optimizer, scheduler and RNG states with ``torch.save``;
  those are this run's own files and are read back with ``weights_only=True``.
- Outputs: ``output_dir/model`` (:meth:`~medtuning_peft.VolumetricSegmenter.save_pretrained`),
  ``output_dir/metrics.json`` (per-case and summary validation metrics, loss curve, settings, parameter counts,
  wall time) and ``output_dir/predictions/<case>.nii.gz``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .backbones import enable_activation_checkpointing
from .decoders import DECODERS, decoder_key
from .io_utils import (
    CorruptFileError,
    atomic_write_json,
    atomic_write_text,
    check_safetensors,
    check_writable,
    default_permissions,
    read_json_file,
)

__all__ = [
    "CHECKPOINT_PATTERN",
    "DATASETS",
    "DEFAULT_DATA",
    "DatasetSpec",
    "ShardedBatchSampler",
    "SettingsError",
    "StepInfo",
    "TrainSettings",
    "TrainingInterrupted",
    "build_parser",
    "complete_checkpoints",
    "default_cache_dir",
    "parameter_counts",
    "run_example",
    "settings_from_args",
    "train",
    "train_from_args",
    "warmup_cosine",
]

logger = logging.getLogger("medtuning_peft.training")

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
"""Names of complete checkpoints in ``output_dir/checkpoints``; anything else there is ignored by resume."""
TRAINER_STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.json"
MODEL_DIR_NAME = "model"
PREDICTIONS_DIR_NAME = "predictions"
CHECKPOINTS_DIR_NAME = "checkpoints"
LOGS_DIR_NAME = "logs"  # the trackers' (--report-to) files


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


class SettingsError(ValueError):
    """A setting that cannot work (a bad value, or one that does not fit the data or the output folder).

    The message names the field, the value and the fix; the example scripts report it as a usage error of the
    field's command-line flag (exit status 2).

    Attributes:
        field: the :class:`TrainSettings` field at fault, or None.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`, with where the run stood.

    Attributes:
        step: optimizer steps done.
        total_steps: optimizer steps of the run.
        checkpoint: the newest complete checkpoint folder, or None.
        is_main: raised on the main process (the one that reports it).
    """

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None, is_main: bool = True) -> None:
        super().__init__(f"interrupted at step {step} of {total_steps}")
        self.step, self.total_steps, self.checkpoint, self.is_main = step, total_steps, checkpoint, is_main


def _opt(default: Any, help: str, cli: bool = True, **argparse_options: Any) -> Any:
    """A settings field whose help text is the one the command line shows (one source of truth)."""
    metadata = {"help": help, "cli": cli, **argparse_options}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainSettings:
    """Everything a training run needs; every field but the first three is also a command-line option.

    Raises:
        SettingsError: from ``__post_init__`` for an invalid value, naming the field, the value and the fix.
    """

    dataset: str = _opt("kits19", "Dataset reader and metric conventions: kits19, msd or brats.", cli=False)
    default_data: str | None = _opt(
        None, "Built-in data set used when data_dir is None (a key of DEFAULT_DATA).", cli=False
    )
    data_note: str | None = _opt(None, "What the data is, logged and stored in metrics.json.", cli=False)

    # Data
    data_dir: str | None = _opt(None, "Dataset folder (see examples/README.md for the layout of each task).")
    output_dir: str = _opt("outputs/run", "Run folder: checkpoints/, model/, metrics.json, predictions/.")
    cache_dir: str | None = _opt(
        None,
        "Cache for decoded volumes and built-in data (default: $MEDTUNING_CACHE, else "
        "$XDG_CACHE_HOME/medtuning_peft, else ~/.cache/medtuning_peft).",
    )
    val_fraction: float = _opt(0.2, "Share of the labelled cases held out for validation (seeded split).")
    num_folds: int | None = _opt(None, "Use k-fold cross-validation with this many folds (with --fold).")
    fold: int | None = _opt(None, "Validation fold in [0, num_folds).")
    split_seed: int = _opt(0, "Seed of the train/validation split (independent of --seed).")
    max_cases: int | None = _opt(None, "Use only the first N labelled cases (quick trials).")
    target_spacing: list[float] | None = _opt(
        None,
        "Resample to this voxel size in mm along (D, H, W), e.g. 3 1.5 1.5 (validation still scores on the "
        "original grid, against the label files).",
        nargs=3,
        type=float,
    )
    ct_normalization: str = _opt(
        "dataset",
        "CT intensities: 'dataset' (the data set's fixed window and z-score: nnU-Net's KiTS19 values for KiTS19, "
        "else HU -1000 to 1000 and a z-score per volume) or 'training-foreground' (nnU-Net's CT scheme measured on "
        "this run's training cases: the 0.5 and 99.5 percentiles of their labelled voxels as the window, their mean "
        "and standard deviation for the z-score; validation cases do not enter it).",
        choices=["dataset", "training-foreground"],
    )
    synthetic_cases: int = _opt(10, "Number of cases of the built-in synthetic data (without --data-dir).")

    # Model
    backbone: str = _opt(
        "tiny-swin",
        "2D backbone: a Hub id (e.g. microsoft/swin-tiny-patch4-window7-224), a local directory, or a tiny "
        "random-init config (tiny-swin, tiny-vit, tiny-segformer, tiny-dinov2).",
    )
    method: str = _opt(
        "med_adapter", "Tuning method.", choices=["med_adapter", "lora", "full", "decoder_only"]
    )
    decoder: str = _opt("upernet", "2D decoder.", choices=list(DECODERS))
    train_patch_embedding: bool | None = _opt(
        None,
        "Train the backbone's patch embedding with the adapters (med_adapter, lora). Default: when the data has "
        "more than one channel: its filters, adapted from RGB, start equal for every channel, and frozen they "
        "would pass on only the channels' sum (BraTS' four sequences could not be told apart). "
        "--no-train-patch-embedding keeps it frozen, as the paper's code does.",
    )
    decoder_channels: int | None = _opt(
        None,
        "Decoder width, a positive integer (UperNet hidden size). Left unset in TrainSettings: the decoder's own, "
        "512 for UperNet (the paper's).",
    )

    # Crops
    crop_size: list[int] = _opt(
        [128, 128, 128], "Training crop (D, H, W) in voxels; also the sliding window.", nargs=3, type=int
    )
    samples_per_case: int = _opt(4, "Random crops per training case per epoch.")
    foreground_probability: float = _opt(0.67, "Chance that a crop is centred on a foreground voxel.")

    # Optimization
    epochs: int | None = _opt(None, "Epochs (passes over samples_per_case crops of every training case).")
    max_steps: int | None = _opt(
        None,
        "Optimizer steps; overrides --epochs. An example script's default gives way to an --epochs given on the "
        "command line.",
    )
    batch_size: int = _opt(2, "Crops (volumes) per process per micro-batch.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    lr: float = _opt(2e-3, "Peak learning rate (reference recipe: 2e-3 for adapters).")
    weight_decay: float = _opt(1e-5, "Adam weight decay.")
    warmup_fraction: float = _opt(
        0.1, "Share of the steps with a linear warm-up (reference: 25 of 250 epochs)."
    )
    min_lr_ratio: float = _opt(0.0, "Final learning rate of the cosine decay, as a fraction of --lr.")
    max_grad_norm: float | None = _opt(
        None, "Clip the gradient norm to this positive value (default: no clipping)."
    )
    mixed_precision: str = _opt(
        "auto", "auto (bf16 on CUDA, fp32 on CPU), no, bf16 or fp16.", choices=["auto", "no", "bf16", "fp16"]
    )
    gradient_checkpointing: bool = _opt(
        False,
        "Activation checkpointing of the backbone blocks (non-reentrant; exact gradients): less memory, "
        "more time per step.",
    )
    cuda_graphs: bool = _opt(
        False,
        "Replay each Med-Adapter's kernels as CUDA graphs from the second step on (CUDA, method med_adapter): "
        "the same training, fewer kernel launches. With --gradient-checkpointing only the frozen blocks are "
        "recomputed.",
    )

    # Validation
    val_every: int = _opt(0, "Validate every N optimizer steps (0: only at the end).")
    sw_overlap: float = _opt(
        1.0 - 42 / 128, "Sliding-window overlap (reference: stride 42 of 128, i.e. 0.671875 (1 - 42/128))."
    )
    sw_batch_size: int = _opt(1, "Windows per forward pass in validation.")
    flip_tta: bool = _opt(False, "8-way flip test-time augmentation in validation (8x slower).")
    val_hd95: bool = _opt(True, "Compute HD95 in validation.")
    et_min_voxels: int = _opt(500, "BraTS: predicted ET under this many voxels is relabelled NCR (0: off).")
    save_predictions: bool = _opt(True, "Write the final validation predictions as NIfTI.")

    # Checkpoints
    checkpoint_every: int | None = _opt(
        None, "Save a checkpoint every N steps (default: --val-every, else end)."
    )
    keep_checkpoints: int = _opt(2, "Keep the newest N checkpoints.")
    resume: bool = _opt(False, "Continue from the newest complete checkpoint in output_dir/checkpoints.")
    overwrite: bool = _opt(
        False,
        "Delete an earlier run in output_dir and start over (once the settings are found to fit the data).",
    )

    # Misc
    seed: int = _opt(0, "Seed of model initialization, crops and data order.")
    num_workers: int | None = _opt(None, "DataLoader workers per process (default: 0 on CPU, 4 on CUDA).")
    report_to: str | None = _opt(
        None, "Log to a tracker through Accelerate.", choices=["tensorboard", "wandb", "all"]
    )
    log_every: int = _opt(10, "Log the loss every N optimizer steps.")

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise SettingsError(_unknown("TrainSettings.dataset", self.dataset, DATASETS), "dataset")
        if self.data_dir is None and self.default_data is None:
            raise SettingsError(
                f"TrainSettings.data_dir is None and no default_data is set for dataset {self.dataset!r}; pass "
                f"--data-dir with the dataset folder.",
                "data_dir",
            )
        if isinstance(self.decoder, str):  # any spelling build_decoder takes ("UperNet"), kept as the key
            with contextlib.suppress(ValueError):  # an unknown name is refused with the choices below
                self.decoder = decoder_key(self.decoder)
        for f in dataclasses.fields(self):  # the command line's choices, for settings built in Python too
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                raise SettingsError(_unknown(f"TrainSettings.{f.name}", value, choices), f.name)
        if self.default_data is not None and self.default_data not in DEFAULT_DATA:
            raise SettingsError(
                _unknown("TrainSettings.default_data", self.default_data, DEFAULT_DATA), "default_data"
            )
        self.crop_size = [int(s) for s in self.crop_size]
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            raise SettingsError(
                f"crop_size={self.crop_size}; pass three positive voxel counts D H W, e.g. 32 64 64.",
                "crop_size",
            )
        if self.target_spacing is not None:
            self.target_spacing = [float(s) for s in self.target_spacing]
            if len(self.target_spacing) != 3 or not all(
                math.isfinite(s) and s > 0 for s in self.target_spacing
            ):
                raise SettingsError(
                    f"target_spacing={self.target_spacing}; pass three positive voxel sizes in mm D H W, e.g. "
                    f"3 1.5 1.5 (or leave it unset to keep each case's spacing).",
                    "target_spacing",
                )
        positive = (
            "samples_per_case",
            "batch_size",
            "gradient_accumulation_steps",
            "sw_batch_size",
            "log_every",
            "keep_checkpoints",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise SettingsError(f"{name}={value!r}; pass a positive integer.", name)
        optional_positive = ("epochs", "max_steps", "checkpoint_every", "max_cases", "synthetic_cases")
        for name in (*optional_positive, "decoder_channels"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise SettingsError(f"{name}={value!r}; pass a positive integer (or leave it unset).", name)
        for name in ("val_every", "et_min_voxels", "seed", "split_seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise SettingsError(f"{name}={value!r}; pass a non-negative integer.", name)
        if self.num_workers is not None and (not _is_int(self.num_workers) or self.num_workers < 0):
            raise SettingsError(
                f"num_workers={self.num_workers!r}; pass 0 (load in the training process) or more workers, or "
                f"leave it unset.",
                "num_workers",
            )
        if self.epochs is None and self.max_steps is None:
            raise SettingsError(
                "Neither epochs nor max_steps is set; pass --max-steps N or --epochs N.", "max_steps"
            )
        if (self.num_folds is None) != (self.fold is None):
            name = "fold" if self.fold is None else "num_folds"
            raise SettingsError(
                f"num_folds={self.num_folds}, fold={self.fold}; pass both (e.g. num_folds=5, fold=0) or neither.",
                name,
            )
        if self.num_folds is not None and (not _is_int(self.num_folds) or self.num_folds < 2):
            raise SettingsError(f"num_folds={self.num_folds!r}; pass at least 2 folds.", "num_folds")
        if self.fold is not None and (not _is_int(self.fold) or not 0 <= self.fold < self.num_folds):
            raise SettingsError(f"fold={self.fold!r}; pass 0 <= fold < num_folds ({self.num_folds}).", "fold")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingsError(f"lr={self.lr}; pass a positive learning rate, e.g. 2e-3 for adapters.", "lr")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SettingsError(
                f"weight_decay={self.weight_decay}; pass 0 (none) or a positive decay, e.g. 1e-5.",
                "weight_decay",
            )
        if self.max_grad_norm is not None and not (
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            raise SettingsError(
                f"max_grad_norm={self.max_grad_norm}; pass a positive norm to clip to, e.g. 1.0, or leave it unset "
                f"(no clipping).",
                "max_grad_norm",
            )
        for name in (
            "val_fraction",
            "foreground_probability",
            "warmup_fraction",
            "min_lr_ratio",
            "sw_overlap",
        ):
            value = getattr(self, name)
            if name == "val_fraction":  # a split needs cases on both sides
                ok, interval = 0.0 < value < 1.0, "(0, 1)"
            elif name == "sw_overlap":
                ok, interval = 0.0 <= value < 1.0, "[0, 1)"
            else:
                ok, interval = 0.0 <= value <= 1.0, "[0, 1]"
            if not ok:
                raise SettingsError(f"{name}={value}; pass a fraction in {interval}.", name)
        if self.resume and self.overwrite:
            raise SettingsError(
                "resume and overwrite are both set; pass one: continue the run or start over.", "overwrite"
            )
        if self.train_patch_embedding is not None and self.method not in ("med_adapter", "lora"):
            raise SettingsError(
                f"train_patch_embedding={self.train_patch_embedding} chooses for the adapter methods, but "
                f"method={self.method!r} {'trains' if self.method == 'full' else 'freezes'} the whole backbone; "
                "leave it unset, or use method 'med_adapter' or 'lora'.",
                "train_patch_embedding",
            )
        if self.cuda_graphs and self.method != "med_adapter":
            raise SettingsError(
                f"cuda_graphs=True graphs the Med-Adapters, but method={self.method!r}; use method 'med_adapter' "
                "or leave cuda_graphs off.",
                "cuda_graphs",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible copy (stored in metrics.json, trainer_state.json and the trackers)."""
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unknown(name: str, value: Any, known: Any) -> str:
    import difflib

    close = difflib.get_close_matches(str(value), list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{name}={value!r} is not known; use one of {sorted(known)}.{hint}"


# ---------------------------------------------------------------------------------------------------------
# Datasets and built-in data
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """How the engine reads one dataset and scores it.

    Attributes:
        challenge: task name of :func:`~medtuning_peft.evaluation.evaluate_case` (``kits19``, ``msd``, ``brats``).
        list_cases: ``data_dir -> [CaseFiles]``, labelled and prediction-only cases.
        labels_for_metrics: pass the label names to ``evaluate_case`` (MSD regions come from them).
        postprocess_et: apply the BraTS small-ET rule before scoring.
    """

    challenge: str
    list_cases: Callable[[Path], list[Any]]
    labels_for_metrics: bool = False
    postprocess_et: bool = False


def _list_kits19(data_dir: Path) -> list[Any]:
    from .data import list_kits19_cases

    return list_kits19_cases(data_dir)


def _list_msd(data_dir: Path) -> list[Any]:
    from .data import read_msd_task

    return list(read_msd_task(data_dir).training)


def _list_brats(data_dir: Path) -> list[Any]:
    from .data import list_brats_cases

    return list_brats_cases(data_dir)


DATASETS: dict[str, DatasetSpec] = {
    "kits19": DatasetSpec("kits19", _list_kits19),
    "msd": DatasetSpec("msd", _list_msd, labels_for_metrics=True),
    "brats": DatasetSpec("brats", _list_brats, postprocess_et=True),
}


def _synthetic_kits19(folder: Path, settings: TrainSettings) -> str:
    from .data import write_synthetic_kits19

    write_synthetic_kits19(
        folder, num_cases=settings.synthetic_cases, shape=(48, 96, 96), spacing=(3.0, 3.0, 3.0)
    )
    return (
        f"synthetic KiTS19-like CT ({settings.synthetic_cases} cases of 48 x 96 x 96 voxels at 3 mm, kidneys "
        f"and tumours; not patient data) written in the KiTS19 file layout and read by the KiTS19 reader"
    )


def _synthetic_brats(year: int) -> Callable[[Path, TrainSettings], str]:
    def write(folder: Path, settings: TrainSettings) -> str:
        from .data.synthetic import write_synthetic_brats

        write_synthetic_brats(folder, num_cases=settings.synthetic_cases, shape=(48, 64, 64), year=year)
        return (
            f"synthetic BraTS-like brain MRI ({settings.synthetic_cases} cases of 48 x 64 x 64 voxels at 1 mm, "
            f"four modalities, gliomas with labels 1/2/4; not patient data) written in the BraTS {year} file "
            f"layout and read by the BraTS reader"
        )

    return write


DEFAULT_DATA: dict[str, Callable[[Path, TrainSettings], str]] = {
    "synthetic-kits19": _synthetic_kits19,
    "synthetic-brats2019": _synthetic_brats(2019),
    "synthetic-brats2020": _synthetic_brats(2020),
}
"""Built-in data sets: name -> ``(folder, settings) -> description``; written once into the cache folder."""


def default_cache_dir() -> Path:
    """``$MEDTUNING_CACHE``, else ``$XDG_CACHE_HOME/medtuning_peft``, else ``~/.cache/medtuning_peft``."""
    if os.environ.get("MEDTUNING_CACHE"):
        return Path(os.environ["MEDTUNING_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medtuning_peft"


def _built_in_data(name: str, settings: TrainSettings, cache_dir: Path) -> tuple[Path, str]:
    """Write the built-in data set ``name`` once (atomically) and return its folder and description."""
    key = hashlib.sha256(json.dumps([name, settings.synthetic_cases, 1]).encode()).hexdigest()[:12]
    folder = cache_dir / "data" / f"{name}-{settings.synthetic_cases}-{key}"
    note_file = folder / "medtuning_data.json"
    if note_file.is_file():
        return folder, json.loads(note_file.read_text())["description"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        description = DEFAULT_DATA[name](tmp, settings)
        (tmp / "medtuning_data.json").write_text(
            json.dumps({"name": name, "description": description}) + "\n"
        )
        default_permissions(tmp)  # mkdtemp's folder is private: a shared cache must stay readable
        try:
            tmp.rename(folder)
        except OSError:
            if not note_file.is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, description


# ---------------------------------------------------------------------------------------------------------
# Sharding, schedule, parameters
# ---------------------------------------------------------------------------------------------------------


class ShardedBatchSampler(Sampler[list[int]]):
    """Micro-batches of whole samples for one process, from a seeded per-epoch permutation.

    Micro-batch ``m`` of the epoch covers the global chunk ``perm[m*b*P : (m+1)*b*P]`` of the permutation; process
    ``p`` takes ``chunk[p*b : (p+1)*b]``. Every process yields the same number of micro-batches (the incomplete
    last chunk is dropped), so DDP never waits on a missing batch.

    Args:
        num_samples: dataset length.
        batch_size: samples per process per micro-batch, b.
        num_processes: P.
        process_index: p.
        seed: permutation seed.
        epoch: the permutation is ``default_rng([seed, epoch]).permutation(num_samples)``.
        num_batches: micro-batches to yield (at most ``num_samples // (b*P)``; default that).
        start: first micro-batch (to continue an epoch after a resume).

    Raises:
        ValueError: when one global chunk needs more samples than there are.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
        epoch: int = 0,
        num_batches: int | None = None,
        start: int = 0,
    ) -> None:
        chunk = batch_size * num_processes
        if chunk > num_samples:
            raise ValueError(
                f"A global micro-batch needs batch_size x num_processes = {batch_size} x {num_processes} = {chunk} "
                f"crops but an epoch has only {num_samples}; raise --samples-per-case or lower --batch-size."
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.epoch, self.start = seed, epoch, start
        available = num_samples // chunk
        self.num_batches = available if num_batches is None else min(num_batches, available)

    def global_order(self) -> np.ndarray:
        """The epoch's permutation of all sample indices."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order()
        b, chunk = self.batch_size, self.batch_size * self.num_processes
        for m in range(self.start, self.num_batches):
            first = m * chunk + self.process_index * b
            yield [int(i) for i in order[first : first + b]]

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Learning-rate factor of optimizer step ``s`` (0-based): linear warm-up, then cosine to ``min_ratio``.

    Warm-up: ``(s + 1) / (warmup_steps + 1)`` (never 0, so no step is wasted). Then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2`` with progress going from 0 to 1 over the
    remaining steps.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


FUSED_ADAM_DEVICES = ("cpu", "cuda")
"""Device types on which the training engine's Adam runs PyTorch's fused implementation (torch >= 2.4)."""


def make_optimizer(
    params: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float, device: torch.device | str
) -> torch.optim.Adam:
    """The recipe's Adam (AMSGrad with ``lr`` and ``weight_decay``) for parameters trained on ``device``.

    On CPU and CUDA it is PyTorch's fused Adam: one operation updates every parameter in a compiled loop, instead
    of a dozen tensor operations per parameter, and gives the same update up to float rounding. With a few hundred
    small adapter tensors next to a decoder this matters: an AMSGrad step over the paper's Swin-T Med-Adapter +
    UperNet 512 parameters took 229 ms as a per-tensor loop and 32 ms fused on one CPU core (``python
    benchmarks/optimizer_step.py --device cpu --threads 1``). Other devices get torch's default.
    """
    fused = torch.device(device).type in FUSED_ADAM_DEVICES
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=True, fused=fused or None)


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Tuned and total parameters of a segmenter (peft's frozen backups of ``modules_to_save`` not counted).

    Returns:
        ``{"tuned": int, "total": int, "tuned_percent": float}``.
    """
    tuned = total = 0
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen or ".original_module." in f".{name}.":
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        tuned += parameter.numel() if parameter.requires_grad else 0
    return {"tuned": tuned, "total": total, "tuned_percent": round(100.0 * tuned / max(total, 1), 4)}


def _directory_bytes(folder: Path, skip: Sequence[str] = ()) -> int:
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts)
    )


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def complete_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, folder)`` in ``checkpoint_dir``, oldest first.

    A checkpoint is complete when its folder is named ``step_N`` and holds ``trainer_state.json`` recording step
    N; the folder is renamed to that name only after everything was written, so a run killed while saving leaves a
    ``.step_N.partial`` folder that is ignored here (and removed by the next run).
    """
    return [
        (step, path) for step, path in _step_folders(checkpoint_dir) if _state_problem(path, step) is None
    ]


def _step_folders(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every folder ``step_N`` in ``checkpoint_dir`` as ``(N, folder)``, oldest first, complete or not (a partial
    write is named ``.step_N.partial``, never ``step_N``)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _state_problem(folder: Path, step: int) -> str | None:
    """What is wrong with the trainer state of checkpoint ``folder`` (named ``step_{step}``), or None."""
    state_file = folder / TRAINER_STATE_NAME
    if not state_file.is_file():
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        recorded = json.loads(state_file.read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE_NAME} cannot be read ({type(error).__name__}: {_first_sentence(error)})"
    return None if recorded == step else f"{TRAINER_STATE_NAME} records step {recorded}"


def _save_checkpoint(accelerator: Any, checkpoint_dir: Path, step: int, state: dict, keep: int) -> Path:
    final = checkpoint_dir / f"step_{step}"
    partial = checkpoint_dir / f".step_{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(partial / TRAINER_STATE_NAME, state)
        default_permissions(partial)  # safetensors >= 0.8 writes private files
        if final.exists():  # the same step saved again (e.g. a finished run resumed)
            shutil.rmtree(final)
        partial.rename(final)
        for _, old in complete_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _record_validation(accelerator: Any, folder: Path, state: dict) -> None:
    """Rewrite the trainer state of checkpoint ``folder``, saved before its step was validated, with the validation
    in its history (atomically: the checkpoint stays complete), so that a resume from it does not validate again."""
    if accelerator.is_main_process:
        _write_json(folder / TRAINER_STATE_NAME, state)


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, keys in the order given (serialized first: a value JSON cannot hold leaves the
    previous file, and no temporary one)."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _validate(
    accelerator: Any,
    model: torch.nn.Module,
    cases: Sequence[Any],
    settings: TrainSettings,
    task: dict[str, Any],
    label_files: dict[str, Path],
    predictions_dir: Path | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Predict whole volumes (each process takes every P-th case) and score them; gathered on every process.

    ``model`` runs in float32, whatever the run's mixed precision (its forward must not carry Accelerate's autocast
    wrapper), so the predictions are those ``medtuning predict`` writes with the saved model.

    A case resampled to ``target_spacing`` is scored on its original grid against its label file (``label_files``:
    case id -> path), as the challenges and ``medtuning evaluate`` score the written prediction: the resampled
    label the model trained on is not the reference.
    """
    import nibabel as nib
    from accelerate.utils import gather_object

    from .data import read_nifti
    from .evaluation import (
        evaluate_case,
        postprocess_brats_et,
        probabilities_to_labels,
        sliding_window_predict,
    )

    if accelerator.num_processes > 1:
        # Each process's training forward updated its own BatchNorm running statistics (DDP hands process 0's
        # to the others only at the next forward): validate every case with the model that is saved, process 0's.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
    spec = DATASETS[settings.dataset]
    label_values = task["label_values"]
    labels = {str(v): task["label_names"][i] for i, v in enumerate(label_values)}
    results = []
    for case in cases[accelerator.process_index :: accelerator.num_processes]:
        volume = torch.from_numpy(np.array(case.image, dtype=np.float32))[
            None
        ]  # (C, D, H, W) -> (1, C, D, H, W)
        probs = sliding_window_predict(  # float32, without autocast, as `medtuning predict` runs
            model,
            volume.to(accelerator.device),
            roi_size=tuple(settings.crop_size),
            overlap=settings.sw_overlap,
            sw_batch_size=settings.sw_batch_size,
            flip_tta=settings.flip_tta,
            num_classes=len(label_values),
            device="cpu",
            padding_value=case.background_value,  # what training crops were padded with
        )
        pred = (
            probabilities_to_labels(probs, label_values)[0].numpy().astype(np.uint8)
        )  # (D, H, W) label values
        scored, reference, spacing = pred, np.asarray(case.label), case.spacing
        if case.geometry.is_resampled:
            scored = case.geometry.to_original(pred)  # (D, H, W) -> the file's (X, Y, Z)
            reference, label_image = read_nifti(
                label_files[case.case_id], case_id=case.case_id, role="label", as_label=True
            )
            reference = reference.astype(np.uint8)  # values checked when the case was loaded
            spacing = tuple(float(s) for s in nib.affines.voxel_sizes(label_image.affine))  # array axis order
        if spec.postprocess_et and settings.et_min_voxels:
            # The rule counts the image file's voxels (scored), also for a case resampled to target_spacing;
            # both maps take the same decision.
            pred = postprocess_brats_et(pred, settings.et_min_voxels, counted_on=scored)
            scored = postprocess_brats_et(scored, settings.et_min_voxels)
        scores = evaluate_case(
            spec.challenge,
            scored,
            reference,
            spacing,
            labels=labels if spec.labels_for_metrics else None,
            with_hd95=settings.val_hd95,
        )
        if predictions_dir is not None:
            case.geometry.save_nifti(pred, predictions_dir / f"{case.case_id}.nii.gz")
        results.append((case.case_id, scores))
    if accelerator.num_processes > 1:
        results = gather_object(results)
    from .evaluation import summarize

    per_case = dict(sorted(results))
    return per_case, summarize(list(per_case.values()))


def _format_summary(summary: dict[str, dict[str, float]]) -> str:
    return "  ".join(
        f"{k}={v['mean']:.4f}" if k.startswith("dice") else f"{k}={v['mean']:.2f}mm"
        for k, v in summary.items()
    )


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StepInfo:
    """What ``train(on_step_end=...)`` receives after each optimizer step.

    Attributes:
        step: optimizer steps done.
        total_steps: optimizer steps of the run.
        loss: mean training loss of the step over processes and micro-batches.
        lr: learning rate used for the step.
        accelerator: the run's ``Accelerator``.
        model: the prepared model (DDP-wrapped in multi-process runs); its forward runs in float32 unless called
            under ``accelerator.autocast()``, as the training steps call it.
        optimizer: the prepared optimizer.
        checkpoint: the checkpoint folder written after this step, if any.
    """

    step: int
    total_steps: int
    loss: float
    lr: float
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    checkpoint: Path | None = None


_RESUME_KEYS = (
    "dataset",
    "backbone",
    "method",
    "decoder",
    "decoder_channels",
    "crop_size",
    "batch_size",
    "gradient_accumulation_steps",
    "samples_per_case",
    "foreground_probability",
    "seed",
    "split_seed",
    "val_fraction",
    "num_folds",
    "fold",
    "max_cases",
    "target_spacing",
    "lr",
    "weight_decay",
    "warmup_fraction",
    "min_lr_ratio",
    "max_grad_norm",
    "ct_normalization",
    "max_steps",
    "epochs",
)
"""Settings that change the training itself (data order, crops, model, optimization): a resumed run must use the
checkpoint's. ``mixed_precision`` must be the same too, compared as resolved (``auto`` is bf16 on CUDA, no on CPU).
Others (validation, checkpoint and logging cadence, workers, activation checkpointing, CUDA graphs) may change
between the stopped and the resumed run."""


class _ExistingRunError(SettingsError, FileExistsError):
    """``output_dir`` holds an earlier run and neither ``resume`` nor ``overwrite`` is set."""


class _MissingDataError(SettingsError, FileNotFoundError):
    """``data_dir`` does not exist."""


def _check_output_dir(output_dir: Path, settings: TrainSettings) -> list[Path]:
    """Refuse an ``output_dir`` that cannot be created or written, or that holds an earlier run (unless resumed).
    Nothing is created or deleted here.

    Returns:
        With ``overwrite``, the earlier run's files and folders, to be deleted once the settings fit the data and
        every process has checked the folder (:func:`_delete_earlier_run`); else nothing.

    Raises:
        SettingsError: naming ``output_dir``, for a file in its place or a folder this process cannot write.
        FileExistsError: (also a SettingsError) for an earlier run without ``resume`` or ``overwrite``.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise SettingsError(
            f"output_dir '{output_dir}' is a file, not a folder; pass a new or existing folder as --output-dir.",
            "output_dir",
        )
    existing = output_dir
    while not existing.exists():  # the folder is created later, once the settings fit the data
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError(
            f"output_dir '{output_dir}' cannot be created: '{existing}' is a file; pass another --output-dir.",
            "output_dir",
        )
    # Everything a run writes into (the checkpoints, the model and the predictions folders of an earlier run
    # too), probed with a temporary file: a read-only folder must stop the run now, not after training.
    probed = [existing] + [
        output_dir / n for n in (CHECKPOINTS_DIR_NAME, MODEL_DIR_NAME, PREDICTIONS_DIR_NAME)
    ]
    for folder in (f for f in probed if f.is_dir()):
        try:
            check_writable(folder / ".medtuning-write-check")  # probes with a partial file next to that name
        except OSError as error:
            action = "written" if existing == output_dir else "created"
            raise SettingsError(
                f"output_dir '{output_dir}' cannot be {action}: {error}; pass an --output-dir you can write to, "
                f"or make that folder writable.",
                "output_dir",
            ) from error
    earlier = [output_dir / n for n in (CHECKPOINTS_DIR_NAME, MODEL_DIR_NAME, METRICS_NAME)]
    if not any(p.exists() for p in earlier) or settings.resume:
        return []
    if not settings.overwrite:
        raise _ExistingRunError(
            f"output_dir '{output_dir}' holds an earlier run ({', '.join(p.name for p in earlier if p.exists())}); "
            f"pass --resume to continue it, --overwrite to start over, or a new --output-dir.",
            "output_dir",
        )
    return earlier + [output_dir / n for n in (PREDICTIONS_DIR_NAME, LOGS_DIR_NAME)]


def _delete_earlier_run(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _resumed_preprocessing(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The preprocessing the newest complete checkpoint was trained with (``{}``: a checkpoint written before it
    was recorded), or None without a readable one (resume then starts over or reports the damage)."""
    checkpoints = complete_checkpoints(checkpoint_dir)
    if not checkpoints:
        return None
    try:
        state = json.loads((checkpoints[-1][1] / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    recorded = state.get("preprocessing", {})
    return recorded if isinstance(recorded, dict) else None


def _load_task(
    settings: TrainSettings, accelerator: Any, resumed: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[Any], list[Any], dict[str, Path]]:
    """Resolve the data, split it and load the cases through the cache (main process first).

    ``resumed``: the preprocessing of the checkpoint a resumed run continues (:func:`_resumed_preprocessing`); the
    run keeps it, whatever the defaults are now.

    Returns the task description, the training and validation cases, and the validation cases' label files.
    """
    from .data import CaseCache, MRIPreprocessing, default_preprocessing, preprocessing_from_dict, split_cases

    cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    note = settings.data_note
    with accelerator.main_process_first():
        if settings.data_dir is None:
            data_dir, note = _built_in_data(settings.default_data, settings, cache_dir)
            logger.info("No --data-dir given: using %s, at %s.", note, data_dir)
        else:
            data_dir = Path(settings.data_dir).expanduser()
            if not data_dir.is_dir():
                raise _MissingDataError(
                    f"data_dir '{data_dir}' does not exist; pass the {settings.dataset} dataset folder "
                    f"(layouts in examples/README.md).",
                    "data_dir",
                )
            if note:
                logger.info("Data: %s, at %s.", note, data_dir)
        listed = DATASETS[settings.dataset].list_cases(data_dir)
        labelled = [c for c in listed if c.has_label]
        if settings.max_cases is not None:
            labelled = labelled[: settings.max_cases]
        if len(labelled) < 2:
            available = sum(1 for c in listed if c.has_label)
            if settings.max_cases is not None and available >= 2:
                raise SettingsError(
                    f"max_cases={settings.max_cases} keeps {len(labelled)} of the {available} labelled cases of "
                    f"data_dir '{data_dir}'; training with validation needs at least 2.",
                    "max_cases",
                )
            if settings.data_dir is None:
                raise SettingsError(
                    f"synthetic_cases={settings.synthetic_cases}: the built-in data ({note}) has {available} "
                    "labelled case(s); training with validation needs at least 2.",
                    "synthetic_cases",
                )
            raise SettingsError(
                f"data_dir '{data_dir}' has {len(labelled)} labelled case(s); training with validation needs at "
                f"least 2.",
                "data_dir",
            )
        try:
            train_ids, val_ids = split_cases(
                [c.case_id for c in labelled],
                val_fraction=settings.val_fraction,
                num_folds=settings.num_folds,
                fold=settings.fold,
                seed=settings.split_seed,
            )
        except ValueError as error:  # e.g. more folds than cases
            raise SettingsError(
                f"{error} (data_dir '{data_dir}': {len(labelled)} labelled cases)",
                "num_folds" if settings.num_folds is not None else "val_fraction",
            ) from error
        first = labelled[0]
        by_id = {c.case_id: c for c in labelled}
        preprocessing = default_preprocessing(first.modality, first.dataset)
        if settings.ct_normalization == "training-foreground":
            preprocessing = _training_foreground_ct(
                settings, [by_id[i] for i in train_ids], data_dir, cache_dir
            )
        if settings.target_spacing is not None:
            preprocessing = dataclasses.replace(preprocessing, target_spacing=tuple(settings.target_spacing))
        if resumed == {} and isinstance(preprocessing, MRIPreprocessing) and preprocessing.mask == "auto":
            # A checkpoint written before the preprocessing was recorded: MRI was then z-scored over each channel's
            # non-zero voxels by default (BraTS over the brain, as now).
            preprocessing = dataclasses.replace(preprocessing, mask="channel")
        elif resumed and resumed != preprocessing.to_dict():
            try:
                preprocessing = preprocessing_from_dict(resumed)
            except ValueError as error:
                raise SettingsError(
                    f"the checkpoint to resume records {error}; resume with the medtuning_peft version that wrote "
                    "it, or start a new --output-dir.",
                    "resume",
                ) from error
            logger.info("--resume: keeping the checkpoint's preprocessing %s.", resumed)
        cache = CaseCache(cache_dir / "arrays")
        train_cases = cache.load_many([by_id[i] for i in train_ids], preprocessing)
        val_cases = cache.load_many([by_id[i] for i in val_ids], preprocessing)
    task = {
        "data_dir": str(data_dir),
        "data_note": note,
        "channel_names": list(first.channel_names),
        "label_values": [int(v) for v in first.label_values],
        "label_names": [first.label_names.get(v, f"class_{v}") for v in first.label_values],
        "modality": first.modality,
        "preprocessing": preprocessing.to_dict(),
        "train_cases": train_ids,
        "val_cases": val_ids,
    }
    return task, train_cases, val_cases, {i: Path(by_id[i].label) for i in val_ids}


CT_STATISTICS_DIR_NAME = "ct_statistics"
"""Folder of the cache holding the CT statistics measured on training cases (``ct_normalization``)."""


def _training_foreground_ct(
    settings: TrainSettings, train_cases: list[Any], data_dir: Path, cache_dir: Path
) -> Any:
    """nnU-Net's CT window and z-score, measured on the training cases (``ct_normalization``).

    Measuring reads every training CT in full, so the result is kept in the cache under a key of the cases'
    source files (paths, sizes, modification times): the other processes of the run (which come after the main
    one) and later runs and resumes on the same cases read it instead.
    """
    from .data import CaseCache, CaseLoadError, CTPreprocessing, ct_preprocessing_from_cases

    other = sorted({c.modality for c in train_cases} - {"CT"})
    if other:
        raise SettingsError(
            f"ct_normalization={settings.ct_normalization!r} measures CT statistics, but data_dir '{data_dir}' "
            f"holds {', '.join(other)} cases; leave ct_normalization at 'dataset'.",
            "ct_normalization",
        )
    cache, raw_hu, stored = (
        CaseCache(cache_dir / "arrays"),
        CTPreprocessing(window=None, mean=0.0, std=1.0),
        None,
    )
    with contextlib.suppress(FileNotFoundError):  # a missing file: measuring names it as loading does
        sources = [cache.key(c, raw_hu) for c in train_cases]
        # "version": raise it when ct_preprocessing_from_cases measures differently (stored values are then stale).
        digest = hashlib.sha256(json.dumps({"version": 1, "cases": sources}).encode()).hexdigest()
        stored = cache_dir / CT_STATISTICS_DIR_NAME / f"{digest}.json"
    if stored is not None and stored.is_file():
        try:
            values = read_json_file(stored, "stored CT statistics")
            found = CTPreprocessing(window=tuple(values["window"]), mean=values["mean"], std=values["std"])
        except (ValueError, KeyError, TypeError) as error:  # damaged: measured again and rewritten
            logger.warning("Ignoring %s (%s); measuring the CT statistics again.", stored, error)
        else:
            logger.info("CT window and z-score of these training cases read from %s.", stored)
            return found
    logger.info("Measuring the CT window and z-score on the %d training cases' foreground.", len(train_cases))
    try:
        measured = ct_preprocessing_from_cases(train_cases)
    except CaseLoadError:  # a missing or unreadable file: the data's problem, named as loading names it
        raise
    except ValueError as error:  # e.g. no training case has a labelled voxel
        raise SettingsError(f"{error} (data_dir '{data_dir}')", "ct_normalization") from error
    if stored is not None:
        values = {"window": list(measured.window), "mean": measured.mean, "std": measured.std}
        try:
            stored.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stored, {**values, "cases": [c.case_id for c in train_cases]})
        except OSError as error:  # a read-only cache: every process and run measures again
            logger.warning("Could not store the CT statistics in %s: %s", stored, error)
    return measured


def _tracker_config(settings: TrainSettings) -> dict[str, Any]:
    """Settings flattened to the scalar types every tracker accepts."""
    return {
        k: (v if isinstance(v, int | float | str | bool) else json.dumps(v))
        for k, v in settings.to_dict().items()
    }


def _use_cpu_processes() -> bool:
    """True for a multi-process launch on a machine without CUDA (DDP over gloo).

    Raises:
        RuntimeError: for ``accelerate launch --cpu --num_processes N`` without MPI, which starts one process only.
    """
    names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    world_size = max(int(os.environ.get(name, "1")) for name in names)
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if launched_cpu and os.environ.get("MASTER_ADDR") and world_size == 1 and "LOCAL_RANK" not in os.environ:
        raise RuntimeError(
            "`accelerate launch --cpu --num_processes N` started a single process: Accelerate runs several CPU "
            "processes only through MPI (--mpirun_hostfile). For DDP over gloo on CPU run `accelerate launch "
            "--multi_gpu --num_processes N ...` on a machine without GPUs (this engine then uses the CPU and gloo), "
            "or `torchrun --nproc_per_node N ...`; for one process drop --num_processes."
        )
    return world_size > 1 and not torch.cuda.is_available()


def _make_accelerator(settings: TrainSettings, output_dir: Path) -> tuple[Any, str]:
    """The run's ``Accelerator`` and its mixed precision; sets up logging on the main process.

    Raises:
        SettingsError: for ``mixed_precision="fp16"`` on a CPU (Accelerate would train in float32), or a
            ``report_to`` tracker whose package is not installed (Accelerate would drop it and log nothing).
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        GradientAccumulationPlugin,
        ProjectConfiguration,
    )

    mixed_precision = settings.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    accumulation = settings.gradient_accumulation_steps
    launched = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    accelerator = Accelerator(
        cpu=_use_cpu_processes(),
        mixed_precision=mixed_precision,
        # A plugin, not gradient_accumulation_steps=: Accelerate lets $ACCELERATE_GRADIENT_ACCUMULATION_STEPS (set
        # by `accelerate launch --gradient_accumulation_steps` with DeepSpeed; without it the flag is dropped)
        # override that argument, and the sampler, the loss average and the step count would then assume another
        # accumulation than the optimizer's.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation),
        log_with=settings.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_DIR_NAME)
        ),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        # With method "full" some trainable parameters never get a gradient (final norms the decoder does not
        # read); Adam skips them, and so must DDP.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SettingsError(
            f"mixed_precision='fp16' needs a CUDA GPU; on {accelerator.device} Accelerate would train in "
            "float32. Pass --mixed-precision bf16 (CPU autocast) or no.",
            "mixed_precision",
        )
    _check_trackers(settings, accelerator)
    if accelerator.is_main_process and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if launched is not None and launched.strip() != str(accumulation):
        logger.warning(
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=%s (accelerate launch --gradient_accumulation_steps) is not used: "
            "this run accumulates gradient_accumulation_steps=%d micro-batches per optimizer step; pass "
            "--gradient-accumulation-steps to the script instead.",
            launched,
            accumulation,
        )
    if logging.getLogger("accelerate").level == logging.NOTSET:  # its per-file save/load lines
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    return accelerator, mixed_precision


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The package each ``report_to`` tracker needs (its pip name)."""


def _check_trackers(settings: TrainSettings, accelerator: Any) -> None:
    """Refuse a ``report_to`` tracker that Accelerate dropped because its package is not installed."""
    if settings.report_to is None:
        return
    found = {str(tracker) for tracker in accelerator.log_with}
    if settings.report_to == "all" and not found:
        raise SettingsError(
            f"report_to='all' logs to every tracker installed, but none is; install one (pip install "
            f"{' or '.join(TRACKER_PACKAGES.values())}), or leave --report-to unset.",
            "report_to",
        )
    if settings.report_to != "all" and settings.report_to not in found:
        package = TRACKER_PACKAGES[settings.report_to]
        raise SettingsError(
            f"report_to={settings.report_to!r}: the {package} package is not installed, so the run would log "
            f"nothing; install it (pip install {package}), or leave --report-to unset.",
            "report_to",
        )


def _check_crop_holds_patches(settings: TrainSettings, segmenter: torch.nn.Module) -> None:
    """Refuse crops whose slices are smaller than the backbone embeds (``medtuning predict`` refuses such windows):
    one patch, more for SegFormer (:func:`~medtuning_peft.volumetric.min_slice_size`)."""
    from .volumetric import min_slice_size

    mh, mw = min_slice_size(segmenter.backbone)
    _, h, w = settings.crop_size
    if h < mh or w < mw:
        raise SettingsError(
            f"crop_size={settings.crop_size}: slices of {h} x {w} pixels are smaller than the {mh} x {mw} pixels "
            f"backbone '{settings.backbone}' embeds; pass H >= {mh} and W >= {mw}, e.g. --crop-size "
            f"{settings.crop_size[0]} {max(h, 4 * mh)} {max(w, 4 * mw)}.",
            "crop_size",
        )


def _build_model(settings: TrainSettings, task: dict[str, Any]) -> torch.nn.Module:
    """The segmenter for the task's channels and classes, recording what prediction needs."""
    from .volumetric import build_segmenter

    segmenter = build_segmenter(
        settings.backbone,
        in_channels=len(task["channel_names"]),
        num_classes=len(task["label_values"]),
        decoder=settings.decoder,
        method=settings.method,
        label_names=task["label_names"],
        decoder_kwargs=None if settings.decoder_channels is None else {"channels": settings.decoder_channels},
        crop_size=settings.crop_size,
        preprocessing=task["preprocessing"],
        train_patch_embedding=settings.train_patch_embedding,
    )
    if settings.gradient_checkpointing:
        # After the adapters are in place (enabling it first breaks Swin); non-reentrant only.
        enable_activation_checkpointing(segmenter.backbone)
    if settings.cuda_graphs:
        from .tuners.med_adapter import enable_cuda_graphs

        enable_cuda_graphs(segmenter)
    # Read by `medtuning predict` to write label values (BraTS 0/1/2/4) and name the channels.
    segmenter.segmenter_config["label_values"] = task["label_values"]
    segmenter.segmenter_config["channel_names"] = task["channel_names"]
    segmenter.segmenter_config["sw_overlap"] = settings.sw_overlap  # predict's default window overlap
    if DATASETS[settings.dataset].postprocess_et and settings.et_min_voxels:
        # `medtuning predict` applies the rule validation applied, so both write the same labels.
        segmenter.segmenter_config["brats_et_min_voxels"] = settings.et_min_voxels
    return segmenter


_TRAINER_STATE_KEYS = ("step", "total_steps", "num_processes", "history", "settings")
_CHECKPOINT_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin")
"""What ``accelerator.save_state`` writes for this engine's model, optimizer and scheduler (RNG states apart)."""
_SCALER_FILE = "scaler.pt"
"""The gradient scaler's state, which ``accelerator.save_state`` writes with fp16 only."""


def _check_checkpoint(folder: Path, process_index: int, previous: Path | None) -> dict[str, Any]:
    """The trainer state of checkpoint ``folder`` after checking that it can be resumed from.

    The trainer state must hold every key resume reads, the model weights must be a complete safetensors file, and
    the optimizer, scheduler and (fp16) gradient scaler files must load. A missing RNG state only warns: the run
    goes on, but no longer repeats an uninterrupted one exactly.

    Raises:
        CorruptFileError: naming the folder, what is wrong, and how to go on (remove it: resume then takes
            ``previous``).
    """

    def damaged(problem: str) -> CorruptFileError:
        return _damaged_checkpoint(folder, problem, previous)

    state = json.loads((folder / TRAINER_STATE_NAME).read_text())  # readable: complete_checkpoints parsed it
    missing = [k for k in _TRAINER_STATE_KEYS if k not in state]
    if missing:
        raise damaged(f"{TRAINER_STATE_NAME} lacks {missing}")
    history = state["history"]
    if not isinstance(state["settings"], dict) or not (
        isinstance(history, dict) and all(isinstance(history.get(k), list) for k in ("loss", "validation"))
    ):
        raise damaged(f"{TRAINER_STATE_NAME} has no settings mapping or no loss and validation history")
    absent = [name for name in _CHECKPOINT_FILES if not (folder / name).is_file()]
    if absent:
        raise damaged(f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} missing")
    try:
        check_safetensors(folder / "model.safetensors")
    except CorruptFileError as error:
        raise damaged(_first_sentence(error)) from error
    scaler = (_SCALER_FILE,) if (folder / _SCALER_FILE).is_file() else ()
    for name in (
        *_CHECKPOINT_FILES[1:],
        *scaler,
    ):  # read as load_state reads them, to name the file that fails
        try:
            torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or overwritten file: torch and pickle raise many kinds
            raise damaged(
                f"{name} cannot be read ({type(error).__name__}: {_first_sentence(error)})"
            ) from error
    if not (folder / f"random_states_{process_index}.pkl").is_file():
        logger.warning(
            "Checkpoint %s has no random_states_%d.pkl: resuming with this process's current random state, so "
            "the crops and augmentations will differ from those of an uninterrupted run.",
            folder,
            process_index,
        )
    return state


def _first_sentence(error: Exception) -> str:
    return str(error).strip().split(". ")[0].split("\n")[0].rstrip(".")


def _damaged_checkpoint(folder: Path, problem: str, previous: Path | None) -> CorruptFileError:
    then = f"the previous complete one, {previous}" if previous else "step 0 (no earlier checkpoint is left)"
    return CorruptFileError(
        f"Checkpoint {folder} is damaged: {problem}. Remove that folder and run again with --resume to continue from "
        f"{then}."
    )


def _trains_patch_embedding(settings: TrainSettings, task: dict[str, Any]) -> bool:
    """Whether the run's model trains the patch embedding (``train_patch_embedding``, resolved for the data)."""
    from .volumetric import trains_patch_embedding

    return trains_patch_embedding(settings.method, len(task["channel_names"]), settings.train_patch_embedding)


def _check_same_patch_embedding(
    folder: Path, state: dict[str, Any], settings: TrainSettings, task: dict
) -> None:
    """Refuse to resume a checkpoint whose patch embedding was trained or frozen otherwise than this run's.

    Compared as resolved for the data, so that ``--train-patch-embedding`` on a run that trained it by default is
    the same setting; checkpoints written before the setting existed froze it.
    """
    from .volumetric import ADAPTER_METHODS

    if settings.method not in ADAPTER_METHODS:  # full trains it, decoder_only freezes it: by the method
        return
    saved = bool(state.get("train_patch_embedding", False))
    if saved != _trains_patch_embedding(settings, task):
        flag = "--train-patch-embedding" if saved else "--no-train-patch-embedding"
        raise SettingsError(
            f"Checkpoint {folder} was written with the patch embedding {'trained' if saved else 'frozen'}, and "
            f"this run would {'freeze' if saved else 'train'} it; resume with {flag} (or start a new --output-dir).",
            "train_patch_embedding",
        )


def _resume(
    accelerator: Any,
    settings: TrainSettings,
    checkpoint_dir: Path,
    task: dict[str, Any],
    mixed_precision: str,
) -> dict[str, Any] | None:
    """Load the newest checkpoint into the prepared objects; its trainer state, or None.

    A damaged newest checkpoint (a folder ``step_N`` whose files are missing, truncated or unreadable, its trainer
    state included) stops the run rather than falling back to an older one: going back silently would discard the
    steps since then and hide a disk problem; the error names the folder to remove.

    Raises:
        CorruptFileError: for a damaged newest checkpoint (naming it and the fix).
        SettingsError: for a checkpoint written with other settings, another (resolved) mixed precision or another
            number of processes, or on other data: the split of the cases listed now differs from the checkpoint's
            (a case added or removed reshuffles the split, and cases trained on would be validated on).
        RuntimeError: when Accelerate cannot load a checkpoint whose files were all found readable (naming it and
            Accelerate's error).
    """
    checkpoints = complete_checkpoints(checkpoint_dir)
    folders = _step_folders(checkpoint_dir)
    if folders and (not checkpoints or folders[-1][0] > checkpoints[-1][0]):
        newest = folders[-1][1]
        problem = _state_problem(newest, folders[-1][0])
        raise _damaged_checkpoint(newest, problem, checkpoints[-1][1] if checkpoints else None)
    if not checkpoints:
        logger.info("--resume: no complete checkpoint in %s; starting from step 0.", checkpoint_dir)
        return None
    step, folder = checkpoints[-1]
    previous = checkpoints[-2][1] if len(checkpoints) > 1 else None
    state = _check_checkpoint(folder, accelerator.process_index, previous)
    # A setting added after the checkpoint was written had its default's effect then.
    saved = {**_default_settings(), **state["settings"]}
    current = settings.to_dict()
    changed = {k: (saved[k], current[k]) for k in _RESUME_KEYS if saved[k] != current[k]}
    # Checkpoints written before the resolved precision was recorded hold the setting: "auto" was bf16 or no.
    saved_precision = state.get("mixed_precision", saved["mixed_precision"])
    if saved_precision != mixed_precision and not (saved_precision == "auto" and mixed_precision != "fp16"):
        changed["mixed_precision"] = (saved_precision, mixed_precision)
    if state["num_processes"] != accelerator.num_processes:
        changed["num_processes"] = (state["num_processes"], accelerator.num_processes)
    if changed:
        field = next((k for k in changed if k != "num_processes"), None)  # num_processes: a launch option
        raise SettingsError(
            f"Checkpoint {folder} was written with other settings {changed} (saved, now); resume with the same "
            f"settings and number of processes, or start a new --output-dir.",
            field,
        )
    _check_same_patch_embedding(folder, state, settings, task)
    _check_same_split(folder, state.get("split"), task)
    try:
        accelerator.load_state(
            str(folder)
        )  # model, optimizer, scheduler, RNG; torch files read with weights_only
    except Exception as error:  # its files were found readable above: not damage, so not for removal
        raise RuntimeError(
            f"Resuming from checkpoint {folder} failed: accelerator.load_state raised {type(error).__name__}: "
            f"{error}. Its files are complete and readable; the checkpoint does not fit what this run prepared."
        ) from error
    logger.info("Resumed from %s at step %d of %d.", folder, step, state["total_steps"])
    return state


def _default_settings() -> dict[str, Any]:
    """The default of every :class:`TrainSettings` field."""
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(TrainSettings)
    }


def _split(task: dict[str, Any]) -> dict[str, list[str]]:
    """The train/validation split a checkpoint records (sorted case ids, as ``split_cases`` returns them)."""
    return {"train_cases": task["train_cases"], "val_cases": task["val_cases"]}


def _check_same_split(folder: Path, saved: Any, task: dict[str, Any]) -> None:
    """Refuse to resume on data whose train/validation split differs from the checkpoint's."""
    if saved is None:  # written before checkpoints recorded their split
        logger.warning(
            "Checkpoint %s records no train/validation split; resuming without checking that the data are the "
            "same.",
            folder,
        )
        return
    if saved == _split(task):
        return
    before = {*saved["train_cases"], *saved["val_cases"]}
    now = {*task["train_cases"], *task["val_cases"]}
    moved = sorted(set(saved["train_cases"]) & set(task["val_cases"]))
    if before == now:
        # The same cases and split settings (compared before this): the split rule itself differs. split_cases
        # keeps the cases of one patient (data.patient_id) on one side, which checkpoints of earlier versions
        # did not for ids that name a patient and a time point or frame.
        raise SettingsError(
            f"Checkpoint {folder} split the same cases differently (trained on but now validation: {moved}): it "
            "was written by a version whose train/validation split did not keep one patient's cases on one side "
            "(medtuning_peft.data.patient_id). Validating on cases the model was trained on would inflate its "
            "scores; start a new --output-dir.",
            "data_dir",
        )
    raise SettingsError(
        f"Checkpoint {folder} was trained on other data: the cases listed now split differently (added "
        f"{sorted(now - before)}, removed {sorted(before - now)}; trained on but now validation: {moved}). "
        f"Validating on cases the model was trained on would inflate its scores. Resume on the same cases (data_dir "
        f"{task['data_dir']!r}), or start a new --output-dir.",
        "data_dir",
    )


def _num_workers(settings: TrainSettings) -> int:
    """DataLoader worker processes: ``num_workers``, else 4 on CUDA machines and 0 (in process) otherwise."""
    if settings.num_workers is not None:
        return settings.num_workers
    return 4 if torch.cuda.is_available() else 0


def _epoch_loader(
    dataset: Any, settings: TrainSettings, accelerator: Any, epoch: int, steps: int, first: int
):
    """This process's micro-batches of ``epoch``, from optimizer step ``first`` to ``steps`` of the epoch."""
    A = settings.gradient_accumulation_steps
    dataset.set_epoch(epoch)
    sampler = ShardedBatchSampler(
        len(dataset),
        settings.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        seed=settings.seed,
        epoch=epoch,
        num_batches=steps * A,
        start=first * A,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=_num_workers(settings),
        pin_memory=torch.cuda.is_available(),
        # Own generator: creating the iterator must not draw from the global RNG (resume-exact).
        generator=torch.Generator().manual_seed(settings.seed + epoch),
    )


def _fresh_predictions_dir(accelerator: Any, output_dir: Path) -> Path:
    folder = output_dir / PREDICTIONS_DIR_NAME
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    return folder


def train(settings: TrainSettings, on_step_end: Callable[[StepInfo], None] | None = None) -> dict[str, Any]:
    """Train a volumetric segmenter, validate it, and write the model, checkpoints and metrics.

    Run it under ``accelerate launch`` for several processes or machines; plain ``python`` runs one process.

    Args:
        settings: the run's settings.
        on_step_end: called on every process after each optimizer step (and its validation and checkpoint);
            raise inside it to stop the run early (the last complete checkpoint stays resumable).

    Returns:
        The content of ``metrics.json`` (on every process; only the main process writes files): ``summary`` and
        ``per_case`` of the final validation, ``history`` (loss curve and validation summaries), ``settings``,
        ``data``, ``parameters``, ``adapter_bytes``, ``wall_time_s`` and more.

    Raises:
        SettingsError: before anything is written, for settings that do not fit the data (too few cases or
            crops, more folds than cases), an ``output_dir`` that cannot be created or written, or a checkpoint
            whose settings differ from these. An earlier run in ``output_dir`` without ``resume`` or ``overwrite``
            raises one that is also a ``FileExistsError``, a missing ``data_dir`` one that is also a
            ``FileNotFoundError``.
        CorruptFileError: when ``resume`` finds the newest checkpoint damaged (naming it and the fix).
        RuntimeError: when ``resume`` cannot load a checkpoint whose files are readable (naming it and the error).
        FloatingPointError: when the training loss of a step is not finite (naming the step, the loss and the
            learning rate); that step is not saved, earlier complete checkpoints stay.
        TrainingInterrupted: (a ``KeyboardInterrupt``) on Ctrl-C during training, with the step reached and the
            newest complete checkpoint.
    """
    from accelerate.utils import set_seed
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from .data import CropDataset

    started = time.time()
    output_dir = Path(settings.output_dir).expanduser().absolute()
    checkpoint_dir = output_dir / CHECKPOINTS_DIR_NAME
    accelerator, mixed_precision = _make_accelerator(settings, output_dir)
    if settings.cuda_graphs and accelerator.device.type != "cuda":
        raise SettingsError(
            f"cuda_graphs=True needs a CUDA device; this process runs on {accelerator.device}.", "cuda_graphs"
        )
    is_main = accelerator.is_main_process
    # --overwrite deletes the earlier run only once the settings are known to fit the data (below): a run refused
    # for its settings leaves the earlier one in place.
    earlier_run = _check_output_dir(output_dir, settings)

    # A resumed run keeps the preprocessing it was trained with, whatever the defaults are now.
    resumed = _resumed_preprocessing(checkpoint_dir) if settings.resume else None
    task, train_cases, val_cases, label_files = _load_task(settings, accelerator, resumed)
    val_cases = sorted(val_cases, key=lambda c: c.case_id)
    set_seed(settings.seed)
    segmenter = _build_model(settings, task)
    _check_crop_holds_patches(settings, segmenter)
    # Initialization above is identical on every process; stochastic layers (drop path) and anything else drawn
    # from here on get a per-process stream, so processes do not repeat each other's masks.
    set_seed(settings.seed, device_specific=True)
    counts = parameter_counts(segmenter)
    trainable = [p for p in segmenter.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        trainable, lr=settings.lr, weight_decay=settings.weight_decay, device=accelerator.device
    )

    dataset = CropDataset(
        train_cases,
        settings.crop_size,
        samples_per_case=settings.samples_per_case,
        seed=settings.seed,
        foreground_probability=settings.foreground_probability,
    )
    if _num_workers(settings):  # each epoch's workers inherit them instead of scanning every label again
        dataset.precompute_crop_centres()
    P, b, A = accelerator.num_processes, settings.batch_size, settings.gradient_accumulation_steps
    steps_per_epoch = len(dataset) // (b * P) // A
    if steps_per_epoch < 1:
        raise SettingsError(
            f"One optimizer step needs batch_size x num_processes x gradient_accumulation_steps = {b} x {P} x {A} = "
            f"{b * P * A} crops but an epoch has {len(dataset)} ({len(train_cases)} training cases x "
            f"samples_per_case={settings.samples_per_case}); raise --samples-per-case or lower the batch.",
            "samples_per_case",
        )
    total_steps = settings.max_steps or settings.epochs * steps_per_epoch
    warmup_steps = round(settings.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps, settings.min_lr_ratio)
    )
    # The settings fit the data: only now is an earlier run deleted (--overwrite) and does the run folder appear.
    accelerator.wait_for_everyone()  # every process has checked the folders before --overwrite deletes them
    if is_main:
        _delete_earlier_run(earlier_run)
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir.glob(".step_*.partial") if checkpoint_dir.is_dir() else []:
            logger.info("Removing incomplete checkpoint %s (a run stopped while saving it).", stale)
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    model, optimizer, scheduler = accelerator.prepare(segmenter, optimizer, scheduler)
    # Validation runs in float32, as `medtuning predict` does, so that predict writes the run's predictions again:
    # the autocast wrapper prepare() put on the model's forward is removed, and training forwards enter the run's
    # autocast themselves (below).
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    checkpoint_every = settings.checkpoint_every or settings.val_every or total_steps

    state = _resume(accelerator, settings, checkpoint_dir, task, mixed_precision) if settings.resume else None
    step = state["step"] if state else 0
    history = state["history"] if state else {"loss": [], "validation": []}
    elapsed_before = state.get("wall_time_s", 0.0) if state else 0.0

    if settings.report_to:
        accelerator.init_trackers("medtuning", config=_tracker_config(settings))
    logger.info(
        "Training %s (%s, decoder %s): %s of %s parameters tuned (%.2f%%); %d training / %d validation cases; "
        "%d steps of %d crops %s (%d per process x %d processes x %d accumulated) on %s%s.",
        settings.method,
        settings.backbone,
        settings.decoder,
        f"{counts['tuned']:,}",
        f"{counts['total']:,}",
        counts["tuned_percent"],
        len(train_cases),
        len(val_cases),
        total_steps,
        b * P * A,
        tuple(settings.crop_size),
        b,
        P,
        A,
        accelerator.device,
        f", {mixed_precision}" if mixed_precision != "no" else "",
    )

    progress = tqdm(total=total_steps, initial=step, disable=not is_main, desc="train")
    train_started = time.time()
    final_validation: tuple[dict, dict] | None = None
    running = torch.zeros((), device=accelerator.device)
    model_dir = output_dir / MODEL_DIR_NAME

    def validates_at(at_step: int) -> bool:
        return at_step == total_steps or (settings.val_every > 0 and at_step % settings.val_every == 0)

    def validate(at_step: int, final: bool) -> tuple[dict, dict]:
        """Validate the model of step ``at_step`` and record it in the history (replacing an earlier record of
        that step: a finished run resumed). The final validation writes the predictions."""
        predictions = (
            _fresh_predictions_dir(accelerator, output_dir) if final and settings.save_predictions else None
        )
        per_case, summary = _validate(
            accelerator, unwrapped, val_cases, settings, task, label_files, predictions
        )
        model.train()
        history["validation"] = [v for v in history["validation"] if v["step"] != at_step]
        history["validation"].append({"step": at_step, "summary": summary})
        if settings.report_to:
            accelerator.log({f"val/{k}": v["mean"] for k, v in summary.items()}, step=at_step)
        if is_main:
            progress.write(
                f"validation at step {at_step} ({len(per_case)} cases): {_format_summary(summary)}"
            )
        return per_case, summary

    def save_model_and_validate() -> tuple[dict, dict]:
        """The end of the run: the model is saved before its validation, which a failure or Ctrl-C may stop."""
        if is_main:
            # An earlier save's metrics (a finished run resumed) describe it only until it is replaced.
            (output_dir / METRICS_NAME).unlink(missing_ok=True)
            unwrapped.save_pretrained(model_dir)
        accelerator.wait_for_everyone()
        return validate(total_steps, final=True)

    model.train()
    try:
        if (
            state
            and step < total_steps
            and validates_at(step)
            and all(v["step"] != step for v in history["validation"])
        ):  # the checkpoint was saved before its step's validation, which did not finish
            validate(step, final=False)
            _record_validation(accelerator, checkpoint_dir / f"step_{step}", state)
        while step < total_steps:
            epoch, first = divmod(step, steps_per_epoch)
            for batch in _epoch_loader(dataset, settings, accelerator, epoch, steps_per_epoch, first):
                with accelerator.accumulate(model):
                    images = batch["image"].to(accelerator.device, non_blocking=True)  # (b, C, D, H, W)
                    labels = batch["label"].to(accelerator.device, non_blocking=True)  # (b, D, H, W) classes
                    with accelerator.autocast():
                        logits = model(images)  # (b, K, D, H, W)
                    loss = loss_fn(logits.float(), labels[:, None])  # targets (b, 1, D, H, W)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and settings.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
                    optimizer.step()  # skipped by Accelerate until the last micro-batch of the step
                    optimizer.zero_grad(set_to_none=True)
                running += loss.detach()
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                step_loss = accelerator.reduce(running / A, reduction="mean").item()  # the step's one sync
                running.zero_()
                if not math.isfinite(step_loss):  # the same on every process: all stop together
                    raise FloatingPointError(
                        f"Training loss is {step_loss} at step {step} of {total_steps} (learning rate {lr:.3g}); the run "
                        f"stopped without saving this step (complete checkpoints before it are kept in "
                        f"{checkpoint_dir}). Lower --lr, clip gradients with --max-grad-norm, or check the data for "
                        f"NaN or infinite voxels, and start over with --overwrite."
                    )
                history["loss"].append({"step": step, "loss": step_loss, "lr": lr})
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if settings.report_to:
                    accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=step)
                if is_main and (step % settings.log_every == 0 or step == total_steps):
                    recent = np.mean([h["loss"] for h in history["loss"][-settings.log_every :]])
                    progress.write(f"step {step}/{total_steps}  loss {recent:.4f}  lr {lr:.2e}")

                is_last = step == total_steps
                checkpoint = None
                # The checkpoint is saved before the step's validation: a failure or Ctrl-C there keeps the step.
                if step % checkpoint_every == 0 or is_last:
                    trainer_state = {
                        "step": step,
                        "epoch": epoch,
                        "total_steps": total_steps,
                        "num_processes": P,
                        "samples_seen": step * b * P * A,
                        "history": history,
                        "settings": settings.to_dict(),
                        "split": _split(task),
                        "train_patch_embedding": _trains_patch_embedding(settings, task),
                        "mixed_precision": mixed_precision,  # resolved: resume compares it
                        "preprocessing": task["preprocessing"],  # resume keeps it
                        "wall_time_s": elapsed_before + time.time() - train_started,
                    }
                    checkpoint = _save_checkpoint(
                        accelerator, checkpoint_dir, step, trainer_state, settings.keep_checkpoints
                    )
                validates = validates_at(step)
                if is_last:
                    final_validation = save_model_and_validate()
                elif validates:
                    validate(step, final=False)
                if checkpoint is not None and validates:
                    trainer_state["wall_time_s"] = elapsed_before + time.time() - train_started
                    _record_validation(accelerator, checkpoint, trainer_state)
                if on_step_end is not None:
                    on_step_end(
                        StepInfo(step, total_steps, step_loss, lr, accelerator, model, optimizer, checkpoint)
                    )
                if is_last:
                    break
        progress.close()
        train_time = time.time() - train_started

        if final_validation is None:  # a finished run resumed: save and validate the loaded model again
            final_validation = save_model_and_validate()
            _record_validation(accelerator, checkpoint_dir / f"step_{step}", state)
    except KeyboardInterrupt as interrupt:
        progress.close()
        newest = complete_checkpoints(checkpoint_dir) if is_main else []
        raise TrainingInterrupted(
            step, total_steps, newest[-1][1] if newest else None, is_main
        ) from interrupt
    per_case, summary = final_validation

    losses = [h["loss"] for h in history["loss"]]
    window = max(1, min(10, len(losses) // 4))
    metrics = {
        "summary": summary,
        "per_case": per_case,
        "steps": total_steps,
        "samples_seen": total_steps * b * P * A,
        "loss_first": float(np.mean(losses[:window])) if losses else None,
        "loss_last": float(np.mean(losses[-window:])) if losses else None,
        "parameters": counts,
        "adapter_bytes": _directory_bytes(model_dir, skip=("backbone",)),
        "model_dir_bytes": _directory_bytes(model_dir),
        "wall_time_s": round(elapsed_before + time.time() - started, 2),
        "train_time_s": round(train_time, 2),
        "resumed_from_step": state["step"] if state else None,
        "history": history,
        "settings": settings.to_dict(),
        "data": {**task, "num_train_cases": len(train_cases), "num_val_cases": len(val_cases)},
        "run": {
            "num_processes": P,
            "device": str(accelerator.device),
            "mixed_precision": mixed_precision,
            "global_batch": b * P * A,
            "steps_per_epoch": steps_per_epoch,
            "warmup_steps": warmup_steps,
            "sliding_window": {"roi_size": settings.crop_size, "overlap": settings.sw_overlap},
        },
        "versions": _versions(),
    }
    if is_main:
        _write_json(output_dir / METRICS_NAME, metrics)
        logger.info(
            "Done in %.0f s. Validation (%d cases): %s. Model: %s; metrics: %s.",
            metrics["wall_time_s"],
            len(per_case),
            _format_summary(summary),
            model_dir,
            output_dir / METRICS_NAME,
        )
    accelerator.wait_for_everyone()  # no process returns before metrics.json exists
    accelerator.end_training()
    return metrics


def _versions() -> dict[str, str]:
    import accelerate
    import monai
    import peft
    import transformers

    from . import __version__

    return {
        "medtuning_peft": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _argparse_type(annotation: str) -> Any:
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if re.search(rf"\b{name}\b", annotation):
            return kind
    return str


def build_parser(
    description: str, *, exclude: Sequence[str] = (), **defaults: Any
) -> argparse.ArgumentParser:
    """Command-line parser with one option per :class:`TrainSettings` field (help from the field).

    Args:
        description: the script's description.
        exclude: fields the script offers no option for (they keep their :class:`TrainSettings` default), e.g.
            ``synthetic_cases`` for a script without built-in synthetic data.
        **defaults: the script's own defaults, e.g. ``crop_size=[32, 64, 64]``, ``max_steps=300``.

    Returns:
        An ``ArgumentParser``; pass its result to :func:`settings_from_args`.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(TrainSettings)
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise ValueError(f"build_parser defaults {unknown} are not TrainSettings fields.")
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise ValueError(f"build_parser exclude {unknown} are not TrainSettings fields.")
    for f in dataclasses.fields(TrainSettings):
        if not f.metadata.get("cli", True) or f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(
            f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory()
        )
        annotation = str(hints[f.name])
        options: dict[str, Any] = {"help": f.metadata["help"], "default": default, "dest": f.name}
        if hints[f.name] in (bool, bool | None):  # None: the flag was not given
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = f.metadata.get("type") or _argparse_type(annotation)
            for key in ("nargs", "choices"):
                if key in f.metadata:
                    options[key] = f.metadata[key]
            if "nargs" in options:
                options["metavar"] = ("D", "H", "W")
            if f.name in ("epochs", "max_steps"):
                options["action"] = _StoreGiven
        parser.add_argument(flag, **options)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option help with defaults; the description (an example script's docstring, with its commands) as written."""


class _StoreGiven(argparse.Action):
    """Stores the value and records that the flag was given (``args._given``): a script's ``max_steps`` default
    must not override an ``--epochs`` typed on the command line."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace._given = {*getattr(namespace, "_given", ()), self.dest}


def settings_from_args(args: argparse.Namespace, **fixed: Any) -> TrainSettings:
    """:class:`TrainSettings` from parsed options plus the script's fixed fields (``dataset``, ``default_data``)."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings) if hasattr(args, f.name)
    }
    given = getattr(args, "_given", set())
    if "epochs" in given and "max_steps" not in given:
        values["max_steps"] = None  # --epochs typed, the step count only a default: the epochs count
    return TrainSettings(**{**values, **fixed})


def train_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, **fixed: Any
) -> dict[str, Any]:
    """Train with the parsed options of an example script, reporting as a command-line tool does.

    A :class:`SettingsError` (from the settings or from :func:`train`'s checks of the data and the output folder)
    becomes a usage error of its flag: ``parser.error``, exit status 2. Ctrl-C prints where the run stopped and how
    to resume it, and exits with status 130.

    Args:
        parser: the script's parser (from :func:`build_parser`).
        args: its parsed options.
        **fixed: the script's fixed fields (``dataset``, ``default_data``, ...).

    Returns:
        What :func:`train` returns.
    """
    try:
        return train(settings_from_args(args, **fixed))
    except SettingsError as error:
        cli = {f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get("cli", True)}
        if error.field in cli:
            parser.error(f"argument --{error.field.replace('_', '-')}: {error}")
        parser.error(str(error))
    except KeyboardInterrupt as interrupt:
        if not isinstance(interrupt, TrainingInterrupted):
            print(
                f"Interrupted. Run the same command with --resume to continue from the newest complete checkpoint "
                f"in {Path(args.output_dir) / CHECKPOINTS_DIR_NAME} (from step 0 if there is none).",
                file=sys.stderr,
            )
        elif interrupt.is_main and interrupt.checkpoint is not None:
            print(
                f"Interrupted at step {interrupt.step} of {interrupt.total_steps}. Run the same command with "
                f"--resume to continue from the newest complete checkpoint, {interrupt.checkpoint}.",
                file=sys.stderr,
            )
        elif interrupt.is_main:
            print(
                f"Interrupted at step {interrupt.step} of {interrupt.total_steps}, before the first checkpoint was "
                f"saved; run the same command with --resume to start again from step 0 (--checkpoint-every N "
                f"saves checkpoints more often).",
                file=sys.stderr,
            )
        sys.exit(130)


def run_example(
    description: str,
    argv: Sequence[str] | None = None,
    *,
    dataset: str,
    default_data: str | None = None,
    default_data_dir: str | os.PathLike | None = None,
    data_note: str | None = None,
    **defaults: Any,
) -> dict[str, Any]:
    """Parse the command line of an example script and train.

    Args:
        description: the script's ``--help`` text.
        argv: arguments (default ``sys.argv[1:]``).
        dataset: a key of :data:`DATASETS`.
        default_data: a key of :data:`DEFAULT_DATA` written and used when ``--data-dir`` is not given.
        default_data_dir: a folder used when ``--data-dir`` is not given (e.g. a sample shipped with the repo).
        data_note: what ``default_data_dir`` holds, for the log and metrics.json.
        **defaults: the script's defaults for :class:`TrainSettings` fields.

    Returns:
        What :func:`train` returns; a settings error exits with a usage message (status 2), Ctrl-C with a line on
        how to resume (status 130), as :func:`train_from_args` describes.
    """
    # --synthetic-cases sizes the built-in synthetic data; a script without it (MSD: a shipped real sample) has no
    # such option rather than one it would ignore.
    exclude = () if default_data is not None else ("synthetic_cases",)
    parser = build_parser(description, exclude=exclude, **defaults)
    args = parser.parse_args(argv)
    fixed: dict[str, Any] = {"dataset": dataset, "default_data": default_data}
    if args.data_dir is None and default_data_dir is not None:
        fixed.update(data_dir=str(default_data_dir), data_note=f"{data_note} (no --data-dir given)")
    return train_from_args(parser, args, **fixed)
