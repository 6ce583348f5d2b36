"""Med-Adapter as a peft tuner: config, the adapter math, the block wrapper and the BaseTuner."""

from .config import MedAdapterConfig
from .layer import MedAdapterLayer, has_med_adapter
from .model import MedAdapterModel
from .modules import DepthwiseBranch, MedAdapter, SpectralFilter, resample_periodic
from .registration import MED_ADAPTER, register

register(MedAdapterConfig, MedAdapterModel, prefix=MedAdapterModel.prefix)

__all__ = [
    "MED_ADAPTER",
    "DepthwiseBranch",
    "MedAdapter",
    "MedAdapterConfig",
    "MedAdapterLayer",
    "MedAdapterModel",
    "SpectralFilter",
    "has_med_adapter",
    "resample_periodic",
]
