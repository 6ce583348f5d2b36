"""The cost benchmark (benchmarks/step_time.py): its report plumbing, and its GPU code path shrunk to CPU."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_time  # noqa: E402

import medtuning_peft  # noqa: E402
from medtuning_peft.tuners.med_adapter import MedAdapter  # noqa: E402


def test_markdown_section_of_a_run_is_replaced_not_duplicated(tmp_path):
    path = tmp_path / "cost.md"
    path.write_text("# Cost\n\nHand-written notes.\n")
    step_time.write_markdown(path, "cpu_cpu", "first run")
    step_time.write_markdown(path, "paper_cuda", "gpu run")
    step_time.write_markdown(path, "cpu_cpu", "second run")
    text = path.read_text()
    assert text.startswith("# Cost\n\nHand-written notes.\n")
    assert "first run" not in text and text.count("second run") == 1 and text.count("gpu run") == 1
    assert text.index("second run") < text.index("gpu run")  # replaced where it was


def test_quartiles_and_median_of_step_times():
    summary = step_time.summary_ms([0.004, 0.001, 0.003, 0.002, 0.005])
    assert summary == {"median": 3.0, "q1": 2.0, "q3": 4.0, "n": 5}


def test_unknown_setting_and_method_are_refused():
    with pytest.raises(ValueError, match="Unknown --setting 'gpu'"):
        step_time.get_setting("gpu", tiny=False)
    with pytest.raises(SystemExit):
        step_time.parse_args(["--methods", "adapter"])


@pytest.mark.slow
def test_paper_setting_code_path_runs_every_method_on_cpu(tmp_path):
    # The GPU command (benchmarks/gpu_cost.sh) at a tiny size: bf16 autocast, both backbone families, every
    # method, the report files.
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--setting", "paper", "--tiny"]
    command += ["--device", "cpu", "--threads", "1", "--json", str(out), "--markdown", str(md)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["setting"] == "paper-tiny" and report["device"] == "cpu"
    assert set(report["results"]) == {"swin-tiny", "vit-tiny"}
    for results in report["results"].values():
        # CUDA graphs are a CUDA feature: a CPU run leaves that method out unless it is named.
        assert list(results) == [m for m in step_time.METHODS if m not in step_time.CUDA_ONLY_METHODS]
        assert results["full"]["ratios"]["step_vs_full"] == 1.0
        assert results["med_adapter"]["tuned_params"] < results["full"]["tuned_params"]
        assert results["med_adapter"]["adapter_bytes"] < results["med_adapter"]["checkpoint_bytes"]
        assert results["full"]["ratios"]["kernels_vs_full"] == 1.0
        assert results["full"]["step_vs_full_per_round"] == {"median": 1.0, "q1": 1.0, "q3": 1.0, "n": 2}
        assert (
            results["med_adapter"]["operations"]["kernels"]
            > results["frozen_backward"]["operations"]["kernels"]
        )
    assert report["paper_swin_t_adapter"]["adapter_params"] == 737_568
    text = md.read_text()
    assert "<!-- cost:paper-tiny_cpu start -->" in text and "| med_adapter_reference |" in text
    assert "| method | operations | x full | casts |" in text


def test_busy_time_is_the_union_of_intervals():
    assert step_time.busy_microseconds([]) == 0
    assert step_time.busy_microseconds([(20, 30), (0, 10), (5, 15)]) == 25  # overlap counted once
    assert step_time.busy_microseconds([(0, 10), (2, 3), (10, 12)]) == 12  # nested and touching


def _tiny_runners(methods, autocast=torch.bfloat16):
    setting = step_time.get_setting("paper", tiny=True)
    device = torch.device("cpu")
    volume, labels = step_time.make_input(setting, device)
    runners = {
        m: step_time.Runner(step_time.build_method(setting, "vit-tiny", m, device), autocast, device)
        for m in methods
    }
    return runners, volume, labels


def test_adapter_bottleneck_is_not_cast_under_bf16_autocast():
    # Under autocast only the two projections of an adapter follow autocast; the bottleneck runs in float32
    # with autocast off, so its parameters and their gradients are not cast every step (the reference form
    # casts them all).
    from medtuning_peft.tuners.med_adapter import MedAdapter

    runners, volume, labels = _tiny_runners(["med_adapter", "med_adapter_reference", "frozen_backward"])
    casts = {m: step_time.count_operations(r, volume, labels)["casts"] for m, r in runners.items()}
    adapters = sum(isinstance(m, MedAdapter) for m in runners["med_adapter"].model.modules())
    assert adapters == 6
    per_adapter = (casts["med_adapter"] - casts["frozen_backward"]) / adapters
    per_adapter_reference = (casts["med_adapter_reference"] - casts["frozen_backward"]) / adapters
    # x, z, U and the projections' weights and biases, forward and backward: 15 casts at most.
    assert 0 < per_adapter <= 15 < per_adapter_reference


def test_operation_count_and_profiled_activity_of_a_step():
    runners, volume, labels = _tiny_runners(["med_adapter"], autocast=None)
    runner = runners["med_adapter"]
    ops = step_time.count_operations(runner, volume, labels)
    assert ops["casts"] == 0  # float32 throughout without autocast
    assert ops["all"] > ops["kernels"] > 0 and "convolution" in ops["top"]
    activity = step_time.device_activity(runner, volume, labels, torch.device("cpu"), steps=2)
    assert activity["kernels_per_step"] > 0
    assert 0 < activity["busy_ms_per_step"] <= activity["profiled_wall_ms_per_step"]
    top = activity["top_kernels"]
    assert 0 < len(top) <= 15 and len({t["name"] for t in top}) == len(top)
    times = [t["ms_per_step"] for t in top]
    assert times == sorted(times, reverse=True) and all(t["calls_per_step"] > 0 for t in top)
    # Top-level operators on CPU: their summed time cannot exceed the step's busy time.
    assert sum(times) <= activity["busy_ms_per_step"] * (1 + 1e-6)


def test_compiled_methods_run_only_when_named():
    assert step_time.parse_args([]).methods is None  # the default depends on the device
    cpu, cuda = (step_time.default_methods(torch.device(d)) for d in ("cpu", "cuda"))
    assert not set(step_time.OPTIONAL_METHODS) & (set(cpu) | set(cuda))
    assert cuda == list(step_time.METHODS) and "med_adapter+cuda_graphs" not in cpu
    args = step_time.parse_args(["--methods", "med_adapter+compile", "full+compile"])
    assert args.methods == ["med_adapter+compile", "full+compile"]


@pytest.mark.slow
def test_operation_counts_of_the_paper_models(tmp_path):
    # The paper's Swin-T and ViT-B/16 at their real widths under bf16 autocast: 12 adapters each, and the
    # adapters' casts are their projections' only (15 per adapter).
    out = tmp_path / "ops.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "operation_counts.py"), "--json", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    counts = json.loads(out.read_text())["counts"]
    for backbone in ("swin-t", "vit-b16"):
        c = counts[backbone]
        assert (c["med_adapter"]["casts"] - c["frozen_backward"]["casts"]) / 12 <= 15, backbone
        assert c["frozen_backward"]["operations"] < c["med_adapter"]["operations"]
        assert c["med_adapter"]["operations"] < c["med_adapter+ckpt"]["operations"]


def test_a_failing_method_leaves_the_comparison_and_the_others_are_measured(monkeypatch):
    # The GPU run is one command on a borrowed machine: a method that fails (a compiler error, running out of
    # memory) must not cost the figures of the others. Failures are injected: one method cannot be built, one
    # fails in its second timed round.
    setting = step_time.get_setting("paper", tiny=True)
    assert (setting.warmup, setting.rounds) == (1, 2)
    real_build = step_time.build_method
    calls = {"lora": 0}

    def build(setting, backbone, method, device, seed=0):
        if method == "decoder_only":
            raise ValueError("no decoder (injected)")
        model = real_build(setting, backbone, method, device, seed)
        if method == "lora":

            def fail_on_third_call(*_):
                calls["lora"] += 1
                if calls["lora"] == 3:  # warm-up, round 1, then round 2
                    raise RuntimeError("CUDA out of memory (injected)\nsecond line")

            model.register_forward_pre_hook(fail_on_third_call)
        return model

    monkeypatch.setattr(step_time, "build_method", build)
    args = step_time.parse_args(["--tiny", "--methods", "full", "med_adapter", "lora", "decoder_only"])
    results = step_time.benchmark_backbone(args, setting, "vit-tiny", torch.device("cpu"))

    assert list(results) == ["full", "med_adapter", "lora", "decoder_only"]
    assert results["lora"] == {"error": "RuntimeError: CUDA out of memory (injected)"}
    assert results["decoder_only"] == {"error": "ValueError: no decoder (injected)"}
    assert results["med_adapter"]["step_vs_full_per_round"]["n"] == 2
    assert results["med_adapter"]["ratios"]["step_vs_full"] > 0
    assert "error" not in results["med_adapter"]["memory"]
    report = {
        "setting": "paper-tiny",
        "description": setting.description,
        "device": "cpu",
        "machine": step_time.machine_info(torch.device("cpu")),
        "command": "python benchmarks/step_time.py",
        "date": "2026-11-28T00:00:00+00:00",
        "warmup": 1,
        "rounds": 2,
        "memory_method": "peak RSS",
        "results": {"vit-tiny": results},
    }
    text = step_time.markdown_section(report)
    assert "| med_adapter |" in text and "| lora |" not in text
    assert "- lora failed: `RuntimeError: CUDA out of memory (injected)`" in text
    assert "- decoder_only failed: `ValueError: no decoder (injected)`" in text


def test_decoder_layout_benchmark_code_path(tmp_path):
    """benchmarks/decoder_layout.py shrunk to CPU: both layouts run, and their logits agree."""
    import decoder_layout

    out = tmp_path / "layout.json"
    report = decoder_layout.main(
        [
            "--device",
            "cpu",
            "--slices",
            "2",
            "--channels",
            "8",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["results"].keys() == {"swin-t", "vit-b16"}
    for entry in report["results"].values():
        assert entry["max_abs_logit_difference_bf16"] < 1e-2
        for key in ("train_step_ms", "inference_ms"):
            assert entry[key]["as_handed_over"] > 0 and entry[key]["channels_last"] > 0
    assert "| swin-t |" in report["markdown"]


def test_optimizer_step_benchmark_code_path(tmp_path):
    """benchmarks/optimizer_step.py on the tiny models: every implementation steps its own copy to the same values."""
    import optimizer_step

    out, md = tmp_path / "optimizer.json", tmp_path / "cost.md"
    argv = [
        "--device",
        "cpu",
        "--tiny",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
        "--markdown",
        str(md),
    ]
    report = optimizer_step.main(argv)
    assert json.loads(out.read_text())["results"].keys() == {
        f"{b} {m}" for b in ("swin-tiny", "vit-tiny") for m in ("med_adapter", "full")
    }
    for entry in report["results"].values():
        assert set(entry["step_ms"]) == {"for_loop", "foreach", "fused"}
        assert all(t > 0 for t in entry["step_ms"].values()) and entry["vs_for_loop"]["for_loop"] == 1.0
        differences = entry["max_abs_param_difference_vs_for_loop"]
        assert (
            differences["for_loop"] == 0 and max(differences.values()) < 1e-5
        )  # 3 steps of lr 2e-3: rounding only
    assert (
        report["results"]["swin-tiny med_adapter"]["tensors"] > report["results"]["swin-tiny full"]["tensors"]
    )
    assert "<!-- cost:optimizer_cpu start -->" in md.read_text() and "| vit-tiny full |" in md.read_text()


def test_adapter_kernels_benchmark_code_path(tmp_path):
    """benchmarks/adapter_kernels.py shrunk to CPU: every CPU form runs the same function as the current one."""
    import adapter_kernels

    out = tmp_path / "adapter.json"
    argv = ["--device", "cpu", "--slices", "4", "--rounds", "1", "--warmup", "0", "--json", str(out)]
    report = adapter_kernels.main([*argv, "--blocks", "swin-t stage 4", "vit-b16"])
    assert json.loads(out.read_text())["results"].keys() == {"swin-t stage 4", "vit-b16"}
    for forms in report["results"].values():
        assert set(forms) == {"current", "cudnn_off", "bf16_bottleneck"}  # cuda_graphs is CUDA-only
        assert forms["current"]["max_abs_diff"] == 0 and forms["cudnn_off"]["max_abs_diff"] == 0
        assert 0 < forms["bf16_bottleneck"]["max_abs_diff"] < 0.1  # bf16 rounding, not another function
        assert all(f["enqueue_ms"] > 0 and f["kernels"] > 0 for f in forms.values())
    # A subset of forms (gpu_session.sh leaves cuda_graphs out after failed graph tests): still compared with the
    # current form, which is then not measured itself.
    subset = adapter_kernels.main([*argv, "--blocks", "vit-b16", "--forms", "cudnn_off"])["results"][
        "vit-b16"
    ]
    assert set(subset) == {"cudnn_off"} and subset["cudnn_off"]["max_abs_diff"] == 0
    from medtuning_peft.tuners.med_adapter.modules import DepthwiseBranch

    assert DepthwiseBranch.forward.__name__ == "forward"  # the native form's patch was undone


# Excerpts in the shape of inductor's output code: kernel definitions at column 0 after blank lines, the kernels'
# own sources (lines such as `tmp0 = triton_helpers.maximum(...)`, a decorator's `triton_meta=`), and the launches
# inside `call`.
_CPP_CODE = """
cpp_fused_add_relu_0 = async_compile.cpp_pybinding(['float*', 'const float*'], \'\'\'
extern "C" void kernel(float* out_ptr0, const float* in_ptr0)
{
    out_ptr0[0] = in_ptr0[0];
}
\'\'\')


cpp_fused_mul_1 = async_compile.cpp_pybinding(['float*'], \'\'\'
extern "C" void kernel(float* out_ptr0) {}
\'\'\')


def call(args):
    arg0_1, = args
    buf0 = empty_strided_cpu((4, 8), (8, 1), torch.float32)
    cpp_fused_add_relu_0(buf0, arg0_1)
    buf1 = extern_kernels.convolution(buf0, arg0_1, stride=(1, 1))
    cpp_fused_mul_1(buf1)
    buf2 = torch.ops.aten.convolution_backward.default(buf1, buf0)
    return (buf2, )
"""
_TRITON_CODE = """
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', \'\'\'
@triton_heuristics.pointwise(
    size_hints={'x': 1024},
    triton_meta={'signature': {'in_ptr0': '*fp32'}},
)
@triton.jit
def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    tmp0 = tl.load(in_ptr0 + (x0), xmask)
    tmp1 = triton_helpers.maximum(tmp0, tmp0)
    tl.store(out_ptr0 + (x0), tmp1, xmask)
\'\'\', device_str='cuda')


def call(args):
    arg0_1, = args
    with torch.cuda._DeviceGuard(0):
        buf0 = empty_strided_cuda((4, 8), (8, 1), torch.float32)
        stream0 = get_raw_stream(0)
        triton_poi_fused_add_0.run(arg0_1, buf0, 32, stream=stream0)
        triton_poi_fused_add_0.run(buf0, arg0_1, 32, stream=stream0)
        extern_kernels.mm(buf0, arg0_1, out=buf0)
    return (buf0, )
"""


def test_generated_calls_count_launches_not_definitions_or_kernel_sources():
    import adapter_kernels

    assert adapter_kernels.generated_calls([_CPP_CODE]) == {"generated_kernels": 2, "external_calls": 2}
    assert adapter_kernels.generated_calls([_TRITON_CODE]) == {"generated_kernels": 2, "external_calls": 1}
    assert adapter_kernels.generated_calls([_CPP_CODE, _TRITON_CODE]) == {
        "generated_kernels": 4,
        "external_calls": 3,
    }


@pytest.mark.slow
def test_adapter_kernels_compiled_forms_count_what_inductor_generates(tmp_path):
    import adapter_kernels

    argv = [
        "--device",
        "cpu",
        "--slices",
        "4",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--blocks",
        "swin-t stage 4",
    ]
    report = adapter_kernels.main([*argv, "--forms", "compiled_shifts", "compiled_convolution"])
    forms = report["results"]["swin-t stage 4"]
    assert set(forms) == {"compiled_shifts", "compiled_convolution"}
    for entry in forms.values():
        assert entry["max_abs_diff"] < 0.05  # the same function (bf16 autocast, another summation order)
        assert entry["compile_s"] > 0 and entry["generated_kernels"] > 0 and entry["external_calls"] > 0
    # Shifted sums fuse into inductor's kernels; convolutions stay library calls, forward and backward.
    assert forms["compiled_shifts"]["external_calls"] < forms["compiled_convolution"]["external_calls"]
    assert "| swin-t stage 4 | compiled_shifts |" in report["markdown"]


# Fresh backbone factories (the tiny setting's shapes): a factory's first model is the case under test.
FACTORIES = {
    "swin": lambda: step_time._swin(32, 12, [1, 1, 2, 1], [1, 1, 2, 2], 4),
    "vit": lambda: step_time._vit(32, 8, 24, 6, 2),
}


@pytest.mark.parametrize("family", FACTORIES)
def test_every_method_starts_from_the_same_weights(family):
    """The comparison is between methods, not initializations: the first model built is no exception."""
    import dataclasses

    factory = FACTORIES[family]()
    setting = dataclasses.replace(step_time.get_setting("paper", tiny=True), backbones={"b": factory})
    first, second, full = (
        step_time.build_method(setting, "b", method, torch.device("cpu")).state_dict()
        for method in ("med_adapter", "med_adapter", "full")
    )
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Backbone and decoder weights under peft's names: base_layer / modules_to_save wrappers stripped.
    plain = {
        k.replace(".base_layer", "").replace(".modules_to_save.default", ""): v
        for k, v in first.items()
        if "med_adapter." not in k and ".original_module." not in k
    }
    shared = set(plain) & set(full)
    assert len(shared) > 0.9 * len(full)
    assert all(torch.equal(plain[k], full[k]) for k in shared)


@pytest.mark.slow
@pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 7),
    reason="torch.compile of transformers models needs torch >= 2.7",
)
def test_compiled_adapters_method_runs_and_writes_its_own_section(tmp_path):
    """med_adapter+compile_adapters (the GPU run's launch-fusion check) at a tiny size on CPU."""
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--setting", "paper", "--tiny"]
    command += ["--device", "cpu", "--threads", "1", "--backbones", "vit-tiny", "--json", str(out)]
    command += ["--markdown", str(md), "--methods", "med_adapter+compile_adapters", "med_adapter", "full"]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["setting"] == "paper-tiny-compile"  # not the standard run's section
    results = report["results"]["vit-tiny"]
    assert "error" not in results["med_adapter+compile_adapters"]
    assert results["med_adapter+compile_adapters"]["tuned_params"] == results["med_adapter"]["tuned_params"]
    assert "<!-- cost:paper-tiny-compile_cpu start -->" in md.read_text()


def test_another_decoder_is_named_and_refused_when_unknown():
    paper = step_time.get_setting("paper", tiny=False)
    assert step_time.with_decoder(paper, None, None) == (paper, "")
    assert step_time.with_decoder(paper, "upernet", 512) == (paper, "")  # the setting's own: the standard run
    fpn, suffix = step_time.with_decoder(paper, "fpn", None)
    # FPNDecoder's default width
    assert (fpn.decoder, fpn.decoder_channels, suffix) == ("fpn", 128, "-fpn128")
    assert fpn.summary().endswith("bf16 autocast, FPN 128 channels")
    narrow, suffix = step_time.with_decoder(paper, None, 256)
    assert (narrow.decoder, narrow.decoder_channels, suffix) == ("upernet", 256, "-upernet256")
    known = "known decoders: \\['fpn', 'segformer', 'upernet'\\]"
    with pytest.raises(ValueError, match=f"Unknown --decoder 'unet'; {known}"):
        step_time.with_decoder(paper, "unet", None)
    with pytest.raises(ValueError, match="--decoder-channels must be at least 1, got 0"):
        step_time.with_decoder(paper, "fpn", 0)
    with pytest.raises(SystemExit):
        step_time.parse_args(["--decoder", "unet"])


def test_a_run_with_another_decoder_trains_it_in_every_method_and_writes_its_own_section(tmp_path):
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--setting", "cpu", "--tiny"]
    command += ["--device", "cpu", "--threads", "1", "--backbones", "vit-tiny", "--json", str(out)]
    command += ["--markdown", str(md), "--methods", "full", "med_adapter", "--decoder", "fpn"]
    command += ["--decoder-channels", "8"]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["setting"] == "cpu-tiny-fpn8" and report["decoder"] == {"name": "fpn", "channels": 8}
    assert report["description"].endswith("FPN 8 channels")
    assert "<!-- cost:cpu-tiny-fpn8_cpu start -->" in md.read_text()
    results = report["results"]["vit-tiny"]
    assert results["med_adapter"]["tuned_params"] < results["full"]["tuned_params"]
    setting, _ = step_time.with_decoder(step_time.get_setting("cpu", tiny=True), "fpn", 8)
    for method in ("full", "med_adapter"):
        model = step_time.build_method(setting, "vit-tiny", method, torch.device("cpu"))
        decoder = step_time.trained_decoder(model)  # every method trains the decoder
        assert isinstance(decoder, medtuning_peft.decoders.FPNDecoder) and decoder.classifier.in_channels == 8
        assert all(p.requires_grad for p in decoder.parameters())
    # The CPU memory probe runs in a process of its own: it must build the same decoder.
    args = step_time.parse_args(["--setting", "cpu", "--tiny", "--decoder", "fpn", "--decoder-channels", "8"])
    assert step_time.cpu_peak_memory(args, "vit-tiny", "med_adapter")["decoder"] == "FPNDecoder"


def _gpu_session(
    tmp_path: Path, steps: list[str], pytest_exit: int, env: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """Run benchmarks/gpu_session.sh with an interpreter that records its calls: tests exit with
    ``pytest_exit``, the benchmarks exit 0, the method-list query runs in this Python. Returns the script's
    exit status and the recorded calls."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{log}"\n'
        'case "$1" in\n'
        f"  -m) exit {pytest_exit} ;;\n"
        f'  -c) exec "{sys.executable}" "$@" ;;\n'
        "  -) cat > /dev/null ;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), str(tmp_path / "out"), *steps],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "HOME": str(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, log.read_text().splitlines() if log.exists() else []


def _benchmark_call(calls: list[str]) -> str:
    (call,) = [c for c in calls if c.startswith("benchmarks/step_time.py")]
    return call


def test_gpu_session_measures_cuda_graphs_only_after_their_tests_passed(tmp_path):
    # The default command: the graph tests, the cost benchmark with every default method, the kernel comparison.
    code, calls = _gpu_session(tmp_path / "pass", [], pytest_exit=0)
    assert code == 0
    assert "-k cuda_graphs and not compiled_adapters" in calls[0] and calls[-1].startswith(
        "benchmarks/adapter_kernels.py --device cuda --json"
    )
    # That selection, collected for real: every CUDA graph test but the compiled adapters' (a cold inductor
    # compile, run by the compile step), from the files named.
    files = [f for f in calls[0].split() if f.startswith("tests/")]
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "gpu",
            "-k",
            "cuda_graphs and not compiled_adapters",
            "-p",
            "no:cacheprovider",
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    selected = [line for line in collected.splitlines() if "::" in line]
    assert len(selected) >= 20 and not any("compiled" in line for line in selected)
    assert any("test_graphed_training_matches_eager_training" in line for line in selected)
    assert "--setting paper --device cuda" in _benchmark_call(calls)
    assert "--methods" not in _benchmark_call(calls)  # the default methods: CUDA graphs included on CUDA
    # Failed graph tests: the standard figures are still measured, without the graph method.
    code, calls = _gpu_session(tmp_path / "fail", [], pytest_exit=1)
    assert code == 1
    methods = _benchmark_call(calls).split("--methods ")[1].split(" --json")[0].split()
    assert methods == step_time.default_methods(torch.device("cpu"))
    assert "med_adapter+cuda_graphs" not in methods and "med_adapter" in methods
    import adapter_kernels

    forms = calls[-1].split("--forms ")[1].split(" --json")[0].split()
    assert forms == [f for f in adapter_kernels.FORMS if f != "cuda_graphs"] and "cudnn_off" in forms
    # The cost step alone, without graph tests in the same folder, does not risk the graphs either.
    code, calls = _gpu_session(tmp_path / "alone", ["cost"], pytest_exit=0)
    assert code == 0 and "--methods" in _benchmark_call(calls)


def test_gpu_session_measures_compiled_adapters_only_after_both_tests_passed(tmp_path):
    code, calls = _gpu_session(tmp_path / "pass", ["graph-tests", "compile"], pytest_exit=0)
    assert code == 0
    assert "tests/test_compiled_adapter_graphs.py" in calls[1]
    benchmark = _benchmark_call(calls)
    assert "--setting paper --device cuda --backbones vit-b16 swin-t" in benchmark
    methods = benchmark.split("--methods ")[1].split(" --json")[0].split()
    assert "med_adapter+compile_adapters+cuda_graphs" in methods and "full" in methods
    assert set(methods) <= set(step_time.ALL_METHODS)  # a misspelt method would cost the GPU run
    assert "cost_paper-compile_cuda.json" in benchmark
    log = (tmp_path / "pass" / "out" / "session.log").read_text()
    assert "== graph-tests" in log and "== compile" in log and "== done" in log
    # Failed tests, or no graph tests in the same folder: nothing compiled is measured.
    for folder, steps, pytest_exit in (("fail", ["graph-tests", "compile"], 1), ("alone", ["compile"], 0)):
        code, calls = _gpu_session(tmp_path / folder, steps, pytest_exit=pytest_exit)
        assert code != 0 and not [c for c in calls if c.startswith("benchmarks/step_time.py")]
        assert not any("test_compiled_adapter_graphs.py" in c for c in calls)  # nor its test: graphs untested
    # Graph tests passed in an earlier command on the same machine: measured without running them again.
    code, calls = _gpu_session(
        tmp_path / "earlier", ["compile"], pytest_exit=0, env={"CUDA_GRAPHS_TESTED": "1"}
    )
    assert code == 0 and "tests/test_compiled_adapter_graphs.py" in calls[0] and _benchmark_call(calls)


def test_gpu_session_fpn_step_runs_the_light_decoder_comparison(tmp_path):
    code, calls = _gpu_session(tmp_path / "pass", ["graph-tests", "fpn"], pytest_exit=0)
    assert code == 0
    benchmark = _benchmark_call(calls)
    assert "--setting paper --device cuda --decoder fpn" in benchmark
    assert "cost_paper-fpn128_cuda.json" in benchmark
    methods = benchmark.split("--methods ")[1].split(" --json")[0].split()
    expected = [m for m in step_time.default_methods(torch.device("cuda")) if m != "med_adapter_reference"]
    assert methods == expected and "med_adapter+cuda_graphs" in methods and "frozen_backward" in methods
    # Without passed graph tests in the same folder: the same comparison without CUDA graphs.
    code, calls = _gpu_session(tmp_path / "alone", ["fpn"], pytest_exit=0)
    methods = _benchmark_call(calls).split("--methods ")[1].split(" --json")[0].split()
    assert code == 0 and "med_adapter+cuda_graphs" not in methods and "med_adapter" in methods
    code, calls = _gpu_session(tmp_path / "earlier", ["fpn"], pytest_exit=0, env={"CUDA_GRAPHS_TESTED": "1"})
    methods = _benchmark_call(calls).split("--methods ")[1].split(" --json")[0].split()
    assert code == 0 and methods == expected and not any(c.startswith("-m pytest") for c in calls)


def test_gpu_session_optimizer_step_times_adam_on_cuda(tmp_path):
    import optimizer_step

    code, calls = _gpu_session(tmp_path, ["optimizer"], pytest_exit=0)
    (call,) = [c for c in calls if c.startswith("benchmarks/optimizer_step.py")]
    args = optimizer_step.parse_args(
        call.split()[1:]
    )  # the options the script takes, spelt as it spells them
    assert code == 0 and args.device == "cuda" and args.json.endswith("optimizer_step_cuda.json")
    assert args.markdown.endswith("optimizer_step_cuda.md")  # not the repository's cost.md on the device


def test_gpu_session_fusion_step_compares_compiled_forms_of_one_adapter(tmp_path):
    import adapter_kernels

    code, calls = _gpu_session(tmp_path / "pass", ["graph-tests", "fusion"], pytest_exit=0)
    (call,) = [c for c in calls if c.startswith("benchmarks/adapter_kernels.py")]
    assert code == 0 and "--device cuda --blocks vit-b16 swin-t stage 1" in call
    forms = call.split("--forms ")[1].split(" --json")[0].split()
    assert forms == ["current", "compiled_shifts", "compiled_convolution", "cuda_graphs"]
    assert set(forms) <= {*adapter_kernels.FORMS, *adapter_kernels.COMPILED_FORMS}
    assert "adapter_kernels_compiled_cuda.json" in call
    code, calls = _gpu_session(tmp_path / "alone", ["fusion"], pytest_exit=0)  # graphs untested: left out
    (call,) = [c for c in calls if c.startswith("benchmarks/adapter_kernels.py")]
    assert code == 0 and "cuda_graphs" not in call


def test_gpu_session_refuses_an_unknown_step_before_running_anything(tmp_path):
    code, calls = _gpu_session(tmp_path, ["tests", "costs"], pytest_exit=0)
    assert code == 2 and calls == []


def test_compiled_adapters_with_cuda_graphs_method_compiles_every_adapter_and_enables_graphs():
    setting = step_time.get_setting("paper", tiny=True)
    method = "med_adapter+compile_adapters+cuda_graphs"
    model = step_time.build_method(setting, "vit-tiny", method, torch.device("cpu"))
    adapters = [m for m in model.modules() if isinstance(m, MedAdapter)]
    assert adapters and all(m._compiled_call_impl is not None for m in adapters)
    assert medtuning_peft.cuda_graphs_enabled(model)
    assert method in step_time.CUDA_ONLY_METHODS and method not in step_time.default_methods(
        torch.device("cuda")
    )


@pytest.mark.parametrize("backbone", ["swin-tiny", "vit-tiny"])
def test_checkpointing_with_cuda_graphs_method_enables_both(backbone):
    setting = step_time.get_setting("paper", tiny=True)
    method = "med_adapter+ckpt+cuda_graphs"
    model = step_time.build_method(setting, backbone, method, torch.device("cpu"))
    assert medtuning_peft.cuda_graphs_enabled(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.backbone.modules())
    assert method in step_time.default_methods(torch.device("cuda"))
    assert method not in step_time.default_methods(torch.device("cpu"))


def test_peak_memory_is_measured_with_no_timed_model_alive(monkeypatch):
    # Peak memory is measured one method at a time after the timed rounds: a model, its gradients or its
    # optimizer state left from the rounds would count in every method's peak.
    import gc

    alive = []

    def probe(setting, backbone, method, *device):
        gc.collect()
        alive.append(sum(isinstance(o, step_time.Runner) for o in gc.get_objects()))
        return {"peak_bytes": 1}

    monkeypatch.setattr(step_time, "memory_probe", probe)
    setting = step_time.get_setting("paper", tiny=True)
    args = step_time.parse_args(["--tiny", "--methods", "full", "decoder_only"])
    results = step_time.benchmark_backbone(args, setting, "vit-tiny", torch.device("cpu"))
    assert alive == [0, 0] and results["full"]["memory"] == {"peak_bytes": 1}


def test_a_write_cut_short_leaves_the_earlier_results_and_sections_whole(tmp_path, monkeypatch):
    # The JSON and cost.md are rewritten during a run on a borrowed machine whose time limit can stop it at
    # any moment: a write that stops midway must not truncate them (cost.md holds every other run's section).
    md, out = tmp_path / "cost.md", tmp_path / "cost.json"
    step_time.write_markdown(md, "cpu_cpu", "cpu run")
    step_time.write_markdown(md, "paper_cuda", "gpu run")
    step_time.write_json(out, {"results": {"swin-t": {}}})
    before = md.read_text(), out.read_text()
    real_write_text = Path.write_text

    def cut_short(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device (injected)")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError, match="injected"):
        step_time.write_markdown(md, "paper_cuda", "another gpu run")
    with pytest.raises(OSError, match="injected"):
        step_time.write_json(out, {"results": {"swin-t": {}, "vit-b16": {}}})
    monkeypatch.undo()
    assert (md.read_text(), out.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cost.json", "cost.md"]  # no temporary left


def test_the_last_backbone_is_written_before_the_side_figures(tmp_path, monkeypatch):
    # The run ends with the paper's adapter checkpoint size: a failure there (or the time limit) must not cost
    # the measurements of the last backbone.
    def benchmark(args, setting, backbone, device):
        return {"full": {"error": f"measured {backbone}"}}

    def paper_adapter():
        raise RuntimeError("cannot build (injected)")

    monkeypatch.setattr(step_time, "benchmark_backbone", benchmark)
    monkeypatch.setattr(step_time, "paper_swin_t_adapter_bytes", paper_adapter)
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    step_time.main(
        ["--setting", "paper", "--tiny", "--device", "cpu", "--json", str(out), "--markdown", str(md)]
    )
    report = json.loads(out.read_text())
    assert report["results"] == {
        "swin-tiny": {"full": {"error": "measured swin-tiny"}},
        "vit-tiny": {"full": {"error": "measured vit-tiny"}},
    }
    assert "incomplete" not in report and report["paper_swin_t_adapter_error"].startswith("RuntimeError")
    assert "measured vit-tiny" in md.read_text()


def test_gpu_session_keeps_every_step_within_the_session_budget(tmp_path):
    # The device runs one command for at most 600 s: `graph-tests cost fpn` has step limits adding up to 780 s,
    # so each step's limit is cut to what is left of the session's budget, and the command ends by itself.
    bin_dir, log = tmp_path / "bin", tmp_path / "timeouts.log"
    bin_dir.mkdir()
    fake_timeout = bin_dir / "timeout"
    fake_timeout.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\nexec /usr/bin/timeout "$@"\n')
    fake_timeout.chmod(0o755)
    python = tmp_path / "python"
    python.write_text(
        '#!/usr/bin/env bash\ncase "$1" in\n  -m) sleep 2 ;;\n'
        f'  -c) exec "{sys.executable}" "$@" ;;\n  -) cat > /dev/null ;;\nesac\n'
    )
    python.chmod(0o755)

    def session(budget: str) -> tuple[subprocess.CompletedProcess, list[int]]:
        log.unlink(missing_ok=True)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(python), "HOME": str(tmp_path)}
        done = subprocess.run(
            [
                "bash",
                str(ROOT / "benchmarks" / "gpu_session.sh"),
                str(tmp_path / f"out{budget}"),
                "graph-tests",
            ]
            + ["cost", "fpn"],
            env={**env, "SESSION_BUDGET_S": budget},
            capture_output=True,
            text=True,
            timeout=120,
        )
        calls = [line.split() for line in log.read_text().splitlines()]
        return done, [int(c[2] if c[0] == "-k" else c[0]) for c in calls]  # timeout [-k N] LIMIT COMMAND

    done, limits = session("200")
    assert done.returncode == 0 and limits[0] == 150  # the graph tests' own limit fits
    # After the graph tests' 2 s, the cost and light-decoder steps get what is left, not their 330 and 300 s (the
    # lower bound leaves room for a loaded machine: only the cut matters, not how long the fake steps took).
    assert len(limits) == 3 and 100 <= limits[2] <= limits[1] <= 198, limits
    assert "time limit cut to" in done.stdout
    done, limits = session("16")  # the graph tests run; no time is left for the others
    assert done.returncode == 124 and len(limits) == 1 and limits[0] <= 16
    assert done.stdout.count("not started") == 2 and "== done" in done.stdout
    bad = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), str(tmp_path / "bad"), "cost"],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(python), "SESSION_BUDGET_S": "10m"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "SESSION_BUDGET_S" in bad.stderr


def test_adapter_kernels_keeps_the_other_forms_and_blocks_when_one_fails(tmp_path, monkeypatch):
    # A form can fail after its first call (CUDA graphs are captured at the second), and a block can be cut
    # short by the session's time limit: the forms and blocks measured before are kept.
    import adapter_kernels

    real_context, calls = adapter_kernels.form_context, {"cudnn_off": 0}

    @contextlib.contextmanager
    def form_context(form):
        if form == "cudnn_off":
            calls[form] += 1
            if calls[form] == 2:  # its warm-up, after the first call compared it with the current form
                raise RuntimeError("capture failed (injected)")
        with real_context(form):
            yield

    monkeypatch.setattr(adapter_kernels, "form_context", form_context)
    out = tmp_path / "adapter.json"
    argv = ["--device", "cpu", "--slices", "4", "--rounds", "2", "--warmup", "1", "--json", str(out)]
    forms = adapter_kernels.main([*argv, "--blocks", "vit-b16"])["results"]["vit-b16"]
    assert forms["cudnn_off"] == {"error": "RuntimeError: capture failed (injected)"}
    assert forms["current"]["wall_ms"] > 0 and forms["bf16_bottleneck"]["kernels"] > 0
    real_measure = adapter_kernels.measure

    def measure(name, *rest):
        if name == "swin-t stage 4":
            raise KeyboardInterrupt  # the time limit's signal, say
        return real_measure(name, *rest)

    monkeypatch.setattr(adapter_kernels, "measure", measure)
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        adapter_kernels.main([*argv, "--forms", "current", "--blocks", "vit-b16", "swin-t stage 4"])
    assert list(json.loads(out.read_text())["results"]) == ["vit-b16"]


@pytest.mark.parametrize("backbone", ["swin-tiny", "vit-tiny"])
def test_every_variant_of_the_papers_methods_keeps_the_patch_embedding_frozen(backbone):
    # The paper's methods (Med-Adapter, LoRA) freeze the stem, also with 4-channel input where the package
    # trains it by default: each variant (reference form, checkpointing, graphs, compiled) tunes the same
    # parameters as its plain method, so the comparison is between forms of one method.
    setting = step_time.get_setting("paper", tiny=True)
    assert setting.in_channels > 1
    tuned = {}
    for method in step_time.ALL_METHODS:
        model = step_time.build_method(setting, backbone, method, torch.device("cpu"))
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        stem = list(model.backbone.get_input_embeddings().parameters())
        assert stem, method
        tuned[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if method.startswith(("med_adapter", "lora", "decoder_only", "frozen_backward")):
            assert not any(p.requires_grad for p in stem), method
        else:
            assert all(p.requires_grad for p in stem), method
    for method, count in tuned.items():
        plain = "frozen_backward" if method == "frozen_backward" else method.split("+")[0]
        plain = "med_adapter" if plain == "med_adapter_reference" else plain
        assert count == tuned[plain], method


def test_a_failing_operation_count_keeps_the_timings_of_every_method(monkeypatch):
    # The operation count runs after the timed rounds, as the kernel profile does: its failure for one method
    # must not cost the backbone's figures.
    real_count = step_time.count_operations

    def count(runner, volume, labels):
        if any(p.requires_grad for p in runner.model.backbone.parameters()) and len(runner.params) > 100:
            raise RuntimeError("dispatch failed (injected)")
        return real_count(runner, volume, labels)

    monkeypatch.setattr(step_time, "count_operations", count)
    setting = step_time.get_setting("paper", tiny=True)
    args = step_time.parse_args(["--tiny", "--methods", "full", "decoder_only"])
    results = step_time.benchmark_backbone(args, setting, "vit-tiny", torch.device("cpu"))
    assert results["full"]["operations_error"] == "RuntimeError: dispatch failed (injected)"
    assert "operations" not in results["full"] and results["decoder_only"]["operations"]["kernels"] > 0
    assert results["decoder_only"]["ratios"]["step_vs_full"] > 0 and "kernels_vs_full" not in results["full"]
    report = {
        "setting": "paper-tiny",
        "description": setting.description,
        "device": "cpu",
        "machine": step_time.machine_info(torch.device("cpu")),
        "command": "python benchmarks/step_time.py",
        "date": "2026-11-28T00:00:00+00:00",
        "warmup": 1,
        "rounds": 2,
        "memory_method": "peak RSS",
        "results": {"vit-tiny": results},
    }
    text = step_time.markdown_section(report)
    assert "- full: operations not counted: `RuntimeError: dispatch failed (injected)`" in text
    assert "| full | - | - | - |" in text


def test_decoder_checkpointing_benchmark_checkpoints_the_same_function(monkeypatch):
    """The measured variant recomputes stages in backward and computes what UperNetHead.forward computes."""
    import decoder_checkpointing

    stages = []
    real = decoder_checkpointing.checkpoint
    monkeypatch.setattr(
        decoder_checkpointing, "checkpoint", lambda *a, **k: stages.append(1) or real(*a, **k)
    )
    decoder_checkpointing.check_same_function()  # raises when outputs, gradients or statistics differ
    assert len(stages) == 2 * 8  # per step: 3 laterals, the pyramid pooling, 3 FPN convolutions, the fusion
