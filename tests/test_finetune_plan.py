"""The fingerprint and the fine-tuning plan on tiny made-up data sets whose answers are worked
out by hand, the memory estimate against a hand count and the Keras model, and one plan of the
real sarcoma CTs."""

import json
import math

import numpy as np
import pytest
from conftest import SHARED_DATA, require_shared
from scipy import ndimage

import finetune_fingerprint as F
import finetune_plan as P

BIG = 64 * 2**30  # a memory budget nothing in these tests reaches


def fake_case(shape, spacing, extents, samples=(), case_id=None, n_channels=1):
    """A case fingerprint written by hand: one class-1 object per extent (mm)."""
    return {
        "case_id": case_id,
        "shape": list(shape),
        "spacing": list(spacing),
        "size_mm": [n * s for n, s in zip(shape, spacing, strict=True)],
        "n_channels": n_channels,
        "class_voxels": {"1": 100} if extents else {},
        "foreground_voxels": 100 if extents else 0,
        "objects": [{"class": 1, "extent_mm": list(e), "voxels": 100} for e in extents],
        "intensity_samples": [list(samples)] * n_channels,
    }


# ------------------------------------------------------------------------------------------
# Objects and fingerprints
# ------------------------------------------------------------------------------------------


def test_foreground_objects_match_scipy_labelling():
    rng = np.random.default_rng(0)
    for trial in range(12):
        mask = rng.random((19, 14, 11)) < rng.uniform(0.15, 0.65)
        lab, n = ndimage.label(mask)  # 6-connectivity, the default structure
        boxes = ndimage.find_objects(lab)
        expected = sorted(
            (
                tuple(s.start for s in box),
                tuple(s.stop - 1 for s in box),
                int((lab == i + 1).sum()),
            )
            for i, box in enumerate(boxes)
        )
        expected.sort(key=lambda p: (-p[2], p[0]))
        assert P.foreground_objects(mask) == expected, trial


def test_foreground_objects_of_a_spiral_need_many_merges():
    # A square spiral of one-voxel corridors: one object whose labels meet in many places.
    mask = np.zeros((15, 15, 2), bool)
    lo, hi = 0, 14
    while lo <= hi:
        mask[lo : hi + 1, lo, 0] = True  # down the left side
        mask[hi, lo : hi + 1, 0] = True  # along the bottom
        mask[lo + 2 : hi + 1, hi, 0] = True  # up the right side
        mask[lo + 2, lo + 2 : hi + 1, 0] = True  # back along the top, inside
        lo, hi = lo + 2, hi - 2
    mask[7, 7, 1] = True
    mask[7, 7, 0] = True
    assert ndimage.label(mask)[1] == 1
    ((low, high, n),) = P.foreground_objects(mask)
    assert n == int(mask.sum()) and low == (0, 0, 0) and high == (14, 14, 1)


def two_cube_case():
    """A 20x20x10 label at 1x1x2 mm: a 6x6x3 cube (class 1), a 2x2x2 cube (class 1), a speck
    (class 1) and a 4x2x1 box of class 2; the image is 100 on class 1, 300 on class 2."""
    label = np.zeros((20, 20, 10), np.uint8)
    label[2:8, 3:9, 1:4] = 1  # 108 voxels: 6 x 6 x 6 mm
    label[12:14, 12:14, 6:8] = 1  # 8 voxels (>= 5% of 108): 2 x 2 x 4 mm
    label[18, 1, 9] = 1  # 1 voxel (< 5% of 108): a speck
    label[15:19, 5:7, 2] = 2  # 8 voxels: 4 x 2 x 2 mm
    image = np.full(label.shape, -500, np.int16)
    image[label == 1] = 100
    image[label == 2] = 300
    return image, label


def test_case_fingerprint_objects_in_mm_and_specks_left_out():
    image, label = two_cube_case()
    fp = P.case_fingerprint(image, label, (1, 1, 2), rng=np.random.default_rng(0), n_samples=50)
    assert fp["shape"] == [20, 20, 10] and fp["spacing"] == [1.0, 1.0, 2.0]
    assert fp["size_mm"] == [20.0, 20.0, 20.0] and fp["n_channels"] == 1
    assert fp["class_voxels"] == {"1": 117, "2": 8} and fp["foreground_voxels"] == 125
    assert fp["objects"] == [
        {"class": 1, "extent_mm": [6.0, 6.0, 6.0], "voxels": 108},
        {"class": 1, "extent_mm": [2.0, 2.0, 4.0], "voxels": 8},
        {"class": 2, "extent_mm": [4.0, 2.0, 2.0], "voxels": 8},
    ]
    (samples,) = fp["intensity_samples"]
    assert len(samples) == 50 and set(samples) <= {100.0, 300.0}  # foreground only
    json.dumps(fp)


def test_case_fingerprint_samples_come_from_the_rng_and_each_case_gives_as_many():
    image, label = two_cube_case()
    image = np.stack([image, image.astype(np.float32) * 2])  # two channels
    one = P.case_fingerprint(image, label, (1, 1, 2), rng=np.random.default_rng(7), n_samples=40)
    two = P.case_fingerprint(image, label, (1, 1, 2), rng=np.random.default_rng(7), n_samples=40)
    other = P.case_fingerprint(image, label, (1, 1, 2), rng=np.random.default_rng(8), n_samples=40)
    assert one["intensity_samples"] == two["intensity_samples"]
    assert one["intensity_samples"] != other["intensity_samples"]
    a, b = (np.array(s) for s in one["intensity_samples"])
    np.testing.assert_array_equal(b, 2 * a)  # the same voxels in every channel
    # As many samples as foreground voxels (125): every one of them, once.
    distinct = np.arange(label.size, dtype=np.float64).reshape(label.shape)
    every = P.case_fingerprint(
        distinct, label, (1, 1, 2), rng=np.random.default_rng(0), n_samples=125
    )
    assert sorted(every["intensity_samples"][0]) == sorted(distinct[label > 0].tolist())
    # More samples than foreground voxels (125): drawn with replacement, still 400.
    many = P.case_fingerprint(image, label, (1, 1, 2), rng=np.random.default_rng(0), n_samples=400)
    assert [len(s) for s in many["intensity_samples"]] == [400, 400]
    empty = P.case_fingerprint(
        image, np.zeros_like(label), (1, 1, 2), rng=np.random.default_rng(0), n_samples=40
    )
    assert empty["objects"] == [] and empty["intensity_samples"] == [[], []]


def test_case_fingerprint_rejects_bad_input_naming_it():
    image, label = two_cube_case()
    rng = np.random.default_rng(0)
    with pytest.raises(P.PlanInputError, match=r"spatial shape \(20, 20, 10\).*'c7'"):
        P.case_fingerprint(image, label[:, :, :5], (1, 1, 2), rng=rng, case_id="c7")
    with pytest.raises(P.PlanInputError, match="integer label map"):
        P.case_fingerprint(image, label.astype(np.float32), (1, 1, 2), rng=rng)
    with pytest.raises(P.PlanInputError, match=r"spacing=\(1, 0, 2\)"):
        P.case_fingerprint(image, label, (1, 0, 2), rng=rng)
    with pytest.raises(P.PlanInputError, match="Generator"):
        P.case_fingerprint(image, label, (1, 1, 2), rng=np.random.RandomState(0))


def test_dataset_fingerprint_medians_by_hand():
    image, label = two_cube_case()
    a = P.case_fingerprint(image, label, (1, 1, 2), rng=np.random.default_rng(0), case_id="a")
    # Case b: the same voxels at half the in-plane spacing, class 1 only.
    label_b = np.where(label == 2, 0, label)
    b = P.case_fingerprint(image, label_b, (0.5, 0.5, 2), rng=np.random.default_rng(1), case_id="b")
    fp = P.dataset_fingerprint([a, b])
    assert fp["n_cases"] == 2 and fp["case_ids"] == ["a", "b"] and fp["classes"] == [1, 2]
    assert fp["spacing"]["median"] == [0.75, 0.75, 2.0]
    assert fp["size_mm"]["median"] == [15.0, 15.0, 20.0]
    # Objects: a: 6x6x6, 2x2x4 (class 1), 4x2x2 (class 2); b: 3x3x6, 1x1x4 (class 1).
    by_class = fp["object_extent_mm"]
    assert by_class["all"]["n"] == 5 and by_class["all"]["median"] == [3.0, 2.0, 4.0]
    assert by_class["1"]["median"] == [2.5, 2.5, 5.0] and by_class["1"]["max"] == [6, 6, 6]
    assert by_class["2"]["n"] == 1 and by_class["2"]["median"] == [4.0, 2.0, 2.0]
    (stats,) = fp["intensity"]
    # a gives 10,000 samples of 100 (117 of 125 voxels) or 300; b only 100.
    assert stats["n_samples"] == 20_000 and stats["min"] == 100.0 and stats["max"] == 300.0
    assert stats["median"] == 100.0 and stats["percentile_99_5"] == 300.0
    json.dumps(fp, allow_nan=False)


def test_dataset_fingerprint_intensity_statistics_by_hand():
    fps = [fake_case((10, 10, 10), (1, 1, 1), [(5, 5, 5)], samples=range(0, 101))]
    fps.append(fake_case((10, 10, 10), (1, 1, 1), [(5, 5, 5)], samples=range(101, 201)))
    (stats,) = P.dataset_fingerprint(fps)["intensity"]
    # The pooled samples are 0..200: percentiles at 0.005 * 200 and 0.995 * 200.
    assert stats["percentile_00_5"] == pytest.approx(1.0)
    assert stats["percentile_99_5"] == pytest.approx(199.0)
    assert stats["mean"] == pytest.approx(100.0)
    assert stats["std"] == pytest.approx(math.sqrt((201**2 - 1) / 12))


# ------------------------------------------------------------------------------------------
# The plan: spacing, field of view, patch
# ------------------------------------------------------------------------------------------


def iso_dataset(n=3, shape=(128, 128, 128), extent=(60, 60, 60), spacing=(1, 1, 1)):
    return P.dataset_fingerprint(
        [fake_case(shape, spacing, [extent], samples=[0.0, 10.0]) for _ in range(n)]
    )


def test_free_patch_spans_the_context_at_the_median_spacing():
    # 20 mm objects at 1 mm: the field of view 1.5 x 20 = 30 mm needs 30 voxels, rounded up to
    # 32 (also the smallest planned patch); the images (64 voxels) do not limit it.
    fp = iso_dataset(shape=(64, 64, 64), extent=(20, 20, 20))
    plan = P.make_plan(fp, memory_budget_bytes=BIG, n_base_filters=4)
    assert plan.spacing == (1.0, 1.0, 1.0) and plan.patch == (32, 32, 32)
    assert plan.wanted_field_of_view_mm == (30.0, 30.0, 30.0)
    assert plan.field_of_view_mm == (32.0, 32.0, 32.0)
    assert "median spacing of the 3 cases" in plan.reasons["spacing"]
    assert "1.5x the typical object (20 x 20 x 20 mm" in plan.reasons["field_of_view"]
    # Batch: 5% of 3 x 64**3 voxels is 39,321, one 32**3 patch; the minimum of 2 wins.
    assert plan.batch_size == 2
    assert "at most 1 so that a batch holds at most 5%" in plan.reasons["batch_size"]


def test_free_patch_is_capped_at_the_median_image_and_follows_the_object_aspect():
    # Objects 100 x 40 x 20 mm at 1 mm: wanted 150 x 60 x 30; images 96 x 96 x 40 voxels.
    fp = iso_dataset(shape=(96, 96, 40), extent=(100, 40, 20))
    plan = P.make_plan(fp, memory_budget_bytes=BIG, n_base_filters=4)
    # x: wanted 150 mm, but at most the median image, 96 mm -> 96; y: 60 -> 64; z: 30 -> 32.
    assert plan.wanted_field_of_view_mm == (96.0, 60.0, 30.0)
    assert plan.patch == (96, 64, 32)


def test_anisotropic_data_keep_a_low_percentile_of_the_coarse_axis():
    # z spacings 2.5, 5, 5, 5, 5 with 1 mm in-plane: the median z, 5, is over 3x the finest, so
    # z takes the 10th percentile: position 0.4 between 2.5 and 5, i.e. 3.5 mm.
    cases = [
        fake_case((100, 100, 20), (1, 1, z), [(20, 20, 20)], samples=[0.0])
        for z in (2.5, 5, 5, 5, 5)
    ]
    plan = P.make_plan(P.dataset_fingerprint(cases), memory_budget_bytes=BIG, n_base_filters=4)
    assert plan.spacing == (1.0, 1.0, 3.5)
    assert "anisotropic" in plan.reasons["spacing"]
    assert "10th percentile of the cases' z spacings, 3.5 mm" in plan.reasons["spacing"]
    # Not anisotropic (2 mm is under 3x 1 mm): the median is kept.
    cases = [fake_case((100, 100, 50), (1, 1, z), [(20, 20, 20)]) for z in (1, 2, 2)]
    plan = P.make_plan(P.dataset_fingerprint(cases), memory_budget_bytes=BIG, n_base_filters=4)
    assert plan.spacing == (1.0, 1.0, 2.0) and "anisotropic" not in plan.reasons["spacing"]


def test_fixed_patch_with_big_objects_coarsens_in_plane_and_keeps_the_coarse_axis():
    # 1 x 1 x 4 mm (anisotropic, all cases alike), objects 48 mm: wanted 72 mm per axis.
    # Patch 32 x 32 x 16: x and y need 72 / 32 = 2.25 mm; z needs 72 / 16 = 4.5 mm, but no axis
    # goes beyond max(4, 2 x 1) = 4 mm, so z stays at 4 and the patch spans 64 of 72 mm there.
    fp = iso_dataset(shape=(100, 100, 25), extent=(48, 48, 48), spacing=(1, 1, 4))
    plan = P.make_plan(fp, patch=(32, 32, 16), memory_budget_bytes=BIG, n_base_filters=4)
    assert plan.patch == (32, 32, 16)
    assert plan.spacing == (2.25, 2.25, 4.0)
    assert plan.field_of_view_mm == (72.0, 72.0, 64.0)
    assert plan.reasons["patch"] == "set by --patch"
    assert "x, y coarsened" in plan.reasons["spacing"] and "z kept" in plan.reasons["spacing"]
    assert "short along z (64 of 72 mm)" in plan.reasons["field_of_view"]


def test_fixed_patch_coarsening_rounds_up_shares_in_plane_and_stops_at_twice_the_finest():
    # Isotropic 1 mm, objects 50 x 40 x 10 mm: wanted 75 x 60 x 15. Patch 32 x 32 x 32:
    # x needs 75 / 32 = 2.34375 -> 2 (the limit, max(1, 2 x 1)); y needs 1.875; z needs 0.47,
    # never finer than 1. Axes of one base spacing share it: all three become 2 mm.
    fp = iso_dataset(shape=(100, 100, 100), extent=(50, 40, 10))
    plan = P.make_plan(fp, patch=(32, 32, 32), memory_budget_bytes=BIG, n_base_filters=4)
    assert plan.spacing == (2.0, 2.0, 2.0)
    # With 0.5 mm in-plane and 2 mm slices, x and y share 75 / 32 rounded up to 0.01: 2.35.
    fp = iso_dataset(shape=(200, 200, 50), extent=(50, 40, 10), spacing=(0.5, 0.5, 2))
    plan = P.make_plan(fp, patch=(32, 32, 32), memory_budget_bytes=BIG, n_base_filters=4)
    assert plan.spacing == (2.0, 2.0, 2.0)  # the limit, max(2, 2 x 0.5) = 2
    plan = P.make_plan(fp, patch=(32, 32, 32), memory_budget_bytes=BIG, max_coarsening=5)
    assert plan.spacing == (2.35, 2.35, 2.0)


def test_fixed_patch_larger_than_needed_keeps_the_base_spacing():
    fp = iso_dataset(extent=(10, 10, 10))
    plan = P.make_plan(fp, patch=(64, 64, 64), memory_budget_bytes=BIG, n_base_filters=4)
    assert plan.spacing == (1.0, 1.0, 1.0)
    assert "coarsened" not in plan.reasons["spacing"]


def test_a_small_budget_coarsens_before_it_shrinks_the_context():
    # 60 mm objects at 1 mm: wanted 90 mm, a 96-voxel patch. The budget holds a 48**3 patch at
    # batch 2: 90 / s <= 48 needs s >= 1.875 mm; coarsening in 5% steps from 1 mm first passes
    # it at 1.05**13 = 1.8856, rounded up to 1.89 mm.
    fp = iso_dataset(extent=(60, 60, 60))
    budget = P.training_step_bytes((48, 48, 48), 2, n_base_filters=4)
    plan = P.make_plan(fp, memory_budget_bytes=budget, n_base_filters=4)
    assert plan.patch == (48, 48, 48) and plan.spacing == (1.89, 1.89, 1.89)
    assert plan.memory_bytes <= budget and plan.batch_size == 2 and not plan.warnings
    assert "coarsened, finest first" in plan.reasons["spacing"]


def test_a_voxel_cap_coarsens_like_the_memory_budget():
    # The same answer as above, with plenty of memory and at most 48**3 voxels per patch.
    fp = iso_dataset(extent=(60, 60, 60))
    plan = P.make_plan(fp, memory_budget_bytes=BIG, max_patch_voxels=48**3, n_base_filters=4)
    assert plan.patch == (48, 48, 48) and plan.spacing == (1.89, 1.89, 1.89)
    assert "and max_patch_voxels 110592" in plan.reasons["spacing"]
    # A fixed patch is not held to it.
    plan = P.make_plan(fp, patch=(64, 64, 64), memory_budget_bytes=BIG, max_patch_voxels=48**3)
    assert plan.patch == (64, 64, 64)
    with pytest.raises(P.PlanInputError, match="max_patch_voxels"):
        P.make_plan(fp, memory_budget_bytes=BIG, max_patch_voxels=100)


def test_a_budget_too_small_at_the_coarsest_spacing_shrinks_the_patch():
    # At the limit (2 mm) the patch is 48**3; the budget holds 40 x 48 x 48: x loses 8 voxels
    # (all three sides are 96 mm long; the first is shortened).
    fp = iso_dataset(extent=(60, 60, 60))
    budget = P.training_step_bytes((40, 48, 48), 2, n_base_filters=4)
    plan = P.make_plan(fp, memory_budget_bytes=budget, n_base_filters=4)
    assert plan.spacing == (2.0, 2.0, 2.0) and plan.patch == (40, 48, 48)
    assert "shrunk from 48 x 48 x 48 along x" in plan.reasons["patch"]
    # A budget nothing fits: the smallest patch, batch 2, and a warning saying so.
    plan = P.make_plan(fp, memory_budget_bytes=1000, n_base_filters=4)
    assert plan.patch == (16, 16, 16) and plan.batch_size == 2
    assert "more than the budget" in plan.warnings[0]
    assert plan.warnings[0] in P.format_plan_table(plan)


def test_batch_size_fills_the_memory_up_to_five_percent_of_the_data():
    fp = iso_dataset(n=40, shape=(128, 128, 128), extent=(20, 20, 20))
    one = P.training_step_bytes((32, 32, 32), 1, n_base_filters=4)
    zero = P.training_step_bytes((32, 32, 32), 0, n_base_filters=4)
    # Memory for exactly 5 patches; the data allow 0.05 x 40 x 128**3 / 32**3 = 128.
    plan = P.make_plan(fp, memory_budget_bytes=zero + 5 * (one - zero), n_base_filters=4)
    assert plan.patch == (32, 32, 32) and plan.batch_size == 5
    assert "fit the memory budget (5), at most 128" in plan.reasons["batch_size"]
    # Plenty of memory: the 5% cap.
    assert P.make_plan(fp, memory_budget_bytes=BIG, n_base_filters=4).batch_size == 128


# ------------------------------------------------------------------------------------------
# Overrides, pre-training spacing, intensities
# ------------------------------------------------------------------------------------------


def test_every_override_wins_and_its_reason_says_so():
    fp = iso_dataset(extent=(60, 60, 60))
    plan = P.make_plan(
        fp,
        patch=(24, 40, 16),
        spacing=(0.7, 0.8, 3.0),
        batch_size=3,
        intensity=["minmax"],
        memory_budget_bytes=BIG,
        n_base_filters=4,
    )
    assert plan.patch == (24, 40, 16) and plan.spacing == (0.7, 0.8, 3.0)
    assert plan.batch_size == 3 and plan.intensity == ["minmax"]
    for key, flag in (
        ("patch", "--patch"),
        ("spacing", "--spacing"),
        ("batch_size", "--batch_size"),
        ("intensity", "--intensity"),
    ):
        assert plan.reasons[key] == f"set by {flag}"
    assert sorted(plan.settings["overridden"]) == ["batch_size", "intensity", "patch", "spacing"]
    # A fixed spacing alone: the patch is planned at it (90 mm at 1.5 mm: 60 -> 64 voxels).
    plan = P.make_plan(fp, spacing=(1.5, 1.5, 1.5), memory_budget_bytes=BIG, n_base_filters=4)
    assert plan.spacing == (1.5, 1.5, 1.5) and plan.patch == (64, 64, 64)
    # A fixed patch and batch that do not fit are kept, with a warning.
    plan = P.make_plan(fp, patch=(64, 64, 64), batch_size=64, memory_budget_bytes=2**30)
    assert plan.batch_size == 64 and plan.patch == (64, 64, 64)
    assert "batch 64 of 64 x 64 x 64 needs an estimated" in plan.warnings[0]
    assert "more than the budget 1.00 GiB" in plan.warnings[0]


def test_overrides_are_checked():
    fp = iso_dataset()
    with pytest.raises(P.PlanInputError, match=r"divisible by 8.*patch=\(64, 60, 32\)"):
        P.make_plan(fp, patch=(64, 60, 32), memory_budget_bytes=BIG)
    with pytest.raises(P.PlanInputError, match="spacing="):
        P.make_plan(fp, spacing=(1, 1), memory_budget_bytes=BIG)
    with pytest.raises(P.PlanInputError, match="batch_size"):
        P.make_plan(fp, batch_size=0, memory_budget_bytes=BIG)
    with pytest.raises(P.PlanInputError, match="--intensity.*'hu'"):
        P.make_plan(fp, intensity=["hu"], memory_budget_bytes=BIG)
    with pytest.raises(P.PlanInputError, match="one per channel"):
        P.make_plan(fp, modality=["ct", "mri"], memory_budget_bytes=BIG)
    with pytest.raises(P.PlanInputError, match="dataset_fingerprint"):
        P.make_plan({"spacings": []}, memory_budget_bytes=BIG)


def test_respecting_the_pretrained_spacing_is_an_option_off_by_default():
    fp = iso_dataset(extent=(60, 60, 60))
    plain = P.make_plan(
        fp, patch=(32, 32, 32), pretrained_spacing=(0.75, 0.75, 1.25), memory_budget_bytes=BIG
    )
    assert plain.spacing == (2.0, 2.0, 2.0)  # the context rule, as without it
    kept = P.make_plan(
        fp,
        patch=(32, 32, 32),
        pretrained_spacing=(0.75, 0.75, 1.25),
        respect_pretrained_spacing=True,
        memory_budget_bytes=BIG,
    )
    assert kept.spacing == (0.75, 0.75, 1.25)
    assert "pre-trained weights' spacing" in kept.reasons["spacing"]
    with pytest.raises(P.PlanInputError, match="pretrained_spacing"):
        P.make_plan(fp, respect_pretrained_spacing=True, memory_budget_bytes=BIG)


def test_intensity_follows_modality_and_pretraining():
    cases = [fake_case((64, 64, 64), (1, 1, 1), [(20, 20, 20)], samples=range(201))]
    fp = P.dataset_fingerprint(cases)
    ct = P.make_plan(fp, modality="CT", pretrained=True, memory_budget_bytes=BIG)
    assert ct.intensity == ["ct"] and ct.intensity_params == [{"window": [-1000.0, 1000.0]}]
    assert "pre-trained" in ct.reasons["intensity"]
    scratch = P.make_plan(fp, modality="ct", pretrained=False, memory_budget_bytes=BIG)
    assert scratch.intensity == ["ct_foreground"]
    (params,) = scratch.intensity_params
    assert params["clip"] == pytest.approx([1.0, 199.0]) and params["mean"] == 100.0
    assert params["std"] == pytest.approx(math.sqrt((201**2 - 1) / 12))
    for modality, pretrained, mode in (
        ("mri", True, "mri"),
        ("mri", False, "zscore"),
        ("pet", True, "minmax"),
        ("pet", False, "zscore"),
    ):
        plan = P.make_plan(fp, modality=modality, pretrained=pretrained, memory_budget_bytes=BIG)
        assert plan.intensity == [mode], (modality, pretrained)
    two = P.dataset_fingerprint([fake_case((64, 64, 64), (1, 1, 1), [(20,) * 3], [5.0], None, 2)])
    plan = P.make_plan(two, modality=["ct", "t2"], pretrained=False, memory_budget_bytes=BIG)
    assert plan.intensity == ["ct_foreground", "zscore"]
    assert plan.reasons["intensity"].startswith("channel 0: CT from scratch")


def test_the_plan_modes_are_volume_io_modes():
    import volume_io

    assert F.ALL_INTENSITY_MODES == volume_io.INTENSITY_MODES
    assert set(F.PLAN_INTENSITY_MODES) < set(volume_io.INTENSITY_MODES)
    assert set(F.VOLUME_INTENSITY_MODES) | set(F.PLAN_INTENSITY_MODES) == set(F.ALL_INTENSITY_MODES)


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------


def test_memory_estimate_against_a_hand_count():
    # Depth 2, 2 base filters, 1 channel, 2 classes, batch norm, patch 8x8x8 (512 voxels at
    # level 0, 64 at level 1). Values kept per sample:
    #   input 1x512 + target 2x512                      = 1536
    #   level 0: 3 x (2 + 4) x 512 (conv, bn, relu)     = 9216
    #   pool 4x64; level 1: 3 x (4 + 8) x 64            = 256 + 2304
    #   up 8x512; concat 12x512; 2 blocks 3 x 4 x 512 x 2 = 4096 + 6144 + 12288
    #   output conv 2x512, softmax 2x512                = 2048
    acts = 1536 + 9216 + 256 + 2304 + 4096 + 6144 + 12288 + 2048
    assert acts == 37888
    assert P.unet_activation_count((8, 8, 8), 2, n_classes=2, depth=2) == acts
    # Weights: 27 x in x out + out per conv, 4 per batch-norm channel.
    #   level 0: 56 + 8 + 220 + 16; level 1: 436 + 16 + 872 + 32
    #   decoder: 27 x 12 x 4 + 4 = 1300, + 16, + 436, + 16; output 4 x 2 + 2 = 10
    params = 300 + 1356 + 1768 + 10
    assert P.unet_parameter_count(2, n_classes=2, depth=2) == params == 3434
    # Batch 3, float32: 2 x values x 4 bytes x 3, plus weights, gradients and Adam's 2 slots.
    assert P.training_step_bytes((8, 8, 8), 3, n_base_filters=2, depth=2) == (
        2 * acts * 4 * 3 + params * 4 * 4
    )
    assert P.training_step_bytes((8, 8, 8), 3, n_base_filters=2, depth=2, dtype="bfloat16") == (
        2 * acts * 2 * 3 + params * 4 * 4
    )
    # Without batch norm: two values per block instead of three, and no batch-norm weights.
    no_bn = 1536 + 2 * 6 * 512 + 256 + 2 * 12 * 64 + 4096 + 6144 + 2 * 8 * 512 + 2048
    assert P.unet_activation_count((8, 8, 8), 2, depth=2, batch_normalization=False) == no_bn
    bn_weights = 4 * (2 + 4 + 4 + 8 + 4 + 4)
    assert P.unet_parameter_count(2, depth=2, batch_normalization=False) == 3434 - bn_weights
    # The published network: 16,324,929 weights (docs/finetuning.md).
    assert P.unet_parameter_count(32, n_classes=1) == 16_324_929


@pytest.mark.parametrize("deconvolution", [False, True])
def test_memory_counts_match_the_keras_model(deconvolution):
    import keras

    from unet3d import Conv3D, unet_model_3d

    patch, n_base = (16, 16, 8), 2
    base = unet_model_3d(
        (1, *patch), n_base_filters=n_base, batch_normalization=True, deconvolution=deconvolution
    )
    x = Conv3D(3, 1, data_format="channels_first")(base.get_layer("depth_13_relu").output)
    model = keras.models.Model(base.input, keras.layers.Softmax(axis=1)(x))
    assert model.count_params() == P.unet_parameter_count(
        n_base, n_classes=3, deconvolution=deconvolution
    )
    outputs = sum(int(np.prod(layer.output.shape[1:])) for layer in model.layers)
    target = 3 * int(np.prod(patch))
    assert outputs + target == P.unet_activation_count(patch, n_base, n_classes=3)


def test_default_memory_budget_is_a_share_of_available_memory():
    import psutil

    budget = P.default_memory_budget(0.25)
    assert 0 < budget <= psutil.virtual_memory().total * 0.25
    with pytest.raises(P.PlanInputError, match="fraction"):
        P.default_memory_budget(0)


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------


def test_plan_and_fingerprint_survive_a_json_round_trip(tmp_path):
    fp = iso_dataset(extent=(60, 60, 60))
    plan = P.make_plan(fp, patch=(32, 32, 32), memory_budget_bytes=BIG, pretrained=False)
    P.save_json(tmp_path / "plan.json", plan)
    P.save_json(tmp_path / "fingerprint.json", fp)
    with open(tmp_path / "plan.json") as f:
        again = P.Plan.from_dict(json.load(f))
    assert again == plan
    with open(tmp_path / "fingerprint.json") as f:
        assert json.load(f) == fp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fingerprint.json", "plan.json"]
    with pytest.raises(P.PlanInputError, match="missing"):
        P.Plan.from_dict({"spacing": [1, 1, 1]})


def test_format_plan_table_has_a_row_per_value_with_its_reason():
    fp = iso_dataset(extent=(60, 60, 60))
    plan = P.make_plan(fp, patch=(32, 32, 32), memory_budget_bytes=BIG, n_base_filters=4)
    lines = P.format_plan_table(plan).splitlines()
    assert [cell.strip() for cell in lines[0].split(" | ")] == ["value", "planned", "why"]
    rows = {line.split(" | ")[0].strip(): line.split(" | ") for line in lines[2:]}
    assert set(rows) == {"spacing", "patch", "field of view", "batch size", "intensity", "memory"}
    assert rows["patch"][1].strip() == "32 x 32 x 32" and rows["patch"][2] == "set by --patch"
    assert rows["spacing"][1].strip() == "2 x 2 x 2 mm"


# ------------------------------------------------------------------------------------------
# The real sarcoma CTs
# ------------------------------------------------------------------------------------------

STS = SHARED_DATA / "sts_ct"


def test_sts_ct_plan_for_a_64x64x32_patch_sees_the_tumours():
    import SimpleITK as sitk

    require_shared(STS)
    fps = []
    for i, case in enumerate(("STS_001", "STS_017", "STS_023", "STS_050")):
        label = sitk.ReadImage(str(STS / "labelsTr" / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(STS / "imagesTr" / f"{case}_0000.nii.gz"))
        fps.append(
            P.case_fingerprint(
                sitk.GetArrayFromImage(image).T,
                sitk.GetArrayFromImage(label).T,
                label.GetSpacing(),
                rng=np.random.default_rng([0, i]),
                case_id=case,
            )
        )
    fp = P.dataset_fingerprint(fps)
    assert fp["spacing"]["median"][0] == pytest.approx(0.977, abs=0.01)
    assert [len(f["objects"]) for f in fps] == [1, 1, 1, 1]  # one tumour each
    plan = P.make_plan(fp, patch=(64, 64, 32), n_base_filters=8, memory_budget_bytes=2**33)
    # At 0.98 mm a 64-voxel patch spans 6 cm; the tumours (7-13 cm) need coarser in-plane
    # spacing, and the 3.3 mm slices are not coarsened.
    assert 1.5 <= plan.spacing[0] == plan.spacing[1] <= 3.0
    assert plan.spacing[2] == pytest.approx(3.27, abs=0.01)
    free = P.make_plan(fp, n_base_filters=8, memory_budget_bytes=2**33)
    assert free.spacing[0] == pytest.approx(0.977, abs=0.01)
    fov, wanted = np.array(free.field_of_view_mm), np.array(free.wanted_field_of_view_mm)
    assert np.all(fov >= wanted - 8)
    soft_tissue = fp["intensity"][0]["median"]
    assert -100 < soft_tissue < 150  # tumour HU, not air or bone
