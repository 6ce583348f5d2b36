"""Volumetric segmenter: shapes, input-channel adaptation, methods, save / load, volume isolation."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from fake_hub import empty_hub_cache, folder_contents, put_in_hub_cache
from held_forward import held_inside, in_thread
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import medtuning_peft
from medtuning_peft import volumetric
from medtuning_peft.volumetric import (
    TINY_BACKBONES,
    adapt_input_channels,
    build_segmenter,
    extract_features,
    feature_spec,
    from_pretrained,
    load_backbone,
    min_slice_size,
    plain_taps,
    slices_to_volume,
    volume_to_slices,
)

REPO = Path(__file__).resolve().parents[1]

# test id -> tiny backbone name; `pytest -k swin` selects the Swin rows
BACKBONES = {
    "swin": "tiny-swin",
    "swin_backbone": "tiny-swin-backbone",
    "vit": "tiny-vit",
    "dinov2": "tiny-dinov2",
    "dinov2_registers": "tiny-dinov2-registers",
    "segformer": "tiny-segformer",
}
DECODERS = ["upernet", "fpn", "segformer"]
METHODS = ["med_adapter", "lora", "full", "decoder_only"]
SMALL_DECODER = {"channels": 16}

# (B, C, D, H, W): square and non-square slices, non-multiple-of-window sizes
SHAPES = {"square": (2, 1, 3, 64, 64), "wide": (1, 4, 4, 48, 80)}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run faster on one thread, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(backbone: str, in_channels: int = 1, method: str = "decoder_only", decoder: str = "upernet", **kw):
    return build_segmenter(
        BACKBONES[backbone],
        in_channels=in_channels,
        num_classes=3,
        decoder=decoder,
        method=method,
        decoder_kwargs=SMALL_DECODER,
        **kw,
    )


def perturb_trained_parameters(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Move trained parameters and BatchNorm statistics away from their initial values."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.train()
        model(x)
    model.eval()


def test_spec_table_covers_every_tiny_backbone():
    assert set(BACKBONES.values()) == set(TINY_BACKBONES)


def test_volume_slice_round_trip_is_volume_major():
    x = torch.randn(2, 3, 4, 5, 6)  # (B, C, D, H, W)
    slices = volume_to_slices(x)
    assert slices.shape == (8, 3, 5, 6)
    torch.testing.assert_close(slices[1 * 4 + 2], x[1, :, 2])  # row b*D + d is slice d of volume b
    torch.testing.assert_close(slices_to_volume(slices, 2), x)


def test_plain_backbones_tap_every_third_block():
    assert plain_taps(12) == [2, 5, 8, 11]
    assert plain_taps(24) == [5, 11, 17, 23]
    assert plain_taps(4) == [0, 1, 2, 3]
    assert plain_taps(6) == [0, 2, 3, 5] and plain_taps(2) == [0, 0, 0, 1]  # as the docstring says


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_shape(backbone, decoder, shape):
    B, C, D, H, W = SHAPES[shape]
    model = make(backbone, in_channels=C, decoder=decoder).eval()
    with torch.no_grad():
        logits = model(torch.randn(B, C, D, H, W))
    assert logits.shape == (B, 3, D, H, W)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_feature_maps_match_declared_channels(backbone):
    model, _ = load_backbone(BACKBONES[backbone])
    maps = extract_features(model.eval(), torch.randn(2, 3, 64, 96))
    assert [m.shape[1] for m in maps] == feature_spec(model).channels(model)
    assert all(m.shape[0] == 2 and m.ndim == 4 for m in maps)


@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_constant_image_gives_the_same_embedding_after_channel_adaptation(backbone, in_channels):
    original, _ = load_backbone(BACKBONES[backbone])
    original.eval()
    adapted = adapt_input_channels(copy.deepcopy(original), in_channels)
    assert adapted.config.num_channels == in_channels
    suffix = feature_spec(original).patch_embedding
    before, after = (
        original.get_submodule(_path(original, suffix)),
        adapted.get_submodule(_path(adapted, suffix)),
    )
    assert all(getattr(m, "num_channels", in_channels) == in_channels for m in after.modules())

    rgb, grey = torch.full((2, 3, 64, 64), 0.7), torch.full((2, in_channels, 64, 64), 0.7)
    with torch.no_grad():
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        torch.testing.assert_close(first(after(grey)), first(before(rgb)))
        for a, b in zip(extract_features(adapted, grey), extract_features(original, rgb)):
            torch.testing.assert_close(a, b)
        assert extract_features(adapted, torch.randn(1, in_channels, 64, 64))[0].shape[0] == 1


@pytest.mark.parametrize("method", ["med_adapter", "lora"])
@pytest.mark.parametrize("backbone", ["swin", "segformer", "vit"])
def test_multichannel_volumes_train_the_patch_embedding_so_channels_are_told_apart(backbone, method):
    # The adapted filters are equal across channels: frozen (train_patch_embedding=False), the backbone sees
    # only the channel sum and swapping BraTS' sequences changes nothing; by default for C > 1 it is trained.
    x = torch.randn(1, 4, 2, 32, 32)
    swapped = x[:, [3, 2, 1, 0]]
    trained = make(backbone, in_channels=4, method=method, num_slices=2)
    frozen = make(backbone, in_channels=4, method=method, num_slices=2, train_patch_embedding=False)
    stem = feature_spec(trained.backbone).patch_embedding
    assert any(p.requires_grad for n, p in trained.named_parameters() if stem in n)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if stem in n)
    for model in (frozen, trained):
        perturb_trained_parameters(model, x)
    with torch.no_grad():
        torch.testing.assert_close(frozen(swapped), frozen(x))
        assert not torch.allclose(trained(swapped), trained(x))


def test_the_trained_patch_embedding_is_saved_with_the_adapters_and_reloads(tmp_path):
    model = make("swin", in_channels=4, method="med_adapter", num_slices=2)
    x = torch.randn(1, 4, 2, 32, 32)
    perturb_trained_parameters(model, x)
    model.save_pretrained(tmp_path / "out")
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "embeddings.patch_embeddings" in adapter_config["modules_to_save"]
    loaded = from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
        torch.testing.assert_close(loaded(x[:, [3, 2, 1, 0]]), model(x[:, [3, 2, 1, 0]]))


@pytest.mark.parametrize("method, value", [("full", False), ("decoder_only", True), ("med_adapter", "yes")])
def test_a_train_patch_embedding_the_method_cannot_honour_is_refused(method, value):
    with pytest.raises(ValueError, match=rf"train_patch_embedding={value!r} with method='{method}'"):
        make("vit", in_channels=4, method=method, train_patch_embedding=value)


def _path(model: torch.nn.Module, suffix: str) -> str:
    return next(n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix))


def test_channel_adaptation_is_a_no_op_when_already_right_and_refuses_non_rgb():
    model, _ = load_backbone("tiny-vit")
    conv = model.embeddings.patch_embeddings.projection
    assert adapt_input_channels(model, 3).embeddings.patch_embeddings.projection is conv
    adapt_input_channels(model, 2)
    with pytest.raises(ValueError, match="only a 3-channel"):
        adapt_input_channels(model, 4)
    with pytest.raises(ValueError, match="in_channels"):
        adapt_input_channels(model, 0)


def _adapter_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters that tuner layers add (everything on a tuner layer outside its base layer)."""
    names = set()
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            names |= {f"{path}.{n}" for n, _ in module.named_parameters() if not n.startswith("base_layer.")}
    return names


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backbone", ["swin", "vit", "segformer"])
def test_trainable_parameters_are_what_the_method_claims(backbone, method):
    model = make(backbone, method=method, num_slices=3)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {n for n in names if n.startswith("decoder.")}
    if method == "full":
        assert trainable == set(names)
    elif method == "decoder_only":
        assert trainable == decoder
    else:
        adapters = _adapter_parameter_names(model)
        trained_copy = {n for n in decoder if n.startswith("decoder.modules_to_save.")}
        assert adapters and trained_copy
        assert trainable == adapters | trained_copy
        assert all(n.startswith("backbone.") for n in adapters)
        assert model.peft_model is not None


@pytest.mark.parametrize("method", ["med_adapter", "lora", "decoder_only"])
@pytest.mark.parametrize("backbone", ["swin", "dinov2_registers", "segformer"])
def test_slices_do_not_leak_across_volumes(backbone, method):
    model = make(backbone, method=method, num_slices=4)
    x = torch.randn(3, 1, 4, 32, 48)
    perturb_trained_parameters(model, x)
    changed = x.clone()
    changed[1:] = torch.randn_like(changed[1:])
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[0], model(x)[0])


@pytest.mark.parametrize("backbone", ["vit", "dinov2_registers"])
def test_plain_features_include_the_adapter_of_the_tapped_block(backbone):
    model = make(backbone, method="med_adapter", num_slices=2)
    x = torch.randn(1, 1, 2, 32, 32)
    perturb_trained_parameters(model, x)
    blocks = model.backbone.get_submodule("layers" if backbone == "vit" else "encoder.layer")
    last = blocks[len(blocks) - 1]
    assert isinstance(last, BaseTunerLayer)
    seen = []
    handle = last.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        maps = extract_features(model.backbone, volume_to_slices(x), num_slices=2)
    handle.remove()
    tokens = seen[0][:, -16:]  # (B*D, N, C) -> (B*D, h*w, C), a 4 x 4 grid
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), tokens)  # (B*D, C, h, w) -> (B*D, h*w, C)


def test_plain_feature_taps_follow_a_block_wrapped_later_and_keep_nothing_between_passes():
    from medtuning_peft import MedAdapterConfig

    model = make("vit", method="decoder_only")
    backbone = model.backbone
    x = volume_to_slices(torch.randn(1, 1, 2, 32, 32))
    with torch.no_grad():
        extract_features(backbone, x)  # taps installed on the plain blocks
    wrapped = peft.get_peft_model(backbone, MedAdapterConfig(num_slices=2, init_identity=False))
    with torch.no_grad():
        maps = extract_features(wrapped.base_model.model, x, num_slices=2)
        clean = extract_features(copy.deepcopy(wrapped.base_model.model), x, num_slices=2)
    blocks = wrapped.base_model.model.get_submodule("layers")
    seen = []
    handle = blocks[len(blocks) - 1].register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        extract_features(wrapped.base_model.model, x, num_slices=2)
    handle.remove()
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), seen[0][:, -16:])  # the adapter's output
    torch.testing.assert_close(clean[-1], maps[-1])  # a copy records into its own blocks
    kept = [n for n, m in wrapped.named_modules() if "_medtuning_tap_output" in m.__dict__]
    assert not kept  # no activations held after a pass


@pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 7),
    reason="torch.compile of transformers models needs torch >= 2.7",
)
@pytest.mark.parametrize("backbone", ["swin", "vit"])
def test_torch_compile_traces_the_whole_segmenter_as_one_graph_after_the_first_pass(backbone):
    # The first pass installs hooks (transformers' output capturing; the plain backbones' feature taps); after
    # it, the segmenter with adapters, feature extraction and decoder is one graph.
    model = make(backbone, method="med_adapter", num_slices=2).train()
    x = torch.randn(1, 1, 2, 32, 32)
    model(x)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("method", ["decoder_only", "med_adapter"])
def test_a_segmenter_refuses_a_second_thread_while_one_runs_and_keeps_its_outputs(method):
    # A plain backbone's feature taps keep the running pass's block outputs on the blocks; Med-Adapters keep the
    # slice count and inter-stage features on the model: a second thread's pass would overwrite or clear them.
    model = make("vit", method=method, num_slices=4).eval()
    x, y = torch.randn(1, 1, 4, 32, 32), torch.randn(2, 1, 2, 32, 32)

    def call(volumes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(volumes)

    expected_x, expected_y = call(x), call(y)
    refused = r"already running a forward in another thread.*copy\.deepcopy\(model\)"
    with (
        held_inside(model.backbone.layers[3], lambda: call(x)) as result,
        pytest.raises(RuntimeError, match=refused),
    ):
        call(y)  # the held pass has recorded three of its four taps (blocks 0, 1, 2, 3)
    assert "error" not in result, result
    torch.testing.assert_close(result["value"], expected_x, rtol=0, atol=0)
    torch.testing.assert_close(in_thread(lambda: call(y)).get("value"), expected_y, rtol=0, atol=0)
    torch.testing.assert_close(call(x), expected_x, rtol=0, atol=0)


def test_med_adapter_receives_the_slice_count():
    # Built for 3 slices; a forward with D = 5 only works when the segmenter passes num_slices=D.
    model = make("vit", method="med_adapter", num_slices=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 5, 32, 32)).shape == (2, 3, 5, 32, 32)


def test_unknown_method_and_wrong_label_names_are_refused():
    with pytest.raises(ValueError, match="Did you mean 'lora'"):
        make("vit", method="lorra")
    with pytest.raises(ValueError, match="label_names"):
        make("vit", label_names=["background", "kidney"])
    with pytest.raises(ValueError, match="Did you mean"):
        build_segmenter("tiny-vit", 1, 2, decoder="upernett")
    with pytest.raises(ValueError, match="takes no options"):
        make("vit", method="full", r=8)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_slices_smaller_than_the_backbone_embeds_are_refused_naming_the_minimum(backbone):
    model = make(backbone).eval()
    h, w = min_slice_size(model.backbone)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 2, h, w + 3)).shape == (1, 3, 2, h, w + 3)
        with pytest.raises(ValueError, match=rf"H x W = {h - 1} x {w + 3} .* at least {h} x {w} pixels"):
            model(torch.randn(1, 1, 2, h - 1, w + 3))


def test_segformer_slices_must_hold_its_sequence_reduction_kernels():
    # mit-b0 .. b5 (sr_ratios 8, 4, 2, 1): a 28-pixel side gives a 7 x 7 first grid, less than the 8 x 8
    # reduction kernel; the 4-pixel patch stride alone would allow it.
    model, _ = load_backbone("tiny-segformer")
    assert min_slice_size(model) == (29, 29)
    with torch.no_grad():
        extract_features(model.eval(), torch.randn(1, 3, 29, 29))
        with pytest.raises(RuntimeError, match="Kernel size"):
            extract_features(model, torch.randn(1, 3, 28, 29))


def test_wrong_input_layout_is_refused():
    model = make("vit", in_channels=4)
    with pytest.raises(ValueError, match="C=1"):
        model(torch.randn(1, 1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        model(torch.randn(1, 4, 32, 32))


# ---------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------

SAVE_CASES = [(b, m) for b in ("swin", "vit") for m in METHODS] + [("segformer", "med_adapter")]

LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import medtuning_peft

    root = sys.argv[1]
    x = load_file(f"{root}/input.safetensors")["x"]
    out = {}
    for name in json.loads(open(f"{root}/cases.json").read()):
        model = medtuning_peft.from_pretrained(f"{root}/{name}")
        assert not model.training
        with torch.no_grad():
            out[name] = model(x).contiguous()
    save_file(out, f"{root}/outputs.safetensors")
    """
)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Build, perturb and save every case; load all of them in one fresh Python process."""
    root = tmp_path_factory.mktemp("saved")
    x = torch.randn(2, 1, 4, 32, 48)
    expected = {}
    for backbone, method in SAVE_CASES:
        name = f"{backbone}-{method}"
        model = make(backbone, method=method, num_slices=4, label_names=["bg", "kidney", "tumor"])
        perturb_trained_parameters(model, x)
        with torch.no_grad():
            expected[name] = model(x)
        model.save_pretrained(root / name)
    save_file({"x": x}, str(root / "input.safetensors"))
    (root / "cases.json").write_text(json.dumps(list(expected)))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(root)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, expected, load_file(str(root / "outputs.safetensors"))


@pytest.mark.parametrize("backbone, method", SAVE_CASES, ids=[f"{b}-{m}" for b, m in SAVE_CASES])
def test_fresh_process_load_gives_identical_outputs(saved_models, backbone, method):
    root, expected, loaded = saved_models
    name = f"{backbone}-{method}"
    torch.testing.assert_close(loaded[name], expected[name], rtol=0, atol=0)
    files = {p.name for p in (root / name).iterdir()}
    weights = (
        {"adapter_config.json", "adapter_model.safetensors"}
        if method in ("med_adapter", "lora")
        else {"model.safetensors"}
    )
    assert {"segmenter_config.json", "backbone"} | weights <= files
    assert not [p for p in (root / name).rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    config = json.loads((root / name / "segmenter_config.json").read_text())
    assert config["method"] == method and config["label_names"] == ["bg", "kidney", "tumor"]


def test_loaded_model_is_frozen_unless_trainable(saved_models):
    root, _, _ = saved_models
    model = from_pretrained(root / "vit-lora")
    assert not any(p.requires_grad for p in model.parameters())
    model = from_pretrained(root / "vit-decoder_only", is_trainable=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("decoder.")
    }


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, read by huggingface_hub and transformers (offline)."""
    return empty_hub_cache(tmp_path, monkeypatch)


def as_if_loaded_from_the_hub(model, repo_id: str, cache: Path, folder: Path) -> None:
    """Name ``model`` by ``repo_id`` and put it in the Hub cache (at commit a...a), as ``from_pretrained`` would."""
    model.save_pretrained(folder)
    put_in_hub_cache(cache, repo_id, "a" * 40, folder_contents(folder))
    model.name_or_path = model.config._name_or_path = repo_id


def test_hub_backbone_is_referenced_not_saved(tmp_path, monkeypatch, hub_cache):
    base, _ = load_backbone("tiny-swin")
    as_if_loaded_from_the_hub(base, "example-org/swin-tiny", hub_cache, tmp_path / "base")
    pristine = copy.deepcopy(base)
    model = build_segmenter(base, 1, 3, method="lora", decoder_kwargs=SMALL_DECODER)
    x = torch.randn(1, 1, 2, 32, 32)
    perturb_trained_parameters(model, x)
    model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "backbone").exists()
    config = json.loads((tmp_path / "out" / "segmenter_config.json").read_text())
    assert (config["backbone"], config["backbone_weights"]) == ("example-org/swin-tiny", "hub")

    calls = []

    def fake_load_backbone(source, revision=None, with_weights=True, **kwargs):
        calls.append(source)
        return copy.deepcopy(pristine), {}

    monkeypatch.setattr(volumetric, "load_backbone", fake_load_backbone)
    loaded = from_pretrained(tmp_path / "out")
    assert calls == ["example-org/swin-tiny"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_backbone_object_whose_hub_commit_is_unknown_is_saved_with_the_model(
    tmp_path, monkeypatch, hub_cache
):
    # Named by a Hub id that is not in the cache (offline; e.g. loaded with another cache_dir): reloading it from
    # `main` might give other weights, so they are saved with the model and the Hub is never asked.
    base, _ = load_backbone("tiny-swin")
    base.config._name_or_path = "example-org/swin-tiny"
    model = build_segmenter(base, 1, 3, method="lora", decoder_kwargs=SMALL_DECODER)
    config = model.segmenter_config
    assert not config["backbone_reloadable"] and config["backbone_revision"] is None
    x = torch.randn(1, 1, 2, 32, 32)
    perturb_trained_parameters(model, x)
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "backbone" / "model.safetensors").is_file()
    monkeypatch.setattr(volumetric, "load_backbone", lambda *a, **k: pytest.fail("Hub"))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "out")(x), model(x))


def test_backbone_class_and_stages_survive_a_reload_by_id(tmp_path, monkeypatch, hub_cache):
    base, _ = load_backbone("tiny-swin-backbone")
    as_if_loaded_from_the_hub(base, "example-org/swin-tiny", hub_cache, tmp_path / "base")
    model = build_segmenter(base, 1, 3, method="decoder_only", decoder_kwargs=SMALL_DECODER)
    model.save_pretrained(tmp_path / "out")
    received = {}

    def fake_load_backbone(
        source, revision=None, with_weights=True, backbone_class=None, config_overrides=None
    ):
        received.update(backbone_class=backbone_class, config_overrides=config_overrides)
        return load_backbone("tiny-swin-backbone")

    monkeypatch.setattr(volumetric, "load_backbone", fake_load_backbone)
    from_pretrained(tmp_path / "out")
    assert received == {
        "backbone_class": "SwinBackbone",
        "config_overrides": {"out_features": ["stage1", "stage2", "stage3", "stage4"]},
    }


def test_save_backbone_forces_saving_a_hub_backbone(tmp_path, hub_cache):
    base, _ = load_backbone("tiny-vit")
    as_if_loaded_from_the_hub(base, "example-org/vit-tiny", hub_cache, tmp_path / "base")
    assert build_segmenter(base, 1, 3, method="decoder_only").segmenter_config["backbone_reloadable"]
    model = build_segmenter(
        base, 1, 3, method="decoder_only", decoder_kwargs=SMALL_DECODER, save_backbone=True
    )
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "backbone" / "model.safetensors").is_file()


def test_local_backbone_directory_is_loaded_and_saved_with_the_model(tmp_path):
    base, _ = load_backbone("tiny-segformer")
    base.save_pretrained(tmp_path / "pretrained")
    model = build_segmenter(str(tmp_path / "pretrained"), 4, 3, method="lora", decoder_kwargs=SMALL_DECODER)
    adapted = adapt_input_channels(copy.deepcopy(base), 4).eval()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():  # same weights as the directory, channel-adapted
        torch.testing.assert_close(extract_features(model.backbone, x)[-1], extract_features(adapted, x)[-1])
    perturb_trained_parameters(model, torch.randn(1, 4, 2, 32, 32))
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "backbone" / "model.safetensors").is_file()
    loaded = from_pretrained(tmp_path / "out")
    x = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("method", ["lora", "decoder_only"])
def test_half_precision_weights_load_in_the_default_dtype(tmp_path, method):
    # transformers keeps a checkpoint's stored dtype; a float16 backbone next to a float32 decoder and adapters
    # failed on float32 volumes, and so did a segmenter saved after .to(torch.bfloat16) once reloaded.
    base, _ = load_backbone("tiny-segformer")
    base.to(torch.float16).save_pretrained(tmp_path / "pretrained")
    model = build_segmenter(
        str(tmp_path / "pretrained"), 1, 3, method=method, num_slices=2, decoder_kwargs=SMALL_DECODER
    ).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    x = torch.randn(1, 1, 2, 32, 32)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "out")
    loaded = from_pretrained(tmp_path / "out")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.float()(x))


def test_a_backbone_module_trained_in_full_is_saved_with_its_pretrained_weights_under_its_own_names(tmp_path):
    # The saved base backbone held peft's wrapper names (original_module / modules_to_save), so the reloaded
    # backbone had a freshly initialized patch embedding under its trained copy.
    model = make(
        "vit", in_channels=4, method="med_adapter", num_slices=2, modules_to_save=["patch_embeddings"]
    )
    x = torch.randn(1, 4, 2, 32, 32)
    perturb_trained_parameters(model, x)
    model.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "backbone" / "model.safetensors"))
    assert not [k for k in saved if "original_module" in k or "modules_to_save" in k]
    loaded = from_pretrained(tmp_path / "out")
    original = "embeddings.patch_embeddings.original_module.projection.weight"
    torch.testing.assert_close(
        loaded.backbone.get_parameter(original), model.backbone.get_parameter(original)
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_decoder_named_in_another_case_is_saved_under_its_registry_name_and_reloads(tmp_path):
    model = build_segmenter(
        "tiny-vit", 1, 3, decoder="UperNet", method="decoder_only", decoder_kwargs=SMALL_DECODER
    )
    assert model.segmenter_config["decoder"] == "upernet"
    model.save_pretrained(tmp_path / "out")
    x = torch.randn(1, 1, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "out")(x), model.eval()(x))
    config = json.loads((tmp_path / "out" / "segmenter_config.json").read_text())
    config["decoder"] = "UperNet"  # as saved before the name was normalized
    (tmp_path / "out" / "segmenter_config.json").write_text(json.dumps(config))
    assert from_pretrained(tmp_path / "out") is not None


@pytest.mark.parametrize("method", ["decoder_only", "med_adapter", "full"])
def test_loading_by_hub_id_downloads_the_saved_model_and_no_stray_files(tmp_path, method):
    """Every file save_pretrained writes is downloaded (loading by Hub id is tested end to end in test_hub.py),
    and nothing else a repository may hold: training checkpoints, optimizer states, pickles."""
    from huggingface_hub.utils import filter_repo_objects

    make("vit", method=method).save_pretrained(tmp_path)
    saved = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    stray = [
        "checkpoint-500/adapter_model.safetensors",
        "checkpoints/step_10/model.safetensors",
        "trainer_state.json",
        "optimizer.safetensors",
        "pytorch_model.bin",
        "adapter_model.bin",
    ]
    fetched = list(filter_repo_objects([*saved, *stray], allow_patterns=volumetric.DOWNLOAD_PATTERNS))
    assert sorted(fetched) == saved


def test_interrupted_save_leaves_the_previous_save_intact(tmp_path, monkeypatch):
    model = make("vit")
    target = tmp_path / "out"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(volumetric, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directories left
    monkeypatch.undo()
    model.save_pretrained(target)  # overwriting an earlier save works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        make("vit").save_pretrained(tmp_path)


def test_from_pretrained_explains_a_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="segmenter_config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(tmp_path / "missing")


def test_an_in_channels_other_than_the_saved_backbone_takes_is_refused_naming_the_field(
    saved_models, tmp_path
):
    # The saved backbone already takes 1 channel; the message used to blame a non-RGB patch embedding.
    root, _, _ = saved_models
    edited = Path(shutil.copytree(root / "vit-decoder_only", tmp_path / "edited"))
    config = json.loads((edited / "segmenter_config.json").read_text())
    config["in_channels"] = 4
    (edited / "segmenter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"segmenter_config.json: in_channels is 4 but backbone_signature"):
        from_pretrained(edited)


def test_adapter_weights_saved_under_other_module_names_are_refused(saved_models, tmp_path):
    # A LoRA segmenter saved where transformers named the attention projections query / key / value (DINOv2
    # with registers before transformers 5.24): peft alone would only warn and leave fresh LoRA weights.
    root, _, _ = saved_models
    copy = tmp_path / "vit-lora"
    shutil.copytree(root / "vit-lora", copy)
    weights = copy / "adapter_model.safetensors"
    renamed = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
    state = {}
    for key, value in load_file(str(weights)).items():
        for new, old in renamed.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert state.keys() != load_file(str(root / "vit-lora" / "adapter_model.safetensors")).keys()
    save_file(state, str(weights), metadata={"format": "pt"})
    config = json.loads((copy / "segmenter_config.json").read_text())
    other = "5.17.0" if volumetric.transformers.__version__ != "5.17.0" else "5.24.0"
    config["versions"]["transformers"] = other
    (copy / "segmenter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"saved with transformers {other}.*Load it with transformers=={other}"
    ):
        from_pretrained(copy)
    config["versions"]["transformers"] = volumetric.transformers.__version__  # same version: another cause
    (copy / "segmenter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor\(s\) the model expects are not in the file.*re-save it"):
        from_pretrained(copy)
    assert from_pretrained(root / "vit-lora") is not None  # the original still loads


def test_every_save_records_the_versions_that_wrote_it(tmp_path):
    # A model first saved with older versions, loaded and saved again: its files are those of this save, which
    # from_pretrained names when the saved tensors do not fit (module names change between transformers versions).
    make("vit", method="lora").save_pretrained(tmp_path / "first")
    config_file = tmp_path / "first" / "segmenter_config.json"
    config = json.loads(config_file.read_text())
    current = dict(config["versions"])
    config["versions"] = {"medtuning_peft": "0.0.1", "transformers": "5.0.0", "peft": "0.14.0"}
    config_file.write_text(json.dumps(config))
    from_pretrained(tmp_path / "first").save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "segmenter_config.json").read_text())
    versions = {
        "medtuning_peft": medtuning_peft.__version__,
        "transformers": volumetric.transformers.__version__,
        "peft": peft.__version__,
    }
    assert saved["versions"] == current == versions


def test_a_mistyped_tiny_backbone_name_lists_the_known_ones(monkeypatch):
    monkeypatch.setattr(
        volumetric.transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("Hub")
    )
    with pytest.raises(
        ValueError,
        match=r"Unknown tiny backbone name 'tiny-swim'; known: \[.*'tiny-vit'.*Did you mean 'tiny-swin'",
    ):
        build_segmenter("tiny-swim", 1, 2)


@pytest.mark.parametrize("source", ["/nonexistent/dir", "./no_such_dir", "runs/no/such/model"])
def test_a_missing_local_backbone_directory_is_named_not_sent_to_the_hub(source, monkeypatch):
    monkeypatch.setattr(
        volumetric.transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("Hub")
    )
    with pytest.raises(FileNotFoundError, match=f"backbone '{source}' is not a local directory"):
        build_segmenter(source, 1, 2)


@pytest.mark.parametrize("load", ["backbone", "model"])
def test_a_name_neither_local_nor_cached_says_so_when_offline(load, monkeypatch, tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError(
            "Cannot find an appropriate cached snapshot folder for the specified revision"
        )

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(volumetric, "snapshot_download", offline)
    monkeypatch.setattr(volumetric.transformers.AutoConfig, "from_pretrained", offline)
    words = r"'nope_model' is not a local directory \(no such directory under .*\), and as a Hub id it is not in the local Hugging Face cache"
    with pytest.raises(FileNotFoundError, match=words):
        build_segmenter("nope_model", 1, 2) if load == "backbone" else from_pretrained("nope_model")
