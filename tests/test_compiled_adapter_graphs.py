"""Compiled Med-Adapters replayed as CUDA graphs on a GPU: inductor's fused kernels, captured by the package's graphs.

The CPU side of this combination (the graph bookkeeping with compiled adapters) is tested in
``test_med_adapter_cuda_graphs.py``; here inductor generates Triton kernels, which the capture must record.
"""

from __future__ import annotations

import pytest
import torch
from test_med_adapter_cuda_graphs import TOLERANCE, D, _contexts, _train, adapted, compile_adapters
from tiny_models import slices

import medtuning_peft


@pytest.mark.gpu
def test_compiled_adapters_replayed_as_cuda_graphs_train_like_eager(dynamo_reset):
    inputs = [slices(2, D, seed=s).cuda() for s in range(4)]
    eager = adapted("vit").cuda().train()
    graphed = medtuning_peft.enable_cuda_graphs(compile_adapters(adapted("vit").cuda().train(), "inductor"))
    # float32: inductor's fused kernels round like the eager ones there (under bf16 autocast they need not).
    eager_losses, _ = _train(eager, inputs, False, count_from=1)
    graphed_losses, _ = _train(graphed, inputs, False, count_from=1)
    assert len(_contexts(graphed)[0].graphs.training_sets) == 1  # captured in the second pass
    torch.testing.assert_close(graphed_losses, eager_losses, **TOLERANCE[False])
    for (n, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, **TOLERANCE[False], msg=n)
