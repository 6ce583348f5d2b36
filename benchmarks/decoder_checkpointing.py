"""Peak memory with the UperNet decoder checkpointed stage by stage, against the decoder as the package runs it.

A measurement of a memory lever that the package does not ship (``benchmarks/cost.md``, "Tried and dropped"):
each convolution of transformers' ``UperNetHead`` with its BatchNorm and activation, the pyramid pooling, and the
upsampling + concatenation + fusion + classifier at the finest level run as non-reentrant checkpoints, so that
in backward one stage's activations are recomputed at a time. The function computed is the same (the script
checks outputs, gradients and BatchNorm statistics against the unchecked decoder on a small input first).

Peak memory is ``step_time.memory_probe``'s: the peak RSS of a fresh CPU process over build + 2 training steps.

    python benchmarks/decoder_checkpointing.py --setting paper --slices 16 --threads 1   # ~12 min on 2 cores
    python benchmarks/decoder_checkpointing.py --setting cpu --threads 1                 # ~3 min
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # run from a checkout without installing the package
        sys.path.insert(0, str(path))

import step_time  # noqa: E402

from medtuning_peft.decoders import UperNetDecoder  # noqa: E402

METHODS = ("full", "decoder_only", "med_adapter+ckpt")


@contextlib.contextmanager
def _buffers_kept(modules):
    """Put the modules' BatchNorm statistics back after a recomputation (updated once per step)."""
    buffers = [b for m in modules for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def _stage(fn, *inputs, owners):
    return checkpoint(
        fn, *inputs, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(owners))
    )


def staged_decode(decoder: UperNetDecoder, features: list[torch.Tensor]) -> torch.Tensor:
    """``UperNetHead.forward`` with the same modules and operations in the same order, stage by stage."""
    head = decoder.head
    laterals = [_stage(conv, x, owners=[conv]) for conv, x in zip(head.lateral_convs, features)]
    psp = [head.psp_modules, head.bottleneck]
    laterals.append(_stage(lambda x: head.psp_forward([x]), features[-1], owners=psp))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(
            laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear", align_corners=head.align_corners
        )
    outs = [_stage(conv, x, owners=[conv]) for conv, x in zip(head.fpn_convs, laterals)]

    def fuse(*maps):
        size = maps[0].shape[2:]
        up = [maps[0]] + [
            F.interpolate(m, size=size, mode="bilinear", align_corners=head.align_corners) for m in maps[1:]
        ]
        return head.classifier(head.fpn_bottleneck(torch.cat(up, dim=1)))

    return _stage(fuse, *outs, laterals[-1], owners=[head.fpn_bottleneck])


def stage_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Make every UperNet decoder in ``model`` decode stage by stage while gradients are recorded."""
    for module in model.modules():
        if isinstance(module, UperNetDecoder):
            plain = module.decode
            module.decode = lambda f, m=module, p=plain: (
                staged_decode(m, f) if torch.is_grad_enabled() else p(f)
            )
    return model


def check_same_function() -> None:
    """Outputs, input and weight gradients and BatchNorm statistics equal those of the unchecked decoder."""
    torch.manual_seed(0)
    channels = [8, 16, 24, 32]
    plain = UperNetDecoder(channels, 3, channels=16).train()
    staged = stage_checkpointing(copy.deepcopy(plain))
    for step in range(2):
        inputs = [
            torch.randn(4, c, s, s, generator=torch.Generator().manual_seed(step))
            for c, s in zip(channels, [16, 8, 4, 2])
        ]
        a, b = ([x.clone().requires_grad_() for x in inputs] for _ in range(2))
        out_a, out_b = plain(a, (32, 32)), staged(b, (32, 32))
        out_a.square().mean().backward()
        out_b.square().mean().backward()
        same = torch.equal(out_a, out_b) and all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))
        same &= all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), staged.parameters()))
        same &= all(torch.equal(p, q) for p, q in zip(plain.buffers(), staged.buffers()))
        if not same:
            raise AssertionError(
                f"stage-checkpointed UperNet differs from UperNetHead.forward at step {step}"
            )


def probe(setting: step_time.Setting, backbone: str, method: str, staged: bool) -> dict:
    build = step_time.build_method
    if staged:
        step_time.build_method = lambda *a, **k: stage_checkpointing(build(*a, **k))
    return step_time.memory_probe(setting, backbone, method)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="cpu", help="a setting of step_time.py (default: cpu)")
    parser.add_argument("--slices", type=int, default=None, help="override the setting's number of slices")
    parser.add_argument("--backbones", nargs="+", default=None, help="default: the setting's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="the setting's tiny version (code path check)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--probe", nargs=3, metavar=("BACKBONE", "METHOD", "STAGED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = step_time.get_setting(args.setting, args.tiny)
    if args.slices:
        setting = dataclasses.replace(setting, num_slices=args.slices)
    if args.probe:
        backbone, method, staged = args.probe
        print(json.dumps(probe(setting, backbone, method, staged == "1")))
        return {}
    check_same_function()
    argv_base = [sys.executable, str(Path(__file__).resolve()), "--setting", args.setting]
    argv_base += ["--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    argv_base += ["--slices", str(args.slices)] if args.slices else []
    report = {
        "setting": args.setting,
        "num_slices": setting.num_slices,
        "machine": step_time.machine_info(torch.device("cpu")),
    }
    report["peak_mib"] = {}
    for backbone in args.backbones or list(setting.backbones):
        rows = report["peak_mib"][backbone] = {}
        for method in METHODS:
            for staged in ("0", "1") if method != "full" else ("0",):
                done = subprocess.run(
                    [*argv_base, "--probe", backbone, method, staged], capture_output=True, text=True
                )
                if done.returncode != 0:
                    raise RuntimeError(
                        f"probe {backbone} {method} staged={staged} failed:\n{done.stderr[-3000:]}"
                    )
                peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
                rows[method + ("+staged_decoder" if staged == "1" else "")] = round(peak, 1)
                print(backbone, method, "staged" if staged == "1" else "", f"{peak:,.0f} MiB", flush=True)
    if args.json:
        step_time.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
