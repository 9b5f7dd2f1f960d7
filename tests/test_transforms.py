"""Tests of keras/transforms.py: the Models Genesis transforms, one by one.

Against docs/transforms.md and the paper (Zhou et al., "Models Genesis", MedIA 2021). References
are independent of the code under test: hand-computed values, plain Python loops over the
written-out parameters, and the distributions the method states (checked within about 4.5
standard errors). The training pairs are tested in test_transforms_pairs.py, the kernels'
exactness in test_genesis_kernels.py.
"""

import itertools
import math

import numpy as np
import pytest

import genesis_kernels as K
import transforms as T
from transform_helpers import ct_like, cube, within

# ---------------------------------------------------------------------------- public API


def test_public_api():
    for mod in (T, K):
        assert all(hasattr(mod, name) for name in mod.__all__)
        assert not [name for name in mod.__all__ if name.startswith("_")]
    # the kernels' public helpers stay importable from transforms, as before the split
    assert T.fast_interp is K.fast_interp and T.uniform_fill is K.uniform_fill
    assert T.RATE_NAMES == (
        "flip_rate",
        "local_rate",
        "nonlinear_rate",
        "paint_rate",
        "outpaint_rate",
        "inpaint_rate",
    )


def test_config_defaults_agree_with_the_config_dataclass():
    # The same defaults live in config.py (stdlib-only, so it cannot import transforms).
    from config import models_genesis_config

    conf = models_genesis_config()
    assert {name: getattr(conf, name) for name in T.CONFIG_DEFAULTS} == T.CONFIG_DEFAULTS


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


# ---------------------------------------------------------------------------- non-linear


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


def test_local_shuffle_prob_and_errors():
    x = cube()
    rng = np.random.default_rng(9)
    n = 400
    changed = sum(not np.array_equal(T.local_pixel_shuffling(x, 0.3, rng=rng), x) for _ in range(n))
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
    expect = [0.6, 0.4 * 0.6, 0.16 * 0.6, 0.4**3]
    for c, p in zip(counts, expect, strict=True):
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
        matched = [
            ax
            for ax in itertools.product([0, 1], repeat=2)
            if np.array_equal(
                fx, T.apply_flip(x, [a + 1 for a, f in zip((0, 1), ax, strict=True) if f])
            )
        ]
        assert len(matched) == 1
        flips = [a + 1 for a, f in zip((0, 1), matched[0], strict=True) if f]
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
        for (nx, ny, nz, bx, by, bz), noise in zip(p.blocks, p.noise, strict=True):
            assert 10 <= bx <= 21 and 10 <= by <= 21 and 5 <= bz <= 10
            assert 3 <= nx <= 64 - bx - 3 and 3 <= ny <= 64 - by - 3 and 3 <= nz <= 32 - bz - 3
            assert noise.shape == (bx, by, bz) and noise.dtype == np.float32
    expect = [0.95**k * 0.05 for k in range(5)] + [0.95**5]
    for c, p in zip(counts, expect, strict=True):
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
        mask[0, nx : nx + bx, ny : ny + by, nz : nz + bz] = True
    np.testing.assert_array_equal(x[~mask], orig[~mask])
    nx, ny, nz, bx, by, bz = p.blocks[-1]
    np.testing.assert_array_equal(x[0, nx : nx + bx, ny : ny + by, nz : nz + bz], p.noise[-1])
    assert x.min() >= 0 and x.max() < 1


def test_out_painting_blocks_noise_and_not_in_place():
    rng = np.random.default_rng(14)
    n = 3000
    counts = np.zeros(6, int)
    for _ in range(n):
        p = T.draw_out_painting_params((64, 64, 32), rng=rng)
        counts[len(p.blocks)] += 1
        for nx, _ny, nz, bx, by, bz in p.blocks:
            # size dim - randint(3 dim // 7, 4 dim // 7): 64 -> 64 - [27, 36]; 32 -> 32 - [13, 18]
            assert 28 <= bx <= 37 and 28 <= by <= 37 and 14 <= bz <= 19
            assert 3 <= nx <= 64 - bx - 3 and 3 <= nz <= 32 - bz - 3
    expect = [0.0] + [0.95**k * 0.05 for k in range(4)] + [0.95**4]
    for c, p in zip(counts[1:], expect[1:], strict=True):
        assert within(c / n, p, n)
    assert counts[0] == 0
    x = ct_like((64, 64, 32), seed=14)
    orig = x.copy()
    p = T.draw_out_painting_params(x.shape, rng=rng)
    out = T.apply_out_painting(x, p)
    np.testing.assert_array_equal(x, orig)
    mask = np.zeros(x.shape, bool)
    for nx, ny, nz, bx, by, bz in p.blocks:
        mask[0, nx : nx + bx, ny : ny + by, nz : nz + bz] = True
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
    """One axis of a block drawn as docs/transforms.md says (size uniform on `sizes`, corner on
    corners(b)): q[v] = P(the block covers v), r[v] = E[1{covers v} / size]."""
    q, r = np.zeros(L), np.zeros(L)
    for b in sizes:
        lo, hi = corners(b)
        cov = np.zeros(L)
        for c in range(lo, hi + 1):
            cov[c : c + b] += 1
        cov /= (hi - lo + 1) * len(sizes)
        q += cov
        r += cov / b
    return q, r


def outer3(a, b, c):
    return a[:, None, None] * b[None, :, None] * c[None, None, :]


def block_counts(most, first):
    """P(k blocks): `first` blocks, then up to `most` more while random() < 0.95."""
    p = [0.95**k * 0.05 for k in range(most)] + [0.95**most]
    return {k + first: pk for k, pk in enumerate(p)}


def expected_changed(name, shape):
    """Expected fraction of voxels whose value changes, for a cube of distinct values,
    computed exactly from the drawn ranges (axes and blocks are drawn independently)."""
    if name == "inpaint":  # covered by at least one noise block
        q = outer3(
            *[
                axis_cover(L, range(L // 6, L // 3 + 1), lambda b, L=L: (3, L - b - 3))[0]
                for L in shape
            ]
        )
        return float(np.mean(sum(p * (1 - (1 - q) ** k) for k, p in block_counts(5, 0).items())))
    if name == "outpaint":  # covered by no restored block
        q = outer3(
            *[
                axis_cover(
                    L,
                    [L - u for u in range(3 * L // 7, 4 * L // 7 + 1)],
                    lambda b, L=L: (3, L - b - 3),
                )[0]
                for L in shape
            ]
        )
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
    assert expected_changed(name, (64, 64, 32)) == pytest.approx(
        DOCUMENTED_CHANGED_64[name], abs=5e-4
    )


@pytest.mark.parametrize("name,draws", [("local", 60), ("inpaint", 400), ("outpaint", 400)])
def test_changed_voxel_fraction_within_sampling_error(name, draws):
    shape = (32, 32, 16)
    size = int(np.prod(shape))
    x = np.random.default_rng(30).permutation(size).reshape((1,) + shape) / size
    x = x.astype(np.float32)  # distinct values: a moved voxel is a changed voxel
    rng = np.random.default_rng(31)
    fn = {
        "local": lambda: T.local_pixel_shuffling(x, 1.0, rng=rng),
        "inpaint": lambda: T.image_in_painting(x.copy(), rng=rng),
        "outpaint": lambda: T.image_out_painting(x, rng=rng),
    }[name]
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


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((20, 20, 20), np.float32), r"shape \(1, R, C, D\)"),
        (np.zeros((2, 20, 20, 20), np.float32), r"shape \(1, R, C, D\)"),
        (np.zeros((1, 20, 20, 20), np.int16), "float32 or float64"),
        (np.full((1, 20, 20, 20), 1.5, np.float32), "max=1.5"),
        (np.full((1, 20, 20, 20), np.nan, np.float32), "NaN"),
    ],
)
@pytest.mark.parametrize("name", ["local", "nonlinear", "inpaint", "outpaint"])
def test_bad_cubes_raise(name, bad, match):
    with pytest.raises(ValueError, match=match):
        ALL[name](bad, np.random.default_rng(0))


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


def test_data_augmentation_shape_mismatch():
    with pytest.raises(
        ValueError,
        match=r"same shape.*x\.shape=\(1, 20, 20, 20\), "
        r"y\.shape=\(1, 20, 20, 21\)",
    ):
        T.data_augmentation(cube(), cube((20, 20, 21)), 0.5)


@pytest.mark.parametrize("prob", [-0.1, 1.5, float("nan"), "a"])
def test_bad_prob_raises(prob):
    x = cube()
    for fn in (T.local_pixel_shuffling, T.nonlinear_transformation):
        with pytest.raises(ValueError, match="Expected prob"):
            fn(x, prob)
    with pytest.raises(ValueError, match="Expected prob"):
        T.data_augmentation(x, x, prob)
