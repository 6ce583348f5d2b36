"""Metrics, challenge conventions and sliding-window inference of medtuning_peft.evaluation.

Expected values are counted by hand on tiny volumes; MONAI is only the reference where our conventions and
its own definitions coincide (both masks non-empty).
"""

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from medtuning_peft.evaluation import (
    BRATS,
    ONE_EMPTY_HD95_MM,
    REFERENCE_OVERLAP,
    dice,
    evaluate_case,
    get_challenge,
    hd95,
    postprocess_brats_et,
    probabilities_to_labels,
    sliding_window_predict,
    summarize,
)

MSD_BRAIN_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


def _volume(shape=(4, 4, 4), **voxels):
    """Zero label map with `value` written at each listed (d, h, w) voxel: _volume(v1=[...], v2=[...])."""
    out = np.zeros(shape, dtype=np.int64)
    for key, coords in voxels.items():
        for coord in coords:
            out[coord] = int(key[1:])
    return out


# ----------------------------------------------------------------------------------------- primitives


def test_dice_of_known_overlap_is_twice_intersection_over_sum():
    pred = np.zeros((3, 3, 3), dtype=bool)
    gt = np.zeros((3, 3, 3), dtype=bool)
    pred[0, 0, :] = True  # 3 voxels
    pred[1, 0, 0] = True  # 4 voxels in all
    gt[0, 0, :] = True
    gt[0, 1, :] = True  # 6 voxels, 3 shared with pred
    assert dice(pred, gt) == pytest.approx(2 * 3 / (4 + 6))
    assert dice(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8)) == pytest.approx(0.6)


def test_dice_both_empty_gives_empty_value_and_one_empty_gives_zero():
    empty = np.zeros((2, 3, 4), dtype=bool)
    full = np.ones((2, 3, 4), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, empty, empty_value=0.25) == 0.25
    assert dice(full, empty) == 0.0
    assert dice(empty, full) == 0.0


def test_dice_refuses_label_maps_and_shape_mismatch():
    with pytest.raises(ValueError, match=r"pred_mask must be a binary mask.*\[2\]"):
        dice(np.array([[0, 2], [1, 0]]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"pred_mask \(2, 2\) and gt_mask \(2, 3\)"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(TypeError, match="pred_mask must be a numpy array or torch tensor; got list"):
        dice([[0, 1]], np.zeros((1, 2)))


def test_hd95_of_two_voxels_is_their_distance_in_mm_with_anisotropic_spacing():
    pred = _volume(v1=[(0, 0, 0)]) == 1
    gt = _volume(v1=[(2, 0, 0)]) == 1
    assert hd95(pred, gt, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(pred, gt, spacing=(1.0, 3.0, 3.0)) == pytest.approx(2.0)
    gt_diagonal = _volume(v1=[(1, 1, 0)]) == 1
    assert hd95(pred, gt_diagonal, spacing=(3.0, 0.5, 2.0)) == pytest.approx(math.sqrt(3.0**2 + 0.5**2))


def test_hd95_of_parallel_planes_is_offset_times_slice_spacing():
    pred = np.zeros((8, 5, 5), dtype=bool)
    gt = np.zeros((8, 5, 5), dtype=bool)
    pred[1] = True
    gt[4] = True  # 3 slices apart
    assert hd95(pred, gt, spacing=(3.0, 0.7, 0.7)) == pytest.approx(9.0)
    assert hd95(torch.from_numpy(gt), torch.from_numpy(pred), spacing=[3.0, 0.7, 0.7]) == pytest.approx(9.0)


def test_hd95_both_empty_is_zero_and_one_empty_is_373_13():
    empty = np.zeros((4, 4, 4), dtype=bool)
    one = _volume(v1=[(1, 1, 1)]) == 1
    spacing = (1.0, 1.0, 1.0)
    assert hd95(empty, empty, spacing) == 0.0
    assert hd95(one, empty, spacing) == pytest.approx(373.13)
    assert hd95(empty, one, spacing) == pytest.approx(373.13)
    assert math.isclose(ONE_EMPTY_HD95_MM, math.sqrt(240**2 + 240**2 + 155**2), abs_tol=5e-3)
    assert hd95(empty, one, spacing, one_empty=100.0) == 100.0


def _column_and_its_end(shape=(6, 3, 3)):
    """gt: a column of 5 voxels along D; pred: the first of them. Every voxel is an edge voxel."""
    gt = np.zeros(shape, dtype=bool)
    gt[0:5, 1, 1] = True
    pred = np.zeros(shape, dtype=bool)
    pred[0, 1, 1] = True
    return pred, gt


@pytest.mark.parametrize(
    "spacing, expected_max, expected_union",
    [
        # 2 mm slices: distances pred -> gt {0}, gt -> pred {0, 2, 4, 6, 8} mm.
        # max: 95th percentile of {0, 2, 4, 6, 8} = 6 + 0.8 * 2; union: of {0, 0, 2, 4, 6, 8} = 6 + 0.75 * 2.
        ((2.0, 0.5, 0.5), 7.6, 7.5),
        # 0.5 mm slices: the same voxel distances scaled by 0.5 / 2.
        ((0.5, 2.0, 2.0), 1.9, 1.875),
    ],
)
def test_hd95_pooling_max_takes_directions_apart_and_union_pools_them(spacing, expected_max, expected_union):
    pred, gt = _column_and_its_end()
    assert hd95(pred, gt, spacing) == pytest.approx(expected_max, rel=1e-6)
    assert hd95(pred, gt, spacing, pooling="max") == pytest.approx(expected_max, rel=1e-6)
    assert hd95(pred, gt, spacing, pooling="union") == pytest.approx(expected_union, rel=1e-6)
    assert hd95(gt, pred, spacing, pooling="union") == pytest.approx(expected_union, rel=1e-6)  # symmetric


def test_hd95_refuses_an_unknown_pooling_suggesting_the_closest():
    pred, gt = _column_and_its_end()
    with pytest.raises(ValueError, match=r"pooling='unoin' is not an HD95 pooling.*Did you mean 'union'"):
        hd95(pred, gt, (1.0, 1.0, 1.0), pooling="unoin")


@pytest.mark.parametrize(
    "task, label, expected",
    [("brats", 4, 7.5), ("kits19", 2, 7.6), ("msd", 1, 7.6)],
)
def test_brats_hd95_pools_both_directions_as_the_brats_evaluation_and_other_tasks_use_monai(
    task, label, expected
):
    # BraTS: medpy's definition (pooled directions), as nnU-Net's BraTS evaluation; KiTS19 and MSD follow MONAI.
    pred, gt = _column_and_its_end()
    labels = MSD_BRAIN_LABELS if task == "msd" else None
    scores = evaluate_case(task, pred * label, gt * label, spacing=(2.0, 0.5, 0.5), labels=labels)
    region = {"brats": "et", "kits19": "tumor", "msd": "edema"}[task]
    assert scores[f"hd95_{region}"] == pytest.approx(expected, rel=1e-6)
    assert get_challenge(task, labels).hd95_pooling == ("union" if task == "brats" else "max")


HIPPOCAMPUS_LABELS = Path("/work/shared/data/msd_hippocampus/labelsTr")


def _medpy_style_hd95(pred, gt, spacing, pooling):
    """HD95 written out with scipy as medpy computes it: face-connected erosion, the border is background."""
    structure = generate_binary_structure(pred.ndim, 1)
    edges_pred = pred ^ binary_erosion(pred, structure, border_value=0)
    edges_gt = gt ^ binary_erosion(gt, structure, border_value=0)
    pred_to_gt = distance_transform_edt(~edges_gt, sampling=spacing)[edges_pred]
    gt_to_pred = distance_transform_edt(~edges_pred, sampling=spacing)[edges_gt]
    if pooling == "union":
        return np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95)
    return max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95))


@pytest.mark.skipif(not HIPPOCAMPUS_LABELS.is_dir(), reason="needs the MSD hippocampus sample")
@pytest.mark.parametrize("pooling", ["max", "union"])
def test_hd95_matches_the_surface_distance_definition_on_real_labels_with_anisotropic_spacing(pooling):
    label = np.asarray(nib.load(sorted(HIPPOCAMPUS_LABELS.glob("*.nii.gz"))[0]).dataobj)
    gt = label == 1
    pred = np.roll(label, 2, axis=0) >= 1  # anterior + posterior, moved by 2 slices
    spacing = (1.0, 2.5, 0.7)
    expected = _medpy_style_hd95(pred, gt, spacing, pooling)
    assert hd95(pred, gt, spacing, pooling=pooling) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "spacing, message",
    [
        ((1.0, 1.0), r"one value per axis of the label map \(3\); got 2"),
        (1.0, "must be a sequence of 3 voxel sizes"),
        ((1.0, 0.0, 1.0), "positive finite"),
    ],
)
def test_hd95_refuses_spacing_that_does_not_match_the_axes(spacing, message):
    mask = _volume(v1=[(1, 1, 1)]) == 1
    with pytest.raises(ValueError, match=message):
        hd95(mask, mask, spacing)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy")  # raised inside MONAI 1.5+ itself
def test_metrics_agree_with_monai_when_both_masks_are_non_empty():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(12, 10, 9, generator=generator) > 0.6
    gt = torch.rand(12, 10, 9, generator=generator) > 0.5
    spacing = (2.5, 0.8, 1.3)
    expected_dice = compute_dice(pred[None, None].float(), gt[None, None].float(), include_background=True)
    expected_hd95 = compute_hausdorff_distance(
        pred[None, None], gt[None, None], include_background=True, percentile=95, spacing=list(spacing)
    )
    assert dice(pred, gt) == pytest.approx(float(expected_dice), rel=1e-6)
    assert hd95(pred, gt, spacing) == pytest.approx(float(expected_hd95), rel=1e-6)


# ----------------------------------------------------------------------------------------- challenges


def test_kits_kidney_dice_counts_tumor_as_kidney():
    # gt: A kidney, B tumor; pred swaps them. Foreground agrees everywhere, tumor nowhere.
    a, b = (0, 0, 0), (0, 0, 3)
    gt = _volume(v1=[a], v2=[b])
    pred = _volume(v1=[b], v2=[a])
    scores = evaluate_case("kits19", pred, gt, spacing=(1.0, 1.0, 2.0))
    assert scores["dice_kidney"] == 1.0
    assert scores["dice_tumor"] == 0.0
    assert scores["dice_mean"] == 0.5
    assert scores["hd95_kidney"] == pytest.approx(0.0)
    assert scores["hd95_tumor"] == pytest.approx(6.0)  # 3 voxels along W at 2 mm
    assert scores["hd95_mean"] == pytest.approx(3.0)


def test_kits_composite_is_mean_of_kidney_and_tumor_dice():
    gt = _volume(v1=[(0, 0, 0), (0, 0, 1)], v2=[(0, 0, 2), (0, 0, 3)])
    pred = _volume(v1=[(0, 0, 0), (0, 0, 1), (0, 0, 2)], v2=[(0, 0, 3)])
    scores = evaluate_case("kits19", pred, gt, spacing=(1.0, 1.0, 1.0), with_hd95=False)
    assert scores == pytest.approx({"dice_kidney": 1.0, "dice_tumor": 2 / 3, "dice_mean": (1.0 + 2 / 3) / 2})


def test_kits_case_without_tumor_in_pred_or_gt_scores_tumor_as_perfect():
    gt = _volume(v1=[(1, 1, 1)])
    scores = evaluate_case("kits19", gt.copy(), gt, spacing=(1.0, 1.0, 1.0))
    assert scores["dice_tumor"] == 1.0
    assert scores["hd95_tumor"] == 0.0


@pytest.mark.parametrize(
    "label, in_regions",
    [(1, {"tc", "wt"}), (2, {"wt"}), (4, {"et", "tc", "wt"})],
)
def test_brats_regions_contain_the_right_labels(label, in_regions):
    # gt holds only `label`, pred is empty: regions containing the label are one-empty, the others both-empty.
    gt = _volume(**{f"v{label}": [(1, 1, 1), (1, 2, 1)]})
    scores = evaluate_case("brats", np.zeros_like(gt), gt, spacing=(1.0, 1.0, 1.0))
    for region in ("et", "tc", "wt"):
        expected = (0.0, ONE_EMPTY_HD95_MM) if region in in_regions else (1.0, 0.0)
        assert (scores[f"dice_{region}"], scores[f"hd95_{region}"]) == expected, region


def test_brats_ncr_predicted_as_et_is_right_for_tc_and_wt_only():
    gt = _volume(v1=[(1, 1, 1)])
    pred = _volume(v4=[(1, 1, 1)])
    scores = evaluate_case("brats", torch.from_numpy(pred), torch.from_numpy(gt), spacing=(1.0, 1.0, 1.0))
    assert (scores["dice_et"], scores["dice_tc"], scores["dice_wt"]) == (0.0, 1.0, 1.0)
    assert scores["hd95_et"] == ONE_EMPTY_HD95_MM
    assert list(scores) == [
        "dice_et",
        "dice_tc",
        "dice_wt",
        "dice_mean",
        "hd95_et",
        "hd95_tc",
        "hd95_wt",
        "hd95_mean",
    ]


@pytest.mark.parametrize(
    "task, bad_value, message",
    [
        ("brats", 3, r"gt holds label values \[3\] outside the 'brats' label set \[0, 1, 2, 4\].*map 3 -> 4"),
        ("kits19", 4, r"gt holds label values \[4\] outside the 'kits19' label set \[0, 1, 2\]"),
    ],
)
def test_label_values_outside_the_task_set_are_refused(task, bad_value, message):
    gt = _volume(**{f"v{bad_value}": [(0, 0, 0)]})
    with pytest.raises(ValueError, match=message):
        evaluate_case(task, np.zeros_like(gt), gt, spacing=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.float32, bool, ">i2", ">u2", ">f4"])
def test_label_maps_of_any_numeric_dtype_score_as_uint8(dtype):
    # NIfTI label maps are often stored as uint16; a bool map is a binary label map (0 and label 1); nibabel
    # returns the data of a big-endian file as big-endian arrays (">i2").
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:5, 2:5, 2:5] = 1
    pred = np.zeros_like(gt)
    pred[3:6, 2:5, 2:5] = 1
    expected = evaluate_case("brats", pred, gt, (1.0, 1.0, 1.0))
    assert evaluate_case("brats", pred.astype(dtype), gt.astype(dtype), (1.0, 1.0, 1.0)) == expected
    if dtype is not bool:
        et = gt.astype(dtype) * 4
        assert np.array_equal(postprocess_brats_et(et, min_voxels=100), gt.astype(dtype))


def test_msd_scores_every_foreground_class_and_their_mean():
    gt = _volume(v1=[(0, 0, 0), (0, 0, 1)], v2=[(2, 2, 2)])
    pred = _volume(v1=[(0, 0, 0)], v3=[(2, 2, 2)])
    scores = evaluate_case("msd", pred, gt, spacing=(2.0, 1.0, 1.0), labels=MSD_BRAIN_LABELS)
    assert scores == pytest.approx(
        {
            "dice_edema": 2 / 3,
            "dice_non_enhancing_tumor": 0.0,  # gt only
            "dice_enhancing_tumour": 0.0,  # pred only
            "dice_mean": 2 / 9,
            "hd95_edema": 0.95,  # directed 95th percentiles: pred->gt {0}, gt->pred {0, 1} -> 0.95
            "hd95_non_enhancing_tumor": ONE_EMPTY_HD95_MM,
            "hd95_enhancing_tumour": ONE_EMPTY_HD95_MM,
            "hd95_mean": (0.95 + 2 * ONE_EMPTY_HD95_MM) / 3,
        }
    )


def test_msd_accepts_int_keys_and_refuses_inverted_labels():
    assert get_challenge("msd", {0: "background", 1: "liver", 2: "cancer"}).regions == {
        "liver": (1,),
        "cancer": (2,),
    }
    with pytest.raises(ValueError, match="labels key 'background' is not an integer"):
        get_challenge("msd", {"background": 0, "liver": 1})


def test_labels_are_required_for_msd_and_refused_elsewhere():
    volume = _volume(v1=[(0, 0, 0)])
    with pytest.raises(ValueError, match="task 'msd' needs labels"):
        evaluate_case("msd", volume, volume, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="labels is only read by task 'msd'"):
        evaluate_case("kits19", volume, volume, spacing=(1.0, 1.0, 1.0), labels=MSD_BRAIN_LABELS)


@pytest.mark.parametrize("typo, suggestion", [("kits", "kits19"), ("brast", "brats"), ("msd2", "msd")])
def test_unknown_task_lists_valid_names_and_suggests_the_closest(typo, suggestion):
    volume = _volume(v1=[(0, 0, 0)])
    with pytest.raises(
        ValueError, match=rf"valid names are \['brats', 'kits19', 'msd'\]\. Did you mean '{suggestion}'"
    ):
        evaluate_case(typo, volume, volume, spacing=(1.0, 1.0, 1.0))


def test_task_names_ignore_case_and_surrounding_spaces():
    assert get_challenge(" MSD ", MSD_BRAIN_LABELS).name == "msd"
    assert get_challenge("KiTS19") is get_challenge("kits19")


def test_pred_gt_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"pred \(4, 4, 4\) and gt \(4, 4, 5\)"):
        evaluate_case("brats", np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"one case's spatial map .* got shape \(1, 4, 4, 4\)"):
        evaluate_case("brats", np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 4)), spacing=(1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------- post-processing


@pytest.mark.parametrize("et_voxels, relabelled", [(499, True), (500, False)])
def test_postprocess_brats_et_relabels_et_below_min_voxels(et_voxels, relabelled):
    pred = np.zeros((10, 10, 10), dtype=np.uint8)
    pred.reshape(-1)[:et_voxels] = 4
    pred[9, 9, 9] = 2
    out = postprocess_brats_et(pred)
    expected = np.where(pred == 4, 1, pred) if relabelled else pred
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8
    assert (pred == 4).sum() == et_voxels  # input untouched


def test_postprocess_brats_et_keeps_tensor_type_and_respects_threshold():
    pred = torch.tensor([[[4, 4, 1, 2]]])
    torch.testing.assert_close(postprocess_brats_et(pred, min_voxels=3), torch.tensor([[[1, 1, 1, 2]]]))
    torch.testing.assert_close(postprocess_brats_et(pred, min_voxels=2), pred)
    torch.testing.assert_close(postprocess_brats_et(pred, min_voxels=0), pred)
    with pytest.raises(ValueError, match="min_voxels must be >= 0"):
        postprocess_brats_et(pred, min_voxels=-1)


def test_postprocess_brats_et_counts_the_voxels_of_the_grid_it_is_given():
    # A prediction on a 2 mm grid of a 1 mm image: 64 ET voxels there are 512 of the image's.
    resampled = np.zeros((8, 8, 8), np.uint8)
    resampled[:4, :4, :4] = 4
    original = resampled.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(postprocess_brats_et(resampled, 500, counted_on=original), resampled)
    assert set(np.unique(postprocess_brats_et(resampled, 500))) == {0, 1}


# ----------------------------------------------------------------------------------------- summary


def test_summarize_gives_mean_std_median_per_metric():
    cases = [
        {"dice_et": 1.0, "hd95_et": 0.0},
        {"dice_et": 2.0, "hd95_et": 4.0},
        {"dice_et": 6.0, "hd95_et": 2.0},
    ]
    summary = summarize(cases)
    assert list(summary) == ["dice_et", "hd95_et"]
    assert summary["dice_et"] == pytest.approx({"mean": 3.0, "std": math.sqrt(14 / 3), "median": 2.0})
    assert summary["hd95_et"] == pytest.approx({"mean": 2.0, "std": math.sqrt(8 / 3), "median": 2.0})


def test_summarize_refuses_nan_empty_input_and_mismatched_keys():
    with pytest.raises(ValueError, match=r"per_case\[1\]\['dice_et'\] is nan"):
        summarize([{"dice_et": 1.0}, {"dice_et": float("nan")}])
    with pytest.raises(ValueError, match="per_case is empty"):
        summarize([])
    with pytest.raises(ValueError, match=r"per_case\[1\] has different metrics .* missing \['hd95_et'\]"):
        summarize([{"dice_et": 1.0, "hd95_et": 0.0}, {"dice_et": 1.0}])


# ----------------------------------------------------------------------------------------- inference


def _conv_model(in_channels=2, num_classes=3, kernel_size=3, symmetric=False, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Conv3d(in_channels, num_classes, kernel_size, padding=kernel_size // 2)
    if symmetric:  # average the kernel over its 8 flips: the conv becomes flip-equivariant
        with torch.no_grad():
            weight = model.weight.clone()
            model.weight.copy_(torch.stack([weight.flip(dims) for dims in _flip_dims()]).mean(dim=0))
    return model


def _flip_dims():
    return [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]


def _whole_volume_softmax(model, volume):
    with torch.no_grad():
        return torch.softmax(model(volume), dim=1)


def test_single_window_equals_whole_volume_softmax():
    model = _conv_model()
    volume = torch.randn(1, 2, 8, 7, 6)
    probs = sliding_window_predict(model, volume, roi_size=(8, 7, 6), num_classes=3)
    torch.testing.assert_close(probs, _whole_volume_softmax(model, volume))


def test_float64_volumes_as_nibabel_reads_them_are_predicted_in_float32():
    model = _conv_model()  # float32 weights; nibabel's get_fdata() gives float64 voxels
    volume = torch.randn(1, 2, 6, 5, 4)
    expected = sliding_window_predict(model, volume, roi_size=4, overlap=0.5)
    for given in (volume.double(), volume.double().numpy()):
        probs = sliding_window_predict(model, given, roi_size=4, overlap=0.5)
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_pointwise_model_is_unchanged_by_window_layout(mode):
    model = _conv_model(kernel_size=1)
    volume = torch.randn(2, 2, 9, 10, 7)
    probs = sliding_window_predict(model, volume, roi_size=4, overlap=0.5, sw_batch_size=3, mode=mode)
    torch.testing.assert_close(probs, _whole_volume_softmax(model, volume))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 9, 10, 7))


def test_roi_larger_than_volume_keeps_the_volume_shape():
    model = _conv_model()
    volume = torch.randn(1, 2, 5, 6, 3)
    probs = sliding_window_predict(model, volume, roi_size=(8, 8, 8))
    assert probs.shape == (1, 3, 5, 6, 3)
    # MONAI zero-pads the input, which is what the conv's own zero padding sees: same result.
    torch.testing.assert_close(probs, _whole_volume_softmax(model, volume))


def test_roi_larger_than_volume_pads_with_the_given_value():
    # A CT model is trained on crops padded with normalized air; at inference the missing border must be air
    # too, not 0 (+101 HU after the KiTS19 normalization).
    model = _conv_model()
    volume = torch.randn(1, 2, 5, 6, 3)
    air = -2.34
    probs = sliding_window_predict(model, volume, roi_size=(8, 8, 8), padding_value=air)
    # MONAI centres the volume in the window: (8 - n) // 2 before, the rest after.
    padded = torch.nn.functional.pad(volume, (2, 3, 1, 1, 1, 2), value=air)  # W, H, D: (before, after)
    expected = _whole_volume_softmax(model, padded)[:, :, 1:6, 1:7, 2:5]
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs, sliding_window_predict(model, volume, roi_size=(8, 8, 8)), atol=1e-3)


def test_flip_tta_of_flip_equivariant_model_equals_no_tta():
    model = _conv_model(symmetric=True)
    volume = torch.randn(1, 2, 10, 9, 8)
    plain = sliding_window_predict(model, volume, roi_size=6, overlap=0.5)
    tta = sliding_window_predict(model, volume, roi_size=6, overlap=0.5, flip_tta=True)
    torch.testing.assert_close(tta, plain)


def test_flip_tta_averages_the_eight_flipped_predictions():
    model = _conv_model()
    volume = torch.randn(1, 2, 6, 5, 4)
    tta = sliding_window_predict(model, volume, roi_size=(6, 5, 4), flip_tta=True)
    expected = torch.stack(
        [_whole_volume_softmax(model, volume.flip(dims)).flip(dims) for dims in _flip_dims()]
    ).mean(dim=0)
    torch.testing.assert_close(tta, expected)
    assert not torch.allclose(tta, _whole_volume_softmax(model, volume), atol=1e-3)


def test_sliding_window_restores_training_mode_and_checks_the_output():
    model = _conv_model().train()
    volume = torch.randn(1, 2, 4, 4, 4)
    sliding_window_predict(model, volume, roi_size=4)
    assert model.training
    with pytest.raises(ValueError, match=r"model output has shape \(1, 3, 4, 4, 4\).*num_classes=5"):
        sliding_window_predict(model, volume, roi_size=4, num_classes=5)
    with pytest.raises(ValueError, match=r"volume must have shape \(B, C, D, H, W\); got \(2, 4, 4, 4\)"):
        sliding_window_predict(model, volume[0], roi_size=4)
    with pytest.raises(ValueError, match="Did you mean 'gaussian'"):
        sliding_window_predict(model, volume, roi_size=4, mode="gausian")


def test_reference_overlap_gives_stride_42_for_128_windows():
    assert int(128 * (1 - REFERENCE_OVERLAP)) == 42
    assert math.isclose(REFERENCE_OVERLAP, 0.67, abs_tol=5e-3)


def test_probabilities_to_labels_maps_channels_to_label_values():
    probs = torch.zeros(1, 4, 1, 1, 4)
    for channel in range(4):
        probs[0, channel, 0, 0, channel] = 1.0
    labels = probabilities_to_labels(probs, BRATS.label_values)
    torch.testing.assert_close(labels, torch.tensor([[[[0, 1, 2, 4]]]]))
    torch.testing.assert_close(probabilities_to_labels(probs), torch.tensor([[[[0, 1, 2, 3]]]]))
