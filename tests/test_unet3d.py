"""The 3D U-Net (docs/weights.md, docs/design.md): structure, data formats, the TF bias trap,
metrics and saving."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import unet3d
from unet3d import Conv3D, Conv3DTranspose, UNet3D, unet_model_3d

BACKEND = keras.backend.backend()
TINY = dict(depth=4, n_base_filters=4, batch_normalization=True)  # depth 4: depth_7/13 exist


def _cf_to_cl(x):
    return np.moveaxis(np.asarray(x), 1, -1)


def _random_weights(model, seed=0):
    """Random weights (positive variances) so a wrong axis shows; returns them."""
    rng = np.random.default_rng(seed)
    values = []
    for w in model.weights:
        if "moving_variance" in w.path or "gamma" in w.path:
            values.append(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        else:
            values.append(rng.normal(0, 0.3, w.shape).astype("float32"))
    model.set_weights(values)
    return values


# ---------------------------------------------------------------------------------- structure


def test_import_sets_channels_first():
    # A fresh interpreter (the numpy backend starts fast): the import itself flips the setting.
    code = (
        "import sys; sys.path.insert(0, 'keras'); import keras;"
        "keras.config.set_image_data_format('channels_last'); import unet3d;"
        "print(keras.config.image_data_format())"
    )
    env = dict(os.environ, KERAS_BACKEND="numpy")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "channels_first"


def test_star_import_exports_and_dependencies():
    ns: dict = {}
    exec("from unet3d import *", ns)
    for name in (
        "unet_model_3d",
        "keras",
        "Conv3D",
        "GlobalAveragePooling3D",
        "Dense",
        "Softmax",
        "dice_coef",
        "dice_coef_loss",
        "bce_dice_loss",
        "mean_iou",
    ):
        assert name in ns, name
    assert ns["keras"] is keras and ns["Dense"] is keras.layers.Dense
    assert ns["Conv3D"] is Conv3D and issubclass(Conv3D, keras.layers.Conv3D)  # the fixed one
    assert set(unet3d.__all__) <= set(ns)
    with open(unet3d.__file__) as fh:
        src = fh.read()
    imports = set(re.findall(r"^(?:import|from)\s+(\w+)", src, re.M))
    assert imports <= {
        "__future__",
        "collections",
        "contextlib",
        "io",
        "os",
        "tempfile",
        "typing",
        "zipfile",
        "h5py",
        "keras",
    }, imports


def test_default_model_parameter_count_and_channels():
    model = unet_model_3d((1, 64, 64, 32), batch_normalization=True)
    assert isinstance(model, UNet3D)
    assert model.count_params() == 16_324_929  # the published Genesis_Chest_CT.h5 network
    channels = [model.get_layer(f"depth_{k}_relu").output.shape[1] for k in range(14)]
    assert channels == [32, 64, 64, 128, 128, 256, 256, 512, 256, 256, 128, 128, 64, 64]
    assert model.get_layer("depth_7_relu").output.shape[1:] == (512, 8, 8, 4)
    assert model.get_layer("depth_13_relu").output.shape[1:] == (64, 64, 64, 32)
    assert model.output.shape[1:] == (1, 64, 64, 32)
    assert model.get_layer("depth_0_bn").axis in (1, [1])


def test_parameter_count_by_hand_small():
    # depth 2, 2 base filters, 1 input channel, no BN, 3 labels: sum of (27*in + 1) * out.
    model = unet_model_3d((1, 8, 8, 8), depth=2, n_base_filters=2, n_labels=3)
    convs = [(1, 2), (2, 4), (4, 4), (4, 8), (8 + 4, 4), (4, 4)]
    expected = sum((27 * i + 1) * o for i, o in convs) + (4 + 1) * 3
    assert model.count_params() == expected
    # Deconvolution adds one Conv3DTranspose per decoder level: 8 in -> 8 out, kernel 2**3.
    deconv = unet_model_3d((1, 8, 8, 8), depth=2, n_base_filters=2, n_labels=3, deconvolution=True)
    assert deconv.count_params() == expected + (8 * 8 * 8 + 8)
    up = deconv.get_layer("level_0_up")
    assert (
        isinstance(up, Conv3DTranspose) and up.kernel_size == (2, 2, 2) and up.strides == (2, 2, 2)
    )


def test_default_deconvolution_parameter_count():
    model = unet_model_3d((1, 64, 64, 32), batch_normalization=True, deconvolution=True)
    extra = sum(8 * c * c + c for c in (512, 256, 128))
    assert model.count_params() == 16_324_929 + extra


def test_every_layer_named_stably():
    model = unet_model_3d((1, 16, 16, 8), depth=2, n_base_filters=2, batch_normalization=True)
    names = [layer.name for layer in model.layers]
    blocks = [f"depth_{k}_{part}" for k in range(6) for part in ("conv", "bn", "relu")]
    others = [
        "input",
        "level_0_pool",
        "level_0_up",
        "level_0_concat",
        "output_conv",
        "output_activation",
    ]
    assert sorted(names) == sorted(blocks + others)
    # Two builds give the same names (no global counters leak into them).
    again = unet_model_3d((1, 16, 16, 8), depth=2, n_base_filters=2, batch_normalization=True)
    assert [layer.name for layer in again.layers] == names
    assert type(model.get_layer("depth_0_conv")) is Conv3D
    assert model.get_layer("depth_0_conv").data_format == "channels_first"


def test_channels_last_has_same_weight_shapes():
    cf = unet_model_3d((1, 16, 16, 8), **TINY)
    cl = unet_model_3d((16, 16, 8, 1), data_format="channels_last", **TINY)
    assert [(w.path, w.shape) for w in cf.weights] == [(w.path, w.shape) for w in cl.weights]
    assert cl.output.shape[1:] == (16, 16, 8, 1)
    assert cl.get_layer("depth_3_bn").axis in (-1, 4, [4])
    assert cl.get_layer("depth_3_conv").data_format == "channels_last"


def test_data_format_none_means_channels_first_even_if_global_is_last():
    before = keras.config.image_data_format()
    try:
        keras.config.set_image_data_format("channels_last")
        model = unet_model_3d((1, 16, 16, 8), depth=2, n_base_filters=2)
    finally:
        keras.config.set_image_data_format(before)
    assert model.output.shape[1:] == (1, 16, 16, 8)
    assert all(
        getattr(layer, "data_format", "channels_first") == "channels_first"
        for layer in model.layers
    )


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((1, 60, 64, 32), {}, "rows=60; the nearest rows that work are 56 or 64"),
        ((1, 64, 64, 30), {}, "deps=30; the nearest deps that work are 24 or 32"),
        ((1, 64, 5, 32), {}, "cols=5; the nearest cols that work are 8"),
        (
            (1, 64, 64, 10),
            dict(depth=3),
            "divisible by pool_size ** (depth - 1) = 4 along deps (pool_size=(2, 2, 2), "
            "depth=3). Received: input_shape=(1, 64, 64, 10), deps=10; the nearest deps that "
            "work are 8 or 12",
        ),
        (
            (64, 64, 32, 1),
            dict(data_format="channels_last", pool_size=(2, 2, 3)),
            "= 27 along deps (pool_size=(2, 2, 3), depth=4). "
            "Received: input_shape=(64, 64, 32, 1), deps=32; the nearest deps that work are "
            "27 or 54.",
        ),
        ((64, 64, 32), {}, "Expected input_shape=(channels, rows, cols, deps)"),
        ((1, 64, 64, 32), dict(data_format="NCDHW"), "Received: data_format='NCDHW'"),
        ((1, 64, 64, 32), dict(depth=0), "Expected depth >= 1"),
    ],
)
def test_bad_inputs_get_clear_errors(shape, kwargs, message):
    with pytest.raises(ValueError) as info:
        unet_model_3d(shape, **kwargs)
    assert message in str(info.value)


def test_sizes_that_divide_are_accepted():
    unet_model_3d((1, 24, 40, 8), depth=4, n_base_filters=2)
    unet_model_3d((1, None, None, None), depth=4, n_base_filters=2)
    unet_model_3d((1, 12, 12, 12), depth=2, n_base_filters=2, pool_size=3)
    assert unet3d.valid_spatial_sizes(32, 8) == (32, 32)
    assert unet3d.valid_spatial_sizes(3, 8) == (8, 8)


# ------------------------------------------------------------------------ the TF bias trap


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the defect is in Keras' TensorFlow backend")
def test_keras_tf_channels_first_bias_defect_still_exists():
    """Keras' own channels-first Conv3D adds its bias along depth when depth == filters.

    keras.ops.add on TF turns `x + b` (b with one non-unit axis) into tf.nn.bias_add and picks
    NHWC when x's last size equals len(b). If this test fails, Keras has fixed it: our Conv3D
    subclass can go (its own tests below still hold either way).
    """
    rng = np.random.default_rng(0)
    x = rng.random((1, 4, 3, 3, 4)).astype("float32")
    b = np.array([1.0, 2.0, 3.0, 4.0], "float32").reshape(1, 4, 1, 1, 1)
    wrong = np.asarray(ops.add(x, b))
    assert np.allclose(wrong, x + b.reshape(1, 1, 1, 1, 4))  # added along the last axis
    assert not np.allclose(wrong, x + b)
    x5 = rng.random((1, 4, 3, 3, 5)).astype("float32")  # depth != channels: right
    np.testing.assert_allclose(np.asarray(ops.add(x5, b)), x5 + b, rtol=1e-6)

    # The layer: 4 filters, depth 4, channels-first, eager and compiled.
    layer = keras.layers.Conv3D(4, 3, padding="same", data_format="channels_first")
    inp = rng.random((2, 1, 6, 6, 4)).astype("float32")
    layer.build(inp.shape)
    kernel = rng.normal(size=layer.kernel.shape).astype("float32")
    layer.set_weights([kernel, b.ravel()])
    right = _numpy_conv3d_same(inp, kernel, b.ravel())
    assert np.abs(np.asarray(layer(inp)) - right).max() > 0.5
    x_in = keras.Input(inp.shape[1:])
    compiled = keras.Model(x_in, layer(x_in))
    compiled.compile(jit_compile=True)  # XLA, as model.fit / predict may run it
    assert np.abs(compiled.predict(inp, verbose=0) - right).max() > 0.5
    no_bias = keras.layers.Conv3D(
        4, 3, padding="same", data_format="channels_first", use_bias=False
    )
    no_bias.build(inp.shape)
    no_bias.set_weights([kernel])
    np.testing.assert_allclose(np.asarray(no_bias(inp)), right - b, atol=1e-4)  # the conv is right
    fixed = Conv3D(4, 3, padding="same", data_format="channels_first")
    fixed.build(inp.shape)
    fixed.set_weights([kernel, b.ravel()])
    np.testing.assert_allclose(np.asarray(fixed(inp)), right, atol=1e-4)


def _numpy_conv3d_same(x, kernel, bias):
    """Channels-first 3D cross-correlation, 'same' padding, stride 1, by explicit loops over
    taps."""
    kr, kc, kd, cin, cout = kernel.shape
    n, _, r, c, d = x.shape
    pr, pc, pd = kr // 2, kc // 2, kd // 2
    padded = np.zeros((n, cin, r + kr - 1, c + kc - 1, d + kd - 1), np.float64)
    padded[:, :, pr : pr + r, pc : pc + c, pd : pd + d] = x
    out = np.zeros((n, cout, r, c, d), np.float64)
    for i in range(kr):
        for j in range(kc):
            for k in range(kd):
                patch = padded[:, :, i : i + r, j : j + c, k : k + d]  # (n, cin, r, c, d)
                out += np.einsum("nirck,io->norck", patch, kernel[i, j, k])
    return out + bias.reshape(1, cout, 1, 1, 1)


def _numpy_conv3d_transpose_k2s2(x, kernel, bias):
    """Channels-first transposed conv, kernel 2, stride 2: each voxel paints a 2x2x2 block."""
    n, cin, r, c, d = x.shape
    cout = kernel.shape[3]  # Keras' transposed kernel: (kr, kc, kd, out, in)
    out = np.zeros((n, cout, 2 * r, 2 * c, 2 * d), np.float64)
    for a in range(2):
        for b in range(2):
            for e in range(2):
                out[:, :, a::2, b::2, e::2] = np.einsum("nirck,oi->norck", x, kernel[a, b, e])
    return out + bias.reshape(1, cout, 1, 1, 1)


@pytest.mark.multibackend
@pytest.mark.parametrize("filters, depth", [(4, 4), (3, 4), (2, 2)])
def test_conv3d_matches_numpy_reference(filters, depth):
    rng = np.random.default_rng(filters)
    x = rng.random((2, 2, 4, 3, depth)).astype("float32")
    layer = Conv3D(filters, 3, padding="same", data_format="channels_first")
    layer.build(x.shape)
    kernel = rng.normal(size=(3, 3, 3, 2, filters)).astype("float32")
    bias = rng.normal(size=filters).astype("float32") * 3
    layer.set_weights([kernel, bias])
    want = _numpy_conv3d_same(x, kernel, bias)
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), want, atol=1e-4)
    # Compiled, inside a model (XLA on TF; always on JAX; torch.compile on PyTorch).
    inp = keras.Input(x.shape[1:])
    model = keras.Model(inp, layer(inp))
    model.compile(jit_compile=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, atol=1e-4)
    # Channels-last: the same numbers, moved.
    cl = Conv3D(filters, 3, padding="same", data_format="channels_last")
    cl.build(_cf_to_cl(x).shape)
    cl.set_weights([kernel, bias])
    np.testing.assert_allclose(ops.convert_to_numpy(cl(_cf_to_cl(x))), _cf_to_cl(want), atol=1e-4)


@pytest.mark.multibackend
def test_conv3d_transpose_matches_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.random((2, 3, 2, 3, 2)).astype("float32")  # output depth 4 == filters: the trap
    layer = Conv3DTranspose(4, 2, strides=2, data_format="channels_first")
    layer.build(x.shape)
    kernel = rng.normal(size=(2, 2, 2, 4, 3)).astype("float32")
    bias = rng.normal(size=4).astype("float32") * 3
    layer.set_weights([kernel, bias])
    want = _numpy_conv3d_transpose_k2s2(x, kernel, bias)
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), want, atol=1e-4)
    inp = keras.Input(x.shape[1:])
    model = keras.Model(inp, layer(inp))
    model.compile(jit_compile=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, atol=1e-4)


@pytest.mark.multibackend
@pytest.mark.parametrize("deconvolution", [False, True])
def test_channels_first_network_equals_channels_last(deconvolution):
    # 8x8x8, 2 base filters: depth_2_conv has 4 filters at depth 4 and the transposed conv
    # 8 filters at depth 8, the trap's case.
    small = dict(depth=2, n_base_filters=2, batch_normalization=True, deconvolution=deconvolution)
    cf = unet_model_3d((1, 8, 8, 8), **small)
    cl = unet_model_3d((8, 8, 8, 1), data_format="channels_last", **small)
    values = _random_weights(cf)
    cl.set_weights(values)
    x = np.random.default_rng(2).random((2, 1, 8, 8, 8)).astype("float32")
    # XLA on TF (where the trap was found) and JAX. PyTorch runs eager, its default ("auto");
    # torch.compile of these two models takes about 4 minutes on 2 cores, and the conv tests
    # above already run our layers under it.
    for m in (cf, cl):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=BACKEND != "torch")
    out_cf = cf.predict(x, verbose=0)
    out_cl = cl.predict(_cf_to_cl(x), verbose=0)
    assert out_cf.std() > 1e-3  # not saturated: differences would show
    np.testing.assert_allclose(_cf_to_cl(out_cf), out_cl, atol=1e-5)

    # One training step (batch-norm statistics, gradients, update) gives the same weights.
    y = np.random.default_rng(3).random((2, 1, 8, 8, 8)).astype("float32")
    loss_cf = cf.train_on_batch(x, y)
    loss_cl = cl.train_on_batch(_cf_to_cl(x), _cf_to_cl(y))
    np.testing.assert_allclose(loss_cf, loss_cl, rtol=1e-4)
    moved = 0
    for a, b, v in zip(cf.weights, cl.weights, values, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, err_msg=a.path)
        moved += not np.allclose(np.asarray(a), v)
    assert moved > len(values) // 2


# -------------------------------------------------------------------------- losses, metrics


def _np_dice(t, p, smooth=1.0):
    t, p = t.astype(np.float64).ravel(), p.astype(np.float64).ravel()
    return (2 * (t * p).sum() + smooth) / (t.sum() + p.sum() + smooth)


def _np_mean_iou(t, p):
    truth = t.ravel() > 0.5
    scores = []
    for thr in np.linspace(0.5, 0.95, 10):
        pred = p.ravel() > thr
        ious = []
        for cls in (True, False):
            union = np.sum((pred == cls) | (truth == cls))
            if union:
                ious.append(np.sum((pred == cls) & (truth == cls)) / union)
        scores.append(np.mean(ious))
    return np.mean(scores)


@pytest.mark.multibackend
def test_losses_and_metrics_match_numpy():
    rng = np.random.default_rng(4)
    t = (rng.random((2, 1, 4, 4, 4)) > 0.6).astype("float32")
    p = rng.random((2, 1, 4, 4, 4)).astype("float32")
    dice = _np_dice(t, p)
    assert float(unet3d.dice_coef(t, p)) == pytest.approx(dice, rel=1e-5)
    assert float(unet3d.dice_coef(t, p, smooth=0.0)) == pytest.approx(_np_dice(t, p, 0.0), rel=1e-5)
    assert float(unet3d.dice_coef_loss(t, p)) == pytest.approx(1 - dice, rel=1e-5)
    pc = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    bce = -(t * np.log(pc) + (1 - t) * np.log(1 - pc))
    got = np.asarray(unet3d.bce_dice_loss(t, p))
    assert got.shape == t.shape[:-1]
    np.testing.assert_allclose(got, 0.5 * bce.mean(axis=-1) - dice, rtol=1e-5, atol=1e-6)
    assert float(unet3d.mean_iou(t, p)) == pytest.approx(_np_mean_iou(t, p), rel=1e-6)


@pytest.mark.multibackend
def test_metrics_hand_values():
    t = np.array([1, 1, 0, 0], "float32")
    p = np.array([1.0, 0.0, 0.0, 0.0], "float32")
    assert float(unet3d.dice_coef(t, p)) == pytest.approx((2 * 1 + 1) / (2 + 1 + 1))
    # Thresholds all give pred=[1,0,0,0]: foreground IoU 1/2, background IoU 2/3.
    assert float(unet3d.mean_iou(t, p)) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # 0.7 is above thresholds 0.5..0.65 (4 of 10) only.
    p2 = np.array([0.7, 0.7, 0.0, 0.0], "float32")
    assert float(unet3d.mean_iou(t, p2)) == pytest.approx((4 * 1.0 + 6 * (0 + 0.5) / 2) / 10)
    # Empty truth and prediction: only background counts, IoU 1; Dice 1 through smoothing.
    z = np.zeros(4, "float32")
    assert float(unet3d.mean_iou(z, z)) == pytest.approx(1.0)
    assert float(unet3d.dice_coef(z, z)) == pytest.approx(1.0)


@pytest.mark.multibackend
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_foreground_dice_leaves_the_background_out(data_format):
    rng = np.random.default_rng(7)
    fg = (rng.random((2, 4, 4, 4)) > 0.7).astype("float32")
    prob = rng.random((2, 4, 4, 4)).astype("float32")
    axis = 1 if data_format == "channels_first" else -1
    t = np.stack([1 - fg, fg], axis=axis)
    p = np.stack([1 - prob, prob], axis=axis)
    want = _np_dice(fg, prob)  # the Dice of the foreground channel alone
    got = unet3d.foreground_dice_coef(t, p, channel_axis=axis)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(unet3d.dice_coef(t, p)) != pytest.approx(want, rel=1e-3)
    pc = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    bce = -(t * np.log(pc) + (1 - t) * np.log(1 - pc))
    loss = np.asarray(unet3d.bce_foreground_dice_loss(data_format)(t, p))
    np.testing.assert_allclose(loss, 0.5 * bce.mean(axis=-1) - want, rtol=1e-5, atol=1e-6)
    metric = unet3d.foreground_dice_metric(data_format)
    assert metric.__name__ == "foreground_dice_coef"
    assert float(metric(t, p)) == pytest.approx(want, rel=1e-5)


@pytest.mark.multibackend
def test_foreground_dice_of_an_all_background_output_is_near_zero():
    # 1 foreground voxel of 64: the background-inclusive Dice of an all-background output is
    # (2 * 63 + 1) / (64 + 64 + 1); the foreground Dice is 1 / (1 + 0 + 1) = 0.5 through the
    # smoothing, and 1 / 101 with 100 foreground voxels.
    t = np.zeros((1, 2, 4, 4, 4), "float32")
    t[:, 0] = 1
    t[0, 0, 0, 0, 0], t[0, 1, 0, 0, 0] = 0, 1
    p = np.zeros_like(t)
    p[:, 0] = 1
    assert float(unet3d.dice_coef(t, p)) == pytest.approx(127 / 129)
    assert float(unet3d.foreground_dice_coef(t, p)) == pytest.approx(1 / 2)
    big = np.zeros((1, 2, 10, 10, 1), "float32")
    big[:, 1] = 1
    none = np.zeros_like(big)
    none[:, 0] = 1
    assert float(unet3d.foreground_dice_coef(big, none)) == pytest.approx(1 / 101)


def test_foreground_dice_refuses_one_channel_and_bad_formats():
    with pytest.raises(ValueError, match="at least two channels"):
        unet3d.foreground_dice_coef(
            np.zeros((1, 1, 4, 4, 4), "float32"), np.zeros((1, 1, 4, 4, 4), "float32")
        )
    with pytest.raises(ValueError, match="Expected data_format"):
        unet3d.bce_foreground_dice_loss("NCDHW")
    with pytest.raises(ValueError, match="Expected data_format"):
        unet3d.foreground_dice_metric("NCDHW")


# ------------------------------------------------------------------------------- saving


@pytest.mark.multibackend
def test_save_and_load_round_trips(tmp_path):
    small = dict(depth=2, n_base_filters=2, batch_normalization=True)
    model = unet_model_3d((1, 8, 8, 8), **small)
    values = _random_weights(model)
    x = np.random.default_rng(6).random((1, 1, 8, 8, 8)).astype("float32")
    want = model.predict(x, verbose=0)

    def check(m, data_format="channels_first"):
        if data_format == "channels_first":
            np.testing.assert_allclose(m.predict(x, verbose=0), want, atol=1e-5)
        else:
            np.testing.assert_allclose(
                m.predict(_cf_to_cl(x), verbose=0), _cf_to_cl(want), atol=1e-5
            )

    def fresh(data_format="channels_first"):
        shape = (1, 8, 8, 8) if data_format == "channels_first" else (8, 8, 8, 1)
        m = unet_model_3d(shape, data_format=data_format, **small)
        assert not np.allclose(m.get_weights()[0], values[0])
        return m

    model.save_weights(tmp_path / "a.weights.h5")
    model.save(tmp_path / "a.h5")  # the legacy name the original used
    model.save(tmp_path / "a.keras")
    loaded = keras.models.load_model(tmp_path / "a.keras")
    assert isinstance(loaded, UNet3D)
    assert type(loaded.get_layer("depth_1_conv")) is Conv3D
    check(loaded)
    for name in ("a.weights.h5", "a.h5", "a.keras"):
        m = fresh()
        m.load_weights(tmp_path / name)
        np.testing.assert_array_equal(m.get_weights()[3], values[3])
    check(m)
    # Weights saved channels-first load into a channels-last model, from each format.
    for name in ("a.weights.h5", "a.h5", "a.keras"):
        cl = fresh("channels_last")
        cl.load_weights(str(tmp_path / name))
        check(cl, "channels_last")
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "a.keras", "a.weights.h5"]  # no temp files left


@pytest.mark.parametrize("name", ["w.weights.h5", "m.keras", "m.h5"])
def test_interrupted_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, name):
    model = unet_model_3d((1, 8, 8, 8), depth=2, n_base_filters=2)
    target = tmp_path / name
    target.write_bytes(b"previous")
    method = "save_weights" if name.endswith(".weights.h5") else "save"
    real = getattr(keras.Model, method)

    def interrupted(self, filepath, *args, **kwargs):
        assert os.fspath(filepath) != os.fspath(target)  # writes elsewhere first
        assert os.path.dirname(os.fspath(filepath)) == str(
            tmp_path
        )  # same folder: rename is atomic
        real(self, filepath, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, method, interrupted)
    with pytest.raises(KeyboardInterrupt):
        getattr(model, method)(target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == [name]


def test_load_errors_are_clear(tmp_path):
    model = unet_model_3d((1, 8, 8, 8), depth=2, n_base_filters=2)
    with pytest.raises(FileNotFoundError, match="Received: filepath=.*missing.h5"):
        model.load_weights(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        model.load_weights(tmp_path / "missing.weights.h5")
    wider = unet_model_3d((1, 8, 8, 8), depth=2, n_base_filters=4)
    wider.save_weights(tmp_path / "wider.weights.h5")
    with pytest.raises(ValueError) as info:
        model.load_weights(tmp_path / "wider.weights.h5")
    msg = str(info.value)
    assert "at layer 'depth_0_conv'" in msg
    assert "kernel (3, 3, 3, 1, 2)" in msg and "(3, 3, 3, 1, 4)" in msg
    assert len(msg) < 600  # not Keras' dump of every variable's values
    # Keras alone loads the shared layers of a file with extra batch norm, with a warning only.
    with_bn = unet_model_3d((1, 8, 8, 8), depth=2, n_base_filters=2, batch_normalization=True)
    with_bn.save_weights(tmp_path / "bn.weights.h5")
    with pytest.raises(
        ValueError, match="the file has layers with weights the model lacks, first 'depth_0_bn'"
    ):
        model.load_weights(tmp_path / "bn.weights.h5")
    with_bn.save(tmp_path / "bn.keras")
    with pytest.raises(
        ValueError, match="the file has layers with weights the model lacks, first 'depth_0_bn'"
    ):
        model.load_weights(tmp_path / "bn.keras")
    wider.save(tmp_path / "wider.keras")
    with pytest.raises(ValueError, match=r"at layer 'depth_0_conv'.*\(3, 3, 3, 1, 4\)"):
        model.load_weights(tmp_path / "wider.keras")
    before = [np.asarray(w).copy() for w in model.weights]
    model.load_weights(
        tmp_path / "bn.weights.h5", skip_mismatch=True
    )  # the escape hatch stays Keras'
    assert any(
        not np.allclose(a, np.asarray(w)) for a, w in zip(before, model.weights, strict=True)
    )
