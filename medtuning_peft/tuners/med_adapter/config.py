"""Configuration of Med-Adapter, with the paper's values as defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from .registration import MED_ADAPTER

_HELP = {
    "reduction_ratio": "Bottleneck width r = C // reduction_ratio for a block of width C (paper: 6).",
    "kernel_sizes": "One depthwise branch per odd kernel size k: in-plane k x k, then k x 1 x 1 across slices "
    "(paper: (3, 5)).",
    "use_fft": "Add the spectral branch: a learned circular filter along the slices (paper: on).",
    "inter_stage": "Inter-stage feature interaction: the adapters in `inter_stage_modules` fuse the previous "
    "stage's adapter features (paper: on).",
    "num_slices": "Slices per volume D the spectral filter is built for (paper: 128, the crop depth). A forward "
    "may pass `num_slices=` to override it; other depths resample the filter.",
    "target_modules": "Transformer blocks to adapt (regex string or list of names). None picks every block of a "
    "supported backbone.",
    "inter_stage_modules": "Blocks whose adapter carries Inter-FI (regex string or list of names). None picks the "
    "last block of each stage (Swin, SegFormer) or every third block (ViT, DINOv2: 2, 5, 8, 11).",
    "modules_to_save": "Modules outside the adapters to train and save in full, e.g. a segmentation head. Use full "
    "module names: peft matches them as suffixes.",
    "init_identity": "Zero-initialize the up-projection so the adapted model starts equal to the frozen one "
    "(off in the paper).",
    "exclude_modules": "Blocks never to adapt (regex string or list of names).",
    "backbone_signature": "Filled in when the adapter is created: the backbone's model_type, input channels and "
    "the width of every adapted block. Loading onto a different backbone is refused before any weight is read.",
}


@dataclass
class MedAdapterConfig(PeftConfig):
    """Configuration of a Med-Adapter (Med-Tuning, Shen, Wang et al., MIDL 2024).

    A Med-Adapter follows every adapted transformer block of a 2D backbone that sees the slices of a
    volume as a batch ``(B*D, C, H, W)``, volume-major. The math is in ``modules.py`` (fast form) and
    ``reference.py`` (the 3D formula of the paper's released code).

    Args:
        reduction_ratio: see ``_HELP`` (the dataclass field metadata carries the same text).
        kernel_sizes: odd kernel sizes of the depthwise branches.
        use_fft: add the spectral branch.
        inter_stage: enable inter-stage feature interaction.
        num_slices: slice count D the spectral filter is built for.
        target_modules: blocks to adapt; None = all blocks of the detected backbone.
        inter_stage_modules: blocks carrying Inter-FI; None = per-backbone default.
        modules_to_save: extra modules trained in full and saved with the adapter.
        init_identity: zero-init the up-projection.
        backbone_signature: set automatically; guards loading onto another backbone.

    Raises:
        ValueError: for an invalid value, naming the field, the value and what is expected.
    """

    reduction_ratio: int = field(default=6, metadata={"help": _HELP["reduction_ratio"]})
    kernel_sizes: tuple[int, ...] | list[int] = field(
        default=(3, 5), metadata={"help": _HELP["kernel_sizes"]}
    )
    use_fft: bool = field(default=True, metadata={"help": _HELP["use_fft"]})
    inter_stage: bool = field(default=True, metadata={"help": _HELP["inter_stage"]})
    num_slices: int = field(default=128, metadata={"help": _HELP["num_slices"]})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": _HELP["target_modules"]})
    inter_stage_modules: list[str] | str | None = field(
        default=None, metadata={"help": _HELP["inter_stage_modules"]}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": _HELP["exclude_modules"]})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": _HELP["modules_to_save"]})
    init_identity: bool = field(default=False, metadata={"help": _HELP["init_identity"]})
    backbone_signature: dict | None = field(default=None, metadata={"help": _HELP["backbone_signature"]})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MED_ADAPTER
        _check_int("reduction_ratio", self.reduction_ratio, minimum=1, hint="the paper uses 6")
        _check_int("num_slices", self.num_slices, minimum=1, hint="use the crop depth D, the paper uses 128")
        if isinstance(self.kernel_sizes, int) or not isinstance(self.kernel_sizes, (list, tuple)):
            raise ValueError(
                f"MedAdapterConfig.kernel_sizes must be a list or tuple of odd positive ints, got "
                f"{self.kernel_sizes!r}; e.g. kernel_sizes=(3, 5) as in the paper, or (3,) for one branch."
            )
        for k in self.kernel_sizes:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(
                    f"MedAdapterConfig.kernel_sizes must hold odd positive ints (for 'same' padding), got "
                    f"{list(self.kernel_sizes)!r}; e.g. (3, 5)."
                )
        if len(set(self.kernel_sizes)) != len(self.kernel_sizes):
            raise ValueError(
                f"MedAdapterConfig.kernel_sizes has duplicates: {list(self.kernel_sizes)!r}; list each size once."
            )
        self.kernel_sizes = tuple(self.kernel_sizes)
        for name in ("use_fft", "inter_stage", "init_identity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"MedAdapterConfig.{name} must be True or False, got {getattr(self, name)!r}."
                )
        if not self.kernel_sizes and not self.use_fft:
            raise ValueError(
                "MedAdapterConfig has no branch: kernel_sizes is empty and use_fft is False; enable at least one."
            )
        for name in ("target_modules", "inter_stage_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise ValueError(
                    f"MedAdapterConfig.{name} must be None, a regex string or a list of module names, got "
                    f"{value!r}."
                )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        elif isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise ValueError(
                f"MedAdapterConfig.modules_to_save must be None or a list of module names, got "
                f"{self.modules_to_save!r}; e.g. ['decode_head']."
            )
        if self.backbone_signature is not None and not isinstance(self.backbone_signature, dict):
            raise ValueError(
                f"MedAdapterConfig.backbone_signature must be None (filled in when the adapter is created) or the "
                f"dict written then, got {self.backbone_signature!r}; leave it unset."
            )


def _check_int(name: str, value, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MedAdapterConfig.{name} must be an int >= {minimum}, got {value!r}; {hint}.")
