"""finetune_predict: sliding windows against a slow loop, whole-volume prediction with models whose
output is known by hand, the run folder, classification CSVs and bad input."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

import keras
import numpy as np
import pytest
import SimpleITK as sitk

import finetune
import finetune_predict as fp
import unet3d
from finetune_helpers import make_candidates, make_segmentation_folder, read_xyz, write_xyz

# --------------------------------------------------------------------------------------------
# Window positions and weights
# --------------------------------------------------------------------------------------------


def test_window_starts_hand_values():
    assert fp.window_starts(32, 32, 0.5) == [0]
    assert fp.window_starts(64, 32, 0.5) == [0, 16, 32]
    # ceil((70 - 32) / 16) + 1 = 4 windows, spread evenly over 38 voxels: 0, 12.7, 25.3, 38.
    assert fp.window_starts(70, 32, 0.5) == [0, 13, 25, 38]
    assert fp.window_starts(70, 32, 0.0) == [0, 19, 38]
    with pytest.raises(ValueError, match="size >= patch"):
        fp.window_starts(10, 16, 0.5)


@pytest.mark.parametrize("size,patch,overlap", [(141, 32, 0.5), (512, 64, 0.5), (50, 16, 0.25)])
def test_window_starts_cover_and_respect_the_step(size, patch, overlap):
    starts = fp.window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    steps = np.diff(starts)
    assert steps.max() <= patch * (1 - overlap)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()


def test_gaussian_importance_hand_values():
    patch = (16, 8, 8)
    g = fp.gaussian_importance(patch)
    assert g.shape == patch and g.dtype == np.float32

    def by_hand(i, j, k):
        # Centre (n - 1) / 2 and sigma n / 8 per axis; the four central voxels (half a voxel
        # from the centre on every axis) are the peak, scaled to 1; floored at 1e-6.
        d2 = sum(((q - (n - 1) / 2) / (n / 8)) ** 2 for q, n in zip((i, j, k), patch, strict=True))
        peak = sum((0.5 / (n / 8)) ** 2 for n in patch)
        return max(math.exp(-0.5 * (d2 - peak)), 1e-6)

    assert g.max() == pytest.approx(1.0)
    for voxel in [(7, 3, 3), (8, 4, 4), (6, 3, 3), (2, 5, 1), (0, 3, 4), (0, 0, 0)]:
        assert g[voxel] == pytest.approx(by_hand(*voxel), rel=1e-5), voxel
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1], rtol=1e-6)  # symmetric


# --------------------------------------------------------------------------------------------
# Sliding windows against a slow loop
# --------------------------------------------------------------------------------------------


def _window_model(batch: np.ndarray) -> np.ndarray:
    """A 'model' whose votes depend on the whole window (its mean) and on the voxel."""
    logits1 = 3.0 * batch[:, 0] - 2.0 * batch.mean(axis=(1, 2, 3, 4))[:, None, None, None]
    if batch.shape[1] > 1:
        logits1 = logits1 + batch[:, 1]
    p1 = 1.0 / (1.0 + np.exp(-logits1))
    return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)


def _slow_reference(volume, patch, starts_per_axis, gaussian):
    """Voxel-by-voxel weighted vote over hand-listed windows, weights from the formula."""
    k = 2
    shape = volume.shape[1:]
    total = np.zeros((k, *shape))
    norm = np.zeros(shape)
    for a in starts_per_axis[0]:
        for b in starts_per_axis[1]:
            for c in starts_per_axis[2]:
                window = volume[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]]
                out = _window_model(window[None].astype(np.float32))[0]
                for i in range(patch[0]):
                    for j in range(patch[1]):
                        for m in range(patch[2]):
                            if gaussian:
                                d2 = sum(
                                    ((q - (n - 1) / 2) / (n / 8)) ** 2
                                    for q, n in zip((i, j, m), patch, strict=True)
                                )
                                peak = sum((0.5 / (n / 8)) ** 2 for n in patch)
                                w = max(math.exp(-0.5 * (d2 - peak)), 1e-6)
                            else:
                                w = 1.0
                            total[:, a + i, b + j, c + m] += w * out[:, i, j, m]
                            norm[a + i, b + j, c + m] += w
    return total / norm


@pytest.mark.parametrize("gaussian", [True, False])
def test_sliding_window_matches_slow_loop(gaussian):
    rng = np.random.default_rng(1)
    volume = rng.random((1, 12, 10, 8)).astype(np.float32)
    patch = (8, 8, 4)
    # Hand-listed windows: x: ceil(4/4)+1 = 2 -> [0, 4]; y: ceil(2/4)+1 = 2 -> [0, 2];
    # z: ceil(4/2)+1 = 3 -> [0, 2, 4].
    starts = ([0, 4], [0, 2], [0, 2, 4])
    expected = _slow_reference(volume, patch, starts, gaussian)
    got = fp.sliding_window_predict(
        _window_model, volume, patch, 2, overlap=0.5, batch_size=3, gaussian=gaussian
    )
    assert got.shape == (2, 12, 10, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_sliding_window_batch_size_does_not_change_result():
    rng = np.random.default_rng(2)
    volume = rng.random((2, 20, 9, 11)).astype(np.float32)
    a = fp.sliding_window_predict(_window_model, volume, (8, 8, 8), 2, batch_size=1)
    b = fp.sliding_window_predict(_window_model, volume, (8, 8, 8), 2, batch_size=7)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sliding_window_small_volume_is_padded_centred_and_cropped_back():
    rng = np.random.default_rng(3)
    volume = rng.random((1, 5, 8, 3)).astype(np.float32)
    patch = (8, 8, 4)
    got = fp.sliding_window_predict(_window_model, volume, patch, 2)
    assert got.shape == (2, 5, 8, 3)
    # By hand: one window holding the volume at offsets (1, 0, 0) (pad 3 -> 1 before, 2 after;
    # pad 1 -> 0 before, 1 after), zeros around it.
    padded = np.zeros((1, 8, 8, 4), np.float32)
    padded[:, 1:6, 0:8, 0:3] = volume
    out = _window_model(padded[None])[0]
    np.testing.assert_allclose(got, out[:, 1:6, 0:8, 0:3], rtol=1e-6)


def _ramp_model(batch):
    # Not mirror-symmetric: the tumour score grows with the window's x index.
    ramp = np.arange(batch.shape[2], dtype=np.float32)[None, :, None, None]
    score = batch[:, 0] + 0.1 * ramp
    return np.stack([1 - score, score], axis=1)


def test_mirroring_averages_the_flipped_predictions():
    rng = np.random.default_rng(4)
    volume = rng.random((1, 8, 8, 4)).astype(np.float32)  # one window: no overlap to weigh
    plain = fp.sliding_window_predict(_ramp_model, volume, (8, 8, 4), 2)
    # A voxelwise model is unchanged by mirroring.
    same = fp.sliding_window_predict(_window_model, volume, (8, 8, 4), 2, mirror_axes=(0, 1, 2))
    np.testing.assert_allclose(
        same, fp.sliding_window_predict(_window_model, volume, (8, 8, 4), 2), rtol=1e-6
    )
    # Mirroring x: the ramp and its reverse average to their mean, 0.1 * 3.5, everywhere.
    got = fp.sliding_window_predict(_ramp_model, volume, (8, 8, 4), 2, mirror_axes=(0,))
    np.testing.assert_allclose(got[1], volume[0] + 0.35, rtol=1e-5)
    np.testing.assert_allclose(plain[1], volume[0] + 0.1 * np.arange(8)[:, None, None], rtol=1e-5)
    # Mirroring y and z only leaves the x ramp as it is.
    yz = fp.sliding_window_predict(_ramp_model, volume, (8, 8, 4), 2, mirror_axes=(1, 2))
    np.testing.assert_allclose(yz, plain, rtol=1e-5)
    with pytest.raises(ValueError, match="mirror axes"):
        fp.sliding_window_predict(_ramp_model, volume, (8, 8, 4), 2, mirror_axes=(3,))


def test_padding_uses_the_fill_value():
    volume = np.ones((1, 4, 8, 4), np.float32)
    got = fp.sliding_window_predict(_window_model, volume, (8, 8, 4), 2, fill=-2.0)
    # By hand: one window, the volume at x 2..5, the fill around it (the model sees its mean).
    padded = np.full((1, 8, 8, 4), -2.0, np.float32)
    padded[:, 2:6] = 1.0
    np.testing.assert_allclose(got, _window_model(padded[None])[0][:, 2:6], rtol=1e-6)
    zero = fp.sliding_window_predict(_window_model, volume, (8, 8, 4), 2)
    assert not np.allclose(got, zero)


def test_keep_largest_component_by_hand():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0:3, 0:3, 0:3] = 1  # 27 voxels
    labels[6:8, 6:8, 6:8] = 1  # 8 voxels: dropped
    labels[3, 3, 3] = 1  # touches the big one at a corner (26-connected): kept
    labels[0, 9, 0] = 2  # class 2 alone: kept
    out = fp.keep_largest_component(labels)
    assert out.dtype == labels.dtype
    assert (out == 1).sum() == 28 and out[3, 3, 3] == 1 and out[7, 7, 7] == 0
    assert out[0, 9, 0] == 2
    np.testing.assert_array_equal(fp.keep_largest_component(np.zeros((3, 3, 3), np.uint8)), 0)


def test_sliding_window_bad_arguments():
    vol = np.zeros((1, 8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        fp.sliding_window_predict(_window_model, vol, (8, 8, 8), 2, overlap=1.0)
    with pytest.raises(ValueError, match=r"channels, X, Y, Z"):
        fp.sliding_window_predict(_window_model, vol[0], (8, 8, 8), 2)
    with pytest.raises(ValueError, match=r"Expected the model to return \(1, 3, 8, 8, 8\)"):
        fp.sliding_window_predict(_window_model, vol, (8, 8, 8), 3)


# --------------------------------------------------------------------------------------------
# Models whose output is known: class 1 where a channel's normalised intensity exceeds 0.5
# --------------------------------------------------------------------------------------------

PATCH = (16, 16, 8)
SCALE = 40.0  # logit scale: softmax([s(0.5 - x), s(x - 0.5)]) picks class 1 iff x > 0.5


def threshold_model(data_format="channels_last", n_channels=1, use_channel=0, patch=PATCH):
    """A 1x1x1 conv + softmax whose class-1 probability is sigmoid(2 s (x_c - 0.5))."""
    shape = (*patch, n_channels) if data_format == "channels_last" else (n_channels, *patch)
    axis = -1 if data_format == "channels_last" else 1
    inputs = keras.Input(shape, name="image")
    conv = unet3d.Conv3D(2, 1, data_format=data_format, name="output_conv")
    x = conv(inputs)
    outputs = keras.layers.Softmax(axis=axis, name="output_activation")(x)
    model = keras.Model(inputs, outputs, name="threshold")
    kernel = np.zeros((1, 1, 1, n_channels, 2), np.float32)
    kernel[..., use_channel, 0] = -SCALE
    kernel[..., use_channel, 1] = SCALE
    conv.set_weights([kernel, np.array([SCALE / 2, -SCALE / 2], np.float32)])
    return model


def write_run(run_dir, model, **config):
    """A run folder as training writes it: the whole model and its resolved config."""
    os.makedirs(run_dir, exist_ok=True)
    base = {
        "task": "segmentation",
        "patch": list(PATCH),
        "data_format": "channels_last",
        "n_classes": 2,
        "labels": {"background": 0, "tumour": 1},
        "intensity": ["ct"],
        "spacing": None,
        "file_ending": ".nii.gz",
        "channel_names": ["CT"],
        "n_base_filters": 2,
        "seed": 0,
    }
    base.update(config)
    model.save(os.path.join(run_dir, "best_model.keras"))
    with open(os.path.join(run_dir, "finetune_config.json"), "w") as f:
        json.dump(base, f)
    return str(run_dir)


def predict_args(model, inputs, output, **kw):
    """The flags of `finetune.py predict` (keyword flags: True for a switch, else values)."""
    argv = ["--model", str(model), "--input", *map(str, inputs), "--output", str(output)]
    for k, v in kw.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not False:
            argv += [f"--{k}", *map(str, v if isinstance(v, (list, tuple)) else [v])]
    return argv


def run_predict(argv):
    """`finetune.py predict` with these flags: its exit status."""
    return finetune.main(["predict", *argv])


def predict_settings(model, inputs, output, **kw):
    """The settings the command line makes of these flags."""
    parser = argparse.ArgumentParser()
    fp.add_predict_arguments(parser)
    args = parser.parse_args(predict_args(model, inputs, output, **kw))
    return finetune.settings_from_args(fp.PredictSettings, args)


def _geometry(path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


@pytest.mark.multibackend
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_predict_folder_gives_hand_thresholded_labels_on_the_input_grid(tmp_path, data_format):
    data = make_segmentation_folder(tmp_path / "data", n_cases=2, size=(20, 18, 11))
    run = write_run(tmp_path / "run", threshold_model(data_format), data_format=data_format)
    out = tmp_path / "pred"
    assert run_predict(predict_args(run, [data / "imagesTr"], out)) == 0
    assert sorted(os.listdir(out)) == ["case_000.nii.gz", "case_001.nii.gz"]
    for case in ("case_000", "case_001"):
        image_path = data / "imagesTr" / f"{case}_0000.nii.gz"
        pred_path = out / f"{case}.nii.gz"
        hu = read_xyz(image_path).astype(np.float64)
        # CT window [-1000, 1000] -> [0, 1]: x > 0.5 exactly when HU > 0.
        np.testing.assert_array_equal(read_xyz(pred_path), (hu > 0).astype(np.uint8))
        assert sitk.ReadImage(str(pred_path)).GetPixelID() == sitk.sitkUInt8
        got, want = _geometry(pred_path), _geometry(image_path)
        assert got[0] == want[0]
        for a, b in zip(got[1:], want[1:], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_predict_multichannel_uses_the_right_channel(tmp_path):
    # Channel 1 is channel 0 + 1000 HU (finetune_helpers): the model looks at channel 1 only,
    # so class 1 where HU_0 + 1000 > 0.
    data = make_segmentation_folder(tmp_path / "data", n_cases=1, size=(16, 17, 9), n_channels=2)
    model = threshold_model(n_channels=2, use_channel=1)
    run = write_run(tmp_path / "run", model, intensity=["ct", "ct"], channel_names=["CT", "CT2"])
    out = tmp_path / "pred"
    assert run_predict(predict_args(run, [data / "imagesTr"], out)) == 0
    hu1 = read_xyz(data / "imagesTr" / "case_000_0001.nii.gz").astype(np.float64)
    np.testing.assert_array_equal(read_xyz(out / "case_000.nii.gz"), (hu1 > 0).astype(np.uint8))
    # A one-channel input to this two-channel model is refused, naming the case.
    single = tmp_path / "single_0000.nii.gz"
    write_xyz(hu1.astype(np.int16), single)
    assert run_predict(predict_args(run, [single], tmp_path / "p2")) == 2


def test_predict_volume_smaller_than_patch_and_explicit_files(tmp_path, capsys):
    rng = np.random.default_rng(4)
    hu = rng.normal(0, 300, (9, 30, 5)).astype(np.int16)  # smaller than 16 x 16 x 8 in x and z
    path = tmp_path / "small.mha"  # Decathlon naming, another format
    write_xyz(hu, path)
    run = write_run(tmp_path / "run", threshold_model())
    out = tmp_path / "pred"
    assert run_predict(predict_args(run, [path], out, save_probabilities=True)) == 0
    pred = read_xyz(out / "small.mha")
    np.testing.assert_array_equal(pred, (hu > 0).astype(np.uint8))
    with np.load(out / "small.npz") as f:
        probs, values = f["probabilities"], f["class_values"]
    assert probs.shape == (2, 9, 30, 5) and probs.dtype == np.float32
    np.testing.assert_array_equal(values, [0, 1])
    x = (np.clip(hu.astype(np.float64), -1000, 1000) + 1000) / 2000
    np.testing.assert_allclose(probs[1], 1 / (1 + np.exp(-2 * SCALE * (x - 0.5))), atol=1e-4)


def test_predict_with_training_spacing_returns_to_the_input_grid(tmp_path):
    data = make_segmentation_folder(tmp_path / "data", n_cases=1, size=(32, 30, 12))
    # Trained at twice the voxel size in x and y.
    run = write_run(tmp_path / "run", threshold_model(), spacing=[1.6, 1.8, 2.5])
    out = tmp_path / "pred"
    args = predict_args(run, [data / "imagesTr"], out, save_probabilities=True)
    assert run_predict(args) == 0
    image_path = data / "imagesTr" / "case_000_0000.nii.gz"
    pred_path = out / "case_000.nii.gz"
    got, want = _geometry(pred_path), _geometry(image_path)
    assert got[0] == want[0]
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Independent reference: SimpleITK resamples the image down and the threshold back up.
    img = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    size = [
        int(round(n * s / t))
        for n, s, t in zip(img.GetSize(), img.GetSpacing(), (1.6, 1.8, 2.5), strict=True)
    ]
    coarse = sitk.Resample(
        img,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        img.GetOrigin(),
        (1.6, 1.8, 2.5),
        img.GetDirection(),
        0.0,
    )
    mask = sitk.Cast(coarse > 0, sitk.sitkUInt8)
    back = sitk.Resample(mask, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    expected = np.transpose(sitk.GetArrayFromImage(back), (2, 1, 0))
    np.testing.assert_array_equal(read_xyz(pred_path), expected)
    with np.load(out / "case_000.npz") as f:
        assert f["probabilities"].shape == (2, 32, 30, 12)


def test_predict_skips_written_cases_unless_overwrite(tmp_path):
    data = make_segmentation_folder(tmp_path / "data", n_cases=2, size=(16, 16, 8))
    run = write_run(tmp_path / "run", threshold_model())
    out = tmp_path / "pred"
    assert run_predict(predict_args(run, [data / "imagesTr"], out)) == 0
    target = out / "case_000.nii.gz"
    write_xyz(np.full((16, 16, 8), 7, np.uint8), target)  # a stand-in that must survive
    os.remove(out / "case_001.nii.gz")
    assert run_predict(predict_args(run, [data / "imagesTr"], out)) == 0
    assert (read_xyz(target) == 7).all()
    assert (out / "case_001.nii.gz").exists()
    assert run_predict(predict_args(run, [data / "imagesTr"], out, overwrite=True)) == 0
    assert set(np.unique(read_xyz(target))) <= {0, 1}
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


@pytest.mark.multibackend
def test_unet_run_folder_round_trip(tmp_path):
    """A real tiny U-Net with a softmax head, saved whole and loaded by predict."""
    base = unet3d.unet_model_3d(
        (*PATCH, 1),
        n_labels=3,
        n_base_filters=2,
        data_format="channels_last",
        depth=2,
        activation_name="softmax",
    )
    run = write_run(tmp_path / "run", base, n_classes=3, labels={"background": 0, "a": 1, "b": 2})
    model, config = fp.load_run(run)
    assert config["n_classes"] == 3
    rng = np.random.default_rng(5)
    volume = rng.random((1, 20, 16, 8)).astype(np.float32)
    probs = fp.sliding_window_predict(fp.make_predictor(model, "channels_last"), volume, PATCH, 3)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    # Where one window covers a voxel alone (x < 4: only the first window), the result is that
    # window's own output.
    direct = np.asarray(base.predict_on_batch(np.moveaxis(volume[:, :16], 0, -1)[None]))[0]
    np.testing.assert_allclose(probs[:, :4], np.moveaxis(direct, -1, 0)[:, :4], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def mean_model(patch=PATCH):
    """Softmax over [-s m, s m] of the cube mean m (minus 0.5): class 1 for bright cubes."""
    inputs = keras.Input((*patch, 1), name="image")
    x = keras.layers.GlobalAveragePooling3D(data_format="channels_last", name="gap")(inputs)
    dense = keras.layers.Dense(2, activation="softmax", name="head")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    dense.set_weights([np.array([[-10.0, 10.0]], np.float32), np.array([5.0, -5.0], np.float32)])
    return model


def _hand_probs(cubes):
    m = cubes.reshape(len(cubes), -1).mean(axis=1).astype(np.float64)
    p1 = 1 / (1 + np.exp(-20 * (m - 0.5)))
    return np.stack([1 - p1, p1], axis=1)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_classification_from_npy_cubes(tmp_path):
    rng = np.random.default_rng(6)
    x = (
        rng.random((5, *PATCH)).astype(np.float32)
        * np.array([0.2, 1.0, 1.8, 0.5, 1.2])[:, None, None, None]
    )
    np.save(tmp_path / "x_test_16x16x8.npy", x)
    np.save(tmp_path / "y_test_16x16x8.npy", np.array([0, 1, 1, 0, 1]))
    run = write_run(
        tmp_path / "run", mean_model(), task="classification", labels=None, intensity=["none"]
    )
    out = tmp_path / "pred" / "cls.csv"
    args = predict_args(run, [tmp_path / "x_test_16x16x8.npy"], out, batch_size=2)
    assert run_predict(args) == 0
    rows = _read_csv(out)
    assert [r["id"] for r in rows] == [f"x_test_16x16x8:{i}" for i in range(5)]
    probs = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    np.testing.assert_allclose(probs, _hand_probs(x), atol=1e-5)
    assert [int(r["predicted"]) for r in rows] == list(np.argmax(_hand_probs(x), axis=1))
    assert [int(r["label"]) for r in rows] == [0, 1, 1, 0, 1]


def test_classification_from_candidates_csv(tmp_path):
    csv_path, vol_dir, rows = make_candidates(tmp_path / "c", n_volumes=2, size=(40, 40, 24))
    run = write_run(tmp_path / "run", mean_model(), task="classification", labels=None)
    out = tmp_path / "pred"
    assert run_predict(predict_args(run, [csv_path], out, volumes=vol_dir)) == 0
    got = _read_csv(out / "predictions.csv")
    assert [r["id"] for r in got] == [f"{r['seriesuid']}:{i}" for i, r in enumerate(rows)]
    assert [int(r["label"]) for r in got] == [r["class"] for r in rows]
    # Reference cubes cut by hand at each candidate's voxel index (patch // 2 before it).
    for r, g in zip(rows, got, strict=True):
        vol = read_xyz(vol_dir / f"{r['seriesuid']}.mha").astype(np.float64)
        x = (np.clip(vol, -1000, 1000) + 1000) / 2000
        padded = np.pad(x, [(p, p) for p in PATCH])
        lo = [i - p // 2 + p for i, p in zip(r["index"], PATCH, strict=True)]
        cube = padded[lo[0] : lo[0] + 16, lo[1] : lo[1] + 16, lo[2] : lo[2] + 8]
        assert float(g["prob_1"]) == pytest.approx(_hand_probs(cube[None])[0, 1], abs=1e-4)
    # Without --volumes: a clear error.
    assert run_predict(predict_args(run, [csv_path], tmp_path / "p2")) == 2


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_exit_2_with_one_line(tmp_path, capsys):
    data = make_segmentation_folder(tmp_path / "data", n_cases=1, size=(16, 16, 8))
    images = data / "imagesTr"
    assert run_predict(predict_args(tmp_path / "nowhere", [images], tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "finetune_config.json" in err and err.count("\n") == 1
    run = write_run(tmp_path / "run", threshold_model())
    assert run_predict(predict_args(run, [images], tmp_path / "o", overlap=1.0)) == 2
    assert "--overlap" in capsys.readouterr().err
    assert run_predict(predict_args(run, [images], tmp_path / "o", batch_size=0)) == 2
    assert "--batch_size" in capsys.readouterr().err
    assert run_predict(predict_args(run, [tmp_path / "missing.nii.gz"], tmp_path / "o")) == 2
    assert "missing.nii.gz" in capsys.readouterr().err
    os.remove(os.path.join(run, "best_model.keras"))
    assert run_predict(predict_args(run, [images], tmp_path / "o")) == 2
    assert "best_model.keras" in capsys.readouterr().err
    with open(os.path.join(tmp_path / "run", "finetune_config.json"), "w") as f:
        json.dump({"task": "segmentation"}, f)
    assert run_predict(predict_args(run, [images], tmp_path / "o")) == 2
    assert "missing ['patch', 'data_format', 'n_classes']" in capsys.readouterr().err


def test_channels_on_different_grids_are_refused(tmp_path, capsys):
    a, b = tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"
    write_xyz(np.zeros((16, 16, 8), np.int16), a)
    write_xyz(np.zeros((16, 16, 8), np.int16), b, spacing=(0.8, 0.9, 3.0))
    run = write_run(
        tmp_path / "run",
        threshold_model(n_channels=2),
        intensity=["ct", "ct"],
        channel_names=["CT", "CT"],
    )
    assert run_predict(predict_args(run, [a, b], tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "c_0000.nii.gz" in err and "c_0001.nii.gz" in err and "spacing" in err


def test_library_raises_the_typed_error_where_it_is_checked(tmp_path, capsys):
    run = write_run(tmp_path / "run", threshold_model())
    with pytest.raises(fp.PredictInputError, match="--overlap"):
        fp.predict(predict_settings(run, [tmp_path], tmp_path / "o", overlap=1.5))
    # Refusals of the image finder and of the reader arrive as predict's own type.
    with pytest.raises(fp.PredictInputError, match="missing.nii.gz"):
        fp.predict(predict_settings(run, [tmp_path / "missing.nii.gz"], tmp_path / "o"))
    bad = tmp_path / "bad_0000.nii.gz"
    bad.write_bytes(b"not an image")
    # A volume that cannot be used is not bad input to the command: its case is named on
    # stderr and skipped, and predict returns 1 (test_bad_volumes.py covers each kind).
    assert fp.predict(predict_settings(run, [bad], tmp_path / "o")) == 1
    assert "bad_0000.nii.gz" in capsys.readouterr().err
    (tmp_path / "run" / "best_model.keras").write_bytes(b"not a model")
    with pytest.raises(fp.PredictInputError, match=r"Keras model file.*best_model\.keras"):
        fp.predict(predict_settings(run, [tmp_path], tmp_path / "o"))


def test_programming_error_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    data = make_segmentation_folder(tmp_path / "data", n_cases=1, size=(16, 16, 8))
    run = write_run(tmp_path / "run", threshold_model())

    def broken(config):
        raise KeyError("a bug in predict")

    monkeypatch.setattr(fp, "class_values", broken)
    with pytest.raises(KeyError, match="a bug in predict") as info:
        run_predict(predict_args(run, [data / "imagesTr"], tmp_path / "o"))
    assert info.traceback[-1].name == "broken"
    assert "error:" not in capsys.readouterr().err


def test_help_shows_a_real_example():
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)
    fp.add_predict_arguments(parser)
    text = parser.format_help()
    assert "python keras/finetune.py predict --model" in text
    assert "--save_probabilities" in text and "--overlap" in text


def test_interrupted_write_leaves_no_partial_file_and_rerun_completes(tmp_path, monkeypatch):
    data = make_segmentation_folder(tmp_path / "data", n_cases=2, size=(16, 16, 8))
    run = write_run(tmp_path / "run", threshold_model())
    out = tmp_path / "pred"
    real_write = sitk.WriteImage
    calls = []

    def write_then_interrupt(image, path, *args):
        calls.append(path)
        if len(calls) == 2:  # the second case: the file is half written, then Ctrl-C
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real_write(image, path, *args)

    monkeypatch.setattr(sitk, "WriteImage", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_predict(predict_args(run, [data / "imagesTr"], out))
    assert os.listdir(out) == ["case_000.nii.gz"]
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    assert run_predict(predict_args(run, [data / "imagesTr"], out)) == 0
    assert sorted(os.listdir(out)) == ["case_000.nii.gz", "case_001.nii.gz"]


def test_real_sarcoma_ct_prediction_keeps_the_grid(tmp_path):
    from conftest import SHARED_DATA, require_shared

    image = require_shared(SHARED_DATA / "sts_ct" / "imagesTr" / "STS_001_0000.nii.gz")
    run = write_run(tmp_path / "run", threshold_model(patch=(64, 64, 32)), patch=[64, 64, 32])
    out = tmp_path / "pred"
    assert run_predict(predict_args(run, [image], out, batch_size=4)) == 0
    pred_path = out / "STS_001.nii.gz"
    got, want = _geometry(pred_path), _geometry(image)
    assert got[0] == want[0]
    for a, b in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    hu = read_xyz(image).astype(np.float64)
    np.testing.assert_array_equal(read_xyz(pred_path), (hu > 0).astype(np.uint8))
