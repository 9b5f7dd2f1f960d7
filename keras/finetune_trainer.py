"""Fine-tuning: the model with its head, callbacks, `fit`, resume, curves (docs/finetuning.md).

`finetune.py train` parses the command line into a `finetune_prepare.FinetuneSettings` and
calls `train`. The steps:

* `finetune_prepare.prepare`: every check that needs no model: the data (layout, pairs,
  geometry, labels, foreground), the patch, the weights file and its width, the run folder; the
  volumes are preprocessed into the cache there;
* `setup`: the model (`unet_model_3d`, the weights, the README's head), the callbacks, the
  resolved configuration written;
* `train`: the settings printed, `setup`, then `model.fit`.

Bad input is raised as `finetune_cases.FinetuneInputError` where it is checked (the command
line prints it in one line); every other error keeps its type and traceback.

The defaults are the original's downstream settings: Adam at 1e-3, `dice_coef_loss` (or
categorical cross-entropy for classification), ReduceLROnPlateau(factor 0.5, patience 6,
min_delta 1e-4, min_lr 1e-6), early stopping on val_loss and the best-val_loss model kept.

The run folder (RUN_DIR):

  finetune_config.json   every setting, resolved (read by `finetune.py predict`), and the
                         settings as given ("settings")
  best_model.keras       the whole model at the best val_loss (`keras.models.load_model`)
  last_checkpoint.npz    the last finished epoch, for --resume
  training_log.csv       one row per epoch
  curves.png             loss and Dice (or accuracy) per epoch
  preprocessed/          the normalised volumes, memory-mapped (reused by later runs)

Imports: stdlib, NumPy, Keras, matplotlib (the curves), unet3d, finetune_cases,
finetune_prepare, genesis_callbacks, genesis_checkpoint, genesis_files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any

import keras

import unet3d
from finetune_cases import FinetuneInputError
from finetune_prepare import (
    OPTIMIZERS,
    POLY_EXPONENT,
    SEGMENTATION_LOSSES,
    FinetuneSettings,
    RunPlan,
    prepare,
    resolve_recipe,
)
from genesis_callbacks import (
    AtomicBestCheckpoint,
    EpochSetter,
    LastEpochCheckpoint,
    ResumableEarlyStopping,
    ResumableReduceLROnPlateau,
)
from genesis_checkpoint import load_last_checkpoint, truncate_csv, write_text_atomic
from genesis_files import atomic_path

__all__ = [
    "BestModelCheckpoint",
    "CurvesPicture",
    "Session",
    "build_model",
    "compile_model",
    "draw_curves",
    "make_optimizer",
    "set_bn_momentum",
    "setup",
    "train",
]

# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


def make_optimizer(name: str, lr: float) -> keras.optimizers.Optimizer:
    """The optimizer `name` at learning rate `lr`: "sgd" has the pre-training's momentum 0.9;
    "sgd_nesterov" is nnU-Net's (Nesterov momentum 0.99, used with lr 1e-2 and a poly decay).

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
    if name == "sgd_nesterov":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.99, nesterov=True)
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

    Two panels side by side, epochs counted from 1, drawn with matplotlib's Agg canvas and
    written atomically.

    Args:
        log_csv: the training log.
        png: the picture.
        metric: the second panel's column (e.g. "dice_coef").
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = _read_log(log_csv)
    epochs = [int(e) + 1 for e in cols.get("epoch", [])]
    fig = Figure(figsize=(8, 3.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(1, 2), ("loss", metric), strict=True):
        for key, label, colour in (
            (name, "training", "tab:blue"),
            (f"val_{name}", "validation", "tab:orange"),
        ):
            ys = cols.get(key, [])
            if epochs and ys:
                ax.plot(epochs, ys, marker="o", ms=3, color=colour, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(
                0.5, 0.5, "no epoch logged yet", ha="center", va="center", transform=ax.transAxes
            )
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def poly_learning_rate(
    lr: float, epoch: int, epochs: int, exponent: float = POLY_EXPONENT
) -> float:
    """The polynomial decay: ``lr * (1 - epoch / epochs) ** exponent`` (epoch counted from 0)."""
    return float(lr) * (1.0 - min(int(epoch), int(epochs)) / int(epochs)) ** float(exponent)


class PolyLearningRate(keras.callbacks.Callback):
    """Set the learning rate before each epoch to `poly_learning_rate` of the initial one.

    A function of the epoch alone, so a resumed run continues the same curve.
    """

    def __init__(self, lr: float, epochs: int, exponent: float = POLY_EXPONENT) -> None:
        super().__init__()
        self.lr, self.epochs, self.exponent = float(lr), int(epochs), float(exponent)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        rate = poly_learning_rate(self.lr, epoch, self.epochs, self.exponent)
        self.model.optimizer.learning_rate.assign(rate)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:  # the CSV log's learning_rate column, as the plateau schedule's
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class CurvesPicture(keras.callbacks.Callback):
    """After every epoch, redraw the curves from the CSV log (it must come after the logger)."""

    def __init__(self, log_csv: str, png: str, metric: str) -> None:
        super().__init__()
        self.log_csv, self.png, self.metric = log_csv, png, metric

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        draw_curves(self.log_csv, self.png, self.metric)


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


def _compiled_model(plan: RunPlan) -> keras.Model:
    """The model with its head, the weights (not on resume) or the checkpoint, compiled."""
    cfg, paths, state = plan.config, plan.paths, plan.resume_state
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
    set_bn_momentum(model, cfg["bn_momentum"])
    compile_model(model, cfg["task"], cfg["optimizer"], cfg["lr"], cfg["loss"], cfg["data_format"])
    model.optimizer.build(model.trainable_variables)
    if state is not None:
        try:
            load_last_checkpoint(paths["last"], model)
        except ValueError as exc:  # a checkpoint of another model: its message says which
            raise FinetuneInputError(str(exc)) from exc
        print(
            f"Resuming from {paths['last']}: epoch {state.epoch + 2} of {cfg['epochs']}, "
            f"best val_loss {state.best}, learning rate {state.learning_rate:g}"
        )
        truncate_csv(paths["csv"], state.epoch + 1)
    return model


def _make_callbacks(plan: RunPlan, model: keras.Model) -> list[keras.callbacks.Callback]:
    """The run's callbacks, in the order they must run (the last-epoch checkpoint last)."""
    cfg, paths, state = plan.config, plan.paths, plan.resume_state
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
    schedule: keras.callbacks.Callback = lr_cb
    if cfg.get("schedule") == "poly":
        schedule = PolyLearningRate(cfg["lr"], cfg["epochs"])
    metric = "dice_coef" if cfg["task"] == "segmentation" else "categorical_accuracy"
    if cfg["task"] == "segmentation" and cfg["loss"] == "bce_foreground_dice_loss":
        metric = "foreground_dice_coef"
    return [
        EpochSetter([plan.train_ds]),
        best_cb,
        early_cb,
        schedule,
        keras.callbacks.CSVLogger(paths["csv"], append=state is not None),
        CurvesPicture(paths["csv"], paths["curves"], metric),
        LastEpochCheckpoint(paths["last"], best_cb, early_cb, lr_cb, cfg["batch_size"], "finetune"),
    ]


def setup(settings: FinetuneSettings) -> Session | None:
    """`prepare`, then the model, weights or checkpoint, callbacks and the written config.

    Args:
        settings: the run's settings.

    Returns:
        The `Session`; None when a resumed run had already finished.

    Raises:
        FinetuneInputError: bad input (see `prepare`), or a checkpoint that does not fit.
    """
    plan = prepare(settings)
    cfg, paths, state = plan.config, plan.paths, plan.resume_state
    if state is not None and (state.finished or state.epoch + 1 >= cfg["epochs"]):
        print(f"Training already finished at epoch {state.epoch + 1} ({paths['last']}).")
        return None
    model = _compiled_model(plan)
    write_text_atomic(paths["config"], json.dumps(cfg, indent=2) + "\n")
    callbacks = _make_callbacks(plan, model)
    return Session(model, plan, callbacks, 0 if state is None else state.epoch + 1)


def train(settings: FinetuneSettings) -> keras.callbacks.History | None:
    """Run (or resume) fine-tuning.

    Args:
        settings: the run's settings (printed first; saved in finetune_config.json).

    Returns:
        The Keras History (None when a resumed run had already finished).

    Raises:
        FinetuneInputError: bad input, found before `fit` started. Other errors are not bad
            input and keep their type.
    """
    settings = resolve_recipe(settings)
    settings.display()
    session = setup(settings)
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
        verbose=cfg["verbose"],
        # The datasets draw their own random order; Keras' shuffling would only make a resumed
        # run differ from an uninterrupted one.
        shuffle=False,
    )
