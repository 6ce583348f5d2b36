"""Med-Adapter as a peft tuner: config, the adapter math, the block wrapper and the BaseTuner."""

from .config import MedAdapterConfig
from .cuda_graphs import cuda_graphs_enabled, disable_cuda_graphs, enable_cuda_graphs
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
    "cuda_graphs_enabled",
    "disable_cuda_graphs",
    "enable_cuda_graphs",
    "has_med_adapter",
    "resample_periodic",
]
