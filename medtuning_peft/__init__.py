"""medtuning_peft: Med-Adapter (Med-Tuning, MIDL 2024) as a HuggingFace PEFT method for 3D segmentation.

Importing the package registers the peft type "MED_ADAPTER", so ``peft.get_peft_model`` and
``peft.PeftModel.from_pretrained`` know the method.
"""

from __future__ import annotations

import importlib
from typing import Any

from .backbones import enable_activation_checkpointing
from .tuners.med_adapter import (
    MED_ADAPTER,
    MedAdapterConfig,
    MedAdapterModel,
    cuda_graphs_enabled,
    disable_cuda_graphs,
    enable_cuda_graphs,
    has_med_adapter,
)

__version__ = "0.1.0"

# Heavier parts load on first use, so `import medtuning_peft` stays cheap.
_LAZY = {
    "VolumetricSegmenter": "medtuning_peft.volumetric",
    "adapt_input_channels": "medtuning_peft.volumetric",
    "build_segmenter": "medtuning_peft.volumetric",
    "from_pretrained": "medtuning_peft.volumetric",
}

__all__ = [
    "MED_ADAPTER",
    "MedAdapterConfig",
    "MedAdapterModel",
    "__version__",
    "cuda_graphs_enabled",
    "disable_cuda_graphs",
    "enable_activation_checkpointing",
    "enable_cuda_graphs",
    "has_med_adapter",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medtuning_peft' has no attribute {name!r}")
