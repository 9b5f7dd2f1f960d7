"""`finetune.py predict`: run a fine-tuned model over whole volumes, or over cubes.

Segmentation slides windows of the training patch over each volume (overlap 0.5 by default),
weights each window's softmax votes with a Gaussian (sigma 1/8 of the patch per axis, as
nnU-Net does), and writes ``{case}{ext}`` label maps on exactly the input's grid: same size,
spacing, origin and direction. A run trained with a target spacing is resampled to it first and
its predictions back onto the input's grid (labels nearest, probabilities linear).
Classification reads ``.npy`` cubes ``(N, R, C, D)`` or a LUNA16-style candidates CSV with a
folder of volumes and writes a CSV of class probabilities.

The array convention is (x, y, z), as in `volume_io`. A case whose volume cannot be used
(`volume_io.VolumeError`: truncated, NaN voxels, a broken DICOM series, not 3-D) is named and
skipped; the others are written, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

import volume_io as vio
from genesis_files import atomic_path

__all__ = [
    "PredictInputError",
    "PredictSettings",
    "add_predict_arguments",
    "class_values",
    "gaussian_importance",
    "image_ending",
    "load_run",
    "predict",
    "predict_case",
    "sliding_window_predict",
    "window_starts",
]

CONFIG_NAME = "finetune_config.json"
MODEL_NAME = "best_model.keras"
CLASSIFICATION_CSV = "predictions.csv"
# Multi-part extensions SimpleITK writes, longest first.
_ENDINGS = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd", ".tif", ".tiff", ".vtk")

DESCRIPTION = """\
Predict with a fine-tuned model.

Segmentation: sliding windows of the training patch over each whole volume, Gaussian-weighted,
written as label maps {case}{ext} on exactly the input's grid. Inputs are a folder in nnU-Net
({case}_0000.nii.gz, {case}_0001.nii.gz for more channels) or Decathlon ({case}.nii.gz)
naming, or explicit files. Cases already written are skipped unless --overwrite.

Classification: .npy cubes (N, R, C, D), or a candidates CSV in LUNA16's format
(seriesuid,coordX,coordY,coordZ[,class]) with --volumes DIR; writes a CSV of probabilities.

A volume that cannot be used (unreadable, truncated, NaN voxels, a DICOM series missing a
slice, not 3-D) is named and skipped, and the others are predicted. Exit status: 0 done, 1 when
some volumes were skipped that way, 2 for bad input (one line saying what was expected)."""

EPILOG = """\
examples:
  python keras/finetune.py predict --model runs/sts --input ../shared/data/sts_ct/imagesTr \\
      --output predictions/sts
  python keras/finetune.py predict --model runs/sts --input scan_0000.nii.gz --output pred \\
      --save_probabilities --overlap 0.5 --batch_size 4
  python keras/finetune.py predict --model runs/nodules --input x_test_64x64x32.npy \\
      --output pred/nodules.csv
  python keras/finetune.py predict --model runs/fp --input candidates.csv --volumes subset9 \\
      --output pred/fp.csv"""


class PredictInputError(ValueError):
    """Bad input to predict, raised where it is checked: the command line exits with 2."""


@dataclasses.dataclass
class PredictSettings:
    """The settings of ``finetune.py predict``: one field per flag (see `add_predict_arguments`).

    Attributes:
        model: the training run folder.
        input: a folder of images, image files, .npy cubes or one candidates .csv.
        output: the output folder (classification: a .csv file, or a folder).
        overlap: window overlap in [0, 1).
        batch_size: windows (or cubes) per model call.
        save_probabilities: also write ``{case}.npz`` probabilities.
        overwrite: redo cases already written.
        no_gaussian: weight every voxel of a window alike.
        file_ending: ending of the images in an input folder; None: the run's.
        output_ending: ending of the label maps; None: the input's own.
        volumes: the volumes of a candidates CSV.
        model_file: the model to load; None: ``{model}/best_model.keras``.
        tta: "on" mirrors each window along the three axes and averages the 8 predictions,
            "off" predicts once; None: the run's recipe's.
        postprocess: "largest_component" keeps each class's largest connected piece, "none"
            keeps all; None: the run's recipe's.
    """

    model: str
    input: tuple[str, ...]
    output: str
    overlap: float = 0.5
    batch_size: int = 8
    save_probabilities: bool = False
    overwrite: bool = False
    no_gaussian: bool = False
    file_ending: str | None = None
    output_ending: str | None = None
    volumes: str | None = None
    model_file: str | None = None
    tta: str | None = None
    postprocess: str | None = None


def _read_image(path: str) -> sitk.Image:
    """`volume_io.read_image`; a missing file is bad input (exit 2), while a volume that cannot
    be used (`volume_io.VolumeError`) is left to the caller, which names and skips its case."""
    try:
        return vio.read_image(path)
    except FileNotFoundError as exc:  # the reader's own check, naming the file
        raise PredictInputError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# Sliding windows
# --------------------------------------------------------------------------------------------


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """The weight of each voxel of a window: a Gaussian centred on the window, peak 1.

    Args:
        patch: the window size (R, C, D).
        sigma_scale: sigma as a fraction of the window size along each axis.

    Returns:
        A float32 array of shape `patch`, largest (1.0) at the centre, positive everywhere.
    """
    axes = []
    for n in patch:
        centre = (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        i = np.arange(n, dtype=np.float64)
        axes.append(np.exp(-0.5 * ((i - centre) / sigma) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g /= g.max()
    # Keep the border votes tiny but non-zero, so no voxel ends up with no weight at all.
    g = np.maximum(g, 1e-6)
    return g.astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """The start offsets of the windows along one axis, evenly spread, first 0, last size-patch.

    The step is at most ``patch * (1 - overlap)``: the number of windows is
    ``ceil((size - patch) / (patch * (1 - overlap))) + 1`` and they are spread evenly.

    Args:
        size: the (padded) volume size along the axis, at least `patch`.
        patch: the window size.
        overlap: the fraction of a window that neighbours share, in [0, 1).

    Returns:
        The sorted start offsets.
    """
    if size < patch:
        raise ValueError(f"Expected size >= patch. Received: size={size}, patch={patch}")
    if size == patch:
        return [0]
    step = max(patch * (1.0 - overlap), 1.0)
    n = int(math.ceil((size - patch) / step)) + 1
    actual = (size - patch) / (n - 1)
    return [int(round(i * actual)) for i in range(n)]


def _pad_to(
    volume: np.ndarray, patch: Sequence[int], fill: float = 0.0
) -> tuple[np.ndarray, tuple[slice, ...]]:
    # Centred padding with `fill` (0 is the bottom of every intensity window) up to the patch,
    # and the slices that crop it back.
    pads = []
    crop = [slice(None)]
    for n, p in zip(volume.shape[1:], patch, strict=True):
        extra = max(0, p - n)
        before = extra // 2
        pads.append((before, extra - before))
        crop.append(slice(before, before + n))
    if not any(a or b for a, b in pads):
        return volume, tuple(crop)
    return np.pad(volume, [(0, 0), *pads], constant_values=fill), tuple(crop)


def sliding_window_predict(
    predict_batch: Callable[[np.ndarray], np.ndarray],
    volume: np.ndarray,
    patch: Sequence[int],
    n_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    gaussian: bool = True,
    mirror_axes: Sequence[int] = (),
    fill: float = 0.0,
) -> np.ndarray:
    """Class probabilities over a whole volume from windows of the patch size.

    Each window's output is multiplied by the window weight (a Gaussian, or ones) and added
    up; the sum is divided by the summed weights. A volume smaller than the patch is padded
    (centred, with `fill`) and the result cropped back. With `mirror_axes` (test-time
    augmentation), each window is also predicted flipped along every combination of those
    axes, flipped back, and the outputs averaged: ``2 ** len(mirror_axes)`` predictions.

    Args:
        predict_batch: maps a float32 batch ``(B, channels, R, C, D)`` to ``(B, n_classes,
            R, C, D)`` probabilities (channels first whatever the model's layout).
        volume: ``(channels, X, Y, Z)`` float32, already normalised.
        patch: the window size (R, C, D).
        n_classes: the number of output channels.
        overlap: the fraction of a window that neighbours share, in [0, 1).
        batch_size: windows per call of `predict_batch`.
        gaussian: Gaussian weighting (sigma 1/8 of the patch); False weights all voxels alike.
        mirror_axes: spatial axes (0, 1, 2 for X, Y, Z) to mirror; () predicts once.
        fill: the value of the padding (the normalised image's background).

    Returns:
        ``(n_classes, X, Y, Z)`` float32 probabilities.
    """
    if volume.ndim != 4:
        raise ValueError(
            f"Expected a volume (channels, X, Y, Z). Received: shape={tuple(volume.shape)}"
        )
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"Expected 0 <= overlap < 1. Received: overlap={overlap}")
    patch = tuple(int(p) for p in patch)
    axes = sorted({int(a) for a in mirror_axes})
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"Expected mirror axes among 0, 1, 2. Received: {tuple(mirror_axes)}")
    # Every subset of the axes, as axes of a (B, channels, R, C, D) batch.
    flips = [
        tuple(2 + a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(2 ** len(axes))
    ]
    padded, crop = _pad_to(np.asarray(volume, dtype=np.float32), patch, fill)
    shape = padded.shape[1:]
    weight = gaussian_importance(patch) if gaussian else np.ones(patch, np.float32)
    total = np.zeros((n_classes, *shape), np.float32)
    norm = np.zeros(shape, np.float32)
    starts = [
        (a, b, c)
        for a in window_starts(shape[0], patch[0], overlap)
        for b in window_starts(shape[1], patch[1], overlap)
        for c in window_starts(shape[2], patch[2], overlap)
    ]
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        windows = [
            (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            for a, b, c in chunk
        ]
        batch = np.stack([padded[(slice(None), *w)] for w in windows])
        if len(chunk) < batch_size and i > 0:
            # Keep every call the same shape: a new batch size would make a compiled model
            # trace again. The filler windows' outputs are dropped.
            filler = np.zeros((batch_size - len(chunk), *batch.shape[1:]), np.float32)
            batch = np.concatenate([batch, filler])
        out = None
        for flip in flips:
            one = np.asarray(predict_batch(np.flip(batch, flip) if flip else batch), np.float32)
            one = np.flip(one, flip) if flip else one
            out = one if out is None else out + one
        out = out[: len(chunk)] / np.float32(len(flips))
        if out.shape != (len(chunk), n_classes, *patch):
            raise ValueError(
                f"Expected the model to return {(len(chunk), n_classes, *patch)} per batch "
                f"(channels first). Received: shape={tuple(out.shape)}"
            )
        for w, probs in zip(windows, out, strict=True):
            total[(slice(None), *w)] += probs * weight
            norm[w] += weight
    total /= norm
    return total[crop]


POSTPROCESSING = ("none", "largest_component")


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep, for each foreground class, only its largest 26-connected piece; the rest becomes
    background (0).

    Args:
        labels: a label map of class indices (X, Y, Z).

    Returns:
        A new label map of the same shape and dtype.
    """
    from scipy import ndimage

    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        pieces, n = ndimage.label(labels == value, structure=np.ones((3, 3, 3), bool))
        if n:
            sizes = np.bincount(pieces.ravel())[1:]
            out[pieces == 1 + int(np.argmax(sizes))] = value
    return out


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------


def load_run(run_dir: str, model_file: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The fine-tuned model and its resolved config from a training run folder.

    Args:
        run_dir: the folder ``finetune.py train --output`` wrote.
        model_file: the model to load, default ``{run_dir}/best_model.keras``.

    Returns:
        (model, config).

    Raises:
        PredictInputError: naming the file when the folder lacks the config or the model, or
            the config lacks a field predict needs.
    """
    config_path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise PredictInputError(
            f"Expected a training run folder with {CONFIG_NAME}. Received: --model {run_dir!r} "
            f"({config_path} not found)"
        )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PredictInputError(f"Expected JSON in {config_path}. Received: {e}") from None
    missing = [k for k in ("task", "patch", "data_format", "n_classes") if k not in config]
    if missing:
        raise PredictInputError(
            f"Expected task, patch, data_format and n_classes in {config_path}. "
            f"Received: missing {missing}"
        )
    if config["task"] not in ("segmentation", "classification"):
        raise PredictInputError(
            f"Expected task 'segmentation' or 'classification' in {config_path}. "
            f"Received: task={config['task']!r}"
        )
    model_path = model_file or os.path.join(run_dir, MODEL_NAME)
    if not os.path.isfile(model_path):
        raise PredictInputError(f"Expected a saved model. Received: {model_path!r} not found")
    import keras

    import unet3d  # noqa: F401  (registers the model's classes for loading)

    try:
        model = keras.models.load_model(model_path, compile=False)
    except (ValueError, OSError, KeyError) as exc:  # not a .keras file, or one missing parts
        raise PredictInputError(
            f"Expected a Keras model file (.keras) at {model_path}. Received: a file Keras "
            f"cannot load ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc
    return model, config


def class_values(config: dict[str, Any]) -> np.ndarray:
    """The label value written for each output class: dataset.json's label values, sorted.

    Args:
        config: the run's config (``labels`` name->value, ``n_classes``).

    Returns:
        An int64 array of length n_classes (0, 1, .. when the config has no labels).
    """
    n = int(config["n_classes"])
    labels = config.get("labels") or {}
    values = sorted({int(v) for v in labels.values()}) if labels else list(range(n))
    if len(values) != n:
        raise PredictInputError(
            f"Expected {n} label values (n_classes) in the run's labels. Received: labels={labels}"
        )
    return np.asarray(values, dtype=np.int64)


def _channel_modes(config: dict[str, Any], n_channels: int) -> list[str]:
    modes = config.get("intensity") or ["ct"]
    if isinstance(modes, str):
        modes = [modes]
    if len(modes) == 1 and n_channels > 1:
        modes = modes * n_channels
    if len(modes) != n_channels:
        raise PredictInputError(
            f"Expected {len(modes)} channel(s) per case, as the model was trained. "
            f"Received: {n_channels}"
        )
    return list(modes)


def make_predictor(model: Any, data_format: str) -> Callable[[np.ndarray], np.ndarray]:
    """A channels-first batch function over `model` (``predict_on_batch``), whatever its layout.

    Args:
        model: a Keras model.
        data_format: the model's layout.

    Returns:
        A function (B, channels, R, C, D) -> (B, classes, R, C, D) as NumPy arrays.
    """
    if data_format == "channels_last":

        def predict(batch: np.ndarray) -> np.ndarray:
            out = model.predict_on_batch(np.ascontiguousarray(np.moveaxis(batch, 1, -1)))
            return np.moveaxis(np.asarray(out), -1, 1)

        return predict
    return lambda batch: np.asarray(model.predict_on_batch(batch))


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def image_ending(path: str) -> str:
    """The file ending of an image path (".nii.gz", ".mha", ..; "" for a folder)."""
    name = os.path.basename(os.fspath(path).rstrip(os.sep)).lower()
    for ending in _ENDINGS:
        if name.endswith(ending):
            return ending
    return os.path.splitext(name)[1]


def _read_channels(paths: Sequence[str]) -> tuple[list[sitk.Image], vio.Geometry]:
    images = [_read_image(p) for p in paths]
    geometry = vio.Geometry.of(images[0])
    for path, image in zip(paths[1:], images[1:], strict=True):
        diffs = geometry.differences(vio.Geometry.of(image))
        if diffs:
            raise PredictInputError(
                f"Expected every channel of a case on one grid. Received: {paths[0]} and "
                f"{path} differ in {'; '.join(diffs)}"
            )
    return images, geometry


def predict_case(
    model: Any,
    config: dict[str, Any],
    image_paths: Sequence[str],
    overlap: float = 0.5,
    batch_size: int = 8,
    gaussian: bool = True,
    tta: bool = False,
    postprocess: str = "none",
) -> tuple[np.ndarray, np.ndarray, vio.Geometry]:
    """Predict one case on its own grid.

    Args:
        model: the fine-tuned segmentation model.
        config: the run's config.
        image_paths: one image per channel, in channel order.
        overlap: window overlap in [0, 1).
        batch_size: windows per model call.
        gaussian: Gaussian window weighting.
        tta: mirror each window along the three axes and average the 8 predictions.
        postprocess: "largest_component" keeps only each class's largest connected piece
            (on the working grid), "none" keeps the label map as predicted.

    Returns:
        (label map (x, y, z) of label values, probabilities (n_classes, x, y, z) float32, the
        input's geometry). With a training spacing, both are resampled back onto the input's
        grid: labels with nearest neighbour, probabilities linearly.

    Raises:
        VolumeError: a channel's volume cannot be used (`volume_io.read_image`), naming it.
        PredictInputError: the channels are not on one grid, or not as many as trained.
    """
    images, geometry = _read_channels(image_paths)
    modes = _channel_modes(config, len(images))
    spacing = config.get("spacing")
    if spacing:
        images = [vio.resample_image(img, spacing) for img in images]
    params = config.get("intensity_params") or [None] * len(modes)
    if len(params) == 1 and len(modes) > 1:
        params = params * len(modes)
    volume = np.stack(
        [
            vio.normalise_intensity(vio.image_to_array(img), mode, p)
            for img, mode, p in zip(images, modes, params, strict=True)
        ]
    )
    n_classes = int(config["n_classes"])
    probs = sliding_window_predict(
        make_predictor(model, config["data_format"]),
        volume,
        config["patch"],
        n_classes,
        overlap=overlap,
        batch_size=batch_size,
        gaussian=gaussian,
        mirror_axes=(0, 1, 2) if tta else (),
        fill=vio.background_value(modes[0], params[0]),
    )
    values = class_values(config)
    index = np.argmax(probs, axis=0)
    if postprocess == "largest_component":
        index = keep_largest_component(index)
    labels = values[index]
    if spacing:
        work = vio.Geometry.of(images[0])
        labels = vio.image_to_array(
            vio.resample_image(
                vio.array_to_image(labels.astype(np.int32), work), geometry, label=True
            )
        )
        # Probabilities outside the working grid (at most half a voxel at the far edges): 0.
        probs = np.stack(
            [
                vio.image_to_array(
                    vio.resample_image(vio.array_to_image(p, work), geometry, fill=0.0)
                )
                for p in probs
            ]
        )
    return labels, probs, geometry


def _label_dtype(values: np.ndarray) -> np.dtype:
    lo, hi = int(values.min()), int(values.max())
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _save_probabilities(path: str, probs: np.ndarray, values: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, probabilities=probs.astype(np.float32), class_values=values)


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _load_npy(path: str, mmap_mode: str | None = None) -> np.ndarray:
    """`np.load` of a user's .npy file; a file it cannot read is refused naming it."""
    try:
        return np.load(path, mmap_mode=mmap_mode)
    except (OSError, ValueError, EOFError) as exc:  # truncated, pickled or not .npy at all
        raise PredictInputError(
            f"Expected a NumPy .npy array in {path}. Received: a file NumPy cannot read ({exc})"
        ) from exc


def _classification_inputs(
    inputs: Sequence[str], volumes: str | None, config: dict[str, Any], skipped: list[str]
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(cubes, labels or None, ids) of .npy cube files or a candidates CSV with its volumes;
    the volumes of a candidates CSV that cannot be used are skipped and named in `skipped`."""
    inputs = list(inputs)
    patch = tuple(int(p) for p in config["patch"])
    modes = _channel_modes(config, 1)
    if len(inputs) == 1 and inputs[0].lower().endswith(".csv"):
        if not volumes:
            raise PredictInputError(
                f"Expected --volumes DIR with a candidates CSV. Received: --input {inputs[0]!r} "
                "and no --volumes"
            )
        from finetune_arrays import load_candidate_cubes
        from finetune_cases import FinetuneInputError

        try:
            return load_candidate_cubes(inputs[0], volumes, patch, modes[0], skipped=skipped)
        except FinetuneInputError as exc:  # the CSV's own checks
            raise PredictInputError(str(exc)) from exc
    cubes, labels, ids = [], [], []
    have_labels = True
    for path in inputs:
        if not path.lower().endswith(".npy") or not os.path.isfile(path):
            raise PredictInputError(
                "Expected .npy cube files (N, R, C, D) or one candidates .csv for "
                f"classification. Received: {path!r}"
            )
        x = _load_npy(path, mmap_mode="r")
        if x.ndim == 5 and 1 in (x.shape[1], x.shape[-1]):
            x = x.reshape(x.shape[0], *[n for n in x.shape[1:] if n != 1][:3])
        if x.ndim != 4 or tuple(x.shape[1:]) != patch:
            raise PredictInputError(
                f"Expected cubes of shape (N, {', '.join(map(str, patch))}) (the run's patch) "
                f"in {path}. Received: shape={tuple(x.shape)}"
            )
        # Arrays are fed as they are, as training feeds the original's pre-cut arrays.
        cubes.append(np.asarray(x, dtype=np.float32))
        stem = os.path.basename(path)[:-4]
        ids.extend(f"{stem}:{i}" for i in range(x.shape[0]))
        # The original's pairs: x_{split}.npy beside y_{split}.npy.
        folder, name = os.path.split(path)
        y_path = os.path.join(folder, "y_" + name[2:]) if name.startswith("x_") else ""
        if y_path and os.path.isfile(y_path):
            y = _load_npy(y_path).reshape(-1)
            if y.shape[0] != x.shape[0]:
                raise PredictInputError(
                    f"Expected one label per cube in {y_path}. Received: {y.shape[0]} labels "
                    f"for {x.shape[0]} cubes in {path}"
                )
            labels.append(y.astype(np.int64))
        else:
            have_labels = False
    return np.concatenate(cubes), (np.concatenate(labels) if have_labels else None), ids


def predict_cubes(
    model: Any, cubes: np.ndarray, data_format: str, batch_size: int = 16
) -> np.ndarray:
    """Class probabilities of cubes ``(N, R, C, D)`` (one channel).

    Args:
        model: the classification model, output ``(batch, n_classes)``.
        cubes: normalised float32 cubes.
        data_format: the model's layout.
        batch_size: cubes per model call.

    Returns:
        ``(N, n_classes)`` float32.
    """
    from tqdm import tqdm

    axis = 1 if data_format == "channels_first" else -1
    out = []
    for i in tqdm(range(0, len(cubes), batch_size), desc="cubes", unit="batch", leave=False):
        batch = np.expand_dims(np.asarray(cubes[i : i + batch_size], np.float32), axis)
        probs = np.asarray(model.predict_on_batch(batch), dtype=np.float32)
        out.append(probs.reshape(len(batch), -1))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def write_classification_csv(
    path: str, ids: Sequence[str], probs: np.ndarray, labels: np.ndarray | None
) -> None:
    """Write ``id, prob_0.., predicted[, label]`` rows atomically.

    Args:
        path: the CSV file.
        ids: one id per row.
        probs: ``(N, n_classes)`` probabilities.
        labels: the true classes, or None.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["id", *[f"prob_{k}" for k in range(probs.shape[1])], "predicted"]
    writer.writerow(header + (["label"] if labels is not None else []))
    predicted = _predicted_classes(probs)
    for i, case_id in enumerate(ids):
        row = [case_id, *[f"{p:.6g}" for p in probs[i]], int(predicted[i])]
        writer.writerow(row + ([int(labels[i])] if labels is not None else []))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())


def _predicted_classes(probs: np.ndarray) -> np.ndarray:
    # One sigmoid output is the probability of class 1.
    if probs.shape[1] == 1:
        return (probs[:, 0] >= 0.5).astype(np.int64)
    return np.argmax(probs, axis=1)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``predict`` flags (and its description and example) to `parser`.

    Args:
        parser: the subcommand's parser.
    """
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="training run folder")
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="DIR_OR_FILES",
        help="a folder of images, image files, .npy cubes or one candidates .csv",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="PRED_DIR",
        help="output folder (classification: a .csv file, or a folder for predictions.csv)",
    )
    parser.add_argument(
        "--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=8, help="windows per model call (default: 8)"
    )
    parser.add_argument(
        "--tta",
        choices=("on", "off"),
        default=None,
        help="test-time augmentation: also predict each window mirrored along x, y and z and "
        "average (8 times the work) (default: the run's recipe's: on for the default recipe, "
        "off for the original's)",
    )
    parser.add_argument(
        "--postprocess",
        choices=POSTPROCESSING,
        default=None,
        help="largest_component keeps each class's largest connected piece (default: the run's "
        "recipe's)",
    )
    parser.add_argument(
        "--save_probabilities",
        action="store_true",
        help="also write {case}.npz: float32 'probabilities' (classes, x, y, z)",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo cases already written")
    parser.add_argument(
        "--no_gaussian",
        action="store_true",
        help="weight every voxel of a window alike instead of a Gaussian (sigma 1/8 patch)",
    )
    parser.add_argument(
        "--file_ending",
        default=None,
        help="ending of the images in an input folder (default: the run's, e.g. .nii.gz)",
    )
    parser.add_argument(
        "--output_ending",
        default=None,
        help="ending of the label maps (default: the input's own; .mhd inputs give .mha)",
    )
    parser.add_argument(
        "--volumes", default=None, metavar="DIR", help="volumes of a candidates CSV"
    )
    parser.add_argument(
        "--model_file", default=None, help="model to load (default RUN_DIR/best_model.keras)"
    )


def check_settings(settings: PredictSettings) -> None:
    """Check the value ranges that need no file.

    Args:
        settings: the command's settings.

    Raises:
        PredictInputError: naming the flag and what was expected.
    """
    if not 0.0 <= settings.overlap < 1.0:
        raise PredictInputError(
            f"Expected 0 <= --overlap < 1. Received: --overlap {settings.overlap}"
        )
    if settings.batch_size < 1:
        raise PredictInputError(
            f"Expected --batch_size >= 1. Received: --batch_size {settings.batch_size}"
        )
    if settings.tta not in (None, "on", "off"):
        raise PredictInputError(f"Expected --tta on or off. Received: --tta {settings.tta}")
    if settings.postprocess not in (None, *POSTPROCESSING):
        raise PredictInputError(
            f"Expected --postprocess in {POSTPROCESSING}. Received: --postprocess "
            f"{settings.postprocess}"
        )


def _output_ending(settings: PredictSettings, first_image: str, config: dict[str, Any]) -> str:
    ending = settings.output_ending or image_ending(first_image) or config.get("file_ending")
    ending = ending or ".nii.gz"
    # A MetaImage header + raw pair cannot be renamed into place as one file: write .mha.
    return ".mha" if ending.lower() == ".mhd" else ending


def _find_cases(settings: PredictSettings, config: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The cases of the input, each with one image per channel the model was trained on."""
    from finetune_cases import FinetuneInputError, find_images

    inputs = list(settings.input)
    is_folder = len(inputs) == 1 and os.path.isdir(inputs[0])
    # A folder is read with the run's file ending; explicit files may be in any format.
    file_ending = settings.file_ending or (config.get("file_ending") if is_folder else None)
    try:
        cases = find_images(inputs, file_ending)
    except FinetuneInputError as exc:  # its checks of the folder and the files
        raise PredictInputError(str(exc)) from exc
    if not cases:
        raise PredictInputError(
            f"Expected images ending in {file_ending!r} in the input. Received: {inputs}"
        )
    n_channels = int(
        config.get("n_channels")
        or len(config.get("channel_names") or config.get("intensity") or [0])
    )
    for case_id, paths in cases:
        if len(paths) != n_channels:
            raise PredictInputError(
                f"Expected {n_channels} channel file(s) per case, as the model was trained. "
                f"Received: case {case_id!r} with {paths}"
            )
    return cases


def _predict_segmentation(settings: PredictSettings, model: Any, config: dict[str, Any]) -> int:
    from tqdm import tqdm

    cases = _find_cases(settings, config)
    os.makedirs(settings.output, exist_ok=True)
    values = class_values(config)
    dtype = _label_dtype(values)
    done = skipped = 0
    unreadable: list[str] = []
    for case_id, paths in tqdm(cases, desc="predict", unit="case"):
        out = os.path.join(settings.output, case_id + _output_ending(settings, paths[0], config))
        prob = os.path.join(settings.output, case_id + ".npz")
        if (
            not settings.overwrite
            and os.path.exists(out)
            and (not settings.save_probabilities or os.path.exists(prob))
        ):
            skipped += 1
            continue
        try:
            labels, probs, geometry = predict_case(
                model,
                config,
                paths,
                overlap=settings.overlap,
                batch_size=settings.batch_size,
                gaussian=not settings.no_gaussian,
                tta=(settings.tta or config.get("tta") or "off") == "on",
                postprocess=settings.postprocess or config.get("postprocess") or "none",
            )
        except vio.VolumeError as exc:
            # One bad volume must not cost the others their predictions: named, skipped.
            tqdm.write(f"warning: skipping case {case_id}: {exc}", file=sys.stderr)
            unreadable.append(case_id)
            continue
        if settings.save_probabilities:
            _save_probabilities(prob, probs, values)
        vio.write_image(labels.astype(dtype), geometry, out)
        done += 1
    print(f"predicted {done} case(s), skipped {skipped} already written, into {settings.output}")
    return _report_unreadable(unreadable, "case")


def _report_unreadable(names: Sequence[str], what: str) -> int:
    # Exit status 1 when volumes were skipped as unreadable (each named as it was met), else 0.
    if not names:
        return 0
    print(
        f"error: {len(names)} {what}(s) skipped because a volume could not be used: "
        + ", ".join(names),
        file=sys.stderr,
    )
    return 1


def _predict_classification(settings: PredictSettings, model: Any, config: dict[str, Any]) -> int:
    unreadable: list[str] = []
    cubes, labels, ids = _classification_inputs(
        settings.input, settings.volumes, config, unreadable
    )
    out = settings.output
    if not out.lower().endswith(".csv"):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, CLASSIFICATION_CSV)
    elif os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out) and not settings.overwrite:
        print(f"{out} exists; pass --overwrite to predict again")
        return 0
    probs = predict_cubes(model, cubes, config["data_format"], batch_size=settings.batch_size)
    write_classification_csv(out, ids, probs, labels)
    print(f"wrote {len(ids)} prediction(s) to {out}")
    return _report_unreadable(unreadable, "volume")


def predict(settings: PredictSettings) -> int:
    """``finetune.py predict``: label maps of whole volumes, or a CSV of class probabilities.

    Args:
        settings: the command's settings.

    Returns:
        0; 1 when some volumes could not be used (each named on stderr and skipped, the other
        cases written).

    Raises:
        PredictInputError: bad input (flags, run folder, images, cubes), raised where it is
            checked; the command line prints it in one line and exits with 2. Other errors
            keep their type.
    """
    check_settings(settings)
    model, config = load_run(settings.model, settings.model_file)
    if config["task"] == "classification":
        return _predict_classification(settings, model, config)
    return _predict_segmentation(settings, model, config)
