"""CUDA graphs of the Med-Adapters: each adapter's forward (and backward) issued as one graph launch.

On a GPU the adapters are bound by kernel launches, not by arithmetic (``benchmarks/cost.md``, "GPU": at the
paper's setting an adapter is a few dozen kernels on tensors such as (128, 16, 32, 32), and the host cannot
issue them as fast as the GPU runs them). A CUDA graph records an adapter's kernels once and replays them with
one launch, reading the adapter's parameters and BatchNorm statistics where they live, so it follows the
optimizer's in-place updates.

- Training (``module.training`` and autograd on): the adapters run eagerly in the first pass while their call
  signatures are recorded; at the start of the next pass, all adapters of the recorded pass are captured
  together, forward and backward, with :func:`torch.cuda.make_graphed_callables` (one memory pool, captured
  in the order they run), and replayed from then on.
- Inference (autograd off, e.g. ``torch.inference_mode()``): an adapter's forward is captured with
  :class:`torch.cuda.CUDAGraph` the second time the same signature is seen, and replayed after.

A signature is everything a graph fixes: the shapes, strides, dtypes and ``requires_grad`` of the inputs, the
token grid, the slice count, the autocast state, train/eval mode and which parameters train. A call with a
new signature runs eagerly (and, in training, leads to one more captured set, up to ``max_training_sets``).
Graphs are dropped when an adapter's parameters or buffers move (``model.to(...)``).

What it cannot do, and refuses or avoids:
- activation checkpointing (the recomputation would replay a graph inside backward): refused;
- two training forwards before one backward, while the first pass's autograd graph is alive: a replay would
  overwrite the activations that the pending backward still needs, so it is refused with an error;
- ``torch.compile`` or an outer CUDA graph capture in progress, or tensors not on CUDA: the adapters run
  eagerly.

The outputs are copied out of the graphs' static buffers, so tensors a caller keeps (hidden states) are never
overwritten by a later replay. Capture warm-up runs the adapters on sample inputs; their BatchNorm running
statistics are put back afterwards, so training updates them exactly once per pass, as without graphs.
"""

from __future__ import annotations

import collections
import contextlib
import copy
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

    def forward(self, x: torch.Tensor, *prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(
            self.device_type, dtype=self.autocast_dtype, enabled=self.use_autocast, cache_enabled=False
        ):
            out, a = self.adapter(x, self.grid, self.num_slices, prev[0] if prev else None)
        return (out,) if a is None else (out, a)


@contextlib.contextmanager
def _statistics_kept(adapters: list[MedAdapter]) -> Iterator[None]:
    """Put the adapters' buffers (BatchNorm running statistics) back after capture warm-up ran them."""
    buffers = [b for adapter in adapters for b in adapter.buffers()]
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)  # in place: the graphs read these addresses


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


class _TrainingGraph(_Captured):
    """One adapter of a captured training set: forward and backward graphs behind one autograd node."""

    def __init__(self, adapter: MedAdapter, signature: Signature, graphed: nn.Module, name: str) -> None:
        super().__init__(adapter, signature)
        self.graphed = graphed
        self.name = name
        self.pending = False  # a replayed forward whose backward has not started
        self.node: weakref.ref | None = None

    def _backward_started(self, grad_outputs: Any) -> None:
        self.pending = False

    def run(self, x: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pending and self.node is not None and self.node() is not None:
            raise RuntimeError(
                f"The CUDA graph of the Med-Adapter of {self.name} was replayed again before the backward of its "
                "previous training forward ran, while that forward's autograd graph is still alive: the replay "
                "would overwrite the activations that backward needs. With CUDA graphs, run backward after each "
                "training forward (evaluate under torch.no_grad() or in eval mode), or disable them with "
                "`medtuning_peft.disable_cuda_graphs(model)`."
            )
        outputs = self.graphed(x) if prev is None else self.graphed(x, prev)
        node = outputs[0].grad_fn
        if node is not None:
            self.pending = True
            self.node = weakref.ref(node)
            node.register_prehook(self._backward_started)
        # Copies out of the static buffers, which the next replay overwrites.
        return outputs[0].clone(), (outputs[1].clone() if len(outputs) > 1 else None)


class _InferenceGraph(_Captured):
    """One adapter's forward without autograd, captured with torch.cuda.graph."""

    def __init__(self, adapter: MedAdapter, signature: Signature, pool: Any) -> None:
        super().__init__(adapter, signature)
        bound = _BoundAdapter(adapter, signature)
        self.inputs = [spec.sample() for spec in (signature.x, signature.prev) if spec is not None]
        device = signature.x.device
        with _statistics_kept([adapter]), torch.cuda.device(device):
            # Warm-up outside the capture (cuDNN algorithm search, lazy initialization), on a side stream.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                bound(*self.inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = bound(*self.inputs)

    def run(self, x: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.inputs[0].copy_(x)
        if prev is not None:
            self.inputs[1].copy_(prev)
        self.graph.replay()
        outputs = self.outputs
        return outputs[0].clone(), (outputs[1].clone() if len(outputs) > 1 else None)


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
        self.recorded: list[tuple[MedAdapter, Signature]] = []
        self._pools: dict[torch.device, Any] = {}
        self._warned: set[str] = set()

    # -- entry points -----------------------------------------------------------------------------------

    def start_pass(self) -> None:
        """At the start of a backbone forward: capture the adapters that the previous training pass ran eagerly."""
        recorded, self.recorded = self.recorded, []
        if recorded:
            self._capture_training(recorded)

    def __call__(
        self,
        adapter: MedAdapter,
        x: torch.Tensor,
        grid: tuple[int, int],
        num_slices: int,
        prev: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._graphable(x):
            return adapter(x, grid, num_slices, prev)
        signature = Signature.of(adapter, x, grid, num_slices, prev)
        if signature.grad:
            if not signature.training:  # gradients in eval mode (e.g. saliency): nothing worth a graph
                return adapter(x, grid, num_slices, prev)
            for graphs in self.training_sets:
                graph = graphs.get(adapter)
                if graph is not None and graph.signature == signature:
                    if graph.valid():
                        return graph.run(x, prev)
                    self.training_sets.remove(graphs)  # the adapter moved: the whole set is stale
                    break
            self.recorded.append((adapter, signature))
            return adapter(x, grid, num_slices, prev)
        key = (adapter, signature)
        graph = self.inference.get(key)
        if graph is not None and not graph.valid():
            del self.inference[key]
            graph = None
        if graph is None:
            self.sightings[key] += 1
            kept = sum(1 for a, _ in self.inference if a is adapter)
            if self.sightings[key] < 2:
                return adapter(x, grid, num_slices, prev)
            if kept >= self.max_inference_graphs:
                self._warn_once(
                    "inference",
                    f"Med-Adapter CUDA graphs: more than {self.max_inference_graphs} input shapes in inference; "
                    "further shapes run without graphs.",
                )
                return adapter(x, grid, num_slices, prev)
            graph = self.inference[key] = _InferenceGraph(adapter, signature, self._pool(x.device))
        return graph.run(x, prev)

    # -- internals --------------------------------------------------------------------------------------

    def _graphable(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():
            return False  # torch.compile traces the eager adapter (mode="reduce-overhead" graphs it itself)
        if x.device.type != "cuda":
            self._warn_once(
                "device",
                f"Med-Adapter CUDA graphs apply to CUDA tensors; adapters on {x.device.type} run eagerly.",
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
        bound = tuple(_BoundAdapter(adapter, signature) for adapter, signature in recorded)
        samples = tuple(
            tuple(spec.sample() for spec in (signature.x, signature.prev) if spec is not None)
            for _, signature in recorded
        )
        device = recorded[0][1].x.device
        # make_graphed_callables refuses autocast's weight cache; each bound adapter enters autocast itself, and
        # backward is captured with autocast off, as a training loop runs it.
        with (
            _statistics_kept(adapters),
            torch.cuda.device(device),
            torch.autocast(device.type, enabled=False),
        ):
            graphed = torch.cuda.make_graphed_callables(bound, samples, allow_unused_input=True)
        self.training_sets.append(
            {
                adapter: _TrainingGraph(adapter, signature, module, self.names.get(adapter, ""))
                for (adapter, signature), module in zip(recorded, graphed, strict=True)
            }
        )

    def __deepcopy__(self, memo: dict) -> AdapterGraphs:
        # A copied model (an EMA copy, say) gets its own, empty graphs for its own adapters: graphs cannot be
        # copied, and these read the original's parameters.
        names = {copy.deepcopy(adapter, memo): name for adapter, name in self.names.items()}
        return AdapterGraphs(names, self.max_training_sets, self.max_inference_graphs)


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
