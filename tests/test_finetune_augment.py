"""Tests of keras/finetune_augment.py: fine-tuning augmentation.

References are independent of the code under test: plain loops over voxels with SciPy's own
rotation matrices and a hand-written trilinear interpolation, np.pad + slicing for crops,
np.flip, hand-computed values, a separable convolution written out, and the probabilities
checked within about 4.5 standard errors on a fixed seed.
"""

import dataclasses
import itertools
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

import finetune_augment as A

ALL_ON = A.AugmentSettings(
    p_rotation=1.0,
    p_scale=1.0,
    p_elastic=1.0,
    p_noise=1.0,
    p_blur=1.0,
    p_brightness=1.0,
    p_contrast=1.0,
    p_low_res=1.0,
    p_gamma_inverted=1.0,
    p_gamma=1.0,
    p_per_channel=1.0,
)


def smooth_volume(shape=(40, 36, 24), seed=0) -> np.ndarray:
    """A smooth float32 volume in about [0, 1]: a few Gaussian blobs."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    out = np.zeros(shape)
    for _ in range(6):
        c = rng.uniform(0, 1, 3) * np.array(shape)
        s = rng.uniform(3, 7)
        out += np.exp(-sum((grid[a] - c[a]) ** 2 for a in range(3)) / (2 * s * s))
    return (out / out.max()).astype(np.float32)


def crop_reference(array, start, size, fill):
    """The block from `start` of `size` of the last three axes, padded with `fill`."""
    edges = zip(start, size, array.shape[-3:], strict=True)
    pad = [(0, 0)] * (array.ndim - 3) + [(max(0, -s), max(0, s + n - t)) for s, n, t in edges]
    padded = np.pad(array, pad, constant_values=fill)
    lo = [max(0, -s) + s for s in start]
    return padded[(Ellipsis, *(slice(a, a + n) for a, n in zip(lo, size, strict=True)))]


def sample_reference(volume, centre, patch, matrix, order, fill):
    """Slow: for each output voxel, the source point centre + matrix @ offset, then the nearest
    voxel (ties up) or trilinear interpolation; a point outside [0, n - 1] on an axis: fill."""
    out = np.empty(patch)
    for idx in itertools.product(*(range(p) for p in patch)):
        offset = np.array([i - p // 2 for i, p in zip(idx, patch, strict=True)], dtype=np.float64)
        point = np.asarray(centre, dtype=np.float64) + matrix @ offset
        if any(x < 0 or x > n - 1 for x, n in zip(point, volume.shape, strict=True)):
            out[idx] = fill
        elif order == 0:
            out[idx] = volume[tuple(int(math.floor(x + 0.5)) for x in point)]
        else:
            base = [int(math.floor(x)) for x in point]
            value = 0.0
            for corner in itertools.product((0, 1), repeat=3):
                w, at = 1.0, []
                for a in range(3):
                    frac = point[a] - base[a]
                    w *= frac if corner[a] else 1 - frac
                    at.append(min(base[a] + corner[a], volume.shape[a] - 1))
                value += w * volume[tuple(at)]
            out[idx] = value
    return out


# ------------------------------------------------------------------------------- settings


def test_public_api():
    assert all(hasattr(A, name) for name in A.__all__)


def test_default_probabilities_are_nnunet_s():
    s = A.AugmentSettings()
    assert (s.p_rotation, s.rotation_degrees, s.p_scale, s.scale_range) == (
        0.2,
        30,
        0.2,
        (0.7, 1.4),
    )
    assert (s.p_mirror, s.mirror_axes, s.p_elastic) == (0.5, (0, 1, 2), 0.0)
    assert (s.p_noise, s.p_blur, s.p_brightness, s.p_contrast) == (0.1, 0.2, 0.15, 0.15)
    assert (s.p_low_res, s.p_gamma, s.p_gamma_inverted) == (0.25, 0.3, 0.1)


def test_none_turns_every_probability_off():
    s = A.AugmentSettings.none()
    probs = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name.startswith("p_")}
    assert len(probs) == 12 and set(probs.values()) == {0.0}


@pytest.mark.parametrize(
    "change, name",
    [
        ({"p_noise": 1.5}, "p_noise"),
        ({"p_mirror": -0.1}, "p_mirror"),
        ({"scale_range": (1.4, 0.7)}, "scale_range"),
        ({"scale_range": (0.0, 1.0)}, "scale_range"),
        ({"low_res_zoom": (0.5, 2.0)}, "low_res_zoom"),
        ({"gamma_range": (0.7,)}, "gamma_range"),
        ({"in_plane_axis": 3}, "in_plane_axis"),
        ({"mirror_axes": (0, 4)}, "mirror_axes"),
        ({"image_order": 7}, "image_order"),
        ({"rotation_degrees": float("nan")}, "rotation_degrees"),
    ],
)
def test_bad_settings_are_refused_by_name(change, name):
    with pytest.raises(A.AugmentInputError, match=f"Expected {name}.*Received: {name}="):
        A.AugmentSettings(**change)


def test_no_augmentation_draws_nothing():
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    assert A.draw_spatial(A.AugmentSettings.none(), rng) == A.SpatialParams()
    assert A.draw_intensity(A.AugmentSettings.none(), 2, rng) == A.IntensityParams()
    assert rng.bit_generator.state == before


def test_drawn_probabilities_match_the_settings():
    rng = np.random.default_rng(0)
    s, n = A.AugmentSettings(), 3000
    spatial = [A.draw_spatial(s, rng) for _ in range(n)]
    intensity = [A.draw_intensity(s, 1, rng) for _ in range(n)]

    def close(count, p):
        assert abs(count / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n), (count / n, p)

    close(sum(any(p.angles) for p in spatial), 0.2)
    close(sum(p.scale != (1.0, 1.0, 1.0) for p in spatial), 0.2)
    close(sum(p.moves_grid for p in spatial), 1 - 0.8 * 0.8)
    for a in range(3):
        close(sum(p.mirror[a] for p in spatial), 0.5)
    assert not any(p.elastic for p in spatial)
    close(sum(p.noise_std > 0 or p.noise_seed != 0 for p in intensity), 0.1)
    close(sum(bool(p.blur_sigma) and p.blur_sigma[0] is not None for p in intensity), 0.2 * 0.5)
    close(sum(bool(p.brightness) for p in intensity), 0.15)
    close(sum(bool(p.contrast) for p in intensity), 0.15)
    close(sum(bool(p.low_res_zoom) and p.low_res_zoom[0] is not None for p in intensity), 0.125)
    close(sum(bool(p.gamma_inverted) for p in intensity), 0.1)
    close(sum(bool(p.gamma) for p in intensity), 0.3)
    # the ranges
    angles = np.array([p.angles for p in spatial if any(p.angles)])
    assert np.abs(angles).max() <= math.radians(30) and np.abs(angles).max() > math.radians(28)
    scales = np.array([p.scale[0] for p in spatial if p.scale[0] != 1.0])
    assert 0.7 <= scales.min() < 0.75 and 1.35 < scales.max() <= 1.4
    assert 0.35 < np.mean(scales < 1) < 0.65  # half of the draws zoom in
    gammas = np.array([p.gamma[0] for p in intensity if p.gamma])
    assert gammas.min() >= 0.7 and gammas.max() <= 1.5 and 0.35 < np.mean(gammas < 1) < 0.65


def test_anisotropic_settings_keep_the_coarse_axis():
    s = dataclasses.replace(ALL_ON, in_plane_axis=2, rotation_degrees=180.0)
    assert A.AugmentSettings.anisotropic(2).rotation_degrees == 180.0
    rng = np.random.default_rng(1)
    for _ in range(20):
        sp, it = A.draw_spatial(s, rng), A.draw_intensity(s, 1, rng)
        assert sp.angles[:2] == (0.0, 0.0) and sp.angles[2] != 0.0 and sp.scale[2] == 1.0
        assert sp.elastic.axes == (0, 1)
        assert it.blur_sigma[0][2] == 0.0 and it.low_res_zoom[0][2] == 1.0
        # z of every source point is the plain grid's: slices stay slices
        coords = A.source_coordinates((10, 10, 5), (6, 6, 4), sp)
        np.testing.assert_allclose(coords[2], np.broadcast_to(np.arange(4) - 2 + 5, (6, 6, 4)))


# ---------------------------------------------------------------------------- spatial


@pytest.mark.parametrize("centre", [(20, 18, 12), (0, 0, 0), (39, 35, 23), (-5, 50, 12)])
def test_no_spatial_transform_is_the_plain_crop(centre):
    vol = smooth_volume()
    image = np.stack([vol, 1 - vol])
    label = (vol > 0.5).astype(np.int16)
    patch = (16, 12, 9)
    out, lab = A.sample_patch(image, label, centre, patch, A.SpatialParams(), image_fill=-1.0)
    start = [c - p // 2 for c, p in zip(centre, patch, strict=True)]
    assert np.array_equal(out, crop_reference(image, start, patch, -1.0))
    assert np.array_equal(lab, crop_reference(label, start, patch, 0))
    assert out.dtype == np.float32 and lab.dtype == np.int16
    # and with augmentation off, the whole pipeline gives the same crop
    out2, lab2 = A.augment_patch(
        image, label, centre, patch, A.AugmentSettings.none(), np.random.default_rng(0), -1.0
    )
    assert np.array_equal(out2, out) and np.array_equal(lab2, lab)


def test_mirroring_is_np_flip():
    vol = smooth_volume()
    label = (vol * 5).astype(np.uint8)
    params = A.SpatialParams(mirror=(True, False, True))
    out, lab = A.sample_patch(vol[None], label, (20, 18, 12), (16, 12, 8), params)
    plain, plain_lab = A.sample_patch(
        vol[None], label, (20, 18, 12), (16, 12, 8), A.SpatialParams()
    )
    assert np.array_equal(out, np.flip(plain, (1, 3))) and np.array_equal(
        lab, np.flip(plain_lab, (0, 2))
    )
    assert np.array_equal(A.mirror(vol, [1]), np.flip(vol, 1))


def test_rotation_matrix_is_scipy_s_extrinsic_xyz():
    for angles in [(0.3, 0, 0), (0, -0.7, 0), (0, 0, 1.1), (0.2, -0.4, 0.5)]:
        expected = Rotation.from_euler("xyz", angles).as_matrix()
        np.testing.assert_allclose(A.rotation_matrix(angles), expected, atol=1e-12)


@pytest.mark.parametrize(
    "angles, scale, centre",
    [
        ((0.35, -0.2, 0.5), (1.0, 1.0, 1.0), (20, 18, 12)),
        ((0.0, 0.0, -0.45), (0.8, 0.8, 0.8), (20.3, 17.6, 11.2)),
        ((0.5, 0.4, -0.3), (1.3, 1.3, 1.3), (3, 4, 2)),  # near a corner: points outside
    ],
)
def test_rotation_and_scale_against_a_loop_over_voxels(angles, scale, centre):
    vol = smooth_volume()
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 4, vol.shape).astype(np.uint8)
    params = A.SpatialParams(angles=angles, scale=scale)
    patch = (9, 8, 7)
    out, lab = A.sample_patch(vol[None], classes, centre, patch, params, image_fill=-2.0)
    matrix = Rotation.from_euler("xyz", angles).as_matrix() * np.array(scale)[None, :]
    ref = sample_reference(vol, centre, patch, matrix, 1, -2.0)
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    assert np.array_equal(lab, sample_reference(classes, centre, patch, matrix, 0, 0))
    if centre == (3, 4, 2):
        assert (out == -2.0).any() and (out != -2.0).any()


def test_half_turn_and_integer_scale_by_hand():
    vol = smooth_volume()
    # 180 degrees about Z with an odd patch: the crop flipped in X and Y
    patch, centre = (9, 7, 5), (20, 18, 12)
    out, _ = A.sample_patch(vol, None, centre, patch, A.SpatialParams(angles=(0, 0, math.pi)))
    crop = vol[16:25, 15:22, 10:15]
    np.testing.assert_allclose(out, np.flip(crop, (0, 1)), atol=1e-6)
    # scale 2: every second voxel from the centre
    label = (vol * 7).astype(np.int32)
    out, lab = A.sample_patch(vol, label, centre, (8, 8, 4), A.SpatialParams(scale=(2.0, 2.0, 2.0)))
    np.testing.assert_allclose(out, vol[12:28:2, 10:26:2, 8:16:2], atol=1e-6)
    assert np.array_equal(lab, label[12:28:2, 10:26:2, 8:16:2])


@pytest.mark.parametrize("order, tol", [(0, 0.0), (1, 0.0), (3, 1e-5)])
def test_the_block_read_equals_sampling_the_whole_volume(order, tol):
    rng = np.random.default_rng(2)
    vol = rng.random((50, 44, 30)).astype(np.float32)  # noise: the hardest case for the spline
    for centre in [(25, 22, 15), (2, 40, 28), (60, 20, 15)]:
        params = A.SpatialParams(angles=tuple(rng.uniform(-0.5, 0.5, 3)), scale=(0.9, 0.9, 0.9))
        out, _ = A.sample_patch(vol, None, centre, (16, 16, 8), params, image_fill=0.5, order=order)
        coords = A.source_coordinates(centre, (16, 16, 8), params)
        whole = ndimage.map_coordinates(vol, coords, order=order, mode="constant", cval=0.5)
        np.testing.assert_allclose(out, whole, atol=tol, rtol=0)


def test_a_patch_wholly_outside_is_the_fill():
    vol = smooth_volume()
    params = A.SpatialParams(angles=(0.1, 0, 0))
    out, lab = A.sample_patch(
        vol, np.ones(vol.shape, np.uint8), (200, 5, 5), (8, 8, 8), params, 3.0
    )
    assert (out == 3.0).all() and (lab == 0).all()


def test_labels_follow_the_image():
    vol = smooth_volume((48, 48, 32))
    label = (vol > 0.4).astype(np.uint8)
    # The label is the source point's nearest voxel, at most sqrt(3) / 2 voxels away: where
    # it disagrees with the thresholded image, the image lies within that reach of 0.4.
    reach = math.sqrt(3) / 2 * np.sqrt(sum(g**2 for g in np.gradient(vol))).max()
    rng = np.random.default_rng(4)
    spatial_only = dataclasses.replace(
        A.AugmentSettings.none(), p_rotation=1.0, p_scale=1.0, p_elastic=1.0, p_mirror=0.5
    )
    for _ in range(6):
        params = A.draw_spatial(spatial_only, rng)
        out, lab = A.sample_patch(vol, label, (24, 24, 16), (32, 32, 24), params)
        mismatch = (out > 0.4) != lab.astype(bool)
        assert np.abs(out[mismatch] - 0.4).max(initial=0) <= 1.05 * reach
        assert mismatch.mean() < 0.01
        assert lab.any() and not lab.all()
    # a label shifted by two voxels would not pass
    shifted = np.roll(label, 2, axis=0)
    out, lab = A.sample_patch(vol, shifted, (24, 24, 16), (32, 32, 24), params)
    mismatch = (out > 0.4) != lab.astype(bool)
    assert np.abs(out[mismatch] - 0.4).max() > 1.05 * reach


def test_labels_stay_in_the_class_set():
    rng = np.random.default_rng(5)
    vol = smooth_volume()
    label = np.choose(rng.integers(0, 3, vol.shape), [0, 3, 7]).astype(np.int64)
    for _ in range(4):
        params = A.draw_spatial(ALL_ON, rng)
        _, lab = A.sample_patch(vol, label, (10, 30, 4), (16, 16, 8), params)
        assert set(np.unique(lab)) <= {0, 3, 7} and lab.dtype == np.int64


def test_elastic_field_is_reproducible_smooth_and_of_the_stated_size():
    params = A.ElasticParams(alpha=900.0, sigma=11.0, seed=9, axes=(0, 1))
    field = A.elastic_displacement(params, (64, 64, 32))
    assert np.array_equal(field, A.elastic_displacement(params, (64, 64, 32)))
    assert (field[2] == 0).all() and field[:2].std() > 0
    magnitude = np.abs(field[:2, 16:48, 16:48, 8:24]).mean()  # away from the patch's edges
    assert 1.0 < magnitude < 2.5, magnitude  # "about 1.5 voxels" (AugmentSettings)
    assert np.abs(field).max() < 7.0
    assert np.abs(np.diff(field[0], axis=0)).max() < 0.5  # smooth: neighbours move together


def test_memory_mapped_volume_gives_the_same_patch(tmp_path):
    vol = smooth_volume()
    np.save(tmp_path / "v.npy", vol[None])
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    params = A.SpatialParams(angles=(0.2, 0.1, -0.3))
    a, _ = A.sample_patch(mapped, None, (20, 18, 12), (16, 16, 8), params)
    b, _ = A.sample_patch(vol[None], None, (20, 18, 12), (16, 16, 8), params)
    assert np.array_equal(a, b) and type(a) is np.ndarray


@pytest.mark.parametrize(
    "image_shape, label_shape, centre, patch, message",
    [
        ((5, 5), None, (1, 1, 1), (2, 2, 2), "Expected an image"),
        ((1, 6, 6, 6), (6, 6, 5), (1, 1, 1), (2, 2, 2), "label of the image's size"),
        ((6, 6, 6), None, (1, 1), (2, 2, 2), "centre"),
        ((6, 6, 6), None, (1, 1, float("nan")), (2, 2, 2), "centre"),
        ((6, 6, 6), None, (1, 1, 1), (2, 0, 2), "patch"),
    ],
)
def test_bad_arrays_are_refused(image_shape, label_shape, centre, patch, message):
    label = None if label_shape is None else np.zeros(label_shape, np.uint8)
    with pytest.raises(A.AugmentInputError, match=message):
        A.sample_patch(np.zeros(image_shape, np.float32), label, centre, patch, A.SpatialParams())
    with pytest.raises(A.AugmentInputError, match="integer labels"):
        A.sample_patch(
            np.zeros((6, 6, 6)), np.zeros((6, 6, 6)), (1, 1, 1), (2, 2, 2), A.SpatialParams()
        )


# -------------------------------------------------------------------------- intensity


def test_brightness_and_contrast_by_hand():
    x = np.array([0.0, 1.0, 2.0, 3.0], np.float32).reshape(1, 1, 4)
    np.testing.assert_array_equal(A.adjust_brightness(x, 1.5), x * 1.5)
    # mean 1.5; factor 2: [-1.5, 0.5, 2.5, 4.5], clipped to [0, 3]
    np.testing.assert_allclose(A.adjust_contrast(x, 2.0).ravel(), [0.0, 0.5, 2.5, 3.0])
    np.testing.assert_allclose(A.adjust_contrast(x, 0.5).ravel(), [0.75, 1.25, 1.75, 2.25])


def test_gamma_by_hand():
    x = np.array([0.0, 0.25, 0.5, 1.0], np.float64).reshape(1, 1, 4)
    powered = np.array([0.0, 0.0625, 0.25, 1.0])  # gamma 2 on [0, 1]
    expected = (powered - powered.mean()) / powered.std() * x.std() + x.mean()
    out = A.adjust_gamma(x, 2.0)
    np.testing.assert_allclose(out.ravel(), expected, atol=1e-12)
    assert out.mean() == pytest.approx(x.mean()) and out.std() == pytest.approx(x.std())
    # inverted: the same on -x, negated
    inv = -np.array([1.0, 0.75, 0.5, 0.0])  # -x rescaled to [0, 1] by its min -1 and span 1
    p = inv**2
    expected_inv = -((p - p.mean()) / p.std() * x.std() - x.mean())
    np.testing.assert_allclose(
        A.adjust_gamma(x, 2.0, invert=True).ravel(), expected_inv, atol=1e-12
    )
    np.testing.assert_allclose(A.adjust_gamma(x, 1.0), x, atol=1e-12)
    # a constant patch stays constant
    assert np.array_equal(A.adjust_gamma(np.full((2, 2, 2), 0.3), 1.4), np.full((2, 2, 2), 0.3))


def test_noise_statistics_and_seed():
    x = np.zeros((2, 40, 40, 20), np.float32)
    out = A.add_gaussian_noise(x, 0.3, seed=11)
    assert out.dtype == np.float32
    assert abs(out.mean()) < 0.005 and abs(out.std() - 0.3) < 0.003  # 64,000 draws
    assert np.array_equal(out, A.add_gaussian_noise(x, 0.3, seed=11))
    assert not np.array_equal(out, A.add_gaussian_noise(x, 0.3, seed=12))
    assert not np.array_equal(out[0], out[1])  # each channel its own noise


def test_blur_against_a_written_out_separable_convolution():
    rng = np.random.default_rng(6)
    x = rng.random((10, 9, 8)).astype(np.float32)
    sigma = (0.7, 0.0, 1.0)
    ref = x.astype(np.float64)
    for a, s in enumerate(sigma):
        if s == 0:
            continue
        r = int(4.0 * s + 0.5)
        w = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        w /= w.sum()
        padded = np.pad(ref, [(r, r) if b == a else (0, 0) for b in range(3)], mode="edge")
        ref = sum(
            w[k] * np.take(padded, np.arange(k, k + x.shape[a]), axis=a) for k in range(2 * r + 1)
        )
    np.testing.assert_allclose(A.gaussian_blur(x, sigma), ref, atol=1e-5)


def test_low_resolution_against_a_loop():
    rng = np.random.default_rng(7)
    x = rng.random((8, 6, 5))
    zoom = (0.5, 0.7, 1.0)
    small_shape = [max(1, round(n * z)) for n, z in zip(x.shape, zoom, strict=True)]  # 4, 4, 5

    def nearest(i, n, m):  # the old voxel whose centre is nearest new voxel i's
        return min(n - 1, max(0, math.floor((i + 0.5) * n / m - 0.5 + 0.5)))

    small = np.empty(small_shape)
    for j in itertools.product(*(range(m) for m in small_shape)):
        small[j] = x[tuple(nearest(j[a], x.shape[a], small_shape[a]) for a in range(3))]
    ref = np.empty(x.shape)
    for i in itertools.product(*(range(n) for n in x.shape)):
        value = 0.0
        spots = []
        for a in range(3):
            n, m = x.shape[a], small_shape[a]
            u = min(max((i[a] + 0.5) * m / n - 0.5, 0), m - 1)
            lo = math.floor(u)
            spots.append(((lo, 1 - (u - lo)), (min(lo + 1, m - 1), u - lo)))
        for corner in itertools.product(*spots):
            value += np.prod([w for _, w in corner]) * small[tuple(k for k, _ in corner)]
        ref[i] = value
    np.testing.assert_allclose(A.simulate_low_resolution(x, zoom), ref, atol=1e-12)
    np.testing.assert_array_equal(A.simulate_low_resolution(x, (1, 1, 1)), x)
    np.testing.assert_allclose(
        A.simulate_low_resolution(np.full((6, 6, 6), 0.4), (0.5, 0.3, 0.6)), 0.4
    )


def test_augment_intensity_applies_the_steps_in_order():
    rng = np.random.default_rng(8)
    x = rng.random((2, 12, 10, 8)).astype(np.float32)
    params = A.IntensityParams(
        noise_std=0.05,
        noise_seed=3,
        blur_sigma=((0.6, 0.6, 0.6), None),
        brightness=(None, 1.2),
        contrast=(0.8, None),
        low_res_zoom=(None, (0.5, 0.5, 1.0)),
        gamma_inverted=(1.3, None),
        gamma=(None, 0.8),
    )
    noisy = A.add_gaussian_noise(x, 0.05, 3)
    c0 = A.adjust_gamma(A.adjust_contrast(A.gaussian_blur(noisy[0], (0.6,) * 3), 0.8), 1.3, True)
    c1 = A.adjust_gamma(
        A.simulate_low_resolution(A.adjust_brightness(noisy[1], 1.2), (0.5, 0.5, 1)), 0.8
    )
    out = A.augment_intensity(x, params)
    np.testing.assert_array_equal(out, np.stack([c0, c1]))
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.array_equal(A.augment_intensity(x, A.IntensityParams()), x)
    assert A.augment_intensity(x, A.IntensityParams()) is not x


# ---------------------------------------------------------------------- whole pipeline


def test_same_seed_same_patch_other_seed_other_patch():
    vol = smooth_volume()
    image = np.stack([vol, vol**2])
    label = (vol > 0.5).astype(np.uint8)

    def run(seed):
        rng = np.random.default_rng(seed)
        return A.augment_patch(image, label, (20, 18, 12), (16, 16, 8), ALL_ON, rng, -1.0)

    (a, la), (b, lb), (c, _) = run(1), run(1), run(2)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.shape == (2, 16, 16, 8) and a.dtype == np.float32 and la.dtype == np.uint8
    # a 3-D image comes out 3-D
    out, _ = A.augment_patch(vol, None, (20, 18, 12), (16, 16, 8), ALL_ON, np.random.default_rng(1))
    assert out.shape == (16, 16, 8)


def test_default_settings_keep_shape_dtype_and_mostly_the_crop():
    vol = smooth_volume()
    label = (vol > 0.5).astype(np.uint8)
    plain = vol[12:28, 10:26, 8:16]
    flips = [axes for k in range(4) for axes in itertools.combinations(range(3), k)]
    rng = np.random.default_rng(10)
    unchanged = 0
    for _ in range(20):
        settings = A.AugmentSettings()
        out, lab = A.augment_patch(vol[None], label, (20, 18, 12), (16, 16, 8), settings, rng)
        assert out.shape == (1, 16, 16, 8) and out.dtype == np.float32 and lab.dtype == np.uint8
        assert np.isfinite(out).all()
        unchanged += any(np.array_equal(out[0], np.flip(plain, axes)) for axes in flips)
    # only mirrored when neither rotation nor scale (0.64) nor an intensity change (about 0.32)
    # is drawn: about 4 in 20
    assert 0 < unchanged < 20
