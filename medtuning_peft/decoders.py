"""2D segmentation decoders over multi-scale feature maps of the slice batch.

Every decoder maps a list of feature maps ``[(B*D, C_i, h_i, w_i)]`` (finest first) and the output size
``(H, W)`` to logits ``(B*D, K, H, W)``. The slices are independent here: a decoder never mixes slices, so
in eval mode (BatchNorm on running statistics) one volume cannot affect another.

- :class:`UperNetDecoder`: PPM + FPN fusion (UperNet), the decoder of the paper. Wraps transformers'
  ``UperNetHead``.
- :class:`FPNDecoder`: a light FPN with a summed semantic head (Panoptic-FPN style).
- :class:`SegformerMLPDecoder`: SegFormer's all-MLP head. Wraps transformers' ``SegformerDecodeHead``.

Plain backbones (ViT, DINOv2) give four maps at one resolution; ``simple_pyramid=True`` puts a
:class:`SimpleFeaturePyramid` in front (deconv x4, deconv x2, identity, max-pool /2 as in ViT-UperNet /
BEiT), inside the decoder so that it is trained and saved with it.

Use :func:`build_decoder` to make one by name.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SegformerConfig, UperNetConfig
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead
from transformers.models.upernet.modeling_upernet import UperNetHead

__all__ = [
    "DECODERS",
    "FPNDecoder",
    "SegformerMLPDecoder",
    "SegmentationDecoder",
    "SimpleFeaturePyramid",
    "UperNetDecoder",
    "build_decoder",
    "decoder_key",
]


class SimpleFeaturePyramid(nn.Module):
    """Four-level pyramid from four same-resolution maps of a plain backbone (ViT-UperNet / BEiT neck).

    Level 0 is upsampled x4 (two stride-2 transposed convolutions with BatchNorm + GELU between), level 1
    x2 (one transposed convolution), level 2 is kept, level 3 is max-pooled /2 (``ceil_mode`` so a 1 x 1
    grid stays 1 x 1). Channels are unchanged.

    Args:
        channels: width C of the input maps (the backbone's hidden size).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
                    nn.BatchNorm2d(channels),
                    nn.GELU(),
                    nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
                ),
                nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            ]
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Build the pyramid.

        Args:
            features: four maps ``(B*D, C, h, w)``.

        Returns:
            Maps ``(B*D, C, 4h, 4w)``, ``(B*D, C, 2h, 2w)``, ``(B*D, C, h, w)``, ``(B*D, C, ceil(h/2),
            ceil(w/2))``.

        Raises:
            ValueError: when not given exactly four maps.
        """
        if len(features) != len(self.levels):
            raise ValueError(
                f"SimpleFeaturePyramid takes {len(self.levels)} feature maps (blocks tapped from a plain "
                f"backbone), got {len(features)}; tap four blocks, e.g. 2, 5, 8, 11 of a 12-block ViT."
            )
        return [level(x) for level, x in zip(self.levels, features)]


def _check_width(owner: str, name: str, value: object) -> None:
    """Refuse a layer width that is not a positive int (torch would fail later, or only in forward)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive int (feature width), got {value!r}.")


class SegmentationDecoder(nn.Module):
    """Base class: optional simple pyramid, the decoding head, bilinear upsampling to the output size.

    Subclasses implement :meth:`decode` ``(features) -> (B*D, K, h_0, w_0)``.

    Args:
        in_channels: channels C_i of each input map, finest first.
        num_classes: number of output classes K (background included).
        simple_pyramid: put a :class:`SimpleFeaturePyramid` in front (plain backbones; then all
            ``in_channels`` must be equal and there must be four).

    Attributes:
        channels_last: run the decoder in channels-last memory format (default True): the feature maps are
            converted on entry, and convolutions, BatchNorm, interpolation and concatenation keep that
            layout. cuDNN's bf16/fp16 convolutions and oneDNN's run natively in it; in contiguous NCHW
            layout the UperNet training step of the paper setting took up to 6x longer on an H200
            (``benchmarks/cost.md``). The function computed is the same in either layout.

    Raises:
        ValueError: for empty or non-positive ``in_channels``, ``num_classes < 1``, or a simple pyramid over
            unequal or other than four inputs.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, simple_pyramid: bool = False) -> None:
        super().__init__()
        in_channels = list(in_channels)
        name = type(self).__name__
        if not in_channels or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in in_channels
        ):
            raise ValueError(
                f"{name}.in_channels must be a non-empty list of positive ints (channels of each feature "
                f"map, finest first), got {in_channels!r}."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"{name}.num_classes must be a positive int (classes K including background), got "
                f"{num_classes!r}."
            )
        if simple_pyramid and (len(in_channels) != 4 or len(set(in_channels)) != 1):
            raise ValueError(
                f"{name}(simple_pyramid=True) needs four feature maps of equal width from a plain "
                f"backbone, got in_channels={in_channels}; pass simple_pyramid=False for hierarchical "
                f"backbones."
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.neck = SimpleFeaturePyramid(in_channels[0]) if simple_pyramid else None
        self.channels_last = True

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B*D, K, h_0, w_0)`` at the resolution of the finest map."""
        raise NotImplementedError

    def forward(self, features: Sequence[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        """Decode multi-scale maps into logits at ``output_size``.

        Args:
            features: maps ``(B*D, C_i, h_i, w_i)``, finest first, one per entry of ``in_channels``.
            output_size: ``(H, W)`` of the logits, usually the input slice size.

        Returns:
            Logits ``(B*D, K, H, W)``.

        Raises:
            ValueError: when the number or the channels of the maps do not match ``in_channels``.
        """
        features = list(features)
        got = [int(f.shape[1]) for f in features]
        if got != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} was built for feature maps with in_channels={self.in_channels}, got "
                f"maps with channels {got}; build the decoder with the channels the backbone produces."
            )
        if self.channels_last:
            features = [f.contiguous(memory_format=torch.channels_last) for f in features]
        if self.neck is not None:
            features = self.neck(features)
        logits = self.decode(features)
        return F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)


class UperNetDecoder(SegmentationDecoder):
    """UperNet (Xiao et al., 2018): pyramid pooling on the coarsest map + FPN fusion of all levels.

    The head is transformers' ``UperNetHead`` (the one of ``UperNetForSemanticSegmentation``), built from an
    ``UperNetConfig`` that carries only the head's settings.

    Args:
        in_channels: channels of each input map, finest first.
        num_classes: classes K.
        channels: width of the fused features (``UperNetConfig.hidden_size``; 512 in the paper / mmseg).
        pool_scales: output sizes of the pyramid pooling module.
        simple_pyramid: see :class:`SegmentationDecoder`.

    Raises:
        ValueError: for ``channels < 1`` or empty or non-positive ``pool_scales`` (and as the base class does).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        simple_pyramid: bool = False,
    ) -> None:
        super().__init__(in_channels, num_classes, simple_pyramid)
        _check_width("UperNetDecoder", "channels", channels)
        pool_scales = list(pool_scales)
        if not pool_scales or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pool_scales
        ):
            raise ValueError(
                f"UperNetDecoder.pool_scales must be a non-empty list of positive ints (pooled grid sizes), got "
                f"{pool_scales!r}; the paper uses (1, 2, 3, 6)."
            )
        config = UperNetConfig(pool_scales=pool_scales, hidden_size=channels, num_labels=num_classes)
        self.head = UperNetHead(config, in_channels=self.in_channels)
        # The pyramid pooling module concatenates 1 x 1 pooled maps, which leaves its output in NCHW; the FPN
        # sums and concatenates it with every level, so the fused (4 x hidden_size)-channel map, input of the
        # head's largest convolution, would be NCHW too. The hooks put both back into the decoder's layout
        # (the second is a no-op unless the coarsest map is 1 x 1, whose layout is ambiguous).
        self.head.bottleneck.register_forward_hook(self._pooled_in_layout)
        self.head.fpn_bottleneck.register_forward_pre_hook(self._fused_in_layout)

    def _pooled_in_layout(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return output.contiguous(memory_format=torch.channels_last) if self.channels_last else None

    def _fused_in_layout(self, module: nn.Module, args: tuple) -> tuple | None:
        return (args[0].contiguous(memory_format=torch.channels_last),) if self.channels_last else None

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(features)  # (B*D, K, h_0, w_0)


class _ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class FPNDecoder(SegmentationDecoder):
    """Light FPN: 1x1 laterals, top-down sum, one 3x3 conv per level, sum at the finest level, classifier.

    Written here (a few lines) because transformers has no standalone FPN head for semantic segmentation.

    Args:
        in_channels: channels of each input map, finest first.
        num_classes: classes K.
        channels: width of every FPN level.
        simple_pyramid: see :class:`SegmentationDecoder`.

    Raises:
        ValueError: for ``channels < 1`` (and as the base class does).
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: int = 128, simple_pyramid: bool = False
    ) -> None:
        super().__init__(in_channels, num_classes, simple_pyramid)
        _check_width("FPNDecoder", "channels", channels)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(_ConvBNReLU(channels, channels, 3) for _ in self.in_channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [
            conv(x) for conv, x in zip(self.lateral_convs, features)
        ]  # each (B*D, channels, h_i, w_i)
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse -> fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        size = laterals[0].shape[-2:]
        fused = sum(
            F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
            for conv, x in zip(self.fpn_convs, laterals)
        )  # (B*D, channels, h_0, w_0)
        return self.classifier(fused)  # (B*D, K, h_0, w_0)


class SegformerMLPDecoder(SegmentationDecoder):
    """SegFormer's all-MLP head: per-level linear projection, upsample, concat, 1x1 fuse, classifier.

    The head is transformers' ``SegformerDecodeHead``, built from a ``SegformerConfig`` that carries only
    the head's settings (``hidden_sizes`` = ``in_channels``).

    Args:
        in_channels: channels of each input map, finest first.
        num_classes: classes K.
        channels: projection width (``decoder_hidden_size``; 256 for SegFormer-B0/B1, 768 for B2-B5).
        dropout: dropout before the classifier (``classifier_dropout_prob``).
        simple_pyramid: see :class:`SegmentationDecoder`.

    Raises:
        ValueError: for ``channels < 1`` or ``dropout`` outside [0, 1) (and as the base class does).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        simple_pyramid: bool = False,
    ) -> None:
        super().__init__(in_channels, num_classes, simple_pyramid)
        _check_width("SegformerMLPDecoder", "channels", channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SegformerMLPDecoder.dropout must be a probability in [0, 1), got {dropout!r}.")
        config = SegformerConfig(
            num_encoder_blocks=len(self.in_channels),
            hidden_sizes=self.in_channels,
            decoder_hidden_size=channels,
            classifier_dropout_prob=dropout,
            num_labels=num_classes,
        )
        self.head = SegformerDecodeHead(config)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(features)  # (B*D, K, h_0, w_0)


DECODERS: dict[str, type[SegmentationDecoder]] = {
    "upernet": UperNetDecoder,
    "fpn": FPNDecoder,
    "segformer": SegformerMLPDecoder,
}


def decoder_key(name: str) -> str:
    """The :data:`DECODERS` key ``name`` spells, in any case and with ``-`` for ``_`` (``"UperNet"`` -> ``"upernet"``).

    Raises:
        ValueError: for an unknown ``name``, with the closest known names.
    """
    key = str(name).lower().replace("-", "_")
    if key not in DECODERS:
        close = difflib.get_close_matches(key, DECODERS, n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown decoder {name!r}; known decoders: {sorted(DECODERS)}.{hint}")
    return key


def build_decoder(name: str, in_channels: Sequence[int], num_classes: int, **kwargs) -> SegmentationDecoder:
    """Build a decoder from the registry :data:`DECODERS`.

    Args:
        name: ``"upernet"`` (paper), ``"fpn"`` or ``"segformer"``, in any case (:func:`decoder_key`).
        in_channels: channels of each input map, finest first.
        num_classes: classes K.
        **kwargs: decoder options, e.g. ``channels=256``, ``simple_pyramid=True``.

    Returns:
        The decoder module.

    Raises:
        ValueError: for an unknown ``name`` (with the closest known names) or invalid options.
    """
    key = decoder_key(name)
    cls = DECODERS[key]
    options = [p for p in inspect.signature(cls).parameters if p not in ("in_channels", "num_classes")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"Decoder {key!r} has no option(s) {unknown}; its options are {options}.")
    return cls(in_channels, num_classes, **kwargs)
