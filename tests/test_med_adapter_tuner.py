"""Med-Adapter through peft's public API on every supported backbone (tiny configs, random init)."""

from __future__ import annotations

import collections
import importlib
import json
import pickle
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from held_forward import held_inside, in_thread
from packaging.version import Version
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import BUILDERS, DEVICES, HEADS, build, output_tensor, paper_swin_t, paper_vit_b16, slices
from torch import nn
from transformers import SwinConfig, SwinModel

import medtuning_peft
from medtuning_peft import MedAdapterConfig, enable_activation_checkpointing
from medtuning_peft.tuners.med_adapter import MedAdapter, MedAdapterLayer, SpectralFilter, modules

D = 3  # slices per volume
NAMES = list(BUILDERS)
TESTS_DIR = Path(__file__).parent


def adapted(name: str, seed: int = 0, **config) -> PeftModel:
    config.setdefault("num_slices", D)
    return get_peft_model(build(name, seed), MedAdapterConfig(modules_to_save=HEADS.get(name), **config))


def run(model, x, **kw) -> torch.Tensor:
    return output_tensor(model(pixel_values=x, **kw))


def train_steps(model, x, steps=2, lr=1e-2):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        run(model, x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# --- parameter parity ---------------------------------------------------------------------------------


def _inserted(model) -> tuple[int, int]:
    before = sum(p.numel() for p in model.parameters())
    pm = get_peft_model(model, MedAdapterConfig())
    after = sum(p.numel() for p in pm.parameters())
    return after - before, sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_parameter_parity_with_the_paper_on_swin_t():
    assert _inserted(paper_swin_t()) == (737_568, 737_568)


def test_parameter_parity_with_the_paper_on_vit_b16():
    assert _inserted(paper_vit_b16()) == (2_845_696, 2_845_696)


# --- training touches only what it should -------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_only_adapter_and_head_params_train_and_change(name):
    model = adapted(name)
    heads = HEADS.get(name, [])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        assert ".med_adapter." in n or ".modules_to_save." in n, n
    assert any(".med_adapter." in n for n in trainable)
    if heads:
        assert any(".modules_to_save." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = slices(2, D)
    for _ in range(2):
        run(model, x).square().mean().backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) <= (n in trainable), f"frozen {n} got a gradient"
        opt.step()
        opt.zero_grad(set_to_none=False)
    for n, p in model.named_parameters():
        if n in trainable:
            if p.grad is not None and before[n].numel() and not torch.equal(p.grad, torch.zeros_like(p)):
                assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_training_works_after_an_evaluation_under_inference_mode():
    # The spectral branch's constant inverse-DFT matrices are cached for the whole process: built first under
    # torch.inference_mode() (a validation or sanity pass), they must not break a later training backward.
    modules._inverse_dft_basis.cache_clear()  # earlier tests of this process may have built them with autograd on
    model = adapted("swin")
    x = slices(2, D)
    with torch.inference_mode():
        run(model.eval(), x)
    run(model.train(), x).square().mean().backward()
    spectral = [p for n, p in model.named_parameters() if ".spectral." in n]
    assert spectral and all(p.grad is not None and p.grad.any() for p in spectral)


# --- volumes are independent; the spectral branch spans the volume ------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_parameter_is_in_the_graph(name):
    # DistributedDataParallel without find_unused_parameters, and autograd.grad over the trainable parameters,
    # fail on a parameter the forward never uses. The first inter-stage adapter's projection sees zeros (as in
    # the reference): it is in the graph with an exactly zero gradient.
    model = adapted(name).train()
    # (UperNet's auxiliary head, a trained head next to the adapters, only runs when labels are given.)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".med_adapter." in n]
    grads = torch.autograd.grad(run(model, slices(2, D)).float().square().mean(), [p for _, p in named])
    zero = {n for (n, _), g in zip(named, grads) if not g.any()}
    assert len(zero) == 1 and next(iter(zero)).endswith(".med_adapter.default.project_prev.weight")


@pytest.mark.parametrize("name", NAMES)
def test_slices_do_not_leak_across_volumes(name):
    model = train_steps(adapted(name), slices(2, D))
    x = slices(2, D)
    with torch.no_grad():
        ref = run(model, x)
        x2 = x.clone()
        x2[:D] += torch.randn_like(x2[:D])  # perturb volume 0 only
        out = run(model, x2)
    assert torch.equal(out[D:], ref[D:])
    assert not torch.equal(out[:D], ref[:D])


def test_new_adapters_take_the_mode_of_the_model():
    # transformers' from_pretrained returns a model in eval mode: adapters added to it must not run BatchNorm on
    # batch statistics (volumes would influence each other, and the running statistics would move).
    model = adapted("swin")  # the tiny builders return eval-mode models, as from_pretrained
    model.add_adapter("second", MedAdapterConfig(num_slices=D))
    assert not any(m.training for m in model.base_model.model.modules())
    x = slices(2, D)
    x2 = x.clone()
    x2[D:] += torch.randn_like(x2[D:])  # perturb volume 1 only
    with torch.no_grad():
        assert torch.equal(run(model, x2)[:D], run(model, x)[:D])
    model.train()
    model.add_adapter("third", MedAdapterConfig(num_slices=D))
    assert all(m.training for m in model.base_model.model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_spectral_branch_reaches_every_slice_of_its_own_volume(name):
    # Six slices, a single in-plane-only kernel (k = 1): only the spectral branch can mix slices.
    model = adapted(name, num_slices=6, kernel_sizes=(1,), inter_stage=False).eval()
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():  # the initial filter (ones) is the identity along D: make it mix slices
        if isinstance(module, SpectralFilter):
            module.weight.data.normal_(generator=gen)
    base = build(name)
    x = slices(2, 6)
    x2 = x.clone()
    x2[0] += 1.0  # perturb slice 0 of volume 0
    with torch.no_grad():
        changed = (run(model, x2) - run(model, x)).flatten(1).abs().amax(1)
        base_changed = (run(base, x2) - run(base, x)).flatten(1).abs().amax(1)
    assert torch.all(base_changed[1:] == 0)  # the 2D backbone alone never mixes slices
    assert torch.all(changed[:6] > 0), changed
    assert torch.all(changed[6:] == 0), changed


# --- save / load -------------------------------------------------------------------------------------

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    import medtuning_peft
    from peft import PeftModel
    from safetensors.torch import load_file
    from tiny_models import build, output_tensor
    t = load_file({tensors!r})
    diffs = {{}}
    for adapter_name, low_mem in (("default", False), ("colleague", True)):
        model = PeftModel.from_pretrained(build({name!r}), {adapter_dir!r}, adapter_name=adapter_name,
                                          low_cpu_mem_usage=low_mem).eval()
        with torch.no_grad():
            out = output_tensor(model(pixel_values=t["x"]))
        diffs[adapter_name] = (out - t["ref"]).abs().max().item()
    print(json.dumps(diffs))
    """
)


@pytest.mark.parametrize("name", NAMES)
def test_fresh_process_load_gives_identical_outputs(name, tmp_path):
    model = train_steps(adapted(name), slices(2, D, seed=3))  # moves weights and BatchNorm statistics
    x = slices(2, D)
    with torch.no_grad():
        ref = run(model, x)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    files = sorted(p.name for p in adapter_dir.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "MED_ADAPTER"
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert all(".med_adapter." in k or any(f".{h}." in k for h in HEADS.get(name, [])) for k in keys), keys
    assert any(k.endswith("norm.running_mean") for k in keys)  # BatchNorm statistics travel with the adapter
    save_file({"x": x, "ref": ref.contiguous()}, tmp_path / "tensors.safetensors")
    code = RELOAD.format(
        tests=str(TESTS_DIR),
        tensors=str(tmp_path / "tensors.safetensors"),
        name=name,
        adapter_dir=str(adapter_dir),
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert diffs == {"default": 0.0, "colleague": 0.0}


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: build("vit"), "model_type: adapter 'swin'.*ViTModel has none of them"),
        (
            lambda: SwinModel(
                SwinConfig(
                    image_size=36,
                    patch_size=4,
                    num_channels=1,
                    embed_dim=12,
                    depths=[2, 2, 2],
                    num_heads=[2, 4, 8],
                    window_size=5,
                )
            ),
            "adapter has 4 .* model has 6",
        ),
        (
            lambda: SwinModel(
                SwinConfig(
                    image_size=36,
                    patch_size=4,
                    num_channels=3,
                    embed_dim=12,
                    depths=[2, 2],
                    num_heads=[2, 4],
                    window_size=5,
                )
            ),
            "num_channels: adapter 1 vs model 3",
        ),
        (
            lambda: SwinModel(
                SwinConfig(
                    image_size=36,
                    patch_size=4,
                    num_channels=1,
                    embed_dim=24,
                    depths=[2, 2],
                    num_heads=[2, 4],
                    window_size=5,
                )
            ),
            r"widths \[12, 24\]\), model has 4",
        ),
    ],
    ids=["architecture", "depth", "channels", "width"],
)
def test_loading_onto_another_backbone_is_refused_before_weights(other, message, tmp_path):
    adapted("swin").save_pretrained(tmp_path)
    target = other()
    before = {n: p.clone() for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(target, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())


def test_loading_needs_the_registration_and_says_so_otherwise(tmp_path):
    adapted("swin").save_pretrained(tmp_path)
    code = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "MED_ADAPTER" in proc.stderr


# --- disable / unload / adapters ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_disable_adapter_equals_the_base_model(name):
    x = slices(2, D)
    model = train_steps(adapted(name), x)
    with torch.no_grad():
        base = run(build(name), x)
        with model.disable_adapter():
            disabled = run(model, x)
        enabled = run(model, x)
    # Trained modules_to_save heads are switched back to the original heads too.
    assert torch.equal(disabled, base)
    assert not torch.equal(enabled, base)


@pytest.mark.parametrize("name", NAMES)
def test_unload_restores_the_original_model(name):
    x = slices(2, D)
    original = build(name)
    with torch.no_grad():
        base = run(original, x)
    model = get_peft_model(original, MedAdapterConfig(num_slices=D))
    restored = model.unload()
    assert restored is original
    assert not any(isinstance(m, MedAdapterLayer) for m in restored.modules())
    assert not restored._forward_pre_hooks and not restored._forward_hooks
    with torch.no_grad():
        assert torch.equal(run(restored, x), base)


def test_merge_and_unload_is_refused_with_the_reason():
    model = adapted("swin")
    with pytest.raises(NotImplementedError, match="not a weight delta"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="not a weight delta"):
        model.merge_adapter()


def test_per_sample_adapter_names_are_refused_not_ignored():
    # peft's PeftModel.forward drops `adapter_names` before calling the model: without a refusal the active
    # adapter would silently run on every sample.
    model = adapted("swin")
    model.add_adapter("other", MedAdapterConfig(num_slices=D, reduction_ratio=2))
    x = slices(1, D)
    with torch.no_grad():
        expected = run(model, x)
        for names in (["other"] * D, ["default", "other", "default"]):
            with pytest.raises(ValueError, match=r"adapter_names=.*set_adapter"):
                run(model, x, adapter_names=names)
        torch.testing.assert_close(run(model, x), expected, rtol=0, atol=0)  # nothing left behind


def test_weighted_combination_of_adapters_is_refused_with_the_reason():
    model = adapted("swin")
    model.add_adapter("other", MedAdapterConfig(num_slices=D))
    with pytest.raises(NotImplementedError, match="add_weighted_adapter.*not a weight delta.*set_adapter"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mixed")
    assert list(model.peft_config) == ["default", "other"]


def test_add_set_and_delete_adapters():
    model = adapted("swin")
    x = slices(2, D)
    model.add_adapter("other", MedAdapterConfig(num_slices=D, init_identity=True))
    with torch.no_grad():
        first = run(model, x)
        model.set_adapter("other")
        second = run(model, x)
        base = run(build("swin"), x)
    torch.testing.assert_close(second, base)  # init_identity: the new adapter starts as the identity
    assert not torch.equal(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".med_adapter.other." in n for n in trainable)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert all("other" not in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(run(model, x), first)


@pytest.mark.parametrize("name", ["swin", "vit", "upernet_swin"])
def test_a_deep_copy_and_a_pickled_copy_compute_what_the_original_does(name):
    # An EMA copy (`AveragedModel` deep-copies the model) must run its own forward context: with hooks bound to
    # the original, the copy's inter-stage features were never reset, and its `num_slices=` went to the original.
    model = train_steps(adapted(name), slices(2, D))
    x, y = slices(2, D), slices(1, 2 * D, seed=5)
    with torch.no_grad():
        expected = [run(model, x), run(model, y, num_slices=2 * D), run(model, x)]
    ema = torch.optim.swa_utils.AveragedModel(model)
    copies = [ema.module]
    if name != "upernet_swin":  # transformers' own output-capturing hook on UperNet's backbone is a closure
        copies.append(pickle.loads(pickle.dumps(model)))
    clone = copies[-1]
    for copy in copies:
        with torch.no_grad():
            got = [run(copy, x), run(copy, y, num_slices=2 * D), run(copy, x)]
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    # The copy trains on its own: checkpointed gradients (context replayed in backward) equal the original's.
    for m in (model, clone):
        m.train().zero_grad()
        backbone = m.base_model.model
        backbone = getattr(backbone, "backbone", backbone)
        enable_activation_checkpointing(backbone)
        torch.manual_seed(0)  # the same stochastic depth in both
        run(m, x).float().square().mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), clone.named_parameters()):
        if p.requires_grad and p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=n)


@pytest.mark.parametrize("name", ["up", "spectral", "0", "blocks", "weight"])
def test_adapter_names_that_would_drop_weights_on_save_are_refused(name):
    # peft's save_pretrained leaves out every weight whose name contains another adapter's name as a part: a
    # second adapter named "up" would drop the first one's up-projections from its file.
    model = adapted("swin")
    with pytest.raises(ValueError, match=f"Adapter name '{name}' is also a part of the weight name"):
        model.add_adapter(name, MedAdapterConfig(num_slices=D))
    assert list(model.peft_config) == ["default"]
    assert all(set(m.med_adapter) == {"default"} for m in model.modules() if isinstance(m, MedAdapterLayer))
    with pytest.raises(ValueError, match=f"Adapter name '{name}'"):
        get_peft_model(build("swin"), MedAdapterConfig(num_slices=D), adapter_name=name)


@pytest.mark.parametrize(
    "name, config",
    [
        ("spectral", {"use_fft": False}),
        ("inplane", {"kernel_sizes": ()}),
        ("across", {"kernel_sizes": ()}),
        ("branches", {"kernel_sizes": ()}),
        ("5", {"kernel_sizes": (3,)}),  # the sixth branch of a config with six kernel sizes
    ],
)
def test_adapter_names_that_another_config_would_use_in_weight_names_are_refused(name, config):
    # The adapter's own config lacks that part, but another adapter of the model may have it: its weights would be
    # left out of its file by save_pretrained.
    with pytest.raises(ValueError, match=f"Adapter name '{name}' is also a part of the weight name"):
        get_peft_model(build("swin"), MedAdapterConfig(num_slices=D, **config), adapter_name=name)
    model = adapted("swin")
    with pytest.raises(ValueError, match=f"Adapter name '{name}' is also a part of the weight name"):
        model.add_adapter(name, MedAdapterConfig(num_slices=D, **config))
    assert list(model.peft_config) == ["default"]


def test_one_config_object_can_serve_several_adapters():
    # As with LoRA: `add_adapter(name, config)` with the config that created the first adapter. The name checked
    # is the one being added.
    config = MedAdapterConfig(num_slices=D)
    model = get_peft_model(build("swin"), config)
    model.add_adapter("second", config)
    assert all(
        set(m.med_adapter) == {"default", "second"} for m in model.modules() if isinstance(m, MedAdapterLayer)
    )
    with pytest.raises(ValueError, match="Adapter name 'spectral' is also a part of the weight name"):
        model.add_adapter("spectral", config)
    assert list(model.peft_config) == ["default", "second"]


def test_the_adapter_name_check_draws_no_random_numbers():
    # Seeded runs must initialize the adapters and the decoder as before the check existed.
    from medtuning_peft.tuners.med_adapter.model import MedAdapterModel

    model = build("swin")
    state = torch.random.get_rng_state()
    MedAdapterModel._check_adapter_name(model, "second")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_print_trainable_parameters_counts_the_adapters(capsys):
    model = adapted("vit")
    model.print_trainable_parameters()
    expected = sum(p.numel() for n, p in model.named_parameters() if ".med_adapter." in n)
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


# --- slices at run time -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["swin", "vit", "segformer"])
def test_runtime_num_slices_overrides_the_config(name):
    model = train_steps(adapted(name), slices(2, D))
    x = slices(2, D)
    with torch.no_grad():
        assert torch.equal(run(model, x, num_slices=D), run(model, x))
        other = run(model, slices(2, 4), num_slices=4)  # resampled spectral filter
        single = run(model, slices(1, 2 * D), num_slices=2 * D)
    assert other.shape[0] == 8 and single.shape[0] == 2 * D


def test_a_slice_batch_that_is_not_whole_volumes_is_refused():
    model = adapted("swin")
    with pytest.raises(ValueError, match="not a whole number of volumes of num_slices=3"):
        run(model, slices(1, 4))
    with pytest.raises(ValueError, match="num_slices must be a positive int"):
        run(model, slices(1, 3), num_slices=0)


class _VolumeModel(nn.Module):
    """A user's own root module around a backbone: its forward takes num_slices and reshapes by volume."""

    def __init__(self):
        super().__init__()
        self.backbone = build("swin")
        self.head = nn.Linear(self.backbone.config.hidden_size, 2)

    def forward(self, pixel_values, num_slices):
        hidden = self.backbone(pixel_values=pixel_values, num_slices=num_slices).last_hidden_state
        return self.head(hidden).reshape(
            -1, num_slices, *hidden.shape[1:-1], 2
        )  # (B*D, N, K) -> (B, D, N, K)


class _VolumeModelWithDefault(_VolumeModel):
    def forward(self, pixel_values, num_slices=1):
        return super().forward(pixel_values, num_slices)


@pytest.mark.parametrize("root", [_VolumeModel, _VolumeModelWithDefault])
def test_a_root_module_whose_forward_takes_num_slices_receives_it(root):
    torch.manual_seed(0)
    model = get_peft_model(root(), MedAdapterConfig(num_slices=D, modules_to_save=["head"])).eval()
    x = slices(1, 2 * D)
    with torch.no_grad():
        out = model(pixel_values=x, num_slices=2 * D)
        base = model.base_model.model
        hidden = base.backbone(pixel_values=x, num_slices=2 * D).last_hidden_state  # one volume of 2D slices
        expected = base.head(hidden).reshape(1, 2 * D, *hidden.shape[1:-1], 2)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_a_direct_backbone_call_leaves_no_state_for_later_calls():
    # The adapted backbone inside a root model, called on its own (feature extraction, probing): its num_slices
    # must not stick to later calls, and its inter-stage features must not stay referenced.
    model = get_peft_model(_VolumeModel(), MedAdapterConfig(num_slices=D, modules_to_save=["head"])).eval()
    backbone = model.base_model.model.backbone
    kept = []
    for adapter in (m for m in model.modules() if isinstance(m, MedAdapter) and m.is_inter_stage):
        adapter.register_forward_hook(lambda module, args, out: kept.append(weakref.ref(out[1])))
    x = slices(2, D)
    with torch.no_grad():
        first = backbone(pixel_values=x).last_hidden_state  # the config's D: two volumes
        whole = backbone(pixel_values=x, num_slices=2 * D).last_hidden_state  # one volume
        again = backbone(pixel_values=x).last_hidden_state
    assert not torch.equal(whole, first)
    assert torch.equal(again, first)
    assert kept and all(ref() is None for ref in kept)


# --- precision, checkpointing, hidden states -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["swin", "vit", "segformer", "dinov2_registers"])
def test_autocast_forward_and_backward(name, dtype):
    model = adapted(name).train()
    with torch.autocast("cpu", dtype=dtype):
        out = run(model, slices(2, D))
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".med_adapter." in n)


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bf16_base_weights_get_float32_adapters_unless_asked_otherwise(autocast_adapter_dtype):
    # peft's autocast_adapter_dtype: True (default) upcasts bf16/fp16 adapters to float32, False keeps the
    # dtype of the adapted layer; for adapters created later too.
    model = get_peft_model(
        build("vit").to(torch.bfloat16),
        MedAdapterConfig(num_slices=D),
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    model.add_adapter("second", MedAdapterConfig(num_slices=D), autocast_adapter_dtype=autocast_adapter_dtype)
    expected = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    adapter_params = [p for n, p in model.named_parameters() if ".med_adapter." in n]
    assert adapter_params and all(p.dtype == expected for p in adapter_params)
    out = run(model.train(), slices(2, D).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(
        p.grad is not None and p.grad.dtype == expected
        for n, p in model.named_parameters()
        if p.requires_grad
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["swin", "vit", "segformer"])
def test_non_reentrant_gradient_checkpointing_gives_exact_gradients(name, device):
    # The same gradients, and the same BatchNorm statistics after the step: the recomputation in backward must
    # not update the adapters' running statistics a second time.
    x = slices(2, D).to(device)
    # cuDNN's convolution backward may sum in another order in the recomputation: float32 rounding apart.
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}

    def step(checkpointing: bool):
        model = adapted(name).to(device).train()
        for m in model.modules():  # dropout off: compare the math, not the random masks
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        if checkpointing:
            enable_activation_checkpointing(model)
        run(model, x).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, {n: b.clone() for n, b in model.named_buffers() if "med_adapter" in n}

    (plain, plain_buffers), (checkpointed, checkpointed_buffers) = step(False), step(True)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], **tolerance, msg=n)
    assert any(n.endswith("num_batches_tracked") for n in plain_buffers)
    assert plain_buffers.keys() == checkpointed_buffers.keys()
    for n in plain_buffers:
        torch.testing.assert_close(checkpointed_buffers[n], plain_buffers[n], rtol=0, atol=0, msg=n)


def test_checkpointing_keeps_batchnorm_statistics_over_steps_and_momentum_none():
    # Several steps, cumulative averaging (momentum None) and one BatchNorm frozen in eval mode by the user: the
    # statistics after training with checkpointing are those of training without it, and the momenta are back.
    x = slices(2, D)

    def train(checkpointing: bool):
        model = adapted("swin").train()
        norms = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm3d) and "med_adapter" in n]
        norms[0].momentum = None
        norms[1].eval()
        if checkpointing:
            enable_activation_checkpointing(model)
        for _ in range(3):
            run(model, x).square().mean().backward()
        assert norms[0].momentum is None and norms[2].momentum == 0.1
        return {n: b.clone() for n, b in model.named_buffers() if "med_adapter" in n}

    plain, checkpointed = train(False), train(True)
    assert any(n.endswith("num_batches_tracked") and int(b) == 3 for n, b in plain.items())
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name", ["vit", "swin", "upernet_swin"])
def test_checkpointing_enabled_before_get_peft_model(name):
    # peft then calls transformers' enable_input_require_grads: fine on ViT (the same gradients as enabling it
    # after), a failure deep in transformers on Swin's tuple-returning patch embeddings, so refused up front.
    def grads(before: bool):
        base = build(name)
        if before:
            enable_activation_checkpointing(base)
        model = get_peft_model(base, MedAdapterConfig(num_slices=D, modules_to_save=HEADS.get(name))).train()
        if not before:
            enable_activation_checkpointing(model)
        run(model, slices(2, D)).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    if name == "vit":
        after, before = grads(False), grads(True)
        assert after.keys() == before.keys()
        for n in after:
            torch.testing.assert_close(before[n], after[n], rtol=0, atol=0, msg=n)
        return
    with pytest.raises(ValueError, match=r"already on in this \w+\. Enable it after get_peft_model"):
        grads(True)


def test_enable_activation_checkpointing_finds_the_backbone_and_refuses_other_models():
    # A PeftModel, a task model holding the backbone, and a segmenter: each gets the backbone's checkpointing on.
    for model in (adapted("swin"), adapted("upernet_swin")):
        assert medtuning_peft.enable_activation_checkpointing(model) is model
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    segmenter = medtuning_peft.build_segmenter("tiny-vit", in_channels=1, num_classes=2)
    medtuning_peft.enable_activation_checkpointing(segmenter)
    assert any(getattr(m, "gradient_checkpointing", False) for m in segmenter.backbone.modules())
    with pytest.raises(ValueError, match="holds no transformers model"):
        medtuning_peft.enable_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)))


def test_checkpointed_recomputation_replays_its_own_forward():
    # Two forwards, then one backward: each recomputation must see the inter-stage features of the forward it
    # replays, not those of the later one.
    x1, x2 = slices(2, D, seed=5), slices(2, D, seed=6)

    def grads(checkpointing: bool):
        model = adapted("swin").train()
        for m in model.modules():
            if isinstance(m, nn.Dropout) or type(m).__name__ == "SwinDropPath":
                m.eval()
        if checkpointing:
            enable_activation_checkpointing(model.base_model.model)
        loss = run(model, x1).square().mean() + run(model, x2).abs().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["swin", "vit", "segformer", "dinov2_registers", "upernet_swin"])
def test_checkpointing_recomputes_each_adapted_block_once(name):
    # transformers checkpoints Swin stages and the blocks inside them; Med-Adapter checkpoints each adapted
    # block (block + adapter) as one unit instead: one forward and one recomputation per training step, and the
    # backbone's own flags are as the user set them after the step.
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = adapted(name).train()
    backbone = model.base_model.model
    backbone = getattr(backbone, "backbone", backbone)  # a task model (UperNet): checkpoint its backbone
    enable_activation_checkpointing(backbone)
    flags = {
        n: m.gradient_checkpointing
        for n, m in backbone.named_modules()
        if hasattr(m, "gradient_checkpointing")
    }
    assert (
        sum(
            isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in backbone.modules()
        )
        > 0
    )
    calls = collections.Counter()
    layers = [m for m in model.modules() if isinstance(m, MedAdapterLayer)]
    for i, layer in enumerate(layers):
        # Pre-hooks: a non-reentrant recomputation stops as soon as it has what backward needs.
        layer.base_layer.register_forward_pre_hook(lambda *_, i=i: calls.update([("block", i)]))
        layer.med_adapter["default"].register_forward_pre_hook(lambda *_, i=i: calls.update([("adapter", i)]))
    run(model, slices(2, D)).square().mean().backward()
    assert set(calls.values()) == {2} and len(calls) == 2 * len(layers)
    assert flags == {n: m.gradient_checkpointing for n, m in backbone.named_modules() if n in flags}
    assert all(layer.checkpoint_func is None for layer in layers)  # nothing of the forward is left behind

    # transformers >= 5.24 name, or the former one
    disable = getattr(backbone, "activation_checkpointing_disable", backbone.gradient_checkpointing_disable)
    disable()
    calls.clear()
    run(model, slices(2, D)).square().mean().backward()
    assert set(calls.values()) == {1}


# Dynamo before torch 2.7 fails inside transformers' own output capturing (NameError), adapters or not.
needs_dynamo_for_transformers = pytest.mark.skipif(
    Version(torch.__version__).release < (2, 7),
    reason="torch.compile of transformers models needs torch >= 2.7",
)


@needs_dynamo_for_transformers
@pytest.mark.parametrize("backbone", ["swin", "vit"])
def test_torch_compile_traces_the_adapted_model_as_one_graph(backbone):
    # A graph break per adapter (torch 2.11 could not trace the autocast-availability check) splits the model
    # into dozens of graphs: launches come back, and inductor 2.11 failed on the split graphs' dynamic shapes.
    torch._dynamo.reset()
    model = get_peft_model(build(backbone), MedAdapterConfig(num_slices=D)).train()
    explanation = torch._dynamo.explain(model)(pixel_values=slices(2, D), num_slices=D)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
@needs_dynamo_for_transformers
def test_torch_compile_gives_the_eager_outputs_and_gradients():
    # torch.compile of the whole PeftModel (hooks, the per-forward context, the custom spectral backward):
    # the same function as eager, in training mode, with trained (slice-mixing) spectral filters.
    model = train_steps(adapted("swin"), slices(2, D, seed=3)).train()
    for m in model.modules():  # no random masks: compare the math
        if isinstance(m, nn.Dropout) or type(m).__name__ == "SwinDropPath":
            m.eval()
    x = slices(2, D, seed=4)

    def output_and_grads(m):
        model.zero_grad(set_to_none=True)
        out = run(m, x, num_slices=D)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = output_and_grads(model)
    compiled, compiled_grads = output_and_grads(torch.compile(model))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert compiled_grads.keys() == eager_grads.keys()
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-3, atol=1e-6, msg=n)


@needs_dynamo_for_transformers
@pytest.mark.parametrize("backbone", ["swin", "vit"])
def test_compiled_model_with_activation_checkpointing_trains_as_eager(backbone):
    # `accelerate launch --dynamo_backend ... --gradient-checkpointing`: Dynamo takes no context_fn, and the
    # compiler's recomputation would replay the adapters' BatchNorm updates; the frozen block alone is the unit.
    x = slices(2, D)

    def train(checkpointing: bool, compiled: bool):
        torch._dynamo.reset()
        model = adapted(backbone).train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        if checkpointing:
            enable_activation_checkpointing(model)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        for _ in range(2):
            run(forward, x).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, {n: b.clone() for n, b in model.named_buffers() if "med_adapter" in n}

    (grads, buffers), (eager_grads, eager_buffers) = train(True, True), train(False, False)
    assert grads.keys() == eager_grads.keys() and buffers.keys() == eager_buffers.keys()
    for n in eager_grads:
        torch.testing.assert_close(grads[n], eager_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    for n in eager_buffers:
        torch.testing.assert_close(buffers[n], eager_buffers[n], rtol=1e-5, atol=1e-6, msg=n)


def test_reentrant_gradient_checkpointing_is_refused():
    model = adapted("swin").train()
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    with pytest.raises(ValueError, match="use_reentrant"):
        run(model, slices(2, D))


@pytest.mark.parametrize("name", ["vit", "dinov2", "dinov2_registers"])
def test_vit_like_hidden_states_include_the_adapter(name):
    model = train_steps(adapted(name), slices(2, D))
    x = slices(2, D)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        base = build(name)(pixel_values=x, output_hidden_states=True)
    layernorm = model.base_model.model.layernorm
    torch.testing.assert_close(layernorm(out.hidden_states[-1]), out.last_hidden_state)
    torch.testing.assert_close(out.hidden_states[0], base.hidden_states[0])  # embeddings: before any adapter
    assert all(not torch.equal(a, b) for a, b in zip(out.hidden_states[1:], base.hidden_states[1:]))


def test_backbone_feature_maps_include_the_adapter():
    model = train_steps(adapted("swin_backbone"), slices(2, D))
    x = slices(2, D)
    with torch.no_grad():
        maps = model(pixel_values=x).feature_maps
        base_maps = build("swin_backbone")(pixel_values=x).feature_maps
    assert all(not torch.equal(a, b) for a, b in zip(maps, base_maps))


# --- structure and errors ------------------------------------------------------------------------------


def test_inter_stage_blocks_follow_the_backbone():
    swin = adapted("swin")
    vit = adapted("vit")
    assert swin.peft_config["default"].inter_stage_modules == [
        "encoder.layers.0.blocks.1",
        "encoder.layers.1.blocks.1",
    ]
    assert vit.peft_config["default"].inter_stage_modules == ["layers.2", "layers.5"]
    fused = [
        n
        for n, m in vit.named_modules()
        if isinstance(m, MedAdapterLayer) and m.med_adapter["default"].is_inter_stage
    ]
    assert [n.rsplit(".", 1)[-1] for n in fused] == ["2", "5"]
    none = adapted("vit", inter_stage=False)
    assert not any(
        m.med_adapter["default"].is_inter_stage for m in none.modules() if isinstance(m, MedAdapterLayer)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction_ratio": 0}, "reduction_ratio must be an int >= 1, got 0"),
        ({"num_slices": -2}, "num_slices must be an int >= 1, got -2"),
        ({"kernel_sizes": (3, 4)}, "kernel_sizes must hold odd positive ints"),
        ({"kernel_sizes": 3}, "kernel_sizes must be a list or tuple"),
        ({"kernel_sizes": (3, 3)}, "kernel_sizes has duplicates"),
        ({"kernel_sizes": (), "use_fft": False}, "has no branch"),
        ({"use_fft": "yes"}, "use_fft must be True or False"),
        ({"target_modules": 5}, "target_modules must be None, a regex string or a list"),
        ({"modules_to_save": 5}, "modules_to_save must be None or a list of module names, got 5"),
        ({"modules_to_save": ["head", 3]}, "modules_to_save must be None or a list of module names"),
        ({"backbone_signature": "x"}, "backbone_signature must be None"),
    ],
)
def test_invalid_config_values_are_refused_with_the_field_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedAdapterConfig(**kwargs)


def test_data_parallel_replicas_are_refused():
    model = adapted("swin")
    replica = model.base_model.model._replicate_for_data_parallel()  # what nn.DataParallel runs on each GPU
    with pytest.raises(RuntimeError, match="does not support torch.nn.DataParallel"):
        replica(pixel_values=slices(1, D))


@pytest.mark.parametrize(
    ("held", "other"), [("model", "model"), ("model", "backbone"), ("backbone", "model")]
)
def test_a_forward_from_another_thread_is_refused_while_one_runs(held, other):
    # The adapters' per-forward context (slice count, inter-stage features) is one per model: a second thread's
    # forward would overwrite the running one's. "backbone": the adapted backbone called on its own.
    model = adapted("upernet_swin")
    backbone = model.base_model.model.backbone
    x = slices(2, D)

    def call(which: str, num_slices: int) -> torch.Tensor:
        with torch.no_grad():
            if which == "model":
                return run(model, x, num_slices=num_slices)
            return output_tensor(backbone(pixel_values=x, num_slices=num_slices))

    expected = {(which, n): call(which, n) for which in ("model", "backbone") for n in (D, 2 * D)}
    layers = [m for m in model.modules() if isinstance(m, MedAdapterLayer)]
    # Held in the last stage: the inter-stage features of the stages before it are in the context.
    refused = r"already running a forward in another thread.*one forward at a time.*copy\.deepcopy\(model\)"
    with (
        held_inside(layers[-2].base_layer, lambda: call(held, 2 * D)) as result,
        pytest.raises(RuntimeError, match=refused),
    ):
        call(other, D)
    assert "error" not in result, result
    torch.testing.assert_close(result["value"], expected[held, 2 * D], rtol=0, atol=0)
    # Both done: the model runs from either thread.
    other_thread = in_thread(lambda: call(other, D))
    torch.testing.assert_close(other_thread.get("value"), expected[other, D], rtol=0, atol=0)
    torch.testing.assert_close(call(held, 2 * D), expected[held, 2 * D], rtol=0, atol=0)


def test_a_thread_that_ended_inside_a_forward_does_not_hold_the_model():
    # A KeyboardInterrupt skips the hooks that end a forward: the context still names the thread that ran it.
    model = adapted("swin")
    x = slices(1, D)
    with torch.no_grad():
        expected = run(model, x)

    def interrupt(*_):
        raise KeyboardInterrupt

    def interrupted():
        layer = next(m for m in model.modules() if isinstance(m, MedAdapterLayer))
        handle = layer.base_layer.register_forward_pre_hook(interrupt)
        try:
            run(model, x)
        except KeyboardInterrupt:
            return "interrupted"
        finally:
            handle.remove()

    assert in_thread(interrupted) == {"value": "interrupted"}
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), expected, rtol=0, atol=0)


def test_a_model_without_supported_blocks_is_refused():
    with pytest.raises(ValueError, match="found no supported transformer block.*swin"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), MedAdapterConfig())


def test_targets_that_are_not_blocks_are_refused():
    with pytest.raises(ValueError, match="not a transformer block Med-Adapter knows"):
        get_peft_model(build("vit"), MedAdapterConfig(target_modules=["layers.0.attention"]))


def test_registration_is_idempotent():
    importlib.reload(medtuning_peft.tuners.med_adapter.registration)
    importlib.reload(importlib.import_module("medtuning_peft.tuners.med_adapter"))
    assert [m for m in PeftType if m == "MED_ADAPTER"] == [PeftType.MED_ADAPTER]
    model = get_peft_model(build("swin"), medtuning_peft.tuners.med_adapter.MedAdapterConfig(num_slices=D))
    assert model.peft_type == "MED_ADAPTER"


def test_swin_slices_smaller_than_its_windows_are_refused_before_transformers_breaks_the_model():
    # Swin-T's window 7 at 128 x 128 slices: the last stage grid is 4 x 4. Transformers would shrink the window
    # without its position bias, fail, and keep the shrunk window; always_partition=True pads instead.
    config = SwinConfig(
        embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7, image_size=224
    )
    model = get_peft_model(SwinModel(config), MedAdapterConfig(num_slices=2)).eval()
    x = torch.randn(2, 3, 128, 128)
    with pytest.raises(
        ValueError, match=r"stage grids of \[32, 16, 8, 4\], smaller than its window 7.*always_partition=True"
    ):
        model(pixel_values=x, num_slices=2)
    with torch.no_grad():
        out = model(pixel_values=x, num_slices=2, always_partition=True).last_hidden_state
        assert out.shape == (2, 16, 192)
        assert model(pixel_values=torch.randn(2, 3, 224, 224), num_slices=2).last_hidden_state.shape == (
            2,
            49,
            192,
        )
