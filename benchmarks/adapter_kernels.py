"""One Med-Adapter's forward + backward at the paper's block shapes: host time, GPU time and kernels per form.

On the GPU the paper-setting training step with Med-Adapter is bound by kernel launches (``cost.md``, "GPU":
the step takes twice its GPU busy time). This measures where an adapter's launches and host time go, one
adapter at a time at each shape the paper's backbones give it (128 slices; Swin-T's four stages and
ViT-B/16), in candidate forms of the same function, alternating rounds after warm-up:

- ``current``: the package's fast form (bottleneck in float32 channels-last, cuDNN depthwise convolutions).
- ``cudnn_off``: the same code with cuDNN disabled (PyTorch's own convolution kernels).
- ``bf16_bottleneck``: the bottleneck's parameters (depthwise branches, spectral filter, mixing) in bfloat16,
  so the bottleneck runs in bf16 (the function is the same up to bf16 rounding).
- ``cuda_graphs`` (CUDA only): the current form replayed as CUDA graphs, forward and backward
  (:func:`medtuning_peft.enable_cuda_graphs`, through the same object the tuner calls).
- ``compiled_shifts`` and ``compiled_convolution`` (run only when named in ``--forms``): the adapter compiled
  with inductor (``torch.compile(dynamic=False)``), its depthwise convolutions as sums of shifted copies (the
  package's form under ``torch.compile``) or as convolutions. Also reported: ``compile_s`` (the first call,
  forward and backward) and, from the generated code, ``generated_kernels`` (inductor's fused kernels) and
  ``external_calls`` (library calls: matrix products, convolutions). On CPU the code generator is C++, not
  Triton, but the fusion decisions are inductor's own: the counts show what fusing leaves.

Per form and shape: ``enqueue_ms`` (host time to issue forward + backward, before waiting for the GPU),
``gpu_ms`` (CUDA events around the same work), ``wall_ms`` (issue + wait), ``kernels`` (torch.profiler), and
``max_abs_diff`` of the adapter's output against ``current``. ``enqueue_ms`` above ``gpu_ms`` means the host
is the bottleneck.

    python benchmarks/adapter_kernels.py --device cuda --json benchmarks/results/adapter_kernels_cuda.json
    python benchmarks/adapter_kernels.py --device cpu --slices 4 --rounds 2   # code path check
    python benchmarks/adapter_kernels.py --forms current cudnn_off   # a subset
    python benchmarks/adapter_kernels.py --device cpu --slices 32 --forms current compiled_shifts compiled_convolution
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # run from a checkout without installing the package
        sys.path.insert(0, str(path))

from step_time import _sync, profiled_activity, side_report, write_json  # noqa: E402

from medtuning_peft.tuners.med_adapter.cuda_graphs import AdapterGraphs  # noqa: E402
from medtuning_peft.tuners.med_adapter.modules import MedAdapter  # noqa: E402

# name -> (block width C, token grid side) of one adapted block at 128 x 128 slices
SHAPES = {
    "swin-t stage 1": (96, 32),
    "swin-t stage 2": (192, 16),
    "swin-t stage 3": (384, 8),
    "swin-t stage 4": (768, 4),
    "vit-b16": (768, 8),
}
FORMS = ("current", "cudnn_off", "bf16_bottleneck", "cuda_graphs")
CUDA_ONLY_FORMS = ("cuda_graphs",)
COMPILED_FORMS = {"compiled_shifts": "shifts", "compiled_convolution": "convolution"}
"""Forms run only when named: form -> the depthwise form it compiles (``DepthwiseBranch.form``)."""


@contextlib.contextmanager
def form_context(form: str) -> Iterator[None]:
    """What the form changes while it runs (global switches, restored afterwards)."""
    if form == "cudnn_off":
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield


def build(hidden: int, slices: int, form: str, device: torch.device) -> MedAdapter:
    """The paper's adapter (r = C/6, branches 3 and 5, spectral filter), the same weights for every form."""
    torch.manual_seed(0)
    adapter = MedAdapter(hidden, 6, (3, 5), True, slices).to(device)
    if form == "bf16_bottleneck":
        for module in (*adapter.branches, adapter.spectral, adapter.mix):
            module.to(torch.bfloat16)
    for branch in adapter.branches:  # an explicit form holds under torch.compile
        branch.form = COMPILED_FORMS.get(form)
    return adapter


# Launches in the ``call`` function of inductor's output code, one per line, indented on that line ([ \t], not
# \s, which would reach back over blank lines to a kernel's definition at column 0): a generated C++ kernel is
# called by name, a Triton kernel through ``.run(``; library calls go through extern_kernels or aten. The kernels'
# own sources (strings in the same file) hold no such line: ``tmp0 = triton_helpers.maximum(...)`` or a decorator's
# ``triton_meta=`` are not launches.
_KERNEL_CALL = re.compile(
    r"^[ \t]+(?:\w+ = )?(cpp_fused_\w+(?=\()|triton_\w+(?=\.run\()|extern_kernels\.\w+|(?:torch\.ops\.)?aten\.\w+)",
    re.M,
)


def generated_calls(codes: list[str]) -> dict[str, int]:
    """Fused kernel launches and external (library) calls in inductor's generated code of one compiled call."""
    calls = [m.group(1) for code in codes for m in _KERNEL_CALL.finditer(code)]
    fused = [c for c in calls if c.startswith(("cpp_fused_", "triton_"))]
    return {"generated_kernels": len(fused), "external_calls": len(calls) - len(fused)}


def measure(
    name: str, slices: int, args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, float | str]]:
    hidden, side = SHAPES[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(slices, side * side, hidden, generator=gen).to(device).requires_grad_(True)
    forms = [
        f
        for f in (*FORMS, *COMPILED_FORMS)
        if f in args.forms and (device.type == "cuda" or f not in CUDA_ONLY_FORMS)
    ]
    # "current" is the reference of max_abs_diff, measured or not.
    adapters = {form: build(hidden, slices, form, device) for form in dict.fromkeys(["current", *forms])}
    graphs = AdapterGraphs({adapters["cuda_graphs"]: name}) if "cuda_graphs" in adapters else None
    callables = {
        form: torch.compile(adapter, dynamic=False) if form in COMPILED_FORMS else adapter
        for form, adapter in adapters.items()
    }

    def step(form: str) -> torch.Tensor:
        with form_context(form), torch.autocast(device.type, dtype=torch.bfloat16):
            if form == "cuda_graphs":
                graphs.start_pass()  # as the tuner does at each backbone forward: captures after the first
                out, _ = graphs(adapters[form], x, (side, side), slices, None)
            else:
                out, _ = callables[form](x, (side, side), slices)
            out.float().square().mean().backward()
        return out

    results: dict[str, dict[str, float | str]] = {}
    reference = step("current").detach().float()
    runnable = []
    for form in forms:
        try:
            start = time.perf_counter()
            if form in COMPILED_FORMS:
                from torch._inductor.utils import run_and_get_code

                out, codes = run_and_get_code(step, form)
                _sync(device)
                compiled = {"compile_s": time.perf_counter() - start, **generated_calls(codes)}
            else:
                out, compiled = step(form), {}
            diff = (out.detach().float() - reference).abs().max().item()
        except Exception as error:  # noqa: BLE001 - a form that cannot run here is recorded, not fatal
            results[form] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            continue
        results[form] = {"max_abs_diff": diff, **compiled}
        runnable.append(form)
    times: dict[str, dict[str, list[float]]] = {f: {"enqueue": [], "gpu": [], "wall": []} for f in runnable}

    def failed(form: str, error: Exception) -> None:
        # A form that fails later (a CUDA graph is captured at its second call) leaves the comparison; the others
        # are still measured.
        results[form] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        runnable.remove(form)
        print(f"{name}: {form} failed: {results[form]['error']}", flush=True)

    def timed(form: str) -> None:
        _sync(device)
        events = _events(device)
        start = time.perf_counter()
        if events:
            events[0].record()
        step(form)
        enqueued = time.perf_counter()
        if events:
            events[1].record()
        _sync(device)
        end = time.perf_counter()
        times[form]["enqueue"].append(1000 * (enqueued - start))
        times[form]["wall"].append(1000 * (end - start))
        if events:
            times[form]["gpu"].append(events[0].elapsed_time(events[1]))

    for _ in range(args.warmup):
        for form in list(runnable):
            try:
                step(form)
            except Exception as error:  # noqa: BLE001 - recorded, not fatal
                failed(form, error)
    for i in range(args.rounds):
        order = runnable[i % len(runnable) :] + runnable[: i % len(runnable)] if runnable else []
        for form in order:
            try:
                timed(form)
            except Exception as error:  # noqa: BLE001 - recorded, not fatal
                failed(form, error)
    for form in list(runnable):
        entry = results[form]
        for key, values in times[form].items():
            if values:
                entry[f"{key}_ms"] = statistics.median(values)
        try:
            activity = profiled_activity(lambda form=form: step(form), device)
        except Exception as error:  # noqa: BLE001 - recorded, not fatal
            failed(form, error)
            continue
        # One profiled call: its kernels are a whole count.
        entry.update(
            kernels=int(activity["kernels_per_step"]),
            busy_ms=activity["busy_ms_per_step"],
            top_kernels=activity["top_kernels"],
        )
    return results


def _events(device: torch.device) -> tuple[torch.cuda.Event, torch.cuda.Event] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def markdown(report: dict) -> str:
    lines = [
        f"{report['what']}; {report['device']}, torch {report['versions']['torch']}; `{report['command']}`; "
        f"{report['date']}",
        "",
        "| block | form | enqueue ms | GPU ms | busy ms | wall ms | kernels | generated + library calls | compile s "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for block, forms in report["results"].items():
        for form, e in forms.items():
            if "error" in e:
                lines.append(f"| {block} | {form} | not run: {e['error']} | | | | | | | |")
                continue
            gpu = f"{e['gpu_ms']:.2f}" if "gpu_ms" in e else "-"
            code = f"{e['generated_kernels']} + {e['external_calls']}" if "generated_kernels" in e else "-"
            compile_s = f"{e['compile_s']:.0f}" if "compile_s" in e else "-"
            lines.append(
                f"| {block} | {form} | {e['enqueue_ms']:.2f} | {gpu} | {e['busy_ms']:.2f} | {e['wall_ms']:.2f} "
                f"| {e['kernels']} | {code} | {compile_s} | {e['max_abs_diff']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--slices", type=int, default=128, help="slices D of the volume")
    parser.add_argument("--blocks", nargs="+", default=list(SHAPES), help=f"subset of {list(SHAPES)}")
    parser.add_argument(
        "--forms",
        nargs="+",
        default=list(FORMS),
        choices=(*FORMS, *COMPILED_FORMS),
        help=f"forms to measure (default: {list(FORMS)}; {list(COMPILED_FORMS)} only when named)",
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.blocks) - set(SHAPES))
    if unknown:
        parser.error(f"unknown --blocks {unknown}; known: {list(SHAPES)}")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as in the cost benchmark's timed runs
    report = side_report(
        "adapter_kernels.py",
        argv,
        f"one Med-Adapter (r = C/6, branches 3 and 5, spectral), forward + backward, {args.slices} slices, "
        "bf16 autocast",
        device,
        rounds=args.rounds,
        warmup=args.warmup,
    )
    for block in args.blocks:
        report["results"][block] = measure(block, args.slices, args, device)
        print(block, json.dumps(report["results"][block]), flush=True)
        report["markdown"] = markdown(report)
        write_json(
            args.json, report
        )  # after each block: a run stopped by its time limit keeps the finished ones
    print(report["markdown"])
    return report


if __name__ == "__main__":
    main()
