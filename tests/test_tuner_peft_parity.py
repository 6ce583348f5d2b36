"""Med-Adapter against peft's API as a peft user relies on it, next to what peft does for LoRA on the same backbone.

Several adapters (add, load, switch, delete, disable), loading with every ``from_pretrained`` / ``load_adapter``
option, the adapter and whole-model state dicts, dtypes, ``unload`` and the errors for a model or file that does
not fit. Tiny transformers backbones from ``tests/tiny_models.py``, random init.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tiny_models import HEADS, build, output_tensor, slices
from torch import nn

from medtuning_peft import MedAdapterConfig, enable_activation_checkpointing
from medtuning_peft.tuners.med_adapter import MedAdapterLayer

D = 3


def med(name: str, **kw) -> MedAdapterConfig:
    return MedAdapterConfig(num_slices=D, modules_to_save=HEADS.get(name), **kw)


def lora(name: str, **kw) -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=HEADS.get(name), **kw)


def run(model, x, **kw) -> torch.Tensor:
    return output_tensor(model(pixel_values=x, **kw))


def train_steps(model, seed: int, steps: int = 2):
    """A few Adam steps of the active adapter (weights and BatchNorm statistics move), then eval mode."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        run(model, slices(2, D, seed=seed)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def trainable_adapters(model) -> set[str]:
    """Adapter names with a trainable parameter, heads as ``head:<name>``; LoRA and Med-Adapter alike."""
    names = set()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".modules_to_save." in n:
            names.add("head:" + n.split(".modules_to_save.")[1].split(".")[0])
        elif ".med_adapter." in n:
            names.add(n.split(".med_adapter.")[1].split(".")[0])
        else:
            names.add(n.split(".lora_")[1].split(".")[1])
    return names


def adapter_dtypes(model) -> set[torch.dtype]:
    return {
        t.dtype for n, t in (*model.named_parameters(), *model.named_buffers()) if "med_adapter." in n
    } - {torch.int64}


# --- several adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["swin", "vit", "upernet_swin"])
def test_two_trained_adapters_save_reload_and_switch_exactly(name, tmp_path):
    model = train_steps(get_peft_model(build(name), med(name)), seed=3)
    # The second adapter differs in its branches and Inter-FI: each adapter runs with its own plan.
    model.add_adapter("bee", med(name, kernel_sizes=(3,), inter_stage=False))
    model.set_adapter("bee")
    assert {n for n in trainable_adapters(model) if not n.startswith("head:")} == {"bee"}
    train_steps(model, seed=4)
    x = slices(2, D)
    with torch.no_grad():
        out_bee = run(model, x)
        model.set_adapter("default")
        out_default = run(model, x)
        base = run(build(name), x)
    assert not torch.equal(out_bee, out_default)
    model.save_pretrained(tmp_path / "all")
    model.save_pretrained(tmp_path / "selected", selected_adapters=["bee"])
    assert (tmp_path / "all" / "bee" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "selected" / "adapter_model.safetensors").exists()

    loaded = PeftModel.from_pretrained(build(name), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all" / "bee", adapter_name="bee")
    with torch.no_grad():
        assert torch.equal(run(loaded, x), out_default)
        loaded.set_adapter("bee")
        assert torch.equal(run(loaded, x), out_bee)
        with loaded.disable_adapter():
            assert torch.equal(run(loaded, x), base)
        assert torch.equal(run(loaded, x), out_bee)
        loaded.delete_adapter("bee")  # the active one: peft activates the remaining adapter
        assert loaded.active_adapters == ["default"]
        assert torch.equal(run(loaded, x), out_default)
        selected = PeftModel.from_pretrained(build(name), tmp_path / "selected" / "bee", adapter_name="bee")
        assert torch.equal(run(selected, x), out_bee)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_trainability_after_from_pretrained_and_load_adapter_is_loras(is_trainable, tmp_path):
    name = "upernet_swin"
    got = {}
    for kind, config in (("med", med), ("lora", lora)):
        get_peft_model(build(name), config(name)).save_pretrained(tmp_path / kind)
        model = PeftModel.from_pretrained(build(name), tmp_path / kind, is_trainable=is_trainable)
        after_load = trainable_adapters(model), model.peft_config["default"].inference_mode
        model.load_adapter(tmp_path / kind, adapter_name="second", is_trainable=is_trainable)
        trained = get_peft_model(build(name), config(name))
        trained.load_adapter(tmp_path / kind, adapter_name="second", is_trainable=is_trainable)
        added = get_peft_model(build(name), config(name))
        added.add_adapter("frozen", config(name, inference_mode=True))
        got[kind] = (
            after_load,
            trainable_adapters(model),
            trainable_adapters(trained),
            trainable_adapters(added),
        )
    assert got["med"] == got["lora"]
    expected = {"default", "head:default"} if is_trainable else set()
    assert got["med"][0] == (expected, not is_trainable)


def test_inference_mode_in_the_config_freezes_the_adapter_until_set_adapter():
    model = get_peft_model(build("upernet_swin"), med("upernet_swin", inference_mode=True))
    assert model.get_nb_trainable_parameters()[0] == 0
    model.add_adapter("b", med("upernet_swin"))
    model.set_adapter("b")
    assert trainable_adapters(model) == {"b", "head:b"}


def test_adapter_layers_switch_off_and_on_and_report_their_status():
    model = get_peft_model(build("upernet_swin"), med("upernet_swin")).eval()
    model.add_adapter("b", med("upernet_swin"))
    x = slices(2, D)
    with torch.no_grad():
        base = run(build("upernet_swin"), x)
        enabled = run(model, x)
        model.base_model.disable_adapter_layers()
        assert torch.equal(run(model, x), base)
        model.base_model.enable_adapter_layers()
        assert torch.equal(run(model, x), enabled)
    status = model.get_model_status()
    layers = sum(isinstance(m, MedAdapterLayer) for m in model.modules())  # and the two heads' wrappers
    assert status.adapter_model_type == "MedAdapterModel" and status.num_adapter_layers == layers + 2 == 7
    assert status.available_adapters == ["b", "default"] and status.requires_grad == {
        "default": True,
        "b": False,
    }
    assert status.merged_adapters == [] and status.enabled is True


# --- state dicts and names -----------------------------------------------------------------------------


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_adapter_state_dict_round_trips_under_another_name(low_cpu_mem_usage):
    name = "upernet_swin"
    source = get_peft_model(build(name), med(name), adapter_name="kits")
    train_steps(source, seed=3)
    state = get_peft_model_state_dict(source, adapter_name="kits")
    assert any(k.endswith("norm.running_mean") for k in state)  # BatchNorm statistics travel with it
    assert not any(".kits." in k for k in state)
    target = get_peft_model(build(name), med(name), adapter_name="brats", low_cpu_mem_usage=low_cpu_mem_usage)
    result = set_peft_model_state_dict(
        target, state, adapter_name="brats", low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert not result.unexpected_keys and not [k for k in result.missing_keys if ".brats." in k]
    assert not any(t.device.type == "meta" for t in (*target.parameters(), *target.buffers()))
    x = slices(2, D)
    with torch.no_grad():
        assert torch.equal(run(target.eval(), x), run(source, x))


def test_whole_peft_model_state_dict_and_deepcopy_round_trip():
    name = "upernet_swin"
    model = train_steps(get_peft_model(build(name), med(name)), seed=3)
    model.add_adapter("b", med(name))
    model.set_adapter("b")
    train_steps(model, seed=4)
    x = slices(2, D)
    fresh = get_peft_model(build(name), med(name))
    fresh.add_adapter("b", med(name))
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.set_adapter("b")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for other in (fresh.eval(), clone):
            for adapter in ("b", "default"):
                model.set_adapter(adapter)
                other.set_adapter(adapter)
                assert torch.equal(run(other, x), run(model, x))


@pytest.mark.parametrize("name", ["swin", "vit"])
def test_unload_gives_the_exact_base_model_after_two_adapters_and_checkpointing(name):
    x = slices(2, D)
    with torch.no_grad():
        base = run(build(name), x)
    model = train_steps(get_peft_model(build(name), med(name)), seed=3)
    model.add_adapter("b", med(name))
    model.set_adapter("b")
    enable_activation_checkpointing(model)
    train_steps(model, seed=4)
    with torch.no_grad():
        adapted = run(model, x)
    copied = copy.deepcopy(model).unload()  # the copy's hooks go; the original keeps its own
    restored = model.unload()
    for plain in (copied, restored):
        assert not any(isinstance(m, MedAdapterLayer) for m in plain.modules())
        assert not plain._forward_pre_hooks and not plain._forward_hooks
        # transformers' own checkpoint functions are back (Med-Adapter wraps them to replay its context)
        assert not any(
            hasattr(m.__dict__.get("_gradient_checkpointing_func"), "context") for m in plain.modules()
        )
        with torch.no_grad():
            assert torch.equal(run(plain.eval(), x), base)
    assert not torch.equal(adapted, base)


# --- dtypes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_low_cpu_mem_usage_loading_gives_the_adapter_dtype_plain_loading_gives(base_dtype, tmp_path):
    # `low_cpu_mem_usage=True` assigns the file's tensors: adapters saved in bf16 (autocast_adapter_dtype=False)
    # stayed bf16, on a float32 model too, where plain loading (and LoRA either way) gives float32.
    source = get_peft_model(build("swin").to(torch.bfloat16), med("swin"), autocast_adapter_dtype=False)
    assert adapter_dtypes(source) == {torch.bfloat16}
    source.save_pretrained(tmp_path)
    x = slices(2, D).to(base_dtype)
    outputs = []
    for low_cpu_mem_usage in (False, True):
        model = PeftModel.from_pretrained(
            build("swin").to(base_dtype), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage
        )
        assert adapter_dtypes(model) == {torch.float32}
        second = model.load_adapter(tmp_path, adapter_name="second", low_cpu_mem_usage=low_cpu_mem_usage)
        assert not second.unexpected_keys
        assert {p.dtype for n, p in model.named_parameters() if ".second." in n} == {torch.float32}
        with torch.no_grad():
            outputs.append(run(model, x))
    assert torch.equal(outputs[0], outputs[1])


def test_low_cpu_mem_usage_keeps_a_bf16_model_in_bf16_when_asked(tmp_path):
    get_peft_model(build("swin"), med("swin")).save_pretrained(tmp_path)  # float32 file
    for low_cpu_mem_usage in (False, True):
        model = PeftModel.from_pretrained(
            build("swin").to(torch.bfloat16),
            tmp_path,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=False,
        )
        assert adapter_dtypes(model) == {torch.bfloat16}


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["swin", "swin_backbone", "upernet_swin"])
def test_a_vit_adapter_loaded_into_a_swin_names_the_other_backbone(target, tmp_path):
    # A ViT's block names (`layers.N`) match a Swin's stages: the error said the config targeted a module that
    # is not a block, instead of naming the backbone the adapter was trained on.
    get_peft_model(build("vit"), med("vit")).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"trained on a different backbone .*model_type: adapter 'vit'.*SwinStage"
    ):
        PeftModel.from_pretrained(build(target), tmp_path)
    model = get_peft_model(build(target), med(target)).eval()
    x = slices(2, D)
    with torch.no_grad():
        before = run(model, x)
        with pytest.raises(ValueError, match="trained on a different backbone"):
            model.load_adapter(tmp_path, adapter_name="vit_adapter")
        assert list(model.peft_config) == ["default"] and torch.equal(run(model, x), before)


def test_blocks_all_excluded_says_so():
    with pytest.raises(ValueError, match=r"matched no transformer block of SwinModel once exclude_modules="):
        get_peft_model(build("swin"), MedAdapterConfig(exclude_modules=r".*blocks.*"))


def test_merge_refusals_and_a_model_without_blocks():
    model = get_peft_model(build("swin"), med("swin"))
    for call in (model.merge_and_unload, model.merge_adapter, model.base_model.merge_and_unload):
        with pytest.raises(NotImplementedError, match="cannot be merged .*`unload\\(\\)`"):
            call()
    with pytest.raises(ValueError, match="found no supported transformer block in Sequential"):
        get_peft_model(nn.Sequential(nn.Conv2d(1, 1, 3)), MedAdapterConfig())
