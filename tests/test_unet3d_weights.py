"""Loading Keras 2 HDF5 weight files (as published for Models Genesis) into our U-Net.

The files are written at test time by tf_keras (Keras 2 API, another tool than ours), see
keras2_reference.py; reference outputs come from a channels-last tf_keras twin.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from keras2_reference import keras2_reference
from unet3d import check_legacy_h5_weights, unet_model_3d


def _ours(ref, data_format="channels_first", **changes):
    cfg = dict(ref.config, **changes)
    c, r, co, d = cfg.pop("input_shape")
    shape = (c, r, co, d) if data_format == "channels_first" else (r, co, d, c)
    return unet_model_3d(shape, data_format=data_format, **cfg)


@pytest.fixture(scope="module")
def ref_bn():
    """Depth 4 (as published), 4 base filters, batch norm, UpSampling, 16x16x8."""
    return keras2_reference()


@pytest.fixture(scope="module")
def ref_deconv():
    """Depth 2, transposed-conv decoder, no batch norm, 2 labels."""
    return keras2_reference(
        input_shape=(2, 8, 8, 4),
        depth=2,
        batch_normalization=False,
        deconvolution=True,
        n_labels=2,
        seed=1,
    )


def test_keras2_file_layout(ref_bn):
    """The files look like the published one: layer_names, depth_k_* groups, kernel:0 names."""
    with h5py.File(ref_bn.weights_only, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        assert f.attrs["keras_version"].startswith("2.")
        conv = f["depth_0_conv"]
        weight_names = [
            w.decode() if isinstance(w, bytes) else w for w in conv.attrs["weight_names"]
        ]
        assert weight_names == ["depth_0_conv/kernel:0", "depth_0_conv/bias:0"]
        assert conv["depth_0_conv/kernel:0"].shape == (
            3,
            3,
            3,
            1,
            4,
        )  # (k, k, k, in, out) in both layouts
        bn = [
            w.decode() if isinstance(w, bytes) else w for w in f["depth_0_bn"].attrs["weight_names"]
        ]
        assert [b.split("/")[-1] for b in bn] == [
            "gamma:0",
            "beta:0",
            "moving_mean:0",
            "moving_variance:0",
        ]
    assert names[1:4] == ["depth_0_conv", "depth_0_bn", "depth_0_relu"]
    assert "depth_13_relu" in names and not any(n.startswith("output") for n in names)
    with h5py.File(ref_bn.whole_model, "r") as f:
        assert "layer_names" not in f.attrs and "model_config" in f.attrs
        assert "depth_13_conv" in f["model_weights"]


@pytest.mark.multibackend
@pytest.mark.parametrize("which", ["weights_only", "whole_model"])
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_load_keras2_file_matches_reference(ref_bn, which, data_format):
    model = _ours(ref_bn, data_format)
    model.load_weights(getattr(ref_bn, which))
    x = ref_bn.x if data_format == "channels_first" else np.moveaxis(ref_bn.x, 1, -1)
    out = model.predict(x, verbose=0)
    if data_format == "channels_last":
        out = np.moveaxis(out, -1, 1)
    assert ref_bn.expected.std() > 1e-2
    np.testing.assert_allclose(out, ref_bn.expected, atol=1e-5)
    # Every value the file holds arrived where it belongs (BN moving statistics included).
    np.testing.assert_array_equal(
        np.asarray(model.get_layer("depth_0_bn").moving_variance), ref_bn.weights[5]
    )


@pytest.mark.multibackend
def test_load_keras2_deconvolution_file(ref_deconv):
    for data_format in ("channels_first", "channels_last"):
        model = _ours(ref_deconv, data_format)
        model.load_weights(ref_deconv.whole_model)
        x = ref_deconv.x if data_format == "channels_first" else np.moveaxis(ref_deconv.x, 1, -1)
        out = model.predict(x, verbose=0)
        if data_format == "channels_last":
            out = np.moveaxis(out, -1, 1)
        np.testing.assert_allclose(out, ref_deconv.expected, atol=1e-5)


def test_mismatched_keras2_file_names_first_differing_layer(ref_bn):
    wider = _ours(ref_bn, n_base_filters=8)
    with pytest.raises(ValueError) as info:
        wider.load_weights(ref_bn.weights_only)
    msg = str(info.value)
    assert "layer with weights #0 differs" in msg
    assert "Expected (model): 'depth_0_conv' with kernel (3, 3, 3, 1, 8), bias (8,)" in msg
    assert "Received (file): 'depth_0_conv' with kernel:0 (3, 3, 3, 1, 4), bias:0 (4,)" in msg

    no_bn = _ours(ref_bn, batch_normalization=False)
    with pytest.raises(ValueError) as info:
        no_bn.load_weights(ref_bn.whole_model)
    msg = str(info.value)
    # Layer #1 is depth_1_conv in the model but depth_0_bn in the file.
    assert (
        "#1 differs" in msg and "'depth_1_conv'" in msg and "'depth_0_bn' with gamma:0 (4,)" in msg
    )

    shallower = _ours(ref_bn, depth=3)
    with pytest.raises(
        ValueError,
        match=r"#12 differs.*'depth_6_conv' with kernel \(3, 3, 3, 48, 16\)"
        r".*The model has 21 layers with weights, the file 29",
    ):
        shallower.load_weights(ref_bn.weights_only)

    # Different labels: only the last layer (generated name in the file) differs.
    two = _ours(ref_bn, n_labels=2)
    with pytest.raises(
        ValueError,
        match=r"#28 differs.*'output_conv' with kernel \(1, 1, 1, 8, 2\)"
        r".*Received \(file\): 'conv3d' with kernel:0 \(1, 1, 1, 8, 1\)",
    ):
        two.load_weights(ref_bn.weights_only)


def test_non_keras_h5_file_is_rejected(tmp_path, ref_bn):
    path = tmp_path / "not_weights.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    model = _ours(ref_bn)
    with pytest.raises(
        ValueError,
        match=r"Expected a Keras 2 HDF5 weights file.*Received: filepath=.*not_weights.h5",
    ):
        model.load_weights(path)
    check_legacy_h5_weights(model, ref_bn.weights_only)  # the helper alone: fits, no error


def test_keras2_file_loads_into_our_saved_formats(tmp_path, ref_bn):
    """Published weights -> our model -> every format we write -> same outputs."""
    model = _ours(ref_bn)
    model.load_weights(ref_bn.whole_model)
    model.save_weights(tmp_path / "w.weights.h5")
    model.save(tmp_path / "m.h5")
    for path in (tmp_path / "w.weights.h5", tmp_path / "m.h5"):
        other = _ours(ref_bn, "channels_last")
        other.load_weights(path)
        out = np.moveaxis(other.predict(np.moveaxis(ref_bn.x, 1, -1), verbose=0), -1, 1)
        np.testing.assert_allclose(out, ref_bn.expected, atol=1e-5)
