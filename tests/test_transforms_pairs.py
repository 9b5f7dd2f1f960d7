"""Tests of the training pairs of keras/transforms.py: generate_pair, make_batch, sample PNGs.

generate_pair must chain the transforms in the paper's order (Zhou et al., "Models Genesis",
MedIA 2021; docs/transforms.md) at the config's rates, on one random stream; references are
the public transforms called one by one and the distributions the rates imply.
"""

import os
from types import SimpleNamespace

import numpy as np
import pytest

import transforms as T
from transform_helpers import ct_like, cube, within

RATES0 = dict(
    flip_rate=0.0,
    local_rate=0.0,
    nonlinear_rate=0.0,
    paint_rate=0.0,
    outpaint_rate=0.8,
    inpaint_rate=0.2,
    save_samples=None,
)


def cfg(**kw):
    d = dict(RATES0)
    d.update(kw)
    return SimpleNamespace(**d)


# ---------------------------------------------------------------------------- generate_pair


def test_generate_pair_rng_keyword():
    img = np.stack([cube((20, 20, 20), seed=s) for s in range(3)])
    with pytest.raises(TypeError, match="rng=7"):
        next(T.generate_pair(img, 2, cfg(), rng=7))
    x, y = next(T.generate_pair(img, 2, cfg(), "test", rng=None))
    assert x.shape == (2, 1, 20, 20, 20)


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
    gen = T.generate_pair(
        img, 6, cfg(paint_rate=1.0, inpaint_rate=0.2), rng=np.random.default_rng(2)
    )
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
    """generate_pair equals the public transforms chained in the paper's order (flip, local
    shuffle, non-linear, then in- or out-painting) on the same random stream."""
    img = np.stack([ct_like((24, 24, 20), seed=s) for s in range(5)])
    conf = cfg(
        flip_rate=0.9, local_rate=0.7, nonlinear_rate=0.7, paint_rate=0.8, inpaint_rate=inpaint_rate
    )
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
    x, y = next(
        T.generate_pair(img, 2, SimpleNamespace(save_samples=None), rng=np.random.default_rng(0))
    )
    assert x.dtype == y.dtype == np.float64


@pytest.mark.parametrize(
    "img,bs,conf,match",
    [
        (np.zeros((4, 20, 20, 20), np.float32), 2, cfg(), r"\(N, 1, R, C, D\)"),
        (np.zeros((4, 2, 20, 20, 20), np.float32), 2, cfg(), r"\(N, 1, R, C, D\)"),
        (np.zeros((2, 1, 20, 20, 20), np.float32), 3, cfg(), "at least batch_size=3"),
        (np.zeros((4, 1, 20, 20, 20), np.float32), 0, cfg(), "positive integer"),
        (np.full((4, 1, 20, 20, 20), -0.5, np.float32), 2, cfg(), "min=-0.5"),
        (np.full((4, 1, 20, 20, 20), np.nan, np.float32), 2, cfg(), "NaN"),
        (np.zeros((4, 1, 20, 20, 20), np.float32), 2, cfg(flip_rate=1.2), "config.flip_rate"),
        (np.zeros((4, 1, 20, 20, 20), np.float32), 2, cfg(inpaint_rate=-1), "config.inpaint_rate"),
    ],
)
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
    conf = cfg(
        save_samples="png",
        exp_name="exp",
        sample_path=str(tmp_path / "samples"),
        nonlinear_rate=1.0,
    )
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
    next(
        T.generate_pair(
            img, 2, cfg(save_samples=None, sample_path=str(tmp_path / "s2")), status="train"
        )
    )
    assert len(os.listdir(tmp_path / "samples" / "exp")) == 1
    assert not (tmp_path / "s2").exists()


def test_sample_png_about_one_batch_in_100(tmp_path):
    conf = cfg(save_samples="png", exp_name="e", sample_path=str(tmp_path))
    rng = np.random.default_rng(5)
    x = np.zeros((2, 1, 12, 12, 12), np.float32)
    n = 3000
    written = sum(T.maybe_save_sample(x, x, conf, "train", rng) is not None for _ in range(n))
    assert within(written / n, 0.01, n)


def test_real_ct_cubes_through_pipeline(chest_ct_path):
    import SimpleITK as sitk

    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(chest_ct_path))).transpose(2, 1, 0)
    vol = (np.clip(vol, -1000, 1000).astype(np.float64) + 1000) / 2000
    img = np.stack([vol[200:264, 200:264, 50:82], vol[250:314, 150:214, 60:92]])[:, None]
    img = img.astype(np.float32)
    gen = T.generate_pair(img, 2, SimpleNamespace(save_samples=None), rng=np.random.default_rng(0))
    for _ in range(3):
        x, y = next(gen)
        assert x.min() >= 0 and x.max() <= 1
    params = T.draw_nonlinear_params(1.0, rng=np.random.default_rng(1))
    xp, fp = T.nonlinear_knots(params)
    np.testing.assert_array_equal(
        T.apply_nonlinear_transformation(img[0], params),
        np.interp(img[0], xp, fp).astype(np.float32),
    )
