"""Tiny, randomly initialized transformers models of every backbone Med-Adapter supports.

Shared by the tests and by the subprocesses they start (fresh-process reload), so both build the
same model from the same seed. Sizes are odd and non-square on purpose.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerModel,
    SwinBackbone,
    SwinConfig,
    SwinModel,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    ViTConfig,
    ViTModel,
)

IMAGE_HW = (36, 44)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
"""Devices for tests that also check CUDA: the CUDA variant is marked ``gpu`` (skipped without a GPU)."""
CHANNELS = 1


def _swin_config(depths=(2, 2), **kw) -> SwinConfig:
    return SwinConfig(
        image_size=IMAGE_HW[0],
        patch_size=4,
        num_channels=CHANNELS,
        embed_dim=12,
        depths=list(depths),
        num_heads=[2 * 2**i for i in range(len(depths))],
        window_size=5,
        **kw,
    )


def _vit_like(cls_config, cls_model, **kw):
    # DINOv2 keeps a square position table and interpolates it to the input size.
    config = cls_config(
        image_size=IMAGE_HW[0],
        patch_size=4,
        num_channels=CHANNELS,
        hidden_size=24,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=32,
        **kw,
    )
    return cls_model(config)


def _segformer_config(**kw) -> SegformerConfig:
    return SegformerConfig(
        num_channels=CHANNELS,
        num_encoder_blocks=2,
        depths=[2, 2],
        sr_ratios=[2, 1],
        hidden_sizes=[12, 24],
        num_attention_heads=[1, 2],
        patch_sizes=[7, 3],
        strides=[4, 2],
        decoder_hidden_size=16,
        **kw,
    )


BUILDERS = {
    "swin": lambda: SwinModel(_swin_config()),
    "swin_backbone": lambda: SwinBackbone(_swin_config(out_features=["stage1", "stage2"])),
    "vit": lambda: ViTModel(
        ViTConfig(
            image_size=list(IMAGE_HW),
            patch_size=4,
            num_channels=CHANNELS,
            hidden_size=24,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=32,
        ),
        add_pooling_layer=False,
    ),
    "dinov2": lambda: _vit_like(Dinov2Config, Dinov2Model),
    "dinov2_registers": lambda: _vit_like(
        Dinov2WithRegistersConfig, Dinov2WithRegistersModel, num_register_tokens=2
    ),
    "segformer": lambda: SegformerModel(_segformer_config()),
    "upernet_swin": lambda: UperNetForSemanticSegmentation(
        UperNetConfig(
            backbone_config=_swin_config(depths=(2, 1, 2), out_features=["stage1", "stage2", "stage3"]),
            hidden_size=16,
            auxiliary_in_channels=48,
            auxiliary_channels=8,
            num_labels=3,
            use_auxiliary_head=True,
        )
    ),
    "segformer_semseg": lambda: SegformerForSemanticSegmentation(_segformer_config(num_labels=3)),
}

# Heads trained in full next to the adapters (`modules_to_save`), per model with one.
HEADS = {"upernet_swin": ["decode_head", "auxiliary_head"], "segformer_semseg": ["decode_head"]}


def paper_swin_t() -> SwinModel:
    """The paper's Swin-T (the paper's parity setting): embed 96, depths 2-2-2-2, window 4, 128^2, 4 channels."""
    return SwinModel(
        SwinConfig(
            image_size=128,
            patch_size=4,
            num_channels=4,
            embed_dim=96,
            depths=[2, 2, 2, 2],
            num_heads=[3, 6, 12, 24],
            window_size=4,
        )
    )


def paper_vit_b16() -> ViTModel:
    """ViT-B/16 at 128^2 with 4 channels, as in the paper's parity figure."""
    return ViTModel(
        ViTConfig(
            image_size=128,
            patch_size=16,
            num_channels=4,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
        add_pooling_layer=False,
    )


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model ``name`` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def output_tensor(output) -> torch.Tensor:
    """One tensor summarizing a model output: logits, the last hidden state, or all feature maps."""
    if getattr(output, "logits", None) is not None:
        return output.logits
    if getattr(output, "feature_maps", None) is not None:
        return torch.cat([f.flatten(1) for f in output.feature_maps], dim=1)
    return output.last_hidden_state


def slices(num_volumes: int, num_slices: int, seed: int = 1) -> torch.Tensor:
    """(B*D, C, H, W) random slices, volume-major."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_volumes * num_slices, CHANNELS, *IMAGE_HW, generator=g)
