"""Tests of keras/genesis_kernels.py: each kernel against a slow, plain reference.

The kernels must equal the plain definitions bit for bit: np.interp, np.sort of the Bezier curve
(bezier_curve), a Python loop over the written-out shuffle blocks, numpy's min/max for the value
check. Their own random streams (local shuffle blocks and permutations, out-painting noise) must
follow the distributions docs/transforms.md states, checked within about 4.5 standard errors.
Most kernels are reached through the public transforms that use them.
"""

import math

import numpy as np
import pytest

import genesis_kernels as K
import transforms as T
from transform_helpers import ct_like, cube, within

# ---------------------------------------------------------------------------- fast interp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_interp_equals_np_interp(dtype):
    rng = np.random.default_rng(1)
    for trial in range(6):
        n = int(rng.integers(2, 3000))
        xp = np.sort(rng.random(n))
        xp[rng.integers(0, n, n // 5)] = xp[rng.integers(0, n, n // 5)]  # duplicates
        xp = np.sort(xp)
        fp = rng.random(n)
        q = np.concatenate([rng.random(5000) * 1.2 - 0.1, xp[:50], [np.nan, np.inf, -np.inf]])
        if trial % 2:  # few distinct values: the cached strategy
            q = rng.choice(q[:200], 20000)
        q = q.astype(dtype)
        np.testing.assert_array_equal(K.fast_interp(q, xp, fp), np.interp(q, xp, fp).astype(dtype))


def test_fast_interp_rejects_unsorted_knots():
    with pytest.raises(ValueError, match="non-decreasing"):
        K.fast_interp(np.zeros(3), [0.0, 1.0, 0.5], [0.0, 1.0, 2.0])


# ---------------------------------------------------------------------------- non-linear


@pytest.mark.parametrize("invert", [False, True])
def test_nonlinear_knots_equal_np_sort_of_bezier(invert):
    rng = np.random.default_rng(2)
    for _ in range(5):
        p = rng.random(4)
        params = T.NonlinearParams(((0, 0), (p[0], p[1]), (p[2], p[3]), (1, 1)), invert)
        xp, fp = T.nonlinear_knots(params)
        xv, yv = T.bezier_curve(params.points, 100000)
        np.testing.assert_array_equal(xp, np.sort(xv))
        np.testing.assert_array_equal(fp, yv if invert else np.sort(yv))


def test_nonlinear_knots_non_monotone_curve_falls_back_to_sort():
    params = T.NonlinearParams(((0, 0), (3, -2), (-2, 3), (1, 1)), False)
    xp, fp = T.nonlinear_knots(params, nTimes=1000)
    xv, yv = T.bezier_curve(params.points, 1000)
    assert not np.all(np.diff(xv) <= 0)  # the shortcut does not apply here
    np.testing.assert_array_equal(xp, np.sort(xv))
    np.testing.assert_array_equal(fp, np.sort(yv))


@pytest.mark.parametrize("make", [cube, ct_like])
def test_nonlinear_apply_equals_np_interp(make):
    x = make(seed=3) if make is ct_like else cube((64, 64, 32), seed=3)
    rng = np.random.default_rng(3)
    for _ in range(4):
        params = T.draw_nonlinear_params(1.0, rng=rng)
        xp, fp = T.nonlinear_knots(params)
        out = T.apply_nonlinear_transformation(x, params)
        np.testing.assert_array_equal(out, np.interp(x, xp, fp).astype(np.float32))
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1


def test_curve_certificate():
    rng = np.random.default_rng(20)
    for _ in range(200):  # drawn curves are certified (the on-demand path is the normal one)
        params = T.draw_nonlinear_params(1.0, rng=rng)
        assert K._curve_certified(np.array(params.points), params.invert)
    flat = np.array([(0, 0), (1, 0.3), (0, 0.6), (1, 1)], float)  # x' = 0 at s = 1/2
    assert not K._curve_certified(flat, True)
    assert K._curve_certified(flat[:, ::-1].copy(), True)  # only x matters when inverting
    assert not K._curve_certified(flat[:, ::-1].copy(), False)
    assert not K._curve_certified(np.array([(0, 0), (1.5, 0.5), (0.5, 0.5), (1, 1)]), True)


@pytest.mark.parametrize("invert", [False, True])
def test_nonlinear_apply_uncertified_curve_equals_np_interp(invert):
    # An (almost) flat curve takes the path that writes all knots and sorts when needed.
    params = T.NonlinearParams(((0, 0), (1 - 1e-9, 0.3), (1e-9, 0.6), (1, 1)), invert)
    assert not K._curve_certified(np.array(params.points), invert)
    x = ct_like((32, 32, 16), seed=21)
    xp, fp = T.nonlinear_knots(params)
    np.testing.assert_array_equal(
        T.apply_nonlinear_transformation(x, params), np.interp(x, xp, fp).astype(np.float32)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonlinear_on_demand_path_edge_values(dtype):
    # apply_* does not validate: NaN, infinities, values outside [0, 1], the knots' ends and
    # -0.0 still give np.interp's values; float64 cubes use the wider cache rows; a cube
    # whose distinct values pile up after the first checkpoint hands over to the passes.
    rng = np.random.default_rng(22)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.0, -0.5, 1.5, 1e-30], dtype)
    ct = ct_like((16, 16, 16), seed=22).astype(dtype).ravel()
    noisy = rng.random(40000).astype(dtype)
    for x in (np.concatenate([special, ct]), np.concatenate([ct[:3000], noisy])):
        for _ in range(3):
            params = T.draw_nonlinear_params(1.0, rng=rng)
            xp, fp = T.nonlinear_knots(params)
            out = T.apply_nonlinear_transformation(x, params)
            np.testing.assert_array_equal(out, np.interp(x, xp, fp).astype(dtype))
    # the value cache is per dtype and per call: alternate dtypes and curves on one cube
    x32 = ct_like((16, 16, 16), seed=23)
    for k in range(4):
        params = T.draw_nonlinear_params(1.0, rng=rng)
        xp, fp = T.nonlinear_knots(params)
        x = x32 if k % 2 else x32.astype(np.float64)
        np.testing.assert_array_equal(
            T.apply_nonlinear_transformation(x, params), np.interp(x, xp, fp).astype(x.dtype)
        )


# ---------------------------------------------------------------------------- local shuffle


def local_shuffle_loop(x, blocks, perms):
    """The obvious version: every block from the untouched input, later blocks win."""
    orig = x.copy()
    out = x.copy()
    for (nx, ny, nz, bx, by, bz), perm in zip(blocks, perms, strict=True):
        window = orig[0, nx : nx + bx, ny : ny + by, nz : nz + bz].ravel()
        out[0, nx : nx + bx, ny : ny + by, nz : nz + bz] = window[perm[: bx * by * bz]].reshape(
            bx, by, bz
        )
    return out


@pytest.mark.parametrize("shape", [(64, 64, 32), (23, 31, 12)])
def test_local_shuffle_equals_loop_over_same_blocks(shape):
    x = cube(shape, seed=6)
    params = T.draw_local_shuffle_params(x.shape, 1.0, rng=np.random.default_rng(6))
    assert params.n_blocks == 10000
    blocks, perms = T.local_shuffle_plan(params)
    fast = T.apply_local_pixel_shuffling(x, params)
    np.testing.assert_array_equal(fast, local_shuffle_loop(x, blocks, perms))
    assert not np.array_equal(fast, x)
    # Sources come from the untouched input, so values move (or repeat) but none is new.
    assert np.all(np.isin(fast, x))


def test_local_shuffle_block_offset_table():
    offtab, offstart = K._block_offsets(23, 31, 12)
    # block (2, 3, 1) of a (23, 31, 12) cube: rows of 1 voxel, 12 apart in y, 372 in x
    s = offstart[((2 - 1) * 3 + (3 - 1)) * 1 + 0]
    assert list(offtab[s : s + 6]) == [0, 12, 24, 372, 384, 396]
    assert offtab.size == (1 + 2) * (1 + 2 + 3) * 1


def test_local_shuffle_without_offset_table_and_strided_out(monkeypatch):
    # Very large cubes compute the block offsets per block instead of tabulating them.
    x = cube((23, 31, 12), seed=24)
    params = T.draw_local_shuffle_params(x.shape, 1.0, rng=np.random.default_rng(24))
    blocks, perms = T.local_shuffle_plan(params)
    expect = local_shuffle_loop(x, blocks, perms)
    monkeypatch.setattr(K, "_OFFSET_TABLE_MAX", 0)
    K._block_offsets.cache_clear()
    try:
        assert K._block_offsets(23, 31, 12)[0].size == 0
        np.testing.assert_array_equal(T.apply_local_pixel_shuffling(x, params), expect)
    finally:
        K._block_offsets.cache_clear()
    out = np.zeros((1, 23, 31, 24), np.float32)[..., ::2]  # a strided out
    T.apply_local_pixel_shuffling(x, params, out=out)
    np.testing.assert_array_equal(out, expect)


def test_local_shuffle_one_block_known_output():
    x = np.arange(10 * 10 * 20, dtype=np.float64).reshape(1, 10, 10, 20) / 2000
    swaps = 0
    n = 400
    for s in range(n):
        params = T.LocalShuffleParams((10, 10, 20), seed=s, n_blocks=1)
        ((nx, ny, nz, bx, by, bz),) = T.local_shuffle_plan(params)[0]
        assert (bx, by) == (1, 1) and bz in (1, 2)  # sizes randint(1, dim // 10)
        out = T.apply_local_pixel_shuffling(x, params)
        expect = x.copy()
        if not np.array_equal(out, x):
            assert bz == 2
            expect[0, nx, ny, nz : nz + 2] = x[0, nx, ny, nz : nz + 2][::-1]
            swaps += 1
        np.testing.assert_array_equal(out, expect)
    # bz = 2 half of the time, then a swap half of the time.
    assert within(swaps / n, 0.25, n)


def test_local_shuffle_block_distribution():
    params = T.LocalShuffleParams((64, 64, 32), seed=7, n_blocks=20000)
    blocks, perms = T.local_shuffle_plan(params)
    nx, ny, nz, bx, by, bz = blocks.T
    for size, hi in ((bx, 6), (by, 6), (bz, 3)):
        counts = np.bincount(size, minlength=hi + 1)[1:]
        assert size.min() == 1 and size.max() == hi
        for c in counts:
            assert within(c / len(size), 1 / hi, len(size))
    for corner, size, dim in ((nx, bx, 64), (ny, by, 64), (nz, bz, 32)):
        assert corner.min() == 0 and np.all(corner + size <= dim)
        # uniform on [0, dim - b]: mean (dim - b) / 2 for each size
        for b in np.unique(size):
            sel = corner[size == b]
            sd = math.sqrt(((dim - b + 1) ** 2 - 1) / 12 / len(sel))
            assert abs(sel.mean() - (dim - b) / 2) < 5 * sd


def test_local_shuffle_permutations_uniform():
    # R = 30: blocks are randint(1, 3) x 1 x 1, so the 3-voxel blocks have 6 permutations.
    params = T.LocalShuffleParams((30, 10, 10), seed=8, n_blocks=30000)
    blocks, perms = T.local_shuffle_plan(params)
    sel = perms[blocks[:, 3] == 3][:, :3]
    assert np.all(np.sort(sel, axis=1) == [0, 1, 2])
    keys = sel[:, 0] * 9 + sel[:, 1] * 3 + sel[:, 2]
    counts = np.unique(keys, return_counts=True)[1]
    assert len(counts) == 6
    for c in counts:
        assert within(c / len(sel), 1 / 6, len(sel))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_values_bit_test(dtype):
    # The fast check compares the floats' bits; the edges of [0, 1] decide.
    tiny = np.finfo(dtype).smallest_subnormal
    for good in ([0.0, 1.0], [-0.0, 0.5], [tiny, 1.0]):
        T.check_values(np.array(good, dtype))
    for bad, match in (
        ([np.nextafter(dtype(1), dtype(2))], "max="),
        ([-tiny], "min="),
        ([0.5, np.nan], "NaN"),
        ([np.inf], "max=inf"),
        ([-np.inf], "min=-inf"),
    ):
        with pytest.raises(ValueError, match=match):
            T.check_values(np.array(bad, dtype))
    with pytest.raises(ValueError, match="max=2"):  # strided arrays take the numpy path
        T.check_values(np.array([0.5, 0.0, 2.0], dtype)[::2])


@pytest.mark.parametrize("dtype,bits", [(np.float32, 24), (np.float64, 53)])
def test_uniform_fill_distribution(dtype, bits):
    a = np.empty(200001, dtype)
    K.uniform_fill(a, np.random.default_rng(0))
    assert a.min() >= 0 and a.max() < 1
    np.testing.assert_array_equal(a * 2.0**bits, np.floor(a * 2.0**bits))  # the grid
    counts = np.bincount((a * 16).astype(int), minlength=16)
    chi2 = ((counts - a.size / 16) ** 2 / (a.size / 16)).sum()
    assert chi2 < 45  # 15 degrees of freedom: p < 1e-4
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02  # neighbours (one 64-bit draw) independent
    b = np.full(1001, -1.0, dtype)
    K.uniform_fill(b, np.random.default_rng(0))
    np.testing.assert_array_equal(b[:1000], a[:1000])  # seeded
    assert 0 <= b[1000] < 1  # odd lengths are filled to the end
