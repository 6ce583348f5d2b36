"""CUDA graphs of the Med-Adapters (``enable_cuda_graphs``): the same training and inference as eager.

The CUDA tests (``gpu`` marker) compare a graphed model with an eager twin step by step; the CPU tests check the
switch itself: what it refuses, and that off CUDA it changes nothing.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging

import pytest
import torch
from peft import get_peft_model
from tiny_models import build, output_tensor, slices
from torch import nn

import medtuning_peft
from medtuning_peft import MedAdapterConfig, enable_activation_checkpointing
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


def _train(
    model: nn.Module,
    inputs: list[torch.Tensor],
    autocast: bool,
    count_from: int,
    evaluate_after: int | None = None,
    keep_graphs: bool = False,
) -> tuple[list, int]:
    """SGD steps on ``inputs``: the losses, and the adapters' eager calls from step ``count_from`` on; with
    ``evaluate_after``, an inference pass in eval mode after that step; with ``keep_graphs``, every loss tensor
    (and so its pass's autograd graph, parameters' AccumulateGrad nodes included) is kept to the end."""
    # SGD: an update linear in the gradient, so run-to-run rounding stays rounding (Adam can amplify the
    # rounding of near-zero gradients).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses, counter, kept = [], None, []
    for step, x in enumerate(inputs):
        if step == count_from:
            counter = EagerCalls(model)
        optimizer.zero_grad(set_to_none=True)
        loss = forward(model, x, autocast).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if keep_graphs:
            kept.append(loss)
        if step == evaluate_after:
            model.eval()
            with torch.inference_mode():
                forward(model, inputs[-1], autocast)
            model.train()
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
@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graphed_training_with_activation_checkpointing_matches_eager_training(name):
    # The frozen blocks are recomputed in backward, eagerly, between the adapters' backward graph replays.
    inputs = [slices(2, D, seed=s).cuda() for s in range(5)]
    eager = adapted(name).cuda().train()
    graphed = medtuning_peft.enable_cuda_graphs(adapted(name).cuda().train())
    enable_activation_checkpointing(graphed.base_model.model)
    eager_losses, _ = _train(eager, inputs, True, count_from=2)
    graphed_losses, eager_calls = _train(graphed, inputs, True, count_from=2)
    assert eager_calls == 0  # replayed in passes 3-5, and not run again to recompute
    torch.testing.assert_close(graphed_losses, eager_losses, **TOLERANCE[True])
    for (n, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, **TOLERANCE[True], msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_capture_while_earlier_passes_autograd_graphs_are_alive(name):
    # A loop's last loss (or DDP) keeps the previous pass's autograd graph alive during the capture, and with it
    # the parameters' AccumulateGrad nodes, which were created on the default stream. Captured backward graphs
    # must not deliver gradients through them (the capture would fail with cudaErrorStreamCaptureImplicit).
    inputs = [slices(2, D, seed=s).cuda() for s in range(4)]
    eager = adapted(name).cuda().train()
    graphed = medtuning_peft.enable_cuda_graphs(adapted(name).cuda().train())
    eager_losses, _ = _train(eager, inputs, False, count_from=2, keep_graphs=True)
    graphed_losses, eager_calls = _train(graphed, inputs, False, count_from=2, keep_graphs=True)
    assert eager_calls == 0
    torch.testing.assert_close(graphed_losses, eager_losses, **TOLERANCE[False])
    for (n, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, **TOLERANCE[False], msg=n)


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
    _check_kept_outputs(medtuning_peft.enable_cuda_graphs(adapted("swin").cuda().eval()), "cuda")


def _check_kept_outputs(model: nn.Module, device: str) -> None:
    outputs, copies = [], []
    with torch.inference_mode():
        for seed in range(4):  # eager, captured, replayed, replayed
            outputs.append(model(pixel_values=slices(2, D, seed=seed).to(device), output_hidden_states=True))
            copies.append(_flat(outputs[-1].hidden_states).clone())  # as they were right after the pass
    for output, copy_then in zip(outputs, copies, strict=True):
        torch.testing.assert_close(_flat(output.hidden_states), copy_then, rtol=0, atol=0)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


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
    _check_moves_and_shapes("cuda")


def _check_moves_and_shapes(device: str) -> None:
    eager = adapted("swin").to(device).train()
    graphed = medtuning_peft.enable_cuda_graphs(adapted("swin").to(device).train())
    graphs = _graphs_of(graphed)
    inputs = [slices(2, D, seed=0), slices(2, D, seed=1), slices(1, D, seed=2), slices(2, D, seed=0)]
    for step, x in enumerate(inputs):
        if step == 3:  # new parameter addresses: the graphs captured so far must not be replayed
            # The old storage is held while moving: a caching allocator could otherwise hand back the same
            # addresses (where the graphs would rightly stay valid) and the test would not test the move.
            held = [t.data for t in (*graphed.parameters(), *graphed.buffers())]
            graphed.double().float()
            del held
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            forward(model, x.to(device), False).square().mean().backward()
        for (n, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, **TOLERANCE[False], msg=f"step {step}: {n}")
        if step == 1:  # the two-volume pass was captured and replayed
            assert [{g.signature.x.shape[0] for g in s.values()} for s in graphs.training_sets] == [{2 * D}]
    # After the move, the two-volume set is gone; the one-volume pass (step 2) was captured at step 3, with the
    # new addresses; step 3 itself (two volumes, no valid set) ran eagerly.
    assert [{g.signature.x.shape[0] for g in s.values()} for s in graphs.training_sets] == [{D}]
    assert all(g.valid() for s in graphs.training_sets for g in s.values())


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


def test_off_cuda_checkpointing_recomputes_the_adapters_as_without_graphs():
    # Off CUDA the adapters run eagerly, so they are checkpointed with their blocks, as without graphs.
    calls = {}
    for graphs in (False, True):
        model = adapted("swin").train()
        if graphs:
            medtuning_peft.enable_cuda_graphs(model)
        enable_activation_checkpointing(model.base_model.model)
        counter = EagerCalls(model)
        forward(model, slices(2, D), False).mean().backward()
        counter.remove()
        calls[graphs] = counter.count
    adapters = sum(isinstance(m, MedAdapter) for m in model.modules())
    assert calls[True] == calls[False] > adapters  # recomputed in backward


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
    assert len(theirs) == 1 and id(theirs[0]) not in ours and not theirs[0].training_sets
    # Bound to the copy's adapters, not the original's.
    assert {id(a) for a in theirs[0].names} == {id(m) for m in twin.modules() if isinstance(m, MedAdapter)}


def _contexts(model: nn.Module) -> list:
    from medtuning_peft.tuners.med_adapter import MedAdapterLayer

    return list(
        {id(m.context): m.context for m in model.modules() if isinstance(m, MedAdapterLayer)}.values()
    )


# -- The graph bookkeeping on CPU -----------------------------------------------------------------------------
# CUDA graphs cannot run without CUDA. Below, torch's graph API is replaced by a stand-in whose "capture" runs
# the code eagerly and whose "replay" runs the captured function again, writing into the same static buffers
# as a replay would. What runs for real is this package's side: when sets are captured, the autograd node and
# its gradient routing (inputs, flat parameter gradients), BatchNorm statistics kept through warm-up, the
# refusal of a second forward, and the copies that keep outputs and param.grad out of static buffers.


class _StandInGraph:
    def __init__(self) -> None:
        self.replays = 0
        self.rerun = None

    def replay(self) -> None:
        self.replays += 1
        self.rerun()


@pytest.fixture
def stand_in_graphs(monkeypatch):
    from medtuning_peft.tuners.med_adapter import cuda_graphs as cg

    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _StandInGraph)
    monkeypatch.setattr(
        torch.cuda, "graph", lambda graph, pool=None, capture_error_mode=None: contextlib.nullcontext()
    )
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cg.AdapterGraphs, "applies_on", lambda self, device: True)
    capture_forward, capture_backward = cg._TrainingGraph.capture_forward, cg._TrainingGraph.capture_backward

    def forward_rerun(self, pool):
        capture_forward(self, pool)

        def rerun():  # the forward graph, in the grad mode it was captured in
            with torch.enable_grad():
                outputs = self.bound(*self.inputs)
            with torch.no_grad():
                for static, new in zip(self.outputs, outputs, strict=True):
                    static.copy_(new)

        self.forward_graph.rerun = rerun

    def backward_rerun(self, pool):
        capture_backward(self, pool)
        if self.backward_graph is None:
            return

        def rerun():  # the backward graph: gradients of the static inputs into the static gradient buffers
            with cg._statistics_kept([self.adapter]), torch.enable_grad():
                outputs = [o for o in self.bound(*self.inputs) if o.requires_grad]
                wrt = [t for t in (*self.inputs, *self.leaves) if t.requires_grad]
                grads = torch.autograd.grad(
                    outputs, wrt, [g for g in self.grad_outputs if g is not None], allow_unused=True
                )
            by_tensor = dict(zip(map(id, wrt), grads, strict=True))
            for static, t in zip(self.input_grads, self.inputs, strict=True):
                if static is not None:
                    static.copy_(by_tensor[id(t)])
            present = [by_tensor[id(p)] for p in self.leaves if by_tensor.get(id(p)) is not None]
            self.flat_param_grads.copy_(torch.cat([g.reshape(-1) for g in present]))

        self.backward_graph.rerun = rerun

    monkeypatch.setattr(cg._TrainingGraph, "capture_forward", forward_rerun)
    monkeypatch.setattr(cg._TrainingGraph, "capture_backward", backward_rerun)
    inference_init = cg._InferenceGraph.__init__

    def inference_rerun(self, adapter, signature, pool):
        inference_init(self, adapter, signature, pool)
        bound = cg._BoundAdapter(adapter, signature)

        def rerun():
            for static, new in zip(self.outputs, bound(*self.inputs), strict=True):
                static.copy_(new)

        self.graph.rerun = rerun

    monkeypatch.setattr(cg._InferenceGraph, "__init__", inference_rerun)
    return cg


def _graphs_of(model: nn.Module):
    return _contexts(model)[0].graphs


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_bookkeeping_gives_eager_training_and_inference(stand_in_graphs, name, autocast):
    inputs = [slices(2, D, seed=s) for s in range(4)]
    eager = adapted(name).train()
    graphed = medtuning_peft.enable_cuda_graphs(adapted(name).train())
    eager_losses, _ = _train(eager, inputs, autocast, count_from=1)
    graphed_losses, _ = _train(graphed, inputs, autocast, count_from=1)
    graphs = _graphs_of(graphed)
    assert len(graphs.training_sets) == 1  # captured once, at the start of the second pass
    (captured,) = graphs.training_sets
    assert {g.forward_graph.replays for g in captured.values()} == {3}  # passes 2-4, every adapter
    assert {g.backward_graph.replays for g in captured.values()} == {3}
    # Differentiated through new leaves on the parameters' memory (_fresh_leaves).
    for graph in captured.values():
        for leaf, param in zip(graph.leaves, graph.params, strict=True):
            assert leaf is not param and leaf.is_leaf and leaf.data_ptr() == param.data_ptr()
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)  # BatchNorm statistics included
    eager.eval(), graphed.eval()
    with torch.inference_mode():
        expected = [forward(eager, x, autocast) for x in inputs[:3]]
        got = [forward(graphed, x, autocast) for x in inputs[:3]]
    assert {g.graph.replays for g in graphs.inference.values()} == {2}  # captured on the second pass
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    graphed.train()
    forward(graphed, inputs[0], autocast).mean().backward()
    assert not graphs.inference  # training released the inference graphs


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graphs_with_activation_checkpointing_recompute_only_the_frozen_blocks(stand_in_graphs, name):
    # With graphs, the checkpointed unit is the frozen block: its recomputation in backward runs the block again,
    # never the adapter (a forward replay inside its own backward would overwrite what that backward reads).
    from medtuning_peft.tuners.med_adapter import MedAdapterLayer

    inputs = [slices(2, D, seed=s) for s in range(4)]
    eager = adapted(name).train()
    graphed = medtuning_peft.enable_cuda_graphs(adapted(name).train())
    enable_activation_checkpointing(graphed.base_model.model)
    blocks = [m.base_layer for m in graphed.modules() if isinstance(m, MedAdapterLayer)]
    block_calls = collections.Counter()
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: block_calls.update([id(module)]))
    eager_losses, _ = _train(eager, inputs, False, count_from=1)
    graphed_losses, _ = _train(graphed, inputs, False, count_from=1)
    (captured,) = _graphs_of(graphed).training_sets
    assert {g.forward_graph.replays for g in captured.values()} == {
        3
    }  # passes 2-4, once each: no recomputation
    assert {g.backward_graph.replays for g in captured.values()} == {3}
    # Every adapted block runs forward and is recomputed, except the first: nothing before its adapter needs a
    # gradient, so there is no backward through it.
    assert [block_calls[id(b)] for b in blocks] == [len(inputs)] + [2 * len(inputs)] * (len(blocks) - 1)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def compile_adapters(model: nn.Module, backend: str) -> nn.Module:
    """Compile each Med-Adapter module on its own (as benchmarks/step_time.py's ``+compile_adapters``)."""
    for module in model.modules():
        if isinstance(module, MedAdapter):
            module.compile(dynamic=False, backend=backend)
    return model


@pytest.mark.parametrize("name", ["swin", "vit"])
def test_compiled_adapters_run_as_graphs_like_eager(stand_in_graphs, dynamo_reset, name):
    # Fused kernels without their launch cost: each adapter compiled, then graphed. The graphs call the compiled
    # adapter with new leaf tensors in place of its parameters (torch.func.functional_call), so the compiled
    # code must take them as inputs, not as constants, and the parameters' updates must reach it. The eager
    # first pass runs in the capture's state, so capture and replays reuse what it compiled.
    from torch._dynamo.utils import counters

    inputs = [slices(2, D, seed=s) for s in range(4)]
    eager = adapted(name).train()
    graphed = medtuning_peft.enable_cuda_graphs(compile_adapters(adapted(name).train(), "aot_eager"))
    losses, compiled = {}, []
    for model in (eager, graphed):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        losses[model] = []
        for x in inputs:
            optimizer.zero_grad(set_to_none=True)
            loss = forward(model, x, False).square().mean()
            loss.backward()
            optimizer.step()
            losses[model].append(loss.item())
            compiled.append(counters["stats"]["unique_graphs"])
    (captured,) = _graphs_of(graphed).training_sets
    assert {g.forward_graph.replays for g in captured.values()} == {3}
    graphed_compiles = compiled[len(inputs) :]
    assert graphed_compiles[0] > 0  # the adapters did run compiled
    assert set(graphed_compiles) == {graphed_compiles[0]}  # nothing compiled after the first pass
    torch.testing.assert_close(losses[graphed], losses[eager], rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_accumulated_gradients_do_not_alias_graph_buffers(stand_in_graphs):
    # Without gradient zeroing between passes, param.grad must hold the sum: it may not be a static buffer that
    # the next backward replay overwrites.
    eager, graphed = adapted("swin").train(), medtuning_peft.enable_cuda_graphs(adapted("swin").train())
    for model in (eager, graphed):
        forward(model, slices(2, D, seed=0), False).mean().backward()  # the recorded pass
        model.zero_grad(set_to_none=True)
        for seed in (1, 2, 3):
            forward(model, slices(2, D, seed=seed), False).square().mean().backward()
    assert _graphs_of(graphed).training_sets
    for (n, p), q in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_kept_outputs_are_copies_of_the_graph_buffers(stand_in_graphs):
    _check_kept_outputs(medtuning_peft.enable_cuda_graphs(adapted("swin").eval()), "cpu")


def test_graphs_are_dropped_when_parameters_move_and_new_shapes_run_eagerly(stand_in_graphs):
    _check_moves_and_shapes("cpu")


def test_a_replay_before_the_pending_backward_is_refused(stand_in_graphs):
    model = medtuning_peft.enable_cuda_graphs(adapted("vit").train())
    x = slices(2, D)
    forward(model, x, False).mean().backward()
    pending = forward(model, x, False).mean()
    with pytest.raises(RuntimeError, match="before the backward of its previous training forward"):
        forward(model, x, False)
    del pending  # its autograd graph is gone: nothing left to overwrite
    forward(model, x, False).mean().backward()


def test_an_evaluation_between_training_passes_leaves_training_graphs_whole(stand_in_graphs):
    # The training engine validates between steps: the pass after the recorded one may be an evaluation (no
    # autograd). Training graphs must still be captured with their backward, in the next training pass.
    inputs = [slices(2, D, seed=s) for s in range(4)]
    eager, graphed = adapted("swin").train(), medtuning_peft.enable_cuda_graphs(adapted("swin").train())
    eager_losses, _ = _train(eager, inputs, False, count_from=1, evaluate_after=0)
    graphed_losses, _ = _train(graphed, inputs, False, count_from=1, evaluate_after=0)
    (captured,) = _graphs_of(graphed).training_sets
    assert all(g.backward_graph is not None and g.backward_graph.replays == 3 for g in captured.values())
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-5, atol=1e-6)


def test_adapters_whose_output_the_loss_does_not_use_do_not_block_the_next_pass(stand_in_graphs):
    # A decoder that taps early blocks only: the later adapters' backward never runs. That is no pending
    # backward, and the next training pass must replay as usual.
    model = medtuning_peft.enable_cuda_graphs(adapted("vit").train())
    for seed in range(4):
        hidden = model(pixel_values=slices(2, D, seed=seed), output_hidden_states=True).hidden_states
        loss = hidden[2].square().mean()  # the output of block 1: blocks 2-5 do not reach the loss
        loss.backward()
    (captured,) = _graphs_of(model).training_sets
    assert sorted(g.forward_graph.replays for g in captured.values()) == [3] * 6
    assert sorted(g.backward_graph.replays for g in captured.values()) == [0] * 4 + [3] * 2


@pytest.mark.parametrize("backbone", ["tiny-swin", "tiny-vit"])
def test_graphed_segmenter_trains_and_predicts_like_eager(stand_in_graphs, backbone):
    # The whole volumetric segmenter (feature taps, UperNet, cross-entropy, Adam), with inference between steps.
    from medtuning_peft import build_segmenter

    gen = torch.Generator().manual_seed(0)
    volume = torch.randn(1, 1, 4, 32, 32, generator=gen)
    labels = torch.randint(0, 3, (1, 4, 32, 32), generator=gen)
    results = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_segmenter(
            backbone, in_channels=1, num_classes=3, decoder_kwargs={"channels": 8}, num_slices=4
        )
        for module in model.modules():
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
        if graphs:
            medtuning_peft.enable_cuda_graphs(model)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses, predictions = [], []
        for _ in range(4):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(volume), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            model.eval()
            with torch.inference_mode():
                predictions.append(model(volume))
        results[graphs] = losses, predictions
        if graphs:
            assert len(_graphs_of(model).training_sets) == 1 and _graphs_of(model).inference
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[False][1], results[True][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
