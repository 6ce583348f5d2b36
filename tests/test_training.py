"""The training engine in-process on a tiny synthetic KiTS19-layout set: sharding, schedule, loss, resume, outputs."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from medtuning_peft import training
from medtuning_peft.data import write_synthetic_kits19
from medtuning_peft.evaluation import evaluate_case
from medtuning_peft.io_utils import CorruptFileError
from medtuning_peft.training import (
    SettingsError,
    ShardedBatchSampler,
    TrainingInterrupted,
    TrainSettings,
    _use_cpu_processes,
    _write_json,
    build_parser,
    complete_checkpoints,
    make_optimizer,
    settings_from_args,
    train,
    train_from_args,
    warmup_cosine,
)

SHAPE = (24, 48, 48)  # (D, H, W) of the synthetic cases


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each train() call in this process starts from a clean Accelerate state, as a launched script does."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kits")
    write_synthetic_kits19(folder, num_cases=4, shape=SHAPE, spacing=(3.0, 3.0, 3.0), seed=0)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny_settings(data_dir, cache_dir, output_dir, **overrides) -> TrainSettings:
    options = {
        "dataset": "kits19",
        "data_dir": None if data_dir is None else str(data_dir),
        "cache_dir": str(cache_dir),
        "output_dir": str(output_dir),
        "backbone": "tiny-swin",
        "decoder": "fpn",
        "decoder_channels": 16,
        "crop_size": [16, 32, 32],
        "batch_size": 2,
        "samples_per_case": 4,
        "max_steps": 6,
        "val_every": 0,
        "sw_overlap": 0.25,
        "val_fraction": 0.25,
        "log_every": 100,
    }
    return TrainSettings(**{**options, **overrides})


# ---------------------------------------------------------------------------------------------------------
# Sharding and schedule
# ---------------------------------------------------------------------------------------------------------


def test_each_process_gets_whole_disjoint_samples_that_make_up_the_global_batch():
    num_samples, b, P = 23, 2, 3
    shards = [list(ShardedBatchSampler(num_samples, b, P, p, seed=5, epoch=2)) for p in range(P)]
    single = list(ShardedBatchSampler(num_samples, b * P, 1, 0, seed=5, epoch=2))
    assert [len(s) for s in shards] == [num_samples // (b * P)] * P  # DDP never waits on a missing batch
    for m, global_batch in enumerate(single):
        parts = [shards[p][m] for p in range(P)]
        assert all(len(part) == b for part in parts)  # whole samples (volumes), b per process
        assert sorted(sum(parts, [])) == sorted(global_batch)  # together: the one-process batch
        assert len(set(sum(parts, []))) == b * P  # disjoint


def test_n_processes_see_the_micro_batches_of_one_process_accumulating_n():
    two = [list(ShardedBatchSampler(16, 1, 2, p, seed=0)) for p in range(2)]
    one = list(ShardedBatchSampler(16, 1, 1, 0, seed=0))
    for t in range(8):  # optimizer step t: micro-batches 2t and 2t+1 of the accumulating process
        assert [two[0][t], two[1][t]] == [one[2 * t], one[2 * t + 1]]


def test_sampler_resumes_mid_epoch_where_it_stopped():
    full = list(ShardedBatchSampler(20, 2, seed=1, epoch=3))
    assert list(ShardedBatchSampler(20, 2, seed=1, epoch=3, start=4)) == full[4:]
    assert list(ShardedBatchSampler(20, 2, seed=1, epoch=4)) != full  # a new permutation each epoch


def test_sampler_refuses_a_global_batch_larger_than_the_epoch():
    with pytest.raises(ValueError, match="samples-per-case"):
        ShardedBatchSampler(3, 2, num_processes=2)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    factor = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    warm = [factor(s) for s in range(10)]
    assert warm[0] > 0 and np.all(np.diff(warm) > 0)
    assert factor(10) == pytest.approx(1.0)
    decay = [factor(s) for s in range(10, 101)]
    assert np.all(np.diff(decay) <= 1e-12)
    assert factor(100) == pytest.approx(0.1)
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5)


def test_optimizer_is_the_recipes_adam_with_amsgrad_fused_on_cpu():
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (4, 1, 3, 3)]  # a projection, a bias, a depthwise kernel
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]

    def run(make):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        return optimizer, params

    engine, trained = run(
        lambda params: make_optimizer(params, lr=3e-3, weight_decay=1e-2, device=torch.device("cpu"))
    )
    assert engine.defaults["fused"] is True
    # The recipe: Adam with AMSGrad, the given lr and weight decay, as the per-tensor implementation takes them.
    _, expected = run(
        lambda params: torch.optim.Adam(params, lr=3e-3, weight_decay=1e-2, amsgrad=True, foreach=False)
    )
    for p, q in zip(trained, expected):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all("max_exp_avg_sq" in state for state in engine.state.values())
    # Devices without a fused Adam get torch's default implementation.
    meta = make_optimizer(
        [torch.nn.Parameter(torch.zeros(2, device="meta"))], lr=1e-3, weight_decay=0, device="meta"
    )
    assert meta.defaults["fused"] is None


# ---------------------------------------------------------------------------------------------------------
# Settings and command line
# ---------------------------------------------------------------------------------------------------------


def test_parser_has_an_option_per_setting_and_script_defaults(tmp_path):
    parser = build_parser("demo", crop_size=[8, 16, 16], max_steps=7)
    args = parser.parse_args(["--output-dir", str(tmp_path), "--crop-size", "4", "8", "8", "--flip-tta"])
    settings = settings_from_args(args, dataset="msd", data_dir=str(tmp_path))
    assert settings.crop_size == [4, 8, 8] and settings.max_steps == 7 and settings.flip_tta
    assert settings.dataset == "msd" and settings.lr == 2e-3 and settings.weight_decay == 1e-5
    assert "--resume" in parser.format_help() and "--report-to" in parser.format_help()
    with pytest.raises(ValueError, match="not TrainSettings fields"):
        build_parser("demo", crop=[1, 2, 3])


def test_epochs_on_the_command_line_override_a_scripts_default_step_count(tmp_path):
    # The example scripts default to max_steps=300 for a quick run; the reference recipe's `--epochs 250` must
    # train 250 epochs, not those 300 steps. A --max-steps typed too still wins, in either order.
    parser = build_parser("demo", max_steps=300)

    def steps_and_epochs(*flags: str) -> tuple:
        args = parser.parse_args(["--output-dir", str(tmp_path), *flags])
        settings = settings_from_args(args, dataset="msd", data_dir=str(tmp_path))
        return settings.max_steps, settings.epochs

    assert steps_and_epochs() == (300, None)
    assert steps_and_epochs("--epochs", "250") == (None, 250)
    assert steps_and_epochs("--epochs", "250", "--max-steps", "20") == (20, 250)
    assert steps_and_epochs("--max-steps", "20", "--epochs", "250") == (20, 250)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"crop_size": [16, 32]}, "crop_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": None, "epochs": None}, "max-steps"),
        ({"dataset": "kits"}, "Did you mean 'kits19'"),
        ({"sw_overlap": 1.0}, "sw_overlap"),
        ({"resume": True, "overwrite": True}, "resume and overwrite"),
        (
            {"cuda_graphs": True, "method": "lora"},
            "cuda_graphs=True graphs the Med-Adapters, but method='lora'",
        ),
    ],
)
def test_invalid_settings_name_the_field_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_settings(tmp_path, tmp_path, tmp_path / "out", **overrides)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"decoder_channels": 0}, "decoder_channels"),  # not "the decoder's default"
        ({"decoder_channels": -4}, "decoder_channels"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),  # would flip the gradients
        ({"max_grad_norm": 0.0}, "max_grad_norm"),  # would silently not clip
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"num_workers": -1}, "num_workers"),
        ({"max_steps": -1}, "max_steps"),
        ({"crop_size": [0, 32, 32]}, "crop_size"),
        ({"target_spacing": [0.0, 1.0, 1.0]}, "target_spacing"),
        ({"num_folds": 5}, "fold"),
        ({"num_folds": 1, "fold": 0}, "num_folds"),
        ({"num_folds": 5, "fold": 5}, "fold"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"seed": -1}, "seed"),
        ({"et_min_voxels": -1}, "et_min_voxels"),
        ({"method": "full", "train_patch_embedding": False}, "train_patch_embedding"),
        ({"method": "decoder_only", "train_patch_embedding": True}, "train_patch_embedding"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(SettingsError, match=f"{field}=") as error:
        tiny_settings(tmp_path, tmp_path, tmp_path / "out", **overrides)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("channels", "flag", "trained"),
    [(["flair", "t1", "t1ce", "t2"], None, True), (["flair", "t1", "t1ce", "t2"], False, False),
     (["CT"], None, False), (["CT"], True, True)],
)  # fmt: skip
def test_multichannel_data_train_the_patch_embedding_unless_told_not_to(tmp_path, channels, flag, trained):
    # Frozen, the embedding adapted from RGB passes on only the sum of BraTS' four sequences.
    settings = tiny_settings(tmp_path, tmp_path, tmp_path / "out", train_patch_embedding=flag)
    task = {
        "channel_names": channels,
        "label_values": [0, 1, 2],
        "label_names": ["background", "a", "b"],
        "preprocessing": None,
    }
    model = training._build_model(settings, task)
    stem = [p.requires_grad for n, p in model.named_parameters() if "patch_embeddings" in n]
    assert stem and any(stem) == trained  # trained: peft's copy of it (modules_to_save)


def test_help_shows_a_scripts_docstring_with_its_commands_as_written():
    doc = "Train.\n\n    accelerate launch train.py --data-dir d \\\n        --crop-size 128 128 128\n"
    text = build_parser(doc).format_help()
    assert "    accelerate launch train.py --data-dir d \\\n        --crop-size 128 128 128\n" in text


def test_settings_errors_are_usage_errors_naming_the_flag(tmp_path, capsys):
    parser = build_parser("demo")
    args = parser.parse_args(["--output-dir", str(tmp_path / "out"), "--max-steps", "5", "--lr", "inf"])
    with pytest.raises(SystemExit) as exit_:
        train_from_args(parser, args, dataset="kits19", data_dir=str(tmp_path))
    assert exit_.value.code == 2
    assert "error: argument --lr: lr=inf; pass a positive learning rate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_json_files_are_replaced_whole_or_not_at_all(tmp_path):
    # metrics.json and trainer_state.json: keys in the order written; a value JSON cannot hold leaves the
    # previous file and no temporary file behind.
    path = tmp_path / "metrics.json"
    _write_json(path, {"step": 3, "dice": float("nan")})
    before = path.read_text()
    assert list(json.loads(before)) == ["step", "dice"]
    with pytest.raises(TypeError):
        _write_json(path, {"step": 4, "model": object()})
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_cpu_launch_that_started_one_of_several_processes_is_refused(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` sets
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes N"):
        _use_cpu_processes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _use_cpu_processes() == (not torch.cuda.is_available())  # gloo on a machine without CUDA


# ---------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easy_run(data_dir, cache_dir, tmp_path_factory):
    """30 steps on the synthetic set (bright kidneys in soft tissue: an easy problem)."""
    output_dir = tmp_path_factory.mktemp("easy")
    settings = tiny_settings(data_dir, cache_dir, output_dir, max_steps=30, val_every=15)
    metrics = train(settings)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return output_dir, metrics


def test_loss_is_finite_and_falls_on_an_easy_problem(easy_run):
    _, metrics = easy_run
    losses = [h["loss"] for h in metrics["history"]["loss"]]
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])
    assert [h["lr"] for h in metrics["history"]["loss"]][:2] == pytest.approx([2e-3 / 4, 2e-3 * 2 / 4])


def test_validation_reports_kits_metrics_per_case_and_summary(easy_run):
    output_dir, metrics = easy_run
    keys = {"dice_kidney", "dice_tumor", "dice_mean", "hd95_kidney", "hd95_tumor", "hd95_mean"}
    assert set(metrics["summary"]) == keys
    assert set(metrics["per_case"]) == set(metrics["data"]["val_cases"]) and len(metrics["per_case"]) == 1
    assert all(set(case) == keys for case in metrics["per_case"].values())
    assert [v["step"] for v in metrics["history"]["validation"]] == [15, 30]
    on_disk = json.loads((output_dir / "metrics.json").read_text())
    assert (
        on_disk["summary"] == metrics["summary"] and on_disk["steps"] == 30 and on_disk["samples_seen"] == 60
    )
    assert on_disk["parameters"]["tuned"] < on_disk["parameters"]["total"]
    assert (output_dir / "model" / "segmenter_config.json").is_file() and on_disk["adapter_bytes"] > 0
    assert sorted(p.name for p in (output_dir / "predictions").iterdir()) == [
        f"{c}.nii.gz" for c in metrics["data"]["val_cases"]
    ]
    assert [step for step, _ in complete_checkpoints(output_dir / "checkpoints")] == [15, 30]  # keep 2


def test_saved_model_records_what_prediction_needs(easy_run):
    output_dir, _ = easy_run
    config = json.loads((output_dir / "model" / "segmenter_config.json").read_text())
    assert config["label_values"] == [0, 1, 2] and config["label_names"] == ["background", "kidney", "tumor"]
    assert config["crop_size"] == [16, 32, 32] and config["preprocessing"]["kind"] == "ct"


def test_checkpoints_hold_no_pickle_for_the_model(easy_run):
    output_dir, _ = easy_run
    folder = output_dir / "checkpoints" / "step_30"
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "pytorch_model.bin" not in names
    state = torch.load(folder / "optimizer.bin", weights_only=True)  # our own file, read without pickle code
    assert state["param_groups"][0]["amsgrad"] is True and state["param_groups"][0]["weight_decay"] == 1e-5


def test_checkpoints_record_the_validation_of_their_step(easy_run):
    # Saved before their step's validation, then updated with it: a resume does not validate again.
    output_dir, metrics = easy_run
    for step in (15, 30):
        state = json.loads((output_dir / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())
        assert state["history"]["validation"] == [
            v for v in metrics["history"]["validation"] if v["step"] <= step
        ]
        assert state["mixed_precision"] == metrics["run"]["mixed_precision"]  # resolved, compared on resume
    assert metrics["summary"] == metrics["history"]["validation"][-1]["summary"]


def test_an_earlier_run_needs_resume_or_overwrite(easy_run, data_dir, cache_dir):
    output_dir, _ = easy_run
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_settings(data_dir, cache_dir, output_dir, max_steps=30))


class Stop(Exception):
    pass


def stop_after(step: int):
    def callback(info):
        if info.step == step:
            raise Stop

    return callback


def optimizer_state(folder):
    return torch.load(folder / "optimizer.bin", weights_only=True)["state"]


def test_resume_continues_from_the_saved_step_with_the_same_optimizer_and_final_weights(
    data_dir, cache_dir, tmp_path
):
    base = tiny_settings(data_dir, cache_dir, tmp_path / "straight", checkpoint_every=3)
    straight = train(base)

    interrupted = replace(base, output_dir=str(tmp_path / "interrupted"))
    with pytest.raises(Stop):
        train(interrupted, on_step_end=stop_after(4))  # killed after step 4; last checkpoint at 3
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # A half-written checkpoint (killed while saving) and a foreign folder: both ignored by resume.
    (tmp_path / "interrupted" / "checkpoints" / ".step_6.partial").mkdir()
    (tmp_path / "interrupted" / "checkpoints" / "step_9.old").mkdir()
    assert [s for s, _ in complete_checkpoints(tmp_path / "interrupted" / "checkpoints")] == [3]

    seen = {}

    def record(info):
        if info.step == 4:  # the first step after resuming: Adam has taken 4 steps, not 1
            seen["adam_steps"] = {float(s["step"]) for s in info.optimizer.state_dict()["state"].values()}

    resumed = train(replace(interrupted, resume=True), on_step_end=record)
    assert resumed["resumed_from_step"] == 3 and seen["adam_steps"] == {4.0}
    assert not (tmp_path / "interrupted" / "checkpoints" / ".step_6.partial").exists()
    assert [h["step"] for h in resumed["history"]["loss"]] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(
        [h["loss"] for h in resumed["history"]["loss"]], [h["loss"] for h in straight["history"]["loss"]]
    )
    a, b = (tmp_path / name / "checkpoints" / "step_6" for name in ("straight", "interrupted"))
    state_a, state_b = optimizer_state(a), optimizer_state(b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(state_a[key][name], state_b[key][name], rtol=0, atol=0)
    weights_a = load_file(tmp_path / "straight" / "model" / "adapter_model.safetensors")
    weights_b = load_file(tmp_path / "interrupted" / "model" / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0)


def _losses(result: dict) -> list[float]:
    return [h["loss"] for h in result["history"]["loss"]]


def _train_again(base: TrainSettings, output_dir: Path, **changes) -> dict:
    """Train ``base`` with ``changes`` in this process, after another run: accelerate's singletons reset."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train(replace(base, output_dir=str(output_dir), **changes))


def test_accumulation_is_the_settings_whatever_the_launchers_environment_says(
    data_dir, cache_dir, tmp_path, monkeypatch, caplog
):
    # Accelerate reads ACCELERATE_GRADIENT_ACCUMULATION_STEPS over its constructor argument; the engine's sampler,
    # loss average and step count follow the settings, so the optimizer must step on the settings' boundaries.
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    accumulation = []
    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", max_steps=2, val_hd95=False)
    with caplog.at_level("WARNING", logger="medtuning_peft.training"):
        train(
            settings,
            on_step_end=lambda info: accumulation.append(info.accelerator.gradient_accumulation_steps),
        )
    assert accumulation == [1, 1]
    assert (
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2" in caplog.text
        and "--gradient-accumulation-steps" in caplog.text
    )


def test_gradient_checkpointing_gives_the_same_training(data_dir, cache_dir, tmp_path):
    base = tiny_settings(data_dir, cache_dir, tmp_path / "plain", max_steps=3)
    plain = train(base)
    checkpointed = _train_again(base, tmp_path / "ckpt", gradient_checkpointing=True)
    torch.testing.assert_close(_losses(checkpointed), _losses(plain))
    # The saved models match too, the adapters' BatchNorm running statistics included (validation uses them).
    saved = [load_file(tmp_path / run / "model" / "adapter_model.safetensors") for run in ("plain", "ckpt")]
    assert any(key.endswith("num_batches_tracked") for key in saved[0])
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        torch.testing.assert_close(saved[1][key], saved[0][key], rtol=1e-5, atol=1e-6, msg=key)


def test_data_loader_workers_give_the_same_training(data_dir, cache_dir, tmp_path):
    base = tiny_settings(data_dir, cache_dir, tmp_path / "plain", max_steps=3)
    plain = train(base)
    workers = _train_again(base, tmp_path / "workers", num_workers=2)
    torch.testing.assert_close(_losses(workers), _losses(plain))


def test_validation_runs_in_float32_so_predict_gives_the_runs_predictions(
    data_dir, cache_dir, tmp_path, monkeypatch
):
    # Mixed precision is for the training steps; validation predicts as `medtuning predict` does, in float32 with
    # the saved model, so predict writes the run's predictions/ again. CPU autocast in bf16 stands in for CUDA's.
    import medtuning_peft
    from medtuning_peft.data import default_preprocessing, list_kits19_cases, load_case
    from medtuning_peft.evaluation import probabilities_to_labels, sliding_window_predict

    autocast = {True: set(), False: set()}  # training mode -> autocast states of the forwards
    build_model = training._build_model

    def recording_build_model(settings, task):
        model = build_model(settings, task)
        model.register_forward_pre_hook(
            lambda module, args: autocast[module.training].add(torch.is_autocast_enabled(args[0].device.type))
        )
        return model

    monkeypatch.setattr(training, "_build_model", recording_build_model)
    settings = tiny_settings(
        data_dir, cache_dir, tmp_path / "run", max_steps=2, mixed_precision="bf16", val_hd95=False
    )
    metrics = train(settings)
    assert metrics["run"]["mixed_precision"] == "bf16" and autocast == {True: {True}, False: {False}}
    model = medtuning_peft.from_pretrained(tmp_path / "run" / "model").to(metrics["run"]["device"])
    config = model.segmenter_config
    files = {c.case_id: c for c in list_kits19_cases(data_dir)}
    for case_id in metrics["data"]["val_cases"]:
        case = load_case(files[case_id], default_preprocessing("CT", "kits19"))
        probs = sliding_window_predict(
            model,
            torch.from_numpy(np.array(case.image))[None],  # (C, D, H, W) -> (1, C, D, H, W)
            roi_size=tuple(config["crop_size"]),
            overlap=config["sw_overlap"],
            padding_value=case.background_value,
        )
        predicted = probabilities_to_labels(probs, config["label_values"])[0].numpy().astype(np.uint8)
        written = np.asarray(nib.load(tmp_path / "run" / "predictions" / f"{case_id}.nii.gz").dataobj)
        np.testing.assert_array_equal(case.geometry.to_original(predicted), written)


def test_cuda_graphs_off_cuda_are_refused_before_anything_is_written(data_dir, cache_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", max_steps=1, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device; this process runs on cpu"):
        train(settings)
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_cuda_graphs_give_the_same_training(data_dir, cache_dir, tmp_path):
    base = tiny_settings(data_dir, cache_dir, tmp_path / "eager", max_steps=4)
    eager = train(base)
    graphed = _train_again(base, tmp_path / "graphs", cuda_graphs=True)
    # bf16 autocast on CUDA, and cuDNN's backward may sum in another order from run to run.
    torch.testing.assert_close(_losses(graphed), _losses(eager), rtol=1e-3, atol=1e-4)
    assert graphed["summary"].keys() == eager["summary"].keys()
    both = _train_again(base, tmp_path / "both", cuda_graphs=True, gradient_checkpointing=True)
    torch.testing.assert_close(_losses(both), _losses(eager), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 7),
    reason="torch.compile of transformers models needs torch >= 2.7",
)
def test_training_compiled_by_accelerate_gives_the_same_training(data_dir, cache_dir, tmp_path, monkeypatch):
    # `accelerate launch --dynamo_backend ...` compiles the model in Accelerator.prepare; aot_eager traces
    # forward and backward as inductor would, without generating code (seconds instead of minutes on CPU).
    base = tiny_settings(data_dir, cache_dir, tmp_path / "plain", max_steps=3)
    plain = train(base)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _train_again(base, tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the model did run compiled
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # float32 tolerance: the traced graph's decompositions may round differently (2e-7 relative at the third
    # step with transformers 5.25); a wrong graph moves the loss by far more.
    torch.testing.assert_close(_losses(compiled), _losses(plain), rtol=1e-5, atol=1e-6)
    saved = load_file(tmp_path / "compiled" / "model" / "adapter_model.safetensors")
    assert saved and not any("_orig_mod" in key for key in saved)  # saved under the uncompiled names


@pytest.fixture(scope="module")
def stopped_run(data_dir, cache_dir, tmp_path_factory):
    """A 2-step run stopped after step 1, with its checkpoint step_1."""
    settings = tiny_settings(
        data_dir, cache_dir, tmp_path_factory.mktemp("stopped") / "run", max_steps=2, checkpoint_every=1
    )
    with pytest.raises(Stop):
        train(settings, on_step_end=stop_after(1))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return settings


@pytest.mark.parametrize(
    "change",
    [
        {"crop_size": [16, 32, 48]},
        {"max_grad_norm": 1.0},  # clipped gradients: another optimization
        {"foreground_probability": 0.1},  # other crops
        {"mixed_precision": "no" if torch.cuda.is_available() else "bf16"},  # not what "auto" resolved to
    ],
    ids=lambda change: next(iter(change)),
)
def test_resume_refuses_a_checkpoint_written_with_other_settings_naming_the_field(
    stopped_run, tmp_path, change
):
    run = tmp_path / "run"
    shutil.copytree(stopped_run.output_dir, run)
    name = next(iter(change))
    with pytest.raises(SettingsError, match=rf"written with other settings.*{name}") as error:
        train(replace(stopped_run, output_dir=str(run), resume=True, **change))
    assert error.value.field == name
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [1]  # nothing trained or written


@pytest.mark.parametrize(("recorded", "expected"), [(None, "channel"), ("none", "none")])
def test_resume_keeps_the_preprocessing_the_checkpoint_was_trained_with(
    cache_dir, tmp_path, recorded, expected
):
    # MRI's default z-score changed (each channel's non-zero voxels -> nnU-Net's rule): a resumed run goes on with
    # the preprocessing its checkpoint recorded, or, for a checkpoint written before it was recorded, with the
    # default of that time, so the input distribution does not change mid-training.
    sample = Path(__file__).resolve().parents[1] / "examples" / "data" / "msd_hippocampus_sample"
    settings = tiny_settings(
        sample, cache_dir, tmp_path / "run", dataset="msd", max_steps=2, checkpoint_every=1
    )
    with pytest.raises(Stop):
        train(settings, on_step_end=stop_after(1))
    state_file = tmp_path / "run" / "checkpoints" / "step_1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["preprocessing"]["kind"] == "mri" and state["preprocessing"]["mask"] == "auto"
    if recorded is None:
        del state["preprocessing"]
    else:
        state["preprocessing"]["mask"] = recorded
    state_file.write_text(json.dumps(state))
    resumed = _train_again(settings, tmp_path / "run", resume=True)
    assert resumed["resumed_from_step"] == 1
    assert resumed["data"]["preprocessing"]["mask"] == expected
    saved = json.loads((tmp_path / "run" / "model" / "segmenter_config.json").read_text())
    assert saved["preprocessing"]["mask"] == expected  # what medtuning predict applies
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    fresh = train(replace(settings, output_dir=str(tmp_path / "fresh")))
    assert fresh["data"]["preprocessing"]["mask"] == "auto"


def test_resume_compares_the_mixed_precision_as_resolved(stopped_run, tmp_path):
    # The checkpoint was written with "auto": the same precision spelled out is no change.
    run = tmp_path / "run"
    shutil.copytree(stopped_run.output_dir, run)
    resolved = "bf16" if torch.cuda.is_available() else "no"
    settings = replace(stopped_run, output_dir=str(run), resume=True, val_hd95=False, save_predictions=False)
    metrics = train(replace(settings, mixed_precision=resolved))
    assert metrics["resumed_from_step"] == 1 and metrics["run"]["mixed_precision"] == resolved


def test_resume_takes_a_setting_newer_than_the_checkpoint_as_its_default(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run.output_dir, run)
    state_file = run / "checkpoints" / "step_1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["settings"]["max_grad_norm"]  # written before the setting existed: no clipping
    state_file.write_text(json.dumps(state))
    with pytest.raises(SettingsError, match="max_grad_norm': \\(None, 1.0\\)"):
        train(replace(stopped_run, output_dir=str(run), resume=True, max_grad_norm=1.0))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    metrics = train(
        replace(stopped_run, output_dir=str(run), resume=True, val_hd95=False, save_predictions=False)
    )
    assert metrics["resumed_from_step"] == 1 and metrics["steps"] == 2


def test_resume_compares_the_patch_embedding_setting_as_resolved_for_the_data(data_dir, cache_dir, tmp_path):
    # One channel: the default froze it, which --no-train-patch-embedding names and --train-patch-embedding
    # contradicts. A checkpoint written before the setting existed (no key) froze it too.
    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", max_steps=2, checkpoint_every=1)
    with pytest.raises(Stop):
        train(settings, on_step_end=stop_after(1))
    state_file = tmp_path / "run" / "checkpoints" / "step_1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["train_patch_embedding"] is False
    del state["train_patch_embedding"]
    state_file.write_text(json.dumps(state))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(
        SettingsError, match="patch embedding frozen.*resume with --no-train-patch-embedding"
    ) as error:
        train(replace(settings, resume=True, train_patch_embedding=True))
    assert error.value.field == "train_patch_embedding"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    metrics = train(replace(settings, resume=True, train_patch_embedding=False))
    assert metrics["resumed_from_step"] == 1


def test_resume_refuses_data_whose_split_moved_training_cases_into_validation(cache_dir, tmp_path):
    data = tmp_path / "kits"
    write_synthetic_kits19(data, num_cases=4, shape=SHAPE, spacing=(3.0, 3.0, 3.0), seed=0)
    settings = tiny_settings(data, cache_dir, tmp_path / "run", max_steps=2, checkpoint_every=1)
    with pytest.raises(Stop):
        train(settings, on_step_end=stop_after(1))
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert sorted(state["split"]["train_cases"] + state["split"]["val_cases"]) == [
        f"case_0000{i}" for i in range(4)
    ]
    # One case more: the split is drawn anew over 5 cases, and the resumed run would validate on other cases.
    write_synthetic_kits19(data, num_cases=5, shape=SHAPE, spacing=(3.0, 3.0, 3.0), seed=0)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(SettingsError, match=r"trained on other data.*added \['case_00004'\]") as error:
        train(replace(settings, resume=True))
    assert error.value.field == "data_dir"
    assert not (tmp_path / "run" / "checkpoints" / "step_2").exists()


def test_resume_of_the_same_cases_split_by_another_rule_says_so(cache_dir, tmp_path):
    """A checkpoint whose split of the same cases differs from today's rule (earlier versions did not keep one
    patient's cases together) is refused with that cause, not with an empty list of added and removed cases."""
    data = tmp_path / "kits"
    write_synthetic_kits19(data, num_cases=4, shape=SHAPE, spacing=(3.0, 3.0, 3.0), seed=0)
    settings = tiny_settings(data, cache_dir, tmp_path / "run", max_steps=2, checkpoint_every=1)
    with pytest.raises(Stop):
        train(settings, on_step_end=stop_after(1))
    path = tmp_path / "run" / "checkpoints" / "step_1" / "trainer_state.json"
    state = json.loads(path.read_text())
    split = state["split"]
    split["train_cases"][0], split["val_cases"][0] = split["val_cases"][0], split["train_cases"][0]
    split["train_cases"].sort(), split["val_cases"].sort()
    path.write_text(json.dumps(state))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(SettingsError, match=r"split the same cases differently.*patient_id") as error:
        train(replace(settings, resume=True))
    assert error.value.field == "data_dir"


def test_training_foreground_ct_normalization_is_measured_on_the_training_cases_only(
    data_dir, cache_dir, tmp_path
):
    from medtuning_peft.data import CTPreprocessing, ct_preprocessing_from_cases, list_kits19_cases

    settings = tiny_settings(
        data_dir, cache_dir, tmp_path / "run", max_steps=1, ct_normalization="training-foreground"
    )
    metrics = train(settings)
    data = json.loads(json.dumps(metrics["data"]))  # as metrics.json holds it
    by_id = {c.case_id: c for c in list_kits19_cases(data_dir)}
    expected = json.loads(
        json.dumps(ct_preprocessing_from_cases([by_id[i] for i in data["train_cases"]]).to_dict())
    )
    assert data["preprocessing"] == expected != json.loads(json.dumps(CTPreprocessing().to_dict()))
    everything = ct_preprocessing_from_cases([by_id[i] for i in data["train_cases"] + data["val_cases"]])
    assert data["preprocessing"]["window"] != list(everything.window)  # the validation case did not enter it
    saved = json.loads((tmp_path / "run" / "model" / "segmenter_config.json").read_text())
    assert saved["preprocessing"] == expected  # what medtuning predict applies


def test_training_foreground_ct_statistics_are_measured_once_for_the_same_training_cases(
    tmp_path, monkeypatch
):
    """Later processes and runs on the same cases read the stored statistics; changed files are measured again."""
    import os

    import medtuning_peft.data as data
    from medtuning_peft.data import list_kits19_cases
    from medtuning_peft.training import _training_foreground_ct

    data_dir, cache_dir = tmp_path / "kits", tmp_path / "cache"
    write_synthetic_kits19(data_dir, num_cases=3, shape=SHAPE, spacing=(3.0, 3.0, 3.0), seed=0)
    measured = []
    measure = data.ct_preprocessing_from_cases
    monkeypatch.setattr(
        data, "ct_preprocessing_from_cases", lambda cases: measured.append(1) or measure(cases)
    )
    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", ct_normalization="training-foreground")
    cases = list_kits19_cases(data_dir)

    def statistics(cases):
        return _training_foreground_ct(settings, cases, data_dir, cache_dir)

    first = statistics(cases)
    assert statistics(cases) == first == measure(cases) and len(measured) == 1
    assert statistics(cases[:2]) == measure(cases[:2]) and len(measured) == 2  # other cases
    image = Path(cases[0].images[0])
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # the file changed
    statistics(cases)
    assert len(measured) == 3
    for stored in (cache_dir / "ct_statistics").iterdir():
        stored.write_text("{")  # damaged: measured again, not trusted
    assert statistics(cases) == measure(cases) and len(measured) == 4


def test_training_foreground_ct_normalization_reports_an_unreadable_case_as_loading_does(cache_dir, tmp_path):
    """A truncated training image is the data's problem, not a wrong --ct-normalization."""
    from medtuning_peft.data import CaseLoadError, list_kits19_cases, split_cases

    data = tmp_path / "kits"
    write_synthetic_kits19(data, num_cases=4, shape=SHAPE, spacing=(3.0, 3.0, 3.0), seed=0)
    train_ids, _ = split_cases([c.case_id for c in list_kits19_cases(data)], val_fraction=0.25)
    image = data / train_ids[0] / "imaging.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    settings = tiny_settings(
        data, cache_dir, tmp_path / "run", max_steps=1, ct_normalization="training-foreground"
    )
    with pytest.raises(CaseLoadError, match=train_ids[0]) as error:
        train(settings)
    assert not isinstance(error.value, SettingsError)


def test_settings_outside_the_command_lines_choices_are_refused_in_python_too():
    for field, value in (("mixed_precision", "bf17"), ("ct_normalization", "training"), ("decoder", "unet")):
        with pytest.raises(SettingsError, match=f"TrainSettings.{field}={value!r} is not known") as error:
            TrainSettings(dataset="kits19", data_dir="/data", max_steps=1, **{field: value})
        assert error.value.field == field
    # A decoder is named in any spelling build_decoder takes, and kept as its key.
    assert (
        TrainSettings(dataset="kits19", data_dir="/data", max_steps=1, decoder="UperNet").decoder == "upernet"
    )


def test_resampled_validation_scores_the_written_predictions_against_the_label_files(
    data_dir, cache_dir, tmp_path
):
    # Trained on 6 mm in-plane voxels; scored, as `medtuning evaluate` scores the written predictions, on the
    # files' 3 mm grid against the label files, not against the nearest-neighbour resampled labels.
    settings = tiny_settings(
        data_dir, cache_dir, tmp_path / "run", max_steps=2, target_spacing=[3.0, 6.0, 6.0]
    )
    metrics = train(settings)
    assert metrics["per_case"]
    for case_id, scores in metrics["per_case"].items():
        pred = nib.load(tmp_path / "run" / "predictions" / f"{case_id}.nii.gz")
        label = nib.load(data_dir / case_id / "segmentation.nii.gz")
        expected = evaluate_case(
            "kits19",
            np.asarray(pred.dataobj),
            np.asarray(label.dataobj),
            tuple(float(s) for s in nib.affines.voxel_sizes(label.affine)),
        )
        assert scores == pytest.approx(expected)


def test_resume_without_a_checkpoint_starts_from_step_zero_and_epochs_count_crops(
    data_dir, cache_dir, tmp_path
):
    settings = tiny_settings(
        data_dir,
        cache_dir,
        tmp_path / "run",
        max_steps=None,
        epochs=1,
        samples_per_case=2,
        resume=True,
        val_hd95=False,
    )
    metrics = train(settings)
    assert metrics["resumed_from_step"] is None
    assert metrics["steps"] == metrics["run"]["steps_per_epoch"] == 3  # 3 training cases x 2 crops / batch 2
    assert set(metrics["summary"]) == {"dice_kidney", "dice_tumor", "dice_mean"}


def test_overwrite_starts_over(data_dir, cache_dir, tmp_path):
    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", max_steps=1, val_hd95=False)
    train(settings)
    (tmp_path / "run" / "checkpoints" / "step_7").mkdir()
    (tmp_path / "run" / "logs" / "medtuning").mkdir(parents=True)  # an earlier run's tracker files
    (tmp_path / "run" / "logs" / "medtuning" / "events.out.tfevents.1.old").write_bytes(b"")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train(replace(settings, overwrite=True))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_1"]
    assert not (tmp_path / "run" / "logs").exists()  # TensorBoard would draw both runs as one


def test_overwrite_keeps_the_earlier_run_when_the_new_settings_do_not_fit_the_data(
    data_dir, cache_dir, tmp_path
):
    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", max_steps=1, val_hd95=False)
    train(settings)
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(SettingsError, match="raise --samples-per-case or lower the batch"):
        train(replace(settings, overwrite=True, batch_size=64))  # more crops per step than an epoch has
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*")) == before
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("backbone", "crop", "minimum"),
    [("tiny-swin", [16, 2, 2], "4 x 4"), ("tiny-segformer", [16, 16, 32], "29 x 29")],
)
def test_a_crop_smaller_than_the_backbone_embeds_is_refused_before_training(
    data_dir, cache_dir, tmp_path, backbone, crop, minimum
):
    # tiny-swin embeds 4 x 4 patches; SegFormer's sequence-reduction convolutions need 29 x 29 pixels. Predict
    # refuses such a model's window.
    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", crop_size=crop, backbone=backbone)
    pattern = rf"crop_size=\[{crop[0]}, {crop[1]}, {crop[2]}\].*smaller than the {minimum} pixels"
    with pytest.raises(SettingsError, match=pattern) as error:
        train(settings)
    assert error.value.field == "crop_size" and not (tmp_path / "run").exists()


def test_missing_data_dir_is_named(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(tiny_settings(tmp_path / "nowhere", cache_dir, tmp_path / "out"))
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_checkpoints_models_and_built_in_data_have_the_umask_modes(data_dir, cache_dir, tmp_path):
    # safetensors >= 0.8 writes private files (accelerate's checkpoints, the saved model) and mkdtemp makes
    # private folders (the built-in data in a cache that a lab may share): all get the umask's modes.
    from medtuning_peft.training import _built_in_data

    old = os.umask(0o027)
    try:
        settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", max_steps=1, checkpoint_every=1)
        train(settings)
        built_in, _ = _built_in_data(
            "synthetic-kits19", replace(settings, synthetic_cases=2), tmp_path / "cache"
        )
    finally:
        os.umask(old)
    for folder in (tmp_path / "run" / "checkpoints" / "step_1", tmp_path / "run" / "model", built_in):
        found = {p: p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}
        assert any(p.suffix == ".safetensors" for p in found) or folder == built_in
        assert found == {p: 0o750 if p.is_dir() else 0o640 for p in found}, folder


# ---------------------------------------------------------------------------------------------------------
# Refusals before and during a run
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_folds": 9, "fold": 0}, "num_folds"),
        ({"batch_size": 16}, "samples_per_case"),
        # Too few cases because of a setting: the error names it, not data_dir.
        ({"max_cases": 1}, "max_cases"),
        ({"data_dir": None, "default_data": "synthetic-kits19", "synthetic_cases": 1}, "synthetic_cases"),
    ],
)
def test_settings_that_do_not_fit_the_data_leave_no_run_folder(
    data_dir, cache_dir, tmp_path, overrides, field
):
    overrides = dict(overrides)
    if "data_dir" in overrides:
        data_dir = overrides.pop("data_dir")
    with pytest.raises(SettingsError) as error:
        train(tiny_settings(data_dir, cache_dir, tmp_path / "run", **overrides))
    assert error.value.field == field and f"{field}=" in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["file", "below_a_file", "read_only"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_training(
    data_dir, cache_dir, tmp_path, monkeypatch, layout
):
    target = tmp_path / "run"
    output_dir = target / "sub" if layout == "below_a_file" else target
    if layout == "read_only":
        target.mkdir()
        target.chmod(0o555)
        if os.geteuid() == 0:  # root writes anywhere: the probe fails as in a read-only folder
            real_open = builtins.open

            def guarded_open(file, mode="r", *args, **kwargs):
                if any(c in mode for c in "wxa+") and Path(file).parent == target:
                    raise PermissionError(errno.EACCES, "Permission denied", str(file))
                return real_open(file, mode, *args, **kwargs)

            monkeypatch.setattr(builtins, "open", guarded_open)
    else:
        target.write_text("")
    steps = []
    try:
        with pytest.raises(SettingsError, match="--output-dir") as error:
            train(tiny_settings(data_dir, cache_dir, output_dir, max_steps=1), on_step_end=steps.append)
    finally:
        target.chmod(0o755)
    assert error.value.field == "output_dir" and str(output_dir) in str(error.value) and not steps


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb", "all"])
def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_deleted(
    data_dir, cache_dir, tmp_path, monkeypatch, report_to
):
    # Accelerate drops a tracker whose package is missing (a debug log): the run would log nothing for hours.
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])  # as with neither package installed
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")  # an earlier run, which --overwrite would delete
    settings = tiny_settings(data_dir, cache_dir, run, max_steps=1, report_to=report_to, overwrite=True)
    steps = []
    with pytest.raises(SettingsError, match=r"report_to=.*pip install") as error:
        train(settings, on_step_end=steps.append)
    assert error.value.field == "report_to" and not steps
    assert [p.name for p in run.iterdir()] == ["metrics.json"]


def test_fp16_without_cuda_is_refused_before_anything_is_written(data_dir, cache_dir, tmp_path):
    # Accelerate would train in float32 on the CPU, and metrics.json would say fp16.
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", max_steps=1, mixed_precision="fp16")
    with pytest.raises(SettingsError, match="mixed_precision='fp16' needs a CUDA GPU.*bf16.*no") as error:
        train(settings)
    assert error.value.field == "mixed_precision" and not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_lr_without_saving_that_step(
    data_dir, cache_dir, tmp_path, monkeypatch
):
    import monai.losses

    calls = []

    class NaNAtTheSecondStep(monai.losses.DiceCELoss):
        def forward(self, input, target):
            calls.append(None)
            loss = super().forward(input, target)
            return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(monai.losses, "DiceCELoss", NaNAtTheSecondStep)
    run = tmp_path / "run"
    settings = tiny_settings(data_dir, cache_dir, run, max_steps=3, checkpoint_every=1, val_hd95=False)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2 of 3 \(learning rate 0\.0015\)"):
        train(settings)
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [1]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # no model, metrics or predictions
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_1"]  # nothing half-written


def test_ctrl_c_during_training_reports_the_step_and_the_newest_checkpoint(data_dir, cache_dir, tmp_path):
    def interrupt(info):
        if info.step == 3:
            raise KeyboardInterrupt

    settings = tiny_settings(data_dir, cache_dir, tmp_path / "run", max_steps=4, checkpoint_every=2)
    try:
        with pytest.raises(TrainingInterrupted) as error:
            train(settings, on_step_end=interrupt)
    except KeyboardInterrupt:  # not the session's own Ctrl-C: pytest must not stop
        pytest.fail("the interruption reached the caller as a bare KeyboardInterrupt")
    assert (error.value.step, error.value.total_steps) == (3, 4)
    assert error.value.checkpoint == tmp_path / "run" / "checkpoints" / "step_2"


@pytest.mark.parametrize(
    ("stop", "max_steps", "val_every", "validated"),
    [(KeyboardInterrupt, 2, 0, [2]), (RuntimeError, 4, 2, [2, 4])],
    ids=["ctrl_c_in_the_final_validation", "failure_in_a_validation_during_training"],
)
def test_a_stopped_validation_keeps_the_trained_step_and_resume_validates_it(
    data_dir, cache_dir, tmp_path, monkeypatch, stop, max_steps, val_every, validated
):
    # With val_every=0 the only checkpoint is the final one: it is written (and the model saved) before the final
    # validation, so Ctrl-C or a failure there loses no training.
    validate = training._validate

    def stopped_once(*args, **kwargs):
        monkeypatch.setattr(training, "_validate", validate)
        raise stop("validation stopped")

    monkeypatch.setattr(training, "_validate", stopped_once)
    run = tmp_path / "run"
    settings = tiny_settings(
        data_dir, cache_dir, run, max_steps=max_steps, val_every=val_every, val_hd95=False
    )
    with pytest.raises(TrainingInterrupted if stop is KeyboardInterrupt else RuntimeError) as error:
        train(settings)
    stopped_at = validated[0]
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [stopped_at]
    if stop is KeyboardInterrupt:
        assert (
            error.value.step == stopped_at
            and error.value.checkpoint == run / "checkpoints" / f"step_{stopped_at}"
        )
        assert (run / "model" / "segmenter_config.json").is_file()  # saved before its validation
    assert not (run / "metrics.json").exists()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    metrics = train(replace(settings, resume=True))
    assert metrics["resumed_from_step"] == stopped_at
    assert [h["step"] for h in metrics["history"]["loss"]] == list(range(1, max_steps + 1))
    assert [v["step"] for v in metrics["history"]["validation"]] == validated
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["summary"] == metrics["history"]["validation"][-1]["summary"] == metrics["summary"]
    final = json.loads((run / "checkpoints" / f"step_{max_steps}" / "trainer_state.json").read_text())
    assert final["history"]["validation"] == metrics["history"]["validation"]
    straight = _train_again(settings, tmp_path / "straight")  # resumed, the run is the uninterrupted one
    assert metrics["history"] == straight["history"]


def test_ctrl_c_in_an_example_script_says_how_to_resume_and_exits_130(tmp_path, monkeypatch, capsys):
    import medtuning_peft.training as training

    checkpoint = tmp_path / "out" / "checkpoints" / "step_2"

    def interrupted(settings, on_step_end=None):
        raise TrainingInterrupted(3, 4, checkpoint)

    monkeypatch.setattr(training, "train", interrupted)
    parser = build_parser("demo")
    args = parser.parse_args(["--output-dir", str(tmp_path / "out"), "--max-steps", "4"])
    try:
        with pytest.raises(SystemExit) as exit_:
            train_from_args(parser, args, dataset="kits19", data_dir=str(tmp_path))
    except KeyboardInterrupt:
        pytest.fail("the interruption reached the caller as a bare KeyboardInterrupt")
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == (
        f"Interrupted at step 3 of 4. Run the same command with --resume to continue from the newest complete "
        f"checkpoint, {checkpoint}."
    )


@pytest.fixture(scope="module")
def two_checkpoints(data_dir, cache_dir, tmp_path_factory):
    """A finished 2-step run with complete checkpoints step_1 and step_2."""
    output_dir = tmp_path_factory.mktemp("two") / "run"
    settings = tiny_settings(
        data_dir,
        cache_dir,
        output_dir,
        max_steps=2,
        checkpoint_every=1,
        val_hd95=False,
        save_predictions=False,
    )
    train(settings)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return settings


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _drop_state_key(folder: Path, key: str) -> None:
    state = json.loads((folder / "trainer_state.json").read_text())
    del state[key]
    (folder / "trainer_state.json").write_text(json.dumps(state))


DAMAGE = {
    "truncated model": (lambda f: _cut(f / "model.safetensors"), "model.safetensors' .*truncated"),
    "deleted model": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    "truncated optimizer": (lambda f: _cut(f / "optimizer.bin"), "optimizer.bin cannot be read"),
    "garbage scheduler": (
        lambda f: (f / "scheduler.bin").write_bytes(b"x\n"),
        "scheduler.bin cannot be read",
    ),
    "garbage scaler": (lambda f: (f / "scaler.pt").write_bytes(b"x\n"), "scaler.pt cannot be read"),
    "truncated state": (lambda f: _cut(f / "trainer_state.json"), "trainer_state.json cannot be read"),
    "deleted state": (lambda f: (f / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "state without settings": (lambda f: _drop_state_key(f, "settings"), r"lacks \['settings'\]"),
    "state without history": (lambda f: _drop_state_key(f, "history"), r"lacks \['history'\]"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_from_a_damaged_checkpoint_names_it_and_how_to_go_on(
    two_checkpoints, tmp_path, caplog, damage
):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints.output_dir, run)
    spoil, problem = DAMAGE[damage]
    spoil(run / "checkpoints" / "step_2")
    expected = (
        f"Checkpoint {run / 'checkpoints' / 'step_2'} is damaged: .*{problem}.*Remove that folder and run again "
        f"with --resume to continue from the previous complete one, {run / 'checkpoints' / 'step_1'}"
    )
    with (
        caplog.at_level("INFO", logger="medtuning_peft.training"),
        pytest.raises(CorruptFileError, match=expected),
    ):
        train(replace(two_checkpoints, output_dir=str(run), resume=True))
    assert "Resumed" not in caplog.text


def test_a_checkpoint_that_accelerate_cannot_load_is_not_called_damaged(
    two_checkpoints, tmp_path, monkeypatch
):
    # fp16 on CUDA has a gradient scaler, whose scaler.pt a bf16 or fp32 checkpoint lacks: its files are sound,
    # and removing it, as advice for a damaged checkpoint would say, would throw good training away.
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints.output_dir, run)
    make_accelerator = training._make_accelerator

    def with_a_scaler(settings, output_dir):
        accelerator, mixed_precision = make_accelerator(settings, output_dir)
        accelerator.scaler = torch.amp.GradScaler("cpu")  # what Accelerate sets up for fp16 on CUDA
        return accelerator, mixed_precision

    monkeypatch.setattr(training, "_make_accelerator", with_a_scaler)
    folder = run / "checkpoints" / "step_2"
    with pytest.raises(
        RuntimeError, match=rf"Resuming from checkpoint {folder} failed: .*scaler\.pt"
    ) as error:
        train(replace(two_checkpoints, output_dir=str(run), resume=True))
    assert not isinstance(error.value, CorruptFileError) and "damaged" not in str(error.value)
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [1, 2]


def test_resume_without_the_rng_state_warns_that_it_is_not_exact(two_checkpoints, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints.output_dir, run)
    (run / "checkpoints" / "step_2" / "random_states_0.pkl").unlink()
    with caplog.at_level("INFO", logger="medtuning_peft.training"):
        metrics = train(replace(two_checkpoints, output_dir=str(run), resume=True))
    assert metrics["resumed_from_step"] == 2
    assert (
        "has no random_states_0.pkl" in caplog.text
        and "differ from those of an uninterrupted run" in caplog.text
    )
