"""The UperNet decoder alone, in channels-last layout and in the layout its input maps come in, side by side.

The decoder (UperNet, 512 channels, over the 32 x 32 to 4 x 4 maps of the ``paper`` setting's 128 slices)
is most of that setting's training step for every method. This times its training step (forward, loss,
backward, Adam) and its inference with ``SegmentationDecoder.channels_last`` on and off, alternating rounds
after warm-up, on Swin-T's feature maps (handed over in NCHW) and on ViT-B/16's (token grids viewed as
(N, C, h, w), through the simple feature pyramid), and reports how far the two layouts' logits differ.

    python benchmarks/decoder_layout.py --device cuda --json benchmarks/results/decoder_layout_cuda.json

On CPU (``--device cpu``) the default size is cut to 8 slices.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # run from a checkout without installing the package
        sys.path.insert(0, str(path))

import step_time  # noqa: E402

from medtuning_peft.decoders import UperNetDecoder  # noqa: E402

# (channels, grid) of the maps each backbone hands the decoder for one 128 x 128 slice.
FEATURES = {
    "swin-t": ([96, 192, 384, 768], [32, 16, 8, 4], False),
    "vit-b16": ([768] * 4, [8] * 4, True),  # four blocks at 8 x 8 tokens; the pyramid makes 32 .. 4
}


def make_features(backbone: str, slices: int, device: torch.device) -> list[torch.Tensor]:
    """Feature maps laid out as the backbones hand them over (Swin: NCHW; ViT: permuted token grids)."""
    channels, grids, plain = FEATURES[backbone]
    gen = torch.Generator().manual_seed(0)
    if plain:  # (N, h, w, C) tokens viewed as (N, C, h, w), as the segmenter does for a plain ViT
        return [
            torch.randn(slices, g, g, c, generator=gen).permute(0, 3, 1, 2).to(device)
            for c, g in zip(channels, grids)
        ]
    return [torch.randn(slices, c, g, g, generator=gen).to(device) for c, g in zip(channels, grids)]


def measure(backbone: str, slices: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Training step and inference of the decoder on one backbone's maps, in both layouts, alternating."""
    channels, _, plain = FEATURES[backbone]
    features = make_features(backbone, slices, device)
    labels = torch.randint(0, 4, (slices, 128, 128), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(0)
    decoder = UperNetDecoder(channels, 4, channels=args.channels, simple_pyramid=plain).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def train(channels_last: bool) -> None:
        decoder.channels_last = channels_last
        decoder.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = decoder(features, (128, 128))
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    def infer(channels_last: bool) -> torch.Tensor:
        decoder.channels_last = channels_last
        decoder.eval()
        with torch.inference_mode(), autocast:
            return decoder(features, (128, 128))

    entry: dict = {
        "max_abs_logit_difference_bf16": (infer(False).float() - infer(True).float()).abs().max().item()
    }
    for name, step in (("train_step_ms", train), ("inference_ms", infer)):
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.warmup):
            step(False)
            step(True)
        for i in range(args.rounds):
            for layout in (False, True) if i % 2 == 0 else (True, False):
                step_time._sync(device)
                start = time.perf_counter()
                step(layout)
                step_time._sync(device)
                times[layout].append(1000 * (time.perf_counter() - start))
        entry[name] = {
            "as_handed_over": statistics.median(times[False]),
            "channels_last": statistics.median(times[True]),
            "channels_last_vs_as_handed_over": statistics.median(
                t / n for t, n in zip(times[True], times[False])
            ),
        }
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--slices", type=int, default=None, help="slices per volume (default 128; 8 on CPU)")
    parser.add_argument("--channels", type=int, default=512, help="UperNet width")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    slices = args.slices or (128 if device.type == "cuda" else 8)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    report = step_time.side_report(
        "decoder_layout.py",
        argv,
        f"UperNet {args.channels} decoder alone, {slices} slices of 128 x 128, bf16 autocast",
        device,
        rounds=args.rounds,
        warmup=args.warmup,
    )
    for backbone in FEATURES:
        entry = measure(backbone, slices, args, device)
        report["results"][backbone] = entry
        print(backbone, json.dumps(entry), flush=True)
        step_time.write_json(args.json, report)  # what is measured so far survives a time limit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [
        f"{report['what']}; {report['device']}, torch {torch.__version__}; `{report['command']}`; {report['date']}",
        "",
        "| maps of | train step ms, layout as handed over | channels-last | ratio | inference ms, as handed over | channels-last | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for backbone, e in report["results"].items():
        t, i = e["train_step_ms"], e["inference_ms"]
        lines.append(
            f"| {backbone} | {t['as_handed_over']:.1f} | {t['channels_last']:.1f} | {t['channels_last_vs_as_handed_over']:.2f} | "
            f"{i['as_handed_over']:.1f} | {i['channels_last']:.1f} | {i['channels_last_vs_as_handed_over']:.2f} |"
        )
    report["markdown"] = "\n".join(lines)
    print(report["markdown"])
    step_time.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
