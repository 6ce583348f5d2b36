"""Decoders: output shapes, the simple pyramid, registry errors."""

from __future__ import annotations

import pytest
import torch

from medtuning_peft.decoders import DECODERS, SimpleFeaturePyramid, build_decoder

# name -> options small enough for a CPU test
DECODER_SPECS = {
    "upernet": {"channels": 16, "pool_scales": (1, 2, 3, 6)},
    "fpn": {"channels": 16},
    "segformer": {"channels": 16, "dropout": 0.0},
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run faster on one thread, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (h_0, w_0) of the finest map, output (H, W): square, non-square, odd
SIZES = {"square": ((16, 16), (64, 64)), "wide": ((12, 20), (48, 80)), "odd": ((9, 13), (35, 51))}


def hierarchical_features(batch: int, hw: tuple[int, int], channels=(8, 16, 24, 32)) -> list[torch.Tensor]:
    h, w = hw
    maps = []
    for c in channels:
        maps.append(torch.randn(batch, c, h, w))
        h, w = -(-h // 2), -(-w // 2)
    return maps


def test_spec_table_covers_every_registered_decoder():
    assert set(DECODER_SPECS) == set(DECODERS)


@pytest.mark.parametrize("size", SIZES, ids=list(SIZES))
@pytest.mark.parametrize("name", DECODER_SPECS)
def test_hierarchical_output_shape(name, size):
    finest, out = SIZES[size]
    decoder = build_decoder(name, [8, 16, 24, 32], num_classes=3, **DECODER_SPECS[name])
    logits = decoder(hierarchical_features(6, finest), out)
    assert logits.shape == (6, 3, *out)


@pytest.mark.parametrize("size", SIZES, ids=list(SIZES))
@pytest.mark.parametrize("name", DECODER_SPECS)
def test_plain_backbone_output_shape_with_simple_pyramid(name, size):
    finest, out = SIZES[size]
    grid = (max(finest[0] // 4, 1), max(finest[1] // 4, 1))  # patch-16 grid of the slice
    decoder = build_decoder(name, [12] * 4, num_classes=2, simple_pyramid=True, **DECODER_SPECS[name])
    logits = decoder([torch.randn(4, 12, *grid) for _ in range(4)], out)
    assert logits.shape == (4, 2, *out)


def test_simple_pyramid_scales():
    pyramid = SimpleFeaturePyramid(8)
    maps = pyramid([torch.randn(2, 8, 5, 7) for _ in range(4)])
    assert [tuple(m.shape[-2:]) for m in maps] == [(20, 28), (10, 14), (5, 7), (3, 4)]
    assert pyramid([torch.randn(1, 8, 1, 1) for _ in range(4)])[3].shape[-2:] == (1, 1)


@pytest.mark.parametrize("name", DECODER_SPECS)
def test_decoder_keeps_slices_independent_in_eval_mode(name):
    decoder = build_decoder(name, [8, 16, 24, 32], num_classes=3, **DECODER_SPECS[name]).eval()
    features = hierarchical_features(4, (8, 12))
    changed = [f.clone() for f in features]
    for f in changed:
        f[2:] = torch.randn_like(f[2:])
    torch.testing.assert_close(decoder(features, (32, 48))[:2], decoder(changed, (32, 48))[:2])


@pytest.mark.parametrize("name", DECODER_SPECS)
def test_decoder_gradients_reach_every_parameter(name):
    decoder = build_decoder(name, [8, 16, 24, 32], num_classes=3, **DECODER_SPECS[name])
    decoder(hierarchical_features(4, (8, 12)), (32, 48)).sum().backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None]
    assert not missing


def _permuted_token_grids(batch: int, grid: tuple[int, int], channels: int) -> list[torch.Tensor]:
    """Maps as a plain backbone hands them over: (N, h, w, C) token grids viewed as (N, C, h, w)."""
    return [torch.randn(batch, *grid, channels).permute(0, 3, 1, 2) for _ in range(4)]


@pytest.mark.parametrize("plain", [False, True], ids=["nchw-maps", "token-grids"])
@pytest.mark.parametrize("name", DECODER_SPECS)
def test_channels_last_layout_computes_the_same_logits_and_gradients(name, plain):
    torch.manual_seed(0)
    if plain:
        decoder = build_decoder(name, [12] * 4, num_classes=3, simple_pyramid=True, **DECODER_SPECS[name])
        features = _permuted_token_grids(4, (3, 5), 12)
    else:
        decoder = build_decoder(name, [8, 16, 24, 32], num_classes=3, **DECODER_SPECS[name])
        features = hierarchical_features(4, (12, 20))
    assert decoder.channels_last  # the default
    results = {}
    for channels_last in (True, False):
        decoder.channels_last = channels_last
        decoder.zero_grad(set_to_none=True)
        logits = decoder(features, (48, 80))
        logits.square().mean().backward()
        results[channels_last] = (logits.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for n, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("coarsest", [(4, 4), (1, 1)], ids=["4x4", "1x1"])
@pytest.mark.parametrize("plain", [False, True], ids=["nchw-maps", "token-grids"])
def test_upernet_convolutions_over_the_fused_maps_run_channels_last(plain, coarsest):
    """The pooled branch (NCHW after pyramid pooling) must not pull the fused map back into NCHW."""
    if plain:
        decoder = build_decoder("upernet", [12] * 4, num_classes=3, simple_pyramid=True, channels=16)
        features = _permuted_token_grids(2, tuple(2 * c for c in coarsest), 12)
    else:
        decoder = build_decoder("upernet", [8, 16, 24, 32], num_classes=3, channels=16)
        features = hierarchical_features(2, tuple(8 * c for c in coarsest))
    seen = {}

    def record(name: str, x: torch.Tensor) -> None:  # a 1 x 1 map is in both layouts
        seen[name] = x.is_contiguous(memory_format=torch.channels_last) or x.shape[-2:] == (1, 1)

    for name, module in decoder.named_modules():
        # every convolution at the finest map's resolution or over a fused map (the pooled branch's own 3 x 3
        # convolution runs on the coarsest map in NCHW: small, and converted once after it)
        if isinstance(module, torch.nn.Conv2d) and (".fpn_" in name or name.endswith("classifier")):
            module.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0]))
    # Ahead of the decoder's own hook: the concatenation is already channels-last (no copy of the largest
    # map) unless the coarsest map is 1 x 1.
    decoder.head.fpn_bottleneck.register_forward_pre_hook(
        lambda m, args: record("concatenated", args[0]), prepend=True
    )
    decoder(features, (32, 32))
    assert "head.fpn_bottleneck.conv" in seen and "head.classifier" in seen
    if coarsest == (1, 1):
        del seen["concatenated"]
    assert all(seen.values()), {n: v for n, v in seen.items() if not v}


def test_channels_last_switch_is_per_decoder_copy():
    """peft deep-copies the decoder for modules_to_save: each copy's layout hooks read its own switch."""
    import copy

    decoder = build_decoder("upernet", [8, 16, 24, 32], num_classes=3, channels=16)
    clone = copy.deepcopy(decoder)
    clone.channels_last = False
    seen = []
    for d in (decoder, clone):
        d.head.fpn_bottleneck.conv.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)) and None
        )
        d(hierarchical_features(2, (16, 16)), (32, 32))
    assert seen == [True, False]


def test_unknown_decoder_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean 'upernet'"):
        build_decoder("uppernet", [8], 2)


def test_unknown_decoder_option_names_the_options():
    with pytest.raises(ValueError, match="pool_scales"):
        build_decoder("fpn", [8], 2, pool_scales=(1, 2))


def test_wrong_feature_channels_are_refused():
    decoder = build_decoder("fpn", [8, 16], 2, channels=8)
    with pytest.raises(ValueError, match="in_channels=\\[8, 16\\]"):
        decoder([torch.randn(1, 8, 4, 4), torch.randn(1, 12, 2, 2)], (16, 16))


@pytest.mark.parametrize(
    "in_channels, num_classes, kwargs",
    [([], 2, {}), ([8, 0], 2, {}), ([8], 0, {}), ([8, 16, 8, 8], 2, {"simple_pyramid": True})],
)
def test_invalid_construction_is_refused(in_channels, num_classes, kwargs):
    with pytest.raises(ValueError):
        build_decoder("upernet", in_channels, num_classes, **kwargs)


@pytest.mark.parametrize("channels", [0, -4])
@pytest.mark.parametrize("name", DECODER_SPECS)
def test_non_positive_decoder_width_is_refused_at_construction(name, channels):
    cls = DECODERS[name].__name__
    with pytest.raises(ValueError, match=rf"{cls}\.channels must be a positive int .* got {channels}"):
        build_decoder(name, [8, 16], 2, channels=channels)


def test_segmenter_with_a_zero_width_decoder_is_refused_when_built():
    from medtuning_peft.volumetric import build_segmenter

    with pytest.raises(ValueError, match=r"UperNetDecoder\.channels .* got 0"):
        build_segmenter("tiny-swin", in_channels=1, num_classes=2, decoder_kwargs={"channels": 0})
