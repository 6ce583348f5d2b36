"""Volumetric segmentation with a 2D transformers backbone: (B, C, D, H, W) in, (B, K, D, H, W) out.

The slices of each volume go through the backbone as one batch ``(B*D, C, H, W)``, volume-major (all D
slices of volume 0, then volume 1, ...), so that Med-Adapters inside the backbone can fold them back into
volumes. Multi-scale feature maps of the slices feed a 2D decoder (:mod:`medtuning_peft.decoders`).

What each architecture needs (how to get four feature maps, their widths, where the patch embedding is,
which linear layers are the attention projections) is data in :data:`FEATURE_SPECS`, keyed by
``config.model_type``.

Typical use::

    model = build_segmenter("microsoft/swin-tiny-patch4-window7-224", in_channels=4, num_classes=4,
                            decoder="upernet", method="med_adapter", num_slices=128)
    logits = model(volumes)                      # (B, 4, D, H, W)
    model.save_pretrained("out/")
    model = from_pretrained("out/")              # or a Hub id; eval mode
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from huggingface_hub import hf_hub_download, is_offline_mode, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .backbones import BACKBONE_SPECS
from .decoders import DECODERS, build_decoder, decoder_key
from .hub import CARD_NAME, UPLOAD_PATTERNS
from .io_utils import (
    CorruptFileError,
    atomic_directory,
    check_safetensors,
    read_json_file,
    safetensors_header,
)
from .tuners.med_adapter import MedAdapterConfig
from .tuners.med_adapter.layer import concurrent_forward_error

__all__ = [
    "ADAPTER_METHODS",
    "FEATURE_SPECS",
    "METHODS",
    "TINY_BACKBONES",
    "FeatureSpec",
    "VolumetricSegmenter",
    "adapt_input_channels",
    "backbone_signature",
    "build_segmenter",
    "check_saved_model",
    "check_segmenter_config",
    "extract_features",
    "feature_channels",
    "feature_spec",
    "from_pretrained",
    "load_backbone",
    "min_slice_size",
    "patch_size",
    "plain_taps",
    "slices_to_volume",
    "trains_patch_embedding",
    "volume_to_slices",
]

SEGMENTER_CONFIG_NAME = "segmenter_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "model.safetensors"
BACKBONE_SUBFOLDER = "backbone"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Layout converters
# ---------------------------------------------------------------------------------------------------------


def volume_to_slices(volumes: torch.Tensor) -> torch.Tensor:
    """Volumes to a volume-major slice batch.

    Args:
        volumes: ``(B, C, D, H, W)``.

    Returns:
        ``(B*D, C, H, W)``: slice d of volume b at row ``b*D + d``.

    Raises:
        ValueError: when ``volumes`` is not 5-D.
    """
    if volumes.ndim != 5:
        raise ValueError(
            f"Expected volumes of shape (B, C, D, H, W), got shape {tuple(volumes.shape)}; add the missing "
            f"batch / channel axis, e.g. x[None] or x[:, None]."
        )
    B, C, D, H, W = volumes.shape
    volumes = volumes.permute(0, 2, 1, 3, 4)  # (B, C, D, H, W) -> (B, D, C, H, W)
    return volumes.reshape(B * D, C, H, W)  # (B, D, C, H, W) -> (B*D, C, H, W)


def slices_to_volume(slices: torch.Tensor, num_volumes: int) -> torch.Tensor:
    """Inverse of :func:`volume_to_slices`.

    Args:
        slices: ``(B*D, K, H, W)``, volume-major.
        num_volumes: B.

    Returns:
        ``(B, K, D, H, W)``.

    Raises:
        ValueError: when the slice count is not a multiple of ``num_volumes``.
    """
    BD, K, H, W = slices.shape
    if num_volumes < 1 or BD % num_volumes:
        raise ValueError(f"Cannot split {BD} slices into num_volumes={num_volumes} volumes of equal depth.")
    D = BD // num_volumes
    volumes = slices.reshape(num_volumes, D, K, H, W)  # (B*D, K, H, W) -> (B, D, K, H, W)
    return volumes.permute(0, 2, 1, 3, 4)  # (B, D, K, H, W) -> (B, K, D, H, W)


# ---------------------------------------------------------------------------------------------------------
# Per-architecture feature extraction
# ---------------------------------------------------------------------------------------------------------


def _swin_features(model: nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
    if getattr(model, "out_features", None) is not None:
        # SwinBackbone: per-stage maps with its stage norms, each (B*D, C_i, h_i, w_i).
        return list(model(pixel_values=pixel_values, **kwargs).feature_maps)
    # SwinModel. always_partition=True pads to whole windows instead of shrinking the window on grids smaller
    # than it (transformers 5 shrinks the window but not the relative position bias, and fails); this is
    # what SwinBackbone does. Before-downsampling maps give strides 4, 8, 16, 32.
    out = model(
        pixel_values=pixel_values,
        output_hidden_states=True,
        output_hidden_states_before_downsampling=True,
        always_partition=True,
        **kwargs,
    )
    return list(out.reshaped_hidden_states[1:])  # drop the stem; each (B*D, C_i, h_i, w_i)


def _segformer_features(model: nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
    maps = list(model(pixel_values=pixel_values, output_hidden_states=True, **kwargs).hidden_states)
    last = maps[-1]
    if last.ndim == 3:  # reshape_last_stage=False: tokens (B*D, h*w, C); overlap patch embedding of stride 2
        h, w = -(-maps[-2].shape[-2] // 2), -(-maps[-2].shape[-1] // 2)
        last = last.transpose(1, 2)  # (B*D, h*w, C) -> (B*D, C, h*w)
        maps[-1] = last.reshape(last.shape[0], last.shape[1], h, w)  # (B*D, C, h*w) -> (B*D, C, h, w)
    return maps


def plain_taps(num_blocks: int, num_levels: int = 4) -> list[int]:
    """Blocks tapped on a plain backbone: every ``num_blocks / num_levels``-th, ending at the last block.

    12 blocks give 2, 5, 8, 11 (as in ViT-UperNet); fewer blocks give ``(i + 1) * num_blocks // num_levels - 1``
    clamped at 0, so a short backbone repeats blocks (4 give 0, 1, 2, 3; 6 give 0, 2, 3, 5; 2 give 0, 0, 0, 1).
    """
    return [max((i + 1) * num_blocks // num_levels - 1, 0) for i in range(num_levels)]


_TAP_ACTIVE, _TAP_OUTPUT = "_medtuning_tap_active", "_medtuning_tap_output"


def _record_tap(module: nn.Module, args: Any, output: Any) -> None:
    # Forward hook of a tapped block: keeps its output on the module itself while a feature pass is running.
    if getattr(module, _TAP_ACTIVE, False):
        setattr(module, _TAP_OUTPUT, output[0] if isinstance(output, tuple) else output)


_TAP_LOCK = threading.Lock()


def _start_taps(model: nn.Module, tapped: list[nn.Module]) -> None:
    """Make the tapped blocks record their outputs for one pass (hooks installed at the first pass).

    Raises:
        RuntimeError: when a pass of another thread is recording through them (checked before any change: its
            outputs and flags are left alone).
    """
    # Traced by torch.compile, which cannot trace a lock; a compiled pass applies its changes when it ends.
    with contextlib.nullcontext() if torch.compiler.is_compiling() else _TAP_LOCK:
        if any(getattr(block, _TAP_ACTIVE, False) for block in tapped):
            raise concurrent_forward_error(type(model).__name__)
        for block in tapped:
            if _record_tap not in block._forward_hooks.values():
                block.register_forward_hook(_record_tap)
            setattr(block, _TAP_ACTIVE, True)


def _plain_features(
    model: nn.Module, pixel_values: torch.Tensor, *, block_list: str, **kwargs: Any
) -> list[torch.Tensor]:
    # Record block outputs with hooks on the module at each block's path: when a tuner wraps a block, the
    # wrapper sits there, so the recorded tokens include its adapter (output_hidden_states would not). The
    # hook stays on the module (installed at the first pass through it, e.g. after a tuner wrapped the block)
    # and records only while this pass runs, so torch.compile traces the pass as one graph: registering and
    # removing hooks at every call broke the graph twice. A module-level hook writing to its own module keeps
    # copies of the model (deepcopy, peft's modules_to_save) independent.
    blocks = model.get_submodule(block_list)
    levels = plain_taps(len(blocks))  # one block per pyramid level; a short backbone repeats blocks
    taps = sorted(set(levels))
    tapped = [blocks[i] for i in taps]
    _start_taps(model, tapped)
    try:
        model(pixel_values=pixel_values, **kwargs)
        captured = {i: getattr(block, _TAP_OUTPUT) for i, block in zip(taps, tapped)}
    finally:
        for block in tapped:  # no output kept alive between passes, no recording outside them
            setattr(block, _TAP_ACTIVE, False)
            block.__dict__.pop(_TAP_OUTPUT, None)
    patch = model.config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    h, w = pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw
    maps = []
    for i in levels:
        tokens = captured[i]  # (B*D, N, C), N = prefix (CLS, registers) + h*w
        grid = tokens[:, tokens.shape[1] - h * w :]  # (B*D, N, C) -> (B*D, h*w, C)
        grid = grid.transpose(1, 2)  # (B*D, h*w, C) -> (B*D, C, h*w)
        maps.append(grid.reshape(grid.shape[0], grid.shape[1], h, w))  # (B*D, C, h*w) -> (B*D, C, h, w)
    return maps


def _swin_channels(model: nn.Module) -> list[int]:
    if getattr(model, "out_features", None) is not None:  # SwinBackbone
        return list(model.channels)
    return [model.config.embed_dim * 2**i for i in range(len(model.config.depths))]


@dataclass(frozen=True)
class FeatureSpec:
    """How to get multi-scale feature maps from one transformers architecture.

    Attributes:
        model_class: transformers class loaded for a Hub id or local directory of this ``model_type``.
        extract: ``(model, pixel_values (B*D, C, H, W), **kwargs) -> [(B*D, C_i, h_i, w_i)]``, finest first.
        channels: ``model -> [C_i]``, the widths of the maps ``extract`` returns.
        patch_embedding: name (suffix) of the first patch embedding module, which holds the input Conv2d.
        simple_pyramid: True for plain backbones (one resolution): the decoder builds a pyramid.
        attention_projections: names of the attention input projections (LoRA targets). Both spellings
            transformers 5 uses are listed: some models (DINOv2 with registers before 5.24) still call them
            ``query`` / ``key`` / ``value``.
        min_side: ``config -> pixels``, the shortest slice side the backbone embeds when it is longer than
            one patch (SegFormer's reduction convolutions); None: one patch.
    """

    model_class: str
    extract: Callable[..., list[torch.Tensor]]
    channels: Callable[[nn.Module], list[int]]
    patch_embedding: str
    simple_pyramid: bool
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "query", "key", "value")
    min_side: Callable[[PretrainedConfig], int] | None = None


def _plain_feature_spec(model_type: str, model_class: str, **forward_kwargs: Any) -> FeatureSpec:
    """A plain (one-resolution) backbone: four tapped blocks of width ``hidden_size``, a simple pyramid.

    The blocks are found where the tuner finds them (:data:`~medtuning_peft.backbones.BACKBONE_SPECS`).
    """
    return FeatureSpec(
        model_class,
        partial(_plain_features, block_list=BACKBONE_SPECS[model_type].block_list, **forward_kwargs),
        lambda model: [model.config.hidden_size] * 4,
        "embeddings.patch_embeddings",
        True,
    )


def _segformer_min_side(config: PretrainedConfig) -> int:
    """Shortest slice side SegFormer embeds: every stage's grid must hold its sequence-reduction kernel.

    Stage i embeds the previous grid g with a convolution of kernel k_i, stride s_i and padding k_i // 2
    (g -> (g + 2 * (k_i // 2) - k_i) // s_i + 1), then attends over keys reduced by an sr_i x sr_i convolution
    without padding, which needs a grid of at least sr_i (mit-b0 .. b5: 29 pixels).
    """
    stages = list(zip(config.patch_sizes, config.strides, config.sr_ratios))
    side = 1
    while True:
        grid = side
        for kernel, stride, ratio in stages:
            grid = (grid + 2 * (kernel // 2) - kernel) // stride + 1
            if grid < ratio:
                break
        else:
            return side
        side += 1


FEATURE_SPECS: dict[str, FeatureSpec] = {
    "swin": FeatureSpec("SwinModel", _swin_features, _swin_channels, "embeddings.patch_embeddings", False),
    "segformer": FeatureSpec(
        "SegformerModel",
        _segformer_features,
        lambda model: list(model.config.hidden_sizes),
        "stages.0.patch_embeddings",
        False,
        min_side=_segformer_min_side,
    ),
    "vit": _plain_feature_spec("vit", "ViTModel", interpolate_pos_encoding=True),
    "dinov2": _plain_feature_spec("dinov2", "Dinov2Model"),
    "dinov2_with_registers": _plain_feature_spec("dinov2_with_registers", "Dinov2WithRegistersModel"),
}


def _unknown(kind: str, value: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(known), n=2)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown {kind} {value!r}; known: {sorted(known)}.{hint}"


def feature_spec(backbone: nn.Module) -> FeatureSpec:
    """The :class:`FeatureSpec` of a transformers backbone, from ``backbone.config.model_type``.

    Raises:
        ValueError: when the backbone has no ``config`` or its ``model_type`` is not supported.
    """
    config = getattr(backbone, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"Expected a transformers vision backbone with a `config`, got {type(backbone).__name__}; pass a "
            f"model of one of the types {sorted(FEATURE_SPECS)}."
        )
    if model_type not in FEATURE_SPECS:
        raise ValueError(_unknown("backbone model_type", model_type, FEATURE_SPECS))
    return FEATURE_SPECS[model_type]


def extract_features(backbone: nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
    """Multi-scale feature maps of a slice batch.

    Args:
        backbone: a supported transformers backbone (possibly carrying tuner layers).
        pixel_values: ``(B*D, C, H, W)``.
        **kwargs: passed to the backbone's forward, e.g. ``num_slices=D`` for Med-Adapters.

    Returns:
        Maps ``[(B*D, C_i, h_i, w_i)]``, finest first: four stages of a hierarchical backbone, or four
        tapped blocks (same resolution, prefix tokens dropped) of a plain one.
    """
    return feature_spec(backbone).extract(backbone, pixel_values, **kwargs)


def patch_size(backbone: nn.Module) -> tuple[int, int]:
    """``(ph, pw)``: the pixels of one token of the backbone's first grid; smaller slices hold no whole patch.

    The patch size of ViT, DINOv2 and Swin; the first stride of SegFormer's overlapping patch embeddings.
    """
    config = backbone.config
    size = getattr(config, "patch_size", None)
    if size is None:
        size = config.strides[0]
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def min_slice_size(backbone: nn.Module) -> tuple[int, int]:
    """``(H, W)``: the smallest slice the backbone embeds, at least :func:`patch_size`.

    One patch for ViT, DINOv2 and Swin; more for SegFormer, whose sequence-reduction convolutions need
    stage grids at least as large as their kernels (29 x 29 pixels for mit-b0 .. b5).
    """
    ph, pw = patch_size(backbone)
    min_side = feature_spec(backbone).min_side
    side = min_side(backbone.config) if min_side is not None else 0
    return max(ph, side), max(pw, side)


def feature_channels(backbone: nn.Module) -> list[int]:
    """Widths ``[C_i]`` of the maps :func:`extract_features` returns for ``backbone``."""
    return feature_spec(backbone).channels(backbone)


# ---------------------------------------------------------------------------------------------------------
# Input channels
# ---------------------------------------------------------------------------------------------------------


def _patch_embeddings(model: nn.Module, suffix: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]


def adapt_input_channels(model: PreTrainedModel, in_channels: int) -> PreTrainedModel:
    """Give a 3-channel backbone's patch embedding ``in_channels`` inputs, keeping the pretrained filters.

    Each filter is averaged over RGB, repeated ``in_channels`` times and scaled by ``3 / in_channels``, so a
    constant image gives the same embedding as with the original 3-channel filters. ``num_channels`` is
    updated on the patch embedding module(s) that have it and on ``model.config``. Done in place.

    Every channel gets the same filters, so while the patch embedding stays frozen the backbone sees only the
    sum of the channels. For channels that carry different information (BraTS' four MRI sequences), train
    the patch embedding with the adapters: :func:`build_segmenter` does for ``in_channels > 1``
    (``train_patch_embedding``); with ``get_peft_model`` add ``FEATURE_SPECS[model_type].patch_embedding`` to
    ``modules_to_save``.

    Args:
        model: a supported transformers backbone (Swin, ViT, DINOv2, SegFormer: first stage).
        in_channels: input channels C (1 for CT, 4 for BraTS MRI).

    Returns:
        ``model``. Unchanged when its patch embedding already takes ``in_channels``.

    Raises:
        ValueError: for ``in_channels < 1``, when no patch embedding is found, or when it takes neither 3 nor
            ``in_channels`` channels.
        TypeError: when the patch projection is not a plain ``nn.Conv2d`` (e.g. already wrapped by a tuner).
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int (1 for CT, 4 for BraTS), got {in_channels!r}.")
    spec = feature_spec(model)
    found = _patch_embeddings(model, spec.patch_embedding)
    if not found:
        raise ValueError(
            f"No patch embedding named '{spec.patch_embedding}' in {type(model).__name__}; adapt the input "
            f"channels of the bare transformers backbone before wrapping it."
        )
    for name, embedding in found:
        convs = [(n, m) for n, m in embedding.named_children() if isinstance(m, nn.Conv2d)]
        if len(convs) != 1:
            raise TypeError(
                f"Expected one nn.Conv2d in the patch embedding '{name}', got "
                f"{[type(m).__name__ for m in embedding.children()]}; adapt input channels before applying a "
                f"PEFT method."
            )
        conv_name, conv = convs[0]
        if conv.in_channels != in_channels:
            if conv.in_channels != 3:
                raise ValueError(
                    f"Patch embedding '{name}' takes {conv.in_channels} channels; only a 3-channel (RGB) "
                    f"embedding can be adapted, not to in_channels={in_channels}. Start from the 3-channel "
                    f"pretrained backbone."
                )
            new = nn.Conv2d(
                in_channels,
                conv.out_channels,
                kernel_size=conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
                device=conv.weight.device,
                dtype=conv.weight.dtype,
            )
            with torch.no_grad():
                mean = conv.weight.mean(dim=1, keepdim=True)  # (E, 3, k, k) -> (E, 1, k, k)
                new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3.0 / in_channels))  # -> (E, C, k, k)
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            new.requires_grad_(conv.weight.requires_grad)
            setattr(embedding, conv_name, new)
        for module in embedding.modules():
            if hasattr(module, "num_channels"):
                module.num_channels = in_channels
    model.config.num_channels = in_channels
    return model


# ---------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------

_STAGES = ["stage1", "stage2", "stage3", "stage4"]

TINY_BACKBONES: dict[str, tuple[str, Callable[[], PretrainedConfig]]] = {
    "tiny-swin": (
        "SwinModel",
        lambda: transformers.SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=24,
            depths=[2, 2, 2, 2],
            num_heads=[1, 2, 2, 4],
            window_size=4,
        ),
    ),
    "tiny-swin-backbone": (
        "SwinBackbone",
        lambda: transformers.SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=24,
            depths=[2, 2, 2, 2],
            num_heads=[1, 2, 2, 4],
            window_size=4,
            out_features=_STAGES,
        ),
    ),
    "tiny-vit": (
        "ViTModel",
        lambda: transformers.ViTConfig(
            image_size=64,
            patch_size=8,
            hidden_size=48,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=96,
        ),
    ),
    "tiny-dinov2": (
        "Dinov2Model",
        lambda: transformers.Dinov2Config(
            image_size=64,
            patch_size=8,
            hidden_size=48,
            num_hidden_layers=4,
            num_attention_heads=2,
            mlp_ratio=2,
        ),
    ),
    "tiny-dinov2-registers": (
        "Dinov2WithRegistersModel",
        lambda: transformers.Dinov2WithRegistersConfig(
            image_size=64,
            patch_size=8,
            hidden_size=48,
            num_hidden_layers=4,
            num_attention_heads=2,
            mlp_ratio=2,
            num_register_tokens=2,
        ),
    ),
    "tiny-segformer": (
        "SegformerModel",
        lambda: transformers.SegformerConfig(
            hidden_sizes=[12, 24, 48, 96],
            depths=[1, 1, 1, 1],
            num_attention_heads=[1, 2, 2, 4],
            decoder_hidden_size=48,
        ),
    ),
}
"""Named tiny configurations (3-channel, random init) for tests and offline use: name -> (class, config)."""


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` can only be a local path: a Hub id is ``name`` or ``org/name``."""
    return (
        Path(text).expanduser().is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or os.sep != "/"
        and os.sep in text
    )


def _hub_miss(text: str, error: Exception) -> str:
    """Why ``text``, neither a local directory nor loadable by Hub id, could not be found."""
    if is_offline_mode() or isinstance(error, LocalEntryNotFoundError):
        why = "it is not in the local Hugging Face cache (offline: HF_HUB_OFFLINE is set or the Hub is unreachable)"
    elif isinstance(error, RevisionNotFoundError):
        why = f"the Hub repository has no such revision ({error})"
    elif isinstance(error, RepositoryNotFoundError):
        why = "no such repository exists on the Hub (or it is private: log in with `hf auth login`)"
    else:
        why = f"it could not be loaded ({type(error).__name__}: {error})"
    return (
        f"{text!r} is not a local directory (no such directory under '{Path.cwd()}'), and as a Hub id {why}."
    )


def _check_source(source: str) -> None:
    """Refuse, before any download, a tiny name or local path that names nothing."""
    if Path(source).expanduser().is_dir():
        return
    if source.startswith("tiny") and "/" not in source:
        raise ValueError(_unknown("tiny backbone name", source, TINY_BACKBONES))
    if _looks_like_path(source) or Path(source).expanduser().exists():
        raise FileNotFoundError(
            f"backbone {source!r} is not a local directory (no such directory) and not a Hub id "
            f"('org/name'); pass a directory holding a transformers config.json, a Hub id or one of "
            f"{sorted(TINY_BACKBONES)}."
        )


def _model_class(name: str) -> type[PreTrainedModel]:
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(f"backbone_class {name!r} is not a transformers model class (e.g. 'SwinModel').")
    return cls


def load_backbone(
    source: str,
    revision: str | None = None,
    with_weights: bool = True,
    backbone_class: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Load a transformers backbone by tiny name, local directory or Hub id (safetensors only).

    Args:
        source: a key of :data:`TINY_BACKBONES` (random init), a local directory, or a Hub id.
        revision: Hub revision (branch, tag or commit).
        with_weights: False builds the architecture from the config only (random init), e.g. when the
            weights come from elsewhere.
        backbone_class: transformers class to load, e.g. ``"SwinBackbone"``; default: the
            :data:`FEATURE_SPECS` class of the checkpoint's ``model_type``.
        config_overrides: config attributes to set when loading, e.g. ``{"out_features": [...]}``.

    The weights are loaded in torch's default dtype (float32), that of the decoder and adapters built around
    them, whatever dtype the checkpoint stores (transformers would keep a float16 / bfloat16 checkpoint's);
    use ``torch.autocast`` for mixed precision.

    Returns:
        ``(model, info)``; ``info`` holds ``backbone``, ``backbone_class``, ``backbone_revision``,
        ``backbone_config_overrides`` and ``backbone_reloadable`` (True only for a Hub id: the weights need
        not be saved with an adapter).

    Raises:
        ValueError: for an unsupported ``model_type``, a ``backbone_class`` of another architecture, or an
            unknown ``tiny-*`` name.
        FileNotFoundError: when ``source`` is a path that is not a directory, or is neither a local
            directory nor a Hub id that can be loaded (e.g. offline and not in the cache).
    """
    if source in TINY_BACKBONES:
        class_name, make_config = TINY_BACKBONES[source]
        model = _model_class(class_name)(make_config())
        info = {"backbone": source, "backbone_class": class_name, "backbone_revision": None}
        return model, {**info, "backbone_config_overrides": None, "backbone_reloadable": False}
    _check_source(source)
    overrides = dict(config_overrides or {})
    try:
        config = transformers.AutoConfig.from_pretrained(source, revision=revision, **overrides)
    except OSError as error:
        if Path(source).expanduser().is_dir():
            raise
        raise FileNotFoundError(f"backbone {_hub_miss(source, error)}") from error
    if config.model_type not in FEATURE_SPECS:
        raise ValueError(_unknown(f"backbone model_type of {source!r}:", config.model_type, FEATURE_SPECS))
    class_name = backbone_class or FEATURE_SPECS[config.model_type].model_class
    cls = _model_class(class_name)
    if cls.config_class.model_type != config.model_type:
        raise ValueError(
            f"backbone_class={class_name!r} is a {cls.config_class.model_type!r} model but {source!r} holds a "
            f"{config.model_type!r} checkpoint; leave backbone_class unset or pick a {config.model_type} class."
        )
    local = Path(source).is_dir()
    if not local:
        # Pin the commit the config came from (a branch such as "main" moves): the weights are read from it,
        # and a saved model records it. The config is in the cache already, so this reads no more than the ref
        # online and nothing offline.
        revision = _hub_commit(source, revision)
    if with_weights:
        model = cls.from_pretrained(
            source, config=config, revision=revision, use_safetensors=True, dtype=torch.get_default_dtype()
        )
    else:
        model = cls(config)
    info = {
        "backbone": source,
        "backbone_class": class_name,
        "backbone_revision": None if local else revision,
        "backbone_config_overrides": overrides or None,
        "backbone_reloadable": not local,
    }
    return model, info


def _hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit that ``revision`` (default: the main branch) of Hub model ``repo_id`` is at.

    Read from huggingface_hub's cache, whose snapshot folders are named by commit (transformers 5.25 no longer
    keeps it in ``config._commit_hash``): offline, where the cached ref points; online, where the Hub's does
    (the config is downloaded once if it is not cached).

    Raises:
        OSError: when the repository or revision cannot be found (offline: not in the cache).
        ValueError: when ``repo_id`` is not a valid Hub id.
    """
    return Path(hf_hub_download(repo_id, transformers.CONFIG_NAME, revision=revision)).parent.name


def _object_info(model: PreTrainedModel) -> dict[str, Any]:
    """What a segmenter records about a backbone given as an object.

    It is re-loaded by Hub id (its weights are not saved) when its ``name_or_path`` is a Hub id whose commit is
    found (:func:`_hub_commit`, or ``config._commit_hash`` before transformers 5.25); otherwise, e.g. offline
    with a model loaded from another cache folder, its weights are saved with the segmenter.
    """
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or ""
    reloadable = (
        bool(name) and name not in TINY_BACKBONES and not _looks_like_path(name) and not Path(name).exists()
    )
    revision = getattr(model.config, "_commit_hash", None) if reloadable else None
    if reloadable and revision is None:
        try:
            revision = _hub_commit(name)
        except (OSError, ValueError):  # unresolved: "main" may hold other weights when the model is loaded
            reloadable = False
    out_features = getattr(model, "out_features", None)  # a transformers *Backbone keeps its stages
    return {
        "backbone": name or None,
        "backbone_class": type(model).__name__,
        "backbone_revision": revision,
        "backbone_config_overrides": {"out_features": list(out_features)} if out_features else None,
        "backbone_reloadable": reloadable,
    }


def backbone_signature(config: PretrainedConfig, in_channels: int | None = None) -> dict[str, Any]:
    """What adapters and decoder depend on in a backbone: architecture, widths, depth, input channels.

    Saved in ``segmenter_config.json`` and compared by :func:`from_pretrained` before any weights load.
    (A bare ``peft.PeftModel.from_pretrained`` onto another backbone only fails on a width change, with
    a size-mismatch error; other depths or input channels load with a warning or silently.)

    Args:
        config: the backbone's transformers config.
        in_channels: input channels the segmenter adapts a 3-channel patch embedding to.

    Returns:
        ``{"model_type", "hidden_sizes" (per stage), "depths" (blocks per stage), "num_channels"}``.
    """
    depths = getattr(config, "depths", None) or [getattr(config, "num_hidden_layers", 0)]
    widths = getattr(config, "hidden_sizes", None)
    if widths is None and getattr(config, "embed_dim", None) is not None:
        widths = [config.embed_dim * 2**i for i in range(len(depths))]  # Swin doubles C per stage
    if widths is None:
        widths = [getattr(config, "hidden_size", 0)]
    channels = int(getattr(config, "num_channels", 3))
    if in_channels is not None and channels == 3:
        channels = in_channels  # what adapt_input_channels makes of an RGB embedding
    return {
        "model_type": config.model_type,
        "hidden_sizes": [int(w) for w in widths],
        "depths": [int(d) for d in depths],
        "num_channels": channels,
    }


def _check_backbone_signature(
    path: Path, config: dict[str, Any], found: PretrainedConfig, where: str
) -> None:
    saved = config.get("backbone_signature")
    if saved is None:  # saved before signatures were recorded
        return
    actual = backbone_signature(found, config.get("in_channels"))
    differences = [f"{k} {saved.get(k)} vs {actual[k]}" for k in actual if saved.get(k) != actual[k]]
    if differences:
        raise ValueError(
            f"{path / SEGMENTER_CONFIG_NAME}: the adapter and decoder were trained on backbone "
            f"{config.get('backbone')!r} {saved}, but {where} is {actual} ({'; '.join(differences)}). "
            f"Their weights were not loaded. Load them with the backbone they were trained on, or retrain."
        )


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _type_check(name: str, model_type: str | None, file: Path) -> None:
    """Refuse a ``backbone_class`` that is no transformers model, or one of another architecture."""
    try:
        cls = _model_class(name)
    except ValueError as error:
        raise ValueError(f"{file}: {error} Restore the value the model was saved with.") from None
    if model_type is not None and cls.config_class.model_type != model_type:
        expected = (
            FEATURE_SPECS[model_type].model_class if model_type in FEATURE_SPECS else "a matching class"
        )
        raise ValueError(
            f"{file}: backbone_class {name!r} is a {cls.config_class.model_type!r} model but the saved backbone "
            f"is a {model_type!r} model; restore backbone_class (e.g. {expected!r})."
        )


def _is_decoder_name(name: str) -> bool:
    try:
        decoder_key(name)
    except ValueError:
        return False
    return True


# field -> (check, what is expected); fields absent from a config are not checked, except _REQUIRED_FIELDS.
_CONFIG_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "decoder": (  # any spelling build_decoder takes: models saved before names were normalized say "UperNet"
        lambda v: isinstance(v, str) and _is_decoder_name(v),
        f"one of {sorted(DECODERS)}",
    ),
    "num_classes": (lambda v: _is_int(v, 1), "a positive int (classes K, background included)"),
    "in_channels": (lambda v: _is_int(v, 1), "a positive int (input channels C)"),
    "decoder_kwargs": (lambda v: v is None or isinstance(v, dict), "an object of decoder options or null"),
    "label_names": (lambda v: v is None or _is_str_list(v), "a list of K class names or null"),
    "label_values": (
        lambda v: v is None or isinstance(v, list) and all(_is_int(x, 0) for x in v),
        "a list of K distinct label values >= 0 or null",
    ),
    "backbone": (lambda v: v is None or isinstance(v, str), "the backbone's Hub id, directory or tiny name"),
    "backbone_class": (
        lambda v: v is None or isinstance(v, str),
        "a transformers class name, e.g. 'SwinModel'",
    ),
    "backbone_weights": (
        lambda v: v in (None, BACKBONE_SUBFOLDER, "hub"),
        f"{BACKBONE_SUBFOLDER!r} or 'hub'",
    ),
    "backbone_revision": (lambda v: v is None or isinstance(v, str), "a Hub revision or null"),
    "backbone_config_overrides": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "backbone_signature": (lambda v: v is None or isinstance(v, dict), "the object save_pretrained wrote"),
    "num_slices": (lambda v: v is None or _is_int(v, 1), "a positive int (slices per volume D) or null"),
    "crop_size": (
        lambda v: v is None or isinstance(v, list) and len(v) == 3 and all(_is_int(x, 1) for x in v),
        "[D, H, W] of positive ints or null",
    ),
    "preprocessing": (
        lambda v: v is None or isinstance(v, dict),
        "an object of preprocessing settings or null",
    ),
    "versions": (lambda v: isinstance(v, dict), "an object of package versions"),
}
_REQUIRED_FIELDS = ("format_version", "method", "decoder", "num_classes", "in_channels")


def check_segmenter_config(config: Any, file: str | os.PathLike = SEGMENTER_CONFIG_NAME) -> dict[str, Any]:
    """Validate the contents of a ``segmenter_config.json`` before anything is built from it.

    Args:
        config: the parsed JSON.
        file: the file it was read from, for messages.

    Returns:
        ``config``.

    Raises:
        ValueError: naming the file and the field, for a missing required field, a value of the wrong type
            or range, ``label_names`` / ``label_values`` not giving one entry per class, ``in_channels`` other
            than the input channels recorded in ``backbone_signature``, or a
            ``backbone_class`` that is no transformers model or one of another architecture than the
            saved backbone.
    """
    fix = (
        "Restore the value the model was saved with, or re-save it with VolumetricSegmenter.save_pretrained."
    )
    if not isinstance(config, dict):
        raise ValueError(
            f"{file} holds a JSON {type(config).__name__}; expected an object (the one "
            f"VolumetricSegmenter.save_pretrained writes). {fix}"
        )
    missing = [name for name in _REQUIRED_FIELDS if name not in config]
    if missing:
        raise ValueError(f"{file}: required field(s) {missing} missing. {fix}")
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{SEGMENTER_CONFIG_NAME} has format_version={config['format_version']!r}; this "
            f"medtuning_peft reads {FORMAT_VERSION}. Install the version that saved it."
        )
    if config["method"] not in METHODS:
        raise ValueError(f"{file}: {_unknown('method', config['method'], METHODS)} {fix}")
    for name, (valid, expected) in _CONFIG_FIELDS.items():
        if name in config and not valid(config[name]):
            raise ValueError(f"{file}: {name} is {config[name]!r}; expected {expected}. {fix}")
    num_classes = config["num_classes"]
    for name in ("label_names", "label_values"):
        values = config.get(name)
        if values is not None and (len(values) != num_classes or len(set(values)) != num_classes):
            raise ValueError(
                f"{file}: {name} is {values!r} but num_classes is {num_classes}; expected {num_classes} distinct "
                f"entries, one per class. {fix}"
            )
    signature_channels = (config.get("backbone_signature") or {}).get("num_channels", config["in_channels"])
    if signature_channels != config["in_channels"]:
        raise ValueError(
            f"{file}: in_channels is {config['in_channels']!r} but backbone_signature.num_channels is "
            f"{signature_channels!r}: the model was built for {signature_channels} input channels. {fix}"
        )
    if config.get("backbone_weights") == "hub" and not config.get("backbone"):
        raise ValueError(
            f"{file}: backbone is {config.get('backbone')!r}; expected the backbone's Hub id. {fix}"
        )
    if config.get("backbone_class"):
        _type_check(
            config["backbone_class"], (config.get("backbone_signature") or {}).get("model_type"), file
        )
    return config


_ADAPTER_CONFIGS: dict[str, tuple[str, Callable[[], type[peft.PeftConfig]]]] = {
    "med_adapter": ("MED_ADAPTER", lambda: MedAdapterConfig),
    "lora": ("LORA", lambda: peft.LoraConfig),
}
"""Adapter methods: name -> (``peft_type`` of their ``adapter_config.json``, config class)."""

# Fields of the config files that set the shapes of saved tensors, for messages.
_SHAPE_FIELDS = {
    "med_adapter": f"{ADAPTER_CONFIG_NAME} (reduction_ratio, kernel_sizes, num_slices, use_fft, inter_stage, "
    "target_modules, inter_stage_modules)",
    "lora": f"{ADAPTER_CONFIG_NAME} (r, target_modules)",
    "full": f"{SEGMENTER_CONFIG_NAME} (backbone, backbone_class, backbone_signature)",
}


def _read_adapter_config(path: Path, method: str) -> peft.PeftConfig:
    """The validated peft config of an adapter method's ``adapter_config.json``."""
    file = path / ADAPTER_CONFIG_NAME
    peft_type, config_class = _ADAPTER_CONFIGS[method]
    fix = "Restore the file the model was saved with, or re-save it with VolumetricSegmenter.save_pretrained."
    data = read_json_file(file, ADAPTER_CONFIG_NAME)
    if not isinstance(data, dict):
        raise ValueError(
            f"{file} holds a JSON {type(data).__name__}; expected an object with peft_type {peft_type!r}. {fix}"
        )
    if data.get("peft_type") != peft_type:
        found = repr(data["peft_type"]) if "peft_type" in data else "missing"
        raise ValueError(
            f"{file}: peft_type is {found}; expected {peft_type!r} ({SEGMENTER_CONFIG_NAME} says method "
            f"{method!r}). {fix}"
        )
    try:
        config = config_class().from_pretrained(str(path))
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{file}: {type(error).__name__}: {error}. {fix}") from error
    if not isinstance(config, config_class()):
        raise ValueError(f"{file}: expected a {config_class().__name__}, got {type(config).__name__}. {fix}")
    return config


def check_saved_model(path: str | os.PathLike, check_files: bool = True) -> dict[str, Any]:
    """Check a directory written by :meth:`VolumetricSegmenter.save_pretrained`, reading no weights.

    Validates ``segmenter_config.json`` (:func:`check_segmenter_config`) and ``adapter_config.json``, and
    that every file the method needs is there and complete (safetensors headers and sizes, JSON).

    Args:
        path: the model directory.
        check_files: also check that every JSON and safetensors file under ``path`` is complete (False: only
            the files the method needs are checked to be there).

    Returns:
        The segmenter config.

    Raises:
        FileNotFoundError: when ``segmenter_config.json`` or a weights file is missing.
        ValueError: naming the file and field of a bad config; ``io_utils.CorruptFileError`` for a truncated
            or corrupt file.
    """
    config, _ = _read_configs(Path(path), check_files)
    return config


def _read_configs(path: Path, check_files: bool = True) -> tuple[dict[str, Any], peft.PeftConfig | None]:
    config_file = path / SEGMENTER_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"No {SEGMENTER_CONFIG_NAME} in {str(path)!r}; save the model with "
            f"VolumetricSegmenter.save_pretrained (a bare peft adapter loads with "
            f"peft.PeftModel.from_pretrained instead)."
        )
    config = check_segmenter_config(read_json_file(config_file, SEGMENTER_CONFIG_NAME), config_file)
    _check_model_files(path, config, check_files)
    method = config["method"]
    return config, _read_adapter_config(path, method) if method in _ADAPTER_CONFIGS else None


def _is_decoder(name: str) -> bool:
    return name.startswith("decoder.") or ".decoder." in name


def _shape_fields(names: list[str], config: dict[str, Any], resized: dict[str, tuple[tuple, tuple]]) -> str:
    """The config files and fields that set the shapes of the tensors ``names``."""
    parts = []
    if any(_is_decoder(n) for n in names):
        num_classes = config["num_classes"]
        classes = {
            saved[0]
            for n, (saved, expected) in resized.items()
            if _is_decoder(n) and expected[:1] == (num_classes,) != saved[:1]
        }
        fields = (
            [f"num_classes={num_classes} (the weights hold {sorted(classes)} classes)"] if classes else []
        )
        fields += [
            f"decoder={config['decoder']!r}",
            f"decoder_kwargs={json.dumps(config.get('decoder_kwargs'))}",
        ]
        parts.append(f"{SEGMENTER_CONFIG_NAME} ({', '.join(fields)})")
    if any(not _is_decoder(n) for n in names):
        parts.append(_SHAPE_FIELDS.get(config["method"], _SHAPE_FIELDS["full"]))
    return " and ".join(parts)


def _check_weights_fit(weights: Path, expected: dict[str, tuple[int, ...]], config: dict[str, Any]) -> None:
    """Refuse saved tensors that do not all land on the model, by name and shape, reading headers only.

    peft only warns about missing adapter keys and drops saved tensors that match no module, which leaves a
    model with freshly initialized adapters. That happens when transformers renamed the backbone's modules
    between the version that saved the model and this one (DINOv2 with registers called its attention
    projections ``query`` / ``key`` / ``value`` before 5.24, ``q_proj`` / ``k_proj`` / ``v_proj`` since), or
    when a config file was edited (other decoder, class count, adapter width).
    """
    saved = {k: tuple(v["shape"]) for k, v in safetensors_header(weights).items() if k != "__metadata__"}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    resized = {
        k: (saved[k], expected[k]) for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]
    }
    if not missing and not unexpected and not resized:
        return
    problems = []
    if missing or unexpected:
        problems.append(
            f"{len(missing)} tensor(s) the model expects are not in the file (e.g. {missing[:2]}) and "
            f"{len(unexpected)} saved tensor(s) match no module (e.g. {unexpected[:2]})"
        )
    if resized:
        name, (was, now) = next(iter(resized.items()))
        problems.append(
            f"{len(resized)} tensor(s) differ in shape (e.g. {name!r}: {list(was)} in the file, {list(now)} "
            "from the config files)"
        )
    saved_with = config.get("versions", {}).get("transformers")
    if not resized and saved_with and saved_with != transformers.__version__:
        cause = (
            f"The model was saved with transformers {saved_with}, and this is transformers "
            f"{transformers.__version__}: module names differ between them. Load it with "
            f"transformers=={saved_with}."
        )
    else:
        fields = _shape_fields([*missing, *unexpected, *resized], config, resized)
        cause = (
            f"{fields} do not describe the model these weights were saved from (edited, or copied from another "
            "model); restore the values it was saved with, or re-save it with VolumetricSegmenter.save_pretrained."
        )
    raise ValueError(
        f"The weights in '{weights}' do not fit the model its config files describe: {'; '.join(problems)}. "
        f"{cause} No weights were loaded."
    )


def _check_finite(weights: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse NaN / Inf in the tensors loaded from ``weights`` (one pass over them)."""
    bad = [
        name
        for name, tensor in state.items()
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise CorruptFileError(
            f"The weights in '{weights}' hold NaN or Inf values in {len(bad)} tensor(s) (e.g. {bad[:2]}): the "
            "file is corrupt or was saved from a diverged run. Re-save it from a good checkpoint or download it "
            "again."
        )


def _check_model_files(path: Path, config: dict[str, Any], check_files: bool = True) -> None:
    """Refuse a partial or corrupt model directory before reading any weights."""
    method = config.get("method")
    expected = (
        ["adapter_config.json", "adapter_model.safetensors"]
        if method in ("med_adapter", "lora")
        else [WEIGHTS_NAME]
    )
    if config.get("backbone_weights") == BACKBONE_SUBFOLDER:
        expected.append(f"{BACKBONE_SUBFOLDER}/config.json")
        index = path / BACKBONE_SUBFOLDER / f"{WEIGHTS_NAME}.index.json"
        if method != "full" and not index.is_file():
            expected.append(f"{BACKBONE_SUBFOLDER}/{WEIGHTS_NAME}")
    missing = [name for name in expected if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Model directory '{path}' is incomplete: {missing} missing (an interrupted copy or "
            f"download?). Re-save it with VolumetricSegmenter.save_pretrained or download it again."
        )
    for file in sorted(path.rglob("*")) if check_files else []:
        if file.suffix == ".json":
            read_json_file(file, file.name)
        elif file.suffix == ".safetensors":
            check_safetensors(file)


def _base_state_dict(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """State dict of ``module`` as it was before tuner layers were injected (adapters dropped).

    A module trained in full (``modules_to_save``) contributes its original weights under its own names, not
    peft's wrapper names: its trained copy is saved with the adapter.
    """
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    state = {prefix + n: p for n, p in module._parameters.items() if p is not None}
    state.update(
        {
            prefix + n: b
            for n, b in module._buffers.items()
            if b is not None and n not in module._non_persistent_buffers_set
        }
    )
    for name, child in module._modules.items():
        if child is not None:
            state.update(_base_state_dict(child, f"{prefix}{name}."))
    return state


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


class VolumetricSegmenter(nn.Module):
    """A 2D transformers backbone + 2D decoder applied slice-wise to volumes.

    Build one with :func:`build_segmenter`, load one with :func:`from_pretrained`. With a PEFT method the
    segmenter is wrapped in place by a ``peft.PeftModel`` (adapters injected into ``backbone``, ``decoder``
    in ``modules_to_save``); that ``PeftModel`` is :attr:`peft_model`, and calling the segmenter directly is
    equivalent to calling it.

    Args:
        backbone: a supported transformers backbone with ``config.num_channels`` = C.
        decoder: a decoder ``([(B*D, C_i, h_i, w_i)], (H, W)) -> (B*D, K, H, W)``.
        segmenter_config: everything needed to rebuild the model (written to ``segmenter_config.json``).
    """

    def __init__(
        self, backbone: PreTrainedModel, decoder: nn.Module, segmenter_config: dict | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.segmenter_config: dict[str, Any] = dict(segmenter_config or {})
        self._min_slice = min_slice_size(backbone)  # (H, W), checked by every forward
        # A plain attribute, not a submodule: the PeftModel wraps this module.
        object.__setattr__(self, "_peft_model", None)

    @property
    def peft_model(self) -> peft.PeftModel | None:
        """The ``PeftModel`` wrapping this segmenter (``med_adapter``, ``lora``), else None."""
        return self._peft_model

    def _attach_peft_model(self, peft_model: peft.PeftModel | None) -> None:
        object.__setattr__(self, "_peft_model", peft_model)

    @property
    def method(self) -> str | None:
        """The training method: ``med_adapter``, ``lora``, ``full`` or ``decoder_only``."""
        return self.segmenter_config.get("method")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Segment volumes slice by slice.

        Args:
            pixel_values: ``(B, C, D, H, W)``.

        Returns:
            Logits ``(B, K, D, H, W)``.

        Raises:
            ValueError: when ``pixel_values`` is not 5-D, has the wrong number of channels, or slices smaller
                than the backbone embeds (:func:`min_slice_size`).
        """
        slices = volume_to_slices(pixel_values)  # (B, C, D, H, W) -> (B*D, C, H, W)
        B, C, D, H, W = pixel_values.shape
        expected = getattr(self.backbone.config, "num_channels", C)
        if expected != C:
            raise ValueError(
                f"pixel_values has C={C} channels (shape (B, C, D, H, W) = {tuple(pixel_values.shape)}) but "
                f"the backbone takes {expected}; build the segmenter with in_channels={C} or fix the channel "
                f"axis."
            )
        min_h, min_w = self._min_slice
        if min_h > H or min_w > W:
            raise ValueError(
                f"pixel_values has slices of H x W = {H} x {W} (shape (B, C, D, H, W) = "
                f"{tuple(pixel_values.shape)}) but the {self.backbone.config.model_type} backbone embeds slices "
                f"of at least {min_h} x {min_w} pixels; pad the volume or use windows of at least that size."
            )
        kwargs = {"num_slices": D} if self.method == "med_adapter" else {}
        features = extract_features(self.backbone, slices, **kwargs)  # [(B*D, C_i, h_i, w_i)]
        logits = self.decoder(features, (H, W))  # (B*D, K, H, W)
        return slices_to_volume(logits, B)  # (B*D, K, H, W) -> (B, K, D, H, W)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save what is needed to rebuild this model with :func:`from_pretrained`; safetensors and JSON only.

        Writes ``segmenter_config.json``; for ``med_adapter`` / ``lora`` peft's ``adapter_config.json`` and
        ``adapter_model.safetensors`` (adapters + decoder); for ``full`` / ``decoder_only`` a
        ``model.safetensors`` of what was trained; and, only when the backbone cannot be re-loaded by Hub
        id (tiny / random init / local directory), the base backbone in ``backbone/`` (its config only for
        ``full``). The files are written to a temporary directory next to ``save_directory`` and renamed
        into place, so an interrupted save leaves no half-written model directory.

        Args:
            save_directory: target directory; replaced if it holds an earlier save.

        Raises:
            FileExistsError: when ``save_directory`` exists and is not empty nor an earlier save.
            ValueError: when ``segmenter_config`` lacks the method.
        """
        method = self.method
        if method not in METHODS:
            raise ValueError(_unknown("segmenter_config['method']", method, METHODS))
        # The versions that write these files (a loaded model keeps those of its first save): from_pretrained
        # names them when saved tensors do not fit the modules of the running transformers.
        config = {**self.segmenter_config, "versions": _versions()}
        save_backbone = not config.get("backbone_reloadable", False)
        config["backbone_weights"] = BACKBONE_SUBFOLDER if save_backbone else "hub"
        with _atomic_directory(Path(save_directory)) as tmp:
            if self.peft_model is not None:
                self.peft_model.save_pretrained(str(tmp))
            elif method == "full":
                save_file(_contiguous(self.state_dict()), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            else:
                state = {f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}
                save_file(_contiguous(state), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if save_backbone:
                if method == "full":  # the weights are in model.safetensors
                    self.backbone.config.save_pretrained(str(tmp / BACKBONE_SUBFOLDER))
                else:
                    self.backbone.save_pretrained(
                        str(tmp / BACKBONE_SUBFOLDER), state_dict=_base_state_dict(self.backbone)
                    )
            (tmp / SEGMENTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _versions() -> dict[str, str | None]:
    """The package versions a saved model's tensor names and layouts depend on."""
    return {
        "medtuning_peft": getattr(importlib.import_module("medtuning_peft"), "__version__", None),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


@contextlib.contextmanager
def _atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` by rename."""
    target = target.expanduser().absolute()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"save_directory {str(target)!r} exists and is a file; choose a directory.")
        if any(target.iterdir()) and not (target / SEGMENTER_CONFIG_NAME).exists():
            raise FileExistsError(
                f"save_directory {str(target)!r} is not empty and holds no saved segmenter; choose a new "
                f"or empty directory."
            )
    # Files and folders get the umask's modes (safetensors >= 0.8 writes private files), then one rename.
    with atomic_directory(target, overwrite=True) as tmp:
        yield tmp


# ---------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------


def _modules_to_save(kwargs: dict[str, Any]) -> list[str]:
    extra = list(kwargs.pop("modules_to_save", None) or [])
    return ["decoder", *[m for m in extra if m != "decoder"]]


def _apply_med_adapter(segmenter: VolumetricSegmenter, **kwargs: Any) -> peft.PeftModel:
    config = MedAdapterConfig(modules_to_save=_modules_to_save(kwargs), **kwargs)
    return peft.get_peft_model(segmenter, config)


def _apply_lora(segmenter: VolumetricSegmenter, **kwargs: Any) -> peft.PeftModel:
    kwargs.pop("num_slices", None)
    projections = "|".join(feature_spec(segmenter.backbone).attention_projections)
    kwargs.setdefault("target_modules", rf"backbone\..*\.({projections})")
    kwargs.setdefault("r", 8)
    kwargs.setdefault("lora_alpha", 16)
    config = peft.LoraConfig(modules_to_save=_modules_to_save(kwargs), **kwargs)
    return peft.get_peft_model(segmenter, config)


def _no_options(method: str, kwargs: dict[str, Any]) -> None:
    kwargs.pop("num_slices", None)
    if kwargs:
        raise ValueError(f"method={method!r} takes no options, got {sorted(kwargs)}; remove them.")


def _apply_full(segmenter: VolumetricSegmenter, **kwargs: Any) -> None:
    _no_options("full", kwargs)
    segmenter.requires_grad_(True)


def _apply_decoder_only(segmenter: VolumetricSegmenter, **kwargs: Any) -> None:
    _no_options("decoder_only", kwargs)
    segmenter.backbone.requires_grad_(False)
    segmenter.decoder.requires_grad_(True)


ADAPTER_METHODS = ("med_adapter", "lora")  # the methods that train a frozen backbone's added weights


def trains_patch_embedding(method: str, in_channels: int, train_patch_embedding: bool | None = None) -> bool:
    """Whether :func:`build_segmenter` trains the backbone's patch embedding: ``train_patch_embedding`` when
    given, else for ``full``, and for ``med_adapter`` / ``lora`` when ``in_channels > 1``."""
    if train_patch_embedding is not None:
        return train_patch_embedding
    return method == "full" or (in_channels > 1 and method in ADAPTER_METHODS)


METHODS: dict[str, Callable[..., peft.PeftModel | None]] = {
    "med_adapter": _apply_med_adapter,
    "lora": _apply_lora,
    "full": _apply_full,
    "decoder_only": _apply_decoder_only,
}
"""Training methods: name -> ``(segmenter, num_slices=..., **options) -> PeftModel | None``."""


def _check_json(field: str, value: Any) -> None:
    try:
        json.dumps(value)
    except TypeError as e:
        raise ValueError(
            f"{field} must be JSON-serializable (it is saved in {SEGMENTER_CONFIG_NAME}): {e}"
        ) from e


def build_segmenter(
    backbone: str | PreTrainedModel,
    in_channels: int,
    num_classes: int,
    decoder: str = "upernet",
    method: str = "med_adapter",
    num_slices: int | None = None,
    label_names: Sequence[str] | None = None,
    label_values: Sequence[int] | None = None,
    decoder_kwargs: dict[str, Any] | None = None,
    crop_size: Sequence[int] | None = None,
    preprocessing: dict[str, Any] | None = None,
    revision: str | None = None,
    save_backbone: bool | None = None,
    train_patch_embedding: bool | None = None,
    **method_kwargs: Any,
) -> VolumetricSegmenter:
    """Build a volumetric segmenter: backbone, input-channel adaptation, decoder, training method.

    Args:
        backbone: a Hub id, a local directory, a key of :data:`TINY_BACKBONES` (random init), or a
            transformers backbone object.
        in_channels: input channels C (the 3-channel patch embedding is adapted, :func:`adapt_input_channels`).
        num_classes: classes K, background included.
        decoder: ``"upernet"`` (paper), ``"fpn"`` or ``"segformer"``.
        method: ``"med_adapter"`` (adapters + decoder trained), ``"lora"`` (LoRA on the attention
            projections + decoder), ``"full"`` (everything) or ``"decoder_only"`` (backbone frozen).
        num_slices: slices per volume D of the training crops (the Med-Adapter spectral filter size);
            defaults to ``crop_size[0]``, else the method's default.
        label_names: K class names, saved with the model.
        label_values: the label value written for each of the K classes (BraTS: ``(0, 1, 2, 4)``); default
            ``0 .. K-1``. Saved with the model; ``medtuning predict`` writes these values.
        decoder_kwargs: decoder options, e.g. ``{"channels": 256}``.
        crop_size: training crop ``(D, H, W)``, saved with the model.
        preprocessing: JSON-serializable preprocessing settings, saved with the model.
        revision: Hub revision of ``backbone``.
        save_backbone: whether :meth:`VolumetricSegmenter.save_pretrained` stores the base backbone weights.
            None (default) stores them unless the backbone re-loads by Hub id from a known commit (a Hub id, or
            a model object whose ``name_or_path`` is one with a commit in huggingface_hub's cache, or on the Hub
            when online: pass True when such an object's weights were changed).
        train_patch_embedding: for ``med_adapter`` and ``lora``, train the backbone's patch embedding in full
            with the adapters (peft's ``modules_to_save``; saved with them). None (default): when
            ``in_channels > 1``. The adapted embedding starts with the same filters for every channel, so
            frozen it passes on only the sum of the channels and the model cannot tell BraTS' four MRI
            sequences apart; trained, it learns to (C x width x patch² weights and a bias). False keeps
            it frozen, as the paper's released code does (with a random, frozen embedding). ``full`` trains it
            anyway and ``decoder_only`` never does; True or False contrary to that is refused.
        **method_kwargs: options of the method's peft config (``MedAdapterConfig`` / ``LoraConfig``).

    Returns:
        The segmenter, in training mode, with ``requires_grad`` set by the method.

    Raises:
        ValueError: for an unknown decoder, method or backbone type, ``label_names`` of the wrong length,
            non-JSON ``preprocessing``, or a ``train_patch_embedding`` the method cannot honour.
        TypeError: when ``backbone`` is neither a string nor a transformers model.
    """
    if method not in METHODS:
        raise ValueError(_unknown("method", method, METHODS))
    if train_patch_embedding is None:
        train_patch_embedding = trains_patch_embedding(method, in_channels)
    honoured = {"full": (True,), "decoder_only": (False,)}.get(method, (True, False))
    if not isinstance(train_patch_embedding, bool) or train_patch_embedding not in honoured:
        what = {"full": "trains every backbone weight", "decoder_only": "keeps the backbone frozen"}
        fix = (
            f", which {what[method]}; leave it unset, or use method='med_adapter' or 'lora' to choose"
            if method in what
            else "; pass True, False or None"
        )
        raise ValueError(f"train_patch_embedding={train_patch_embedding!r} with method={method!r}{fix}.")
    # The registry's spelling, the one segmenter_config.json is checked against.
    decoder = decoder_key(decoder)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (background included), got {num_classes!r}.")
    label_names = list(label_names) if label_names is not None else [f"class_{k}" for k in range(num_classes)]
    if len(label_names) != num_classes:
        raise ValueError(
            f"label_names has {len(label_names)} names {label_names} but num_classes={num_classes}; give one "
            f"name per class, background included."
        )
    label_values = [int(v) for v in label_values] if label_values is not None else list(range(num_classes))
    if len(label_values) != num_classes or len(set(label_values)) != num_classes:
        raise ValueError(
            f"label_values={label_values} must give {num_classes} distinct values, one per class (num_classes"
            f"={num_classes}), e.g. (0, 1, 2, 4) for BraTS."
        )
    if crop_size is not None:
        crop_size = [int(s) for s in crop_size]
        if len(crop_size) != 3:
            raise ValueError(f"crop_size must be (D, H, W), got {crop_size}.")
    if num_slices is None and crop_size is not None:
        num_slices = crop_size[0]
    _check_json("decoder_kwargs", decoder_kwargs)
    _check_json("preprocessing", preprocessing)
    if isinstance(backbone, str):
        model, info = load_backbone(backbone, revision=revision)
    elif isinstance(backbone, PreTrainedModel):
        model, info = backbone, _object_info(backbone)
    else:
        raise TypeError(
            f"backbone must be a Hub id, a local directory, one of {sorted(TINY_BACKBONES)} or a "
            f"transformers model, got {type(backbone).__name__}."
        )
    if save_backbone is not None:
        info["backbone_reloadable"] = info["backbone_reloadable"] and not save_backbone
    spec = feature_spec(model)
    decoder_kwargs = {"simple_pyramid": spec.simple_pyramid, **(decoder_kwargs or {})}
    adapt_input_channels(model, in_channels)
    head = build_decoder(decoder, feature_channels(model), num_classes, **decoder_kwargs)
    config = {
        "format_version": FORMAT_VERSION,
        **info,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "label_names": label_names,
        "label_values": label_values,
        "backbone_signature": backbone_signature(model.config, in_channels),
        "decoder": decoder,
        "decoder_kwargs": decoder_kwargs,
        "method": method,
        "num_slices": num_slices,
        "crop_size": crop_size,
        "preprocessing": preprocessing,
        "versions": _versions(),
    }
    segmenter = VolumetricSegmenter(model, head, config)
    options = dict(method_kwargs)
    if num_slices is not None:
        options["num_slices"] = num_slices
    if train_patch_embedding and method in ADAPTER_METHODS:
        trained = list(options.get("modules_to_save") or [])
        if spec.patch_embedding not in trained:
            options["modules_to_save"] = [*trained, spec.patch_embedding]
    segmenter._attach_peft_model(METHODS[method](segmenter, **options))
    return segmenter


DOWNLOAD_PATTERNS = [*UPLOAD_PATTERNS, CARD_NAME]
"""What loading a segmenter by Hub id downloads: the files ``push_to_hub`` uploads, not training checkpoints or
other files a repository may hold."""


def _resolve(model_id_or_path: str | os.PathLike, revision: str | None) -> Path:
    path = Path(model_id_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(model_id_or_path)
    if path.exists() or _looks_like_path(text):
        raise FileNotFoundError(
            f"{text!r} is not a directory and not a Hub id ('org/name'); pass the directory written by "
            f"VolumetricSegmenter.save_pretrained."
        )
    try:
        return Path(
            snapshot_download(
                repo_id=text,
                revision=revision,
                allow_patterns=DOWNLOAD_PATTERNS,
            )
        )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise FileNotFoundError(
            f"{_hub_miss(text, error)} Pass the directory written by VolumetricSegmenter.save_pretrained, or "
            f"a Hub id that exists (downloaded once while online)."
        ) from error


def from_pretrained(
    model_id_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    revision: str | None = None,
    is_trainable: bool = False,
) -> VolumetricSegmenter:
    """Load a segmenter saved by :meth:`VolumetricSegmenter.save_pretrained`, ready for inference.

    Args:
        model_id_or_path: a local directory or a Hub id (downloaded with ``snapshot_download``, safetensors
            and JSON only).
        device: where to put the model.
        revision: Hub revision of the saved model.
        is_trainable: set ``requires_grad`` as the saved method does (to continue training) instead of
            freezing everything.

    Returns:
        The segmenter in eval mode, in torch's default dtype (float32) whatever dtype it was saved in.

    Raises:
        FileNotFoundError: when the directory holds no ``segmenter_config.json`` or misses a weights file, or
            ``model_id_or_path`` is neither a local directory nor a Hub id that can be loaded.
        ValueError: naming the file and field, for a ``segmenter_config.json`` or ``adapter_config.json`` of the
            wrong schema (:func:`check_segmenter_config`); a backbone other than the one the model was trained
            on (architecture, widths, depth or input channels); saved tensors whose names or shapes differ from
            what the config files describe (all checked before any weights load); or a truncated / corrupt JSON
            or safetensors file, or weights holding NaN / Inf (``io_utils.CorruptFileError``).
    """
    path = _resolve(model_id_or_path, revision)
    config_file = path / SEGMENTER_CONFIG_NAME
    config, adapter_config = _read_configs(path)
    method = config["method"]

    with_weights = method != "full"
    if config.get("backbone_weights") == BACKBONE_SUBFOLDER:
        folder = str(path / BACKBONE_SUBFOLDER)
        backbone_config = transformers.AutoConfig.from_pretrained(folder)  # its own type, whatever cls says
        _check_backbone_signature(path, config, backbone_config, f"'{folder}'")
        class_name = config.get("backbone_class") or FEATURE_SPECS[backbone_config.model_type].model_class
        _type_check(class_name, backbone_config.model_type, config_file)
        cls = _model_class(class_name)
        backbone = (
            cls.from_pretrained(
                folder, config=backbone_config, use_safetensors=True, dtype=torch.get_default_dtype()
            )
            if with_weights
            else cls(backbone_config)
        )
    else:
        backbone, _ = load_backbone(
            config["backbone"],
            config.get("backbone_revision"),
            with_weights=with_weights,
            backbone_class=config.get("backbone_class"),
            config_overrides=config.get("backbone_config_overrides"),
        )
        _check_backbone_signature(path, config, backbone.config, f"backbone {config['backbone']!r}")
    adapt_input_channels(backbone, config["in_channels"])
    decoder_kwargs = config.get("decoder_kwargs") or {}
    try:
        head = build_decoder(
            config["decoder"], feature_channels(backbone), config["num_classes"], **decoder_kwargs
        )
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{config_file}: decoder {config['decoder']!r} cannot be built with decoder_kwargs "
            f"{decoder_kwargs} ({error}); restore the values the model was saved with."
        ) from error
    segmenter = VolumetricSegmenter(backbone, head, config)

    if adapter_config is not None:
        weights = path / ADAPTER_WEIGHTS_NAME
        adapter_config.inference_mode = not is_trainable
        peft_class = peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(adapter_config.task_type, peft.PeftModel)
        peft_model = peft_class(segmenter, adapter_config)  # adapters injected, not loaded yet
        expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(peft_model).items()}
        _check_weights_fit(weights, expected, config)
        with warnings.catch_warnings():  # _check_weights_fit has compared every name already
            warnings.filterwarnings("ignore", message="Found missing adapter keys", category=UserWarning)
            peft_model.load_adapter(str(path), "default", is_trainable=is_trainable)
        _check_finite(weights, peft.get_peft_model_state_dict(peft_model))
        segmenter._attach_peft_model(peft_model)
    else:
        weights = path / WEIGHTS_NAME
        target, prefix = (segmenter, "") if method == "full" else (segmenter.decoder, "decoder.")
        _check_weights_fit(
            weights, {prefix + k: tuple(v.shape) for k, v in target.state_dict().items()}, config
        )
        state = load_file(str(weights))
        _check_finite(weights, state)
        target.load_state_dict({k[len(prefix) :]: v for k, v in state.items()}, strict=True)
        if is_trainable:
            METHODS[method](segmenter)
    if not is_trainable:
        segmenter.requires_grad_(False)
    if device is not None:
        segmenter.to(device)
    return segmenter.eval()
