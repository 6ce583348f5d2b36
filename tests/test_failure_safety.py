"""Failure safety: atomic writes survive crashes and kills; bad or mismatched models are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import SwinConfig, SwinModel

import medtuning_peft
from medtuning_peft import io_utils, volumetric
from medtuning_peft.io_utils import (
    PARTIAL_PREFIX,
    CorruptFileError,
    atomic_directory,
    atomic_open,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_safetensors,
    remove_partials,
)
from medtuning_peft.volumetric import build_segmenter, from_pretrained

IO_UTILS = Path(io_utils.__file__)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -----------------------------------------------------------------------------------------------------
# Atomic writes
# -----------------------------------------------------------------------------------------------------


def test_crash_inside_atomic_open_keeps_the_old_file(tmp_path):
    target = atomic_write_text(tmp_path / "metrics.json", '{"dice": 0.9}\n')
    with pytest.raises(RuntimeError, match="crash"), atomic_open(target, "w") as f:
        f.write('{"dice": 0.')
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{"dice": 0.9}\n' and names(tmp_path) == ["metrics.json"]


def test_crash_before_the_first_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "new.csv", "w") as f:
        f.write("case,dice\n")
        raise RuntimeError("crash")
    assert names(tmp_path) == []


def test_atomic_path_gives_writers_the_final_extension_and_replaces_on_success(tmp_path):
    target = tmp_path / "case_001.nii.gz"
    old = nib.Nifti1Image(np.zeros((2, 3, 4), np.uint8), np.eye(4))
    nib.save(old, str(target))
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(PARTIAL_PREFIX) and tmp.name.endswith(".nii.gz")
        nib.save(nib.Nifti1Image(np.ones((2, 3, 4), np.uint8), np.eye(4)), str(tmp))
        assert np.asanyarray(nib.load(str(target)).dataobj).max() == 0  # old file still in place
    assert np.asanyarray(nib.load(str(target)).dataobj).min() == 1 and names(tmp_path) == ["case_001.nii.gz"]

    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a gzip stream")
        raise OSError("disk full")
    assert np.asanyarray(nib.load(str(target)).dataobj).min() == 1 and names(tmp_path) == ["case_001.nii.gz"]


def test_unserializable_json_leaves_the_old_file(tmp_path):
    target = atomic_write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(TypeError, match="m.json"):
        atomic_write_json(target, {"a": object()})
    with pytest.raises(TypeError, match="m.json"):
        atomic_write_json(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": 1} and names(tmp_path) == ["m.json"]


def test_crash_inside_atomic_directory_keeps_the_old_directory(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as tmp:
        (tmp / "state.json").write_text('{"step": 100}')
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "state.json").write_text('{"step": 2')
        raise KeyboardInterrupt
    assert (target / "state.json").read_text() == '{"step": 100}' and names(tmp_path) == ["checkpoint"]
    with atomic_directory(target) as tmp:
        (tmp / "state.json").write_text('{"step": 200}')
    assert (target / "state.json").read_text() == '{"step": 200}' and names(tmp_path) == ["checkpoint"]


def test_a_failure_between_the_two_renames_puts_the_old_directory_back(tmp_path, monkeypatch):
    # Replacing a directory takes two renames (old aside, new in place). If the second fails or is
    # interrupted, the old directory must be back under its name: under a partial name, remove_partials
    # (which the Hub upload's error message recommends) would delete the only copy.
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "adapter.json").write_text("old")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((Path(src), Path(dst)))
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(io_utils.os, "replace", second_rename_fails)
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "adapter.json").write_text("new")
    monkeypatch.setattr(io_utils.os, "replace", real_replace)
    assert calls[0][0] == target and calls[1][1] == target  # the old moved aside, then the new failed
    assert (target / "adapter.json").read_text() == "old" and names(tmp_path) == ["model"]
    assert remove_partials(tmp_path) == [] and (target / "adapter.json").read_text() == "old"


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    target = atomic_write_text(tmp_path / "predictions.csv", "complete old content\n")
    # io_utils uses only the standard library: the child loads it alone, so it starts in milliseconds.
    child = textwrap.dedent(
        f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("io_utils", {str(IO_UTILS)!r})
        io_utils = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(io_utils)
        with io_utils.atomic_open({str(target)!r}, "w") as f:
            f.write("new content, first half")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
            f.write(", second half")
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert target.read_text() == "complete old content\n"
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert (
        len(partial) == 1 and partial[0].read_text() == "new content, first half"
    )  # hidden, never the target
    assert remove_partials(tmp_path) == partial and names(tmp_path) == ["predictions.csv"]


def test_truncated_safetensors_are_detected_from_the_header(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.int64)}, str(path))
    assert set(check_safetensors(path)) >= {"a", "b"}
    raw = path.read_bytes()
    for cut in (0, 7, 20, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CorruptFileError, match="w.safetensors"):
            check_safetensors(path)
    path.write_bytes(raw + b"\0" * 8)
    with pytest.raises(CorruptFileError, match="corrupt"):
        check_safetensors(path)


# -----------------------------------------------------------------------------------------------------
# Partial or corrupt model directories are reported, not loaded
# -----------------------------------------------------------------------------------------------------


def tiny(backbone: str | torch.nn.Module = "tiny-swin", in_channels: int = 1, method: str = "med_adapter"):
    return build_segmenter(
        backbone,
        in_channels=in_channels,
        num_classes=3,
        decoder="fpn",
        decoder_kwargs={"channels": 16},
        method=method,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "model"
    tiny().save_pretrained(path)
    return path


@pytest.fixture
def copy_of(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "model"))


def _refuse_weight_reads(monkeypatch, backbone: bool) -> None:
    """Make reading adapter or decoder weights (and, with ``backbone``, backbone weights) fail the test."""

    def touched(*args, **kwargs):
        raise AssertionError("weights were read before the check")

    monkeypatch.setattr(volumetric, "load_file", touched)
    monkeypatch.setattr(peft.PeftModel, "load_adapter", touched)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", touched)
    if backbone:
        monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(touched))


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test if any weights are read: the checks must come first."""
    _refuse_weight_reads(monkeypatch, backbone=True)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "backbone/model.safetensors"])
def test_truncated_weights_are_reported_not_loaded(copy_of, no_weights_read, name):
    path = copy_of / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CorruptFileError, match=f"{path}.*truncated"):
        from_pretrained(copy_of)


@pytest.mark.parametrize("name", ["segmenter_config.json", "adapter_config.json", "backbone/config.json"])
def test_truncated_json_is_reported_not_loaded(copy_of, no_weights_read, name):
    path = copy_of / name
    path.write_text(path.read_text()[:40])
    with pytest.raises(CorruptFileError, match=f"{path.name}.*not valid JSON"):
        from_pretrained(copy_of)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "backbone/model.safetensors"])
def test_missing_weights_file_is_reported_not_loaded(copy_of, no_weights_read, name):
    (copy_of / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"incomplete: \\['{name}'\\] missing"):
        from_pretrained(copy_of)


def test_intact_copy_still_loads(copy_of):
    assert not from_pretrained(copy_of).training


# -----------------------------------------------------------------------------------------------------
# An adapter loaded into a backbone it was not trained on
# -----------------------------------------------------------------------------------------------------


def swin(embed_dim=24, depths=(2, 2, 2, 2)) -> SwinModel:
    config = SwinConfig(image_size=64, patch_size=4, embed_dim=embed_dim, depths=list(depths), window_size=4)
    config.num_heads = [1, 2, 2, 4][: len(depths)]
    return SwinModel(config)


# case -> (other backbone, other in_channels, words the error must contain)
MISMATCHES = {
    "architecture": ("tiny-vit", 1, "model_type swin vs vit"),
    "width": (lambda: swin(embed_dim=12), 1, "hidden_sizes [24, 48, 96, 192] vs [12, 24, 48, 96]"),
    "depth": (lambda: swin(depths=(2, 2, 4, 2)), 1, "depths [2, 2, 2, 2] vs [2, 2, 4, 2]"),
    "input_channels": ("tiny-swin", 4, "num_channels 1 vs 4"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_wrong_backbone_is_refused_naming_both_before_weights_load(saved, tmp_path, monkeypatch, case):
    other, in_channels, words = MISMATCHES[case]
    foreign = tmp_path / "foreign"
    tiny(other if isinstance(other, str) else other(), in_channels=in_channels).save_pretrained(foreign)
    mixed = Path(shutil.copytree(saved, tmp_path / "mixed"))
    shutil.rmtree(mixed / "backbone")
    shutil.copytree(foreign / "backbone", mixed / "backbone")  # e.g. files copied between two runs

    def touched(*args, **kwargs):
        raise AssertionError("weights were read before the check")

    monkeypatch.setattr(volumetric, "load_file", touched)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", touched)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(touched))
    with pytest.raises(ValueError) as error:
        from_pretrained(mixed)
    message = str(error.value)
    assert "trained on backbone 'tiny-swin'" in message and f"'{mixed / 'backbone'}'" in message
    assert words in message


def test_plain_peft_load_onto_a_narrower_backbone_is_refused_by_the_adapter_config(tmp_path):
    # No segmenter config involved: the adapter config carries the backbone signature, checked before any
    # weight is read.
    model = peft.get_peft_model(swin(), medtuning_peft.MedAdapterConfig(num_slices=4))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="trained on a different backbone"):
        peft.PeftModel.from_pretrained(swin(embed_dim=12), tmp_path / "adapter")


def test_partial_directories_of_an_interrupted_save_are_never_the_model(tmp_path, monkeypatch):
    model = tiny(method="decoder_only")
    target = tmp_path / "model"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped half way through the save

    monkeypatch.setattr(volumetric, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    assert not target.exists() and names(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(target)


def test_rename_is_the_only_step_that_makes_a_file_visible(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).name.startswith(PARTIAL_PREFIX), Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(io_utils.os, "replace", spy)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert seen == [(True, "a.txt")]


# -----------------------------------------------------------------------------------------------------
# Permissions: what is saved is as readable as the umask allows
# -----------------------------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    """A group-readable umask (0o027: files 0o640, folders 0o750), as on a lab's shared machine."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("method", ["med_adapter", "full"])
def test_a_saved_model_has_the_umask_modes_not_private_ones(tmp_path, umask_027, method):
    # safetensors >= 0.8 writes every file 0o600 (its save_file, and transformers' save_pretrained through it):
    # a colleague in the same group could see the model folder but not read its weights.
    tiny(method=method).save_pretrained(tmp_path / "model")
    saved = modes(tmp_path / "model")
    assert any(name.endswith(".safetensors") for name in saved)
    assert saved == {name: 0o750 if (tmp_path / "model" / name).is_dir() else 0o640 for name in saved}
    tiny(method=method).save_pretrained(tmp_path / "model")  # saved again over it: the same
    assert modes(tmp_path / "model") == saved


def test_atomic_writes_give_new_files_the_umask_mode_and_keep_an_overwritten_files_mode(tmp_path, umask_027):
    from safetensors.torch import save_file

    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
    private = atomic_write_text(tmp_path / "private.json", "{}")
    os.chmod(private, 0o600)
    atomic_write_text(private, '{"a": 1}')  # as a plain open(..., "w") would, the file keeps its own mode
    assert private.stat().st_mode & 0o777 == 0o600
    with atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
    assert modes(tmp_path / "folder") == {".": 0o750, "sub": 0o750, "sub/w.safetensors": 0o640}


# -----------------------------------------------------------------------------------------------------
# Edited or corrupt config files and weights are refused naming the file and field
# -----------------------------------------------------------------------------------------------------


def edit_json(folder: Path, name: str, change) -> Path:
    path = folder / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return path


@pytest.fixture
def no_adapter_weights_read(monkeypatch):
    """Fails the test if adapter or decoder weights are read: the checks must come first."""
    _refuse_weight_reads(monkeypatch, backbone=False)


def without(key: str):
    return lambda config: {k: v for k, v in config.items() if k != key}


# case -> (change to segmenter_config.json, words the error must contain)
BAD_SEGMENTER_CONFIGS = {
    **{f"no_{key}": (without(key), f"\\['{key}'\\] missing") for key in ("method", "decoder", "num_classes")},
    "no_in_channels": (without("in_channels"), "\\['in_channels'\\] missing"),
    "top_level_list": (lambda c: [c], "holds a JSON list; expected an object"),
    "unknown_decoder": (lambda c: {**c, "decoder": "unet"}, "decoder is 'unet'; expected one of"),
    "num_classes_text": (lambda c: {**c, "num_classes": "3"}, "num_classes is '3'; expected a positive int"),
    "backbone_class_of_another_model": (
        lambda c: {**c, "backbone_class": "ViTModel"},
        "backbone_class 'ViTModel' is a 'vit' model but the saved backbone is a 'swin' model",
    ),
    "backbone_class_unknown": (lambda c: {**c, "backbone_class": "NoSuchModel"}, "'NoSuchModel' is not a"),
    "label_values_too_few": (
        lambda c: {**c, "label_values": [0, 1]},
        "label_values is \\[0, 1\\] but num_classes is 3; expected 3 distinct",
    ),
    "label_names_repeated": (lambda c: {**c, "label_names": ["a", "a", "b"]}, "label_names is"),
    "crop_size_2d": (
        lambda c: {**c, "crop_size": [32, 32]},
        "crop_size is \\[32, 32\\]; expected \\[D, H, W\\]",
    ),
}


# case -> (file, change, words the error must contain: the file, and the field that disagrees)
RESHAPED = {
    "num_classes": (
        "segmenter_config.json",
        lambda c: {**c, "num_classes": 5, "label_names": None, "label_values": None},
        r"\[3\] in the file, \[5\] from the config files.*segmenter_config.json \(num_classes=5 \(the weights "
        r"hold \[3\] classes\)",
    ),
    "decoder_channels": (
        "segmenter_config.json",
        lambda c: {**c, "decoder_kwargs": {**c["decoder_kwargs"], "channels": 32}},
        r"differ in shape.*16.*32.*segmenter_config.json \(decoder='fpn', decoder_kwargs=",
    ),
    "decoder": (
        "segmenter_config.json",
        lambda c: {**c, "decoder": "upernet"},
        r"not in the file.*match no module.*segmenter_config.json \(decoder='upernet'",
    ),
    "reduction_ratio": (
        "adapter_config.json",
        lambda c: {**c, "reduction_ratio": 4},
        r"differ in shape.*adapter_config.json \(reduction_ratio",
    ),
    "num_slices": (
        "adapter_config.json",
        lambda c: {**c, "num_slices": 16},
        r"differ in shape.*adapter_config.json \(reduction_ratio, kernel_sizes, num_slices",
    ),
}


@pytest.mark.parametrize("case", sorted(RESHAPED))
def test_config_fields_that_change_weight_shapes_are_named_before_weights_load(
    copy_of, no_adapter_weights_read, case
):
    name, change, words = RESHAPED[case]
    edit_json(copy_of, name, change)
    with pytest.raises(ValueError, match=f"'{copy_of / 'adapter_model.safetensors'}' do not fit.*{words}"):
        from_pretrained(copy_of)


def test_decoder_shape_changes_of_a_decoder_only_model_are_named(tmp_path, monkeypatch):
    tiny(method="decoder_only").save_pretrained(tmp_path / "model")
    edit_json(
        tmp_path / "model", "segmenter_config.json", lambda c: {**c, "decoder_kwargs": {"channels": 32}}
    )
    monkeypatch.setattr(volumetric, "load_file", lambda *a, **k: pytest.fail("weights read before the check"))
    with pytest.raises(ValueError, match=r"model.safetensors' do not fit.*segmenter_config.json \(decoder="):
        from_pretrained(tmp_path / "model")


BAD_ADAPTER_CONFIGS = {
    "lora": (lambda c: {**c, "peft_type": "LORA"}, "peft_type is 'LORA'; expected 'MED_ADAPTER'"),
    "unknown": (lambda c: {**c, "peft_type": "BOGUS"}, "peft_type is 'BOGUS'; expected 'MED_ADAPTER'"),
    "missing": (without("peft_type"), "peft_type is missing; expected 'MED_ADAPTER'"),
    "top_level_list": (lambda c: [c], "holds a JSON list; expected an object with peft_type 'MED_ADAPTER'"),
    "bad_value": (
        lambda c: {**c, "reduction_ratio": 0},
        "MedAdapterConfig.reduction_ratio must be an int >= 1",
    ),
}


BAD_CONFIGS = {
    **{("segmenter_config.json", case): v for case, v in BAD_SEGMENTER_CONFIGS.items()},
    **{("adapter_config.json", case): v for case, v in BAD_ADAPTER_CONFIGS.items()},
}


@pytest.mark.parametrize(("file", "case"), sorted(BAD_CONFIGS))
def test_an_edited_config_is_refused_naming_the_file_and_field(copy_of, no_weights_read, file, case):
    change, words = BAD_CONFIGS[file, case]
    path = edit_json(copy_of, file, change)
    with pytest.raises(ValueError, match=f"{path}.*{words}"):
        from_pretrained(copy_of)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_with_an_intact_header_are_refused_naming_the_file(copy_of, value):
    weights = copy_of / "adapter_model.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if k.endswith("decoder.classifier.weight"))
    state[name] = state[name].clone()
    state[name].view(-1)[3] = value
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match=f"'{weights}' hold NaN or Inf values in 1 tensor.*classifier"):
        from_pretrained(copy_of)
