"""Cost of Med-Adapter against full fine-tuning, LoRA and a frozen backbone, side by side (issue 5).

Every method trains the same backbone (same random initialization), the same decoder (UperNet by default;
``--decoder`` picks another of the package's decoders) and the same input in one process. After warm-up, the
methods take turns, one training step (forward, loss, backward, Adam step) or one inference each per round, in
a rotating order, so that a slow period of the machine hits every method alike. Reported per method: median step time with its interquartile range,
peak memory, tuned parameters, checkpoint size and inference time per volume, and ratios against full
fine-tuning (inference: against the frozen backbone, i.e. ``decoder_only``).

Peak memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``) over one training step,
measured for one method at a time with the other models freed; on CPU the peak resident set size of a
fresh subprocess that builds that method alone and runs two steps, given as the peak above the process's
size before the model was built (interpreter, libraries and input excluded).

Usage (from the repository root)::

    python benchmarks/step_time.py --setting cpu                    # 2-core CPU, minutes per backbone
    python benchmarks/step_time.py --setting paper --device cuda    # one GPU; see benchmarks/gpu_cost.sh
    python benchmarks/step_time.py --setting paper --tiny --device cpu --markdown ''   # code path, seconds
    python benchmarks/step_time.py --setting cpu --profile med_adapter   # torch.profiler table, one step
    python benchmarks/step_time.py --setting cpu --decoder fpn --decoder-channels 64   # a lighter decoder

Writes ``benchmarks/results/cost_<setting>_<device>.json`` and replaces this run's section of
``benchmarks/cost.md`` (adding it at the end the first time). A run with another decoder than the setting's
is its own section and file: ``cost_<setting>-<decoder><channels>_<device>.json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import gc
import inspect
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from medtuning_peft.backbones import enable_activation_checkpointing  # noqa: E402
from medtuning_peft.decoders import DECODERS, SegmentationDecoder  # noqa: E402
from medtuning_peft.tuners.med_adapter import enable_cuda_graphs  # noqa: E402
from medtuning_peft.tuners.med_adapter.modules import MedAdapter  # noqa: E402
from medtuning_peft.tuners.med_adapter.reference import set_reference_form  # noqa: E402
from medtuning_peft.volumetric import build_segmenter  # noqa: E402

METHODS = (
    "med_adapter",
    "med_adapter+cuda_graphs",
    "med_adapter_reference",
    "med_adapter+ckpt",
    "med_adapter+ckpt+cuda_graphs",
    "full",
    "lora",
    "decoder_only",
    "frozen_backward",
)
"""Compared methods. ``med_adapter+cuda_graphs`` replays each adapter's kernels as CUDA graphs
(:func:`medtuning_peft.enable_cuda_graphs`; CUDA only, left out of runs on other devices);
``med_adapter_reference`` runs the direct 3D transcription of the adapter with the same
parameters; ``med_adapter+ckpt`` adds non-reentrant activation checkpointing of the frozen blocks (each
recomputed with its adapter), ``med_adapter+ckpt+cuda_graphs`` the same with CUDA graphs (the frozen blocks alone
recomputed; CUDA only);
``frozen_backward`` is ``decoder_only`` with the backward pass taken through the whole frozen backbone (to
its patch embeddings): the floor of any method that trains something after every block, such as
Med-Adapter, which it cannot beat."""

OPTIONAL_METHODS = (
    "med_adapter+compile",
    "full+compile",
    "med_adapter+compile_adapters",
    "med_adapter+compile_adapters+cuda_graphs",
    "med_adapter+compile_cudagraphs",
    "full+compile_cudagraphs",
)
"""Run only when named in ``--methods``: ``torch.compile`` of the whole segmenter (compiling takes minutes on a
GPU, longer on CPU; compare them with each other: compilation speeds up full fine-tuning too), and
``med_adapter+compile_adapters``: only the adapter modules compiled (``nn.Module.compile(dynamic=False)``, one
graph per block shape), the backbone and decoder eager as in the other methods, to measure what fusing the
adapters' small kernels saves in the launch-bound GPU step; ``med_adapter+compile_adapters+cuda_graphs``: the
compiled adapters replayed as this package's CUDA graphs (fused kernels without their launch cost; CUDA only);
``+compile_cudagraphs``: the whole segmenter
compiled with ``mode="reduce-overhead"``, which on CUDA replays each compiled graph's kernels as a CUDA graph
(no per-kernel launch cost; on CPU it is a plain compile)."""

ALL_METHODS = METHODS + OPTIONAL_METHODS
CUDA_ONLY_METHODS = (
    "med_adapter+cuda_graphs",
    "med_adapter+ckpt+cuda_graphs",
    "med_adapter+compile_adapters+cuda_graphs",
)

BASELINE = "full"
DEFAULT_MARKDOWN = ROOT / "benchmarks" / "cost.md"
FROZEN = "decoder_only"


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One benchmark size: input, decoder, precision and the backbones (3-channel configs, random init).

    Attributes:
        description: one line for the report: the input and precision (:meth:`summary` adds the decoder).
        in_channels: C of the volume; the backbones' 3-channel patch embeddings are adapted to it.
        num_slices: D, also the adapters' spectral filter size.
        image_size: H = W of the slices.
        num_classes: K.
        decoder_channels: decoder width.
        autocast: dtype of ``torch.autocast`` for forward passes, or None for float32.
        backbones: name -> factory of the transformers backbone.
        warmup: untimed steps per method before the rounds.
        rounds: timed training steps (and inferences) per method.
    """

    description: str
    in_channels: int
    num_slices: int
    image_size: int
    num_classes: int
    decoder_channels: int
    autocast: torch.dtype | None
    backbones: dict[str, Callable[[], transformers.PreTrainedModel]] = field(repr=False)
    warmup: int = 2
    rounds: int = 7
    decoder: str = "upernet"

    def summary(self) -> str:
        """The description with the decoder, e.g. "..., UperNet 512 channels"."""
        return f"{self.description}, {DECODER_NAMES[self.decoder]} {self.decoder_channels} channels"


DECODER_NAMES = {"upernet": "UperNet", "fpn": "FPN", "segformer": "SegFormer all-MLP head"}
"""Report names of the package's decoders (:data:`medtuning_peft.decoders.DECODERS`)."""


def with_decoder(setting: Setting, decoder: str | None, channels: int | None) -> tuple[Setting, str]:
    """``setting`` with another decoder or width, and the suffix that names such a run ("" if unchanged).

    Args:
        setting: the benchmark size.
        decoder: a key of :data:`medtuning_peft.decoders.DECODERS`, or None for the setting's.
        channels: the decoder's width, or None: the setting's for its own decoder, the decoder's default
            (FPN 128, SegFormer 256) for another.

    Raises:
        ValueError: for an unknown decoder or a width below 1.
    """
    name = decoder or setting.decoder
    if name not in DECODERS:
        raise ValueError(f"Unknown --decoder {name!r}; known decoders: {sorted(DECODERS)}.")
    if channels is None:
        default = inspect.signature(DECODERS[name]).parameters["channels"].default
        channels = setting.decoder_channels if name == setting.decoder else default
    if channels < 1:
        raise ValueError(f"--decoder-channels must be at least 1, got {channels}.")
    if (name, channels) == (setting.decoder, setting.decoder_channels):
        return setting, ""
    return dataclasses.replace(setting, decoder=name, decoder_channels=channels), f"-{name}{channels}"


def _swin(image: int, embed: int, depths: list[int], heads: list[int], window: int) -> Callable:
    config = transformers.SwinConfig(
        image_size=image,
        patch_size=4,
        num_channels=3,
        embed_dim=embed,
        depths=depths,
        num_heads=heads,
        window_size=window,
    )
    # A fresh config per model: a model keeps its config, which adapt_input_channels changes.
    return lambda: transformers.SwinModel(copy.deepcopy(config))


def _vit(image: int, patch: int, hidden: int, layers: int, heads: int) -> Callable:
    config = transformers.ViTConfig(
        image_size=image,
        patch_size=patch,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
    )
    return lambda: transformers.ViTModel(copy.deepcopy(config), add_pooling_layer=False)


SETTINGS: dict[str, Setting] = {
    "paper": Setting(
        description="one 4-channel 128^3 volume (128 slices of 128x128), bf16 autocast",
        in_channels=4,
        num_slices=128,
        image_size=128,
        num_classes=4,
        decoder_channels=512,
        autocast=torch.bfloat16,
        backbones={
            # Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24) with the paper's window 4 at 128 x 128.
            "swin-t": _swin(128, 96, [2, 2, 6, 2], [3, 6, 12, 24], 4),
            # ViT-B/16: 8 x 8 tokens per 128 x 128 slice.
            "vit-b16": _vit(128, 16, 768, 12, 12),
        },
        warmup=3,
        rounds=12,
    ),
    "cpu": Setting(
        description="one 1-channel volume of 32 slices of 64x64, float32",
        in_channels=1,
        num_slices=32,
        image_size=64,
        num_classes=3,
        decoder_channels=64,
        autocast=None,
        backbones={
            # Swin-T itself (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 4): 16 x 16 tokens per slice.
            "swin-t": _swin(64, 96, [2, 2, 6, 2], [3, 6, 12, 24], 4),
            # ViT-B's depth at a quarter of its width (ViT-B would take ~20 s a step on 2 cores); 8 x 8 tokens
            # per slice, as ViT-B/16 at 128 x 128.
            "vit-narrow": _vit(64, 8, 192, 12, 3),
        },
    ),
    "cpu-narrow": Setting(
        description="as 'cpu' with Swin-T at half its width (embed 48): the adapter's share grows as width falls",
        in_channels=1,
        num_slices=32,
        image_size=64,
        num_classes=3,
        decoder_channels=64,
        autocast=None,
        backbones={"swin-t-half": _swin(64, 48, [2, 2, 6, 2], [3, 6, 12, 24], 4)},
    ),
    "cpu-vit-b": Setting(
        description="one 1-channel volume of 16 slices of 64x64, float32: ViT-B at its real width on CPU",
        in_channels=1,
        num_slices=16,
        image_size=64,
        num_classes=3,
        decoder_channels=64,
        autocast=None,
        # ViT-B/16's width, depth and heads (768, 12, 12) with 8 x 8 tokens per slice, as ViT-B/16 at 128 x 128;
        # 16 slices keep a full fine-tuning step near 7 s on one core. The adapters' cost grows with the width,
        # the backbone's with its square, so `cpu`'s 192-wide ViT overstates the adapters' share.
        backbones={"vit-b8": _vit(64, 8, 768, 12, 12)},
    ),
}

TINY: dict[str, Setting] = {
    # The same code paths (autocast, both backbone families, every method) at a size that runs in seconds.
    name: Setting(
        description=f"tiny version of '{name}' (code path check, not a measurement)",
        in_channels=setting.in_channels,
        num_slices=8,
        image_size=32,
        num_classes=setting.num_classes,
        decoder_channels=16,
        autocast=setting.autocast,
        backbones={
            "swin-tiny": _swin(32, 12, [1, 1, 2, 1], [1, 1, 2, 2], 4),
            "vit-tiny": _vit(32, 8, 24, 6, 2),
        },
        warmup=1,
        rounds=2,
    )
    for name, setting in SETTINGS.items()
}


def get_setting(name: str, tiny: bool) -> Setting:
    """The setting ``name`` (its tiny version with ``tiny``).

    Raises:
        ValueError: for an unknown name.
    """
    table = TINY if tiny else SETTINGS
    if name not in table:
        raise ValueError(f"Unknown --setting {name!r}; known settings: {sorted(table)}.")
    return table[name]


# ---------------------------------------------------------------------------------------------------------
# One method
# ---------------------------------------------------------------------------------------------------------


def build_method(
    setting: Setting, backbone: str, method: str, device: torch.device, seed: int = 0
) -> nn.Module:
    """The segmenter for one method, from the same seed for every method (identical initial weights).

    Args:
        setting: the benchmark size.
        backbone: a key of ``setting.backbones``.
        method: one of :data:`METHODS`.
        device: where the model lives.
        seed: initialization seed.

    Returns:
        The segmenter (``(B, C, D, H, W)`` -> ``(B, K, D, H, W)``), in training mode, on ``device``.

    Raises:
        ValueError: for an unknown method.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"Unknown method {method!r}; known methods: {list(ALL_METHODS)}.")
    torch.manual_seed(seed)
    base = "decoder_only" if method == "frozen_backward" else method.split("+")[0].removesuffix("_reference")
    options = {"r": 8} if base == "lora" else {}
    if base in ("med_adapter", "lora"):
        # The paper's methods: the patch embedding frozen (build_segmenter trains it for in_channels > 1, so
        # that multi-channel inputs are told apart; it then adds its weight gradient and the first block's
        # backward).
        options["train_patch_embedding"] = False
    segmenter = build_segmenter(
        setting.backbones[backbone](),
        in_channels=setting.in_channels,
        num_classes=setting.num_classes,
        decoder=setting.decoder,
        method=base,
        num_slices=setting.num_slices,
        decoder_kwargs={"channels": setting.decoder_channels},
        **options,
    )
    if method == "med_adapter_reference":
        set_reference_form(segmenter, True)
    if method == "frozen_backward":
        embeddings = segmenter.backbone.get_input_embeddings()
        embeddings.register_forward_hook(_output_requires_grad)
    if "+ckpt" in method:
        # After wrapping (PEFT_NOTES.md); the tuner makes recomputation replay the inter-stage context.
        enable_activation_checkpointing(segmenter.backbone)
    if method.endswith("+cuda_graphs"):
        enable_cuda_graphs(segmenter)
    segmenter = segmenter.to(device).train()
    if method.endswith("+compile"):
        return torch.compile(segmenter)
    if method.endswith("+compile_cudagraphs"):
        return torch.compile(segmenter, mode="reduce-overhead")
    if "+compile_adapters" in method:
        # All adapters share one forward: each block shape and inter-stage variant is one more compiled entry,
        # which must not hit the recompile limit (8; torch 2.11 reached it on Swin) and fall back to eager.
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        for module in segmenter.modules():
            if isinstance(module, MedAdapter):
                module.compile(dynamic=False)  # static shapes: one graph per block shape, no symbolic sizes
    return segmenter


def _output_requires_grad(module: nn.Module, args: Any, output: Any) -> None:
    # Patch embeddings return a tensor (ViT) or (tensor, grid) (Swin): make autograd go through the backbone.
    if torch.is_grad_enabled():
        tokens = output[0] if isinstance(output, tuple) else output
        tokens.requires_grad_(True)


class Runner:
    """A method's model and optimizer, with one training step and one inference.

    Args:
        model: the segmenter.
        autocast: forward dtype under ``torch.autocast``, or None.
        device: the model's device.
    """

    def __init__(self, model: nn.Module, autocast: torch.dtype | None, device: torch.device) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4)
        self.autocast = autocast
        self.device = device

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def train_step(self, volume: torch.Tensor, labels: torch.Tensor) -> None:
        """Forward, cross-entropy, backward and one Adam step. volume (B, C, D, H, W), labels (B, D, H, W)."""
        self.forward_backward(volume, labels)
        self.optimizer.step()

    def forward_backward(self, volume: torch.Tensor, labels: torch.Tensor) -> None:
        """The training step without the optimizer: forward, cross-entropy, backward (fresh gradients)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model(volume)  # (B, K, D, H, W)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()

    def infer(self, volume: torch.Tensor) -> None:
        """One forward pass of a volume in eval mode without autograd."""
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.model(volume)
        self.model.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of ``fn``."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def describe_error(error: BaseException) -> str:
    """One line for the report: the exception's type and the first line of its message."""
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"[:500]


def alternate(
    runners: dict[str, Runner],
    action: Callable[[Runner], None],
    warmup: int,
    rounds: int,
    device: torch.device,
    failed: dict[str, str],
) -> dict[str, list[tuple[float, float]]]:
    """Warm every method up, then time ``rounds`` rounds in which each method runs once, in rotating order.

    A method that raises (a compiler or kernel failure, running out of memory) leaves the comparison: it is
    removed from ``runners`` and its error recorded in ``failed``; the other methods go on, so one failure
    does not cost the run.

    Returns:
        (wall-clock, process CPU) seconds per run, per method still in ``runners``.
    """

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}

    def run(name: str, timed: bool) -> None:
        runner = runners[name]
        try:
            if timed:
                times[name].append(_timed(lambda: action(runner), device))
            else:
                action(runner)
        except Exception as error:  # noqa: BLE001 - recorded in the report instead
            failed[name] = describe_error(error)
            print(f"  {name} failed and leaves the comparison: {failed[name]}", flush=True)
            del runners[name], times[name], runner
        else:
            return
        _release(device)  # outside the handler: the traceback's frames no longer hold the method's tensors

    for name in list(runners):
        for _ in range(warmup):
            if name in runners:
                run(name, timed=False)
    names = list(runners)
    for i in range(rounds):
        shift = i % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if name in runners:
                run(name, timed=True)
    return times


def _release(device: torch.device) -> None:
    """Give a dropped method's memory back before the next one runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def quartiles(values: list[float]) -> dict[str, float]:
    """Median, first and third quartiles and count of ``values``."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return {"median": ordered[0], "q1": ordered[0], "q3": ordered[0], "n": 1}
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "n": len(ordered)}


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """Median and quartiles in milliseconds."""
    return quartiles([1000 * s for s in seconds])


def checkpoint_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes on disk of what a method saves beyond the frozen backbone.

    ``checkpoint_bytes``: the files of ``VolumetricSegmenter.save_pretrained`` except the base backbone
    folder (for ``full`` that is the whole model; for the PEFT methods peft's ``save_pretrained``, adapters
    plus the decoder). ``adapter_bytes`` (PEFT methods only): the tuner's own weights without the decoder,
    as safetensors.
    """
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sizes["checkpoint_bytes"] = sum(
            p.stat().st_size
            for p in Path(tmp).rglob("*")
            if p.is_file() and "backbone" not in p.relative_to(tmp).parts
        )
        peft_model = getattr(model, "peft_model", None)
        if peft_model is not None:
            state = peft.get_peft_model_state_dict(peft_model)
            own = {k: v.detach().cpu().contiguous() for k, v in state.items() if ".decoder." not in f".{k}"}
            save_file(own, str(Path(tmp) / "own.safetensors"))
            sizes["adapter_bytes"] = (Path(tmp) / "own.safetensors").stat().st_size
    return sizes


def paper_swin_t_adapter_bytes() -> dict[str, int]:
    """Adapter checkpoint of the paper's Swin-T configuration (737,568 adapter parameters, as in the paper).

    ``PeftModel.save_pretrained`` of a Swin-T (embed 96, depths 2-2-2-2, heads 3-6-12-24, window 4, 128 x 128,
    4 channels) with the default MedAdapterConfig; returns the parameter count and the bytes written.
    """
    from medtuning_peft import MedAdapterConfig

    swin = transformers.SwinModel(
        transformers.SwinConfig(
            image_size=128,
            patch_size=4,
            num_channels=4,
            embed_dim=96,
            depths=[2, 2, 2, 2],
            num_heads=[3, 6, 12, 24],
            window_size=4,
        )
    )
    model = peft.get_peft_model(swin, MedAdapterConfig())
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {"adapter_params": params, "adapter_model_safetensors_bytes": size}


# ---------------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------------


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError(f"no {field_name} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process; False where that is not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def memory_probe(setting: Setting, backbone: str, method: str) -> dict[str, int]:
    """Peak RSS above the starting RSS while building ``method`` and running two training steps.

    Meant for a fresh CPU process (see :func:`cpu_peak_memory`): the peak (VmHWM) is reset right before the
    model is built, so the import-time peak of the interpreter does not count.
    """
    device = torch.device("cpu")
    volume, labels = make_input(setting, device)
    gc.collect()
    baseline = _status_bytes("VmRSS")
    if not _reset_peak_rss():  # then the lifetime peak, imports included
        baseline = 0
    runner = Runner(build_method(setting, backbone, method, device), setting.autocast, device)
    for _ in range(2):
        runner.train_step(volume, labels)
    peak = _status_bytes("VmHWM")
    return {
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "peak_bytes": peak - baseline,
        "decoder": type(trained_decoder(runner.model)).__name__,  # what the probe built: the run's decoder
    }


def trained_decoder(model: nn.Module) -> SegmentationDecoder:
    """The decoder that ``model`` trains (PEFT methods train a copy of it, peft's ``modules_to_save``).

    Raises:
        LookupError: when no decoder of ``model`` has trainable parameters.
    """
    for module in model.decoder.modules():
        if isinstance(module, SegmentationDecoder) and any(p.requires_grad for p in module.parameters()):
            return module
    raise LookupError(f"{type(model).__name__} trains no decoder")


def cpu_peak_memory(args: argparse.Namespace, backbone: str, method: str) -> dict[str, int]:
    """Run :func:`memory_probe` in a subprocess (this script with ``--memory-probe``)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--setting", args.setting, "--device", "cpu"]
    command += ["--memory-probe", method, "--backbones", backbone, "--threads", str(torch.get_num_threads())]
    command += ["--tiny"] if args.tiny else []
    command += ["--decoder", args.decoder] if args.decoder else []
    command += ["--decoder-channels", str(args.decoder_channels)] if args.decoder_channels else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {method} on {backbone} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_peak_memory(setting: Setting, backbone: str, method: str, device: torch.device) -> dict[str, int]:
    """Allocator peak of one training step and of one inference, with no other model alive."""
    volume, labels = make_input(setting, device)
    earlier_graphs = graph_pool_bytes(device)  # pools of an earlier method not yet released: not this one's
    runner = Runner(build_method(setting, backbone, method, device), setting.autocast, device)
    # Optimizer state exists after the first step; CUDA graphs are captured in the second.
    for _ in range(2):
        runner.train_step(volume, labels)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.train_step(volume, labels)
    torch.cuda.synchronize(device)
    train_peak = torch.cuda.max_memory_allocated(device)
    train_graphs = max(0, graph_pool_bytes(device) - earlier_graphs)
    # Inference holds the model alone: no gradients, no optimizer state (Adam's two buffers per trained
    # parameter would make full fine-tuning's inference look larger than the frozen methods').
    runner.optimizer.zero_grad(set_to_none=True)
    runner.optimizer.state.clear()
    for _ in range(2):
        runner.infer(volume)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.infer(volume)
    torch.cuda.synchronize(device)
    infer_peak = torch.cuda.max_memory_allocated(device)
    # The training graphs' pool stays reserved during inference too.
    graphs = max(0, graph_pool_bytes(device) - earlier_graphs)
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    # A graph replay allocates nothing: the memory its kernels write (temporaries, saved activations) is the
    # graphs' pools, reserved but not counted as allocated. Added in full, as if all of it were live at the
    # peak: an upper bound for methods with CUDA graphs, 0 for the others.
    return {
        "peak_bytes": train_peak + train_graphs,
        "inference_peak_bytes": infer_peak + graphs,
        "graph_pool_bytes": train_graphs,
        "inference_graph_pool_bytes": graphs,
    }


def graph_pool_bytes(device: torch.device) -> int:
    """Memory reserved by CUDA graph pools and not held by live tensors (what replays write into)."""
    total = 0
    for segment in torch.cuda.memory_snapshot():
        if segment.get("device", device.index or 0) != (device.index or 0):
            continue
        if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0):
            total += segment["total_size"] - segment["allocated_size"]
    return total


# ---------------------------------------------------------------------------------------------------------
# Operation counts (a device-independent proxy of kernel launches) and the CUDA kernel profile
# ---------------------------------------------------------------------------------------------------------

METADATA_OPS = frozenset(
    {
        "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "squeeze",
        "unsqueeze", "select", "slice", "split", "split_with_sizes", "unbind", "chunk", "narrow", "as_strided",
        "alias", "detach", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
        "_local_scalar_dense", "is_same_size", "promote_types", "result_type",
    }
)  # fmt: skip
"""aten operations that change only metadata (views, allocations, host scalars): they launch no kernel."""


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_operations(runner: Runner, volume: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """aten operations of one forward + backward (no optimizer step: its implementation differs by device).

    Counted at the dispatcher, so the figure is the same on every device: ``kernels`` are the operations that
    compute (each is at least one kernel launch on a GPU), ``casts`` the dtype conversions among them
    (``_to_copy``, mostly autocast casting weights and their gradients back), ``top`` the most frequent.
    """
    runner.forward_backward(volume, labels)  # caches (autocast, spectral bases) as in a timed step
    with _OpCounter() as counter:
        runner.forward_backward(volume, labels)
    computing = {k: v for k, v in counter.counts.items() if k not in METADATA_OPS}
    return {
        "kernels": sum(computing.values()),
        "casts": computing.get("_to_copy", 0),
        "all": sum(counter.counts.values()),
        "top": dict(collections.Counter(computing).most_common(12)),
    }


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (device busy time: concurrent kernels count once)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        busy += end - max(start, reach)
        reach = end
    return busy


def profiled_activity(
    fn: Callable[[], object], device: torch.device, steps: int = 1, top_kernels: int = 15
) -> dict[str, Any]:
    """Kernels launched and device busy time per call of ``fn``, from torch.profiler, against the wall time,
    and the ``top_kernels`` kernel names that took the most device time.

    On CUDA this is the GPU's side of a step: ``busy_ms`` well below ``wall_ms`` means the step waits on the
    host (launches, Python), not on the GPU. On CPU the same figures count the top-level operator events.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    wall = time.perf_counter() - start
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind and (cuda or e.cpu_parent is None)]
    intervals = [(e.time_range.start, e.time_range.end) for e in events]
    # name -> [calls, microseconds]
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.time_range.end - e.time_range.start
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:top_kernels]
    return {
        "kernels_per_step": len(events) / steps,
        "busy_ms_per_step": busy_microseconds(intervals) / 1000 / steps,
        "profiled_wall_ms_per_step": 1000 * wall / steps,
        # Where the device time goes, by kernel (CPU: operator) name: what fusing would have to remove.
        "top_kernels": [
            {"name": name[:160], "calls_per_step": calls / steps, "ms_per_step": us / 1000 / steps}
            for name, (calls, us) in top
        ],
    }


def device_activity(
    runner: Runner, volume: torch.Tensor, labels: torch.Tensor, device: torch.device, steps: int = 2
) -> dict[str, float]:
    """:func:`profiled_activity` of ``steps`` training steps, after one unprofiled step."""
    runner.train_step(volume, labels)
    return profiled_activity(lambda: runner.train_step(volume, labels), device, steps)


# ---------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------


def side_report(script: str, argv: list[str] | None, what: str, device: torch.device, **fields: Any) -> dict:
    """The header of a side benchmark's report (``decoder_layout.py``, ``adapter_kernels.py``): what was run,
    where, with which versions, the command and the date, then ``fields`` and an empty ``results``."""
    return {
        "what": what,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "command": shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **fields,
        "results": {},
    }


def write_text_whole(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it: a write that stops midway (a time limit,
    a full disk) leaves the earlier file whole, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path | None, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` (parents created); nothing when ``path`` is None."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(path, json.dumps(report, indent=2) + "\n")


def make_input(setting: Setting, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One volume (1, C, D, H, W) and its labels (1, D, H, W), the same for every method."""
    gen = torch.Generator().manual_seed(1234)
    shape = (setting.num_slices, setting.image_size, setting.image_size)
    volume = torch.randn(1, setting.in_channels, *shape, generator=gen)
    labels = torch.randint(0, setting.num_classes, (1, *shape), generator=gen)
    return volume.to(device), labels.to(device)


def benchmark_backbone(
    args: argparse.Namespace, setting: Setting, backbone: str, device: torch.device
) -> dict:
    """Every method on one backbone: times in one process, then sizes and peak memory."""
    volume, labels = make_input(setting, device)
    runners, sizes, failed = {}, {}, {}
    for method in args.methods:
        try:
            model = build_method(setting, backbone, method, torch.device("cpu"))
            sizes[method] = checkpoint_sizes(model)  # saved from the CPU: the sizes do not change in training
            runners[method] = Runner(model.to(device), setting.autocast, device)
        except Exception as error:  # noqa: BLE001 - recorded in the report instead
            failed[method] = describe_error(error)
            print(f"  {method} failed to build: {failed[method]}", flush=True)
    print(f"[{backbone}] training steps: {setting.warmup} warm-up + {setting.rounds} rounds", flush=True)
    train = alternate(
        runners, lambda r: r.train_step(volume, labels), setting.warmup, setting.rounds, device, failed
    )
    print(f"[{backbone}] inference", flush=True)
    infer = alternate(runners, lambda r: r.infer(volume), setting.warmup, setting.rounds, device, failed)
    results: dict[str, dict[str, Any]] = {}
    for name, runner in runners.items():
        results[name] = {
            "step_ms": summary_ms([wall for wall, _ in train[name]]),
            "inference_ms": summary_ms([wall for wall, _ in infer[name]]),
            "tuned_params": sum(p.numel() for p in runner.params),
            "total_params": sum(p.numel() for p in runner.model.parameters()),
            **sizes[name],
        }
        if device.type == "cpu":  # less sensitive than wall-clock time to other processes on the machine
            results[name]["step_cpu_ms"] = summary_ms([cpu for _, cpu in train[name]])
        if BASELINE in train:
            # Each round's step against full fine-tuning's step of the same round (run moments apart): the
            # spread of these ratios is what a slow period of the machine leaves of the comparison.
            paired = [mine / base for (mine, _), (base, _) in zip(train[name], train[BASELINE], strict=True)]
            results[name]["step_vs_full_per_round"] = quartiles(paired)
    print(
        f"[{backbone}] operation counts" + (" and kernel profiles" if device.type == "cuda" else ""),
        flush=True,
    )
    for name, runner in runners.items():
        if "+compile" not in name:  # compiled kernels do not pass the dispatcher: see the profile
            try:  # a count next to the timings, as the profile: its failure must not lose them
                results[name]["operations"] = count_operations(runner, volume, labels)
            except Exception as error:  # noqa: BLE001 - recorded in the report instead
                results[name]["operations_error"] = describe_error(error)
        if device.type == "cuda":
            try:  # a diagnosis next to the timings: a profiler failure must not lose them
                results[name]["device_activity"] = device_activity(runner, volume, labels, device)
            except Exception as error:  # noqa: BLE001 - recorded in the report instead
                results[name]["device_activity"] = {"error": f"{type(error).__name__}: {error}"}
    # Nothing of the timed models may stay alive: the loop variables hold the last method's model, gradients
    # and optimizer state, which would count in every peak measured below.
    model = runner = None
    del runners, model, runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[{backbone}] peak memory", flush=True)
    for name in list(results):
        try:
            if device.type == "cuda":
                results[name]["memory"] = cuda_peak_memory(setting, backbone, name, device)
            elif args.tiny:  # a code path check: no subprocess per method
                results[name]["memory"] = memory_probe(setting, backbone, name)
            else:
                results[name]["memory"] = cpu_peak_memory(args, backbone, name)
        except Exception as error:  # noqa: BLE001 - the timings stand; the memory is recorded as failed
            results[name]["memory"] = {"peak_bytes": 0, "error": describe_error(error)}
        if "error" in results[name]["memory"]:
            _release(device)  # outside the handler, as in `alternate`; a measured method released its own
    _add_ratios(results)
    for name in args.methods:  # after the measured ones, in the methods' order
        if name in failed:
            results[name] = {"error": failed[name]}
    return results


def _add_ratios(results: dict[str, dict[str, Any]]) -> None:
    base, frozen = results.get(BASELINE), results.get(FROZEN)
    for entry in results.values():
        ratios = {}
        if base is not None:
            ratios["step_vs_full"] = entry["step_ms"]["median"] / base["step_ms"]["median"]
            if "step_cpu_ms" in entry:
                ratios["step_cpu_vs_full"] = entry["step_cpu_ms"]["median"] / base["step_cpu_ms"]["median"]
            if base["memory"]["peak_bytes"] > 0 and entry["memory"]["peak_bytes"] > 0:
                ratios["memory_vs_full"] = entry["memory"]["peak_bytes"] / base["memory"]["peak_bytes"]
            if "operations" in entry and base.get("operations", {}).get("kernels"):
                ratios["kernels_vs_full"] = entry["operations"]["kernels"] / base["operations"]["kernels"]
        if frozen is not None:
            ratios["inference_vs_frozen"] = entry["inference_ms"]["median"] / frozen["inference_ms"]["median"]
        entry["ratios"] = ratios


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model (lscpu), cores, threads, GPU name, versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _paired(r: dict[str, Any]) -> str:
    """The per-round ratio against full fine-tuning, median [IQR], or the ratio of medians without it."""
    paired = r.get("step_vs_full_per_round")
    if paired is None:
        return _ratio(r["ratios"].get("step_vs_full"))
    return f"{paired['median']:.2f} [{paired['q1']:.2f}-{paired['q3']:.2f}]"


def _times(t: dict[str, float]) -> str:
    return f"{t['median']:.1f} [{t['q1']:.1f}-{t['q3']:.1f}]"


def markdown_section(report: dict[str, Any]) -> str:
    """The markdown of one run: machine, versions, command, date, one table per backbone."""
    m = report["machine"]
    hardware = f"{m.get('gpu', '')} (CUDA {m.get('cuda')}), host " if "gpu" in m else ""
    lines = [
        f"### `{report['setting']}` setting on {report['device']}",
        "",
        f"- Input and model: {report['description']}; Adam (lr 1e-4); cross-entropy over K classes.",
        f"- Machine: {hardware}{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads.",
        f"- Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}",
        f"- Peak memory: {report['memory_method']}",
        "",
    ]
    cpu_time = report["device"] == "cpu"
    for backbone, results in report["results"].items():
        lines += [
            f"**{backbone}** (step: median [IQR] of {report['rounds']} alternating rounds after "
            f"{report['warmup']} warm-up steps; x full: median [IQR] of each round's ratio to full fine-tuning)",
            "",
            "| method | train step ms | x full (per round) | "
            + ("step CPU time ms | x full | " if cpu_time else "")
            + "peak memory | x full | inference ms/volume | x frozen | tuned params | checkpoint MB | adapter MB |",
            "|---|---|---|" + ("---|---|" if cpu_time else "") + "---|---|---|---|---|---|---|",
        ]
        measured = {name: r for name, r in results.items() if "error" not in r}
        for name, r in measured.items():
            ratios = r["ratios"]
            cpu_cells = (
                f"{_times(r['step_cpu_ms'])} | {_ratio(ratios.get('step_cpu_vs_full'))} | "
                if cpu_time
                else ""
            )
            lines.append(
                f"| {name} | {_times(r['step_ms'])} | {_paired(r)} | {cpu_cells}"
                f"{_gib(r['memory']['peak_bytes'])} | {_ratio(ratios.get('memory_vs_full'))} "
                f"| {_times(r['inference_ms'])} | {_ratio(ratios.get('inference_vs_frozen'))} "
                f"| {r['tuned_params']:,} | {_mb(r['checkpoint_bytes'])} | {_mb(r.get('adapter_bytes'))} |"
            )
        lines.append("")
        failures = [f"- {name} failed: `{r['error']}`" for name, r in results.items() if "error" in r]
        failures += [
            f"- {name}: peak memory not measured: `{r['memory']['error']}`"
            for name, r in measured.items()
            if "error" in r["memory"]
        ]
        failures += [
            f"- {name}: operations not counted: `{r['operations_error']}`"
            for name, r in measured.items()
            if "operations_error" in r
        ]
        if failures:
            lines += ["Not measured:", "", *failures, ""]
        lines += _operations_table(measured)
    if report.get("incomplete"):
        lines += [f"Incomplete run: {report['incomplete']}.", ""]
    if report.get("paper_swin_t_adapter_error"):
        lines += [
            f"Adapter checkpoint of the paper's Swin-T configuration not measured: "
            f"`{report['paper_swin_t_adapter_error']}`.",
            "",
        ]
    paper = report.get("paper_swin_t_adapter")
    if paper:
        lines += [
            f"Adapter checkpoint of the paper's Swin-T configuration (depths 2-2-2-2, {paper['adapter_params']:,} "
            f"adapter parameters): `adapter_model.safetensors` = {paper['adapter_model_safetensors_bytes']:,} "
            f"bytes ({paper['adapter_model_safetensors_bytes'] / 1e6:.2f} MB).",
            "",
        ]
    return "\n".join(lines)


def _operations_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Operation counts per method; on CUDA also the profiled kernels and GPU busy time per step."""
    if not any("operations" in r for r in results.values()):
        return []
    cuda = any("device_activity" in r for r in results.values())
    lines = [
        "Operations of one forward + backward (aten operations that compute, counted at the dispatcher: a "
        "device-independent proxy of kernel launches; casts are the dtype conversions among them)"
        + ("; kernels and GPU busy time per training step from torch.profiler" if cuda else "")
        + ":",
        "",
        "| method | operations | x full | casts |"
        + (" CUDA kernels / step | GPU busy ms / step | wall ms / step |" if cuda else ""),
        "|---|---|---|---|" + ("---|---|---|" if cuda else ""),
    ]
    for name, r in results.items():
        ops = r.get("operations")
        row = (
            f"| {name} | {ops['kernels']:,} | {_ratio(r['ratios'].get('kernels_vs_full'))} | {ops['casts']:,} |"
            if ops
            else f"| {name} | - | - | - |"
        )
        if cuda:
            act = r.get("device_activity", {})
            if "error" in act or not act:
                row += f" {act.get('error', 'not measured')} | - | - |"
            else:
                row += (
                    f" {act['kernels_per_step']:,.0f} | {act['busy_ms_per_step']:.1f} | "
                    f"{act['profiled_wall_ms_per_step']:.1f} |"
                )
        lines.append(row)
    return [*lines, ""]


def write_markdown(path: Path, key: str, section: str) -> None:
    """Replace the section marked ``key`` in ``path`` (append it when absent; create the file if needed)."""
    start, end = f"<!-- cost:{key} start -->", f"<!-- cost:{key} end -->"
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Cost of Med-Adapter\n\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    write_text_whole(path, text)  # the other sections of the file are never lost to a cut-short write


# ---------------------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------------------


def profile_method(setting: Setting, backbone: str, method: str, device: torch.device, rows: int = 30) -> str:
    """torch.profiler table (self time, top ``rows`` ops) of two training steps after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    volume, labels = make_input(setting, device)
    runner = Runner(build_method(setting, backbone, method, device), setting.autocast, device)
    for _ in range(setting.warmup):
        runner.train_step(volume, labels)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            runner.train_step(volume, labels)
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="cpu", help=f"benchmark size: {sorted(SETTINGS)}")
    parser.add_argument("--tiny", action="store_true", help="shrink the setting to seconds (code path check)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backbones", nargs="+", default=None, help="subset of the setting's backbones")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"subset of {list(METHODS)} (default: all; {list(CUDA_ONLY_METHODS)} on CUDA only), plus any of "
        f"{list(OPTIONAL_METHODS)}",
    )
    parser.add_argument(
        "--decoder",
        default=None,
        choices=sorted(DECODERS),
        help="decoder every method trains (default: the setting's, UperNet)",
    )
    parser.add_argument(
        "--decoder-channels",
        type=int,
        default=None,
        help="decoder width (default: the setting's for UperNet, the decoder's own default for another)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: the setting's)")
    parser.add_argument(
        "--json", default=None, help="output JSON (default: benchmarks/results/cost_<setting>_<device>.json)"
    )
    parser.add_argument(
        "--markdown", default=None, help="markdown file (default: benchmarks/cost.md; '' to skip)"
    )
    parser.add_argument(
        "--profile", metavar="METHOD", default=None, help="print a torch.profiler table and exit"
    )
    parser.add_argument("--memory-probe", metavar="METHOD", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods or ()) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {list(ALL_METHODS)}")
    return args


def default_methods(device: torch.device) -> list[str]:
    """The methods of a run that names none: :data:`METHODS`, less the CUDA-only ones off CUDA."""
    return [m for m in METHODS if device.type == "cuda" or m not in CUDA_ONLY_METHODS]


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.methods is None:
        args.methods = default_methods(device)
    setting = get_setting(args.setting, args.tiny)
    if args.rounds:
        setting = dataclasses.replace(setting, rounds=args.rounds)
    setting, decoder_suffix = with_decoder(setting, args.decoder, args.decoder_channels)
    backbones = args.backbones or list(setting.backbones)
    missing = sorted(set(backbones) - set(setting.backbones))
    if missing:
        raise ValueError(
            f"Unknown --backbones {missing} for setting {args.setting!r}; known: {list(setting.backbones)}."
        )
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    if args.memory_probe:
        print(json.dumps(memory_probe(setting, backbones[0], args.memory_probe)))
        return None
    if args.profile:
        with _cudnn_benchmark(device):  # the same convolution algorithms as the timed runs
            print(profile_method(setting, backbones[0], args.profile, device))
        return None

    # Runs with compiled methods get their own JSON and section: they do not replace the standard run.
    compiled = "-compile" if set(args.methods) & set(OPTIONAL_METHODS) else ""
    name = f"{args.setting}{'-tiny' if args.tiny else ''}{decoder_suffix}{compiled}"
    report: dict[str, Any] = {
        "setting": name,
        "description": setting.summary(),
        "decoder": {"name": setting.decoder, "channels": setting.decoder_channels},
        "device": device.type,
        "machine": machine_info(device),
        "command": shlex.join(
            ["python", *(sys.argv if argv is None else ["benchmarks/step_time.py", *argv])]
        ),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "warmup": setting.warmup,
        "rounds": setting.rounds,
        "memory_method": (
            "CUDA allocator peak (max_memory_allocated) over one training step, one method at a time; methods "
            "with CUDA graphs add the bytes their graph pools reserve beyond live tensors (an upper bound)"
            if device.type == "cuda"
            else "peak RSS of a fresh subprocess per method (build + 2 training steps) minus its RSS before "
            "the model was built"
        ),
        "results": {},
    }
    # A tiny run checks the code path: it writes files only where asked to.
    default_json = None if args.tiny else ROOT / "benchmarks" / "results" / f"cost_{name}_{device.type}.json"
    out = Path(args.json) if args.json else default_json
    markdown = args.markdown if args.markdown is not None else ("" if args.tiny else str(DEFAULT_MARKDOWN))

    def write(report: dict[str, Any]) -> str:
        section = markdown_section(report)
        write_json(out, report)
        if markdown:
            write_markdown(Path(markdown), f"{name}_{device.type}", section)
        return section

    with _cudnn_benchmark(device):
        for i, backbone in enumerate(backbones):
            report["results"][backbone] = benchmark_backbone(args, setting, backbone, device)
            # Written as it goes, the last backbone too: a run cut short keeps its finished backbones.
            if i + 1 < len(backbones):
                report["incomplete"] = f"stopped before {backbones[i + 1 :]}"
            else:
                report.pop("incomplete", None)
            write(report)
    try:
        report["paper_swin_t_adapter"] = paper_swin_t_adapter_bytes()
    except Exception as error:  # noqa: BLE001 - a side figure: the measurements stand without it
        report["paper_swin_t_adapter_error"] = describe_error(error)
    print(write(report))
    return report


if __name__ == "__main__":
    main()
