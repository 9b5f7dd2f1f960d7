"""The cube sampler against a plain, slow reading of the algorithm
(tests/extraction_reference.py)."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest

import extraction_reference as ref
from infinite_generator_3D import (
    air_test_limit,
    infinite_generator_from_one_volume,
    normalise_hu,
    raw_threshold,
    setup_config,
    size_problem,
    tissue_score_sum,
)


class CountingRandom(random.Random):
    """random.Random that counts randint calls (same stream: it only wraps the parent's method)."""

    def __init__(self, seed):
        super().__init__(seed)
        self.draws = 0

    def randint(self, a, b):
        self.draws += 1
        return super().randint(a, b)


@pytest.fixture(scope="module")
def chest_xyz():
    import SimpleITK as sitk
    from conftest import CHEST_CT, require_shared

    path = require_shared(CHEST_CT)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


# --- constants and the threshold --------------------------------------------------------------


def test_config_constants_and_threshold():
    c = setup_config()
    assert (c.hu_min, c.hu_max, c.len_border, c.len_border_z, c.len_depth) == (
        -1000,
        1000,
        100,
        30,
        3,
    )
    assert (c.lung_min, c.lung_max, c.scale) == (0.7, 0.15, 32)
    assert (c.input_rows, c.input_cols, c.input_deps, c.crop_rows, c.crop_cols) == (
        64,
        64,
        32,
        64,
        64,
    )
    assert c.HU_thred == (-150 - (-1000)) / (1000 - (-1000)) == 0.425
    # -150 HU normalises (as the original computes it) to exactly the threshold: it counts as
    # tissue.
    assert normalise_hu(np.array([-150], np.int16), -1000.0, 1000.0)[0] == c.HU_thred
    assert normalise_hu(np.array([-151], np.int16), -1000.0, 1000.0)[0] < c.HU_thred
    # Original keyword arguments are accepted.
    c2 = setup_config(
        input_rows=16,
        input_cols=16,
        input_deps=8,
        crop_rows=16,
        crop_cols=16,
        len_border=10,
        len_border_z=5,
        scale=4,
        DATA_DIR="x",
        train_fold=[0],
        valid_fold=[1],
        test_fold=[2],
        len_depth=3,
        lung_min=0.7,
        lung_max=0.2,
    )
    assert (c2.input_rows, c2.scale, c2.DATA_DIR, c2.train_fold, c2.lung_max) == (
        16,
        4,
        "x",
        [0],
        0.2,
    )


def test_normalise_matches_whole_volume_bits():
    rng = np.random.default_rng(0)
    vol = rng.integers(-3000, 3000, size=(20, 21, 22)).astype(np.int16)
    whole = ref.normalise_volume(vol, -1000.0, 1000.0)
    window = normalise_hu(vol[3:11, 4:9, 5:17], -1000.0, 1000.0)
    assert window.dtype == np.float64
    assert np.array_equal(window, whole[3:11, 4:9, 5:17])
    assert window.min() == 0.0 and window.max() == 1.0


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16])
@pytest.mark.parametrize(
    "hu_min, hu_max", [(-1000.0, 1000.0), (-1024.0, 3071.0), (-1000.0, 400.0), (0.0, 4000.0)]
)
def test_raw_threshold_agrees_with_normalised_test_on_every_value(dtype, hu_min, hu_max):
    """Exhaustive: for every value of the dtype, raw >= threshold exactly when normalised >=
    HU_thred."""
    thred = (-150.0 - hu_min) / (hu_max - hu_min)
    info = np.iinfo(dtype)
    values = np.arange(info.min, info.max + 1).astype(dtype)
    expected = normalise_hu(values, hu_min, hu_max) >= thred
    t = raw_threshold(dtype, hu_min, hu_max, thred)
    got = np.zeros(values.shape, bool) if t is None else values >= t
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32])
def test_raw_threshold_wide_integers(dtype):
    c = setup_config()
    info = np.iinfo(dtype)
    t = raw_threshold(dtype, c.hu_min, c.hu_max, c.HU_thred)
    near = np.array(
        [v for v in range(-300, 300) if info.min <= v <= info.max] + [info.min, info.max],
        dtype=dtype,
    )
    assert np.array_equal(near >= t, normalise_hu(near, c.hu_min, c.hu_max) >= c.HU_thred)
    assert t == (0 if info.min == 0 else -150)


# --- air test: array version against the loop ----------------------------------------------------


def test_tissue_score_hand_computed():
    t = 0.425
    low, high = 0.1, t  # exactly at the threshold counts as tissue
    # One column, 2 scored voxels, look-ahead 3: d=0 hits at k=0 (score 1), d=1 no hit in 3
    # (score 0).
    w = np.array([high, low, low, low, low]).reshape(1, 1, 5)
    assert tissue_score_sum(w, t, 2, 3) == 1
    # d=0 hits at k=1 (0.5), d=1 at k=0 (1).
    w = np.array([low, high, low, low, low]).reshape(1, 1, 5)
    assert tissue_score_sum(w, t, 2, 3) == Fraction(3, 2)
    # d=0 hits at k=2 (0), d=1 at k=1 (0.5).
    w = np.array([low, low, high, low, low]).reshape(1, 1, 5)
    assert tissue_score_sum(w, t, 2, 3) == Fraction(1, 2)
    # Just below the threshold is air.
    w = np.array([np.nextafter(t, 0)] * 5).reshape(1, 1, 5)
    assert tissue_score_sum(w, t, 2, 3) == 0


@pytest.mark.parametrize("len_depth", [2, 3, 4])
def test_tissue_score_array_equals_loop_on_random_windows(len_depth):
    rng = np.random.default_rng(len_depth)
    c = setup_config()
    hu_values = np.array([-3024, -1000, -900, -151, -150, -150, -149, 0, 999, 1000, 2000], np.int16)
    for trial in range(40):
        rows, cols, deps = rng.integers(1, 6, size=3)
        raw = rng.choice(hu_values, size=(rows, cols, deps + len_depth))
        window = normalise_hu(raw, c.hu_min, c.hu_max)
        fast = tissue_score_sum(window, c.HU_thred, deps, len_depth)
        slow = ref.tissue_score_sum_loop(window, c.HU_thred, rows, cols, deps, len_depth)
        if len_depth == 4:  # thirds: the loop's float sum carries rounding
            assert float(fast) == pytest.approx(slow, abs=1e-9)
        else:
            assert float(fast) == slow, (trial, raw)


def _accepts(window_hu, config):
    """Run the sampler on a volume that has exactly one possible window."""
    return infinite_generator_from_one_volume(config, window_hu, random.Random(0)) is not None


def test_air_test_boundary_sum_equal_to_limit_is_accepted():
    # rows=cols=deps=2 with lung_max=0.5: limit = 0.5 * 2 * 2 * 2 = 4.0. Borders 0 and
    # X = crop + 1, Z = deps + len_depth + 1 leave one window position (plus one x and y).
    c = setup_config(
        input_rows=2,
        input_cols=2,
        input_deps=2,
        crop_rows=2,
        crop_cols=2,
        len_border=0,
        len_border_z=0,
        scale=1,
        lung_max=0.5,
    )
    assert air_test_limit(c) == 4.0
    vol = np.full((3, 3, 6), -1000, np.int16)
    vol[:, :, 0] = -150  # every column: d=0 scores 1, d=1 scores 0: sum 4 == limit, kept
    assert _accepts(vol, c)
    vol[:, :, 2] = 0  # now d=1 also hits at k=1: 0.5 more per column: sum 6 > 4, rejected
    assert not _accepts(vol, c)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("seed", range(6))
def test_small_random_volumes_match_loop_reference(seed, dtype):
    """Whole algorithm on tiny configs: many windows near the threshold, both outcomes, same
    stream."""
    gen = np.random.default_rng(seed)
    c = setup_config(
        input_rows=6,
        input_cols=5,
        input_deps=4,
        crop_rows=6,
        crop_cols=5,
        len_border=3,
        len_border_z=2,
        scale=4,
        lung_max=0.3,
    )
    vol = gen.choice(
        np.array([-1000, -400, -151, -150, -149, 40], np.int16),
        p=[0.6, 0.2, 0.05, 0.05, 0.05, 0.05],
        size=(20, 18, 16),
    ).astype(dtype)
    r_fast, r_ref = random.Random(seed), random.Random(seed)
    fast = infinite_generator_from_one_volume(c, vol, r_fast)
    slow = ref.reference_cubes(c, vol, r_ref)
    assert (fast is None) == (slow is None)
    if fast is not None:
        assert np.array_equal(fast, slow)
    assert r_fast.getstate() == r_ref.getstate()


# --- sampler control flow ------------------------------------------------------------------------


def test_all_windows_rejected_gives_none_after_50_times_scale_attempts():
    c = setup_config(scale=3)
    vol = np.zeros((270, 270, 100), np.int16)  # 0 HU everywhere: all tissue
    r = CountingRandom(1)
    assert infinite_generator_from_one_volume(c, vol, r) is None
    assert r.draws == 3 * 50 * 3


def test_rare_air_window_gives_partial_results_like_the_reference():
    """Only one of 100 window positions passes: some seeds keep 1 or 2 of 3 cubes, one keeps
    none."""
    c = setup_config(
        input_rows=4,
        input_cols=4,
        input_deps=2,
        crop_rows=4,
        crop_cols=4,
        len_border=0,
        len_border_z=0,
        scale=3,
    )
    vol = np.zeros((14, 14, 6), np.int16)
    vol[:4, :4, :] = -1000
    counts = []
    for seed in range(10):
        r_fast, r_ref = CountingRandom(seed), random.Random(seed)
        fast = infinite_generator_from_one_volume(c, vol, r_fast)
        slow = ref.reference_cubes(c, vol, r_ref)
        assert (fast is None) == (slow is None)
        if fast is not None:
            assert fast.shape[1:] == (4, 4, 2) and fast.flags.c_contiguous
            assert np.array_equal(fast, slow)
        assert r_fast.getstate() == r_ref.getstate()
        counts.append(0 if fast is None else len(fast))
        if counts[-1] < 3:
            assert r_fast.draws == 3 * 150  # ran out of attempts
    assert {0, 1, 2, 3} <= set(counts)


def test_all_air_volume_gives_scale_cubes_with_three_draws_each():
    c = setup_config(scale=5)
    vol = np.full((270, 270, 100), -1000, np.int16)
    r = CountingRandom(1)
    cubes = infinite_generator_from_one_volume(c, vol, r)
    assert cubes.shape == (5, 64, 64, 32) and cubes.dtype == np.float64
    assert r.draws == 15 and np.all(cubes == 0.0)


@pytest.mark.parametrize("shape", [(264, 300, 100), (300, 264, 100), (300, 300, 95), (20, 20, 20)])
def test_too_small_volume_gives_none_and_draws_nothing(shape):
    c = setup_config()
    r = random.Random(3)
    before = r.getstate()
    assert size_problem(c, shape) is not None
    assert infinite_generator_from_one_volume(c, np.zeros(shape, np.int16), r) is None
    assert r.getstate() == before


def test_smallest_volume_that_fits():
    c = setup_config(scale=2)
    assert size_problem(c, (265, 265, 96)) is None
    cubes = infinite_generator_from_one_volume(
        c, np.full((265, 265, 96), -1000, np.int16), random.Random(1)
    )
    assert cubes.shape == (2, 64, 64, 32)


def test_rejects_non_3d_input():
    with pytest.raises(ValueError, match=r"Expected a 3-D array.*shape=\(4, 4\)"):
        infinite_generator_from_one_volume(setup_config(), np.zeros((4, 4)), random.Random(0))


def test_none_rng_uses_global_random_module():
    c = setup_config(
        input_rows=8,
        input_cols=8,
        input_deps=4,
        crop_rows=8,
        crop_cols=8,
        len_border=2,
        len_border_z=1,
        scale=3,
    )
    vol = np.random.default_rng(0).integers(-1000, -500, size=(20, 20, 16)).astype(np.int16)
    vol[::3] = 100
    random.seed(11)
    a = infinite_generator_from_one_volume(c, vol)
    state_after = random.getstate()
    r = random.Random(11)
    b = infinite_generator_from_one_volume(c, vol, r)
    assert np.array_equal(a, b) and state_after == r.getstate()


# --- the real chest CT ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_real_ct_matches_loop_reference(chest_xyz, seed):
    """Bit-identical cubes and the same generator state as the per-voxel loop reference
    (scale 3)."""
    c = setup_config(scale=3)
    r_fast, r_ref = random.Random(seed), random.Random(seed)
    fast = infinite_generator_from_one_volume(c, chest_xyz, r_fast)
    slow = ref.reference_cubes(c, chest_xyz, r_ref, air_test="loop")
    assert fast.dtype == slow.dtype == np.float64
    assert fast.shape == slow.shape == (3, 64, 64, 32)
    assert np.array_equal(fast, slow)
    assert r_fast.getstate() == r_ref.getstate()


@pytest.mark.parametrize("seed, attempts", [(1, 178), (2, 220)])
def test_real_ct_full_scale_matches_reference_and_original_attempts(chest_xyz, seed, attempts):
    """Scale 32, as the original runs: same cubes as the reference, and the attempt counts of the
    original's run on this scan."""
    c = setup_config(scale=32)
    r_fast, r_ref = CountingRandom(seed), random.Random(seed)
    fast = infinite_generator_from_one_volume(c, chest_xyz, r_fast)
    slow = ref.reference_cubes(c, chest_xyz, r_ref, air_test="argmax")
    assert fast.shape == (32, 64, 64, 32)
    assert np.array_equal(fast, slow)
    assert r_fast.getstate() == r_ref.getstate()
    assert r_fast.draws == 3 * attempts


def test_real_ct_as_float_matches_reference(chest_xyz):
    """A float volume takes the normalise-first path: the same cubes as from int16."""
    c = setup_config(scale=4)
    r_fast, r_ref = random.Random(2), random.Random(2)
    fast = infinite_generator_from_one_volume(c, chest_xyz.astype(np.float32), r_fast)
    slow = ref.reference_cubes(c, chest_xyz, r_ref, air_test="argmax")
    assert np.array_equal(fast, slow)
    assert r_fast.getstate() == r_ref.getstate()


@pytest.mark.parametrize("crop", [80, 48])
def test_real_ct_resized_crops_match_reference(chest_xyz, crop):
    c = setup_config(crop_rows=crop, crop_cols=crop, scale=2)
    r_fast, r_ref = random.Random(5), random.Random(5)
    fast = infinite_generator_from_one_volume(c, chest_xyz, r_fast)
    slow = ref.reference_cubes(c, chest_xyz, r_ref, air_test="argmax")
    assert fast.shape == (2, 64, 64, 32)
    assert np.array_equal(fast, slow)
    assert r_fast.getstate() == r_ref.getstate()


def test_real_ct_air_test_decisions_match_loop_on_every_window(chest_xyz):
    """The array air test against the loop on the windows a run draws (accepted and rejected)."""
    c = setup_config()
    v = ref.normalise_volume(chest_xyz[150:400, 150:400, 30:110], c.hu_min, c.hu_max)
    r = random.Random(4)
    limit = air_test_limit(c)
    decisions = set()
    for _ in range(12):
        sx, sy, sz = r.randint(0, 250 - 65), r.randint(0, 250 - 65), r.randint(0, 80 - 36)
        w = v[sx : sx + 64, sy : sy + 64, sz : sz + 35]
        fast = tissue_score_sum(w, c.HU_thred, 32, 3)
        slow = ref.tissue_score_sum_loop(w, c.HU_thred, 64, 64, 32, 3)
        assert float(fast) == slow
        assert (fast > Fraction(limit)) == (slow > limit)
        decisions.add(slow > limit)
    assert decisions == {True, False}  # both outcomes were exercised
