"""Hub sharing: the model card and the exact files an upload sends (offline: only the Hub API is replaced)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from fake_hub import empty_hub_cache, folder_contents, put_in_hub_cache
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

import medtuning_peft
from medtuning_peft.cli import main
from medtuning_peft.hub import (
    build_model_card,
    count_parameters,
    files_to_upload,
    push_to_hub,
    validate_card,
)
from medtuning_peft.io_utils import CorruptFileError
from medtuning_peft.training import parameter_counts
from medtuning_peft.volumetric import build_segmenter, load_backbone

LABELS = ["background", "kidney", "tumor"]
EXPECTED_UPLOAD = [  # README.md: the generated model card
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
    """The card's metadata as the Hub reads it (huggingface_hub's parser), checked against plain YAML."""
    assert card.startswith("---\n")
    meta = ModelCard(card).data.to_dict()
    assert meta == yaml.safe_load(card.split("---\n")[1])
    return meta


def test_model_card_metadata(run):
    card = build_model_card(run[0] / "model", dataset="kits19")
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-segmentation"
    assert meta["license"] == "cc-by-nc-sa-4.0"  # trained on non-commercial data
    assert {"med-adapter", "medtuning_peft", "medical-imaging", "kits19"} <= set(meta["tags"])
    assert meta["datasets"] == ["kits19"]
    assert "base_model" not in meta  # a random tiny backbone has no Hub id


def test_model_card_reports_the_summary_metrics_and_invents_none(run):
    model_dir = run[0] / "model"
    meta = front_matter(build_model_card(model_dir, dataset="kits19"))
    (result,) = meta["model-index"][0]["results"]
    assert result["task"] == {"type": "image-segmentation"}
    assert result["dataset"]["type"] == "kits19" and "split" not in result["dataset"]  # split not recorded
    assert result["metrics"] == [{"type": "dice_mean", "value": 0.8292, "name": "dice_mean"}]
    training_run = {"summary": {"hd95_tumor": {"mean": 12.5, "std": 1.0}}, "history": {"loss": []}}
    card = build_model_card(model_dir, metrics=training_run, dataset="kits19")
    (result,) = front_matter(card)["model-index"][0]["results"]
    assert result["dataset"]["split"] == "validation"  # a training run's final validation
    assert "HD95 in mm" in card and "Dice in" not in card
    for metrics in ({}, {"steps": 10}):
        card = build_model_card(model_dir, metrics=metrics, dataset="kits19")
        assert "model-index" not in front_matter(card)
        assert "Dice in" not in card and "HD95" not in card


def test_card_metadata_keeps_user_text_verbatim(run):
    license = "other  # see LICENSE: terms"
    meta = front_matter(build_model_card(run[0] / "model", dataset="my-org/ct-scans: v2", license=license))
    assert meta["license"] == license
    assert "datasets" not in meta  # a free-form name is no Hub data set id
    meta = front_matter(build_model_card(run[0] / "model", dataset="my-org/ct-scans"))
    assert meta["datasets"] == ["my-org/ct-scans"]


def test_card_of_a_local_backbone_names_no_base_model(tmp_path, monkeypatch):
    # A backbone loaded from a relative directory that is gone (or elsewhere) when the card is written.
    monkeypatch.chdir(tmp_path)
    base, _ = load_backbone("tiny-swin")
    base.save_pretrained("runs/swin")
    build("runs/swin").save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path / "model")
    assert "base_model" not in front_matter(build_model_card(tmp_path / "model"))


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


@pytest.mark.parametrize(
    ("method", "library", "method_tag"),
    [("med_adapter", "peft", "med-adapter"), ("lora", "peft", "lora"), ("full", None, "full"),
     ("decoder_only", None, "decoder-only")],
)  # fmt: skip
def test_card_names_the_library_and_method_of_what_was_saved(tmp_path, method, library, method_tag):
    # Only med_adapter / lora save a peft adapter; full / decoder_only save a model.safetensors that peft does not
    # load (the Hub also reads a library from the tags).
    model = build_segmenter("tiny-swin", 1, 3, decoder="fpn", decoder_kwargs={"channels": 16}, method=method)
    model.save_pretrained(tmp_path / "model")
    meta = front_matter(build_model_card(tmp_path / "model"))
    assert meta.get("library_name") == library
    assert ("peft" in meta["tags"]) == (library == "peft")
    assert method_tag in meta["tags"] and {"medtuning_peft", "image-segmentation"} <= set(meta["tags"])
    assert ("med-adapter" in meta["tags"]) == (method == "med_adapter")


def test_card_of_a_hub_backbone_names_it_as_base_model(tmp_path, hub_cache):
    base, _ = load_backbone("tiny-swin")
    base.save_pretrained(tmp_path / "base")
    put_in_hub_cache(hub_cache, "example-org/swin-tiny", "a" * 40, folder_contents(tmp_path / "base"))
    base.config._name_or_path = "example-org/swin-tiny"  # as if loaded from the Hub
    build(base).save_pretrained(tmp_path / "model")
    card = build_model_card(tmp_path / "model", dataset="Our hospital's scans")
    meta = front_matter(card)
    assert meta["base_model"] == "example-org/swin-tiny" and meta["license"] == "other"
    assert "datasets" not in meta and "model-index" not in meta
    assert "Total: not counted" in card and "No metrics were recorded" in card
    with_counts = build_model_card(tmp_path / "model", metrics={"parameters": {"total": 123456789}})
    assert "Total: 123,456,789." in with_counts
    assert "Our hospital's scans. Check the data licence" in card


@pytest.fixture
def recorded(monkeypatch):
    """Replaces the Hub's network calls with recorders: ``validate_card`` (the Hub's metadata check, tested
    against a local server below), ``create_repo``, ``create_branch`` and ``create_commit`` (which
    ``upload_folder`` also ends in). The commit operations are huggingface_hub's own objects."""
    calls = {}

    def validate(card):
        calls["validate_card"] = {"content": card}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = {"repo_id": repo_id, **kwargs}

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"] = {"repo_id": repo_id, "operations": list(operations), **kwargs}
        return "commit-info"

    monkeypatch.setattr(medtuning_peft.hub, "validate_card", validate)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls  # in call order


def committed(calls: dict) -> dict[str, bytes]:
    """The files of the recorded commit: path in the repository -> content."""
    files = {}
    for operation in calls["create_commit"]["operations"]:
        assert isinstance(operation, CommitOperationAdd)
        with operation.as_file() as f:
            files[operation.path_in_repo] = f.read()
    return files


CLUTTER = {  # what else may lie in a model folder; none of it is part of the saved model
    "optimizer.pt": b"pickle",
    "training_args.bin": b"pickle",
    "notes.txt": b"notes",
    ".DS_Store": b"",
    "backbone/.hidden.json": b"{}",
    "checkpoint-500/adapter_model.safetensors": b"an older adapter",
    "checkpoints/step_10/model.safetensors": b"an accelerate checkpoint",
    "metrics.json": b'{"settings": {"data_dir": "/home/me/patients"}}',
    "trainer_state.json": b"{}",
    "README.md": b"# My own notes\n",
}


def model_with_clutter(tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    for name, data in CLUTTER.items():
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / name).write_bytes(data)
    return model_dir


def test_push_uploads_the_saved_model_and_the_card_only(tmp_path, recorded):
    model_dir = model_with_clutter(tmp_path)
    before = folder_contents(model_dir)
    assert push_to_hub(model_dir, "my-org/kits19-swin", private=True, dataset="kits19") == "commit-info"
    assert recorded["create_repo"] == {
        "repo_id": "my-org/kits19-swin",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    files = committed(recorded)
    assert sorted(files) == EXPECTED_UPLOAD == files_to_upload(model_dir)
    card = build_model_card(model_dir, dataset="kits19", repo_id="my-org/kits19-swin")
    assert files.pop("README.md").decode() == card  # the generated card, not the folder's README.md
    assert recorded["validate_card"] == {"content": card}
    assert files == {name: before[name] for name in files}
    assert folder_contents(model_dir) == before  # the folder is only read


def test_push_leaves_visibility_to_the_hub_unless_asked(tmp_path, recorded):
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    push_to_hub(model_dir, "my-org/x")
    assert recorded["create_repo"]["private"] is None  # the user's or organization's default


def test_push_passes_commit_options(tmp_path, recorded):
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    push_to_hub(
        model_dir,
        "my-org/x",
        commit_message="v2",
        commit_description="retrained on 210 cases",
        create_pr=True,
    )
    commit = recorded["create_commit"]
    assert (commit["commit_message"], commit["commit_description"], commit["create_pr"]) == (
        "v2",
        "retrained on 210 cases",
        True,
    )
    assert commit["repo_id"] == "my-org/x" and commit["revision"] is None and commit["repo_type"] == "model"


def test_push_to_a_new_branch_creates_it_before_uploading(tmp_path, recorded):
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    push_to_hub(model_dir, "my-org/new-model", revision="experiment-1")
    assert list(recorded) == ["validate_card", "create_repo", "create_branch", "create_commit"]
    assert recorded["create_branch"] == {
        "repo_id": "my-org/new-model",
        "branch": "experiment-1",
        "repo_type": "model",
        "exist_ok": True,
    }
    assert recorded["create_commit"]["revision"] == "experiment-1"
    card = committed(recorded)["README.md"].decode()  # colleagues are told to load that branch
    assert 'from_pretrained("my-org/new-model", revision="experiment-1")' in card
    assert "--model my-org/new-model --input scans/ --output predictions/ --revision experiment-1" in card


def test_push_command_revision_creates_the_branch(tmp_path, recorded):
    model_dir = model_with_clutter(tmp_path)
    assert main(["push", "--model", str(model_dir), "--repo-id", "my-org/x", "--revision", "v2"]) == 0
    assert recorded["create_branch"]["branch"] == "v2" and recorded["create_commit"]["revision"] == "v2"


def saved(tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    build().save_pretrained(model_dir)
    return model_dir


@pytest.fixture
def local_hub(monkeypatch):
    """A local HTTP server as the Hub at ``HF_ENDPOINT``: records each request (path, JSON body) and answers
    with ``answer["status"]`` and ``answer["text"]``."""
    from huggingface_hub import constants

    requests, answer = [], {"status": 200, "text": "ok"}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            requests.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            body = answer["text"].encode()
            self.send_response(answer["status"])
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this server is local
    yield requests, answer
    server.shutdown()
    server.server_close()
    thread.join()


def test_the_card_is_checked_by_the_hub_at_hf_endpoint(tmp_path, local_hub):
    requests, _ = local_hub
    card = build_model_card(saved(tmp_path), dataset="kits19", repo_id="my-org/x")
    validate_card(card)
    assert requests == [("/api/validate-yaml", {"repoType": "model", "content": card})]


def test_push_of_a_card_the_hub_rejects_creates_nothing(tmp_path, recorded, monkeypatch, local_hub):
    requests, answer = local_hub
    monkeypatch.setattr(
        medtuning_peft.hub, "validate_card", validate_card
    )  # the real check, at the local Hub
    answer.update(status=400, text='"license" must be one of [apache-2.0, mit, ...]')  # unknown licence id
    with pytest.raises(ValueError, match=r"rejected the model card: \"license\" must be one of"):
        push_to_hub(saved(tmp_path), "my-org/x", license="apache2", revision="b")
    assert len(requests) == 1 and recorded == {}


def test_an_endpoint_without_the_card_check_pushes_with_a_warning(
    tmp_path, recorded, monkeypatch, local_hub, caplog
):
    requests, answer = local_hub
    monkeypatch.setattr(medtuning_peft.hub, "validate_card", validate_card)
    answer.update(status=404, text="Not Found")  # a mirror or private Hub without /api/validate-yaml
    with caplog.at_level("WARNING", logger="medtuning_peft.hub"):
        assert push_to_hub(saved(tmp_path), "my-org/x") == "commit-info"
    assert "pushed unchecked" in caplog.text and len(requests) == 1
    assert list(recorded) == ["create_repo", "create_commit"]


def test_other_card_check_failures_stop_the_push(tmp_path, recorded, monkeypatch, local_hub):
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(medtuning_peft.hub, "validate_card", validate_card)
    local_hub[1].update(status=503, text="unavailable")
    with pytest.raises(HfHubHTTPError):
        push_to_hub(saved(tmp_path), "my-org/x")
    assert recorded == {}


@pytest.mark.parametrize("failing_call", ["create_repo", "create_branch", "create_commit"])
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


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, read by huggingface_hub and transformers (offline)."""
    return empty_hub_cache(tmp_path, monkeypatch)


@pytest.mark.parametrize("backbone_source", ["tiny-swin", "hub-id"])
def test_a_pushed_model_loaded_by_hub_id_gives_the_local_outputs(
    tmp_path, recorded, hub_cache, backbone_source
):
    backbone = "tiny-swin"
    if backbone_source == "hub-id":  # the base backbone itself comes from the (cached) Hub
        base, _ = load_backbone("tiny-swin")
        base.save_pretrained(tmp_path / "base")
        put_in_hub_cache(hub_cache, "example-org/swin-tiny", "a" * 40, folder_contents(tmp_path / "base"))
        backbone = "example-org/swin-tiny"
    volumes = torch.randn(1, 1, 8, 32, 32)
    outputs = {}
    for branch, seed in (("main", 1), ("experiment-1", 2)):
        torch.manual_seed(seed)
        model = build(backbone)
        for parameter in model.parameters():  # trained adapters and decoder, different on each branch
            if parameter.requires_grad:
                parameter.data.normal_(std=0.1)
        model_dir = tmp_path / branch
        model.save_pretrained(model_dir)
        push_to_hub(model_dir, "my-org/kits19-swin", revision=None if branch == "main" else branch)
        commit = (str(seed) * 40)[:40]
        put_in_hub_cache(hub_cache, "my-org/kits19-swin", commit, committed(recorded), ref=branch)
        with torch.no_grad():
            outputs[branch] = medtuning_peft.from_pretrained(model_dir)(volumes)
            from_hub = medtuning_peft.from_pretrained("my-org/kits19-swin", revision=commit)(volumes)
        torch.testing.assert_close(from_hub, outputs[branch], rtol=0, atol=0)
    assert (tmp_path / "main" / "backbone").exists() == (backbone_source == "tiny-swin")
    with torch.no_grad():
        latest = medtuning_peft.from_pretrained("my-org/kits19-swin")(volumes)  # the main branch
        branch = medtuning_peft.from_pretrained("my-org/kits19-swin", revision="experiment-1")(volumes)
    torch.testing.assert_close(latest, outputs["main"], rtol=0, atol=0)
    torch.testing.assert_close(branch, outputs["experiment-1"], rtol=0, atol=0)
    assert not torch.equal(outputs["main"], outputs["experiment-1"])


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
    assert front_matter(captured.out)["library_name"] == "peft" and "CC BY-SA 4.0" in captured.out
    assert all(name in captured.err for name in EXPECTED_UPLOAD[1:]) and "optimizer.pt" not in captured.err


def test_push_command_uploads(tmp_path, recorded, capsys):
    model_dir = model_with_clutter(tmp_path)
    assert main(["push", "--model", str(model_dir), "--repo-id", "my-org/x"]) == 0
    assert sorted(committed(recorded)) == EXPECTED_UPLOAD


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


@pytest.mark.parametrize("given", ["hub_id", "loaded_object"])
def test_a_hub_backbone_is_pinned_to_the_commit_it_was_loaded_from(tmp_path, hub_cache, given):
    """A saved model re-loads its Hub backbone from the commit it was trained on, not from where the branch is
    now: a moved `main` would silently give other outputs. Also for a backbone object loaded from the Hub by
    the user (transformers 5.25 no longer records its commit in the config)."""
    for seed, commit in ((1, "a" * 40), (2, "b" * 40)):  # `main` at commit a, later moved to b
        torch.manual_seed(seed)
        base, _ = load_backbone("tiny-swin")
        base.save_pretrained(tmp_path / f"base-{seed}")
        if seed == 1:
            put_in_hub_cache(hub_cache, "example-org/swin-tiny", commit, folder_contents(tmp_path / "base-1"))
            backbone = "example-org/swin-tiny"
            if given == "loaded_object":
                backbone = transformers.SwinModel.from_pretrained(backbone)
            torch.manual_seed(0)
            model = build(backbone).eval()
            assert model.segmenter_config["backbone_revision"] == commit
            model.save_pretrained(tmp_path / "model")
            assert not (tmp_path / "model" / "backbone").exists()  # re-loaded from the Hub, not saved
            volumes = torch.randn(1, 1, 8, 32, 32)
            with torch.no_grad():
                expected = model(volumes)
        else:
            put_in_hub_cache(hub_cache, "example-org/swin-tiny", commit, folder_contents(tmp_path / "base-2"))
    with torch.no_grad():
        reloaded = medtuning_peft.from_pretrained(tmp_path / "model")(volumes)
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=0)


def test_push_command_leaves_visibility_to_the_hub_and_passes_commit_options(tmp_path, recorded):
    model_dir = model_with_clutter(tmp_path)
    assert main(["push", "--model", str(model_dir), "--repo-id", "my-org/x"]) == 0
    assert recorded["create_repo"]["private"] is None  # not forced public
    argv = ["push", "--model", str(model_dir), "--repo-id", "my-org/x", "--private", "--create-pr"]
    assert main([*argv, "--commit-description", "fold 0 of 5"]) == 0
    assert recorded["create_repo"]["private"] is True
    assert recorded["create_commit"]["create_pr"] is True
    assert recorded["create_commit"]["commit_description"] == "fold 0 of 5"


def test_push_command_dry_run_prints_the_card_of_the_branch_it_would_push(tmp_path, recorded, capsys):
    model_dir = model_with_clutter(tmp_path)
    argv = ["push", "--model", str(model_dir), "--repo-id", "my-org/x", "--revision", "v2", "--dry-run"]
    assert main(argv) == 0 and recorded == {}
    printed = capsys.readouterr().out
    main(["push", "--model", str(model_dir), "--repo-id", "my-org/x", "--revision", "v2"])
    assert printed.strip() == committed(recorded)["README.md"].decode().strip()


def test_push_command_dry_run_prints_the_card_it_would_push_to_a_pull_request(tmp_path, recorded, capsys):
    model_dir = model_with_clutter(tmp_path)
    argv = ["push", "--model", str(model_dir), "--repo-id", "my-org/x", "--revision", "refs/pr/3"]
    assert main([*argv, "--dry-run"]) == 0 and recorded == {}
    printed = capsys.readouterr().out
    assert main(argv) == 0
    pushed = committed(recorded)["README.md"].decode()
    assert printed.strip() == pushed.strip() and "refs/pr/3" not in pushed
