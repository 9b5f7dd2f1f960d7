"""The Models Genesis 3D U-Net, its fine-tuning losses and metrics, for Keras 3.

Imports only Keras, h5py (a Keras dependency) and the standard library, so fine-tuning code can
use it alone::

    import sys
    sys.path.append("keras")       # from the repository root
    from unet3d import *

    model = unet_model_3d((1, 64, 64, 32), batch_normalization=True)
    model.load_weights("pretrained_weights/Genesis_Chest_CT.h5")

Importing this module sets Keras' image data format to ``channels_first``, as the original
did, so layers created afterwards without a ``data_format`` (the README's fine-tuning heads)
are channels-first too. Every layer built here passes its data format explicitly, so
``unet_model_3d(..., data_format="channels_last")`` is unaffected by that global setting.

Two things differ from a plain Keras 3 port, both with the same weights and file formats:

* ``Conv3D`` and ``Conv3DTranspose`` below are ``keras.layers`` subclasses that add their bias
  along the channel axis explicitly. On the TensorFlow backend ``keras.ops.add(x, b)`` turns an
  add whose ``b`` has one non-unit axis into ``tf.nn.bias_add`` on the *last* axis whenever
  ``x``'s last size equals ``b``'s length; Keras' channels-first convolutions add their bias
  that way, so a channels-first ``Conv3D`` whose depth equals its number of filters (64x64x32
  input, 32 filters: the network's first layer) silently adds the bias along depth.
* ``unet_model_3d`` returns a :class:`UNet3D`, a functional model whose ``load_weights``
  first checks a Keras 2 ``.h5``, ``.weights.h5`` or ``.keras`` file layer by layer (naming the
  first layer that does not fit, with both shapes), and whose ``save``/``save_weights`` write to
  a temporary file and rename it, so an interrupted save never leaves a truncated file.

``unet_model_3d(..., variant="pytorch")`` builds the network of the authors' PyTorch release
(``Genesis_Chest_CT.pt``): transposed-convolution up-sampling and :class:`TorchBatchNormalization`,
batch norm with PyTorch's epsilon and momentum that, like that release, normalises with the
batch's own statistics at inference too. ``keras/convert_weights.py`` moves weights between it and
the ``.pt`` file. The default network is unchanged.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import keras
from keras import ops
from keras.layers import Dense, GlobalAveragePooling3D, Softmax

__all__ = [
    "unet_model_3d",
    "UNet3D",
    "Conv3D",
    "Conv3DTranspose",
    "TorchBatchNormalization",
    "VARIANTS",
    "keras",
    "GlobalAveragePooling3D",
    "Dense",
    "Softmax",
    "dice_coef",
    "dice_coef_loss",
    "bce_dice_loss",
    "mean_iou",
    "check_legacy_h5_weights",
    "check_keras3_weights",
    "valid_spatial_sizes",
]

# The original module set the global format on import; code written for it (the README's
# fine-tuning snippets) builds its heads relying on that.
keras.config.set_image_data_format("channels_first")

_DATA_FORMATS = ("channels_first", "channels_last")
# "keras": the network of Genesis_Chest_CT.h5; "pytorch": that of the PyTorch release.
VARIANTS = ("keras", "pytorch")
# PyTorch's BatchNorm3d defaults (eps=1e-5, momentum=0.1), in Keras' convention for momentum.
_TORCH_BN = {"epsilon": 1e-5, "momentum": 0.9}


def _add_channel_bias(outputs, bias, data_format: str):
    """Add a per-channel bias to a conv output, on the channel axis whatever the shapes.

    Keras' own layers call ``ops.add(outputs, reshaped_bias)``; on TensorFlow that op guesses
    a ``bias_add`` data format from the shapes and picks the last axis when its size equals the
    number of channels. Channels-last is what it guesses right, so that path is kept (it lets
    TF fuse the bias into the convolution). For channels-first the bias is reshaped to
    ``(1, C, 1, 1, 1)`` and added with the backend tensor's own ``+``, a plain broadcasting add
    on every backend (tf.Tensor, jax.Array, torch.Tensor), which bypasses the guess.
    """
    if data_format == "channels_last":
        return ops.add(outputs, bias)
    rank = len(outputs.shape)
    return outputs + ops.reshape(bias, (1, -1) + (1,) * (rank - 2))


@keras.saving.register_keras_serializable(package="unet3d")
class Conv3D(keras.layers.Conv3D):
    """``keras.layers.Conv3D`` that adds its bias on the channel axis in either data format.

    Same arguments, weights (``kernel``, ``bias``) and saved form as the Keras layer; only the
    bias add differs (see the module docstring for the TensorFlow defect it avoids).
    """

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.kernel)
        if self.use_bias:
            outputs = _add_channel_bias(outputs, self.bias, self.data_format)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="unet3d")
class Conv3DTranspose(keras.layers.Conv3DTranspose):
    """``keras.layers.Conv3DTranspose`` that adds its bias on the channel axis (see Conv3D)."""

    def call(self, inputs):
        outputs = ops.conv_transpose(
            inputs,
            self.kernel,
            strides=list(self.strides),
            padding=self.padding,
            output_padding=self.output_padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        if self.use_bias:
            outputs = _add_channel_bias(outputs, self.bias, self.data_format)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


def _mean_one_axis_at_a_time(x, axes: Sequence[int]):
    """``ops.mean(x, axes, keepdims=True)`` taken one axis at a time.

    On TensorFlow a float32 mean over batch and three spatial axes at once is less accurate: for
    the full-size network on two 64x64x32 volumes it put the output 5.7e-5 from PyTorch's,
    against 5.2e-6 one axis at a time (docs/weights.md). The means of equal-sized slices average
    to the same value, so nothing else changes.
    """
    for axis in sorted(axes, reverse=True):
        x = ops.mean(x, axis=axis, keepdims=True)
    return x


@keras.saving.register_keras_serializable(package="unet3d")
class TorchBatchNormalization(keras.layers.BatchNormalization):
    """Batch norm that computes as PyTorch's ``BatchNorm3d`` in the Models Genesis release.

    The differences from ``keras.layers.BatchNormalization``, all for exactness against the
    PyTorch network:

    * ``batch_statistics=True`` normalises with the batch's own mean and (biased) variance at
      inference as well as in training, as the PyTorch release's forward does. The moving
      statistics are then used by nothing here; they are still updated in training and saved.
      ``batch_statistics=False`` uses them at inference, like any batch norm.
    * In training the moving variance is updated with the unbiased batch variance
      (``n / (n - 1)`` times the biased one), as PyTorch does, and ``num_batches_tracked``
      (an int32 weight, PyTorch's counter of the same name) counts the training batches.
    * Moments are reduced one axis at a time (see ``_mean_one_axis_at_a_time``).

    The ``epsilon`` and ``momentum`` arguments keep Keras' meaning; ``unet_model_3d`` passes
    PyTorch's ``eps=1e-5`` and ``momentum=0.1`` as ``epsilon=1e-5, momentum=0.9``.

    Args:
        batch_statistics: normalise with batch statistics at inference too.
        **kwargs: those of ``keras.layers.BatchNormalization`` (``renorm`` and
            ``synchronized`` are not supported).
    """

    def __init__(self, batch_statistics: bool = False, **kwargs: Any) -> None:
        if kwargs.get("renorm") or kwargs.get("synchronized"):
            raise ValueError(
                "Expected renorm=False and synchronized=False for TorchBatchNormalization. "
                f"Received: renorm={kwargs.get('renorm')!r}, "
                f"synchronized={kwargs.get('synchronized')!r}"
            )
        super().__init__(**kwargs)
        self.batch_statistics = bool(batch_statistics)

    def build(self, input_shape) -> None:
        super().build(input_shape)
        self.num_batches_tracked = self.add_weight(
            shape=(),
            name="num_batches_tracked",
            initializer="zeros",
            dtype="int32",
            trainable=False,
            autocast=False,
        )

    def call(self, inputs, training=None, mask=None):
        training = bool(training) and self.trainable
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        rank = len(x.shape)
        axis = self.axis % rank
        axes = [a for a in range(rank) if a != axis]
        shape = [1] * rank
        shape[axis] = -1
        if training or self.batch_statistics:
            mean = _mean_one_axis_at_a_time(x, axes)
            variance = _mean_one_axis_at_a_time(ops.square(x - mean), axes)
        else:
            mean = ops.reshape(ops.cast(self.moving_mean, x.dtype), shape)
            variance = ops.reshape(ops.cast(self.moving_variance, x.dtype), shape)
        if training:
            count = 1
            for a in axes:
                count = count * ops.shape(x)[a]
            count = ops.cast(count, x.dtype)
            unbiased = ops.reshape(variance, (-1,)) * count / ops.maximum(count - 1.0, 1.0)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + ops.reshape(mean, (-1,)) * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + unbiased * (1.0 - m))
            self.num_batches_tracked.assign_add(ops.cast(1, "int32"))
        outputs = (x - mean) * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            outputs = outputs * ops.reshape(ops.cast(self.gamma, x.dtype), shape)
        if self.center:
            outputs = outputs + ops.reshape(ops.cast(self.beta, x.dtype), shape)
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "batch_statistics": self.batch_statistics}


# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


def _decode(values) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _legacy_h5_root(f: h5py.File, filepath: str) -> h5py.Group:
    """The group holding ``layer_names``: the file root, or ``model_weights`` of a whole model."""
    if "layer_names" in f.attrs:
        return f
    if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
        return f["model_weights"]
    raise ValueError(
        "Expected a Keras 2 HDF5 weights file: a 'layer_names' attribute at the root "
        "(model.save_weights) or under 'model_weights' (model.save). "
        f"Received: filepath={filepath!r} (root keys {sorted(f.keys())})"
    )


def _file_layers(root: h5py.Group) -> list[tuple[str, list[tuple[str, tuple]]]]:
    layers = []
    for name in _decode(root.attrs["layer_names"]):
        group = root[name]
        weight_names = _decode(group.attrs.get("weight_names", []))
        if weight_names:
            layers.append((name, [(w, tuple(group[w].shape)) for w in weight_names]))
    return layers


def _model_layers(model: keras.Model) -> list[tuple[str, list[tuple[str, tuple]]]]:
    layers = []
    for layer in model.layers:
        # Keras' legacy HDF5 loader pairs weights in this order (trainable, then the rest).
        weights = layer.trainable_weights + layer.non_trainable_weights
        if weights:
            layers.append((layer.name, [(w.name, tuple(w.shape)) for w in weights]))
    return layers


def _describe(layer: tuple[str, list[tuple[str, tuple]]] | None) -> str:
    if layer is None:
        return "nothing"
    name, weights = layer
    return f"'{name}' with " + ", ".join(f"{w.split('/')[-1]} {s}" for w, s in weights)


def check_legacy_h5_weights(model: keras.Model, filepath: str | os.PathLike) -> None:
    """Check that a Keras 2 ``.h5`` file's weights fit ``model``, layer by layer.

    Keras 2 files are loaded by order: the n-th layer with weights in the file goes to the n-th
    layer with weights in the model, whatever their names (the original's output conv had a
    generated name). This walks both lists and names the first pair whose weight shapes differ.

    Args:
        model: the model to load into.
        filepath: a Keras 2 HDF5 file written by ``save_weights`` or ``save``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a Keras 2 weights file, or its layers do not match the model's.
    """
    filepath = os.fspath(filepath)
    if not os.path.isfile(filepath):
        raise FileNotFoundError(
            f"Expected an existing weights file. Received: filepath={filepath!r}"
        )
    with h5py.File(filepath, "r") as f:
        file_layers = _file_layers(_legacy_h5_root(f, filepath))
    model_layers = _model_layers(model)
    for i in range(max(len(file_layers), len(model_layers))):
        ours = model_layers[i] if i < len(model_layers) else None
        theirs = file_layers[i] if i < len(file_layers) else None
        if ours is None or theirs is None or [s for _, s in ours[1]] != [s for _, s in theirs[1]]:
            raise ValueError(
                f"Weights in {filepath!r} do not fit model '{model.name}': layer with weights "
                f"#{i} differs. Expected (model): {_describe(ours)}. "
                f"Received (file): {_describe(theirs)}. The model has {len(model_layers)} "
                f"layers with weights, the file {len(file_layers)}; check input channels, depth, "
                "n_base_filters, batch_normalization, deconvolution and n_labels."
            )


def _keras3_file_layers(filepath: str) -> list[tuple[str, list[tuple[str, tuple]]]]:
    """Layers with weights in a Keras 3 ``.weights.h5`` (or ``.keras``) file, by recorded layer
    name."""
    layers = []
    source = filepath
    if filepath.endswith(".keras"):
        # A zip holding model.weights.h5 (the same layout); h5py reads it from memory.
        if not zipfile.is_zipfile(filepath):
            return layers  # an unzipped .keras folder, or not one at all: Keras will say
        with zipfile.ZipFile(filepath) as archive:
            if "model.weights.h5" not in archive.namelist():
                return layers
            source = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(source, "r") as f:
        if "layers" not in f:
            return layers
        for key in f["layers"]:
            group = f["layers"][key]
            vars_ = group.get("vars")
            if not isinstance(vars_, h5py.Group) or "name" not in vars_.attrs or not len(vars_):
                continue
            shapes = [(f"vars/{i}", tuple(vars_[str(i)].shape)) for i in range(len(vars_))]
            layers.append((str(vars_.attrs["name"]), shapes))
    return layers


def check_keras3_weights(model: keras.Model, filepath: str | os.PathLike) -> None:
    """Check a Keras 3 ``.weights.h5`` or ``.keras`` file against ``model`` by layer name.

    Names the first layer that does not fit, with both shapes.

    Keras itself matches these files by structure and, on a mismatch, reports every failed
    object with its full value, or (a file with extra layers, such as batch norm the model
    lacks) loads part of it with only a warning. Files that record no layer names, or none
    of the model's, are left to Keras.

    Args:
        model: the model to load into.
        filepath: a file written by ``save_weights("x.weights.h5")`` or ``save("x.keras")``.

    Raises:
        ValueError: a layer's weight shapes differ, or a layer with weights is on one side only.
    """
    filepath = os.fspath(filepath)
    theirs = dict(_keras3_file_layers(filepath))
    ours = _model_layers(model)
    if not theirs or not any(name in theirs for name, _ in ours):
        return
    for name, weights in ours:
        if name not in theirs or [s for _, s in weights] != [s for _, s in theirs[name]]:
            found = _describe((name, theirs[name])) if name in theirs else "no layer of that name"
            raise ValueError(
                f"Weights in {filepath!r} do not fit model '{model.name}' at layer '{name}'. "
                f"Expected (model): {_describe((name, weights))}. Received (file): {found}."
            )
    extra = [name for name in theirs if name not in dict(ours)]
    if extra:
        raise ValueError(
            f"Weights in {filepath!r} do not fit model '{model.name}': the file has layers with "
            f"weights the model lacks, first {_describe((extra[0], theirs[extra[0]]))}. "
            "Check depth, batch_normalization and deconvolution."
        )


# Formats Keras picks by name; anything else (sharded .weights.json...) goes to Keras unchanged.
_SAVE_SUFFIXES = (".weights.h5", ".keras", ".h5", ".hdf5")


@contextlib.contextmanager
def _atomic_target(filepath: str) -> Iterator[str]:
    """Yield a temporary path in the target's folder, with the same format suffix; rename on
    success."""
    suffix = next(s for s in _SAVE_SUFFIXES if filepath.endswith(s))
    folder = os.path.dirname(os.path.abspath(filepath))
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(filepath)[: -len(suffix)] + ".",
        suffix=".tmp" + suffix,
        dir=folder,
    )
    os.close(fd)
    os.remove(tmp)  # Keras' legacy writer will not open an existing file without asking
    try:
        yield tmp
        os.replace(tmp, filepath)
    except BaseException:  # Ctrl-C included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _atomic_ok(filepath, overwrite: bool) -> bool:
    return (
        isinstance(filepath, (str, os.PathLike))
        and os.fspath(filepath).endswith(_SAVE_SUFFIXES)
        and (overwrite or not os.path.exists(filepath))
    )


@keras.saving.register_keras_serializable(package="unet3d")
class UNet3D(keras.Model):
    """The functional model ``unet_model_3d`` returns: a ``keras.Model`` with safer file I/O.

    ``load_weights`` first checks the file against the model, naming the first layer that does
    not fit: :func:`check_legacy_h5_weights` for Keras 2 ``.h5`` files (matched by order, as
    Keras loads them), :func:`check_keras3_weights` for ``.weights.h5`` and ``.keras`` (by
    layer name).
    ``save`` and ``save_weights`` write a temporary file in the same folder and rename it.
    Everything else, formats included, is Keras' own.
    """

    def load_weights(
        self, filepath: str | os.PathLike, skip_mismatch: bool = False, **kwargs: Any
    ) -> None:
        path = os.fspath(filepath)
        is_legacy = path.endswith((".h5", ".hdf5")) and not path.endswith(".weights.h5")
        if not os.path.exists(path) and not path.endswith(".weights.json"):
            raise FileNotFoundError(
                f"Expected an existing weights file. Received: filepath={path!r}"
            )
        if not skip_mismatch:
            if is_legacy and not kwargs.get("by_name"):
                check_legacy_h5_weights(self, path)
            elif path.endswith((".weights.h5", ".keras")):
                check_keras3_weights(self, path)
        return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def save(
        self,
        filepath: str | os.PathLike,
        overwrite: bool = True,
        zipped: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if not _atomic_ok(filepath, overwrite) or zipped is False:
            return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        with _atomic_target(os.fspath(filepath)) as tmp:
            super().save(tmp, overwrite=True, zipped=zipped, **kwargs)

    def save_weights(
        self,
        filepath: str | os.PathLike,
        overwrite: bool = True,
        max_shard_size: float | None = None,
    ) -> None:
        if not _atomic_ok(filepath, overwrite) or max_shard_size is not None:
            return super().save_weights(
                filepath, overwrite=overwrite, max_shard_size=max_shard_size
            )
        with _atomic_target(os.fspath(filepath)) as tmp:
            super().save_weights(tmp, overwrite=True)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def valid_spatial_sizes(size: int, factor: int) -> tuple[int, int]:
    """The nearest multiples of ``factor`` below and above ``size`` (the lower one at least
    ``factor``).

    Args:
        size: a spatial size.
        factor: what the size must be divisible by.

    Returns:
        ``(lower, upper)``; equal to ``(size, size)`` when ``size`` already works.
    """
    lower = max(factor, (size // factor) * factor)
    upper = -(-size // factor) * factor
    return lower, max(upper, factor)


def _check_input_shape(input_shape, pool_size, depth: int, data_format: str) -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 4:
        order = (
            "(channels, rows, cols, deps)"
            if data_format == "channels_first"
            else "(rows, cols, deps, channels)"
        )
        raise ValueError(
            f"Expected input_shape={order} for {data_format}. Received: input_shape={input_shape!r}"
        )
    spatial = shape[1:] if data_format == "channels_first" else shape[:3]
    for axis, size, pool in zip(("rows", "cols", "deps"), spatial, pool_size, strict=True):
        factor = int(pool) ** (depth - 1)
        if size is None:
            continue  # sizes given at call time are checked by the layers
        if int(size) < 1 or int(size) % factor:
            lower, upper = valid_spatial_sizes(int(size), factor)
            nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise ValueError(
                f"Expected every spatial size divisible by pool_size ** (depth - 1) = {factor} "
                f"along {axis} (pool_size={tuple(pool_size)}, depth={depth}). Received: "
                f"input_shape={shape}, {axis}={size}; the nearest {axis} that work are {nearest}."
            )
    return shape


def unet_model_3d(
    input_shape: Sequence[int | None],
    pool_size: int | Sequence[int] = (2, 2, 2),
    n_labels: int = 1,
    deconvolution: bool = False,
    depth: int = 4,
    n_base_filters: int = 32,
    batch_normalization: bool = False,
    activation_name: str = "sigmoid",
    data_format: str | None = None,
    variant: str = "keras",
    batch_statistics: bool | None = None,
) -> UNet3D:
    """Build the Models Genesis 3D U-Net.

    Conv block k (k counts blocks from 0 through the whole network) is ``Conv3D(f, 3,
    padding="same")`` named ``depth_{k}_conv``, optionally ``BatchNormalization`` named
    ``depth_{k}_bn``, then ReLU named ``depth_{k}_relu``. Level d of the encoder has blocks of
    ``n_base_filters * 2**d`` and twice that many filters, then ``level_{d}_pool`` (but the
    last level); the decoder upsamples (``level_{d}_up``: ``UpSampling3D``, or with
    ``deconvolution`` a ``Conv3DTranspose`` with as many filters as its input and kernel and
    stride ``pool_size``), concatenates ``[upsampled, skip]`` (``level_{d}_concat``) and runs
    two blocks with the skip's channels. Output: ``output_conv`` (``Conv3D(n_labels, 1)``)
    then ``output_activation``.

    Args:
        input_shape: ``(channels, rows, cols, deps)`` for channels_first,
            ``(rows, cols, deps, channels)`` for channels_last. Spatial sizes must be
            divisible by ``pool_size ** (depth - 1)`` (8 by default), or None.
        pool_size: pooling and upsampling factor per spatial axis (an int means all three).
        n_labels: output channels.
        deconvolution: learned ``Conv3DTranspose`` upsampling instead of ``UpSampling3D``.
        depth: number of resolution levels.
        n_base_filters: filters of the first block.
        batch_normalization: add batch norm after every conv of the blocks.
        activation_name: the output activation.
        data_format: ``"channels_first"`` (the original's layout), ``"channels_last"``, or
            None, which means channels_first whatever ``keras.config.image_data_format()``
            says. Weights are the same in both layouts (kernel shapes do not depend on it), so
            a file saved from one loads into the other.
        variant: ``"keras"``, the network above; or ``"pytorch"``, the network of the PyTorch
            release ``Genesis_Chest_CT.pt``, which implies ``deconvolution=True`` and
            ``batch_normalization=True`` and uses :class:`TorchBatchNormalization` (PyTorch's
            epsilon 1e-5 and momentum 0.1) for the ``depth_{k}_bn`` layers. Every layer keeps
            its name, so heads on ``depth_7_relu`` or ``depth_13_relu`` work unchanged.
        batch_statistics: for ``variant="pytorch"``, whether batch norm normalises with the
            batch's own statistics at inference too, as the PyTorch release does. None means
            True there; False uses the moving statistics at inference. Only the pytorch
            variant takes it.

    Returns:
        A :class:`UNet3D` (a functional ``keras.Model``) named ``unet_3d``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Expected variant in {VARIANTS}. Received: variant={variant!r}")
    if variant == "keras" and batch_statistics is not None:
        raise ValueError(
            "Expected batch_statistics=None for variant='keras' (batch statistics at inference "
            "belong to the PyTorch release's network: pass variant='pytorch'). "
            f"Received: batch_statistics={batch_statistics!r}"
        )
    if variant == "pytorch":
        deconvolution = batch_normalization = True
        batch_statistics = True if batch_statistics is None else bool(batch_statistics)
    data_format = "channels_first" if data_format is None else data_format
    if data_format not in _DATA_FORMATS:
        raise ValueError(
            f"Expected data_format in {_DATA_FORMATS} or None. "
            f"Received: data_format={data_format!r}"
        )
    if isinstance(pool_size, int):
        pool_size = (pool_size,) * 3
    pool_size = tuple(int(p) for p in pool_size)
    if len(pool_size) != 3 or min(pool_size) < 1:
        raise ValueError(
            f"Expected pool_size of three positive ints. Received: pool_size={pool_size!r}"
        )
    if int(depth) < 1:
        raise ValueError(f"Expected depth >= 1. Received: depth={depth!r}")
    shape = _check_input_shape(input_shape, pool_size, int(depth), data_format)
    channel_axis = 1 if data_format == "channels_first" else -1

    block = 0

    def conv_block(x, filters: int):
        nonlocal block
        x = Conv3D(filters, 3, padding="same", data_format=data_format, name=f"depth_{block}_conv")(
            x
        )
        if variant == "pytorch":
            x = TorchBatchNormalization(
                batch_statistics=batch_statistics,
                axis=channel_axis,
                name=f"depth_{block}_bn",
                **_TORCH_BN,
            )(x)
        elif batch_normalization:
            x = keras.layers.BatchNormalization(axis=channel_axis, name=f"depth_{block}_bn")(x)
        x = keras.layers.Activation("relu", name=f"depth_{block}_relu")(x)
        block += 1
        return x

    inputs = keras.Input(shape=shape, name="input")
    x = inputs
    skips = []
    for d in range(depth):
        x = conv_block(x, n_base_filters * 2**d)
        x = conv_block(x, n_base_filters * 2**d * 2)
        if d < depth - 1:
            skips.append(x)
            x = keras.layers.MaxPooling3D(
                pool_size, data_format=data_format, name=f"level_{d}_pool"
            )(x)
    for d in range(depth - 2, -1, -1):
        if deconvolution:
            x = Conv3DTranspose(
                x.shape[channel_axis],
                pool_size,
                strides=pool_size,
                data_format=data_format,
                name=f"level_{d}_up",
            )(x)
        else:
            x = keras.layers.UpSampling3D(pool_size, data_format=data_format, name=f"level_{d}_up")(
                x
            )
        skip = skips[d]
        x = keras.layers.Concatenate(axis=channel_axis, name=f"level_{d}_concat")([x, skip])
        x = conv_block(x, skip.shape[channel_axis])
        x = conv_block(x, skip.shape[channel_axis])
    x = Conv3D(n_labels, 1, data_format=data_format, name="output_conv")(x)
    outputs = keras.layers.Activation(activation_name, name="output_activation")(x)
    return UNet3D(inputs=inputs, outputs=outputs, name="unet_3d")


# --------------------------------------------------------------------------------------------
# Fine-tuning losses and metrics (keras.ops only, so they run on every backend)
# --------------------------------------------------------------------------------------------


def dice_coef(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """Soft Dice over the whole flattened batch: ``(2 sum(t p) + s) / (sum(t) + sum(p) + s)``.

    Args:
        y_true: targets in [0, 1].
        y_pred: predictions in [0, 1], same shape.
        smooth: added to numerator and denominator (keeps empty masks at 1).

    Returns:
        A scalar tensor.
    """
    y_true = ops.cast(ops.reshape(y_true, (-1,)), "float32")
    y_pred = ops.cast(ops.reshape(y_pred, (-1,)), "float32")
    intersection = ops.sum(y_true * y_pred)
    return (2.0 * intersection + smooth) / (ops.sum(y_true) + ops.sum(y_pred) + smooth)


def dice_coef_loss(y_true: Any, y_pred: Any) -> Any:
    """``1 - dice_coef``.

    Args:
        y_true: targets in [0, 1].
        y_pred: predictions in [0, 1].

    Returns:
        A scalar tensor.
    """
    return 1.0 - dice_coef(y_true, y_pred)


def bce_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """``0.5 * binary_crossentropy - dice_coef``.

    The cross-entropy is Keras' (mean over the last axis, predictions clipped to
    [1e-7, 1 - 1e-7]); the Dice term is one scalar for the batch, so Keras' mean reduction
    of the result gives ``0.5 * mean(bce) - dice``.

    Args:
        y_true: targets in [0, 1].
        y_pred: probabilities in [0, 1].

    Returns:
        A tensor of ``y_true``'s shape without its last axis.
    """
    bce = keras.losses.binary_crossentropy(ops.cast(y_true, "float32"), ops.cast(y_pred, "float32"))
    return 0.5 * bce - dice_coef(y_true, y_pred)


def foreground_dice_coef(
    y_true: Any, y_pred: Any, channel_axis: int = 1, smooth: float = 1.0
) -> Any:
    """`dice_coef` of the foreground channels only: channel 0, the background, left out.

    With one-hot targets and a softmax output, `dice_coef` counts the background too, so an
    output that is background everywhere already scores ``1 - f`` on patches whose foreground
    fraction is ``f``. This Dice is 0 for it.

    Args:
        y_true: one-hot targets in [0, 1], at least two channels along `channel_axis`.
        y_pred: probabilities in [0, 1], same shape.
        channel_axis: 1 (channels-first) or -1 (channels-last).
        smooth: added to numerator and denominator.

    Returns:
        A scalar tensor.
    """
    n = y_true.shape[channel_axis]
    if n is None or n < 2:
        raise ValueError(
            f"Expected at least two channels (background first) on axis {channel_axis}. "
            f"Received: y_true.shape={tuple(y_true.shape)}"
        )
    keep = list(range(1, n))
    return dice_coef(
        ops.take(y_true, keep, axis=channel_axis), ops.take(y_pred, keep, axis=channel_axis), smooth
    )


def _loss_channel_axis(data_format: str) -> int:
    if data_format not in ("channels_first", "channels_last"):
        raise ValueError(
            "Expected data_format 'channels_first' or 'channels_last'. "
            f"Received: data_format={data_format!r}"
        )
    return 1 if data_format == "channels_first" else -1


def bce_foreground_dice_loss(data_format: str = "channels_first"):
    """``0.5 * binary_crossentropy - foreground_dice_coef``: `bce_dice_loss` with the Dice of
    the foreground channels, for one-hot targets and a softmax output.

    Args:
        data_format: where the channel axis is, "channels_first" or "channels_last".

    Returns:
        A loss function ``(y_true, y_pred) -> tensor``, named ``bce_foreground_dice_loss``.
    """
    axis = _loss_channel_axis(data_format)

    def bce_foreground_dice_loss(y_true: Any, y_pred: Any) -> Any:
        t, p = ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")
        bce = keras.losses.binary_crossentropy(t, p)
        return 0.5 * bce - foreground_dice_coef(t, p, axis)

    return bce_foreground_dice_loss


def foreground_dice_metric(data_format: str = "channels_first"):
    """`foreground_dice_coef` as a Keras metric function named ``foreground_dice_coef``.

    Args:
        data_format: "channels_first" or "channels_last".

    Returns:
        A function ``(y_true, y_pred) -> scalar``.
    """
    axis = _loss_channel_axis(data_format)

    def foreground_dice_coef_(y_true: Any, y_pred: Any) -> Any:
        return foreground_dice_coef(y_true, y_pred, axis)

    foreground_dice_coef_.__name__ = "foreground_dice_coef"
    return foreground_dice_coef_


def mean_iou(y_true: Any, y_pred: Any) -> Any:
    """Mean over thresholds 0.5, 0.55, .., 0.95 of the two-class mean IoU of ``y_pred > t``.

    For each threshold the prediction is ``y_pred > t`` and the label ``y_true > 0.5`` (binary
    masks expected); the IoU of class 1 (foreground) and of class 0 (background) are averaged
    over the classes present in either, as ``tf.metrics.mean_iou`` with two classes did, but
    per batch rather than accumulated over the run.

    Args:
        y_true: binary targets.
        y_pred: probabilities.

    Returns:
        A scalar tensor.
    """
    truth = ops.reshape(ops.greater(ops.cast(y_true, "float32"), 0.5), (-1,))
    y_pred = ops.reshape(ops.cast(y_pred, "float32"), (-1,))
    scores = []
    for t in [round(0.5 + 0.05 * i, 2) for i in range(10)]:
        pred = ops.greater(y_pred, t)
        per_class = []
        valid = []
        for p, g in ((pred, truth), (ops.logical_not(pred), ops.logical_not(truth))):
            inter = ops.sum(ops.cast(ops.logical_and(p, g), "float32"))
            union = ops.sum(ops.cast(ops.logical_or(p, g), "float32"))
            present = ops.cast(union > 0, "float32")
            per_class.append(present * inter / ops.maximum(union, 1.0))
            valid.append(present)
        scores.append((per_class[0] + per_class[1]) / ops.maximum(valid[0] + valid[1], 1.0))
    return ops.mean(ops.stack(scores))
