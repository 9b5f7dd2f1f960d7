"""Tests of keras/transforms.py against SPEC.md section 2.

References are independent of the code under test: hand-computed values, plain Python loops
over the written-out parameters, np.interp, and the distributions the spec states (checked
within about 4 standard errors).
"""
import itertools
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest

import transforms as T

RATES0 = dict(flip_rate=0.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0,
              outpaint_rate=0.8, inpaint_rate=0.2, save_samples=None)


def cfg(**kw):
    d = dict(RATES0)
    d.update(kw)
    return SimpleNamespace(**d)


def cube(shape=(20, 20, 20), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).random((1,) + shape).astype(dtype)


def ct_like(shape=(64, 64, 32), seed=0):
    """Integer-HU-like values (few distinct values, smooth), as real CT cubes have."""
    rng = np.random.default_rng(seed)
    hu = np.round(np.cumsum(rng.normal(0, 40, (1,) + shape), axis=3)).clip(-1000, 1000)
    return ((hu + 1000) / 2000).astype(np.float32)


def within(p_hat, p, n, k=4.5):
    return abs(p_hat - p) <= k * math.sqrt(p * (1 - p) / n) + 1e-12


# ---------------------------------------------------------------------------- bezier_curve

def test_bezier_linear_hand_computed():
    # n = 1: B_0 = t, B_1 = 1 - t, so t = 0 gives the LAST point (the reversed index).
    xs, ys = T.bezier_curve([[0, 0], [1, 2]], nTimes=3)
    np.testing.assert_allclose(xs, [1.0, 0.5, 0.0], atol=1e-15)
    np.testing.assert_allclose(ys, [2.0, 1.0, 0.0], atol=1e-15)


def test_bezier_quadratic_midpoint_hand_computed():
    # t = 0.5: basis comb(2, i) * 0.25 = [0.25, 0.5, 0.25].
    xs, ys = T.bezier_curve([[0, 1], [2, 3], [4, 7]], nTimes=3)
    assert xs[1] == pytest.approx(0.25 * 0 + 0.5 * 2 + 0.25 * 4)
    assert ys[1] == pytest.approx(0.25 * 1 + 0.5 * 3 + 0.25 * 7)
    assert (xs[0], ys[0]) == pytest.approx((4, 7)) and (xs[2], ys[2]) == pytest.approx((0, 1))


def test_bezier_cubic_matches_formula_loop():
    pts = [[0, 0], [0.3, 0.8], [0.9, 0.1], [1, 1]]
    xs, ys = T.bezier_curve(pts, nTimes=7)
    for k, t in enumerate(np.linspace(0, 1, 7)):
        bx = sum(p[0] * math.comb(3, i) * t ** (3 - i) * (1 - t) ** i for i, p in enumerate(pts))
        by = sum(p[1] * math.comb(3, i) * t ** (3 - i) * (1 - t) ** i for i, p in enumerate(pts))
        assert xs[k] == pytest.approx(bx, abs=1e-14) and ys[k] == pytest.approx(by, abs=1e-14)
    assert T.bezier_curve(pts)[0].shape == (1000,)  # the original's default nTimes


@pytest.mark.parametrize("points,n", [([[0, 0]], 10), ([0, 1, 2], 10), ([[0, 0], [1, 1]], 1)])
def test_bezier_bad_arguments(points, n):
    with pytest.raises(ValueError, match="Expected"):
        T.bezier_curve(points, nTimes=n)


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
        np.testing.assert_array_equal(T.fast_interp(q, xp, fp),
                                      np.interp(q, xp, fp).astype(dtype))


def test_fast_interp_rejects_unsorted_knots():
    with pytest.raises(ValueError, match="non-decreasing"):
        T.fast_interp(np.zeros(3), [0.0, 1.0, 0.5], [0.0, 1.0, 2.0])


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
        assert T._curve_certified(np.array(params.points), params.invert)
    flat = np.array([(0, 0), (1, 0.3), (0, 0.6), (1, 1)], float)  # x' = 0 at s = 1/2
    assert not T._curve_certified(flat, True)
    assert T._curve_certified(flat[:, ::-1].copy(), True)  # only x matters when inverting
    assert not T._curve_certified(flat[:, ::-1].copy(), False)
    assert not T._curve_certified(np.array([(0, 0), (1.5, 0.5), (0.5, 0.5), (1, 1)]), True)


@pytest.mark.parametrize("invert", [False, True])
def test_nonlinear_apply_uncertified_curve_equals_np_interp(invert):
    # An (almost) flat curve takes the path that writes all knots and sorts when needed.
    params = T.NonlinearParams(((0, 0), (1 - 1e-9, 0.3), (1e-9, 0.6), (1, 1)), invert)
    assert not T._curve_certified(np.array(params.points), invert)
    x = ct_like((32, 32, 16), seed=21)
    xp, fp = T.nonlinear_knots(params)
    np.testing.assert_array_equal(T.apply_nonlinear_transformation(x, params),
                                  np.interp(x, xp, fp).astype(np.float32))


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
        np.testing.assert_array_equal(T.apply_nonlinear_transformation(x, params),
                                      np.interp(x, xp, fp).astype(x.dtype))


def test_nonlinear_inverts_half_of_the_time():
    rng = np.random.default_rng(4)
    x = np.linspace(0, 1, 1000, dtype=np.float32).reshape(1, 10, 10, 10)
    inv = 0
    n = 400
    for _ in range(n):
        y = T.nonlinear_transformation(x, prob=1.0, rng=rng).ravel()
        d = np.diff(y)
        assert np.all(d <= 1e-7) or np.all(d >= -1e-7)  # monotone mapping
        inv += y[0] > y[-1]
    assert within(inv / n, 0.5, n)


def test_nonlinear_draw_order_and_skip():
    params = T.draw_nonlinear_params(1.0, rng=np.random.default_rng(5))
    r = np.random.default_rng(5)
    r.random()  # the prob draw
    p = r.random(4)
    assert params.points == ((0, 0), (p[0], p[1]), (p[2], p[3]), (1, 1))
    assert params.invert == (r.random() < 0.5)
    x = cube()
    np.testing.assert_array_equal(T.nonlinear_transformation(x, prob=0.0), x)


# ---------------------------------------------------------------------------- local shuffle

def local_shuffle_loop(x, blocks, perms):
    """The obvious version: every block from the untouched input, later blocks win."""
    orig = x.copy()
    out = x.copy()
    for (nx, ny, nz, bx, by, bz), perm in zip(blocks, perms):
        window = orig[0, nx:nx + bx, ny:ny + by, nz:nz + bz].ravel()
        out[0, nx:nx + bx, ny:ny + by, nz:nz + bz] = window[perm[:bx * by * bz]].reshape(
            bx, by, bz)
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
    offtab, offstart = T._block_offsets(23, 31, 12)
    # block (2, 3, 1) of a (23, 31, 12) cube: rows of 1 voxel, 12 apart in y, 372 in x
    s = offstart[((2 - 1) * 3 + (3 - 1)) * 1 + 0]
    assert list(offtab[s:s + 6]) == [0, 12, 24, 372, 384, 396]
    assert offtab.size == (1 + 2) * (1 + 2 + 3) * 1


def test_local_shuffle_without_offset_table_and_strided_out(monkeypatch):
    # Very large cubes compute the block offsets per block instead of tabulating them.
    x = cube((23, 31, 12), seed=24)
    params = T.draw_local_shuffle_params(x.shape, 1.0, rng=np.random.default_rng(24))
    blocks, perms = T.local_shuffle_plan(params)
    expect = local_shuffle_loop(x, blocks, perms)
    monkeypatch.setattr(T, "_OFFSET_TABLE_MAX", 0)
    T._block_offsets.cache_clear()
    try:
        assert T._block_offsets(23, 31, 12)[0].size == 0
        np.testing.assert_array_equal(T.apply_local_pixel_shuffling(x, params), expect)
    finally:
        T._block_offsets.cache_clear()
    out = np.zeros((1, 23, 31, 24), np.float32)[..., ::2]  # a strided out
    T.apply_local_pixel_shuffling(x, params, out=out)
    np.testing.assert_array_equal(out, expect)


def test_local_shuffle_one_block_known_output():
    x = np.arange(10 * 10 * 20, dtype=np.float64).reshape(1, 10, 10, 20) / 2000
    swaps = 0
    n = 400
    for s in range(n):
        params = T.LocalShuffleParams((10, 10, 20), seed=s, n_blocks=1)
        (nx, ny, nz, bx, by, bz), = T.local_shuffle_plan(params)[0]
        assert (bx, by) == (1, 1) and bz in (1, 2)  # sizes randint(1, dim // 10)
        out = T.apply_local_pixel_shuffling(x, params)
        expect = x.copy()
        if not np.array_equal(out, x):
            assert bz == 2
            expect[0, nx, ny, nz:nz + 2] = x[0, nx, ny, nz:nz + 2][::-1]
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


def test_local_shuffle_prob_and_errors():
    x = cube()
    rng = np.random.default_rng(9)
    n = 400
    changed = sum(not np.array_equal(T.local_pixel_shuffling(x, 0.3, rng=rng), x)
                  for _ in range(n))
    assert within(changed / n, 0.3, n)
    np.testing.assert_array_equal(T.local_pixel_shuffling(x, prob=0.0), x)
    with pytest.raises(ValueError, match=r"dimension >= 10.*\(9, 20, 20\)"):
        T.local_pixel_shuffling(cube((9, 20, 20)), 1.0)
    small = cube((9, 20, 20))  # fine while it is not shuffled, as in the original
    np.testing.assert_array_equal(T.local_pixel_shuffling(small, 0.0), small)
    with pytest.raises(ValueError, match="separate"):
        T.apply_local_pixel_shuffling(x, T.LocalShuffleParams((20, 20, 20), 1), out=x)


# ---------------------------------------------------------------------------- flip

def test_flip_count_and_axis_distribution():
    rng = np.random.default_rng(10)
    n = 4000
    draws = [T.draw_flip_params(0.4, rng=rng) for _ in range(n)]
    counts = np.bincount([len(a) for a in draws], minlength=4)
    expect = [0.6, 0.4 * 0.6, 0.16 * 0.6, 0.4 ** 3]
    for c, p in zip(counts, expect):
        assert within(c / n, p, n)
    axes = np.concatenate([a for a in draws if a])
    for a in (0, 1, 2):  # axis 0 is the channel (a no-op): the original's quirk, kept
        assert within(np.mean(axes == a), 1 / 3, len(axes))


def test_data_augmentation_flips_x_and_y_together():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4) / 24
    y = x[:, ::-1].copy()
    seen = set()
    rng = np.random.default_rng(11)
    for _ in range(200):
        fx, fy = T.data_augmentation(x, y, prob=0.9, rng=rng)
        matched = [ax for ax in itertools.product([0, 1], repeat=2)
                   if np.array_equal(fx, T.apply_flip(x, [a + 1 for a, f in zip((0, 1), ax) if f]))]
        assert len(matched) == 1
        flips = [a + 1 for a, f in zip((0, 1), matched[0]) if f]
        np.testing.assert_array_equal(fy, T.apply_flip(y, flips))  # same flips on y
        seen.add(matched[0])
    assert len(seen) == 4  # rows and columns each flipped or not
    np.testing.assert_array_equal(T.apply_flip(x, (0,)), x)  # the channel flip does nothing
    np.testing.assert_array_equal(T.apply_flip(x, (2,))[0, :, 0], x[0, :, 2])
    fx, fy = T.data_augmentation(x, y, prob=0.0)
    assert fx is x and fy is y


# ---------------------------------------------------------------------------- painting

def test_in_painting_blocks_and_noise():
    rng = np.random.default_rng(12)
    n = 3000
    counts = np.zeros(6, int)
    for _ in range(n):
        p = T.draw_in_painting_params((64, 64, 32), rng=rng)
        counts[len(p.blocks)] += 1
        for (nx, ny, nz, bx, by, bz), noise in zip(p.blocks, p.noise):
            assert 10 <= bx <= 21 and 10 <= by <= 21 and 5 <= bz <= 10
            assert 3 <= nx <= 64 - bx - 3 and 3 <= ny <= 64 - by - 3 and 3 <= nz <= 32 - bz - 3
            assert noise.shape == (bx, by, bz) and noise.dtype == np.float32
    expect = [0.95 ** k * 0.05 for k in range(5)] + [0.95 ** 5]
    for c, p in zip(counts, expect):
        assert within(c / n, p, n)


def test_in_painting_is_in_place_and_only_touches_blocks():
    x = ct_like((64, 64, 32), seed=13)
    orig = x.copy()
    p = T.draw_in_painting_params(x.shape, rng=np.random.default_rng(13))
    assert len(p.blocks) > 0
    out = T.apply_in_painting(x, p)
    assert out is x
    mask = np.zeros(x.shape, bool)
    for nx, ny, nz, bx, by, bz in p.blocks:
        mask[0, nx:nx + bx, ny:ny + by, nz:nz + bz] = True
    np.testing.assert_array_equal(x[~mask], orig[~mask])
    nx, ny, nz, bx, by, bz = p.blocks[-1]
    np.testing.assert_array_equal(x[0, nx:nx + bx, ny:ny + by, nz:nz + bz], p.noise[-1])
    assert x.min() >= 0 and x.max() < 1


def test_out_painting_blocks_noise_and_not_in_place():
    rng = np.random.default_rng(14)
    n = 3000
    counts = np.zeros(6, int)
    for _ in range(n):
        p = T.draw_out_painting_params((64, 64, 32), rng=rng)
        counts[len(p.blocks)] += 1
        for nx, ny, nz, bx, by, bz in p.blocks:
            # size dim - randint(3 dim // 7, 4 dim // 7): 64 -> 64 - [27, 36]; 32 -> 32 - [13, 18]
            assert 28 <= bx <= 37 and 28 <= by <= 37 and 14 <= bz <= 19
            assert 3 <= nx <= 64 - bx - 3 and 3 <= nz <= 32 - bz - 3
    expect = [0.0] + [0.95 ** k * 0.05 for k in range(4)] + [0.95 ** 4]
    for c, p in zip(counts[1:], expect[1:]):
        assert within(c / n, p, n)
    assert counts[0] == 0
    x = ct_like((64, 64, 32), seed=14)
    orig = x.copy()
    p = T.draw_out_painting_params(x.shape, rng=rng)
    out = T.apply_out_painting(x, p)
    np.testing.assert_array_equal(x, orig)
    mask = np.zeros(x.shape, bool)
    for nx, ny, nz, bx, by, bz in p.blocks:
        mask[0, nx:nx + bx, ny:ny + by, nz:nz + bz] = True
    np.testing.assert_array_equal(out[mask], x[mask])
    np.testing.assert_array_equal(out[~mask], p.noise[None][~mask])


@pytest.mark.parametrize("fn", [T.image_in_painting, T.image_out_painting])
def test_painting_seeded_and_small_cube_error(fn):
    x = cube((16, 16, 16))
    a = fn(x.copy(), rng=np.random.default_rng(1))
    b = fn(x.copy(), rng=np.random.default_rng(1))
    c = fn(x.copy(), rng=np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="Expected a cube large enough"):
        for s in range(50):  # every draw reaches a block on a 5-voxel depth
            fn(cube((16, 16, 5)), rng=np.random.default_rng(s))


# ---------------------------------------------------------------------------- changed voxels

def axis_cover(L, sizes, corners):
    """One axis of a block drawn as SPEC 2 says (size uniform on `sizes`, corner uniform on
    corners(b)): q[v] = P(the block covers v), r[v] = E[1{covers v} / size]."""
    q, r = np.zeros(L), np.zeros(L)
    for b in sizes:
        lo, hi = corners(b)
        cov = np.zeros(L)
        for c in range(lo, hi + 1):
            cov[c:c + b] += 1
        cov /= (hi - lo + 1) * len(sizes)
        q += cov
        r += cov / b
    return q, r


def outer3(a, b, c):
    return a[:, None, None] * b[None, :, None] * c[None, None, :]


def block_counts(most, first):
    """P(k blocks): `first` blocks, then up to `most` more while random() < 0.95."""
    p = [0.95 ** k * 0.05 for k in range(most)] + [0.95 ** most]
    return {k + first: pk for k, pk in enumerate(p)}


def expected_changed(name, shape):
    """Expected fraction of voxels whose value changes, for a cube of distinct values,
    computed exactly from SPEC 2's ranges (axes and blocks are drawn independently)."""
    if name == "inpaint":  # covered by at least one noise block
        q = outer3(*[axis_cover(L, range(L // 6, L // 3 + 1), lambda b, L=L: (3, L - b - 3))[0]
                     for L in shape])
        return float(np.mean(sum(p * (1 - (1 - q) ** k)
                                 for k, p in block_counts(5, 0).items())))
    if name == "outpaint":  # covered by no restored block
        q = outer3(*[axis_cover(L, [L - u for u in range(3 * L // 7, 4 * L // 7 + 1)],
                                lambda b, L=L: (3, L - b - 3))[0] for L in shape])
        return float(np.mean(sum(p * (1 - q) ** k for k, p in block_counts(4, 1).items())))
    # local shuffle: covered by a block, and the last block covering the voxel (a block
    # conditioned on covering it) does not map it to itself (probability 1 / block voxels)
    qr = [axis_cover(L, range(1, L // 10 + 1), lambda b, L=L: (0, L - b)) for L in shape]
    q, r = outer3(*[a for a, _ in qr]), outer3(*[b for _, b in qr])
    return float(np.mean((1 - (1 - q) ** T.LOCAL_SHUFFLE_BLOCKS) * (1 - r / q)))


# The fractions the README and the docstrings state for 64x64x32 cubes.
DOCUMENTED_CHANGED_64 = {"local": 0.785, "inpaint": 0.055, "outpaint": 0.682}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_CHANGED_64))
def test_documented_changed_fractions(name):
    assert expected_changed(name, (64, 64, 32)) == pytest.approx(DOCUMENTED_CHANGED_64[name],
                                                                 abs=5e-4)


@pytest.mark.parametrize("name,draws", [("local", 60), ("inpaint", 400), ("outpaint", 400)])
def test_changed_voxel_fraction_within_sampling_error(name, draws):
    shape = (32, 32, 16)
    size = int(np.prod(shape))
    x = (np.random.default_rng(30).permutation(size).reshape((1,) + shape) / size)
    x = x.astype(np.float32)  # distinct values: a moved voxel is a changed voxel
    rng = np.random.default_rng(31)
    fn = {"local": lambda: T.local_pixel_shuffling(x, 1.0, rng=rng),
          "inpaint": lambda: T.image_in_painting(x.copy(), rng=rng),
          "outpaint": lambda: T.image_out_painting(x, rng=rng)}[name]
    frac = np.array([np.mean(fn() != x) for _ in range(draws)])
    se = frac.std(ddof=1) / math.sqrt(draws)
    assert abs(frac.mean() - expected_changed(name, shape)) <= 4.5 * se


# ---------------------------------------------------------------------------- every transform

ALL = {
    "flip": lambda x, r: T.data_augmentation(x, x.copy(), 0.9, rng=r)[0],
    "local": lambda x, r: T.local_pixel_shuffling(x, 1.0, rng=r),
    "nonlinear": lambda x, r: T.nonlinear_transformation(x, 1.0, rng=r),
    "inpaint": lambda x, r: T.image_in_painting(x.copy(), rng=r),
    "outpaint": lambda x, r: T.image_out_painting(x, rng=r),
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_dtype_range_and_seeding(name, dtype):
    fn = ALL[name]
    x = cube((24, 24, 20), seed=15, dtype=dtype)
    a = fn(x, np.random.default_rng(3))
    assert a.shape == x.shape and a.dtype == dtype
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, fn(x, np.random.default_rng(3)))
    outs = [fn(x, np.random.default_rng(s)) for s in range(4, 9)]
    assert any(not np.array_equal(a, o) for o in outs)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((20, 20, 20), np.float32), r"shape \(1, R, C, D\)"),
    (np.zeros((2, 20, 20, 20), np.float32), r"shape \(1, R, C, D\)"),
    (np.zeros((1, 20, 20, 20), np.int16), "float32 or float64"),
    (np.full((1, 20, 20, 20), 1.5, np.float32), "max=1.5"),
    (np.full((1, 20, 20, 20), np.nan, np.float32), "NaN"),
])
@pytest.mark.parametrize("name", ["local", "nonlinear", "inpaint", "outpaint"])
def test_bad_cubes_raise(name, bad, match):
    with pytest.raises(ValueError, match=match):
        ALL[name](bad, np.random.default_rng(0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_values_bit_test(dtype):
    # The fast check compares the floats' bits; the edges of [0, 1] decide.
    tiny = np.finfo(dtype).smallest_subnormal
    for good in ([0.0, 1.0], [-0.0, 0.5], [tiny, 1.0]):
        T.check_values(np.array(good, dtype))
    for bad, match in (([np.nextafter(dtype(1), dtype(2))], "max="), ([-tiny], "min="),
                       ([0.5, np.nan], "NaN"), ([np.inf], "max=inf"), ([-np.inf], "min=-inf")):
        with pytest.raises(ValueError, match=match):
            T.check_values(np.array(bad, dtype))
    with pytest.raises(ValueError, match="max=2"):  # strided arrays take the numpy path
        T.check_values(np.array([0.5, 0.0, 2.0], dtype)[::2])


@pytest.mark.parametrize("name", sorted(ALL))
def test_rng_keyword_none_and_bad_type(name):
    x = cube((24, 24, 20), seed=16)
    outs = [ALL[name](x, None) for _ in range(20)]  # None: fresh, unseeded generators
    assert all(o.shape == x.shape for o in outs)
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])  # (flips: 4 outcomes)
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator or None.*rng=0"):
        ALL[name](x, 0)
    with pytest.raises(TypeError, match="RandomState"):
        ALL[name](x, np.random.RandomState(0))


def test_generate_pair_rng_keyword():
    img = np.stack([cube((20, 20, 20), seed=s) for s in range(3)])
    with pytest.raises(TypeError, match="rng=7"):
        next(T.generate_pair(img, 2, cfg(), rng=7))
    x, y = next(T.generate_pair(img, 2, cfg(), "test", rng=None))
    assert x.shape == (2, 1, 20, 20, 20)


def test_data_augmentation_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape.*x\.shape=\(1, 20, 20, 20\), "
                                         r"y\.shape=\(1, 20, 20, 21\)"):
        T.data_augmentation(cube(), cube((20, 20, 21)), 0.5)


@pytest.mark.parametrize("prob", [-0.1, 1.5, float("nan"), "a"])
def test_bad_prob_raises(prob):
    x = cube()
    for fn in (T.local_pixel_shuffling, T.nonlinear_transformation):
        with pytest.raises(ValueError, match="Expected prob"):
            fn(x, prob)
    with pytest.raises(ValueError, match="Expected prob"):
        T.data_augmentation(x, x, prob)


# ---------------------------------------------------------------------------- generate_pair

def flips_of(c):
    return [T.apply_flip(c, ax) for ax in ((), (1,), (2,), (1, 2))]


def test_generate_pair_targets_inputs_and_identity():
    img = np.stack([cube((20, 20, 20), seed=s) for s in range(8)])
    gen = T.generate_pair(img, 3, cfg(flip_rate=0.8), rng=np.random.default_rng(0))
    for _ in range(5):
        x, y = next(gen)
        assert x.shape == y.shape == (3, 1, 20, 20, 20) and x.dtype == np.float32
        np.testing.assert_array_equal(x, y)  # only flips: the input is the flipped target
        ids = []
        for n in range(3):
            hits = [k for k in range(8) if any(np.array_equal(y[n], f) for f in flips_of(img[k]))]
            assert len(hits) == 1
            ids.append(hits[0])
        assert len(set(ids)) == 3  # distinct cubes


@pytest.mark.parametrize("rate_name", ["local_rate", "nonlinear_rate", "paint_rate"])
def test_generate_pair_rates(rate_name):
    img = np.stack([cube((20, 20, 20), seed=s) for s in range(6)])
    gen = T.generate_pair(img, 6, cfg(**{rate_name: 0.3}), rng=np.random.default_rng(1))
    changed = []
    for _ in range(70):
        x, y = next(gen)
        changed += [not np.array_equal(x[n], y[n]) for n in range(6)]
    assert within(np.mean(changed), 0.3, len(changed))


def test_generate_pair_inpaint_vs_outpaint_rate():
    img = np.stack([ct_like((24, 24, 24), seed=s) for s in range(6)])
    gen = T.generate_pair(img, 6, cfg(paint_rate=1.0, inpaint_rate=0.2),
                          rng=np.random.default_rng(2))
    outpainted = []
    for _ in range(60):
        x, y = next(gen)
        # out-painting replaces the border (3 voxels at least) with noise; in-painting never does
        outpainted += [not np.array_equal(x[n, 0, 0], y[n, 0, 0]) for n in range(6)]
    assert within(np.mean(outpainted), 0.8, len(outpainted))


def test_generate_pair_seeded_and_full_rates():
    img = np.stack([ct_like((24, 24, 20), seed=s) for s in range(5)])
    conf = SimpleNamespace(save_samples=None)  # the original's rates by default
    a = [next(T.generate_pair(img, 2, conf, rng=np.random.default_rng(4))) for _ in range(1)]
    g1 = T.generate_pair(img, 2, conf, rng=np.random.default_rng(4))
    g2 = T.generate_pair(img, 2, conf, rng=np.random.default_rng(5))
    b1, b2 = next(g1), next(g2)
    np.testing.assert_array_equal(a[0][0], b1[0])
    assert not np.array_equal(b1[0], b2[0])
    for _ in range(5):
        x, y = next(g1)
        assert x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize("inpaint_rate", [0.0, 0.5, 1.0])
def test_generate_pair_order_of_operations(inpaint_rate):
    """generate_pair equals the public transforms chained in SPEC 2's order (flip, local
    shuffle, non-linear, then in- or out-painting) on the same random stream."""
    img = np.stack([ct_like((24, 24, 20), seed=s) for s in range(5)])
    conf = cfg(flip_rate=0.9, local_rate=0.7, nonlinear_rate=0.7, paint_rate=0.8,
               inpaint_rate=inpaint_rate)
    gen = T.generate_pair(img, 3, conf, rng=np.random.default_rng(40))
    rng = np.random.default_rng(40)
    for _ in range(4):
        index = rng.choice(5, 3, replace=False)
        ys, xs = [], []
        for i in index:
            x, y = T.data_augmentation(img[i].copy(), img[i].copy(), 0.9, rng=rng)
            x = T.local_pixel_shuffling(x, 0.7, rng=rng)
            x = T.nonlinear_transformation(x, 0.7, rng=rng)
            if rng.random() < 0.8:
                if rng.random() < inpaint_rate:
                    x = T.image_in_painting(x.copy(), rng=rng)
                else:
                    x = T.image_out_painting(x, rng=rng)
            xs.append(x)
            ys.append(y)
        gx, gy = next(gen)
        np.testing.assert_array_equal(gy, np.stack(ys))
        np.testing.assert_array_equal(gx, np.stack(xs))


def test_generate_pair_float64_kept():
    img = np.stack([cube((20, 20, 20), seed=s, dtype=np.float64) for s in range(3)])
    x, y = next(T.generate_pair(img, 2, SimpleNamespace(save_samples=None),
                                rng=np.random.default_rng(0)))
    assert x.dtype == y.dtype == np.float64


@pytest.mark.parametrize("img,bs,conf,match", [
    (np.zeros((4, 20, 20, 20), np.float32), 2, cfg(), r"\(N, 1, R, C, D\)"),
    (np.zeros((4, 2, 20, 20, 20), np.float32), 2, cfg(), r"\(N, 1, R, C, D\)"),
    (np.zeros((2, 1, 20, 20, 20), np.float32), 3, cfg(), "at least batch_size=3"),
    (np.zeros((4, 1, 20, 20, 20), np.float32), 0, cfg(), "positive integer"),
    (np.full((4, 1, 20, 20, 20), -0.5, np.float32), 2, cfg(), "min=-0.5"),
    (np.full((4, 1, 20, 20, 20), np.nan, np.float32), 2, cfg(), "NaN"),
    (np.zeros((4, 1, 20, 20, 20), np.float32), 2, cfg(flip_rate=1.2), "config.flip_rate"),
    (np.zeros((4, 1, 20, 20, 20), np.float32), 2, cfg(inpaint_rate=-1), "config.inpaint_rate"),
])
def test_generate_pair_bad_input(img, bs, conf, match):
    with pytest.raises(ValueError, match=match):
        next(T.generate_pair(img, bs, conf))


def test_generate_pair_bad_cube_later_in_array():
    img = np.zeros((3, 1, 20, 20, 20), np.float32)
    img[2, 0, 1, 2, 3] = 2.0
    gen = T.generate_pair(img, 3, cfg())
    with pytest.raises(ValueError, match="max=2"):
        next(gen)


def test_sample_png_written_atomically(tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(T, "SAMPLE_PNG_PROB", 1.0)
    img = np.stack([ct_like((24, 20, 12), seed=s) for s in range(4)])
    conf = cfg(save_samples="png", exp_name="exp", sample_path=str(tmp_path / "samples"),
               nonlinear_rate=1.0)
    x, y = next(T.generate_pair(img, 2, conf, status="train", rng=np.random.default_rng(0)))
    files = os.listdir(tmp_path / "samples" / "exp")
    assert len(files) == 1 and files[0].endswith(".png") and len(files[0]) == 14
    pic = np.asarray(Image.open(tmp_path / "samples" / "exp" / files[0]))
    assert pic.shape == (4 * 24, 2 * 20)
    # one of the two pairs: rows are depth slices 4, 6, 8, 10 (k * 12 // 6), input | target
    n = [k for k in range(2) if np.array_equal(pic, T.pair_sample_image(x[k], y[k]))]
    assert len(n) == 1
    assert np.array_equal(pic[24:48, 20:], np.rint(y[n[0], 0, :, :, 6] * 255).astype(np.uint8))
    # status "test", or save_samples unset: no pictures
    next(T.generate_pair(img, 2, conf, status="test"))
    next(T.generate_pair(img, 2, cfg(save_samples=None, sample_path=str(tmp_path / "s2")),
                         status="train"))
    assert len(os.listdir(tmp_path / "samples" / "exp")) == 1
    assert not (tmp_path / "s2").exists()


def test_sample_png_about_one_batch_in_100(tmp_path):
    conf = cfg(save_samples="png", exp_name="e", sample_path=str(tmp_path))
    rng = np.random.default_rng(5)
    x = np.zeros((2, 1, 12, 12, 12), np.float32)
    n = 3000
    written = sum(T.maybe_save_sample(x, x, conf, "train", rng) is not None for _ in range(n))
    assert within(written / n, 0.01, n)


# ---------------------------------------------------------------------------- CLI

def test_preview_cli(tmp_path, capsys):
    from PIL import Image
    cubes = np.stack([ct_like((32, 32, 16), seed=s)[0] for s in range(4)])
    np.save(tmp_path / "c.npy", cubes)
    out = tmp_path / "p.png"
    assert T.main(["--cubes", str(tmp_path / "c.npy"), "--out", str(out), "--n", "2"]) == 0
    im = Image.open(out)
    assert im.size == (6 * 34 * 2, 2 * 34 * 2 + 14)
    assert T.main(["--cubes", str(tmp_path / "missing.npy"), "--out", str(out)]) == 2
    assert "Expected a .npy file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["--help"])
    assert "example: python keras/transforms.py --cubes" in capsys.readouterr().out


def test_real_ct_cubes_through_pipeline(chest_ct_path):
    import SimpleITK as sitk
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(chest_ct_path))).transpose(2, 1, 0)
    vol = (np.clip(vol, -1000, 1000).astype(np.float64) + 1000) / 2000
    img = np.stack([vol[200:264, 200:264, 50:82], vol[250:314, 150:214, 60:92]])[:, None]
    img = img.astype(np.float32)
    gen = T.generate_pair(img, 2, SimpleNamespace(save_samples=None),
                          rng=np.random.default_rng(0))
    for _ in range(3):
        x, y = next(gen)
        assert x.min() >= 0 and x.max() <= 1
    params = T.draw_nonlinear_params(1.0, rng=np.random.default_rng(1))
    xp, fp = T.nonlinear_knots(params)
    np.testing.assert_array_equal(T.apply_nonlinear_transformation(img[0], params),
                                  np.interp(img[0], xp, fp).astype(np.float32))


@pytest.mark.parametrize("dtype,bits", [(np.float32, 24), (np.float64, 53)])
def test_uniform_fill_distribution(dtype, bits):
    a = np.empty(200001, dtype)
    T.uniform_fill(a, np.random.default_rng(0))
    assert a.min() >= 0 and a.max() < 1
    np.testing.assert_array_equal(a * 2.0 ** bits, np.floor(a * 2.0 ** bits))  # the grid
    counts = np.bincount((a * 16).astype(int), minlength=16)
    chi2 = ((counts - a.size / 16) ** 2 / (a.size / 16)).sum()
    assert chi2 < 45  # 15 degrees of freedom: p < 1e-4
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02  # neighbours (one 64-bit draw) independent
    b = np.full(1001, -1.0, dtype)
    T.uniform_fill(b, np.random.default_rng(0))
    np.testing.assert_array_equal(b[:1000], a[:1000])  # seeded
    assert 0 <= b[1000] < 1  # odd lengths are filled to the end
