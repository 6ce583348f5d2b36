#!/usr/bin/env bash
# The paper-setting cost benchmark on one CUDA GPU (issue 5), in one command:
#   Swin-T (depths 2-2-6-2) and ViT-B/16, one 4-channel 128^3 volume, bf16 autocast, UperNet 512;
#   step_time.py's default methods side by side (on CUDA: med_adapter, med_adapter+cuda_graphs,
#   med_adapter_reference, med_adapter+ckpt, full, lora, decoder_only, frozen_backward).
# About 3-4 minutes on an H200: 3.8 and 3.2 min in the first two runs of cost.md's "GPU", 176 s in its run 4 with
# med_adapter+cuda_graphs (gpu_session.sh's log, from "== cost" to "== done"). Needs only this repository and
# a python3 with torch (CUDA), transformers 5.x and peft 0.21: nothing is downloaded (random-init backbones
# built from configs).
# Writes benchmarks/results/cost_paper_cuda.json and puts the tables into benchmarks/cost.md (replacing the
# section of an earlier GPU run). Extra arguments go to benchmarks/step_time.py, e.g.
#   bash benchmarks/gpu_cost.sh --json "$OUT/cost_paper_cuda.json" --markdown "$OUT/cost_paper_cuda.md"
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
# Preflight: the packages the benchmark imports, at the versions pyproject.toml asks for, and a GPU.
import importlib.metadata as metadata
import sys
import tomllib

from packaging.requirements import Requirement

used = {"torch", "transformers", "peft", "huggingface-hub", "safetensors", "accelerate", "scipy", "numpy", "tqdm"}
with open("pyproject.toml", "rb") as f:
    requirements = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
problems = []
for req in requirements:
    name = req.name.lower().replace("_", "-")
    if name not in used:
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        problems.append(f"{req.name} is not installed (pyproject.toml: {req})")
        continue
    print(f"{req.name} {version}")
    if not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req.name} {version} does not satisfy pyproject.toml's {req}")
if problems:
    sys.exit("gpu_cost.sh: " + "; ".join(problems) + ". Install matching versions (e.g. pip install 'peft>=0.21,<0.22').")
import torch

if not torch.cuda.is_available():
    sys.exit("gpu_cost.sh: no CUDA GPU visible; for the CPU figures run: python benchmarks/step_time.py --setting cpu")
print(torch.cuda.get_device_name(0))
PY
exec "$PYTHON" benchmarks/step_time.py --setting paper --device cuda "$@"
