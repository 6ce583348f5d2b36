"""CUDA graphs of the Med-Adapters: each adapter's forward (and backward) issued as one graph launch.

On a GPU the adapters are bound by kernel launches, not by arithmetic (``benchmarks/cost.md``, "GPU": at the
paper's setting an adapter is a few dozen kernels on tensors such as (128, 16, 32, 32), and the host cannot
issue them as fast as the GPU runs them). A CUDA graph records an adapter's kernels once and replays them with
one launch, reading the adapter's parameters and BatchNorm statistics where they live, so it follows the
optimizer's in-place updates.

- Training (``module.training`` and autograd on): the adapters run eagerly in the first pass while their call
  signatures are recorded; at the next training pass (evaluations in between do not count), all adapters of the
  recorded pass are captured together, forward and backward (one memory pool, captured in the order they run, as
  :func:`torch.cuda.make_graphed_callables` does), and replayed from then on.
- Inference (autograd off, e.g. ``torch.inference_mode()``): an adapter's forward is captured with
  :class:`torch.cuda.CUDAGraph` the second time the same signature is seen, and replayed after. Training
  passes release the inference graphs (an evaluation during training captures them again), so their memory
  does not stay reserved while training.

A signature is everything a graph fixes: the shapes, strides, dtypes and ``requires_grad`` of the inputs, the
token grid, the slice count, the autocast state, train/eval mode and which parameters train. A call with a
new signature runs eagerly (and, in training, leads to one more captured set, up to ``max_training_sets``).
Graphs are dropped when an adapter's parameters or buffers move (``model.to(...)``).

What it cannot do, and refuses or avoids:
- two training forwards before one backward, while the first pass's autograd graph is alive: a replay would
  overwrite the activations that the pending backward still needs, so it is refused with an error;
- ``torch.compile`` or an outer CUDA graph capture in progress, or tensors not on CUDA: the adapters run
  eagerly.

With activation checkpointing, the frozen block alone is recomputed in backward (its adapter's activations are in
the graphs' pool anyway, and replaying its forward graph inside its own backward would overwrite them); without
graphs the block and its adapter are checkpointed together.

The outputs are copied out of the graphs' static buffers, so tensors a caller keeps (hidden states) are never
overwritten by a later replay. Capture warm-up runs the adapters on sample inputs; their BatchNorm running
statistics are put back afterwards, so training updates them exactly once per pass, as without graphs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import modules
from .modules import MedAdapter, autocast_enabled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TensorSpec:
    """Shape, memory layout, dtype, device and ``requires_grad`` of one graph input."""

    shape: tuple[int, ...]
    stride: tuple[int, ...] | None  # None: not a dense layout, the sample is contiguous
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> _TensorSpec:
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        return cls(tuple(t.shape), tuple(t.stride()) if dense else None, t.dtype, t.device, t.requires_grad)

    def sample(self) -> torch.Tensor:
        """A tensor of this spec with random values (the static input buffer of a graph)."""
        if self.stride is not None:
            t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        else:
            t = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        # A private generator: capturing must not move the global random stream (dropout masks, crops).
        generator = torch.Generator(self.device).manual_seed(0)
        with torch.no_grad():
            t.normal_(generator=generator)
        return t.requires_grad_(self.requires_grad)

    def laid_out(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the memory layout of :meth:`sample` (a strided view is made contiguous, as its copy would be)."""
        return t if self.stride is not None else t.contiguous()


@dataclass(frozen=True)
class Signature:
    """Everything one captured graph of an adapter fixes (see the module docstring)."""

    x: _TensorSpec
    prev: _TensorSpec | None
    grid: tuple[int, int]
    num_slices: int
    autocast: tuple[bool, torch.dtype]
    training: bool
    grad: bool
    inference_mode: bool
    trainable: tuple[bool, ...]

    @classmethod
    def of(
        cls,
        adapter: MedAdapter,
        x: torch.Tensor,
        grid: tuple[int, int],
        num_slices: int,
        prev: torch.Tensor | None,
    ) -> Signature:
        device = x.device.type
        return cls(
            x=_TensorSpec.of(x),
            prev=None if prev is None else _TensorSpec.of(prev),
            grid=(int(grid[0]), int(grid[1])),
            num_slices=int(num_slices),
            autocast=(autocast_enabled(device), torch.get_autocast_dtype(device)),
            training=adapter.training,
            grad=torch.is_grad_enabled(),
            inference_mode=torch.is_inference_mode_enabled(),
            trainable=tuple(p.requires_grad for p in adapter.parameters()),
        )


class _BoundAdapter(nn.Module):
    """An adapter with its non-tensor arguments and autocast state fixed: ``forward(x[, prev]) -> (out[, A])``.

    The graph APIs take tensors only. Autocast is entered here, without its weight cache (graphs cannot keep
    it), so the captured forward casts as the eager one does; backward is captured with autocast off, as a
    training loop runs it.
    """

    def __init__(self, adapter: MedAdapter, signature: Signature) -> None:
        super().__init__()
        self.adapter = adapter
        self.grid, self.num_slices = signature.grid, signature.num_slices
        self.use_autocast, self.autocast_dtype = signature.autocast
        self.device_type = signature.x.device.type
        # name -> tensor used for that parameter
        self.parameters_in_use: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, *prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = (x, self.grid, self.num_slices, prev[0] if prev else None)
        with torch.autocast(
            self.device_type, dtype=self.autocast_dtype, enabled=self.use_autocast, cache_enabled=False
        ):
            if self.parameters_in_use is None:
                out, a = self.adapter(*args)
            else:
                out, a = torch.func.functional_call(self.adapter, self.parameters_in_use, args)
        return (out,) if a is None else (out, a)


def _eager_as_captured(
    adapter: MedAdapter, signature: Signature, x: torch.Tensor, prev: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An eager call before a capture, in the state the capture will have: autocast without its weight cache,
    and the memory layout of the graphs' static inputs.

    The results are the same as a plain call (the cache only saves re-casting a weight used twice in one autocast
    region, which an adapter does not do), and an adapter compiled with ``torch.compile`` sees one state
    throughout, so it is compiled once for its eager calls and its graphs, not once for each.
    """
    inputs = [signature.x.laid_out(x)] + ([] if prev is None else [signature.prev.laid_out(prev)])
    outputs = _BoundAdapter(adapter, signature)(*inputs)
    return outputs[0], (outputs[1] if len(outputs) > 1 else None)


@contextlib.contextmanager
def _statistics_kept(adapters: list[MedAdapter]) -> Iterator[None]:
    """Put the adapters' buffers (BatchNorm running statistics) back after capture warm-up ran them, or after
    activation checkpointing recomputed them in backward (the forward already updated them once)."""
    buffers = [b for adapter in adapters for b in adapter.buffers()]
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)  # in place: the graphs read these addresses


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Warm-up before a capture (cuDNN's algorithm search, lazy initialization), on a stream of its own."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


def _copied(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, A or None), copied out of a graph's static buffers, which the next replay overwrites."""
    return outputs[0].clone(), (outputs[1].clone() if len(outputs) > 1 else None)


class _Captured:
    """What every captured graph of one adapter keeps: the tensors it reads, and a check that they did not move."""

    def __init__(self, adapter: MedAdapter, signature: Signature) -> None:
        self.adapter = adapter
        self.signature = signature
        self.tensors = [*adapter.parameters(), *adapter.buffers()]
        self.addresses = [t.data_ptr() for t in self.tensors]
        spectral = adapter.spectral
        self.keep_alive: tuple = ()
        if spectral is not None and spectral.uses_matmul(signature.num_slices, signature.x.device):
            # The graph reads the cached inverse-DFT basis: hold it, so the cache cannot free it under the graph.
            dtype = torch.promote_types(adapter.mix.weight.dtype, torch.float32)
            self.keep_alive = modules._inverse_dft_basis(signature.num_slices, dtype, signature.x.device)

    def valid(self) -> bool:
        """Whether the adapter's parameters and buffers are still where the graph reads them."""
        return all(t.data_ptr() == a for t, a in zip(self.tensors, self.addresses, strict=True))


CAPTURE_MODE = "thread_local"
"""Stream capture mode of every graph here. torch's default ("global") invalidates a capture when any other
thread makes an unsafe CUDA call meanwhile, such as a DataLoader's pin-memory thread allocating pinned memory;
"thread_local" only checks the capturing thread. :func:`torch.cuda.make_graphed_callables` captures in the
global mode without a way to change it, which is why training graphs are captured here (the same scheme:
forward graphs in running order, backward graphs in reverse, one memory pool)."""

WARMUP_PASSES = 2
"""Eager forward + backward passes on a side stream before capture (cuDNN algorithm search, lazy init)."""


class _TrainingGraph(_Captured):
    """One adapter of a captured training set: a forward graph and a backward graph behind one autograd node.

    The node's inputs are the adapter's tensor arguments and parameters, so autograd routes gradients as for
    the eager adapter. Gradients of the parameters leave the backward graph as one flat buffer, copied once per
    replay and handed out as views: autograd may keep a returned gradient as ``param.grad``, which must not be
    memory that the next replay overwrites (it would, under gradient accumulation).
    """

    def __init__(self, adapter: MedAdapter, signature: Signature, name: str) -> None:
        super().__init__(adapter, signature)
        self.name = name
        self.bound = _BoundAdapter(adapter, signature)
        self.inputs = [spec.sample() for spec in (signature.x, signature.prev) if spec is not None]
        named = list(adapter.named_parameters())
        self.param_names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.leaves: list[torch.Tensor] = list(self.params)  # replaced before warm-up and capture
        self.forward_graph = torch.cuda.CUDAGraph()
        self.backward_graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.grad_outputs: list[torch.Tensor | None] = []
        self.input_grads: list[torch.Tensor | None] = []
        self.flat_param_grads: torch.Tensor | None = None
        self.param_slices: list[tuple[int, int, torch.Size] | None] = []
        self.pending = False  # a replayed forward whose backward has not run
        self.node: weakref.ref | None = None
        self.peers: list[_TrainingGraph] = [self]  # the graphs captured with this one

    def _differentiable(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outputs = [o for o in self.outputs if o.requires_grad]
        wrt = [t for t in (*self.inputs, *self.leaves) if t.requires_grad]
        return outputs, wrt

    def _fresh_leaves(self) -> None:
        """Differentiate the graphs with respect to new leaves that share the inputs' and parameters' memory.

        A leaf's gradient is delivered through its AccumulateGrad node, which torch (2.11, at least) binds to
        the CUDA stream it was created on, and which lives as long as any autograd graph through that leaf. A
        parameter's node usually comes from the caller's previous training pass (still reachable from its last
        loss, or held by DDP), so it is bound to the default stream; a captured backward that delivers to it
        makes the default stream wait on the capturing one, which invalidates the capture
        (``cudaErrorStreamCaptureImplicit``). New leaves get new nodes, created on the capturing stream. They
        alias the parameters' storage, so the graphs still read the optimizer's in-place updates.
        """
        self.inputs = [t.detach().requires_grad_(t.requires_grad) for t in self.inputs]
        # Parameters, as the originals: an adapter compiled with torch.compile guards on its parameters' type.
        self.leaves = [nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in self.params]
        self.bound.parameters_in_use = dict(zip(self.param_names, self.leaves, strict=True))

    def warm_up(self) -> None:
        self._fresh_leaves()
        for _ in range(WARMUP_PASSES):
            self.outputs = self.bound(*self.inputs)
            outputs, wrt = self._differentiable()
            if outputs and wrt:
                grads = [torch.ones_like(o) for o in outputs]
                torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
        self.outputs = ()

    def capture_forward(self, pool: Any) -> None:
        self._fresh_leaves()  # again: no node made on the warm-up stream can reach the capture
        with torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode=CAPTURE_MODE):
            self.outputs = self.bound(*self.inputs)

    def capture_backward(self, pool: Any) -> None:
        outputs, wrt = self._differentiable()
        self.grad_outputs = [torch.empty_like(o) if o.requires_grad else None for o in self.outputs]
        if not outputs or not wrt:
            self.outputs = tuple(o.detach() for o in self.outputs)
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=CAPTURE_MODE):
            grads = torch.autograd.grad(
                outputs, wrt, [g for g in self.grad_outputs if g is not None], allow_unused=True
            )
            by_tensor = dict(zip(map(id, wrt), grads, strict=True))
            self.input_grads = [by_tensor.get(id(t)) for t in self.inputs]
            param_grads = [by_tensor.get(id(leaf)) for leaf in self.leaves]
            present = [g for g in param_grads if g is not None]
            if present:
                self.flat_param_grads = torch.cat([g.reshape(-1) for g in present])
        self.backward_graph = graph
        offset = 0
        for p, g in zip(self.params, param_grads, strict=True):
            if g is None:
                self.param_slices.append(None)
            else:
                self.param_slices.append((offset, p.numel(), p.shape))
                offset += p.numel()
        self.outputs = tuple(o.detach() for o in self.outputs)  # the capture's autograd graph is spent

    def replay_forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        for static, given in zip(self.inputs, inputs, strict=True):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        self.forward_graph.replay()
        return self.outputs

    def replay_backward(self, grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
        for static, given in zip(self.grad_outputs, grads, strict=True):
            if static is None:
                continue
            if given is None:
                static.zero_()
            elif static.data_ptr() != given.data_ptr():
                static.copy_(given)
        self.backward_graph.replay()
        # Input gradients are consumed within this backward; parameter gradients may outlive it (param.grad).
        result: list[torch.Tensor | None] = [g.detach() if g is not None else None for g in self.input_grads]
        flat = self.flat_param_grads.clone() if self.flat_param_grads is not None else None
        for where in self.param_slices:
            result.append(None if where is None else flat[where[0] : where[0] + where[1]].view(where[2]))
        return result

    def _backward_started(self, grad_outputs: Any) -> None:
        self.pending = False
        # A backward through this pass's graphs is running: when it ends, no graph of the set waits for it. (An
        # adapter whose output does not reach the loss never runs its backward; that is not a pending one.)
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_finished)

    def _backward_finished(self) -> None:
        for peer in self.peers:
            peer.pending = False

    def run(self, x: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pending and self.node is not None and self.node() is not None:
            raise RuntimeError(
                f"The CUDA graph of the Med-Adapter of {self.name} was replayed again before the backward of its "
                "previous training forward ran, while that forward's autograd graph is still alive: the replay "
                "would overwrite the activations that backward needs. With CUDA graphs, run backward after each "
                "training forward (evaluate under torch.no_grad() or in eval mode), or disable them with "
                "`medtuning_peft.disable_cuda_graphs(model)`."
            )
        inputs = (x,) if prev is None else (x, prev)
        outputs = _Replay.apply(self, *inputs, *self.params)
        node = outputs[0].grad_fn
        if node is not None:
            self.pending = True
            self.node = weakref.ref(node)
            node.register_prehook(self._backward_started)
        return _copied(outputs)


class _Replay(torch.autograd.Function):
    """The autograd node of one training graph replay: forward graph now, backward graph in backward."""

    @staticmethod
    def forward(ctx: Any, graph: _TrainingGraph, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.graph = graph
        outputs = graph.replay_forward(inputs[: len(graph.inputs)])
        return tuple(o.detach() for o in outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        graph = ctx.graph
        if graph.backward_graph is None:
            return (None,) * (1 + len(graph.inputs) + len(graph.params))
        return (None, *graph.replay_backward(grads))


def _capture_training_set(graphs: list[_TrainingGraph], device: torch.device) -> None:
    """Capture a pass's adapters: warm-up, forward graphs in running order, backward graphs in reverse.

    All share one memory pool; capturing in the order the graphs replay (forward 1..N, backward N..1) keeps
    each graph's memory from being reused by another while its contents are still needed.
    """
    pool = torch.cuda.graph_pool_handle()
    with _side_stream(device):
        for graph in graphs:
            graph.warm_up()
    torch.cuda.synchronize(device)
    for graph in graphs:
        graph.capture_forward(pool)
    for graph in reversed(graphs):
        graph.capture_backward(pool)


class _InferenceGraph(_Captured):
    """One adapter's forward without autograd, captured with torch.cuda.graph."""

    def __init__(self, adapter: MedAdapter, signature: Signature, pool: Any) -> None:
        super().__init__(adapter, signature)
        bound = _BoundAdapter(adapter, signature)
        self.inputs = [spec.sample() for spec in (signature.x, signature.prev) if spec is not None]
        device = signature.x.device
        with _statistics_kept([adapter]), torch.cuda.device(device):
            with _side_stream(device):
                bound(*self.inputs)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=CAPTURE_MODE):
                self.outputs = bound(*self.inputs)

    def run(self, x: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.inputs[0].copy_(x)
        if prev is not None:
            self.inputs[1].copy_(prev)
        self.graph.replay()
        return _copied(self.outputs)


class AdapterGraphs:
    """The CUDA graphs of one model's Med-Adapters (set on the tuner's forward context).

    Args:
        names: adapter -> a name for messages (its block's module name).
        max_training_sets: captured training sets kept (one per distinct pass signature); passes with other
            shapes beyond that run eagerly.
        max_inference_graphs: inference graphs kept per adapter.
    """

    def __init__(
        self, names: dict[MedAdapter, str], max_training_sets: int = 2, max_inference_graphs: int = 4
    ):
        self.names = names
        self.max_training_sets = max_training_sets
        self.max_inference_graphs = max_inference_graphs
        self.training_sets: list[dict[MedAdapter, _TrainingGraph]] = []
        self.inference: dict[tuple[MedAdapter, Signature], _InferenceGraph] = {}
        self.sightings: collections.Counter = collections.Counter()
        self.recorded: list[tuple[MedAdapter, Signature]] = []  # this pass's training calls that ran eagerly
        self.ready: list[tuple[MedAdapter, Signature]] = []  # the last such pass's, to capture
        self._pools: dict[torch.device, Any] = {}
        self._warned: set[str] = set()

    # -- entry points -----------------------------------------------------------------------------------

    def start_pass(self) -> None:
        """At the start of a backbone forward: the previous pass's eagerly run training calls are ready for capture.

        They are captured at the first training call of a later pass, not here: the next pass may be an
        evaluation (no autograd, perhaps inference mode), in which a training graph cannot be captured.
        """
        if self.recorded:
            self.ready, self.recorded = self.recorded, []

    def __call__(
        self,
        adapter: MedAdapter,
        x: torch.Tensor,
        grid: tuple[int, int],
        num_slices: int,
        prev: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.applies_on(x.device):
            return adapter(x, grid, num_slices, prev)
        signature = Signature.of(adapter, x, grid, num_slices, prev)
        if signature.grad:
            if not signature.training:  # gradients in eval mode (e.g. saliency): nothing worth a graph
                return adapter(x, grid, num_slices, prev)
            if self.inference:
                # Training resumed after an evaluation: give the inference graphs' memory back to training (they
                # are captured again at the next evaluation).
                self.inference.clear()
                self.sightings.clear()
            if self.ready:
                ready, self.ready = self.ready, []
                self._capture_training(ready)
            for graphs in self.training_sets:
                graph = graphs.get(adapter)
                if graph is not None and graph.signature == signature:
                    if graph.valid():
                        return graph.run(x, prev)
                    self.training_sets.remove(graphs)  # the adapter moved: the whole set is stale
                    break
            self.recorded.append((adapter, signature))
            return _eager_as_captured(adapter, signature, x, prev)
        key = (adapter, signature)
        graph = self.inference.get(key)
        if graph is not None and not graph.valid():
            del self.inference[key]
            graph = None
        if graph is None:
            self.sightings[key] += 1
            if self.sightings[key] < 2:
                return _eager_as_captured(adapter, signature, x, prev)
            if sum(1 for a, _ in self.inference if a is adapter) >= self.max_inference_graphs:
                self._warn_once(
                    "inference",
                    f"Med-Adapter CUDA graphs: more than {self.max_inference_graphs} input shapes in inference; "
                    "further shapes run without graphs.",
                )
                return adapter(x, grid, num_slices, prev)
            graph = self.inference[key] = _InferenceGraph(adapter, signature, self._pool(x.device))
        return graph.run(x, prev)

    # -- internals --------------------------------------------------------------------------------------

    def applies_on(self, device: torch.device) -> bool:
        """Whether adapters called now on ``device`` would run as graphs (else eagerly)."""
        if torch.compiler.is_compiling():
            return False  # torch.compile traces the eager adapter (mode="reduce-overhead" graphs it itself)
        if device.type != "cuda":
            self._warn_once(
                "device",
                f"Med-Adapter CUDA graphs apply to CUDA tensors; adapters on {device.type} run eagerly.",
            )
            return False
        return not torch.cuda.is_current_stream_capturing()  # inside an outer capture: part of that graph

    def _pool(self, device: torch.device) -> Any:
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        return self._pools[device]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _capture_training(self, recorded: list[tuple[MedAdapter, Signature]]) -> None:
        adapters = [adapter for adapter, _ in recorded]
        if len({signature.x.device for _, signature in recorded}) > 1:
            self._warn_once(
                "devices",
                "Med-Adapter CUDA graphs: one training pass ran adapters on several devices; such passes run "
                "without graphs.",
            )
            return
        if len(set(adapters)) != len(adapters):
            self._warn_once(
                "repeat",
                "Med-Adapter CUDA graphs: an adapter ran more than once in one training pass; such passes run "
                "without graphs.",
            )
            return
        # Sets whose adapters moved are stale: drop them (their memory pools go with them).
        self.training_sets = [s for s in self.training_sets if all(g.valid() for g in s.values())]
        if len(self.training_sets) >= self.max_training_sets:
            self._warn_once(
                "training",
                f"Med-Adapter CUDA graphs: {self.max_training_sets} training shapes captured; passes with other "
                "shapes run without graphs.",
            )
            return
        graphs = [
            _TrainingGraph(adapter, signature, self.names.get(adapter, "a block"))
            for adapter, signature in recorded
        ]
        device = recorded[0][1].x.device
        # Each bound adapter enters autocast itself (without the weight cache, which graphs cannot keep), and
        # backward is captured with autocast off, as a training loop runs it.
        with (
            _statistics_kept(adapters),
            torch.cuda.device(device),
            torch.autocast(device.type, enabled=False),
        ):
            _capture_training_set(graphs, device)
        for graph in graphs:
            graph.peers = graphs
        self.training_sets.append({graph.adapter: graph for graph in graphs})

    # A copied model (an EMA copy, say) gets its own, empty graphs for its own adapters (deepcopy goes through
    # these): graphs cannot be copied, and these read the original's parameters.
    def __getstate__(self) -> dict[str, Any]:
        return {"names": self.names, "limits": (self.max_training_sets, self.max_inference_graphs)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["names"], *state["limits"])


def _contexts(model: nn.Module) -> dict[int, tuple[Any, dict[MedAdapter, str]]]:
    from .layer import MedAdapterLayer

    found: dict[int, tuple[Any, dict[MedAdapter, str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, MedAdapterLayer):
            _, names = found.setdefault(id(module.context), (module.context, {}))
            for adapter in module.med_adapter.values():
                names[adapter] = name
    return found


def enable_cuda_graphs(
    model: nn.Module, max_training_sets: int = 2, max_inference_graphs: int = 4
) -> nn.Module:
    """Run the Med-Adapters of ``model`` as CUDA graphs (see :mod:`~medtuning_peft.tuners.med_adapter.cuda_graphs`).

    Training passes replay forward and backward graphs from the second pass on; inference passes from the
    second pass with the same shapes. The function and its gradients are unchanged. Call it before or after
    moving the model to the GPU; on other devices the adapters run as before.

    Args:
        model: a model with Med-Adapters (a PeftModel, a VolumetricSegmenter, a tuned backbone).
        max_training_sets: distinct training pass shapes to capture (each holds its activations' memory).
        max_inference_graphs: distinct inference shapes to capture per adapter.

    Returns:
        ``model``.

    Raises:
        ValueError: when ``model`` has no Med-Adapter, or a limit is below 1.
    """
    for field, value in (
        ("max_training_sets", max_training_sets),
        ("max_inference_graphs", max_inference_graphs),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"enable_cuda_graphs: {field} must be an int >= 1, got {value!r}.")
    contexts = _contexts(model)
    if not contexts:
        raise ValueError(
            f"enable_cuda_graphs: {type(model).__name__} has no Med-Adapter layers; wrap the backbone with "
            "peft.get_peft_model(backbone, MedAdapterConfig(...)) first."
        )
    for context, names in contexts.values():
        context.graphs = AdapterGraphs(names, max_training_sets, max_inference_graphs)
    return model


def disable_cuda_graphs(model: nn.Module) -> nn.Module:
    """Run the Med-Adapters of ``model`` eagerly again and free their graphs. Returns ``model``."""
    for context, _ in _contexts(model).values():
        context.graphs = None
    return model


def cuda_graphs_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable_cuda_graphs` is in effect for ``model``'s Med-Adapters."""
    return any(context.graphs is not None for context, _ in _contexts(model).values())
