"""The `medtuning` command line: predict, evaluate, verify-data, push, cache; in-process and as a subprocess.

Bad inputs go through the real command; a tiny random segmenter stands in for a trained one (the CLI
must not depend on what the model predicts, only on shapes, geometry and the saved settings).
"""

from __future__ import annotations

import builtins
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medtuning_peft import cli, volumetric
from medtuning_peft.cli import main, png_bytes
from medtuning_peft.data import (
    CaseCache,
    CaseLoadError,
    CTPreprocessing,
    MRIPreprocessing,
    list_brats_cases,
    list_kits19_cases,
    load_case,
    write_synthetic_kits19,
)
from medtuning_peft.data.kits19 import kits19_case_files
from medtuning_peft.evaluation import REFERENCE_OVERLAP, sliding_window_predict
from medtuning_peft.io_utils import PARTIAL_PREFIX
from medtuning_peft.volumetric import build_segmenter, from_pretrained

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = Path("/work/shared/data/msd_hippocampus")
CROP = [8, 32, 32]
# KiTS19 stores the slice axis first with a permuted, flipped affine (orientation codes I, P, L).
KITS_AFFINE = np.array(
    [[0.0, 0.0, -0.78, 150.0], [0.0, -0.78, 0.0, 180.0], [-3.0, 0.0, 0.0, 90.0], [0.0, 0.0, 0.0, 1.0]]
)
KITS_SHAPE = (11, 20, 26)  # (slices, rows, columns), none a multiple of the window


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run faster on one thread, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_model(directory: Path, in_channels: int = 1, preprocessing: dict | None = None, **kw) -> Path:
    torch.manual_seed(0)
    model = build_segmenter(
        "tiny-swin",
        in_channels=in_channels,
        num_classes=3,
        decoder="fpn",
        decoder_kwargs={"channels": 16},
        crop_size=CROP,
        label_names=["background", "kidney", "tumor"],
        preprocessing=CTPreprocessing().to_dict() if preprocessing is None else preprocessing,
        **kw,
    )
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "model")


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = KITS_AFFINE) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def ct_volume(seed: int = 0, shape: tuple[int, ...] = KITS_SHAPE) -> np.ndarray:
    return (np.random.default_rng(seed).normal(40.0, 80.0, shape)).astype(np.float32)


def bad_inputs(folder: Path) -> dict[str, str]:
    """Writes one file per kind of bad input; returns file name -> words the error must contain."""
    good = write_nifti(folder / "good.nii.gz", ct_volume())
    raw = good.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (folder / "not_nifti.nii.gz").write_bytes(gzip.compress(b"patient notes, not an image\n" * 50))
    write_nifti(folder / "slice_2d.nii.gz", ct_volume(shape=(20, 26)))
    write_nifti(folder / "series_4d.nii.gz", ct_volume(shape=(*KITS_SHAPE, 3)))
    volume = ct_volume()
    volume[2, 3, 4], volume[5, 6, 7] = np.nan, np.inf
    write_nifti(folder / "nan_inf.nii.gz", volume)
    return {
        "truncated.nii.gz": "not a readable NIfTI",
        "not_nifti.nii.gz": "not a readable NIfTI",
        "slice_2d.nii.gz": "expected a 3D",
        "series_4d.nii.gz": "expects a 3D volume",
        "nan_inf.nii.gz": "2 NaN/Inf voxels",
    }


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "medtuning_peft.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(PARTIAL_PREFIX)]


# -----------------------------------------------------------------------------------------------------
# Help and arguments
# -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, option",
    [
        ("predict", "--flip-tta"),
        ("evaluate", "--labels"),
        ("verify-data", "--data-dir"),
        ("push", "--repo-id"),
        ("cache", "--max-size"),
    ],
)
def test_every_command_has_help(command, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "predict" in capsys.readouterr().err


def test_bad_option_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", "m", "--input", "i", "--output", "o", "--overlap", "1.5"])
    assert exit_info.value.code == 2
    assert "not in [0, 1)" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------------
# predict
# -----------------------------------------------------------------------------------------------------


def test_predict_keeps_the_exact_grid_of_a_permuted_affine_kits_volume(model_dir, tmp_path):
    image = write_nifti(tmp_path / "kits" / "case_00000" / "imaging.nii.gz", ct_volume())
    out = tmp_path / "pred"
    code = main(
        ["predict", "--model", str(model_dir), "--input", str(tmp_path / "kits"), "--output", str(out)]
        + ["--overlap", "0", "--preview", "--no-progress"]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["case_00000.nii.gz", "case_00000.png"]
    source, written = nib.load(str(image)), nib.load(str(out / "case_00000.nii.gz"))
    assert written.shape == source.shape == KITS_SHAPE
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
    assert nib.aff2axcodes(written.affine) == ("I", "P", "L")
    assert int(written.header["sform_code"]) == int(source.header["sform_code"]) == 1
    assert int(written.header["qform_code"]) == int(source.header["qform_code"]) == 1
    labels = np.asanyarray(written.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}

    # The same pipeline by hand: the saved preprocessing, the crop-sized window, mapped back to the file.
    model = from_pretrained(model_dir)
    case = load_case(kits19_case_files(tmp_path / "kits" / "case_00000"), CTPreprocessing())
    probs = sliding_window_predict(
        model,
        torch.from_numpy(case.image)[None],
        roi_size=CROP,
        overlap=0.0,
        padding_value=case.background_value,
    )
    expected = case.geometry.to_original(probs.argmax(1)[0].numpy().astype(np.uint8))
    np.testing.assert_array_equal(labels, expected)

    png = (out / "case_00000.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert height >= 160 and width > height  # three upscaled axial slices side by side


def test_predict_single_file_to_a_file_name(model_dir, tmp_path):
    image = write_nifti(tmp_path / "scan.nii", ct_volume(1))
    out = tmp_path / "nested" / "scan_seg.nii.gz"
    assert (
        main(
            [
                "predict",
                "--model",
                str(model_dir),
                "--input",
                str(image),
                "--output",
                str(out),
                "--overlap",
                "0",
            ]
        )
        == 0
    )
    assert nib.load(str(out)).shape == KITS_SHAPE
    assert leftovers(tmp_path) == []


def test_predict_applies_the_brats_et_rule_the_model_was_validated_with(tmp_path, capsys):
    # A BraTS-labelled model whose classifier favours ET (label 4) everywhere: 5,720 ET voxels per volume.
    torch.manual_seed(0)
    model = build_segmenter(
        "tiny-swin",
        in_channels=1,
        num_classes=4,
        decoder="fpn",
        decoder_kwargs={"channels": 16},
        crop_size=CROP,
        preprocessing=CTPreprocessing().to_dict(),
    )
    with torch.no_grad():
        model.decoder.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    model.segmenter_config["label_values"] = [0, 1, 2, 4]
    model.segmenter_config["brats_et_min_voxels"] = 6000  # as training records it
    model.save_pretrained(tmp_path / "brats")
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume(1))

    def predict(*extra: str) -> np.ndarray:
        out = tmp_path / "out.nii.gz"
        command = ["predict", "--model", str(tmp_path / "brats"), "--input", str(image), "--output", str(out)]
        assert main([*command, "--overlap", "0", "--no-progress", *extra]) == 0
        return np.asanyarray(nib.load(str(out)).dataobj)

    assert set(np.unique(predict())) == {
        1
    }  # 5,720 < 6,000 ET voxels: relabelled as necrosis, as in validation
    assert set(np.unique(predict("--et-min-voxels", "0"))) == {4}
    assert set(np.unique(predict("--et-min-voxels", "5000"))) == {4}
    code = main(["predict", "--model", str(save_model(tmp_path / "kits")), "--input", str(image), "--output",
                 str(tmp_path / "k.nii.gz"), "--et-min-voxels", "5"])  # fmt: skip
    assert code == 1 and "--et-min-voxels applies to BraTS models" in capsys.readouterr().err


def test_predict_counts_the_brats_et_rule_on_the_image_grid_for_a_model_with_a_target_spacing(tmp_path):
    # ET everywhere: 5,720 voxels of the file; on the model's grid (H and W at twice the spacing) about a quarter.
    torch.manual_seed(0)
    model = build_segmenter(
        "tiny-swin", in_channels=1, num_classes=4, decoder="fpn", decoder_kwargs={"channels": 16},
        crop_size=CROP, preprocessing=CTPreprocessing(target_spacing=(3.0, 1.56, 1.56)).to_dict(),
    )  # fmt: skip
    with torch.no_grad():
        model.decoder.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    model.segmenter_config["label_values"] = [0, 1, 2, 4]
    model.save_pretrained(tmp_path / "brats")
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume(1))
    out = tmp_path / "out.nii.gz"
    command = ["predict", "--model", str(tmp_path / "brats"), "--input", str(image), "--output", str(out)]
    assert main([*command, "--et-min-voxels", "3000", "--overlap", "0", "--no-progress"]) == 0
    assert set(np.unique(np.asanyarray(nib.load(str(out)).dataobj))) == {4}  # 5,720 >= 3,000: kept


@pytest.mark.parametrize(
    "name", ["truncated.nii.gz", "not_nifti.nii.gz", "slice_2d.nii.gz", "series_4d.nii.gz", "nan_inf.nii.gz"]
)
def test_predict_on_one_bad_file_fails_naming_it_and_writes_nothing(model_dir, tmp_path, capsys, name):
    expected = bad_inputs(tmp_path / "in")[name]
    out = tmp_path / "out" / "seg.nii.gz"
    code = main(
        ["predict", "--model", str(model_dir), "--input", str(tmp_path / "in" / name), "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert str(tmp_path / "in" / name) in err and expected in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_predict_batch_skips_bad_files_and_lists_them_as_a_subprocess(model_dir, tmp_path):
    expected = bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    result = run_cli(
        "predict",
        "--model",
        str(model_dir),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--overlap",
        "0",
    )
    assert result.returncode == 1, result.stderr
    summary = result.stderr.split("case(s) failed:")[1]
    for name, words in expected.items():
        line = next(line for line in summary.splitlines() if f"'{tmp_path / 'in' / name}'" in line)
        assert words in line
    assert f"{len(expected)} of {len(expected) + 1} case(s) failed" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]  # nothing for the bad cases, no partials
    assert nib.load(str(out / "good.nii.gz")).shape == KITS_SHAPE


def test_predict_failure_names_the_cases_file_an_earlier_run_left_in_the_output(model_dir, tmp_path, capsys):
    image = write_nifti(tmp_path / "in" / "scan.nii.gz", ct_volume())
    out = tmp_path / "out"
    command = ["predict", "--model", str(model_dir), "--input", str(tmp_path / "in"), "--output", str(out)]
    assert main([*command, "--overlap", "0", "--preview", "--no-progress"]) == 0
    earlier = (out / "scan.nii.gz").read_bytes()
    image.write_bytes(image.read_bytes()[:100])  # the scan replaced by a truncated file
    capsys.readouterr()
    assert main([*command, "--overlap", "0", "--no-progress"]) == 1
    summary = capsys.readouterr().err.split("case(s) failed:")[1]
    assert "from an earlier run, not overwritten" in summary and "evaluate would score" in summary
    assert f"'{out / 'scan.nii.gz'}'" in summary and f"'{out / 'scan.png'}'" in summary
    assert (out / "scan.nii.gz").read_bytes() == earlier  # the user's files are named, not deleted


def test_predict_on_an_empty_folder_fails_naming_it(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code = main(
        [
            "predict",
            "--model",
            str(model_dir),
            "--input",
            str(tmp_path / "empty"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    assert f"'{tmp_path / 'empty'}' holds no case" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_to_overwrite_its_inputs(model_dir, tmp_path, capsys):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    before = image.read_bytes()
    assert (
        main(["predict", "--model", str(model_dir), "--input", str(tmp_path), "--output", str(tmp_path)]) == 1
    )
    assert "would overwrite input image(s)" in capsys.readouterr().err and image.read_bytes() == before


def test_multichannel_model_takes_channels_last_files(tmp_path, capsys):
    model = save_model(tmp_path / "model2", in_channels=2, preprocessing=MRIPreprocessing().to_dict())
    write_nifti(tmp_path / "in" / "two.nii.gz", ct_volume(shape=(*KITS_SHAPE, 2)), np.eye(4))
    write_nifti(tmp_path / "in" / "one.nii.gz", ct_volume(), np.eye(4))
    code = main(
        [
            "predict",
            "--model",
            str(model),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--overlap",
            "0",
        ]
    )
    assert code == 1
    assert "this model takes 2 channels" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["two.nii.gz"]
    assert nib.load(str(tmp_path / "out" / "two.nii.gz")).shape == KITS_SHAPE


def test_predict_writes_the_saved_label_values(tmp_path):
    model = save_model(tmp_path / "model", label_values=[0, 2, 4])
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    main(
        [
            "predict",
            "--model",
            str(model),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "seg.nii.gz"),
            "--overlap",
            "0",
        ]
    )
    assert set(np.unique(np.asanyarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj))) <= {0, 2, 4}


def test_model_saved_without_preprocessing_needs_a_modality(tmp_path, capsys):
    model = save_model(tmp_path / "model")
    config = json.loads((model / "segmenter_config.json").read_text())
    (model / "segmenter_config.json").write_text(json.dumps({**config, "preprocessing": None}))
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    args = ["predict", "--model", str(model), "--input", str(image), "--output", str(tmp_path / "seg.nii.gz")]
    assert main(args) == 1
    assert "records no preprocessing; pass --modality CT or MRI" in capsys.readouterr().err
    assert main([*args, "--modality", "CT", "--overlap", "0"]) == 0


def test_predict_explains_an_unloadable_model(tmp_path, capsys):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "nothing"),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 1
    assert "cannot load --model" in capsys.readouterr().err


@pytest.mark.gpu
def test_predict_on_cuda_matches_cpu(model_dir, tmp_path):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.nii.gz"
        args = ["--input", str(image), "--output", str(out), "--overlap", "0", "--device", device]
        assert main(["predict", "--model", str(model_dir), *args]) == 0
    cpu, cuda = (np.asanyarray(nib.load(str(tmp_path / f"{d}.nii.gz")).dataobj) for d in ("cpu", "cuda"))
    assert (cpu == cuda).mean() > 0.999  # argmax ties may differ in the last bits


@pytest.mark.gpu
def test_predict_with_cuda_graphs_writes_the_same_labels(model_dir, tmp_path):
    images = [write_nifti(tmp_path / "in" / f"scan{i}.nii.gz", ct_volume(seed=i)) for i in range(3)]
    for flag in ([], ["--cuda-graphs"]):
        out = tmp_path / ("graphs" if flag else "eager")
        args = [
            "--input",
            str(images[0].parent),
            "--output",
            str(out),
            "--overlap",
            "0.5",
            "--device",
            "cuda",
        ]
        assert main(["predict", "--model", str(model_dir), *args, *flag]) == 0
    for image in images:
        eager, graphs = (
            np.asanyarray(nib.load(str(tmp_path / d / image.name)).dataobj) for d in ("eager", "graphs")
        )
        assert (eager == graphs).mean() > 0.999  # argmax ties may differ in the last bits


def test_predict_refuses_cuda_graphs_off_cuda(model_dir, tmp_path, capsys):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    args = ["--input", str(image), "--output", str(tmp_path / "o.nii.gz"), "--device", "cpu", "--cuda-graphs"]
    assert main(["predict", "--model", str(model_dir), *args]) == 1
    assert "--cuda-graphs needs a CUDA device; --device is cpu" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_predict_refuses_cuda_graphs_off_cuda_before_loading_the_model(tmp_path, capsys, model_not_loaded):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    args = ["--input", str(image), "--output", str(tmp_path / "out"), "--device", "cpu", "--cuda-graphs"]
    assert main(["predict", "--model", "org/not-downloaded", *args]) == 1
    assert "--cuda-graphs needs a CUDA device; --device is cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_overlap_default_is_the_reference_stride():
    assert cli.REFERENCE_OVERLAP == REFERENCE_OVERLAP


def test_png_writer_round_trips_through_zlib():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    png = png_bytes(rgb)
    length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT"
    rows = np.frombuffer(__import__("zlib").decompress(png[41 : 41 + length]), np.uint8).reshape(2, 10)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:].reshape(2, 3, 3), rgb)


# -----------------------------------------------------------------------------------------------------
# evaluate
# -----------------------------------------------------------------------------------------------------


def label_map(seed: int, shape=(10, 12, 14)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(seed)
    d, h, w = (int(rng.integers(2, s - 6)) for s in shape)
    label[d : d + 4, h : h + 5, w : w + 5] = 1
    label[d + 1 : d + 3, h + 1 : h + 3, w + 1 : w + 3] = 2
    return label


def test_evaluate_scores_matched_cases_and_names_every_mismatch(tmp_path, capsys):
    labels, preds = tmp_path / "labelsTr", tmp_path / "pred"
    affine = np.diag([1.0, 1.5, 2.0, 1.0])
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}})
    )
    for i in range(5):
        write_nifti(labels / f"hip_{i}.nii.gz", label_map(i), affine)
    write_nifti(preds / "hip_0.nii.gz", label_map(0), affine)  # perfect
    write_nifti(preds / "hip_1.nii.gz", label_map(7), affine)  # wrong place
    write_nifti(preds / "hip_2.nii.gz", label_map(2, (10, 12, 15)), affine)  # shape mismatch
    write_nifti(preds / "hip_3.nii.gz", label_map(3), np.diag([1.0, 1.5, 2.5, 1.0]))  # affine mismatch
    bad_values = label_map(4)
    bad_values[0, 0, 0] = 7
    write_nifti(preds / "hip_4.nii.gz", bad_values, affine)
    write_nifti(preds / "stray.nii.gz", label_map(5), affine)  # no such label
    out_json, out_csv = tmp_path / "metrics.json", tmp_path / "metrics.csv"

    code = main(
        [
            "evaluate",
            "--pred",
            str(preds),
            "--labels",
            str(labels),
            "--task",
            "msd",
            "--output",
            str(out_json),
            "--csv",
            str(out_csv),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    metrics = json.loads(out_json.read_text())
    assert sorted(metrics["per_case"]) == ["hip_0", "hip_1"] and metrics["num_cases"] == 2
    assert (
        metrics["per_case"]["hip_0"]["dice_mean"] == 1.0 and metrics["per_case"]["hip_0"]["hd95_mean"] == 0.0
    )
    assert metrics["per_case"]["hip_1"]["dice_mean"] < 1.0
    assert set(metrics["summary"]["dice_anterior"]) == {"mean", "std", "median"}
    failed = metrics["failed"]
    assert sorted(failed) == ["hip_2", "hip_3", "hip_4", "stray"]
    assert (
        "(10, 12, 15) differs from shape (10, 12, 14)" in failed["hip_2"]
        and str(labels / "hip_2.nii.gz") in failed["hip_2"]
    )
    assert "affine" in failed["hip_3"] and str(preds / "hip_3.nii.gz") in failed["hip_3"]
    assert str(labels / "hip_3.nii.gz") in failed["hip_3"]  # both files named
    assert "values [7]" in failed["hip_4"]
    assert "no label map named 'stray'" in failed["stray"]
    assert "hip_0" in captured.out and "median" in captured.out  # the printed table
    rows = out_csv.read_text().splitlines()
    assert rows[0].startswith("case,dice_anterior") and [r.split(",")[0] for r in rows[1:]] == [
        "hip_0",
        "hip_1",
        "mean",
        "std",
        "median",
    ]
    assert leftovers(tmp_path) == []


def test_evaluate_names_a_prediction_stored_in_another_voxel_order_with_the_reorder_fix(tmp_path, capsys):
    gt = write_nifti(tmp_path / "gt" / "case_1.nii.gz", label_map(0, KITS_SHAPE))  # KiTS19's IPL order
    pred = tmp_path / "pred" / "case_1.nii.gz"
    pred.parent.mkdir()
    nib.save(nib.as_closest_canonical(nib.load(gt)), pred)  # the same voxels, re-saved in RAS order
    args = ["evaluate", "--pred", str(pred.parent), "--labels", str(gt.parent), "--task", "kits19"]
    assert main([*args, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"'{pred}': holds the same voxels as '{gt}' in another voxel order (axes RAS" in err
    assert "re-save it in the voxel order of" in err and "differs from shape" not in err


def test_evaluate_pairs_a_label_file_by_its_case_and_refuses_two_files_of_one_case(tmp_path, capsys):
    # x_seg.nii.gz is case x's label, as a single --labels file and in a folder; a folder holding x.nii.gz
    # (the image) or x_label.nii.gz next to it names case x twice, which must not pick either silently.
    labels, preds = tmp_path / "labels", tmp_path / "pred"
    write_nifti(labels / "x_seg.nii.gz", label_map(0), np.eye(4))
    write_nifti(preds / "x.nii.gz", label_map(0), np.eye(4))
    args = ["evaluate", "--pred", str(preds / "x.nii.gz"), "--task", "kits19", "--no-hd95", "--no-progress"]
    out = tmp_path / "m.json"
    assert main([*args, "--labels", str(labels / "x_seg.nii.gz"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["per_case"]["x"]["dice_mean"] == 1.0
    for other in ("x.nii.gz", "x_label.nii.gz"):
        write_nifti(labels / other, label_map(1), np.eye(4))
        capsys.readouterr()
        assert main([*args, "--labels", str(labels)]) == 1
        err = capsys.readouterr().err
        assert "2 files name case 'x'" in err and other in err and "x_seg.nii.gz" in err
        (labels / other).unlink()


def test_evaluate_matches_kits_case_folders_by_name(tmp_path):
    for i in range(2):
        write_nifti(tmp_path / "kits" / f"case_0000{i}" / "imaging.nii.gz", ct_volume(i, (10, 12, 14)))
        write_nifti(tmp_path / "kits" / f"case_0000{i}" / "segmentation.nii.gz", label_map(i))
        write_nifti(tmp_path / "pred" / f"case_0000{i}.nii.gz", label_map(i))
    code = main(
        [
            "evaluate",
            "--pred",
            str(tmp_path / "pred"),
            "--labels",
            str(tmp_path / "kits"),
            "--task",
            "kits19",
            "--output",
            str(tmp_path / "m.json"),
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["summary"]["dice_mean"]["mean"] == 1.0 and list(metrics["regions"]) == ["kidney", "tumor"]


def three_labels_one_prediction(root: Path) -> list[str]:
    """Labels of cases a, b, c (kidney with a tumour) and a perfect prediction of a only."""
    for case_id in "abc":
        write_nifti(root / "gt" / f"{case_id}.nii.gz", label_map(0), np.eye(4))
    write_nifti(root / "pred" / "a.nii.gz", label_map(0), np.eye(4))
    return ["evaluate", "--pred", str(root / "pred"), "--labels", str(root / "gt"), "--task", "kits19"]


def test_evaluate_fails_on_a_labelled_case_without_prediction_by_default(tmp_path, capsys):
    args = three_labels_one_prediction(tmp_path)
    assert main([*args, "--output", str(tmp_path / "m.json"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: 2 of 3 labelled case(s) have no prediction" in err and "['b', 'c']" in err
    assert "--missing empty" in err and "--missing skip" in err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["missing_predictions"] == ["b", "c"] and metrics["missing_policy"] == "fail"


def test_evaluate_keeps_the_earlier_require_all_flag_as_missing_fail(tmp_path, capsys):
    args = three_labels_one_prediction(tmp_path)
    assert (
        main([*args, "--missing", "skip", "--require-all", "--no-progress"]) == 1
    )  # the last one given wins
    assert "FAILED: 2 of 3 labelled case(s) have no prediction" in capsys.readouterr().err


def test_evaluate_scores_a_missing_prediction_as_empty_when_asked(tmp_path):
    args = three_labels_one_prediction(tmp_path)
    assert main([*args, "--missing", "empty", "--output", str(tmp_path / "m.json"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert sorted(metrics["per_case"]) == ["a", "b", "c"] and metrics["num_cases"] == 3
    # b and c: kidney and tumour in the label, nothing predicted -> Dice 0, HD95 373.13 mm each.
    assert metrics["per_case"]["b"] == {
        "dice_kidney": 0.0,
        "dice_tumor": 0.0,
        "dice_mean": 0.0,
        "hd95_kidney": 373.13,
        "hd95_tumor": 373.13,
        "hd95_mean": 373.13,
    }
    assert metrics["summary"]["dice_mean"]["mean"] == pytest.approx(1 / 3)
    assert metrics["summary"]["hd95_mean"]["mean"] == pytest.approx(2 * 373.13 / 3)


def test_evaluate_skips_missing_predictions_only_when_asked_and_says_so(tmp_path, capsys):
    args = three_labels_one_prediction(tmp_path)
    assert main([*args, "--missing", "skip", "--output", str(tmp_path / "m.json"), "--no-progress"]) == 0
    assert "left out of the summary (--missing skip)" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics["per_case"]) == ["a"] and metrics["summary"]["dice_mean"]["mean"] == 1.0
    assert metrics["missing_predictions"] == ["b", "c"] and metrics["missing_policy"] == "skip"


def test_evaluate_of_one_prediction_file_scores_that_case_without_missing_others(tmp_path, capsys):
    args = three_labels_one_prediction(tmp_path)
    args[2] = str(tmp_path / "pred" / "a.nii.gz")
    assert main([*args, "--no-progress"]) == 0
    assert "no prediction" not in capsys.readouterr().err


def test_evaluate_msd_needs_the_labels_of_the_task(tmp_path, capsys):
    write_nifti(tmp_path / "labels" / "a.nii.gz", label_map(0))
    write_nifti(tmp_path / "pred" / "a.nii.gz", label_map(0))
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--labels",
                str(tmp_path / "labels"),
                "--task",
                "msd",
            ]
        )
        == 1
    )
    assert "--dataset-json" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------------
# verify-data
# -----------------------------------------------------------------------------------------------------


def msd_task(root: Path, cases: dict[str, tuple[np.ndarray | None, np.ndarray, np.ndarray]]) -> Path:
    """An MSD task folder; each case is (image or None for a missing file, label, label affine)."""
    training = []
    for name, (image, label, label_affine) in cases.items():
        if image is not None:
            write_nifti(root / "imagesTr" / f"{name}.nii.gz", image, np.eye(4))
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", label, label_affine)
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    dataset = {
        "name": "Toy",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def test_verify_data_lists_every_problem_of_every_case_at_once(tmp_path, capsys):
    shape = (10, 12, 14)
    image = ct_volume(0, shape)
    nan_image = image.copy()
    nan_image[1, 1, 1] = np.nan
    wrong_values = label_map(0)
    wrong_values[0, 0, 0] = 5
    root = msd_task(
        tmp_path / "Task",
        {
            "good": (image, label_map(0), np.eye(4)),
            "nan": (nan_image, label_map(0), np.eye(4)),
            "values": (image, wrong_values, np.eye(4)),
            "shape": (image, label_map(0, (10, 12, 15)), np.eye(4)),
            "affine": (image, label_map(0), np.diag([1.0, 1.0, 2.0, 1.0])),
            "missing": (None, label_map(0), np.eye(4)),
            "two_problems": (nan_image, wrong_values, np.eye(4)),
        },
    )
    report = tmp_path / "report.json"
    code = main(
        ["verify-data", "--task", "msd", "--data-dir", str(root), "--output", str(report), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 1
    problems = json.loads(report.read_text())["problems"]
    assert sorted(problems) == ["affine", "missing", "nan", "shape", "two_problems", "values"]
    assert (
        "1 NaN/Inf voxels" in problems["nan"][0]
        and str(root / "imagesTr" / "nan.nii.gz") in problems["nan"][0]
    )
    assert "values [5] outside the allowed [0, 1, 2]" in problems["values"][0]
    assert "(10, 12, 15) differs from (10, 12, 14)" in problems["shape"][0]
    assert "affine" in problems["affine"][0]
    assert (
        "missing" in problems["missing"][0]
        and str(root / "imagesTr" / "missing.nii.gz") in problems["missing"][0]
    )
    assert len(problems["two_problems"]) == 2
    assert "7 problem(s) in 6 case(s)" in err and "good" not in err.split("case(s):")[1].split()


def test_verify_data_reports_an_incomplete_brats_case(tmp_path, capsys):
    case = tmp_path / "BraTS20_Training_001"
    for modality in ("flair", "t1", "t1ce"):  # t2 missing
        write_nifti(case / f"BraTS20_Training_001_{modality}.nii.gz", ct_volume(0, (10, 12, 14)), np.eye(4))
    seg = label_map(0)
    seg[seg == 2] = 4
    write_nifti(case / "BraTS20_Training_001_seg.nii.gz", seg, np.eye(4))
    assert main(["verify-data", "--task", "brats", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "BraTS20_Training_001_t2.nii.gz" in err and "t2 file is missing" in err


@pytest.mark.parametrize("stored", ["label", "modality"])
def test_verify_data_names_a_file_stored_in_another_voxel_order_as_training_does(tmp_path, capsys, stored):
    if stored == "label":  # KiTS19: the label re-saved in RAS order, the image in KiTS19's IPL order
        write_nifti(tmp_path / "case_00000" / "imaging.nii.gz", ct_volume(0))
        moved = write_nifti(tmp_path / "case_00000" / "segmentation.nii.gz", label_map(0, KITS_SHAPE))
        task = "kits19"
    else:  # BraTS: one modality re-saved in RAS order
        case = tmp_path / "BraTS20_Training_001"
        for modality in ("flair", "t1", "t1ce", "t2"):
            write_nifti(case / f"BraTS20_Training_001_{modality}.nii.gz", ct_volume(0))
        write_nifti(case / "BraTS20_Training_001_seg.nii.gz", label_map(0, KITS_SHAPE))
        moved, task = case / "BraTS20_Training_001_t2.nii.gz", "brats"
    nib.save(nib.as_closest_canonical(nib.load(moved)), moved)  # the same voxels, in RAS order
    code = main(["verify-data", "--task", task, "--data-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"'{moved}': holds the same voxels as" in err and "in another voxel order (axes RAS" in err
    assert "re-save it in the voxel order of" in err and "cropped" not in err
    cases = list_kits19_cases(tmp_path) if task == "kits19" else list_brats_cases(tmp_path)
    with pytest.raises(CaseLoadError) as loading:  # the message training's loader gives
        load_case(cases[0])
    assert str(loading.value) in err


def test_verify_data_reports_a_qform_and_sform_that_disagree(tmp_path, capsys):
    """The loader warns and goes on with the sform; for verify-data it is a problem of the file, named."""
    write_nifti(tmp_path / "case_00000" / "imaging.nii.gz", ct_volume(0, (10, 12, 14)))
    label = write_nifti(tmp_path / "case_00000" / "segmentation.nii.gz", label_map(0))
    image = nib.load(label)
    flipped = KITS_AFFINE @ np.diag([1.0, 1.0, -1.0, 1.0])  # left and right swapped in the qform only
    image.header.set_qform(flipped, code=1)
    nib.save(image, str(label))
    report = tmp_path / "report.json"
    code = main(["verify-data", "--task", "kits19", "--data-dir", str(tmp_path), "--output", str(report)])
    assert code == 1
    (problem,) = json.loads(report.read_text())["problems"]["case_00000"]
    assert str(label) in problem and "qform" in problem and "sform" in problem


def test_verify_data_passes_a_clean_kits_folder(tmp_path, capsys):
    write_nifti(tmp_path / "case_00000" / "imaging.nii.gz", ct_volume(0, (10, 12, 14)))
    write_nifti(tmp_path / "case_00000" / "segmentation.nii.gz", label_map(0))
    write_nifti(tmp_path / "case_00001" / "imaging.nii.gz", ct_volume(1, (10, 12, 14)))  # prediction-only
    assert main(["verify-data", "--task", "kits19", "--data-dir", str(tmp_path)]) == 0
    assert "1 without label" in capsys.readouterr().out
    assert main(["verify-data", "--task", "kits19", "--data-dir", str(tmp_path), "--require-labels"]) == 1


def test_verify_data_lists_a_case_with_two_files_for_one_role_among_the_other_problems(tmp_path, capsys):
    # A case folder holding imaging.nii next to imaging.nii.gz (a file gunzipped to look at it) cannot be listed;
    # it is one problem of that case, and the other cases are still checked.
    for i in range(3):
        write_nifti(tmp_path / f"case_0000{i}" / "imaging.nii.gz", ct_volume(i, (10, 12, 14)))
        write_nifti(tmp_path / f"case_0000{i}" / "segmentation.nii.gz", label_map(i))
    (tmp_path / "case_00001" / "imaging.nii").write_bytes(
        gzip.decompress((tmp_path / "case_00001" / "imaging.nii.gz").read_bytes())
    )
    bad = label_map(2)
    bad[0, 0, 0] = 7
    write_nifti(tmp_path / "case_00002" / "segmentation.nii.gz", bad)
    report = tmp_path / "report.json"
    command = ["verify-data", "--task", "kits19", "--data-dir", str(tmp_path), "--output", str(report)]
    assert main([*command, "--no-progress"]) == 1
    captured = capsys.readouterr()
    result = json.loads(report.read_text())
    assert result["cases"] == 3 and sorted(result["problems"]) == ["case_00001", "case_00002"]
    assert "imaging" in result["problems"]["case_00001"][0] and ".nii" in result["problems"]["case_00001"][0]
    assert "values [7]" in result["problems"]["case_00002"][0]
    assert "checked 3 kits19 case(s)" in captured.out and "2 problem(s) in 2 case(s)" in captured.err


def test_verify_data_lists_a_brats_case_with_two_files_for_one_modality_among_the_others(tmp_path, capsys):
    for n in (1, 2):
        name = f"BraTS20_Training_00{n}"
        modalities = (
            ("flair", "t1", "t1ce", "t2") if n == 1 else ("flair", "t1", "t1ce")
        )  # case 2: t2 missing
        for modality in modalities:
            write_nifti(tmp_path / name / f"{name}_{modality}.nii.gz", ct_volume(n, (10, 12, 14)), np.eye(4))
        seg = label_map(n)
        seg[seg == 2] = 4
        write_nifti(tmp_path / name / f"{name}_seg.nii.gz", seg, np.eye(4))
    shutil.copy(
        tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii.gz",
        tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_T1.nii",
    )
    assert main(["verify-data", "--task", "brats", "--data-dir", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s) in 2 case(s)" in err and "BraTS20_Training_002_t2.nii.gz" in err
    assert "BraTS20_Training_001_T1.nii" in err


def test_verify_data_require_labels_names_where_the_label_was_looked_for(tmp_path, capsys):
    write_nifti(tmp_path / "case_00000" / "imaging.nii.gz", ct_volume(0, (10, 12, 14)))
    write_nifti(tmp_path / "case_00000" / "segmentation.nii.gz", label_map(0))
    write_nifti(tmp_path / "case_00001" / "imaging.nii.gz", ct_volume(1, (10, 12, 14)))
    command = ["verify-data", "--task", "kits19", "--data-dir", str(tmp_path), "--require-labels"]
    assert main([*command, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"file '{tmp_path / 'case_00001' / 'segmentation.nii.gz'}': label file not found" in err


# -----------------------------------------------------------------------------------------------------
# cache
# -----------------------------------------------------------------------------------------------------


@pytest.fixture
def training_cache(tmp_path) -> tuple[Path, Path]:
    """A training cache folder (entries in arrays/): a current entry per case, a stale one, a user file.

    Returns:
        The cache folder and the stale entry.
    """
    write_synthetic_kits19(tmp_path / "kits", num_cases=2, shape=(16, 16, 16))
    files = list_kits19_cases(tmp_path / "kits")
    cache = CaseCache(tmp_path / "cache" / "arrays")
    cache.load_many(files)
    stale = cache.entry_dir(files[0])
    stat = os.stat(files[0].images[0])
    os.utime(files[0].images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # replaced
    cache.load(files[0])
    (tmp_path / "cache" / "arrays" / "notes.txt").write_text("keep me")
    return tmp_path / "cache", stale


def test_cache_lists_every_entry_with_totals(training_cache, capsys):
    root, stale = training_cache
    assert main(["cache", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert str(root / "arrays") in out and stale.name in out and "source files changed" in out
    assert "total: 3 entries" in out and "stale: 1 entry" in out
    assert "left alone: 1 other item(s)" in out


def test_cache_dry_run_removes_nothing_then_prune_removes_the_stale_entry(training_cache, capsys):
    root, stale = training_cache
    assert main(["cache", "--cache-dir", str(root), "--prune-stale", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove: 1 entry" in out and "would keep: 2 entries" in out and stale.is_dir()
    assert main(["cache", "--cache-dir", str(root), "--prune-stale", "--list"]) == 0
    out = capsys.readouterr().out
    assert "removed: 1 entry" in out and out.count("kept ") == 2 and not stale.exists()
    assert len(CaseCache(root / "arrays").entries()) == 2
    assert (root / "arrays" / "notes.txt").read_text() == "keep me"


def test_cache_defaults_to_the_training_cache_folder(training_cache, monkeypatch, capsys):
    from medtuning_peft.training import default_cache_dir

    root, _ = training_cache
    monkeypatch.setenv("MEDTUNING_CACHE", str(root))
    assert default_cache_dir() == root  # where training keeps its arrays/ entries
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"'{root / 'arrays'}'" in out and "total: 3 entries" in out


def test_cache_names_a_missing_or_wrong_folder(tmp_path, capsys):
    assert main(["cache", "--cache-dir", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "does not exist" in err
    (tmp_path / "file").write_text("x")
    assert main(["cache", "--cache-dir", str(tmp_path / "file")]) == 1
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, message",
    [("--max-size", "-1", "number of gigabytes >= 0"), ("--prune-older-than", "soon", "number of days >= 0")],
)
def test_cache_refuses_bad_values(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "--cache-dir", str(tmp_path), option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cache_dry_run_needs_a_prune_option(tmp_path, capsys):
    assert main(["cache", "--cache-dir", str(tmp_path), "--dry-run"]) == 2
    assert "--prune-stale" in capsys.readouterr().err


def test_cache_size_budget_as_a_subprocess(training_cache):
    root, _ = training_cache
    result = run_cli("cache", "--cache-dir", str(root), "--max-size", "0")
    assert result.returncode == 0, result.stderr
    assert "removed: 3 entries" in result.stdout and "kept: 0 entries, 0 B" in result.stdout
    assert CaseCache(root / "arrays").entries() == []
    assert sorted(p.name for p in (root / "arrays").iterdir()) == ["notes.txt"]


# -----------------------------------------------------------------------------------------------------
# The whole loop on real images
# -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (HIPPOCAMPUS / "imagesTr").is_dir(), reason="shared hippocampus data not present")
def test_predict_then_evaluate_on_hippocampus_images(tmp_path):
    dataset = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    names = [Path(entry["image"]).name for entry in dataset["training"][:5]]
    inputs = tmp_path / "images"
    inputs.mkdir()
    for name in names:
        shutil.copy(HIPPOCAMPUS / "imagesTr" / name, inputs / name)
    labels = [dataset["labels"][str(k)] for k in range(len(dataset["labels"]))]
    model = build_segmenter(
        "tiny-swin",
        in_channels=1,
        num_classes=len(labels),
        decoder="fpn",
        decoder_kwargs={"channels": 16},
        crop_size=[16, 32, 32],
        label_names=labels,
        preprocessing=MRIPreprocessing().to_dict(),
    )
    model.save_pretrained(tmp_path / "run" / "model")

    predicted = run_cli(
        "predict",
        "--model",
        str(tmp_path / "run" / "model"),
        "--input",
        str(inputs),
        "--output",
        str(tmp_path / "pred"),
        "--overlap",
        "0.25",
    )
    assert predicted.returncode == 0, predicted.stderr
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(names)
    for name in names:
        source, written = nib.load(str(inputs / name)), nib.load(str(tmp_path / "pred" / name))
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)

    scored = run_cli(
        "evaluate",
        "--pred",
        str(tmp_path / "pred"),
        "--labels",
        str(HIPPOCAMPUS / "labelsTr"),
        "--task",
        "msd",
        "--dataset-json",
        str(HIPPOCAMPUS / "dataset.json"),
        "--output",
        str(tmp_path / "metrics.json"),
        "--missing",
        "skip",  # 5 predicted cases against the whole labelsTr folder
    )
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(metrics["per_case"]) == sorted(n.removesuffix(".nii.gz") for n in names)
    assert set(metrics["summary"]) == {
        "dice_anterior",
        "dice_posterior",
        "dice_mean",
        "hd95_anterior",
        "hd95_posterior",
        "hd95_mean",
    }


# -----------------------------------------------------------------------------------------------------
# Bad options and output destinations are refused before any work
# -----------------------------------------------------------------------------------------------------


@pytest.fixture
def model_not_loaded(monkeypatch):
    """Fails the test if the model is loaded: the option checks must come first."""
    monkeypatch.setattr(volumetric, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing can be written in, also for root (who ignores the mode bits)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wxa+") and Path(file).parent.resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    return folder


def test_predict_refuses_an_unknown_device_before_loading_the_model(tmp_path, capsys, model_not_loaded):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    args = ["predict", "--model", "model_ct", "--input", str(image), "--output", str(tmp_path / "out")]
    assert main([*args, "--device", "tpu"]) == 1
    err = capsys.readouterr().err
    assert (
        "--device 'tpu' is not a device" in err
        and "use cpu, cuda, cuda:N or mps" in err
        and "--model" not in err
    )


@pytest.mark.parametrize("roi", [["1", "1", "1"], ["8", "32", "3"]])
def test_predict_refuses_a_window_smaller_than_the_backbone_patch(model_dir, tmp_path, capsys, roi):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    args = [
        "predict",
        "--model",
        str(model_dir),
        "--input",
        str(image),
        "--output",
        str(tmp_path / "o.nii.gz"),
    ]
    assert main([*args, "--roi-size", *roi, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"--roi-size is [{', '.join(roi)}]; expected D H W with D >= 1, H >= 4 and W >= 4" in err
    assert "FAILED" not in err and not (tmp_path / "o.nii.gz").exists()


def test_predict_refuses_a_window_smaller_than_segformer_embeds(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_segmenter(
        "tiny-segformer", in_channels=1, num_classes=3, decoder="fpn", decoder_kwargs={"channels": 16},
        crop_size=[8, 32, 32], preprocessing=CTPreprocessing().to_dict(),
    )  # fmt: skip
    model.save_pretrained(tmp_path / "segformer")
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    args = ["predict", "--model", str(tmp_path / "segformer"), "--input", str(image), "--output"]
    assert main([*args, str(tmp_path / "o.nii.gz"), "--roi-size", "8", "16", "32"]) == 1
    assert "expected D H W with D >= 1, H >= 29 and W >= 29" in capsys.readouterr().err


def test_predict_into_a_read_only_folder_fails_before_any_case_naming_output(
    tmp_path, capsys, read_only, model_not_loaded
):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    assert main(["predict", "--model", "m", "--input", str(image), "--output", str(read_only)]) == 1
    err = capsys.readouterr().err
    assert f"--output '{read_only}': Cannot write in the folder '{read_only}' (Permission denied)" in err
    assert "FAILED" not in err and PARTIAL_PREFIX not in err and os.listdir(read_only) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder modes")
def test_predict_under_a_read_only_parent_names_output(tmp_path, capsys, model_not_loaded):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    try:
        assert main(["predict", "--model", "m", "--input", str(image), "--output", str(parent / "new")]) == 1
    finally:
        parent.chmod(0o755)
    assert f"--output '{parent / 'new'}': cannot create the folder" in capsys.readouterr().err


def test_evaluate_checks_its_output_files_before_scoring(tmp_path, capsys, read_only, monkeypatch):
    write_nifti(tmp_path / "pred" / "case_1.nii.gz", label_map(0).astype(np.uint8))
    write_nifti(tmp_path / "gt" / "case_1.nii.gz", label_map(0).astype(np.uint8))
    monkeypatch.setattr(cli, "_score_case", lambda *a, **k: pytest.fail("scored before the output check"))
    base = [
        "evaluate",
        "--pred",
        str(tmp_path / "pred"),
        "--labels",
        str(tmp_path / "gt"),
        "--task",
        "kits19",
    ]
    cases = {
        ("--output", str(tmp_path)): f"--output '{tmp_path}': '{tmp_path}' is a directory",
        ("--csv", "/nonexistent_dir/x.csv"): "--csv '/nonexistent_dir/x.csv': The folder of",
        (
            "--output",
            str(read_only / "m.json"),
        ): f"--output '{read_only / 'm.json'}': Cannot write in the folder",
    }
    for option, words in cases.items():
        assert main([*base, *option]) == 1
        err = capsys.readouterr().err
        assert words in err, err
    assert os.listdir(read_only) == []


@pytest.mark.parametrize("failure", ["model", "roi"])
def test_predict_refused_after_creating_its_output_folders_leaves_none_behind(
    model_dir, tmp_path, capsys, failure
):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    (tmp_path / "runs").mkdir()  # exists before: kept
    out = tmp_path / "runs" / "new" / "deeper"
    model = str(tmp_path / "no_model") if failure == "model" else str(model_dir)
    extra = ["--roi-size", "1", "1", "1"] if failure == "roi" else []
    assert main(["predict", "--model", model, "--input", str(image), "--output", str(out), *extra]) == 1
    assert "FAILED" not in capsys.readouterr().err
    assert os.listdir(tmp_path / "runs") == []


def test_verify_data_checks_its_output_file_before_any_case(tmp_path, capsys, monkeypatch):
    write_nifti(tmp_path / "case_00000" / "imaging.nii.gz", ct_volume(0, (10, 12, 14)))
    monkeypatch.setattr(cli, "_verify_case", lambda *a, **k: pytest.fail("checked a case before the output"))
    base = ["verify-data", "--task", "kits19", "--data-dir", str(tmp_path), "--no-progress"]
    for output, words in (
        (str(tmp_path), f"--output '{tmp_path}': '{tmp_path}' is a directory"),
        ("/nonexistent_dir/r.json", "--output '/nonexistent_dir/r.json': The folder of"),
    ):
        assert main([*base, "--output", output]) == 1
        assert words in capsys.readouterr().err


def test_a_file_where_a_folder_is_expected_is_named_as_a_file_not_as_missing(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a data set")
    for task in cli.TASKS:
        assert main(["verify-data", "--task", task, "--data-dir", str(notes)]) == 1
        err = capsys.readouterr().err
        assert f"--data-dir '{notes}' is a file; pass the data set's folder" in err and "not exist" not in err
    write_nifti(tmp_path / "gt" / "case_1.nii.gz", label_map(0))
    assert main(["evaluate", "--pred", str(notes), "--labels", str(tmp_path / "gt"), "--task", "kits19"]) == 1
    err = capsys.readouterr().err
    assert f"--pred '{notes}' is not a NIfTI file" in err and "not exist" not in err


def test_predict_on_an_msd_task_without_test_images_points_to_the_training_split(
    tmp_path, capsys, model_not_loaded
):
    root = msd_task(tmp_path / "Task", {"a": (ct_volume(0, (10, 12, 14)), label_map(0), np.eye(4))})
    args = ["predict", "--model", "m", "--input", str(root), "--output", str(tmp_path / "out")]
    assert main([*args, "--split", "test"]) == 1
    err = capsys.readouterr().err
    assert "(MSD task 'Toy'): dataset.json lists no test images; pass --split training" in err
    assert "no dataset.json" not in err and not (tmp_path / "out").exists()


def test_verify_data_require_labels_asks_no_label_of_msd_test_images(tmp_path, capsys):
    image = ct_volume(0, (10, 12, 14))
    root = msd_task(tmp_path / "Task", {"a": (image, label_map(0), np.eye(4))})
    write_nifti(root / "imagesTs" / "b.nii.gz", image, np.eye(4))
    dataset = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**dataset, "test": ["./imagesTs/b.nii.gz"]}))
    args = ["verify-data", "--task", "msd", "--data-dir", str(root), "--no-progress", "--require-labels"]
    assert main(args) == 0
    assert "checked 2 msd case(s)" in capsys.readouterr().out
    (root / "labelsTr" / "a.nii.gz").unlink()  # a training case without its label is still a problem
    assert main(args) == 1
    assert "label file is missing" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------------
# predict with several models (an ensemble, e.g. cross-validation folds)
# -----------------------------------------------------------------------------------------------------


def save_fold(directory: Path, seed: int, crop: list[int], **config) -> Path:
    """A tiny segmenter standing in for one fold; ``config`` overrides fields of its segmenter_config."""
    torch.manual_seed(seed)
    model = build_segmenter(
        "tiny-swin",
        in_channels=1,
        num_classes=3,
        decoder="fpn",
        decoder_kwargs={"channels": 16},
        crop_size=crop,
        preprocessing=CTPreprocessing().to_dict(),
    )
    model.segmenter_config.update(config)
    model.save_pretrained(directory)
    return directory


def test_predict_with_several_models_writes_the_argmax_of_their_mean_probabilities(tmp_path, capsys):
    folds = [save_fold(tmp_path / "fold0", 0, CROP), save_fold(tmp_path / "fold1", 1, [4, 32, 32])]
    write_nifti(tmp_path / "kits" / "case_00000" / "imaging.nii.gz", ct_volume(2))
    out = tmp_path / "pred"
    command = [
        "predict",
        "--model",
        *map(str, folds),
        "--input",
        str(tmp_path / "kits"),
        "--output",
        str(out),
    ]
    assert main([*command, "--overlap", "0", "--no-progress"]) == 0
    assert "2 models averaged" in capsys.readouterr().err
    labels = np.asanyarray(nib.load(str(out / "case_00000.nii.gz")).dataobj)

    # By hand: each fold with its own training crop as window, probabilities averaged, argmax.
    case = load_case(kits19_case_files(tmp_path / "kits" / "case_00000"), CTPreprocessing())
    volume = torch.from_numpy(case.image)[None]  # (C, D, H, W) -> (1, C, D, H, W)
    probs = [
        sliding_window_predict(
            from_pretrained(fold), volume, roi_size=crop, overlap=0.0, padding_value=case.background_value
        )
        for fold, crop in zip(folds, [CROP, [4, 32, 32]], strict=True)
    ]
    alone = [case.geometry.to_original(p.argmax(1)[0].numpy().astype(np.uint8)) for p in probs]
    mean = case.geometry.to_original(((probs[0] + probs[1]) / 2).argmax(1)[0].numpy().astype(np.uint8))
    np.testing.assert_array_equal(labels, mean)
    assert not np.array_equal(mean, alone[0]) and not np.array_equal(mean, alone[1])


@pytest.mark.parametrize(
    "field, value",
    [
        ("label_values", [0, 1, 4]),
        ("preprocessing", CTPreprocessing(window=(-100.0, 300.0)).to_dict()),
        ("channel_names", ["MRI"]),
    ],
)
def test_predict_refuses_to_average_models_that_disagree_naming_the_field(tmp_path, capsys, field, value):
    first = {"channel_names": ["CT"]}  # as the training engine records it
    folds = [
        save_fold(tmp_path / "fold0", 0, CROP, **first),
        save_fold(tmp_path / "fold1", 1, CROP, **{field: value}),
    ]
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--model", *map(str, folds), "--input", str(image), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--model '{folds[1]}' cannot be averaged with --model '{folds[0]}'" in err
    assert f"field '{field}'" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_predict_averages_folds_that_spell_the_same_channels_differently(tmp_path):
    folds = [
        save_fold(tmp_path / "fold0", 0, CROP, channel_names=["t1ce"]),  # BraTS' spelling
        save_fold(tmp_path / "fold1", 1, CROP, channel_names=["T1gd"]),  # the Decathlon's
    ]
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    command = [
        "predict",
        "--model",
        *map(str, folds),
        "--input",
        str(image),
        "--output",
        str(tmp_path / "o.nii.gz"),
    ]
    assert main([*command, "--overlap", "0", "--no-progress"]) == 0


def test_predict_asks_which_brats_et_rule_when_the_models_recorded_different_ones(tmp_path, capsys):
    brats = {"label_values": [0, 1, 2, 4], "num_classes": 4}
    folds = []
    for seed, rule in enumerate([500, 200]):
        torch.manual_seed(seed)
        model = build_segmenter(
            "tiny-swin", in_channels=1, num_classes=4, decoder="fpn", decoder_kwargs={"channels": 16},
            crop_size=CROP, preprocessing=CTPreprocessing().to_dict(),
        )  # fmt: skip
        model.segmenter_config.update(brats, brats_et_min_voxels=rule)
        model.save_pretrained(tmp_path / f"fold{seed}")
        folds.append(str(tmp_path / f"fold{seed}"))
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    command = ["predict", "--model", *folds, "--input", str(image), "--output", str(tmp_path / "seg.nii.gz")]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "different BraTS small-ET rules" in err and "pass --et-min-voxels N" in err
    assert main([*command, "--et-min-voxels", "300", "--overlap", "0", "--no-progress"]) == 0


def test_predict_refuses_a_model_named_twice_before_loading_it(tmp_path, capsys, model_not_loaded):
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    command = [
        "predict",
        "--model",
        "m",
        "m",
        "--input",
        str(image),
        "--output",
        str(tmp_path / "seg.nii.gz"),
    ]
    assert main(command) == 1
    assert "--model names a model twice" in capsys.readouterr().err


def test_predict_uses_the_window_overlap_training_validated_with(tmp_path, capsys):
    fold = save_fold(tmp_path / "model", 0, CROP, sw_overlap=0.5)  # as training records it
    # Larger than a window in every direction, so that the overlap moves the windows.
    write_nifti(tmp_path / "kits" / "case_00000" / "imaging.nii.gz", ct_volume(3, shape=(30, 70, 70)))
    command = ["predict", "--model", str(fold), "--input", str(tmp_path / "kits"), "--no-progress"]
    assert main([*command, "--output", str(tmp_path / "recorded")]) == 0
    assert "overlap 0.5\n" in capsys.readouterr().err
    assert main([*command, "--output", str(tmp_path / "given"), "--overlap", "0.5"]) == 0
    assert main([*command, "--output", str(tmp_path / "reference"), "--overlap", str(REFERENCE_OVERLAP)]) == 0
    read = {k: np.asanyarray(nib.load(str(tmp_path / k / "case_00000.nii.gz")).dataobj) for k in
            ("recorded", "given", "reference")}  # fmt: skip
    np.testing.assert_array_equal(read["recorded"], read["given"])
    assert not np.array_equal(read["recorded"], read["reference"])


@pytest.mark.parametrize("second", [0.25, None], ids=["different", "one_not_recorded"])
def test_predict_asks_for_an_overlap_when_the_models_validated_with_different_ones(tmp_path, capsys, second):
    # A model saved without a recorded overlap disagrees with one that recorded it, as two different values do.
    folds = [
        save_fold(tmp_path / "f0", 0, CROP, sw_overlap=0.5),
        save_fold(tmp_path / "f1", 1, CROP, **({} if second is None else {"sw_overlap": second})),
    ]
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    command = [
        "predict",
        "--model",
        *map(str, folds),
        "--input",
        str(image),
        "--output",
        str(tmp_path / "o.nii.gz"),
    ]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "validated with different window overlaps" in err
    if second is None:
        assert "'not recorded'" in err and "pass --overlap" in err and not (tmp_path / "o.nii.gz").exists()
    assert main([*command, "--overlap", "0.5", "--no-progress"]) == 0


def test_the_reference_overlap_shown_to_users_gives_stride_42_when_copied(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    shown = [help_text.split(", the reference stride 42")[0].split()[-1]]
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())  # the model records no overlap: the reference
    command = ["predict", "--model", str(model_dir), "--input", str(image), "--no-progress"]
    assert main([*command, "--output", str(tmp_path / "o.nii.gz")]) == 0
    shown.append(capsys.readouterr().err.split(", overlap ")[1].split()[0])
    assert [int(128 * (1 - float(text))) for text in shown] == [42, 42], shown


def test_predict_refuses_a_recorded_overlap_outside_0_1_naming_the_field(tmp_path, capsys):
    fold = save_fold(tmp_path / "model", 0, CROP, sw_overlap=1.5)
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume())
    assert (
        main(["predict", "--model", str(fold), "--input", str(image), "--output", str(tmp_path / "o.nii.gz")])
        == 1
    )
    assert "has sw_overlap 1.5; expected a fraction in [0, 1)" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------------
# predict: named channels, BraTS case folders
# -----------------------------------------------------------------------------------------------------


def save_two_channel_model(directory: Path) -> Path:
    """An MRI model recorded as trained on (T2, ADC), whose patch embedding tells the channels apart."""
    torch.manual_seed(0)
    model = build_segmenter(
        "tiny-swin", in_channels=2, num_classes=3, decoder="fpn", decoder_kwargs={"channels": 16},
        crop_size=CROP, preprocessing=MRIPreprocessing().to_dict(),
    )  # fmt: skip
    with torch.no_grad():  # as after training: the two channels' filters differ
        for name, p in model.named_parameters():
            if "patch_embeddings" in name and p.requires_grad and p.ndim == 4:
                p[:, 1] += 0.5 * torch.randn_like(p[:, 1])
    model.segmenter_config["channel_names"] = ["T2", "ADC"]  # as training records it
    model.save_pretrained(directory)
    return directory


def two_channel_task(root: Path, modality: dict[str, str], channels: list[np.ndarray]) -> Path:
    write_nifti(root / "imagesTs" / "p_001.nii.gz", np.stack(channels, axis=-1), np.eye(4))
    write_nifti(root / "imagesTr" / "p_000.nii.gz", np.stack(channels, axis=-1), np.eye(4))
    write_nifti(root / "labelsTr" / "p_000.nii.gz", label_map(0, channels[0].shape), np.eye(4))
    dataset = {
        "name": "Prostate",
        "modality": modality,
        "labels": {"0": "background", "1": "a", "2": "b"},
        "training": [{"image": "./imagesTr/p_000.nii.gz", "label": "./labelsTr/p_000.nii.gz"}],
        "test": ["./imagesTs/p_001.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def test_predict_gives_named_channels_to_the_model_in_its_order(tmp_path, capsys):
    model = save_two_channel_model(tmp_path / "model")
    rng = np.random.default_rng(0)
    t2, adc = (rng.normal(100.0, 30.0, KITS_SHAPE).astype(np.float32) for _ in range(2))
    same = two_channel_task(tmp_path / "same", {"0": "T2", "1": "ADC"}, [t2, adc])
    swapped = two_channel_task(tmp_path / "swapped", {"0": "ADC", "1": "t2w"}, [adc, t2])
    for task in (same, swapped):
        args = ["predict", "--model", str(model), "--input", str(task), "--output", str(tmp_path / task.name)]
        assert main([*args, "--overlap", "0", "--no-progress"]) == 0
    assert (
        "channels ['ADC', 't2w'] are given to the model in its order ['T2', 'ADC']" in capsys.readouterr().err
    )
    read = [np.asanyarray(nib.load(str(tmp_path / n / "p_001.nii.gz")).dataobj) for n in ("same", "swapped")]
    np.testing.assert_array_equal(read[1], read[0])
    # The model does tell the channels apart: fed in the file's order, the labels differ.
    fed_as_is = two_channel_task(tmp_path / "as_is", {"0": "T2", "1": "ADC"}, [adc, t2])
    assert main(["predict", "--model", str(model), "--input", str(fed_as_is), "--output", str(tmp_path / "o"),
                 "--overlap", "0", "--no-progress"]) == 0  # fmt: skip
    assert not np.array_equal(np.asanyarray(nib.load(str(tmp_path / "o" / "p_001.nii.gz")).dataobj), read[0])


def test_predict_warns_when_the_channels_are_named_otherwise(tmp_path, capsys):
    model = save_two_channel_model(tmp_path / "model")
    volume = ct_volume(0)
    task = two_channel_task(tmp_path / "task", {"0": "T2", "1": "DWI"}, [volume, volume])
    args = ["predict", "--model", str(model), "--input", str(task), "--output", str(tmp_path / "out")]
    assert main([*args, "--overlap", "0", "--no-progress"]) == 0
    assert (
        "warning: --input channels ['T2', 'DWI'] are not the model's ['T2', 'ADC']" in capsys.readouterr().err
    )


def test_predict_and_evaluate_take_one_brats_case_folder(tmp_path, capsys):
    from medtuning_peft.data.synthetic import write_synthetic_brats

    case = write_synthetic_brats(tmp_path / "brats", num_cases=1, shape=(16, 32, 32), seed=0)[0]
    torch.manual_seed(0)
    model = build_segmenter(
        "tiny-swin", in_channels=4, num_classes=4, decoder="fpn", decoder_kwargs={"channels": 16},
        crop_size=CROP, preprocessing=MRIPreprocessing(mask="any").to_dict(), label_values=[0, 1, 2, 4],
    )  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "pred"
    args = ["predict", "--model", str(tmp_path / "model"), "--input", str(case), "--output", str(out)]
    assert main([*args, "--overlap", "0", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{case.name}.nii.gz"]
    assert main(["evaluate", "--pred", str(out), "--labels", str(case), "--task", "brats"]) == 0
    assert case.name in capsys.readouterr().out


def test_predict_on_a_brats_release_reports_the_readers_error(tmp_path, capsys):
    from medtuning_peft.data.synthetic import write_synthetic_brats

    case = write_synthetic_brats(tmp_path / "brats", num_cases=1, shape=(16, 32, 32), seed=0)[0]
    t1 = next(case.glob("*_t1.nii"))  # BraTS 2020 stores .nii
    shutil.copy(t1, t1.with_name(t1.name + ".gz"))  # the same modality twice, as .nii and .nii.gz
    args = ["predict", "--model", "m", "--input", str(tmp_path / "brats"), "--output", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "holds no case" not in err and case.name in err and "t1" in err


def test_predict_takes_a_folder_of_one_sequences_scans_as_one_case_per_file(model_dir, tmp_path, capsys):
    # Named like BraTS sequence files, but of several patients: not one BraTS case folder.
    for name in ("patient01_t1", "patient02_t1"):
        write_nifti(tmp_path / "scans" / f"{name}.nii.gz", ct_volume())
    write_nifti(tmp_path / "one" / "sub01_flair.nii.gz", ct_volume())  # one scan, not named after its folder
    for folder, expected in (
        ("scans", ["patient01_t1.nii.gz", "patient02_t1.nii.gz"]),
        ("one", ["sub01_flair.nii.gz"]),
    ):
        out = tmp_path / f"{folder}_pred"
        args = ["predict", "--model", str(model_dir), "--input", str(tmp_path / folder), "--output", str(out)]
        assert main([*args, "--overlap", "0", "--no-progress"]) == 0, capsys.readouterr().err
        assert "NIfTI files" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == expected


def test_predict_takes_one_kits_case_folder_as_that_case_and_segments_its_imaging(
    model_dir, tmp_path, capsys
):
    case = tmp_path / "kits" / "case_00007"
    write_nifti(case / "imaging.nii.gz", ct_volume(4))
    write_nifti(case / "segmentation.nii.gz", label_map(0, KITS_SHAPE).astype(np.uint8))
    run = ["predict", "--model", str(model_dir), "--overlap", "0", "--no-progress"]
    assert main([*run, "--input", str(case), "--output", str(tmp_path / "one")]) == 0
    assert "a KiTS19 case folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["case_00007.nii.gz"]
    assert main([*run, "--input", str(tmp_path / "kits"), "--output", str(tmp_path / "all")]) == 0
    read = [np.asanyarray(nib.load(str(tmp_path / k / "case_00007.nii.gz")).dataobj) for k in ("one", "all")]
    np.testing.assert_array_equal(read[0], read[1])  # the imaging, as in the folder of case folders
    assert main(["evaluate", "--pred", str(tmp_path / "one"), "--labels", str(case), "--task", "kits19"]) == 0
    assert "case_00007" in capsys.readouterr().out
    # A folder of scans that happens to hold one named imaging is a folder of scans: every one is segmented.
    scans = tmp_path / "scans"
    shutil.copytree(case, scans)
    write_nifti(scans / "patient_a.nii.gz", ct_volume(5))
    assert main([*run, "--input", str(scans), "--output", str(tmp_path / "scans_out")]) == 0
    assert sorted(p.name for p in (tmp_path / "scans_out").iterdir()) == [
        "imaging.nii.gz",
        "patient_a.nii.gz",
    ]


def test_predict_skips_label_maps_in_a_folder_of_scans_by_their_names(model_dir, tmp_path, capsys):
    write_nifti(tmp_path / "scans" / "x.nii.gz", ct_volume())
    write_nifti(tmp_path / "scans" / "x_seg.nii.gz", label_map(0, KITS_SHAPE).astype(np.uint8))
    write_nifti(tmp_path / "scans" / "segmentation.nii.gz", label_map(1, KITS_SHAPE).astype(np.uint8))
    run = ["predict", "--model", str(model_dir), "--overlap", "0", "--no-progress"]
    assert main([*run, "--input", str(tmp_path / "scans"), "--output", str(tmp_path / "out")]) == 0
    assert "skipping 2 label map(s) by their names: ['segmentation.nii.gz', 'x_seg.nii.gz']" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.nii.gz"]

    (tmp_path / "scans" / "x.nii.gz").unlink()  # label maps only: nothing to segment
    assert main([*run, "--input", str(tmp_path / "scans"), "--output", str(tmp_path / "labels_only")]) == 1
    assert f"--input folder '{tmp_path / 'scans'}' holds only label maps" in capsys.readouterr().err
    assert not (tmp_path / "labels_only").exists()


def test_predict_preview_shows_the_labels_written_after_the_brats_et_rule(tmp_path, monkeypatch):
    # ET (class 3, label 4) everywhere, fewer voxels than the rule keeps: written as necrosis (class 1).
    torch.manual_seed(0)
    model = build_segmenter(
        "tiny-swin", in_channels=1, num_classes=4, decoder="fpn", decoder_kwargs={"channels": 16},
        crop_size=CROP, preprocessing=CTPreprocessing().to_dict(), label_values=[0, 1, 2, 4],
    )  # fmt: skip
    with torch.no_grad():
        model.decoder.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    model.segmenter_config.update(label_values=[0, 1, 2, 4], brats_et_min_voxels=6000)
    model.save_pretrained(tmp_path / "brats")
    shown = []
    preview = cli._preview_rgb
    monkeypatch.setattr(
        cli, "_preview_rgb", lambda image, classes: shown.append(classes) or preview(image, classes)
    )
    image = write_nifti(tmp_path / "scan.nii.gz", ct_volume(1))
    out = tmp_path / "out.nii.gz"
    args = ["predict", "--model", str(tmp_path / "brats"), "--input", str(image), "--output", str(out)]
    assert main([*args, "--overlap", "0", "--preview", "--no-progress"]) == 0
    assert set(np.unique(np.asanyarray(nib.load(str(out)).dataobj))) == {1}
    assert len(shown) == 1 and set(np.unique(shown[0])) == {1}


def test_predict_orders_named_channels_for_an_ensemble_whose_first_model_records_no_names(tmp_path):
    named = save_two_channel_model(tmp_path / "named")  # recorded (T2, ADC)
    torch.manual_seed(1)
    unnamed = build_segmenter(
        "tiny-swin", in_channels=2, num_classes=3, decoder="fpn", decoder_kwargs={"channels": 16},
        crop_size=CROP, preprocessing=MRIPreprocessing().to_dict(),
    )  # fmt: skip
    unnamed.save_pretrained(tmp_path / "unnamed")  # built by hand: no channel_names recorded
    rng = np.random.default_rng(0)
    t2, adc = (rng.normal(100.0, 30.0, KITS_SHAPE).astype(np.float32) for _ in range(2))
    read = []
    for name, modality, channels in (("same", {"0": "T2", "1": "ADC"}, [t2, adc]),
                                     ("swapped", {"0": "ADC", "1": "T2"}, [adc, t2])):  # fmt: skip
        task = two_channel_task(tmp_path / name, modality, channels)
        args = ["predict", "--model", str(tmp_path / "unnamed"), str(named), "--input", str(task)]
        assert (
            main([*args, "--output", str(tmp_path / f"{name}_pred"), "--overlap", "0", "--no-progress"]) == 0
        )
        read.append(np.asanyarray(nib.load(str(tmp_path / f"{name}_pred" / "p_001.nii.gz")).dataobj))
    np.testing.assert_array_equal(read[1], read[0])
