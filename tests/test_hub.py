"""Hub sharing: the model card and the exact files an upload sends (offline: only the Hub API is replaced)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from medtuning_peft.cli import main
from medtuning_peft.hub import (
    IGNORE_PATTERNS,
    UPLOAD_PATTERNS,
    build_model_card,
    count_parameters,
    files_to_upload,
    push_to_hub,
)
from medtuning_peft.io_utils import CorruptFileError
from medtuning_peft.training import parameter_counts
from medtuning_peft.volumetric import build_segmenter, load_backbone

LABELS = ["background", "kidney", "tumor"]
EXPECTED_UPLOAD = [
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "backbone/config.json",
    "backbone/model.safetensors",
    "segmenter_config.json",
]


def build(backbone="tiny-swin"):
    return build_segmenter(
        backbone,
        in_channels=1,
        num_classes=3,
        decoder="fpn",
        decoder_kwargs={"channels": 16},
        crop_size=[8, 32, 32],
        label_names=LABELS,
        preprocessing={
            "kind": "ct",
            "window": [-79.0, 304.0],
            "mean": 101.0,
            "std": 76.9,
            "target_spacing": None,
        },
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A training run's output_dir: model/ plus metrics.json."""
    output_dir = tmp_path_factory.mktemp("run")
    model = build()
    model.save_pretrained(output_dir / "model")
    metrics = {  # the layout training.py writes
        "summary": {"dice_mean": {"mean": 0.8292, "std": 0.05, "median": 0.84}},
        "per_case": {"case_00001": {"dice_mean": 0.8}},
        "steps": 212,
        "parameters": {"tuned": 1, "total": 2, "tuned_percent": 50.0},
        "settings": {"dataset": "kits19", "lr": 0.002, "epochs": 250, "data_dir": "/home/me/kits19"},
        "run": {"num_processes": 8, "mixed_precision": "bf16"},
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics))
    return output_dir, model


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_metadata(run):
    card = build_model_card(run[0] / "model", dataset="kits19")
    meta = front_matter(card)
    assert meta["library_name"] == "peft"
    assert meta["license"] == "cc-by-nc-sa-4.0"  # trained on non-commercial data
    assert {"med-adapter", "medtuning_peft", "medical-imaging", "kits19"} <= set(meta["tags"])
    assert "base_model" not in meta  # a random tiny backbone has no Hub id


def test_model_card_body_has_task_data_metrics_settings_usage_and_citations(run):
    card = build_model_card(run[0] / "model", repo_id="my-org/kits19-swin")  # data set from metrics.json
    for label in LABELS:
        assert f"| {LABELS.index(label)} | {label} |" in card
    assert "KiTS19" in card and "CC BY-NC-SA 4.0" in card and "arXiv:1904.00445" in card  # data set + licence
    assert "| dice_mean | 0.8292 ± 0.0500 |" in card and "| steps | 212 |" in card  # metrics.json
    assert "case_00001" not in card and "tuned_percent" not in card
    assert "| lr | 0.002 |" in card and "| num_processes | 8 |" in card and "| reduction_ratio | 6 |" in card
    assert "/home/me" not in card  # local paths stay private
    assert "| crop size (D, H, W) | [8, 32, 32] |" in card
    assert "import medtuning_peft" in card and 'medtuning_peft.from_pretrained("my-org/kits19-swin")' in card
    assert (
        "Med-Tuning: A New Parameter-Efficient Tuning Framework for Medical Volumetric Segmentation" in card
    )
    assert "Shen, Jiachen and Wang, Wenxuan" in card and "arXiv:2304.10880" in card and "MIDL" in card


def test_card_counts_tuned_and_total_parameters(run):
    output_dir, model = run
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in model.backbone.named_parameters() if "med_adapter" not in n)
    assert count_parameters(output_dir / "model") == (tuned, tuned + base)
    assert (
        f"Tuned (adapters and decoder): {tuned:,} ({100 * tuned / (tuned + base):.2f} %)"
        in build_model_card(output_dir / "model")
    )


@pytest.mark.parametrize(("backbone", "method"), [("tiny-swin", "med_adapter"), ("tiny-segformer", "lora")])
def test_card_counts_a_trained_patch_embedding_once_as_training_does(tmp_path, backbone, method):
    # in_channels > 1: the patch embedding is trained (modules_to_save); its frozen original is in backbone/.
    model = build_segmenter(
        backbone, in_channels=4, num_classes=3, decoder="fpn", decoder_kwargs={"channels": 16},
        method=method, crop_size=[8, 32, 32],
    )  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    counts = parameter_counts(model)
    assert count_parameters(tmp_path / "model") == (counts["tuned"], counts["total"])
    assert f"Total: {counts['total']:,}." in build_model_card(tmp_path / "model")


@pytest.mark.parametrize(
    ("method", "in_channels", "tuned"),
    [
        ("med_adapter", 4, "Tuned (adapters, decoder and `embeddings.patch_embeddings`)"),
        ("lora", 1, "Tuned (adapters and decoder)"),
        ("decoder_only", 4, "Tuned (decoder)"),
        ("full", 1, "Tuned (backbone and decoder)"),
    ],
)
def test_card_says_what_was_tuned(tmp_path, method, in_channels, tuned):
    model = build_segmenter(
        "tiny-swin", in_channels=in_channels, num_classes=3, decoder="fpn", decoder_kwargs={"channels": 16},
        method=method, crop_size=[8, 32, 32],
    )  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    card = build_model_card(tmp_path / "model")
    assert tuned + ":" in card
    backbone = {"med_adapter": "frozen (but for `embeddings.patch_embeddings`)", "full": "fully trained"}
    assert f"with a {backbone.get(method, 'frozen')} 2D backbone" in card


def test_card_of_a_hub_backbone_names_it_as_base_model(tmp_path):
    base, _ = load_backbone("tiny-swin")
    base.config._name_or_path = "example-org/swin-tiny"  # as if loaded from the Hub
    build(base).save_pretrained(tmp_path / "model")
    card = build_model_card(tmp_path / "model", dataset="Our hospital's scans")
    meta = front_matter(card)
    assert meta["base_model"] == "example-org/swin-tiny" and meta["license"] == "other"
    assert "Total: not counted" in card and "No metrics were recorded" in card
    with_counts = build_model_card(tmp_path / "model", metrics={"parameters": {"total": 123456789}})
    assert "Total: 123,456,789." in with_counts
    assert "Our hospital's scans. Check the data licence" in card


@pytest.fixture
def recorded(monkeypatch):
    """Replaces the Hub calls (the network boundary) with recorders."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls  # in call order


def model_with_clutter(tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    for name in ("optimizer.pt", "training_args.bin", "notes.txt", ".DS_Store", "backbone/.hidden.json"):
        (model_dir / name).write_bytes(b"not for upload")
    return model_dir


def test_push_uploads_only_safetensors_json_and_the_card(tmp_path, recorded):
    model_dir = model_with_clutter(tmp_path)
    assert push_to_hub(model_dir, "my-org/kits19-swin", private=True, dataset="kits19") == "commit-info"
    assert recorded["create_repo"] == {
        "repo_id": "my-org/kits19-swin",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    upload = recorded["upload_folder"]
    assert upload["repo_id"] == "my-org/kits19-swin" and Path(upload["folder_path"]) == model_dir
    assert upload["allow_patterns"] == UPLOAD_PATTERNS and upload["ignore_patterns"] == IGNORE_PATTERNS
    on_disk = [p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()]
    sent = filter_repo_objects(
        on_disk, allow_patterns=upload["allow_patterns"], ignore_patterns=upload["ignore_patterns"]
    )
    assert sorted(sent) == EXPECTED_UPLOAD == files_to_upload(model_dir)
    card = (model_dir / "README.md").read_text()
    assert card == build_model_card(model_dir, dataset="kits19", repo_id="my-org/kits19-swin")


def test_push_to_a_new_branch_creates_it_before_uploading(tmp_path, recorded):
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    push_to_hub(model_dir, "my-org/new-model", revision="experiment-1")
    assert list(recorded) == ["create_repo", "create_branch", "upload_folder"]
    assert recorded["create_branch"] == {
        "repo_id": "my-org/new-model",
        "branch": "experiment-1",
        "repo_type": "model",
        "exist_ok": True,
    }
    assert recorded["upload_folder"]["revision"] == "experiment-1"


def test_push_command_revision_creates_the_branch(tmp_path, recorded):
    model_dir = model_with_clutter(tmp_path)
    assert main(["push", "--model", str(model_dir), "--repo-id", "my-org/x", "--revision", "v2"]) == 0
    assert recorded["create_branch"]["branch"] == "v2" and recorded["upload_folder"]["revision"] == "v2"


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("failing_call", ["create_branch", "upload_folder"])
def test_failed_push_leaves_the_model_folder_unchanged(tmp_path, recorded, monkeypatch, failing_call):
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    (model_dir / "README.md").write_text("# My own notes\n")
    before = folder_contents(model_dir)

    def fail(self, *args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(HfApi, failing_call, fail)
    with pytest.raises(OSError, match="connection reset"):
        push_to_hub(model_dir, "my-org/x", revision="experiment-1")
    assert folder_contents(model_dir) == before
    assert main(["push", "--model", str(model_dir), "--repo-id", "my-org/x", "--revision", "b"]) == 1
    assert folder_contents(model_dir) == before


def test_push_refuses_a_truncated_weights_file_before_uploading(tmp_path, recorded):
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    weights = model_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="adapter_model.safetensors.*truncated"):
        push_to_hub(model_dir, "my-org/name")
    assert recorded == {}


def test_push_refuses_a_malformed_repo_id(tmp_path, recorded):
    with pytest.raises(ValueError, match="'org/name'"):
        push_to_hub(tmp_path, "no-slash")


def test_push_command_dry_run_prints_the_card_and_uploads_nothing(tmp_path, recorded, capsys):
    model_dir = model_with_clutter(tmp_path)
    code = main(["push", "--model", str(model_dir), "--repo-id", "my-org/x", "--dataset", "msd", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0 and recorded == {}
    assert captured.out.startswith("---\nlibrary_name: peft") and "CC BY-SA 4.0" in captured.out
    assert all(name in captured.err for name in EXPECTED_UPLOAD[1:]) and "optimizer.pt" not in captured.err


def test_push_command_uploads(tmp_path, recorded, capsys):
    model_dir = model_with_clutter(tmp_path)
    assert main(["push", "--model", str(model_dir), "--repo-id", "my-org/x"]) == 0
    assert recorded["upload_folder"]["allow_patterns"] == UPLOAD_PATTERNS


def truncate_weights(model_dir: Path) -> None:
    weights = model_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def drop_method(model_dir: Path) -> None:
    config = json.loads((model_dir / "segmenter_config.json").read_text())
    del config["method"]
    (model_dir / "segmenter_config.json").write_text(json.dumps(config))


# case -> (damage to the model folder, repo id, words the error must contain)
NOT_PUSHABLE = {
    "truncated_weights": (truncate_weights, "my-org/x", "adapter_model.safetensors.*truncated"),
    "config_without_method": (
        drop_method,
        "my-org/x",
        r"segmenter_config.json: required field\(s\) \['method'\]",
    ),
    "repo_id_without_org": (lambda model_dir: None, "notvalid", "pass the Hub repository as 'org/name'"),
    "repo_id_bad_characters": (lambda model_dir: None, "my org/x y", "not a valid Hub id"),
}


@pytest.mark.parametrize("case", sorted(NOT_PUSHABLE))
def test_dry_run_refuses_what_a_real_push_refuses(tmp_path, recorded, capsys, case):
    damage, repo_id, words = NOT_PUSHABLE[case]
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    damage(model_dir)
    for extra in (["--dry-run"], []):
        assert main(["push", "--model", str(model_dir), "--repo-id", repo_id, *extra]) == 1
        captured = capsys.readouterr()
        assert re.search(words, captured.err) and captured.out == "", captured.err
    assert recorded == {}
