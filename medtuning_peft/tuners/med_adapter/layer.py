"""The peft tuner layer that wraps one transformer block and runs its Med-Adapter after it."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...backbones import BackboneSpec
from .cuda_graphs import AdapterGraphs, _statistics_kept
from .modules import MedAdapter, autocast_enabled

try:  # transformers 5 records ViT / DINOv2 hidden states with hooks on the block class.
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions record them from the layer outputs
    _active_collector = None


_CLAIM_LOCK = threading.Lock()


def _thread_alive(ident: int) -> bool:
    return any(t.ident == ident and t.is_alive() for t in threading.enumerate())


def concurrent_forward_error(what: str, owner: int | None = None) -> RuntimeError:
    """The error for a forward that starts while another thread's forward of the same model runs."""
    thread, note = "", ""
    if owner is not None:
        thread = f" (thread {owner})"
        note = (
            " A thread whose forward was stopped by KeyboardInterrupt holds the model until it calls the whole "
            "model again or ends."
        )
    return RuntimeError(
        f"{what} is already running a forward in another thread{thread}. One model runs one forward at a time: "
        "it keeps the running forward's state (slice count, inter-stage features, tapped block outputs) on "
        "itself. Give each thread its own copy (`copy.deepcopy(model)`), or serialize the calls with a "
        f"`threading.Lock`.{note}"
    )


@dataclass
class ForwardContext:
    """Per-forward state shared by the adapters of one model (a plain object: peft saves every module).

    Attributes:
        num_slices: D given to the current forward (``num_slices=`` keyword), or None for the config's.
        pixel_hw: (H, W) of the slices the backbone received (grid of ViT-like backbones).
        prev: per adapter name, the A features (B*D, r, h, w) of the last inter-stage adapter.
        graphs: the adapters' CUDA graphs (:func:`~medtuning_peft.enable_cuda_graphs`), or None: eager.
        recomputing: True while activation checkpointing recomputes a block in backward (:meth:`restored`).
        in_root: True while the base model's forward runs (its hooks reset the context when it ends).
        backbone_calls: backbone forwards in progress; the outermost one outside the base model's forward resets
            the context when it ends.
        owner: ``threading.get_ident()`` of the thread whose forward is running (the base model's, or an outermost
            backbone call on its own), None when none is. A forward from another thread is refused
            (:meth:`claim`): it would overwrite this one's slice count and inter-stage features.
    """

    num_slices: int | None = None
    pixel_hw: tuple[int, int] | None = None
    prev: dict[str, torch.Tensor] = field(default_factory=dict)
    graphs: AdapterGraphs | None = None
    recomputing: bool = False
    in_root: bool = False
    backbone_calls: int = 0
    owner: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) runs no forward yet, whatever the original was doing.
        return {**self.__dict__, "owner": None}

    def claim(self, what: str) -> None:
        """Make the calling thread the one whose forward this context serves.

        Not under torch.compile, which cannot trace thread identities (a compiled forward applies its changes to
        the context when it ends).

        Args:
            what: the model, for the error message.

        Raises:
            RuntimeError: when a forward of another thread, still alive, is running.
        """
        with _CLAIM_LOCK:  # two threads starting together: one claims, the other sees its claim
            if self.used_by_other_thread():
                raise concurrent_forward_error(what, self.owner)
            self.owner = threading.get_ident()

    def used_by_other_thread(self) -> bool:
        """Whether a forward of another live thread is running (a dead owner was stopped by KeyboardInterrupt,
        which skips the hooks that end a forward). Always False under torch.compile."""
        if torch.compiler.is_compiling():
            return False
        owner = self.owner
        return owner is not None and owner != threading.get_ident() and _thread_alive(owner)

    def start_backbone(self, pixel_values: Any) -> None:
        self.prev.clear()
        if self.graphs is not None:
            self.graphs.start_pass()
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4:
            self.pixel_hw = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))

    def end(self) -> None:
        self.num_slices = None
        self.prev.clear()

    def snapshot(self) -> tuple:
        return self.num_slices, self.pixel_hw, dict(self.prev)

    @contextlib.contextmanager
    def restored(self, snapshot: tuple) -> Iterator[None]:
        """Run a block with the context of a past forward (activation checkpointing recomputes blocks
        during backward, when the live context belongs to a later forward or to none)."""
        saved = self.snapshot()
        self.num_slices, self.pixel_hw, prev = snapshot
        self.prev = dict(prev)
        self.recomputing = True
        try:
            yield
        finally:
            self.num_slices, self.pixel_hw, self.prev = saved[0], saved[1], saved[2]
            self.recomputing = False


class ContextReplayingCheckpoint:
    """A transformers ``_gradient_checkpointing_func`` whose recomputation replays the context of its forward.

    An object rather than a closure, so that a deep copy of the model replays the copy's context and the model
    can be pickled.

    Args:
        context: the adapters' per-forward context.
        original: transformers' checkpoint function (``functools.partial(checkpoint, **kwargs)``).

    Raises:
        ValueError: when called for reentrant checkpointing, which loses the inter-stage gradients, or with a
            ``context_fn`` of its own.
    """

    def __init__(self, context: ForwardContext, original: Callable) -> None:
        self.context = context
        self.med_adapter_original = original

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        original = self.med_adapter_original
        keywords = getattr(original, "keywords", None) or {}
        if keywords.get("use_reentrant", False):
            raise ValueError(
                "Med-Adapter does not support reentrant gradient checkpointing (use_reentrant=True): gradients that "
                "flow through the inter-stage features would be lost. Enable it with "
                "`medtuning_peft.enable_activation_checkpointing(model)`."
            )
        if "context_fn" in kwargs:
            raise ValueError("Med-Adapter sets the checkpoint `context_fn` itself; do not pass one.")
        if torch.compiler.is_compiling():
            # Traced: the compiler recomputes from the traced graph, in which the context's values are constants
            # and graph inputs (it runs no context_fn); the unit is then the frozen block alone (`forward`).
            return original(function, *args, **kwargs)
        context = self.context
        snapshot = context.snapshot()
        return original(
            function,
            *args,
            context_fn=lambda: (contextlib.nullcontext(), context.restored(snapshot)),
            **kwargs,
        )


@dataclass(frozen=True)
class BlockPlan:
    """Static facts about one adapted block, fixed when the adapter is created."""

    spec: BackboneSpec
    hidden_size: int
    num_slices: int
    prev_channels: int | None  # r_prev for an inter-stage adapter, else None
    patch_size: Any = None  # for backbones whose grid follows from the pixel size


class MedAdapterLayer(nn.Module, BaseTunerLayer):
    """Wraps one transformer block: ``block(*args) -> Med-Adapter(block output)``.

    Prefix tokens (CLS, registers) pass through unchanged; the last h*w tokens are the grid.

    Args:
        base_layer: the frozen block.
        adapter_name: name of the first adapter.
        plan: static facts of this block.
        context: the tuner's per-forward context (shared by every layer of the model).
        config: the adapter's MedAdapterConfig.
    """

    adapter_layer_names = ("med_adapter",)
    other_param_names = ()

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, plan: BlockPlan, context: ForwardContext, config
    ):
        super().__init__()
        self.base_layer = base_layer
        self.med_adapter = nn.ModuleDict()
        self.plans: dict[str, BlockPlan] = {}
        self.context = context
        self._active_adapter = adapter_name
        self._disable_adapters = False
        # Set by the tuner before each backbone forward: the (context-replaying) checkpoint function when this
        # adapted block is a unit of activation checkpointing, else None (MedAdapterModel._plan_checkpointing).
        self.checkpoint_func: Callable | None = None
        self.merged_adapters = []
        # The wrapper takes the block's mode (the block's submodules keep theirs).
        self.training = self.med_adapter.training = base_layer.training
        self.update_layer(adapter_name, plan, config)

    def update_layer(self, adapter_name: str, plan: BlockPlan, config) -> None:
        """Add the adapter ``adapter_name`` to this block."""
        self.plans[adapter_name] = plan
        self.med_adapter[adapter_name] = MedAdapter(
            hidden_size=plan.hidden_size,
            reduction_ratio=config.reduction_ratio,
            kernel_sizes=tuple(config.kernel_sizes),
            use_fft=config.use_fft,
            num_slices=config.num_slices,
            prev_channels=plan.prev_channels,
            prev_spatial=plan.spec.hierarchical,
            init_identity=config.init_identity,
        )
        # A new adapter takes the mode of the block it adapts, so that one added to a model in eval mode (as
        # `from_pretrained` returns it) does not run its BatchNorm on batch statistics, mixing volumes.
        self.med_adapter[adapter_name].train(self.base_layer.training)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        # Blocks have no `weight`: take the device from the block's first parameter that is not on meta.
        # Adapters of a float32 / float64 block take its dtype, also when `low_cpu_mem_usage=True` loading assigned
        # the file's tensors (saved in bf16, say), as peft does for LoRA. On a bf16 / fp16 block they keep theirs:
        # float32 when created, and MedAdapterModel._cast_adapter_dtype decides after loading.
        if adapter_name not in self.med_adapter:
            return
        adapter = self.med_adapter[adapter_name]
        if any(p.device.type == "meta" for p in adapter.parameters()):
            return
        ref = next((p for p in self.base_layer.parameters() if p.device.type != "meta"), None)
        if ref is None and device is None:
            return
        target = device if device is not None else ref.device
        dtype = ref.dtype if ref is not None and ref.dtype in (torch.float32, torch.float64) else None
        adapter.to(device=target, dtype=dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.plans.pop(adapter_name, None)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "Med-Adapter cannot be merged into the base weights: it is a separate residual branch (convolutions "
            "across slices and a spectral filter), not a weight delta. Keep the PeftModel, or use `unload()` to "
            "get the original model back."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("Med-Adapter is never merged, so there is nothing to unmerge.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.checkpoint_func is not None and self.training and torch.is_grad_enabled():
            if self._runs_as_graphs() or torch.compiler.is_compiling():
                # With CUDA graphs the frozen block alone is the checkpointed unit: the adapter's activations live
                # in the graphs' memory pool whether it is checkpointed or not, and recomputing it would replay
                # its forward graph inside its own backward. Under torch.compile too: the compiler's
                # recomputation would replay the adapter's BatchNorm updates (a second update per step), which
                # only an eager recomputation can put back (`_statistics_kept` in `_adapt`).
                unit = functools.partial(self._unit, self.base_layer, **kwargs)
                # A frozen block that nothing before it makes differentiable (the first one) keeps no activations
                # to recompute; the compiler refuses a checkpoint with random operations (stochastic depth) in a
                # region without gradients.
                needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or any(
                    p.requires_grad for p in self.base_layer.parameters()
                )
                out = self.checkpoint_func(unit, *args) if needs_grad else unit(*args)
                return self._adapt_output(out, args, kwargs)
            # Non-reentrant checkpoint of the block and its adapter together: one recomputation in backward.
            return self.checkpoint_func(functools.partial(self._unit, self._adapted_block, **kwargs), *args)
        return self._adapted_block(*args, **kwargs)

    def _runs_as_graphs(self) -> bool:
        """Whether this block's adapter will run as CUDA graphs (enabled, on CUDA, an adapter active)."""
        graphs = self.context.graphs
        if graphs is None or self.disable_adapters:
            return False
        active = self._active_names()
        return bool(active) and graphs.applies_on(self.med_adapter[active[0]].down.weight.device)

    def _active_names(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.med_adapter]

    def _unit(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        # This call is the checkpointed unit, in forward and in its recomputation: the block must not checkpoint
        # itself inside it, which would recompute it a second time.
        base = self.base_layer
        if not getattr(base, "gradient_checkpointing", False):
            return function(*args, **kwargs)
        base.gradient_checkpointing = False
        try:
            return function(*args, **kwargs)
        finally:
            base.gradient_checkpointing = True

    def _adapted_block(self, *args: Any, **kwargs: Any) -> Any:
        return self._adapt_output(self.base_layer(*args, **kwargs), args, kwargs)

    def _adapt_output(self, out: Any, args: tuple, kwargs: dict) -> Any:
        """The block's output ``out`` (a tensor or a tuple led by the hidden states) with the adapter applied."""
        if self.disable_adapters:
            return out
        active = self._active_names()
        if not active:
            return out
        if len(active) > 1:
            raise ValueError(
                f"Med-Adapter runs one adapter at a time, but {active} are active; call "
                "`model.set_adapter(name)` with a single name."
            )
        hidden = out[0] if isinstance(out, tuple) else out
        adapted = self._adapt(hidden, args, kwargs, active[0])
        self._replace_recorded_hidden_state(hidden, adapted)
        return (adapted, *out[1:]) if isinstance(out, tuple) else adapted

    def _adapt(self, hidden: torch.Tensor, args: tuple, kwargs: dict, name: str) -> torch.Tensor:
        adapter, plan, ctx = self.med_adapter[name], self.plans[name], self.context
        h, w = plan.spec.grid(args, kwargs, ctx.pixel_hw, plan.patch_size)
        num_slices = ctx.num_slices or plan.num_slices
        n, num_tokens, _ = hidden.shape
        if n % num_slices:
            raise ValueError(
                f"The slice batch has {n} slices, which is not a whole number of volumes of num_slices="
                f"{num_slices} slices. Pass the slices volume-major as (B*D, C, H, W) and call the model with "
                "`num_slices=D` (or set MedAdapterConfig.num_slices)."
            )
        prefix = num_tokens - h * w
        if prefix < 0:
            raise ValueError(
                f"{type(self.base_layer).__name__} returned {num_tokens} tokens, fewer than its {h}x{w} token grid."
            )
        prev = ctx.prev.get(name) if adapter.is_inter_stage else None
        # One split (its backward is one concatenation), and none without prefix tokens: slicing would add a
        # zero-fill and a copy per slice to the backward.
        head, grid_tokens = hidden.split([prefix, h * w], dim=1) if prefix else (None, hidden)
        if not autocast_enabled(grid_tokens.device.type):
            # A bf16/fp16 block without autocast: its tokens meet the float32 adapter in the adapter's dtype.
            # Under autocast the down-projection takes them as they are (a bf16 residual stream, as in Swin
            # after the first stage, is not cast up and back down).
            grid_tokens = grid_tokens.to(adapter.down.weight.dtype)
        # A recomputation in backward (activation checkpointing) runs the adapter's BatchNorm again in training mode;
        # its running statistics and batch count are put back, so they are updated once per step.
        with _statistics_kept([adapter]) if ctx.recomputing else contextlib.nullcontext():
            if ctx.graphs is not None:
                out, a = ctx.graphs(adapter, grid_tokens, (h, w), num_slices, prev)
            else:
                out, a = adapter(grid_tokens, (h, w), num_slices, prev)
        if a is not None:
            ctx.prev[name] = a
        out = out.to(hidden.dtype)
        if prefix:
            out = torch.cat([head, out], dim=1)  # prefix tokens bypass the adapter
        return out

    @staticmethod
    def _replace_recorded_hidden_state(old: torch.Tensor, new: torch.Tensor) -> None:
        # transformers 5 records `output_hidden_states` of ViT / DINOv2 with a forward hook on the inner block
        # class, i.e. before the adapter: swap the recorded tensor for the adapted one.
        if _active_collector is None:
            return
        collected = _active_collector.get()
        if not collected or "hidden_states" not in collected:
            return
        states = collected["hidden_states"]
        if states and states[-1] is old:
            states[-1] = new

    def __repr__(self) -> str:
        return "med_adapter." + super().__repr__()


def has_med_adapter(module: nn.Module) -> bool:
    """Whether ``module`` (or any submodule) carries Med-Adapters, i.e. its forward takes ``num_slices=``."""
    return any(isinstance(m, MedAdapterLayer) for m in module.modules())
