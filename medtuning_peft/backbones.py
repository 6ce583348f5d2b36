"""Per-architecture knowledge for the transformers vision backbones that Med-Adapter supports.

Everything the tuner needs to know about a backbone lives in one table, :data:`BACKBONE_SPECS`, keyed by
``config.model_type``: which module class is a transformer block, where blocks sit in the module tree
(with the stage and block indices as named regex groups), how the block learns its token grid (h, w),
whether the backbone is hierarchical (Swin, SegFormer: the grid halves and the width grows between
stages) or plain (ViT, DINOv2: one resolution, prefix tokens such as CLS and registers), and which
blocks carry the inter-stage feature interaction by default.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

GridFn = Callable[[tuple, dict, "tuple[int, int] | None", Any], "tuple[int, int]"]


def _grid_from_input_dimensions(args: tuple, kwargs: dict, pixel_hw, patch_size) -> tuple[int, int]:
    # Swin blocks are called as block(hidden_states, input_dimensions, ...), input_dimensions = (h, w).
    dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
    return int(dims[0]), int(dims[1])


def _grid_from_height_width(args: tuple, kwargs: dict, pixel_hw, patch_size) -> tuple[int, int]:
    # SegFormer blocks are called as block(hidden_states, height, width, ...).
    h = args[1] if len(args) > 1 else kwargs["height"]
    w = args[2] if len(args) > 2 else kwargs["width"]
    return int(h), int(w)


def _grid_from_pixels(args: tuple, kwargs: dict, pixel_hw, patch_size) -> tuple[int, int]:
    # ViT / DINOv2 blocks do not receive the grid: it follows from the pixel size and the patch size
    # (non-overlapping patch convolution, floor division).
    if pixel_hw is None:
        raise RuntimeError(
            "Med-Adapter could not determine the token grid: the backbone's forward was not called with "
            "`pixel_values`. Call the model as model(pixel_values=slices, ...)."
        )
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    return pixel_hw[0] // ph, pixel_hw[1] // pw


@dataclass(frozen=True)
class BackboneSpec:
    """How Med-Adapter plugs into one transformers architecture.

    Attributes:
        model_type: ``config.model_type`` of the backbone.
        block_class: class name of one transformer block (the module that gets wrapped).
        block_path: regex of a block's name relative to the backbone, with named groups ``stage``
            (hierarchical backbones) and ``block``.
        grid: callable ``(args, kwargs, pixel_hw, patch_size) -> (h, w)`` giving the token grid of a block
            call.
        hierarchical: True when the grid halves and the width grows between stages.
        inter_stage_every: for plain backbones, every n-th block carries Inter-FI (3 gives 2, 5, 8, 11).
    """

    model_type: str
    block_class: str
    block_path: str
    grid: GridFn
    hierarchical: bool
    inter_stage_every: int = 3

    @property
    def target_regex(self) -> str:
        """Regex (``re.fullmatch`` semantics, as peft uses for a string) of every block, at any depth."""
        plain = re.sub(r"\(\?P<\w+>", "(?:", self.block_path)
        return rf"(?:.*\.)?{plain}"

    @property
    def block_list(self) -> str:
        """Path of the module list holding the blocks of a plain backbone (e.g. ``encoder.layer``).

        Raises:
            ValueError: for a hierarchical backbone, whose blocks sit in several lists.
        """
        if self.hierarchical or not self.block_path.endswith(r"\.(?P<block>\d+)"):
            raise ValueError(f"{self.model_type} blocks do not sit in one module list: {self.block_path!r}")
        return self.block_path.removesuffix(r"\.(?P<block>\d+)").replace("\\.", ".")

    def parse(self, name: str) -> tuple[int, int] | None:
        """(stage, block) indices of a block name, or None when ``name`` is not a block of this spec."""
        m = re.search(rf"(?:^|\.){self.block_path}$", name)
        if m is None:
            return None
        groups = m.groupdict()
        return int(groups.get("stage") or 0), int(groups["block"])


BACKBONE_SPECS: dict[str, BackboneSpec] = {
    spec.model_type: spec
    for spec in (
        BackboneSpec(
            "swin",
            "SwinLayer",
            r"encoder\.layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)",
            _grid_from_input_dimensions,
            hierarchical=True,
        ),
        BackboneSpec(
            "segformer",
            "SegformerLayer",
            r"stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)",
            _grid_from_height_width,
            hierarchical=True,
        ),
        BackboneSpec("vit", "ViTLayer", r"layers\.(?P<block>\d+)", _grid_from_pixels, hierarchical=False),
        BackboneSpec(
            "dinov2", "Dinov2Layer", r"encoder\.layer\.(?P<block>\d+)", _grid_from_pixels, hierarchical=False
        ),
        BackboneSpec(
            "dinov2_with_registers",
            "Dinov2WithRegistersLayer",
            r"encoder\.layer\.(?P<block>\d+)",
            _grid_from_pixels,
            hierarchical=False,
        ),
    )
}

_SPEC_BY_CLASS = {spec.block_class: spec for spec in BACKBONE_SPECS.values()}


def supported_model_types() -> list[str]:
    """The ``model_type`` values Med-Adapter knows, sorted."""
    return sorted(BACKBONE_SPECS)


def spec_for_block(module: nn.Module) -> BackboneSpec | None:
    """The spec whose block class ``module`` is (looking through a peft wrapper), else None."""
    base = getattr(module, "base_layer", module)
    return _SPEC_BY_CLASS.get(type(base).__name__)


def iter_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, BackboneSpec]]:
    """Every transformer block of a supported architecture in ``model``, in module (= forward) order.

    Yields ``(name, module, spec)``; a block already wrapped by a tuner layer is yielded once, under the
    wrapper's name.
    """
    for name, module in model.named_modules():
        if name.endswith("base_layer") and hasattr(model.get_submodule(name.rsplit(".", 1)[0]), "base_layer"):
            continue
        spec = spec_for_block(module)
        if spec is not None and spec.parse(name) is not None:
            yield name, module, spec


def find_spec(model: nn.Module) -> BackboneSpec:
    """The single backbone architecture found in ``model``.

    Raises:
        ValueError: when ``model`` contains no supported block, or blocks of more than one architecture.
    """
    found = {spec.model_type for _, _, spec in iter_blocks(model)}
    if not found:
        raise ValueError(
            f"Med-Adapter found no supported transformer block in {type(model).__name__}. Supported backbones "
            f"(config.model_type): {supported_model_types()}. For another architecture, set "
            "`target_modules` explicitly and add a BackboneSpec to medtuning_peft.backbones.BACKBONE_SPECS."
        )
    if len(found) > 1:
        raise ValueError(
            f"{type(model).__name__} contains blocks of several backbones {sorted(found)}; set `target_modules` "
            "in MedAdapterConfig to choose the blocks of one of them."
        )
    return BACKBONE_SPECS[found.pop()]


def hidden_size_of_block(block: nn.Module) -> int:
    """Token width C of a block, read from its first LayerNorm (every supported block starts with one).

    Raises:
        ValueError: when the block has no LayerNorm.
    """
    for module in getattr(block, "base_layer", block).modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[0])
    raise ValueError(f"cannot infer the hidden size of {type(block).__name__}: it has no nn.LayerNorm")


def owning_backbone(model: nn.Module, block_name: str) -> tuple[str, nn.Module]:
    """Name and module of the innermost ancestor of ``block_name`` whose forward takes ``pixel_values``.

    That is the transformers model the slices enter (e.g. ``SwinModel`` inside ``SwinBackbone`` inside
    ``UperNetForSemanticSegmentation``; not ``Dinov2Encoder``, a ``PreTrainedModel`` fed hidden states).

    Raises:
        ValueError: when no ancestor is a transformers model taking ``pixel_values``.
    """
    parts = block_name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:i])
        module = model.get_submodule(name) if name else model
        if (
            isinstance(module, PreTrainedModel)
            and "pixel_values" in inspect.signature(module.forward).parameters
        ):
            return name, module
    raise ValueError(f"block {block_name!r} is not inside a transformers model that takes `pixel_values`")


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on transformers' non-reentrant activation checkpointing of the backbone inside ``model``.

    Call it after the adapters are in place (``get_peft_model``, ``build_segmenter``): given a model with
    checkpointing already on, peft registers transformers' input-gradient hook, which fails on Swin's patch
    embeddings (``get_peft_model`` refuses that case). Med-Adapter then makes each adapted block (block and
    adapter) one checkpoint unit; gradients and BatchNorm statistics are those of training without
    checkpointing. It uses
    ``activation_checkpointing_enable`` (transformers >= 5.24) or, before it, ``gradient_checkpointing_enable``,
    its former name.

    Args:
        model: a transformers model, a ``PeftModel`` of one, a :class:`~medtuning_peft.VolumetricSegmenter`, or
            any module holding one; the outermost transformers model inside that supports checkpointing (in a
            task model such as ``UperNetForSemanticSegmentation``, its backbone) is switched on, with every
            block in it.

    Returns:
        ``model``.

    Raises:
        ValueError: when ``model`` holds no transformers model that supports activation checkpointing.
    """
    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    target = next((m for m in models if getattr(m, "supports_gradient_checkpointing", False)), None)
    if target is None:
        what = f"{type(models[0]).__name__}, which does not support it" if models else "no transformers model"
        raise ValueError(
            f"enable_activation_checkpointing: {type(model).__name__} holds {what}; pass a transformers "
            "backbone (Swin, ViT, DINOv2, SegFormer), a PeftModel of one or a VolumetricSegmenter."
        )
    enable = getattr(target, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.24
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
