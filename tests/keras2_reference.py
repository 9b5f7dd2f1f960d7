"""Keras 2 reference files for the weight-loading tests, written with tf_keras, not our code.

The original Models Genesis weights are Keras 2 HDF5 files of a channels-first 3D U-Net. This
module builds that architecture independently with the ``tf_keras`` package (the Keras 2 API),
gives it known random weights, and writes it both ways Keras 2 did: ``save_weights("x.h5")``
(weights at the file root) and ``save("x.h5")`` (weights under ``model_weights``). Only the
block layers carry ``depth_{k}_*`` names, as in the original; pooling, upsampling, the output
conv and the activation keep tf_keras' generated names.

Reference outputs come from a channels-last tf_keras twin with the same weights, because
TensorFlow on CPU cannot run a channels-first 3D convolution.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np

_CACHE: dict = {}
_TMP = tempfile.mkdtemp(prefix="keras2_reference_")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@dataclass(frozen=True)
class Keras2Reference:
    """Paths and reference data of one Keras 2 U-Net."""

    weights_only: str  # save_weights("x.h5")
    whole_model: str  # save("x.h5")
    config: dict
    x: np.ndarray  # channels-first input batch
    expected: np.ndarray  # channels-first output of the twin
    weights: list  # the values written, in get_weights() order


def _build(tfk, cfg: dict, data_format: str):
    layers = tfk.layers
    cf = data_format == "channels_first"
    axis = 1 if cf else -1
    c, r, co, d = cfg["input_shape"]
    inp = layers.Input((c, r, co, d) if cf else (r, co, d, c))
    k = 0

    def block(x, f):
        nonlocal k
        x = layers.Conv3D(
            f, (3, 3, 3), padding="same", data_format=data_format, name=f"depth_{k}_conv"
        )(x)
        if cfg["batch_normalization"]:
            x = layers.BatchNormalization(axis=axis, name=f"depth_{k}_bn")(x)
        x = layers.Activation("relu", name=f"depth_{k}_relu")(x)
        k += 1
        return x

    x, skips = inp, []
    depth, base = cfg["depth"], cfg["n_base_filters"]
    for level in range(depth):
        x = block(x, base * 2**level)
        x = block(x, base * 2**level * 2)
        if level < depth - 1:
            skips.append(x)
            x = layers.MaxPooling3D((2, 2, 2), data_format=data_format)(x)
    for level in range(depth - 2, -1, -1):
        if cfg["deconvolution"]:
            x = layers.Conv3DTranspose(
                x.shape[axis], (2, 2, 2), strides=(2, 2, 2), data_format=data_format
            )(x)
        else:
            x = layers.UpSampling3D((2, 2, 2), data_format=data_format)(x)
        x = layers.Concatenate(axis=axis)([x, skips[level]])
        x = block(x, skips[level].shape[axis])
        x = block(x, skips[level].shape[axis])
    x = layers.Conv3D(cfg["n_labels"], (1, 1, 1), data_format=data_format)(x)
    x = layers.Activation("sigmoid")(x)
    return tfk.Model(inp, x)


def keras2_reference(
    input_shape=(1, 16, 16, 8),
    depth: int = 4,
    n_base_filters: int = 4,
    batch_normalization: bool = True,
    deconvolution: bool = False,
    n_labels: int = 1,
    seed: int = 0,
) -> Keras2Reference:
    """Write (once per process and config) a Keras 2 U-Net's .h5 files and a reference output."""
    cfg = dict(
        input_shape=tuple(input_shape),
        depth=depth,
        n_base_filters=n_base_filters,
        batch_normalization=batch_normalization,
        deconvolution=deconvolution,
        n_labels=n_labels,
    )
    key = (tuple(sorted(cfg.items())), seed)
    if key in _CACHE:
        return _CACHE[key]
    import tf_keras as tfk

    rng = np.random.default_rng(seed)
    cf_model = _build(tfk, cfg, "channels_first")
    weights = []
    for w in cf_model.weights:
        shape = tuple(w.shape)
        if "moving_variance" in w.name or "gamma" in w.name:
            value = rng.uniform(0.5, 1.5, shape)
        else:
            # Large enough that a wrong bias axis or a transposed kernel shows far above 1e-5.
            fan_in = max(1, int(np.prod(shape[:-1])))
            value = (
                rng.normal(0, 1.0 / np.sqrt(fan_in), shape)
                if "kernel" in w.name
                else rng.normal(0, 0.3, shape)
            )
        weights.append(value.astype("float32"))
    cf_model.set_weights(weights)
    folder = os.path.join(_TMP, f"ref{len(_CACHE)}")
    os.makedirs(folder)
    weights_only = os.path.join(folder, "weights_only.h5")
    whole_model = os.path.join(folder, "whole_model.h5")
    cf_model.save_weights(weights_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "HDF5 is legacy": writing that legacy format is the point
        cf_model.save(whole_model)

    cl_model = _build(tfk, cfg, "channels_last")
    cl_model.set_weights(weights)  # same shapes in both layouts
    x = rng.random((2,) + tuple(input_shape)).astype("float32")
    expected = np.moveaxis(cl_model.predict(np.moveaxis(x, 1, -1), verbose=0), -1, 1)
    ref = Keras2Reference(weights_only, whole_model, cfg, x, expected, weights)
    _CACHE[key] = ref
    return ref
