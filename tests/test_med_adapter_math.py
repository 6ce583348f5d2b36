"""The fast adapter equals the paper's 3D formula, in outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from medtuning_peft.tuners.med_adapter import MedAdapter, resample_periodic
from medtuning_peft.tuners.med_adapter.reference import reference_forward

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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_form_equals_3d_reference_in_float64(case, training):
    c, (h, w), d, prev_c, spatial, prev_grid = CASES[case]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    adapter = MedAdapter(c, 6, (3, 5), True, d, prev_channels=prev_c, prev_spatial=spatial).double()
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
