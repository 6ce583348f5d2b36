"""A saved Med-Adapter is small: the paper's Swin-T adapter checkpoint fits in 4 MB (issue 5)."""

from __future__ import annotations

from peft import get_peft_model
from tiny_models import paper_swin_t

from medtuning_peft import MedAdapterConfig


def test_paper_swin_t_adapter_checkpoint_is_under_4_mb(tmp_path):
    swin = paper_swin_t()
    model = get_peft_model(swin, MedAdapterConfig())
    assert (
        sum(p.numel() for p in model.parameters() if p.requires_grad) == 737_568
    )  # the paper's Swin-T figure
    model.save_pretrained(str(tmp_path))
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size < 4_000_000, f"adapter_model.safetensors is {size:,} bytes"
