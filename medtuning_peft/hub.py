"""Share a saved segmenter on the Hugging Face Hub, with a generated model card.

:func:`push_to_hub` uploads what :meth:`~medtuning_peft.volumetric.VolumetricSegmenter.save_pretrained`
wrote (adapter + decoder, segmenter settings, and the base backbone when it cannot be re-loaded by Hub
id) plus a ``README.md`` from :func:`build_model_card`. Only the files a saved segmenter consists of are
uploaded (:data:`UPLOAD_PATTERNS`): safetensors and JSON, no pickles, no checkpoints, metrics or other files
that happen to lie in the folder. Every file is checked for truncation first; the folder itself is never
written to (the card is uploaded from memory). The upload uses ``huggingface_hub``'s public API
(``HfApi.create_repo``, ``HfApi.create_branch``, ``HfApi.create_commit``); loading by Hub id later goes
through the same :func:`medtuning_peft.from_pretrained` as a local directory.

Typical use::

    from medtuning_peft.hub import build_model_card, push_to_hub

    print(build_model_card("runs/kits/model", dataset="kits19"))  # metrics from runs/kits/metrics.json
    push_to_hub("runs/kits/model", "my-org/kits19-swin-med-adapter", dataset="kits19")
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io_utils import PARTIAL_PREFIX, check_safetensors, read_json_file, safetensors_header

__all__ = [
    "DATASETS",
    "IGNORE_PATTERNS",
    "PAPER_BIBTEX",
    "UPLOAD_PATTERNS",
    "DatasetInfo",
    "build_model_card",
    "check_push",
    "count_parameters",
    "files_to_upload",
    "find_metrics",
    "push_to_hub",
    "validate_card",
]

logger = logging.getLogger(__name__)

SEGMENTER_CONFIG_NAME = "segmenter_config.json"  # as written by volumetric.py
ADAPTER_CONFIG_NAME = "adapter_config.json"
METRICS_NAME = "metrics.json"

CARD_NAME = "README.md"
UPLOAD_PATTERNS: list[str] = [
    SEGMENTER_CONFIG_NAME,
    ADAPTER_CONFIG_NAME,
    "adapter_model.safetensors",  # med_adapter / lora: adapters + decoder
    "model.safetensors",  # full / decoder_only
    "backbone/config.json",  # the base backbone, when it is not re-loaded by Hub id
    "backbone/model.safetensors",
    "backbone/model.safetensors.index.json",
    "backbone/model-*-of-*.safetensors",
]
"""The files of a saved segmenter that are uploaded (``huggingface_hub`` ``allow_patterns``, matched against
paths relative to the model folder); the generated ``README.md`` is added to them."""
IGNORE_PATTERNS: list[str] = [".*", "*/.*"]
"""Never uploaded: hidden files, including partial files of interrupted writes."""

PAPER_BIBTEX = """@inproceedings{shen2024medtuning,
  title     = {Med-Tuning: A New Parameter-Efficient Tuning Framework for Medical Volumetric Segmentation},
  author    = {Shen, Jiachen and Wang, Wenxuan and Chen, Chen and Jiao, Jianbo and Liu, Jing and Zhang, Yan and Song, Shanshan and Li, Jiangyun},
  booktitle = {Medical Imaging with Deep Learning (MIDL)},
  year      = {2024},
  note      = {arXiv:2304.10880}
}"""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model card says about the data a model was trained on.

    Attributes:
        name: full name of the data set.
        url: where to get it.
        licence: the data licence, in words.
        hub_license: the Hub ``license`` identifier a card gets by default for a model trained on it.
        tag: the Hub tag.
        bibtex: the citation(s) the data providers ask for.
    """

    name: str
    url: str
    licence: str
    hub_license: str
    tag: str
    bibtex: str


_MSD = DatasetInfo(
    name="Medical Segmentation Decathlon",
    url="http://medicaldecathlon.com",
    licence="CC BY-SA 4.0",
    hub_license="cc-by-sa-4.0",
    tag="medical-segmentation-decathlon",
    bibtex="""@article{simpson2019msd,
  title   = {A large annotated medical image dataset for the development and evaluation of segmentation algorithms},
  author  = {Simpson, Amber L. and others},
  journal = {arXiv preprint arXiv:1902.09063},
  year    = {2019}
}
@article{antonelli2022msd,
  title   = {The Medical Segmentation Decathlon},
  author  = {Antonelli, Michela and others},
  journal = {Nature Communications},
  volume  = {13},
  pages   = {4128},
  year    = {2022}
}""",
)

DATASETS: dict[str, DatasetInfo] = {
    "kits19": DatasetInfo(
        name="KiTS19 (2019 Kidney and Kidney Tumor Segmentation Challenge)",
        url="https://kits19.grand-challenge.org",
        licence="CC BY-NC-SA 4.0 (non-commercial; benchmarking for publication is acceptable use)",
        hub_license="cc-by-nc-sa-4.0",
        tag="kits19",
        bibtex="""@article{heller2019kits19,
  title   = {The KiTS19 Challenge Data: 300 Kidney Tumor Cases with Clinical Context, CT Semantic Segmentations, and Surgical Outcomes},
  author  = {Heller, Nicholas and others},
  journal = {arXiv preprint arXiv:1904.00445},
  year    = {2019}
}""",
    ),
    "brats": DatasetInfo(
        name="BraTS 2019 / 2020 (Brain Tumor Segmentation Challenge)",
        url="https://www.med.upenn.edu/cbica/brats2020/",
        licence="the BraTS data usage terms of the challenge organizers (cite the papers below)",
        hub_license="other",
        tag="brats",
        bibtex="""@article{menze2015brats,
  title   = {The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)},
  author  = {Menze, Bjoern H. and others},
  journal = {IEEE Transactions on Medical Imaging},
  volume  = {34},
  number  = {10},
  pages   = {1993--2024},
  year    = {2015}
}
@article{bakas2017brats,
  title   = {Advancing The Cancer Genome Atlas glioma MRI collections with expert segmentation labels and radiomic features},
  author  = {Bakas, Spyridon and others},
  journal = {Scientific Data},
  volume  = {4},
  pages   = {170117},
  year    = {2017}
}
@article{bakas2018brats,
  title   = {Identifying the Best Machine Learning Algorithms for Brain Tumor Segmentation, Progression Assessment, and Overall Survival Prediction in the BRATS Challenge},
  author  = {Bakas, Spyridon and others},
  journal = {arXiv preprint arXiv:1811.02629},
  year    = {2018}
}""",
    ),
    "msd": _MSD,
    "msd-hippocampus": DatasetInfo(
        name="Medical Segmentation Decathlon, Task04 Hippocampus (Vanderbilt University Medical Center)",
        url=_MSD.url,
        licence=_MSD.licence,
        hub_license=_MSD.hub_license,
        tag=_MSD.tag,
        bibtex=_MSD.bibtex,
    ),
}
"""Known data sets: key (``--dataset`` of ``medtuning push``) -> :class:`DatasetInfo`."""

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_SETTING_KEYS = ("training", "settings", "config", "args", "hyperparameters", "train_config", "run")
_SKIPPED_METRIC_KEYS = ("per_case", "history", "failed", "missing_predictions", "parameters", "data")
_PRIVATE_SETTING_WORDS = ("dir", "path", "token")  # local paths and secrets stay out of a public card
_MAX_METRIC_ROWS = 40


# -----------------------------------------------------------------------------------------------------
# Reading a saved model directory (headers and JSON only: no weights are loaded)
# -----------------------------------------------------------------------------------------------------


def _segmenter_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / SEGMENTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {SEGMENTER_CONFIG_NAME} in '{model_dir}'; pass the directory written by "
            "VolumetricSegmenter.save_pretrained (for a training run: its output_dir/model)."
        )
    return read_json_file(path, SEGMENTER_CONFIG_NAME)


def _count(path: Path, only: Callable[[str], bool] = lambda name: True) -> int:
    """Parameters in a safetensors file (or a sharded checkpoint's index), from the header only; ``only`` picks
    the tensors counted by name."""
    if path.name.endswith(".index.json"):
        index = read_json_file(path, path.name)
        shards = sorted(set(index.get("weight_map", {}).values()))
        return sum(_count(path.parent / shard, only) for shard in shards)
    total = 0
    for name, entry in safetensors_header(path).items():
        if name == "__metadata__" or name.endswith(_BUFFER_SUFFIXES) or not only(name):
            continue
        total += math.prod(int(d) for d in entry["shape"])
    return total


def _trained_backbone_copies(model_dir: Path) -> Callable[[str], bool]:
    """Whether a tensor of ``adapter_model.safetensors`` is peft's trained copy of a backbone module
    (``modules_to_save`` other than the decoder, e.g. the patch embedding), whose original is in ``backbone/``."""
    adapter_path = model_dir / ADAPTER_CONFIG_NAME
    adapter = read_json_file(adapter_path, ADAPTER_CONFIG_NAME) if adapter_path.is_file() else {}
    modules = [m for m in adapter.get("modules_to_save") or [] if m != "decoder"]
    return lambda name: ".backbone." in f".{name}" and any(f".{m}." in f".{name}" for m in modules)


def _frozen(method: str, adapter: Mapping[str, Any]) -> str:
    """How much of the backbone a method leaves frozen, for the card's first sentence."""
    if method == "full":
        return "fully trained"
    trained = [f"`{m}`" for m in adapter.get("modules_to_save") or [] if m != "decoder"]
    return f"frozen (but for {', '.join(trained)})" if trained else "frozen"


def count_parameters(model_dir: str | os.PathLike) -> tuple[int, int | None]:
    """Tuned and total parameters of a saved segmenter, read from the safetensors headers.

    Args:
        model_dir: a directory written by ``VolumetricSegmenter.save_pretrained``.

    Returns:
        ``(tuned, total)``; ``total`` is None when the base backbone is not in the directory (it is
        re-loaded by Hub id) and so cannot be counted without downloading it. BatchNorm statistics are not
        counted; a backbone module trained in full (the patch embedding of a multi-channel model) counts once,
        as in the training run's count.

    Raises:
        FileNotFoundError: when ``model_dir`` holds no ``segmenter_config.json``.
    """
    model_dir = Path(model_dir)
    config = _segmenter_config(model_dir)
    adapter = model_dir / "adapter_model.safetensors"
    weights = adapter if adapter.is_file() else model_dir / "model.safetensors"
    tuned = _count(weights) if weights.is_file() else 0
    if config.get("method") == "full":
        return tuned, tuned
    # A backbone module trained in full is stored twice: frozen in backbone/, trained with the adapters.
    copies = _count(weights, _trained_backbone_copies(model_dir)) if weights == adapter else 0
    backbone = model_dir / "backbone"
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (backbone / name).is_file():
            return tuned, tuned + _count(backbone / name) - copies
    return tuned, None


def find_metrics(model_dir: str | os.PathLike) -> Path | None:
    """The run's ``metrics.json``: in ``model_dir`` or its parent (a training run's ``output_dir``)."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / METRICS_NAME, model_dir.parent / METRICS_NAME):
        if candidate.is_file():
            return candidate
    return None


# -----------------------------------------------------------------------------------------------------
# Model card
# -----------------------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def _is_summary(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and "mean" in value
        and all(isinstance(v, int | float) for v in value.values())
    )


def _metric_rows(metrics: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    summary = metrics.get("summary") if depth == 0 else None
    if isinstance(summary, Mapping):  # evaluation.summarize output: the headline metrics, unprefixed
        metrics = {**summary, **{k: v for k, v in metrics.items() if k != "summary"}}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key in _SKIPPED_METRIC_KEYS or key in _SETTING_KEYS:
            continue
        if _is_summary(value):
            spread = f" ± {_number(value['std'])}" if "std" in value else ""
            rows.append((name, f"{_number(value['mean'])}{spread}"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append((name, _number(value)))
        elif isinstance(value, Mapping) and depth < 2:
            rows.extend(_metric_rows(value, f"{name}/", depth + 1))
    return rows


def _settings(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key in _SETTING_KEYS:
        value = (metrics or {}).get(key)
        if isinstance(value, Mapping):
            found.update(
                {
                    k: v
                    for k, v in value.items()
                    if not any(word in k.lower() for word in _PRIVATE_SETTING_WORDS)
                    and (not isinstance(v, Mapping | list) or len(v) < 10)
                }
            )
    return found


def _table(header: tuple[str, str], rows: list[tuple[str, Any]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def _is_repo_id(name: Any) -> bool:
    """Whether ``name`` is a Hub repository id ``org/name`` (by its form; nothing is looked up)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _base_model(config: Mapping[str, Any]) -> str | None:
    """The Hub id of the base backbone, when the saved model re-loads it from the Hub (``backbone_weights``
    ``"hub"``); None for a tiny, random or local-directory backbone, whose weights are in ``backbone/``."""
    backbone = config.get("backbone")
    return backbone if config.get("backbone_weights") == "hub" and _is_repo_id(backbone) else None


def _eval_results(metrics: Mapping[str, Any] | None, dataset_type: str, dataset_name: str) -> list[Any]:
    """The ``model-index`` entries of the card: the mean of every metric in ``metrics["summary"]``, nothing
    when there is no summary. The split is named only for a training run's metrics (its final validation,
    recorded with the run's ``history``); ``medtuning evaluate`` output may come from any split."""
    from huggingface_hub import EvalResult

    summary = (metrics or {}).get("summary")
    if not isinstance(summary, Mapping):
        return []
    split = "validation" if isinstance((metrics or {}).get("history"), Mapping) else None
    return [
        EvalResult(
            task_type="image-segmentation",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=str(name),
            metric_name=str(name),
            metric_value=value["mean"],
        )
        for name, value in summary.items()
        if _is_summary(value)
    ]


def build_model_card(
    model_dir: str | os.PathLike,
    metrics: Mapping[str, Any] | str | os.PathLike | None = None,
    dataset: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> str:
    """A Hub ``README.md`` for a saved segmenter: YAML metadata, then what, how well, how to use and cite.

    The metadata is written by ``huggingface_hub.ModelCardData``: ``library_name: peft`` (only for a peft adapter:
    ``med_adapter``, ``lora``; the ``full`` and ``decoder_only`` weights load with medtuning_peft alone, so no
    library is named), the method as a tag (``med-adapter``, ``lora``, ...), ``base_model`` (only
    for a backbone re-loaded by Hub id), ``license``, ``pipeline_tag``, ``tags``, ``datasets`` (for a known
    data set, or one named by Hub id) and, when the metrics hold a ``summary`` and the data set is known,
    a ``model-index`` with the mean of each summary metric (on the validation split, for a training run's
    metrics).

    Args:
        model_dir: a directory written by ``VolumetricSegmenter.save_pretrained``.
        metrics: the run's metrics (a dict or a path to a JSON file); default: the ``metrics.json`` found by
            :func:`find_metrics`, if any. Its ``summary`` (metric -> mean/std/median) heads the results;
            ``settings`` / ``run`` fill the training settings (paths left out); ``parameters.total`` is
            used when the backbone is not saved with the model.
        dataset: a key of :data:`DATASETS` (``"kits19"``, ``"brats"``, ``"msd"``, ``"msd-hippocampus"``) or
            the free-form name of another data set; default: ``settings.dataset`` of the metrics.
        license: the card's Hub ``license`` identifier; default: the data set's (models trained on
            non-commercial data stay non-commercial), else ``"other"``.
        repo_id: the Hub id used in the usage snippet; default: a placeholder.
        revision: the Hub branch the model is pushed to, named in the usage snippet; default: none (the
            main branch). A pull request's ``refs/pr/N`` is not named: once merged, the model is on the branch
            the pull request was opened against.

    Returns:
        The card's Markdown text.

    Raises:
        FileNotFoundError: when ``model_dir`` holds no ``segmenter_config.json`` or ``metrics`` names a
            missing file.
        io_utils.CorruptFileError: when a JSON or safetensors header is unreadable.
    """
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    config = _segmenter_config(model_dir)
    adapter_path = model_dir / ADAPTER_CONFIG_NAME
    adapter = read_json_file(adapter_path, ADAPTER_CONFIG_NAME) if adapter_path.is_file() else {}
    if metrics is None:
        found = find_metrics(model_dir)
        metrics = read_json_file(found, METRICS_NAME) if found is not None else None
    elif not isinstance(metrics, Mapping):
        metrics = read_json_file(metrics, METRICS_NAME)
    recorded = (metrics or {}).get("settings") if isinstance((metrics or {}).get("settings"), Mapping) else {}
    dataset = dataset or recorded.get("dataset")  # a training run records its data set
    info = DATASETS.get(str(dataset).lower()) if dataset else None
    tuned, total = count_parameters(model_dir)
    counted = (metrics or {}).get("parameters")
    if total is None and isinstance(counted, Mapping) and isinstance(counted.get("total"), int):
        total = counted["total"]  # counted by the training run, backbone included

    backbone = config.get("backbone") or "unknown"
    method = config.get("method", "unknown")
    label_names = list(config.get("label_names") or [])
    label_values = list(config.get("label_values") or range(len(label_names)))
    data_name = info.name if info else (dataset or "not recorded")
    card_license = license or (info.hub_license if info else "other")
    repo = repo_id or "<user>/<model>"

    # A peft adapter (med_adapter, lora) loads with peft; full / decoder_only save a model.safetensors that only
    # medtuning_peft loads: no library is named (nor tagged: the Hub reads a library's name from the tags too).
    library = "peft" if adapter_path.is_file() else None
    tags = ["medtuning_peft", *([library] if library else [])]
    tags += ["medical-imaging", "3d-segmentation", "image-segmentation"]
    tags += [method.replace("_", "-")] + ([info.tag] if info else [])  # med-adapter, lora, full, decoder-only
    tags = list(dict.fromkeys(tags))  # unique, in order
    dataset_id = info.tag if info else (dataset if _is_repo_id(dataset) else None)
    eval_results = _eval_results(metrics, dataset_id, data_name) if dataset_id else []
    meta = ModelCardData(
        library_name=library,
        base_model=_base_model(config),
        license=card_license,
        pipeline_tag="image-segmentation",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        model_name=(repo_id or repo).split("/")[-1] if eval_results else None,  # names the model-index
        eval_results=eval_results or None,
    )
    if revision is not None and revision.startswith("refs/pr/"):
        revision = None
    loading = f'"{repo}", revision="{revision}"' if revision else f'"{repo}"'

    out = [
        f"# {'Med-Adapter' if method == 'med_adapter' else method} segmenter: {backbone} on {data_name}",
        "",
        f"3D medical image segmentation with a {_frozen(method, adapter)} 2D backbone (`{backbone}`) tuned by "
        f"**{method}** "
        "([Med-Tuning](https://arxiv.org/abs/2304.10880), MIDL 2024) and a "
        f"`{config.get('decoder', '?')}` decoder, packaged with `medtuning_peft`. Saved as safetensors and "
        "JSON only. Research use; not a medical device.",
        "",
        "## Task and labels",
        "",
        f"Input: {config.get('in_channels', '?')} channel(s), volumes `(C, D, H, W)` seen through "
        f"`{config.get('crop_size')}` windows `(D, H, W)`. Output: one label per voxel.",
        "",
        _table(("value", "class"), list(zip(label_values, label_names))),
        "",
        "## Data set",
        "",
    ]
    if info:
        out += [f"[{info.name}]({info.url}). Data licence: {info.licence}.", ""]
    else:
        out += [f"{data_name}. Check the data licence before sharing derived models.", ""]

    out += ["## Results", ""]
    rows = _metric_rows(metrics) if metrics else []
    if rows:
        note = f" (first {_MAX_METRIC_ROWS} of {len(rows)})" if len(rows) > _MAX_METRIC_ROWS else ""
        names = " ".join(name.lower() for name, _ in rows)
        units = [u for key, u in (("dice", "Dice in [0, 1]"), ("hd95", "HD95 in mm")) if key in names]
        out += [
            f"From the run's `metrics.json`{note}{'; ' if units else ''}{', '.join(units)}.",
            "",
            _table(("metric", "value"), rows[:_MAX_METRIC_ROWS]),
            "",
        ]
    else:
        out += ["No metrics were recorded with this model.", ""]

    settings: list[tuple[str, Any]] = [
        ("method", method),
        ("backbone", f"{backbone} ({config.get('backbone_class', '?')})"),
        ("decoder", f"{config.get('decoder')} {json.dumps(config.get('decoder_kwargs') or {})}"),
        ("crop size (D, H, W)", config.get("crop_size")),
        ("slices per volume (num_slices)", config.get("num_slices")),
        ("preprocessing", json.dumps(config.get("preprocessing"))),
    ]
    adapter_keys = ("peft_type", "reduction_ratio", "kernel_sizes", "use_fft", "inter_stage", "init_identity")
    adapter_keys += ("r", "lora_alpha", "lora_dropout", "modules_to_save")
    settings += [(k, json.dumps(adapter[k])) for k in adapter_keys if adapter.get(k) is not None]
    settings += [(k, json.dumps(v)) for k, v in _settings(metrics).items()]
    out += ["## Training settings", "", _table(("setting", "value"), settings), ""]

    share = f" ({100.0 * tuned / total:.2f} %)" if total else ""
    trained_in_full = [m for m in adapter.get("modules_to_save") or [] if m != "decoder"]
    tuned_what = "adapters and decoder" if adapter else "decoder"
    if method == "full":
        tuned_what = "backbone and decoder"
    elif trained_in_full:
        tuned_what = f"adapters, decoder and {', '.join(f'`{m}`' for m in trained_in_full)}"
    total_text = f"{total:,}" if total else "not counted (the backbone is loaded from the Hub)"
    out += [
        "## Parameters",
        "",
        f"Tuned ({tuned_what}): {tuned:,}{share}. Total: {total_text}.",
        "",
        "## Usage",
        "",
        "```python",
        "import medtuning_peft",
        "",
        f'model = medtuning_peft.from_pretrained({loading})  # eval mode; device="cuda" to use a GPU',
        "logits = model(volumes)  # (B, C, D, H, W) -> (B, K, D, H, W)",
        "```",
        "",
        "Whole NIfTI volumes, with the saved preprocessing and sliding-window inference:",
        "",
        "```bash",
        f"medtuning predict --model {repo} --input scans/ --output predictions/"
        + (f" --revision {revision}" if revision else ""),
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        PAPER_BIBTEX,
    ]
    if info:
        out.append(info.bibtex)
    out += [
        "```",
        "",
        "## Licence",
        "",
        f"Model card licence: `{card_license}`. Training data: {data_name}"
        + (f", {info.licence}." if info else "."),
        "",
    ]
    body = "\n".join(out)
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{body}"))


# -----------------------------------------------------------------------------------------------------
# Upload
# -----------------------------------------------------------------------------------------------------


def files_to_upload(model_dir: str | os.PathLike) -> list[str]:
    """The files :func:`push_to_hub` uploads from ``model_dir``: relative POSIX paths, sorted.

    Those of the saved segmenter in ``model_dir`` that match :data:`UPLOAD_PATTERNS` (``huggingface_hub``'s
    filter, as ``allow_patterns`` / ``ignore_patterns`` of an upload), plus ``README.md``, the generated
    model card (a ``README.md`` in ``model_dir`` is not uploaded). Anything else in the folder stays local.
    """
    from huggingface_hub.utils import filter_repo_objects

    model_dir = Path(model_dir)
    names = [p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()]
    selected = filter_repo_objects(names, allow_patterns=UPLOAD_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    return sorted([*selected, CARD_NAME])


def _check_files(model_dir: Path) -> None:
    for name in files_to_upload(model_dir):
        path = model_dir / name
        if name == CARD_NAME:  # generated, not read from the folder
            continue
        if name.endswith(".safetensors"):
            check_safetensors(path)
        elif name.endswith(".json"):
            read_json_file(path, name)
    leftovers = [p.name for p in model_dir.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    if leftovers:  # not uploaded, but a sign that a write into this directory was interrupted
        raise ValueError(
            f"'{model_dir}' holds partial files {leftovers} of an interrupted write; re-save the model "
            "(or delete them with medtuning_peft.io_utils.remove_partials) before pushing."
        )


def _check_repo_id(repo_id: Any) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if (
        not isinstance(repo_id, str)
        or repo_id.count("/") != 1
        or repo_id.startswith("/")
        or repo_id.endswith("/")
    ):
        raise ValueError(f"repo_id={repo_id!r}; pass the Hub repository as 'org/name'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id={repo_id!r} is not a valid Hub id ({error}); pass 'org/name'.") from error


def check_push(model_dir: str | os.PathLike, repo_id: str) -> None:
    """Every check :func:`push_to_hub` runs before it touches the network (``medtuning push --dry-run``).

    The repository id; ``segmenter_config.json`` and ``adapter_config.json`` (the schema
    :func:`medtuning_peft.volumetric.check_saved_model` checks on load); every file to upload complete
    (safetensors headers and sizes, JSON); no partial files of an interrupted write. No weights are read.

    Args:
        model_dir: a directory written by ``VolumetricSegmenter.save_pretrained``.
        repo_id: ``"org/name"`` on the Hub.

    Raises:
        FileNotFoundError: when ``model_dir`` holds no saved segmenter or misses a weights file.
        io_utils.CorruptFileError: when a file to upload is truncated or corrupt.
        ValueError: when ``repo_id`` is not ``"org/name"``, a config file is invalid (naming file and field),
            or the directory holds partial files.
    """
    from .volumetric import check_saved_model

    _check_repo_id(repo_id)
    model_dir = Path(model_dir)
    _segmenter_config(model_dir)
    _check_files(model_dir)  # the files to upload
    check_saved_model(model_dir, check_files=False)  # the configs, as from_pretrained will read them


def validate_card(card: str) -> None:
    """Have the Hub that ``push_to_hub`` pushes to (``HF_ENDPOINT``) check a model card's metadata.

    The request of huggingface_hub's ``RepoCard.validate``, sent to the configured endpoint: before
    huggingface_hub 2.2 that method sent the card to huggingface.co whatever ``HF_ENDPOINT`` said, which on a
    private Hub or mirror fails on an isolated network or hands the card (training settings, metrics) to the
    public Hub. An endpoint without the check (404) is warned about and the card is pushed unchecked.

    Args:
        card: the card's Markdown text with its YAML metadata.

    Raises:
        ValueError: when the Hub rejects the metadata (its message, e.g. an unknown licence id).
        huggingface_hub.errors.HfHubHTTPError: when the request fails otherwise.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import get_session, hf_raise_for_status

    url = f"{constants.ENDPOINT}/api/validate-yaml"
    body = {"repoType": "model", "content": card}
    response = get_session().post(url, json=body, headers={"Accept": "text/plain"})
    if response.status_code == 404:
        logger.warning(
            "%s has no card check (404 at %s); the model card is pushed unchecked.", constants.ENDPOINT, url
        )
        return
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as error:
        if response.status_code == 400:
            raise ValueError(
                f"The Hub at {constants.ENDPOINT} rejected the model card: {response.text}"
            ) from error
        raise


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload Med-Adapter segmenter (medtuning_peft)",
    dataset: str | None = None,
    metrics: Mapping[str, Any] | str | os.PathLike | None = None,
    license: str | None = None,
    revision: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload a saved segmenter with a generated model card, in one commit.

    Has the Hub check the card's metadata, creates the repository and the ``revision`` branch if needed,
    then commits the files of :func:`files_to_upload` with the card of :func:`build_model_card` as
    ``README.md``. The card is uploaded from memory: ``model_dir`` is only read, so a push that fails half
    way leaves it as it was. Files of an earlier push that this one does not replace stay in the repository.

    Args:
        model_dir: a directory written by ``VolumetricSegmenter.save_pretrained``.
        repo_id: ``"org/name"`` on the Hub.
        token: a Hub token with write access; default: the logged-in user's.
        private: create the repository as private (True) or public (False); default: the Hub's default for
            the user or organization. An existing repository keeps its visibility.
        commit_message: the commit message.
        dataset: see :func:`build_model_card`.
        metrics: see :func:`build_model_card`.
        license: see :func:`build_model_card`.
        revision: the branch to push to, created from the main branch if it does not exist (or a
            ``refs/pr/N`` reference of an open pull request); default: the main branch.
        commit_description: the commit's description (the pull request's, with ``create_pr``).
        create_pr: open a pull request (against ``revision``) instead of committing to it.

    Returns:
        The ``huggingface_hub`` ``CommitInfo`` of the upload.

    Raises:
        FileNotFoundError: when ``model_dir`` holds no saved segmenter.
        io_utils.CorruptFileError: when a file to upload is truncated or corrupt (nothing is uploaded).
        ValueError: when ``repo_id`` is not ``"org/name"``, a config file is invalid or the directory holds
            partial files (:func:`check_push`), or the Hub rejects the card's metadata (e.g. an unknown
            ``license``); nothing is created or uploaded.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    model_dir = Path(model_dir)
    check_push(model_dir, repo_id)
    card = build_model_card(
        model_dir,
        metrics=metrics,
        dataset=dataset,
        license=license,
        repo_id=repo_id,
        revision=revision,
    )
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name))
        for name in files_to_upload(model_dir)
        if name != CARD_NAME
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))
    # The Hub's metadata check (license id, model-index, ...) before anything is created on the Hub.
    validate_card(card)
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not revision.startswith("refs/pr/"):
        # A commit goes to an existing branch only (404 otherwise); a PR ref exists already.
        api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )
