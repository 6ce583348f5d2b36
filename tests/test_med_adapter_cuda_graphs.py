"""CUDA graphs of the Med-Adapters (``enable_cuda_graphs``): the same training and inference as eager.

The CUDA tests (``gpu`` marker) compare a graphed model with an eager twin step by step; the CPU tests check the
switch itself: what it refuses, and that off CUDA it changes nothing.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import get_peft_model
from tiny_models import build, output_tensor, slices
from torch import nn

import medtuning_peft
from medtuning_peft import MedAdapterConfig
from medtuning_peft.tuners.med_adapter import MedAdapter

D = 3
# Swin (hierarchical: strided Inter-FI), ViT (plain), DINOv2 with registers (prefix tokens split off).
GRAPH_NAMES = ["swin", "vit", "dinov2_registers"]


def adapted(name: str) -> nn.Module:
    model = get_peft_model(build(name), MedAdapterConfig(num_slices=D))
    for module in model.modules():  # dropout and stochastic depth off: compare the math, not random masks
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    return model


def forward(model: nn.Module, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        return output_tensor(model(pixel_values=x)).float()


class EagerCalls:
    """Counts the adapters' eager forward calls (a replayed graph does not call the module)."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.handles = [
            m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, MedAdapter)
        ]

    def _hook(self, module, args):
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# Graph replays run the eager kernels, but cuDNN's backward may sum in another order from run to run.
TOLERANCE = {False: {"rtol": 1e-4, "atol": 1e-5}, True: {"rtol": 1e-3, "atol": 1e-4}}


def _train(model: nn.Module, inputs: list[torch.Tensor], autocast: bool, count_from: int) -> tuple[list, int]:
    # SGD: an update linear in the gradient, so run-to-run rounding stays rounding (Adam can amplify the
    # rounding of near-zero gradients).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses, counter = [], None
    for step, x in enumerate(inputs):
        if step == count_from:
            counter = EagerCalls(model)
        optimizer.zero_grad(set_to_none=True)
        loss = forward(model, x, autocast).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    counter.remove()
    return losses, counter.count


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graphed_training_matches_eager_training(name, autocast):
    inputs = [slices(2, D, seed=s).cuda() for s in range(5)]
    eager = adapted(name).cuda().train()
    graphed = medtuning_peft.enable_cuda_graphs(adapted(name).cuda().train())
    eager_losses, _ = _train(eager, inputs, autocast, count_from=2)
    graphed_losses, eager_calls = _train(graphed, inputs, autocast, count_from=2)
    # From the second pass on, every adapter replays its graphs: no eager adapter call in passes 3-5.
    assert eager_calls == 0
    torch.testing.assert_close(graphed_losses, eager_losses, **TOLERANCE[autocast])
    # Parameters after four steps, and BatchNorm running statistics (updated once per pass, not by the capture
    # warm-up).
    for (n, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, **TOLERANCE[autocast], msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graphed_inference_matches_eager_inference(name, autocast):
    model = adapted(name).cuda().eval()
    inputs = [slices(2, D, seed=s).cuda() for s in range(3)]
    with torch.inference_mode():
        expected = [forward(model, x, autocast) for x in inputs]
        medtuning_peft.enable_cuda_graphs(model)
        got = [forward(model, x, autocast) for x in inputs[:2]]
        counter = EagerCalls(model)
        got.append(forward(model, inputs[2], autocast))
        counter.remove()
    assert counter.count == 0  # captured on the second pass, replayed on the third
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, **TOLERANCE[autocast])


@pytest.mark.gpu
def test_kept_outputs_are_not_overwritten_by_later_replays():
    model = medtuning_peft.enable_cuda_graphs(adapted("vit").cuda().eval())
    with torch.inference_mode():
        outputs = [
            model(pixel_values=slices(2, D, seed=s).cuda(), output_hidden_states=True) for s in range(4)
        ]
        kept = [torch.stack(o.hidden_states).clone() for o in outputs]
    for o, k in zip(outputs, kept, strict=True):
        torch.testing.assert_close(torch.stack(o.hidden_states), k, rtol=0, atol=0)


@pytest.mark.gpu
def test_second_training_forward_before_backward_is_refused():
    model = medtuning_peft.enable_cuda_graphs(adapted("vit").cuda().train())
    x = slices(2, D).cuda()
    forward(model, x, False).mean().backward()  # eager pass, recorded
    pending = forward(model, x, False).mean()  # graphs captured and replayed; backward not run yet
    with pytest.raises(RuntimeError, match="before the backward of its previous training forward"):
        forward(model, x, False)
    del pending  # the pending autograd graph is gone: replaying is safe again
    forward(model, x, False).mean().backward()


@pytest.mark.gpu
def test_graphs_follow_the_model_when_it_moves_and_new_shapes_run_eagerly():
    eager = adapted("swin").cuda().train()
    graphed = medtuning_peft.enable_cuda_graphs(adapted("swin").cuda().train())
    inputs = [slices(2, D, seed=0).cuda(), slices(2, D, seed=1).cuda(), slices(1, D, seed=2).cuda()]
    for step, x in enumerate([*inputs, inputs[0]]):
        if step == 3:  # new addresses: the graphs captured so far must not be replayed
            graphed.cpu().cuda()
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            forward(model, x, False).square().mean().backward()
        for (n, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, **TOLERANCE[False], msg=f"step {step}: {n}")


def test_off_cuda_the_switch_changes_nothing_and_says_so(caplog):
    model = adapted("swin").train()
    x = slices(2, D)
    expected = forward(model, x, False)
    medtuning_peft.enable_cuda_graphs(model)
    assert medtuning_peft.cuda_graphs_enabled(model)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            got = forward(model, x, False)
            got.mean().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert sum("apply to CUDA tensors" in r.message for r in caplog.records) == 1  # once, not per call
    medtuning_peft.disable_cuda_graphs(model)
    assert not medtuning_peft.cuda_graphs_enabled(model)


def test_cuda_graphs_with_activation_checkpointing_are_refused():
    model = medtuning_peft.enable_cuda_graphs(adapted("vit").train())
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    with pytest.raises(ValueError, match="cannot be combined with activation checkpointing"):
        forward(model, slices(2, D), False)
    with torch.no_grad():  # no recomputation without autograd: allowed
        forward(model, slices(2, D), False)


def test_enabling_needs_med_adapters_and_valid_limits():
    with pytest.raises(ValueError, match="has no Med-Adapter layers"):
        medtuning_peft.enable_cuda_graphs(build("vit"))
    with pytest.raises(ValueError, match="max_training_sets must be an int >= 1, got 0"):
        medtuning_peft.enable_cuda_graphs(adapted("vit"), max_training_sets=0)


def test_a_copied_model_gets_its_own_graphs():
    model = medtuning_peft.enable_cuda_graphs(adapted("swin"))
    twin = copy.deepcopy(model)
    ours = {id(c.graphs) for c in _contexts(model)}
    theirs = [c.graphs for c in _contexts(twin)]
    assert len(theirs) == 1 and id(theirs[0]) not in ours
    twin_adapters = {id(m) for m in twin.modules() if isinstance(m, MedAdapter)}
    assert {
        id(a) for a in theirs[0].names
    } == twin_adapters  # bound to the copy's adapters, not the original's


def _contexts(model: nn.Module) -> list:
    from medtuning_peft.tuners.med_adapter import MedAdapterLayer

    return list(
        {id(m.context): m.context for m in model.modules() if isinstance(m, MedAdapterLayer)}.values()
    )
