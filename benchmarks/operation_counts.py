"""Operations and casts of one training forward + backward of the paper's models under bf16 autocast.

What a GPU pays in kernel launches does not depend on the input size, so this counts, on any device, the aten
operations of the paper's backbones at their real widths (Swin-T depths 2-2-6-2, ViT-B/16; UperNet) on a small
input (8 slices, a narrower decoder), with the spectral branch in the form it takes on CUDA at D = 128 (the
matrix product). Counting is :func:`step_time.count_operations`, as in the cost benchmark's operation tables.

``--package-root`` counts another checkout of the package with this harness. The harness builds the models
through the package's present API, so an older package is counted with the harness of its time: the committed
"before" counts (``results/operation_counts_7bee841.json``) come from the harness of commit 328cfc5::

    git worktree add /tmp/before 7bee841
    git worktree add /tmp/harness 328cfc5
    python /tmp/harness/benchmarks/operation_counts.py --package-root /tmp/before --json /tmp/ops_before.json
    python benchmarks/operation_counts.py                       # this checkout

Prints one line per backbone and method and writes JSON (default ``benchmarks/results/operation_counts.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("full", "frozen_backward", "med_adapter", "med_adapter+ckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--package-root",
        default=str(HERE.parent),
        help="folder holding the medtuning_peft package to count (default: this checkout)",
    )
    parser.add_argument("--json", default=str(HERE / "results" / "operation_counts.json"), help="output JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root = Path(args.package_root).resolve()
    if not (root / "medtuning_peft" / "__init__.py").is_file():
        raise SystemExit(f"--package-root {root}: expected a folder holding medtuning_peft/__init__.py")
    # The package under --package-root, not an installed one: path entries come before the installed finder.
    sys.path[:0] = [str(root), str(HERE)]
    import medtuning_peft.volumetric  # noqa: F401  (imported before step_time adds this checkout's root)

    if not Path(medtuning_peft.volumetric.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"medtuning_peft was imported from {medtuning_peft.volumetric.__file__}, not {root}")
    import step_time
    import torch
    import transformers

    from medtuning_peft.tuners.med_adapter.modules import SpectralFilter

    transformers.logging.set_verbosity_error()
    SpectralFilter.matmul_max_slices = {"cpu": 128, "cuda": 128}  # the CUDA form at the paper's D = 128
    # The paper setting's models and slice size, fewer slices and a narrower decoder: counts do not depend on them.
    setting = dataclasses.replace(
        step_time.SETTINGS["paper"],
        description="the paper setting's backbones and 128 x 128 slices, 8 slices, UperNet 32, bf16 autocast",
        num_slices=8,
        decoder_channels=32,
    )
    device = torch.device("cpu")
    volume, labels = step_time.make_input(setting, device)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for backbone in setting.backbones:
        counts[backbone] = {}
        for method in METHODS:
            model = step_time.build_method(setting, backbone, method, device)
            ops = step_time.count_operations(
                step_time.Runner(model, setting.autocast, device), volume, labels
            )
            counts[backbone][method] = {"operations": ops["kernels"], "casts": ops["casts"]}
            print(f"{backbone} {method}: {ops['kernels']} operations, {ops['casts']} casts", flush=True)
    report = {"package_root": str(root), "setting": setting.description, "counts": counts}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
