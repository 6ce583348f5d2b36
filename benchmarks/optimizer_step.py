"""The training engine's optimizer step, per PyTorch implementation of Adam, on the paper's trainable parameters.

The engine trains with Adam (AMSGrad, weight decay 1e-5, lr 2e-3; ``medtuning_peft.training.make_optimizer``).
Med-Adapter trains a few hundred small tensors (every adapter's projections, filters, norms) next to the decoder,
so a per-tensor loop of a dozen operations each costs more than the arithmetic. This times one optimizer step
over the trainable parameters of the ``paper`` setting's models (Swin-T and ViT-B/16 with UperNet 512; Med-Adapter
and full fine-tuning), for each implementation: ``for_loop`` (``foreach=False``), ``foreach`` (the default on
CUDA) and ``fused`` (the engine's choice on CPU and CUDA), alternating rounds after warm-up, each on its own copy
of the parameters with the same gradients. It also reports how far each implementation's parameters end from the
for-loop's after all steps (the same update up to float rounding).

    python benchmarks/optimizer_step.py --device cpu --json benchmarks/results/optimizer_step_cpu.json

``--markdown`` (default ``benchmarks/cost.md``) replaces the section of the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # run from a checkout without installing the package
        sys.path.insert(0, str(path))

import step_time  # noqa: E402

IMPLEMENTATIONS = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
METHODS = ("med_adapter", "full")


def trainable_copies(
    setting: step_time.Setting, backbone: str, method: str, device: torch.device, n: int
) -> list:
    """``n`` identical lists of a method's trainable parameters (detached copies), with the same random gradients."""
    model = step_time.build_method(setting, backbone, method, torch.device("cpu"))
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    del model
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]
    copies = []
    for _ in range(n):
        own = [torch.nn.Parameter(p.to(device, copy=True)) for p in params]
        for p, g in zip(own, grads):
            p.grad = g.to(device, copy=True)  # its own: nothing an implementation does leaks into another
        copies.append(own)
    return copies


def measure(
    setting: step_time.Setting, backbone: str, method: str, args: argparse.Namespace, device: torch.device
) -> dict:
    """Step times per implementation (median of the rounds, and of each round's ratio to the loop) and end values."""
    names = args.implementations
    params = dict(zip(names, trainable_copies(setting, backbone, method, device, len(names))))
    optimizers = {
        name: torch.optim.Adam(
            params[name], lr=2e-3, weight_decay=1e-5, amsgrad=True, **IMPLEMENTATIONS[name]
        )
        for name in names
    }
    for _ in range(args.warmup):
        for name in names:
            optimizers[name].step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotating order
            step_time._sync(device)
            start = time.perf_counter()
            optimizers[name].step()
            step_time._sync(device)
            times[name].append(1000 * (time.perf_counter() - start))
    base = params.get("for_loop")
    entry: dict = {
        "tensors": len(params[names[0]]),
        "parameters": sum(p.numel() for p in params[names[0]]),
        "step_ms": {name: statistics.median(t) for name, t in times.items()},
    }
    if base is not None:
        entry["vs_for_loop"] = {
            name: statistics.median(t / b for t, b in zip(times[name], times["for_loop"])) for name in names
        }
        entry["max_abs_param_difference_vs_for_loop"] = {
            name: max((p - q).abs().max().item() for p, q in zip(params[name], base)) for name in names
        }
    return entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--setting", default="paper", help=f"whose models' parameters: {sorted(step_time.SETTINGS)}"
    )
    parser.add_argument("--tiny", action="store_true", help="the setting's tiny models (code path check)")
    parser.add_argument(
        "--implementations", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS)
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", default=str(ROOT / "benchmarks" / "cost.md"), help="'' to skip")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = step_time.get_setting(args.setting, tiny=args.tiny)
    report = step_time.side_report(
        "optimizer_step.py",
        argv,
        f"one Adam step (AMSGrad, weight decay 1e-5) over the trainable parameters of '{args.setting}'"
        f"{' (tiny)' if args.tiny else ''} models with {step_time.DECODER_NAMES[setting.decoder]} "
        f"{setting.decoder_channels} channels",
        device,
        rounds=args.rounds,
        warmup=args.warmup,
        torch_threads=torch.get_num_threads(),
    )
    for backbone in setting.backbones:
        for method in METHODS:
            entry = measure(setting, backbone, method, args, device)
            report["results"][f"{backbone} {method}"] = entry
            print(backbone, method, json.dumps(entry), flush=True)
            step_time.write_json(args.json, report)  # what is measured so far survives a time limit
    names = args.implementations
    ratio = " (x for_loop)" if "for_loop" in names else ""
    lines = [
        f"{report['what']}; {report['device']}, {report['torch_threads']} torch threads, torch {torch.__version__}; "
        f"`{report['command']}`; {report['date']}",
        "",
        "| model, method | tensors | parameters | "
        + " | ".join(f"{n} ms{ratio}" for n in names)
        + " | largest parameter difference to for_loop |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for key, e in report["results"].items():
        cells = [f"{e['step_ms'][n]:.1f}" + (f" ({e['vs_for_loop'][n]:.2f})" if ratio else "") for n in names]
        diffs = e.get("max_abs_param_difference_vs_for_loop", {})
        diff = ", ".join(f"{n} {d:.1e}" for n, d in diffs.items() if n != "for_loop") or "-"
        lines.append(
            f"| {key} | {e['tensors']} | {e['parameters']:,} | " + " | ".join(cells) + f" | {diff} |"
        )
    report["markdown"] = "\n".join(lines)
    print(report["markdown"])
    step_time.write_json(args.json, report)
    if args.markdown:
        step_time.write_markdown(
            Path(args.markdown),
            f"optimizer_{device.type}",
            f"### Optimizer step, {device.type}\n\n{report['markdown']}",
        )
    return report


if __name__ == "__main__":
    main()
