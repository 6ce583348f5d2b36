"""The example scripts as a user runs them: `accelerate launch examples/train_*.py` in subprocesses (slow)."""

from __future__ import annotations

import json
import os
import runpy
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medtuning_peft.cli import main as cli_main
from medtuning_peft.data import list_brats_cases, load_brats_case
from medtuning_peft.data.synthetic import write_synthetic_brats
from medtuning_peft.training import build_parser, settings_from_args

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Small settings shared by the launches: tiny crops, a light decoder, a few steps, cheap validation.
SMALL = [
    "--crop-size",
    "16",
    "32",
    "32",
    "--decoder-channels",
    "16",
    "--sw-overlap",
    "0.25",
    "--log-every",
    "5",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Subprocess environment: offline, a private cache shared by the launches of this module."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MEDTUNING_CACHE": str(tmp_path_factory.mktemp("medtuning_cache")),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def launch(args: list[str], env: dict[str, str], timeout: int = 300, **env_overrides: str):
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *args],
        env={**env, **env_overrides},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# Fast: the BraTS default data
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("year", [2019, 2020])
def test_synthetic_brats_is_in_the_real_layout_and_loads_with_the_reader(tmp_path, year):
    folders = write_synthetic_brats(tmp_path, num_cases=4, shape=(24, 32, 32), year=year, seed=1)
    cases = list_brats_cases(tmp_path)
    assert [c.case_id for c in cases] == sorted(f.name for f in folders) and all(c.has_label for c in cases)
    if year == 2019:
        assert {f.parent.name for f in folders} == {"HGG", "LGG"}
        assert all(p.name.endswith(".nii.gz") for p in cases[0].images)
    else:
        assert folders[0].name == "BraTS20_Training_001" and cases[0].images[0].name.endswith("_flair.nii")
    case = load_brats_case(cases[0])
    assert case.image.shape == (4, 24, 32, 32) and set(np.unique(case.label)) == {0, 1, 2, 4}
    brain = np.any(case.image != 0, axis=0)
    assert not brain[0, 0, 0] and brain[12, 16, 16]  # skull-stripped: zeros outside the brain
    assert set(np.unique(load_brats_case(cases[3]).label)) == {0, 1, 2}  # every 4th case has no ET
    again = write_synthetic_brats(tmp_path / "again", num_cases=1, shape=(24, 32, 32), year=year, seed=1)
    assert (again[0] / cases[0].images[0].name).read_bytes() == cases[0].images[0].read_bytes()


@pytest.mark.parametrize("script", ["train_kits.py", "train_msd.py", "train_brats.py"])
@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--max-steps", "-1"], "error: argument --max-steps: max_steps=-1; pass a positive integer"),
        (["--crop-size", "0", "32", "32"], "error: argument --crop-size: crop_size=[0, 32, 32]; pass three"),
        (["--weight-decay", "-1"], "error: argument --weight-decay: weight_decay=-1.0; pass 0"),
    ],
)
def test_example_scripts_report_invalid_flags_as_usage_errors(
    tmp_path, monkeypatch, capsys, script, flags, error
):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [script, "--output-dir", str(out), *flags])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert exit_.value.code == 2
    assert error in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(("script", "synthetic"), [("train_kits.py", True), ("train_msd.py", False)])
def test_only_scripts_with_built_in_synthetic_data_offer_synthetic_cases(
    monkeypatch, capsys, script, synthetic
):
    # train_msd.py trains on a shipped real sample without --data-dir: an option to size synthetic data would be
    # ignored there, so it has none (and refuses it as an unknown argument).
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert ("--synthetic-cases" in capsys.readouterr().out) == synthetic
    if not synthetic:
        monkeypatch.setattr(sys, "argv", [script, "--synthetic-cases", "3"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
        assert (
            exit_.value.code == 2 and "unrecognized arguments: --synthetic-cases 3" in capsys.readouterr().err
        )


def recipe_command(doc: str) -> list[str]:
    """The arguments of the ``accelerate launch examples/...`` command in a script's docstring (its ``--help``)."""
    lines = doc.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("accelerate launch examples/"))
    command = []
    for line in lines[first:]:
        command.append(line.strip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(" ".join(command))[3:]  # without `accelerate launch examples/train_*.py`


@pytest.mark.parametrize("script", ["train_kits.py", "train_msd.py", "train_brats.py"])
def test_the_recipe_command_in_a_scripts_help_trains_the_reference_recipe_not_the_cpu_demo(script):
    # The scripts' defaults size a CPU demo (8 crops per case per epoch, window overlap 0.5); the command their
    # --help gives for real data must override them: 250 epochs of one crop per case, stride 42 of 128.
    module = runpy.run_path(str(EXAMPLES / script), run_name="example")
    parser = build_parser(module["__doc__"], **module["DEFAULTS"])
    args, rest = parser.parse_known_args(recipe_command(module["__doc__"]))
    assert rest in ([], ["--year", "2020"])  # train_brats.py's own flag
    settings = settings_from_args(args, dataset="msd")
    assert settings.samples_per_case == 1 and settings.epochs == 250 and settings.max_steps is None
    # MONAI's stride is int(window * (1 - overlap)): a rounded 0.672 would give 41.
    assert int(128 * (1 - settings.sw_overlap)) == 42 and settings.decoder_channels == 512
    assert settings.backbone == "microsoft/swin-tiny-patch4-window7-224" and settings.data_dir is not None


# ---------------------------------------------------------------------------------------------------------
# Slow: launches
# ---------------------------------------------------------------------------------------------------------

RELOAD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import nibabel as nib, numpy as np, torch
    import medtuning_peft
    from medtuning_peft.data import CaseCache, CTPreprocessing, list_kits19_cases
    from medtuning_peft.evaluation import probabilities_to_labels, sliding_window_predict

    out = Path(sys.argv[1])
    run = json.loads((out / "metrics.json").read_text())
    model = medtuning_peft.from_pretrained(out / "model")
    config = model.segmenter_config
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in config["preprocessing"].items() if k != "kind"}
    files = {c.case_id: c for c in list_kits19_cases(run["data"]["data_dir"])}
    cache = CaseCache(Path(sys.argv[2]) / "arrays")
    same = {}
    for case_id in run["data"]["val_cases"]:
        case = cache.load(files[case_id], CTPreprocessing(**options))
        probs = sliding_window_predict(
            model, torch.from_numpy(np.array(case.image))[None], roi_size=tuple(config["crop_size"]),
            overlap=run["settings"]["sw_overlap"], padding_value=case.background_value,
        )
        pred = probabilities_to_labels(probs, config["label_values"])[0].numpy().astype(np.uint8)
        saved = np.asarray(nib.load(out / "predictions" / f"{case_id}.nii.gz").dataobj)
        same[case_id] = bool(np.array_equal(case.geometry.to_original(pred), saved))
    print(json.dumps(same))
    """
)


def reloaded_predictions_identical(output_dir: Path, env: dict[str, str]) -> dict[str, bool]:
    """Per validation case: whether a fresh process's prediction with the saved model equals the run's file."""
    reload = subprocess.run(
        [sys.executable, "-c", RELOAD, str(output_dir), env["MEDTUNING_CACHE"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert reload.returncode == 0, reload.stderr[-3000:]
    return json.loads(reload.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kits_example_trains_and_a_fresh_process_reloads_it_to_identical_predictions(tmp_path, env):
    out = tmp_path / "kits"
    result = launch(
        ["--num_processes", "1", str(EXAMPLES / "train_kits.py"), "--output-dir", str(out), *SMALL]
        + ["--max-steps", "20", "--val-every", "10", "--synthetic-cases", "4"],
        env,
    )
    log = result.stdout + result.stderr
    assert "No --data-dir given: using synthetic KiTS19-like CT" in log and "not patient data" in log
    assert "validation at step 10" in log and "validation at step 20" in log and "dice_kidney=" in log
    run = metrics(out)
    assert run["steps"] == 20 and run["data"]["num_val_cases"] == 1 and "dice_tumor" in run["summary"]
    losses = [h["loss"] for h in run["history"]["loss"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert reloaded_predictions_identical(out, env) == dict.fromkeys(run["data"]["val_cases"], True)


def trained_parameters(output_dir: Path) -> dict[str, torch.Tensor]:
    """Trained parameters of a saved model; BatchNorm running statistics are per process by design."""
    state = load_file(output_dir / "model" / "adapter_model.safetensors")
    return {
        k: v
        for k, v in state.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


@pytest.mark.slow
def test_two_process_ddp_over_gloo_matches_one_process_accumulating_two_micro_batches(tmp_path, env):
    """2 processes x batch 1 == 1 process x batch 1 x 2 accumulation steps: the same global batch of whole volumes.

    With one thread per process and no stochastic layers (a tiny Swin without drop path, saved locally), the loss
    of every step and every trained parameter are bitwise equal: each process computes its volume exactly as the
    accumulating process computes that micro-batch, and DDP's mean of 2 gradients equals accumulate's sum of
    halves. Not compared: BatchNorm running statistics (each DDP process keeps rank 0's; accumulation updates
    them twice per step), which do not enter training-mode forwards.
    """
    from medtuning_peft.volumetric import TINY_BACKBONES

    class_name, make_config = TINY_BACKBONES["tiny-swin"]
    config = make_config()
    config.drop_path_rate = 0.0
    torch.manual_seed(0)
    import transformers

    getattr(transformers, class_name)(config).save_pretrained(tmp_path / "swin")
    common = [*SMALL, "--backbone", str(tmp_path / "swin"), "--max-steps", "4", "--batch-size", "1"]
    common += ["--synthetic-cases", "6", "--samples-per-case", "2", "--no-val-hd95", "--val-fraction", "0.5"]
    script = str(EXAMPLES / "train_kits.py")
    env = {**env, "CUDA_VISIBLE_DEVICES": ""}  # both runs on the CPU: DDP over gloo
    launch(
        ["--multi_gpu", "--num_processes", "2", script, "--output-dir", str(tmp_path / "ddp"), *common], env
    )
    # Three validation cases over two processes (two and one): each case predicted whole by one process, counted
    # once, and with the saved model (process 0's BatchNorm statistics).
    run = metrics(tmp_path / "ddp")
    val_cases = run["data"]["val_cases"]
    assert len(val_cases) == 3 and sorted(run["per_case"]) == sorted(val_cases)
    dice = [case["dice_kidney"] for case in run["per_case"].values()]
    assert run["summary"]["dice_kidney"]["mean"] == pytest.approx(np.mean(dice))
    assert reloaded_predictions_identical(tmp_path / "ddp", env) == dict.fromkeys(val_cases, True)
    launch(
        [
            "--num_processes",
            "1",
            "--num_cpu_threads_per_process",
            "1",
            script,
            "--output-dir",
            str(tmp_path / "one"),
        ]
        + [*common, "--gradient-accumulation-steps", "2", "--no-save-predictions"],
        env,
        OMP_NUM_THREADS="1",
    )
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert ddp["run"]["num_processes"] == 2 and one["run"]["num_processes"] == 1
    assert ddp["steps"] == one["steps"] == 4
    assert ddp["samples_seen"] == one["samples_seen"] == 8 and ddp["run"]["global_batch"] == 2
    assert [h["lr"] for h in ddp["history"]["loss"]] == [h["lr"] for h in one["history"]["loss"]]
    assert [h["loss"] for h in ddp["history"]["loss"]] == [h["loss"] for h in one["history"]["loss"]]
    a, b = trained_parameters(tmp_path / "ddp"), trained_parameters(tmp_path / "one")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_msd_example_trains_on_its_shipped_real_sample(tmp_path, env):
    out = tmp_path / "msd"
    result = launch(
        ["--num_processes", "1", str(EXAMPLES / "train_msd.py"), "--output-dir", str(out)]
        + ["--max-steps", "8", "--val-every", "0", "--decoder-channels", "16"],
        env,
    )
    assert "12-case sample shipped with the repository" in result.stdout + result.stderr
    run = metrics(out)
    assert set(run["summary"]) == {
        f"{m}_{r}" for m in ("dice", "hd95") for r in ("anterior", "posterior", "mean")
    }
    assert run["data"]["num_train_cases"] + run["data"]["num_val_cases"] == 12
    assert json.loads((out / "model" / "segmenter_config.json").read_text())["label_values"] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("year", [2019, 2020])
def test_brats_example_trains_on_synthetic_data_in_the_year_layout(tmp_path, env, year):
    out = tmp_path / f"brats{year}"
    result = launch(
        [
            "--num_processes",
            "1",
            str(EXAMPLES / "train_brats.py"),
            "--year",
            str(year),
            "--output-dir",
            str(out),
        ]
        + [*SMALL, "--max-steps", "6", "--val-every", "0", "--synthetic-cases", "4"],
        env,
    )
    assert f"BraTS {year} file layout" in result.stdout + result.stderr
    run = metrics(out)
    assert set(run["summary"]) == {f"{m}_{r}" for m in ("dice", "hd95") for r in ("et", "tc", "wt", "mean")}
    config = json.loads((out / "model" / "segmenter_config.json").read_text())
    assert config["label_values"] == [0, 1, 2, 4] and config["in_channels"] == 4
    assert config["channel_names"] == ["flair", "t1", "t1ce", "t2"]
    assert config["brats_et_min_voxels"] == 500
    # `medtuning predict` writes what validation wrote, the small-ET rule included.
    predicted = tmp_path / "predict"
    command = ["predict", "--model", str(out / "model"), "--input", run["data"]["data_dir"], "--output"]
    command += [str(predicted), "--overlap", str(run["settings"]["sw_overlap"]), "--no-progress"]
    assert cli_main(command) == 0
    for case_id in run["per_case"]:
        np.testing.assert_array_equal(
            np.asanyarray(nib.load(predicted / f"{case_id}.nii.gz").dataobj),
            np.asanyarray(nib.load(out / "predictions" / f"{case_id}.nii.gz").dataobj),
        )
