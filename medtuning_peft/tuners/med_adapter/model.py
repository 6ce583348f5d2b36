"""The peft ``BaseTuner`` for Med-Adapter: finds the blocks, plans the stages, wraps the blocks."""

from __future__ import annotations

import contextlib
import inspect
import re
import reprlib
import threading
from collections.abc import Callable, Iterator

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from ...backbones import (
    BACKBONE_SPECS,
    BackboneSpec,
    find_spec,
    hidden_size_of_block,
    owning_backbone,
    spec_for_block,
    supported_model_types,
)
from .config import MedAdapterConfig
from .layer import BlockPlan, ContextReplayingCheckpoint, ForwardContext, MedAdapterLayer
from .modules import MedAdapter


class MedAdapterModel(BaseTuner):
    """Med-Adapter (Med-Tuning, Shen, Wang et al., MIDL 2024) as a peft tuner.

    Created by ``peft.get_peft_model(model, MedAdapterConfig(...))`` once ``medtuning_peft`` is imported.
    The model sees slices ``(B*D, C, H, W)``, volume-major; the slice count D is ``num_slices=`` on the
    forward call, else ``MedAdapterConfig.num_slices``.

    A forward pre-hook on the base model (and on the transformers backbone inside it, when the two
    differ) reads the ``num_slices`` keyword and resets the per-forward context that carries the
    inter-stage features from stage to stage. The keyword is removed, except for a base model whose
    ``forward`` takes ``num_slices`` itself (your own module, which hands it on). The context is reset
    again when the base model's forward ends, and when a backbone called on its own returns.

    Example:
        >>> import medtuning_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(swin, medtuning_peft.MedAdapterConfig(num_slices=64))
        >>> out = model(pixel_values=slices, num_slices=64)
    """

    prefix: str = "med_adapter"
    tuner_layer_cls = MedAdapterLayer
    target_module_mapping = {model_type: spec.target_regex for model_type, spec in BACKBONE_SPECS.items()}
    # The layers share the per-forward context and the hooks live on this tuner: direct injection with
    # `inject_adapter_in_model` would lose both.
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: MedAdapterConfig, adapter_name: str) -> None:
        if "_context" not in self.__dict__:
            self._check_checkpointing_comes_after(model)
            self._context = ForwardContext()
            self._plans: dict[str, dict[str, BlockPlan]] = {}
            self._pending_plans: dict[str, BlockPlan] = {}
            self._hook_handles: list = []
            self._suspended_checkpointing: list[nn.Module] = []
            self._checkpointing_layers: list[MedAdapterLayer] = []

    @staticmethod
    def _check_checkpointing_comes_after(model: nn.Module) -> None:
        """Refuse a Swin backbone whose activation checkpointing is already on when the PeftModel is built.

        peft then calls transformers' ``enable_input_require_grads``, whose hook on the input embeddings expects a
        tensor; Swin's patch embeddings return a tuple, and the first forward would fail deep inside transformers.
        Enabled after ``get_peft_model``, checkpointing needs no such hook (the adapters are trainable).
        """
        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        if checkpointing and find_spec(model).model_type == "swin":
            raise ValueError(
                f"Activation checkpointing is already on in this {type(model).__name__}. Enable it after "
                "get_peft_model / PeftModel.from_pretrained instead: "
                "`medtuning_peft.enable_activation_checkpointing(peft_model)`. Enabled before, peft registers "
                "transformers' enable_input_require_grads hook, which fails on Swin's patch embeddings (they "
                "return a tuple)."
            )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Checked here, where the name is known (get_peft_model, add_adapter, load_adapter, from_pretrained):
        # peft's `_check_new_adapter_config` gets the config alone, and one config object may serve several adapters.
        self._check_adapter_name(model, adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    @staticmethod
    def _check_adapter_name(model: nn.Module, adapter_name: str) -> None:
        """Refuse an adapter name that is also a part of a weight's name in the model or in any adapter.

        peft's ``save_pretrained`` leaves out of one adapter's file every weight whose name contains another
        adapter's name as a part: a second adapter named ``up`` would silently drop the first one's ``up.weight``.
        Any adapter: the parts a config leaves out (``spectral`` without ``use_fft``) are in another adapter's.
        """
        # Every part an adapter can have: both branch kinds, the spectral filter, Inter-FI. On the meta device and
        # with the random state restored: the check must not draw from the generator that initializes the adapters
        # and the decoder (seeded runs would change).
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            probe = MedAdapter(8, 2, (3,), True, 2, prev_channels=4)
        # One branch per kernel size: with enough sizes, any index is a part of a branch's weight names.
        index = adapter_name if adapter_name.isdecimal() and str(int(adapter_name)) == adapter_name else "0"
        keys = [key.replace("branches.0.", f"branches.{index}.", 1) for key in probe.state_dict()]
        names = [f"{MedAdapterModel.prefix}.<adapter>.{key}" for key in keys]
        names += [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
        clash = next((name for name in names if adapter_name in name.split(".")), None)
        if clash is not None:
            raise ValueError(
                f"Adapter name {adapter_name!r} is also a part of the weight name {clash!r}. peft's save_pretrained "
                "leaves out of an adapter's file every weight whose name contains another adapter's name, so "
                "adapters saved from this model would silently lose weights. Choose another adapter name."
            )

    def _prepare_adapter_config(self, peft_config: MedAdapterConfig, model_config: dict) -> MedAdapterConfig:
        # Targets are found from the module tree in `_prepare_model`, which sees the model: a backbone may
        # sit inside a task model (UperNet, a volumetric segmenter) whose own model_type says nothing.
        return peft_config

    def _prepare_model(self, peft_config: MedAdapterConfig, model: nn.Module) -> None:
        if peft_config.target_modules is None:
            peft_config.target_modules = find_spec(model).target_regex
        blocks = self._targeted_blocks(peft_config, model)
        self._check_signature(peft_config, model, blocks)
        inter = self._inter_stage_blocks(peft_config, blocks)
        plans: dict[str, BlockPlan] = {}
        prev_r: int | None = None
        for name, (spec, _stage, _index, module) in blocks.items():
            hidden = hidden_size_of_block(module)
            r = hidden // peft_config.reduction_ratio
            prev_channels = None
            if name in inter:
                # The first inter-stage adapter fuses zeros: (r/2, 2h, 2w) on hierarchical backbones, as the
                # reference; (r, h, w) on plain ones.
                prev_channels = prev_r if prev_r is not None else (max(1, r // 2) if spec.hierarchical else r)
                prev_r = r
            patch_size = None
            if not spec.hierarchical:
                patch_size = owning_backbone(model, name)[1].config.patch_size
            plans[name] = BlockPlan(spec, hidden, peft_config.num_slices, prev_channels, patch_size)
        # inject_adapter calls _create_and_replace for this adapter right after this method.
        self._pending_plans = plans

    @staticmethod
    def _targeted_blocks(
        peft_config: MedAdapterConfig, model: nn.Module
    ) -> dict[str, tuple[BackboneSpec, int, int, nn.Module]]:
        blocks = {}
        for name, module in model.named_modules():
            if not name or name.endswith(".base_layer") or f".{MedAdapterModel.prefix}." in f".{name}.":
                continue
            if not check_target_module_exists(peft_config, name):
                continue
            spec = spec_for_block(module)
            indices = spec.parse(name) if spec is not None else None
            if indices is None:
                if peft_config.backbone_signature is not None:
                    # A saved adapter whose block names match other modules here: another backbone (a ViT's
                    # `layers.N` are a Swin's stages).
                    raise ValueError(
                        MedAdapterModel._other_backbone_message(
                            peft_config.backbone_signature,
                            f"{type(model).__name__}'s {name!r} is a {type(module).__name__}, not one of its blocks",
                        )
                    )
                known = sorted(s.block_class for s in BACKBONE_SPECS.values())
                raise ValueError(
                    f"MedAdapterConfig.target_modules matched {name!r}, a {type(module).__name__}, which is not a "
                    f"transformer block Med-Adapter knows ({known}). Target whole blocks, or leave "
                    "target_modules=None to adapt every block of a supported backbone."
                )
            blocks[name] = (spec, *indices, module)
        if not blocks:
            saved = peft_config.backbone_signature
            if saved is not None:
                raise ValueError(
                    MedAdapterModel._other_backbone_message(saved, f"{type(model).__name__} has none of them")
                )
            excluded = ""
            if peft_config.exclude_modules:
                excluded = f" once exclude_modules={peft_config.exclude_modules!r} is taken out"
            raise ValueError(
                f"MedAdapterConfig.target_modules={peft_config.target_modules!r} matched no transformer block of "
                f"{type(model).__name__}{excluded}. Supported backbones: {supported_model_types()}."
            )
        return blocks

    @staticmethod
    def _other_backbone_message(saved: dict, model_side: str) -> str:
        return (
            f"This Med-Adapter was trained on a different backbone than the one it is being loaded into "
            f"(model_type: adapter {saved.get('model_type')!r}, {len(saved.get('block_widths', {}))} adapted "
            f"blocks; {model_side}). Load it into the backbone it was trained on. A MedAdapterConfig records the "
            "backbone it is first used with: to adapt another backbone, pass a new MedAdapterConfig."
        )

    @staticmethod
    def _check_signature(peft_config: MedAdapterConfig, model: nn.Module, blocks: dict) -> None:
        first = next(iter(blocks))
        backbone = owning_backbone(model, first)[1]
        signature = {
            "model_type": blocks[first][0].model_type,
            "num_channels": getattr(backbone.config, "num_channels", None),
            "block_widths": {name: hidden_size_of_block(module) for name, (*_, module) in blocks.items()},
        }
        saved = peft_config.backbone_signature
        if saved is None:
            peft_config.backbone_signature = signature
            return
        if saved != signature:
            diffs = [
                f"{key}: adapter {saved.get(key)!r} vs model {signature[key]!r}"
                for key in signature
                if key != "block_widths" and saved.get(key) != signature[key]
            ]
            widths, theirs = saved.get("block_widths", {}), signature["block_widths"]
            if widths != theirs:
                diffs.append(
                    f"adapted blocks: adapter has {len(widths)} (widths {sorted(set(widths.values()))}), model has "
                    f"{len(theirs)} (widths {sorted(set(theirs.values()))})"
                )
            raise ValueError(
                "This Med-Adapter was trained on a different backbone than the one it is being loaded into ("
                + "; ".join(diffs)
                + "). Load it into the backbone it was trained on (same architecture, "
                "widths, depth and input channels). A MedAdapterConfig records the backbone it is first used "
                "with (get_peft_model fills in target_modules, inter_stage_modules and backbone_signature): to "
                "adapt another backbone, pass a new MedAdapterConfig."
            )

    @staticmethod
    def _inter_stage_blocks(peft_config: MedAdapterConfig, blocks: dict) -> set[str]:
        if not peft_config.inter_stage:
            return set()
        selected = peft_config.inter_stage_modules
        if selected is None:
            chosen = []
            names = list(blocks)
            for i, name in enumerate(names):
                spec, stage, index, _ = blocks[name]
                if spec.hierarchical:
                    last_of_stage = i + 1 == len(names) or blocks[names[i + 1]][1] != stage
                    if last_of_stage:
                        chosen.append(name)
                elif (index + 1) % spec.inter_stage_every == 0:
                    chosen.append(name)
            peft_config.inter_stage_modules = chosen
            return set(chosen)
        if isinstance(selected, str):
            chosen = {name for name in blocks if re.fullmatch(selected, name)}
        else:
            chosen = {name for name in blocks if any(name == s or name.endswith("." + s) for s in selected)}
        if not chosen:
            raise ValueError(
                f"MedAdapterConfig.inter_stage_modules={selected!r} matched none of the adapted blocks; pick "
                f"names among {list(blocks)[:4]}..., or leave it None for the per-backbone default."
            )
        return chosen

    def _create_and_replace(
        self,
        peft_config: MedAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        plan = self._pending_plans[current_key]
        self._plans.setdefault(adapter_name, {})[current_key] = plan
        if isinstance(target, MedAdapterLayer):
            target.update_layer(adapter_name, plan, peft_config)
            return
        new_module = MedAdapterLayer(target, adapter_name, plan, self._context, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
    ) -> None:
        # peft's default copies `child.weight`; transformer blocks have none. Device placement of a new
        # adapter happens in MedAdapterLayer.update_layer.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: MedAdapterConfig, adapter_name: str) -> None:
        if self._hook_handles:
            return
        backbones = {}
        for plans in self._plans.values():
            for name in plans:
                owner_name, owner = owning_backbone(model, name)
                backbones[owner_name] = owner
        # The hooks are bound methods, not closures: a deep copy of the model (e.g. `AveragedModel` for an EMA)
        # gets hooks bound to the copied tuner and its context, and the model can be pickled.
        # Your own module may take `num_slices` to hand it on; a transformers model takes no such argument.
        self._root_takes_num_slices = "num_slices" in inspect.signature(model.forward).parameters
        handles = [model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True, prepend=True)]
        for owner in backbones.values():
            # Appended, so that on a bare backbone (owner is model) it runs after _root_pre_hook.
            handles.append(owner.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True))
            handles.append(
                owner.register_forward_hook(self._backbone_post_hook, with_kwargs=True, always_call=True)
            )
        handles.append(model.register_forward_hook(self._root_post_hook, with_kwargs=True, always_call=True))
        self._hook_handles = handles

    def _pop_num_slices(self, kwargs: dict, keep: bool = False) -> None:
        num_slices = kwargs.get("num_slices") if keep else kwargs.pop("num_slices", None)
        if num_slices is not None:
            if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
                raise ValueError(f"num_slices must be a positive int (slices per volume), got {num_slices!r}")
            self._context.num_slices = num_slices

    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if getattr(module, "_is_replica", False):
            raise RuntimeError(
                "Med-Adapter does not support torch.nn.DataParallel: its replicas would share one forward "
                "context across threads, and it splits the slice batch without regard to volumes. Use "
                "DistributedDataParallel (e.g. `accelerate launch --multi_gpu`), sharding by volume."
            )
        context = self._context
        if not torch.compiler.is_compiling():
            context.claim(type(module).__name__)  # before any change: another thread's forward may be running
        context.end()
        # No backbone call is in progress when the root's forward starts: clear a count left by a call whose
        # post-hooks did not run (torch skips them on a KeyboardInterrupt).
        context.in_root, context.backbone_calls = True, 0
        self._pop_num_slices(kwargs, keep=self._root_takes_num_slices)
        return args, kwargs

    def _backbone_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        context = self._context
        if not torch.compiler.is_compiling() and context.owner != threading.get_ident():
            # A backbone called on its own (inside the root's forward, this thread owns the context already).
            context.claim(type(module).__name__)
            # No forward was running: what an interrupted one (KeyboardInterrupt) left behind does not count.
            context.in_root, context.backbone_calls = False, 0
        context.backbone_calls += 1  # first: the post-hook runs even when this one raises
        if module is not self.model:  # on a bare backbone, _root_pre_hook has read it
            self._pop_num_slices(kwargs)
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        _check_swin_windows(module, pixel_values, kwargs)
        self._context.start_backbone(pixel_values)
        self._plan_checkpointing(module)
        return args, kwargs

    def _backbone_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        context = self._context
        if context.used_by_other_thread():  # this call was refused: leave the running forward's state alone
            return
        self._restore_suspended_checkpointing()
        context.backbone_calls = max(context.backbone_calls - 1, 0)
        if not context.backbone_calls and not context.in_root:
            # A backbone called on its own (feature extraction, probing inside a larger model): no root hook
            # resets its num_slices and inter-stage features.
            context.end()
            context.owner = None

    def _root_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        context = self._context
        if context.used_by_other_thread():  # this call was refused: leave the running forward's state alone
            return
        context.end()
        context.in_root, context.owner = False, None

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Adapters are created in float32 (float64 on a float64 model) whatever their block's dtype, which is what
        # peft's default, autocast_adapter_dtype=True, asks for; an adapter loaded with `low_cpu_mem_usage=True` has
        # the dtype of the file's tensors, and a bf16 / fp16 one is upcast here, as peft does for LoRA. With False,
        # peft's methods keep the dtype of the layer they adapt: a bf16 / fp16 block gets an adapter in its dtype.
        for module in self.model.modules():
            if not isinstance(module, MedAdapterLayer) or adapter_name not in module.med_adapter:
                continue
            adapter = module.med_adapter[adapter_name]
            if autocast_adapter_dtype:
                if any(
                    t.dtype in (torch.float16, torch.bfloat16)
                    for t in (*adapter.parameters(), *adapter.buffers())
                ):
                    adapter.to(torch.float32)
                continue
            ref = next((p for p in module.base_layer.parameters() if p.is_floating_point()), None)
            if ref is not None and ref.dtype in (torch.float16, torch.bfloat16):
                adapter.to(ref.dtype)

    def _plan_checkpointing(self, backbone: nn.Module) -> None:
        """Make each adapted block (frozen block + its adapter) the unit of activation checkpointing.

        transformers checkpoints the modules whose ``gradient_checkpointing`` flag is on: blocks, and for Swin
        also the stages around them, so a Swin block would be recomputed twice in backward (once in its stage's
        recomputation, once in its own) and every adapter once. Instead, an adapted block is checkpointed as a
        whole, recomputed once, when its block or any container of it has checkpointing on; those containers'
        flags are off for the duration of this forward (restored by the backbone's forward hook, also on
        error) and the block's own flag while it runs inside the adapted block.
        """
        self._restore_suspended_checkpointing()
        modules = list(backbone.named_modules())  # one traversal per forward when checkpointing is off
        if not self._wrap_checkpoint_functions(modules):
            return
        adapted = {name: m for name, m in modules if isinstance(m, MedAdapterLayer)}
        if not adapted:
            return
        containers = {name.rsplit(".", i)[0] for name in adapted for i in range(1, name.count(".") + 1)}
        containers.add("")
        funcs: dict[str, Callable | None] = {}
        for name, module in modules:  # parents come before their children
            if name in adapted:
                continue
            parent = funcs.get(name.rpartition(".")[0]) if name else None
            if name in containers and getattr(module, "gradient_checkpointing", False):
                fn = module.__dict__.get("_gradient_checkpointing_func")
                if fn is not None:
                    self._suspended_checkpointing.append(module)
                    module.gradient_checkpointing = False
                    parent = parent or fn
            funcs[name] = parent
        for name, layer in adapted.items():
            base = layer.base_layer
            own = base.__dict__.get("_gradient_checkpointing_func")
            own = own if getattr(base, "gradient_checkpointing", False) else None
            layer.checkpoint_func = own or funcs.get(name.rpartition(".")[0])
            if layer.checkpoint_func is not None:
                self._checkpointing_layers.append(layer)

    def _wrap_checkpoint_functions(self, modules: list[tuple[str, nn.Module]]) -> bool:
        """Make transformers' checkpoint functions replay this forward's context; whether any module checkpoints.

        The recomputation in backward must see the inter-stage features of the forward it replays. Cheap when
        nothing changed: one attribute read per module.
        """
        any_on = False
        for _, module in modules:
            if not getattr(module, "gradient_checkpointing", False):
                continue
            any_on = True
            fn = module.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and not hasattr(fn, "med_adapter_original"):
                module._gradient_checkpointing_func = ContextReplayingCheckpoint(self._context, fn)
        return any_on

    def _restore_suspended_checkpointing(self) -> None:
        # After the backbone's forward: the checkpoints taken hold their functions; the layers need not.
        while self._checkpointing_layers:
            self._checkpointing_layers.pop().checkpoint_func = None
        while self._suspended_checkpointing:
            self._suspended_checkpointing.pop().gradient_checkpointing = True

    def _unwrap_checkpoint_functions(self) -> None:
        for module in self.model.modules():
            fn = module.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and hasattr(fn, "med_adapter_original"):
                module._gradient_checkpointing_func = fn.med_adapter_original

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        # PeftModel.forward enters this with the call's arguments, then drops peft's special ones before calling
        # the base model: refuse them here instead of running the active adapter on the whole batch.
        names = kwargs.get("adapter_names")
        if names is not None:
            raise ValueError(
                f"Med-Adapter does not support `adapter_names=` (got {reprlib.repr(names)}): mixed-adapter batches "
                "are not supported, as the adapters mix the slices of each volume. Call `model.set_adapter(name)` "
                "and run one batch per adapter (or `with model.disable_adapter():` for the base model)."
            )
        if kwargs.get("alora_offsets") is not None:
            raise ValueError(
                "`alora_offsets=` is an option of activated LoRA (aLoRA), not of Med-Adapter; leave it out."
            )
        yield

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """Refused: a weighted combination of Med-Adapters is not defined.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "Med-Adapter does not support add_weighted_adapter: each adapter is a residual branch with its own "
            "BatchNorm statistics and spectral filter along the slices, not a weight delta, so a weighted sum of "
            "adapters is not defined. Train a new adapter, switch between adapters with `model.set_adapter(name)`, "
            "or average the outputs of the adapters you would combine."
        )

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "Med-Adapter cannot be merged into the base weights (it is not a weight delta: it mixes slices with "
            "convolutions and a spectral filter). Keep the PeftModel for inference, or call `unload()` to get the "
            "unchanged base model back."
        )

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge=False, adapter_names=None
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._restore_suspended_checkpointing()
        self._unwrap_checkpoint_functions()
        self._context.end()
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Adapter weights sit at `<block>.med_adapter.<adapter_name>.<sub>.<param>`; peft's default only strips
        # the name when it is one of the last two parts.
        return key.replace(f".{cls.prefix}.{adapter_name}.", f".{cls.prefix}.", 1)


def _check_swin_windows(module: nn.Module, pixel_values: object, kwargs: dict) -> None:
    """Refuse a SwinModel call that transformers would break on: a stage grid smaller than the window.

    Without ``always_partition=True`` transformers 5 shrinks such a stage's window but not its relative position
    bias, fails with a size mismatch, and keeps the shrunk window in the model for every later call (Swin-T's
    window 7 at 128 x 128 slices: the last stage is 4 x 4). ``SwinBackbone`` always partitions.

    Raises:
        ValueError: naming the slice size, the stage grid, the window and the fix.
    """
    config = getattr(module, "config", None)
    if (
        getattr(config, "model_type", None) != "swin"
        or getattr(module, "out_features", None) is not None  # SwinBackbone
        or kwargs.get("always_partition")
        or not isinstance(pixel_values, torch.Tensor)
        or pixel_values.ndim != 4
    ):
        return
    patch = config.patch_size if isinstance(config.patch_size, int) else min(config.patch_size)
    side = min(pixel_values.shape[-2:])
    grids = [-(-side // patch)]
    for _ in range(len(config.depths) - 1):  # patch merging pads odd grids
        grids.append(-(-grids[-1] // 2))
    if min(grids) < config.window_size:
        raise ValueError(
            f"Slices of {tuple(pixel_values.shape[-2:])} pixels give this Swin stage grids of {grids}, smaller "
            f"than its window {config.window_size}: transformers would shrink the window without its position "
            "bias, fail, and keep the shrunk window for later calls. Pass always_partition=True to the call (it "
            "pads to whole windows, as SwinBackbone and medtuning_peft's segmenter do), or use slices of at "
            f"least {patch * config.window_size * 2 ** (len(config.depths) - 1)} pixels."
        )
