"""The fast adapter equals the paper's 3D formula, in outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import DEVICES

from medtuning_peft.tuners.med_adapter import DepthwiseBranch, MedAdapter, SpectralFilter, resample_periodic
from medtuning_peft.tuners.med_adapter.reference import reference_form, reference_forward, set_reference_form

CASES = {
    # name: (C, grid, D, prev_channels, prev_spatial, prev grid)
    "plain_block": (24, (5, 7), 6, None, True, None),
    "first_stage_inter_zero_input": (24, (5, 7), 6, 2, True, None),
    "hierarchical_inter_odd_grid": (24, (5, 6), 6, 2, True, (9, 11)),
    "hierarchical_inter_same_grid": (24, (5, 6), 6, 4, True, (5, 6)),
    "plain_backbone_inter": (24, (4, 3), 5, 4, False, (4, 3)),
    "plain_backbone_first_inter": (24, (4, 3), 5, 4, False, None),
}


def _randomize_batchnorm(adapter: MedAdapter, gen: torch.Generator) -> None:
    for branch in adapter.branches:
        branch.norm.running_mean.normal_(generator=gen)
        branch.norm.running_var.uniform_(0.5, 2.0, generator=gen)
        branch.norm.weight.data.normal_(generator=gen)
    adapter.spectral.weight.data.normal_(generator=gen)
    adapter.spectral.bias.data.normal_(generator=gen)


@pytest.mark.parametrize("form", DepthwiseBranch.forms)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_form_equals_3d_reference_in_float64(case, training, form):
    c, (h, w), d, prev_c, spatial, prev_grid = CASES[case]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    adapter = MedAdapter(c, 6, (3, 5), True, d, prev_channels=prev_c, prev_spatial=spatial).double()
    for branch in adapter.branches:  # both forms of the depthwise convolutions (the compiled one: shifts)
        branch.form = form
    _randomize_batchnorm(adapter, gen)
    adapter.train(training)
    b = 2
    x = torch.randn(b * d, h * w, c, generator=gen, dtype=torch.float64, requires_grad=True)
    prev_ref = prev_fast = None
    if prev_grid is not None:
        prev_ref = torch.randn(b, prev_c, d, *prev_grid, generator=gen, dtype=torch.float64)
        prev_fast = prev_ref.permute(0, 2, 1, 3, 4).reshape(
            b * d, prev_c, *prev_grid
        )  # (B, r, D, ..) -> (B*D, r, ..)

    ref_state = {k: v.clone() for k, v in adapter.state_dict().items()}
    out_ref, a_ref = reference_forward(adapter, x, (h, w), d, prev_ref)
    grads_ref = torch.autograd.grad(
        out_ref.square().sum(), [x, *adapter.parameters()], materialize_grads=True
    )
    stats_ref = {k: v.clone() for k, v in adapter.state_dict().items()}

    adapter.load_state_dict(ref_state)
    out, a = adapter(x, (h, w), d, prev_fast)
    grads = torch.autograd.grad(out.square().sum(), [x, *adapter.parameters()], materialize_grads=True)

    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    for key, value in adapter.state_dict().items():  # BatchNorm running statistics too
        torch.testing.assert_close(value, stats_ref[key], rtol=1e-12, atol=1e-12)
    if prev_c is not None:
        # fast A is (B*D, r, h, w); the reference's is (B, r, D, h, w)
        torch.testing.assert_close(a, a_ref.permute(0, 2, 1, 3, 4).reshape(a.shape), rtol=1e-12, atol=1e-12)


def test_fast_form_matches_reference_in_float32():
    torch.manual_seed(0)
    adapter = MedAdapter(96, 6, (3, 5), True, 16, prev_channels=8, prev_spatial=True).eval()
    x = torch.randn(2 * 16, 8 * 8, 96)
    out, _ = adapter(x, (8, 8), 16)
    out_ref, _ = reference_forward(adapter, x, (8, 8), 16)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


def _compiled_graph_ops(adapter: MedAdapter, x: torch.Tensor, d: int) -> set[str]:
    """The operators torch.compile traces in the adapter's forward (a backend that records its FX graph)."""
    ops: set[str] = set()

    def recording(gm: torch.fx.GraphModule, example_inputs):
        ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(adapter, backend=recording, dynamic=False)(x, (4, 3), d)
    finally:
        torch._dynamo.reset()
    return ops


@pytest.mark.parametrize("compiled_form", DepthwiseBranch.forms)
def test_torch_compile_traces_the_depthwise_form_chosen_for_it(compiled_form, monkeypatch):
    monkeypatch.setattr(DepthwiseBranch, "compiled_form", {"cpu": compiled_form})
    adapter = MedAdapter(24, 6, (3, 5), True, 5)
    ops = _compiled_graph_ops(adapter, torch.randn(2 * 5, 12, 24), 5)
    convolutions = {op for op in ops if "conv" in op}
    assert bool(convolutions) == (compiled_form == "convolution"), convolutions
    for branch in adapter.branches:  # an explicit form holds under torch.compile too
        branch.form = "convolution"
    assert any("conv" in op for op in _compiled_graph_ops(adapter, torch.randn(2 * 5, 12, 24), 5))


def test_compiled_shifted_sums_train_like_the_eager_convolutions(monkeypatch):
    monkeypatch.setattr(DepthwiseBranch, "compiled_form", {"cpu": "shifts"})  # CUDA's choice, here on CPU
    torch.manual_seed(0)
    eager = MedAdapter(24, 6, (3, 5), True, 5, prev_channels=4, prev_spatial=False).train()
    compiled = copy.deepcopy(eager)
    x = torch.randn(2 * 5, 12, 24)
    prev = torch.randn(2 * 5, 4, 4, 3)
    results = []
    for adapter, run in (
        (eager, eager),
        (compiled, torch.compile(compiled, backend="aot_eager", dynamic=False)),
    ):
        xi = x.clone().requires_grad_()
        out, a = run(xi, (4, 3), 5, prev)
        grads = torch.autograd.grad((out.square().mean() + a.mean()), [xi, *adapter.parameters()])
        results.append((out, a, grads, [b.norm.running_var.clone() for b in adapter.branches]))
    torch._dynamo.reset()
    (out_e, a_e, grads_e, stats_e), (out_c, a_c, grads_c, stats_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_c, a_e, rtol=1e-5, atol=1e-6)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)
    for s_c, s_e in zip(stats_c, stats_e, strict=True):
        torch.testing.assert_close(s_c, s_e, rtol=1e-5, atol=1e-6)


def test_an_unknown_depthwise_form_is_refused():
    adapter = MedAdapter(24, 6, (3,), False, 5)
    adapter.branches[0].form = "fft"
    with pytest.raises(
        ValueError, match="DepthwiseBranch form 'fft': use one of \\('convolution', 'shifts'\\)"
    ):
        adapter(torch.randn(5, 12, 24), (4, 3), 5)


def test_resampling_is_the_identity_at_the_configured_slice_count():
    values = torch.randn(128)
    assert resample_periodic(values, 128) is values


def test_resampling_reads_the_periodic_frequency_axis():
    values = torch.arange(8, dtype=torch.float64)
    # Halving the bin count keeps every other bin exactly.
    torch.testing.assert_close(resample_periodic(values, 4), values[::2])
    # Doubling interpolates midway, and the last new bin wraps around between bin 7 and bin 0.
    doubled = resample_periodic(values, 16)
    torch.testing.assert_close(doubled[1], torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(doubled[15], torch.tensor(3.5, dtype=torch.float64))


def test_spectral_filter_of_ones_with_zero_bias_is_the_absolute_value():
    adapter = MedAdapter(12, 6, (3,), True, 5)
    adapter.spectral.bias.data.zero_()
    v = torch.randn(10, 2, 3, 4)
    torch.testing.assert_close(adapter.spectral(v, 5), v.abs(), rtol=1e-6, atol=1e-6)


def test_init_identity_starts_as_the_identity():
    adapter = MedAdapter(24, 6, (3, 5), True, 4, init_identity=True)
    x = torch.randn(8, 12, 24)
    out, _ = adapter(x, (3, 4), 4)
    torch.testing.assert_close(out, x)


def test_a_bottleneck_of_zero_width_is_refused():
    with pytest.raises(ValueError, match="reduction_ratio=16 leaves no bottleneck"):
        MedAdapter(8, 16, (3,), True, 4)


# --- the spectral branch: circulant matrix product == 1D FFT ------------------------------------------


def _spectral_outputs_and_grads(use_matmul: bool, num_bins: int, d: int, dtype: torch.dtype, zero_at=None):
    gen = torch.Generator().manual_seed(3)
    spectral = SpectralFilter(num_bins).to(dtype)
    spectral.weight.data.normal_(generator=gen)
    spectral.bias.data.normal_(generator=gen)
    spectral.use_matmul = use_matmul
    v = torch.randn(2 * d, 4, 3, 5, generator=gen, dtype=dtype)  # (B*D, r, h, w), B = 2
    if zero_at is not None:
        v[:, :, zero_at[0], zero_at[1]] = 0.0  # every slice and channel: |filtered| = 0 there
    v = v.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = spectral(v, d)
    grads = torch.autograd.grad(out.square().sum(), [v, spectral.weight, spectral.bias])
    return out, grads


@pytest.mark.parametrize("num_bins, d", [(6, 6), (8, 6), (5, 7)], ids=["configured", "fewer", "more"])
def test_circulant_matmul_spectral_form_equals_the_fft_form_in_float64(num_bins, d):
    out_mm, grads_mm = _spectral_outputs_and_grads(True, num_bins, d, torch.float64)
    out_fft, grads_fft = _spectral_outputs_and_grads(False, num_bins, d, torch.float64)
    torch.testing.assert_close(out_mm, out_fft, rtol=1e-12, atol=1e-12)
    for g_mm, g_fft in zip(grads_mm, grads_fft):
        torch.testing.assert_close(g_mm, g_fft, rtol=1e-10, atol=1e-10)


def test_circulant_matmul_spectral_form_matches_the_fft_form_in_float32():
    out_mm, grads_mm = _spectral_outputs_and_grads(True, 32, 32, torch.float32)
    out_fft, grads_fft = _spectral_outputs_and_grads(False, 32, 32, torch.float32)
    torch.testing.assert_close(out_mm, out_fft, rtol=1e-5, atol=1e-5)
    for g_mm, g_fft in zip(grads_mm, grads_fft):
        torch.testing.assert_close(g_mm, g_fft, rtol=1e-4, atol=1e-4)


def test_spectral_gradient_is_zero_where_the_filtered_signal_vanishes():
    # Token (1, 2) is zero in every slice: its filtered magnitude is exactly 0, where torch.abs of a complex
    # tensor has gradient 0. The matrix-product form must give 0 there too, not NaN.
    (out, (grad_v, *_)), (_, (grad_v_fft, *_)) = (
        _spectral_outputs_and_grads(use_matmul, 6, 6, torch.float64, zero_at=(1, 2))
        for use_matmul in (True, False)
    )
    assert torch.all(out[:, :, 1, 2] == 0)
    assert torch.isfinite(grad_v).all()
    torch.testing.assert_close(grad_v, grad_v_fft, rtol=1e-10, atol=1e-10)


def test_matmul_spectral_form_is_chosen_by_device_and_slice_count():
    spectral = SpectralFilter(8)
    cpu = torch.device("cpu")
    assert spectral.uses_matmul(SpectralFilter.matmul_max_slices["cpu"], cpu)
    assert not spectral.uses_matmul(SpectralFilter.matmul_max_slices["cpu"] + 1, cpu)
    spectral.use_matmul = False
    assert not spectral.uses_matmul(8, cpu)


# --- fast form vs reference in float32 and bf16 --------------------------------------------------------


def _adapter_and_input(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    adapter = MedAdapter(96, 6, (3, 5), True, 16, prev_channels=8, prev_spatial=True)
    _randomize_batchnorm(adapter, gen)
    x = torch.randn(2 * 16, 8 * 8, 96, generator=gen)
    prev = torch.randn(2 * 16, 8, 16, 16, generator=gen)  # (B*D, r_prev, 2h, 2w)
    return adapter, x, prev


def _run(adapter: MedAdapter, x: torch.Tensor, prev: torch.Tensor, reference: bool, autocast: bool):
    """Output, A and gradients (input first, then every parameter) on the adapter's device, returned on the CPU."""
    adapter.use_reference_form = reference
    device = adapter.down.weight.device
    x = x.to(device).requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out, a = adapter(x, (8, 8), 16, prev.to(device))
    grads = torch.autograd.grad(
        out.float().square().mean(), [x, *adapter.parameters()], materialize_grads=True
    )
    return out.float().cpu(), a.float().cpu(), [g.cpu() for g in grads]


# The comparisons below also run on a GPU, where the spectral branch takes its matrix-product form and the
# depthwise convolutions run in cuDNN (`python -m pytest -m gpu` on a machine with CUDA).


@pytest.fixture
def exact_float32():
    """No TF32 for the float32 comparison on CUDA (the function's exactness, not TF32's 10-bit products)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_form_matches_reference_in_float32_outputs_and_gradients(training, device, exact_float32):
    adapter, x, prev = _adapter_and_input()
    adapter.to(device).train(training)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    out_ref, a_ref, grads_ref = _run(adapter, x, prev, reference=True, autocast=False)
    adapter.load_state_dict(state)
    out, a, grads = _run(adapter, x, prev, reference=False, autocast=False)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-5)
    for (name, _), g, g_ref in zip(adapter.named_parameters(), grads[1:], grads_ref[1:]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_form_under_bf16_autocast_is_as_accurate_as_the_reference(device):
    # bf16 keeps 8 bits of mantissa, so both forms are compared with the exact function (the reference in
    # float64 on the CPU): the fast form runs its bottleneck in float32 under autocast and must be at least as
    # accurate as the reference form under the same autocast, for outputs and for every gradient.
    adapter, x, prev = _adapter_and_input()
    exact = copy.deepcopy(adapter).double()
    adapter.to(device)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    out64, a64, grads64 = _run(exact, x.double(), prev.double(), reference=True, autocast=False)
    out_ref, a_ref, grads_ref = _run(adapter, x, prev, reference=True, autocast=True)
    adapter.load_state_dict(state)
    out, a, grads = _run(adapter, x, prev, reference=False, autocast=True)

    def error(t, t64):
        return ((t.double() - t64).norm() / t64.norm()).item()

    torch.testing.assert_close(out, out64, rtol=2e-2, atol=2e-2)
    assert error(out, out64) <= 1.5 * error(out_ref, out64) + 1e-4
    assert error(a, a64) <= 1.5 * error(a_ref, a64) + 1e-4
    largest = max(g.norm() for g in grads64)
    checked = 0
    for (name, _), g, g_ref, g64 in zip(adapter.named_parameters(), grads[1:], grads_ref[1:], grads64[1:]):
        if g64.norm() < 1e-9 * largest:
            # Exactly 0: biases just before a training-mode BatchNorm, and P's weight on the first inter-stage
            # block (it convolves zeros). Both forms return rounding noise there.
            assert name.endswith(("across.bias", "project_prev.weight")), name
            continue
        cosine = torch.nn.functional.cosine_similarity(g.double().flatten(), g64.double().flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)
        assert error(g, g64) <= max(1.5 * error(g_ref, g64), 2e-2), name
        checked += 1
    assert checked >= 15
    assert error(grads[0], grads64[0]) <= 1.5 * error(grads_ref[0], grads64[0]) + 1e-4


# --- the reference-form switch -------------------------------------------------------------------------


def test_reference_form_switch_runs_the_reference_and_restores_the_fast_form():
    from peft import get_peft_model
    from tiny_models import build, slices

    from medtuning_peft import MedAdapterConfig

    model = get_peft_model(build("swin"), MedAdapterConfig(num_slices=4)).eval()
    adapters = [m for m in model.modules() if isinstance(m, MedAdapter)]
    x = slices(2, 4)
    with torch.no_grad():
        fast = model(pixel_values=x).last_hidden_state
        with reference_form(model) as count:
            assert count == len(adapters) > 0
            assert all(a.use_reference_form for a in adapters)
            ref = model(pixel_values=x).last_hidden_state
        assert not any(a.use_reference_form for a in adapters)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert set_reference_form(model, True) == len(adapters)
    with pytest.raises(ValueError, match="reference form only runs at the configured slice count"):
        model(pixel_values=slices(1, 5), num_slices=5)


@pytest.mark.parametrize("use_matmul", [True, False], ids=["matmul", "fft"])
def test_meta_device_forward_gives_the_shapes(use_matmul):
    # Shape inference without memory (e.g. models built under accelerate's init_empty_weights).
    adapter = MedAdapter(24, 6, (3, 5), True, 3, prev_channels=4, prev_spatial=True).to("meta")
    adapter.spectral.use_matmul = use_matmul
    x = torch.empty(2 * 3, 4 * 4, 24, device="meta")
    prev = torch.empty(2 * 3, 4, 8, 8, device="meta")
    out, a = adapter(x, (4, 4), 3, prev)
    assert out.device.type == "meta" and out.shape == x.shape and a.shape == (6, 4, 4, 4)
