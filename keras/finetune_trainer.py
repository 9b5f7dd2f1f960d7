"""Fine-tuning: checks, model with its head, datasets, callbacks and `fit` (docs/finetuning.md).

`finetune.py train` parses the command line and calls `run_train`. The steps:

* `prepare`: every check that needs no model: the data (layout, pairs, geometry, labels,
  foreground), the patch, the weights file and its width, the run folder; the volumes are
  preprocessed into the cache here;
* `setup`: the model (`unet_model_3d`, the weights, the README's head), the datasets, the
  callbacks, the resolved configuration;
* `train`: `setup`, then `model.fit`.

The defaults are the original's downstream settings: Adam at 1e-3, `dice_coef_loss` (or
categorical cross-entropy for classification), ReduceLROnPlateau(factor 0.5, patience 6,
min_delta 1e-4, min_lr 1e-6), early stopping on val_loss and the best-val_loss model kept.

The run folder (RUN_DIR):

  finetune_config.json   every setting, resolved (read by `finetune.py predict`)
  best_model.keras       the whole model at the best val_loss (`keras.models.load_model`)
  last_checkpoint.npz    the last finished epoch, for --resume
  training_log.csv       one row per epoch
  curves.png             loss and Dice (or accuracy) per epoch
  preprocessed/          the normalised volumes, memory-mapped (reused by later runs)

Imports: stdlib, NumPy, Keras, h5py, Pillow (the curves), unet3d, finetune_cases,
finetune_patches, finetune_arrays, genesis_callbacks, genesis_checkpoint, genesis_files;
download_weights only for ``hf:`` weights.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import zipfile
from typing import Any

import h5py
import keras
import numpy as np

import unet3d
from finetune_arrays import ArrayBatches, discover_arrays, discover_candidates
from finetune_cases import (
    FinetuneInputError,
    default_intensity,
    detect_layout,
    discover_segmentation,
    prepare_cases,
    split_cases,
)
from finetune_patches import SegmentationPatches, check_patch
from genesis_callbacks import (
    AtomicBestCheckpoint,
    EpochSetter,
    LastEpochCheckpoint,
    ResumableEarlyStopping,
    ResumableReduceLROnPlateau,
)
from genesis_checkpoint import (
    RunState,
    load_last_checkpoint,
    read_checkpoint_state,
    truncate_csv,
    write_text_atomic,
)
from genesis_files import atomic_path

__all__ = [
    "DEFAULT_WEIGHTS",
    "FILES",
    "OPTIMIZERS",
    "RunPlan",
    "build_model",
    "make_optimizer",
    "prepare",
    "resolve_weights",
    "run_train",
    "setup",
    "train",
    "weight_file_width",
]

DEFAULT_WEIGHTS = os.path.join("pretrained_weights", "Genesis_Chest_CT.h5")
# What a run writes in its folder.
FILES = {
    "config": "finetune_config.json",
    "best": "best_model.keras",
    "last": "last_checkpoint.npz",
    "csv": "training_log.csv",
    "curves": "curves.png",
    "cache": "preprocessed",
}
OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw")
# Settings a resumed run must share with the run it continues.
_RESUME_KEYS = (
    "task",
    "patch",
    "data_format",
    "n_base_filters",
    "n_classes",
    "n_channels",
    "batch_size",
    "freeze_encoder",
)
# nnU-Net's batches per epoch for volumes (training, validation).
VOLUME_STEPS = (250, 50)


# ------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------


def resolve_weights(spec: str | None) -> str | None:
    """The weight file a ``--weights`` value names; None for ``none`` (training from scratch).

    Args:
        spec: a path, ``none``, ``hf:...`` (fetched by `download_weights.resolve_weights`), or
            None for the default ``pretrained_weights/Genesis_Chest_CT.h5``.

    Returns:
        A local file path, or None.

    Raises:
        FinetuneInputError: the file does not exist (for the default: how to get it).
    """
    if spec is not None and spec.strip().lower() == "none":
        return None
    if spec is not None and spec.startswith("hf:"):
        from download_weights import resolve_weights as fetch  # only when asked: network code

        return fetch(spec)
    path = DEFAULT_WEIGHTS if spec is None else spec
    if not os.path.isfile(path):
        if spec is None:
            raise FinetuneInputError(
                f"Expected the pre-trained weights at {DEFAULT_WEIGHTS} (the default --weights). "
                "Received: no such file. Run `python keras/download_weights.py` to fetch "
                "Genesis_Chest_CT.h5, pass --weights FILE, or --weights none to train from scratch."
            )
        raise FinetuneInputError(f"Expected a weight file at --weights {path!r}. Received: none")
    return path


def _h5_kernels(source: Any) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    with h5py.File(source, "r") as f:
        f.visititems(
            lambda name, obj: (
                shapes.append(tuple(obj.shape))
                if isinstance(obj, h5py.Dataset) and obj.ndim == 5
                else None
            )
        )
    return shapes


def weight_file_width(path: str) -> tuple[int, int]:
    """(input channels, n_base_filters) of a U-Net weight file, read with h5py.

    The first convolution's kernel is (3, 3, 3, channels, n_base_filters) and has the fewest
    output channels of all 3x3x3 kernels, in any of the file formats (Keras 2 ``.h5``,
    ``.weights.h5``, ``.keras``).

    Args:
        path: the file.

    Returns:
        (channels, n_base_filters).

    Raises:
        FinetuneInputError: not an HDF5/Keras file, or no 3x3x3 kernel in it.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                shapes = _h5_kernels(io.BytesIO(archive.read("model.weights.h5")))
        else:
            shapes = _h5_kernels(path)
    except (OSError, KeyError) as exc:
        raise FinetuneInputError(
            f"Expected a Keras weight file (.h5, .weights.h5 or .keras) at --weights {path}. "
            f"Received: a file h5py cannot read ({exc})"
        ) from None
    kernels = [s for s in shapes if s[:3] == (3, 3, 3)]
    if not kernels:
        raise FinetuneInputError(
            f"Expected 3D U-Net weights (3x3x3 convolution kernels) in --weights {path}. "
            f"Received: {len(shapes)} 5-D arrays, none 3x3x3"
        )
    first = min(kernels, key=lambda s: s[4])
    return int(first[3]), int(first[4])


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


def make_optimizer(name: str, lr: float) -> keras.optimizers.Optimizer:
    """The optimizer `name` at learning rate `lr` (SGD with the pre-training's momentum 0.9).

    Args:
        name: one of `OPTIMIZERS`.
        lr: the learning rate.

    Returns:
        A Keras optimizer.
    """
    name = name.lower()
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr)
    raise FinetuneInputError(f"Expected --optimizer in {OPTIMIZERS}. Received: {name!r}")


def build_model(
    task: str,
    patch: tuple[int, int, int],
    n_channels: int,
    n_classes: int,
    n_base_filters: int = 32,
    data_format: str = "channels_first",
    weights: str | None = None,
    freeze_encoder: bool = False,
) -> unet3d.UNet3D:
    """The U-Net with the README's head, the pre-trained weights loaded (not compiled).

    Segmentation: ``depth_13_relu`` -> ``Conv3D(n_classes, 1)`` (``seg_conv``) -> softmax over
    the channel axis (``seg_softmax``). Classification: ``depth_7_relu`` ->
    ``GlobalAveragePooling3D`` (``cls_pool``) -> ``Dense(1024, relu)`` (``cls_dense``) ->
    ``Dense(n_classes, softmax)`` (``cls_output``). The outputs are float32 under mixed
    precision too.

    Args:
        task: "segmentation" or "classification".
        patch: (R, C, D).
        n_channels: input channels.
        n_classes: output classes (segmentation: with the background).
        n_base_filters: the U-Net's width.
        data_format: "channels_first" or "channels_last".
        weights: a weight file for the U-Net (without head), or None.
        freeze_encoder: make the encoder (up to ``depth_7_relu``) non-trainable.

    Returns:
        A `unet3d.UNet3D` (its `save` is atomic) named ``finetune_{task}``.

    Raises:
        FinetuneInputError: the weight file does not fit.
    """
    shape = (n_channels, *patch) if data_format == "channels_first" else (*patch, n_channels)
    base = unet3d.unet_model_3d(
        shape, batch_normalization=True, n_base_filters=n_base_filters, data_format=data_format
    )
    if weights is not None:
        try:
            base.load_weights(weights)
        except (ValueError, OSError) as exc:
            raise FinetuneInputError(
                f"Expected weights that fit unet_model_3d({shape}, n_base_filters="
                f"{n_base_filters}, batch_normalization=True) in --weights {weights}. "
                f"Received: {str(exc).splitlines()[0]}"
            ) from None
    axis = 1 if data_format == "channels_first" else -1
    if task == "segmentation":
        x = base.get_layer("depth_13_relu").output
        x = unet3d.Conv3D(n_classes, 1, data_format=data_format, name="seg_conv")(x)
        out = keras.layers.Softmax(axis=axis, dtype="float32", name="seg_softmax")(x)
    else:
        x = base.get_layer("depth_7_relu").output
        x = keras.layers.GlobalAveragePooling3D(data_format=data_format, name="cls_pool")(x)
        x = keras.layers.Dense(1024, activation="relu", name="cls_dense")(x)
        out = keras.layers.Dense(
            n_classes, activation="softmax", dtype="float32", name="cls_output"
        )(x)
    if freeze_encoder:
        names = [layer.name for layer in base.layers]
        for layer in base.layers[: names.index("depth_7_relu") + 1]:
            layer.trainable = False
    return unet3d.UNet3D(inputs=base.input, outputs=out, name=f"finetune_{task}")


def set_bn_momentum(model: keras.Model, momentum: float | None) -> int:
    """Set the momentum of every batch normalization layer (None keeps Keras' 0.99).

    At 0.99 the moving statistics that inference uses follow the weights over a few hundred
    steps; a short fine-tuning run ends before they catch up with what training changed.

    Args:
        model: the fine-tuning model.
        momentum: in [0, 1), or None.

    Returns:
        How many layers were set.
    """
    if momentum is None:
        return 0
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"Expected bn_momentum in [0, 1). Received: bn_momentum={momentum!r}")
    layers = [x for x in model._flatten_layers() if isinstance(x, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


# Segmentation losses of unet3d by name; the first is the original's and the default.
SEGMENTATION_LOSSES = ("dice_coef_loss", "bce_dice_loss", "bce_foreground_dice_loss")


def compile_model(
    model: keras.Model,
    task: str,
    optimizer: str,
    lr: float,
    loss: str = "dice_coef_loss",
    data_format: str = "channels_first",
) -> None:
    """Compile as the original's downstream tasks: dice_coef_loss, or cross-entropy.

    Args:
        model: from `build_model`.
        task: "segmentation" or "classification".
        optimizer: one of `OPTIMIZERS`.
        lr: the learning rate.
        loss: segmentation only, one of `SEGMENTATION_LOSSES`. With
            ``bce_foreground_dice_loss`` the Dice of the foreground alone is logged too
            (``foreground_dice_coef``).
        data_format: the model's, for the foreground loss's channel axis.
    """
    if loss not in SEGMENTATION_LOSSES:
        raise ValueError(f"Expected loss in {SEGMENTATION_LOSSES}. Received: loss={loss!r}")
    if task == "segmentation":
        metrics = [unet3d.mean_iou, unet3d.dice_coef]
        if loss == "bce_foreground_dice_loss":
            loss_fn = unet3d.bce_foreground_dice_loss(data_format)
            metrics.append(unet3d.foreground_dice_metric(data_format))
        else:
            loss_fn = getattr(unet3d, loss)
        loss = loss_fn
    else:
        loss, metrics = "categorical_crossentropy", ["categorical_accuracy"]
    model.compile(optimizer=make_optimizer(optimizer, lr), loss=loss, metrics=metrics)


# ------------------------------------------------------------------------------------------
# Callbacks of their own
# ------------------------------------------------------------------------------------------


class BestModelCheckpoint(AtomicBestCheckpoint):
    """`AtomicBestCheckpoint` that saves an uncompiled twin of the model (same variables).

    The file then holds no compile configuration, so ``keras.models.load_model(path)`` needs
    only ``import unet3d`` (the loss functions are not registered Keras objects).

    Args:
        filepath: the ``.keras`` file.
        export: a `unet3d.UNet3D` built on the trained model's inputs and outputs.
        **kwargs: for `AtomicBestCheckpoint`.
    """

    def __init__(self, filepath: str, export: keras.Model, **kwargs: Any) -> None:
        super().__init__(filepath, **kwargs)
        self._export = export

    @property
    def model(self) -> keras.Model:
        _ = super().model  # on JAX, this syncs the trained values into the shared variables
        return self._export


def _read_log(path: str) -> dict[str, list[float]]:
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float("nan"))
    return cols


def draw_curves(log_csv: str, png: str, metric: str) -> None:
    """A PNG of loss and `metric` per epoch (training and validation) from the CSV log.

    Drawn with Pillow (no plotting library needed); written atomically.

    Args:
        log_csv: the training log.
        png: the picture.
        metric: the second panel's column (e.g. "dice_coef").
    """
    from PIL import Image, ImageDraw

    cols = _read_log(log_csv)
    epochs = cols.get("epoch", [])
    width, height, pad = 640, 260, 40
    img = Image.new("RGB", (width, 2 * height), "white")
    draw = ImageDraw.Draw(img)
    colours = {"train": (31, 119, 180), "val": (255, 127, 14)}
    for panel, name in enumerate(("loss", metric)):
        top = panel * height
        box = (pad, top + 25, width - 15, top + height - pad)
        draw.rectangle(box, outline="black")
        draw.text((pad, top + 6), f"{name} (blue: training, orange: validation)", fill="black")
        series = {"train": cols.get(name, []), "val": cols.get("val_" + name, [])}
        values = [v for s in series.values() for v in s if np.isfinite(v)]
        if not epochs or not values:
            continue
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1.0
        draw.text((4, box[1]), f"{hi:.3g}", fill="black")
        draw.text((4, box[3] - 10), f"{lo:.3g}", fill="black")
        draw.text((box[0], box[3] + 4), f"epoch {int(epochs[0]) + 1}", fill="black")
        draw.text((box[2] - 60, box[3] + 4), f"epoch {int(epochs[-1]) + 1}", fill="black")
        span = max(1, len(epochs) - 1)
        for key, ys in series.items():
            pts = [
                (
                    box[0] + (box[2] - box[0]) * i / span,
                    box[3] - (box[3] - box[1]) * (y - lo) / (hi - lo),
                )
                for i, y in enumerate(ys)
                if np.isfinite(y)
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colours[key], width=2)
            for x, y in pts:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colours[key])
    with atomic_path(png) as tmp:
        img.save(tmp, format="PNG")


class CurvesPicture(keras.callbacks.Callback):
    """After every epoch, redraw the curves from the CSV log (it must come after the logger)."""

    def __init__(self, log_csv: str, png: str, metric: str) -> None:
        super().__init__()
        self.log_csv, self.png, self.metric = log_csv, png, metric

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        draw_curves(self.log_csv, self.png, self.metric)


# ------------------------------------------------------------------------------------------
# Prepare: every check before a model exists
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunPlan:
    """What `prepare` found.

    Attributes:
        config: the resolved configuration (written to finetune_config.json).
        paths: name -> absolute path of the run's files (`FILES`).
        weights: the weight file, or None.
        train_ds, valid_ds: the datasets.
        resume_state: the last checkpoint's state to continue from, or None.
    """

    config: dict
    paths: dict[str, str]
    weights: str | None
    train_ds: keras.utils.PyDataset
    valid_ds: keras.utils.PyDataset
    resume_state: RunState | None


def _defaults(args: argparse.Namespace) -> dict:
    """The namespace's settings as a dict, None meaning 'not given'."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command")}


def _check_run_dir(paths: dict[str, str], resume: bool, overwrite: bool) -> None:
    exists = os.path.isfile(paths["config"])
    if exists and not resume and not overwrite:
        raise FinetuneInputError(
            f"Expected a new run folder. Received: {os.path.dirname(paths['config'])} already "
            "holds a run; pass --resume to continue it or --overwrite to start again"
        )
    os.makedirs(os.path.dirname(paths["config"]), exist_ok=True)


def prepare(args: argparse.Namespace) -> RunPlan:
    """Every check and all data preparation, before any model is built.

    Args:
        args: the parsed ``finetune.py train`` flags.

    Returns:
        The `RunPlan`.

    Raises:
        FinetuneInputError: bad input (data, flags, weights, run folder).
    """
    s = _defaults(args)
    run_dir = os.path.abspath(s["output"])
    paths = {k: os.path.join(run_dir, v) for k, v in FILES.items()}
    if s.get("cache"):
        paths["cache"] = os.path.abspath(s["cache"])
    _check_run_dir(paths, bool(s["resume"]), bool(s.get("overwrite")))
    for name in ("batch_size", "epochs", "patience", "workers"):
        if s[name] is not None and int(s[name]) < (0 if name == "patience" else 1):
            raise FinetuneInputError(f"Expected --{name} of at least 1. Received: {s[name]}")
    if not s["lr"] > 0:
        raise FinetuneInputError(f"Expected --lr > 0. Received: {s['lr']}")
    make_optimizer(s["optimizer"], 1e-3)  # checks the name

    weights = resolve_weights(s["weights"])
    n_base = s["n_base_filters"]
    file_channels = None
    if weights is not None:
        file_channels, width = weight_file_width(weights)
        if n_base is not None and int(n_base) != width:
            raise FinetuneInputError(
                f"Expected --n_base_filters to match the weights, or to be left out. Received: "
                f"--n_base_filters {n_base}, but {weights} was trained with {width}"
            )
        n_base = width
    n_base = 32 if n_base is None else int(n_base)

    layout = detect_layout(s["data"])
    task = s["task"]
    seed, bs = int(s["seed"]), int(s["batch_size"])
    common = dict(workers=int(s["workers"]), use_multiprocessing=False, max_queue_size=10)

    def array_batches(x, t, n_classes: int, training: bool, indices) -> ArrayBatches:
        # Training batches are shuffled each epoch; validation batches are the same each epoch.
        steps = s["steps_per_epoch"] if training else s["validation_steps"]
        return ArrayBatches(
            x, t, n_classes, bs, seed, s["data_format"], training, steps, indices, **common
        )

    config: dict[str, Any] = {}
    if layout == "volumes":
        if task not in (None, "segmentation"):
            raise FinetuneInputError(
                f"Expected --task segmentation for a folder of labelled volumes ({s['data']}). "
                f"Received: --task {task}"
            )
        task = "segmentation"
        patch = check_patch(s["patch"] or (64, 64, 32))
        source = discover_segmentation(s["data"])
        intensity = default_intensity(source.channel_names, s["intensity"])
        train_ids, valid_ids = split_cases(
            [c.case_id for c in source.cases], s["fold"], s["folds"], seed
        )
        prepared = prepare_cases(
            source, paths["cache"], intensity, s["spacing"], progress=bool(s["verbose"])
        )
        by_id = {p.case_id: p for p in prepared}
        train_cases = [by_id[i] for i in train_ids]
        if not any(c.has_foreground for c in train_cases):
            raise FinetuneInputError(
                f"Expected foreground in at least one training case. Received: none in "
                f"{train_ids} (the foreground is only in validation cases; change --seed/--fold)"
            )
        steps = int(s["steps_per_epoch"] or VOLUME_STEPS[0])
        val_steps = int(s["validation_steps"] or VOLUME_STEPS[1])
        n_classes, n_channels = source.n_classes, len(source.channel_names)
        train_ds = SegmentationPatches(
            train_cases, patch, bs, n_classes, steps, seed, s["data_format"], **common
        )
        valid_ds = SegmentationPatches(
            [by_id[i] for i in valid_ids],
            patch,
            bs,
            n_classes,
            val_steps,
            seed + 1,
            s["data_format"],
            fixed_epoch=0,
            **common,
        )
        config.update(
            labels=source.labels,
            channel_names=source.channel_names,
            file_ending=source.file_ending,
            layout=source.layout,
        )
    elif layout == "arrays":
        if s["spacing"] is not None:
            raise FinetuneInputError("Expected no --spacing with pre-cut arrays (they have none).")
        source = discover_arrays(s["data"], task)
        task = source.task
        patch = check_patch(source.patch)
        if s["patch"] is not None and tuple(s["patch"]) != patch:
            raise FinetuneInputError(
                f"Expected --patch to be left out or to match the arrays' size {patch} in "
                f"{s['data']}. Received: --patch {' '.join(map(str, s['patch']))}"
            )
        intensity = default_intensity(["prepared"], s["intensity"] or ["none"])
        n_classes, n_channels = source.n_classes, 1
        x_tr, t_tr, x_va, t_va = (
            source.x["train"],
            source.t["train"],
            source.x["valid"],
            source.t["valid"],
        )
        tr_idx = va_idx = None
        if s["fold"] is not None:
            # Cross-validation pools both parts; each array item is its own case.
            x_tr = x_va = np.concatenate([x_tr, x_va])
            t_tr = t_va = np.concatenate([t_tr, t_va])
            ids = [f"{i:06d}" for i in range(len(x_tr))]
            tr, va = split_cases(ids, s["fold"], s["folds"], seed)
            tr_idx, va_idx = np.array(tr, dtype=np.int64), np.array(va, dtype=np.int64)
            train_ids, valid_ids = tr, va
        else:
            train_ids, valid_ids = ["x_train"], ["x_valid"]
        train_ds = array_batches(x_tr, t_tr, n_classes, True, tr_idx)
        valid_ds = array_batches(x_va, t_va, n_classes, False, va_idx)
        config.update(
            labels={"background": 0, "foreground": 1} if task == "segmentation" else None,
            channel_names=["prepared"],
            file_ending=None,
            layout="arrays",
        )
    else:
        if task not in (None, "classification"):
            raise FinetuneInputError(
                f"Expected --task classification for a candidates CSV ({s['data']}). "
                f"Received: --task {task}"
            )
        task = "classification"
        patch = check_patch(s["patch"] or (64, 64, 32))
        intensity = default_intensity(["CT"], s["intensity"])
        if s["spacing"] is not None:
            raise FinetuneInputError(
                "Expected no --spacing with candidates (cubes are cut on each volume's own grid)."
            )
        source = discover_candidates(
            s["data"], patch, paths["cache"], intensity[0], s.get("candidates")
        )
        cases = source.case_ids
        train_ids, valid_ids = split_cases(cases, s["fold"], s["folds"], seed)
        valid_set = set(valid_ids)
        va_idx = np.array([i for i, c in enumerate(cases) if c in valid_set], np.int64)
        tr_idx = np.array([i for i, c in enumerate(cases) if c not in valid_set], np.int64)
        n_classes, n_channels = max(2, int(source.labels.max()) + 1), 1
        train_ds = array_batches(source.cubes, source.labels, n_classes, True, tr_idx)
        valid_ds = array_batches(source.cubes, source.labels, n_classes, False, va_idx)
        config.update(
            labels=None,
            channel_names=["CT"],
            file_ending=None,
            layout="candidates",
            candidates=source.csv_path,
        )

    if file_channels is not None and file_channels != n_channels:
        raise FinetuneInputError(
            f"Expected weights for {n_channels} input channel(s) ({config['channel_names']}). "
            f"Received: {weights} has {file_channels}; pass --weights none to train from scratch"
        )
    config = {
        "task": task,
        "data": os.path.abspath(s["data"]),
        "output": run_dir,
        "weights": None if weights is None else os.path.abspath(weights),
        "patch": list(patch),
        "data_format": s["data_format"],
        "n_classes": int(n_classes),
        "n_channels": int(n_channels),
        "intensity": list(intensity),
        "spacing": None if s["spacing"] is None else [float(v) for v in s["spacing"]],
        "n_base_filters": n_base,
        "seed": seed,
        "batch_size": bs,
        "epochs": int(s["epochs"]),
        "steps_per_epoch": len(train_ds),
        "validation_steps": len(valid_ds),
        "lr": float(s["lr"]),
        "optimizer": s["optimizer"],
        "loss": s.get("loss", "dice_coef_loss"),
        "bn_momentum": s.get("bn_momentum"),
        "patience": int(s["patience"]),
        "fold": s["fold"],
        "folds": int(s["folds"]),
        "freeze_encoder": bool(s["freeze_encoder"]),
        "mixed_precision": bool(s["mixed_precision"]),
        "workers": int(s["workers"]),
        "verbose": int(s.get("verbose", 1)),
        "cache": paths["cache"],
        "train_cases": list(train_ids),
        "valid_cases": list(valid_ids),
        **config,
    }
    state = _resume_state(paths, config, bool(s["resume"]))
    return RunPlan(config, paths, weights, train_ds, valid_ds, state)


def _resume_state(paths: dict[str, str], config: dict, resume: bool) -> RunState | None:
    if not resume:
        return None
    if not os.path.isfile(paths["last"]):
        print(f"Notice: --resume given but no checkpoint {paths['last']}; starting from epoch 1.")
        return None
    if os.path.isfile(paths["config"]):
        with open(paths["config"]) as f:
            before = json.load(f)
        changed = [k for k in _RESUME_KEYS if before.get(k) != config.get(k)]
        if changed:
            raise FinetuneInputError(
                "Expected the same settings as the run being resumed. Received: "
                + "; ".join(f"{k} {before.get(k)!r} vs {config.get(k)!r}" for k in changed)
            )
    return RunState.from_dict(read_checkpoint_state(paths["last"]))


# ------------------------------------------------------------------------------------------
# Setup and fit
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    """What `setup` made for `fit`."""

    model: keras.Model
    plan: RunPlan
    callbacks: list[keras.callbacks.Callback]
    initial_epoch: int


def setup(args: argparse.Namespace) -> Session | None:
    """`prepare`, then the model, weights or checkpoint, callbacks and the written config.

    Args:
        args: the parsed flags.

    Returns:
        The `Session`; None when a resumed run had already finished.
    """
    plan = prepare(args)
    cfg, paths, state = plan.config, plan.paths, plan.resume_state
    if state is not None and (state.finished or state.epoch + 1 >= cfg["epochs"]):
        print(f"Training already finished at epoch {state.epoch + 1} ({paths['last']}).")
        return None
    keras.utils.set_random_seed(cfg["seed"])
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if cfg["mixed_precision"] else "float32"
    )
    model = build_model(
        cfg["task"],
        tuple(cfg["patch"]),
        cfg["n_channels"],
        cfg["n_classes"],
        cfg["n_base_filters"],
        cfg["data_format"],
        plan.weights if state is None else None,
        cfg["freeze_encoder"],
    )
    set_bn_momentum(model, cfg.get("bn_momentum"))
    compile_model(
        model,
        cfg["task"],
        cfg["optimizer"],
        cfg["lr"],
        cfg.get("loss", "dice_coef_loss"),
        cfg["data_format"],
    )
    model.optimizer.build(model.trainable_variables)
    if state is not None:
        load_last_checkpoint(paths["last"], model)
        print(
            f"Resuming from {paths['last']}: epoch {state.epoch + 2} of {cfg['epochs']}, "
            f"best val_loss {state.best}, learning rate {state.learning_rate:g}"
        )
        truncate_csv(paths["csv"], state.epoch + 1)
    write_text_atomic(paths["config"], json.dumps(cfg, indent=2) + "\n")
    export = unet3d.UNet3D(inputs=model.inputs, outputs=model.outputs, name=model.name)
    best_cb = BestModelCheckpoint(
        paths["best"], export, best=None if state is None else state.best, verbose=cfg["verbose"]
    )
    early_cb = ResumableEarlyStopping(
        monitor="val_loss",
        patience=cfg["patience"],
        restore=None if state is None else state.early_stopping,
    )
    lr_cb = ResumableReduceLROnPlateau(
        monitor="val_loss",
        factor=0.5,
        patience=6,
        min_delta=1e-4,
        min_lr=1e-6,
        verbose=1,
        restore=None if state is None else state.reduce_lr,
    )
    metric = "dice_coef" if cfg["task"] == "segmentation" else "categorical_accuracy"
    if cfg["task"] == "segmentation" and cfg.get("loss") == "bce_foreground_dice_loss":
        metric = "foreground_dice_coef"
    callbacks = [
        EpochSetter([plan.train_ds]),
        best_cb,
        early_cb,
        lr_cb,
        keras.callbacks.CSVLogger(paths["csv"], append=state is not None),
        CurvesPicture(paths["csv"], paths["curves"], metric),
        LastEpochCheckpoint(paths["last"], best_cb, early_cb, lr_cb, cfg["batch_size"], "finetune"),
    ]
    return Session(model, plan, callbacks, 0 if state is None else state.epoch + 1)


def train(args: argparse.Namespace) -> keras.callbacks.History | None:
    """Run (or resume) fine-tuning.

    Args:
        args: the parsed ``finetune.py train`` flags.

    Returns:
        The Keras History (None when a resumed run had already finished).
    """
    try:
        session = setup(args)
    except FinetuneInputError:
        raise
    except (ValueError, OSError) as exc:  # e.g. an unreadable volume: still bad input
        raise FinetuneInputError(str(exc)) from exc
    if session is None:
        return None
    cfg = session.plan.config
    print(
        f"Fine-tuning ({cfg['task']}): {len(cfg['train_cases'])} training and "
        f"{len(cfg['valid_cases'])} validation case(s); {cfg['steps_per_epoch']} steps of "
        f"{cfg['batch_size']} per epoch; weights {cfg['weights'] or 'none (from scratch)'}"
    )
    return session.model.fit(
        session.plan.train_ds,
        epochs=cfg["epochs"],
        initial_epoch=session.initial_epoch,
        validation_data=session.plan.valid_ds,
        callbacks=session.callbacks,
        verbose=int(getattr(args, "verbose", 1)),
        # The datasets draw their own random order; Keras' shuffling would only make a resumed
        # run differ from an uninterrupted one.
        shuffle=False,
    )


def run_train(args: argparse.Namespace) -> int:
    """`finetune.py train`: 0 when done, 2 for bad input (one line on stderr).

    Args:
        args: the parsed flags.

    Returns:
        The exit status.
    """
    try:
        train(args)
    except FinetuneInputError as exc:
        print(f"finetune.py train: error: {exc}", file=sys.stderr)
        return 2
    return 0
