"""The Keras callbacks of Models Genesis pre-training (see docs/pretraining.md).

* `AtomicBestCheckpoint`: ModelCheckpoint(save_best_only=True) whose .h5 is never left half
  written;
* `ResumableEarlyStopping`, `ResumableReduceLROnPlateau`: Keras' callbacks whose counters
  survive `--resume` (through `ResumableCountersMixin`);
* `LastEpochCheckpoint`: after every epoch, what `--resume` needs (`genesis_checkpoint`);
* `EpochSetter`: tells the datasets which epoch begins, so a resumed run makes the same pairs;
* `CollapseWarning`: warns when the network's output has become constant.

Imports: stdlib, numpy, keras, genesis_checkpoint.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from genesis_checkpoint import RunState, save_last_checkpoint

__all__ = [
    "AtomicBestCheckpoint",
    "CollapseWarning",
    "EpochSetter",
    "LastEpochCheckpoint",
    "ResumableCountersMixin",
    "ResumableEarlyStopping",
    "ResumableReduceLROnPlateau",
    "float_or_none",
    "save_h5_model",
]


def float_or_none(value: Any) -> float | None:
    """`value` as a float, or None when it is None or not finite (JSON has no inf or NaN).

    Args:
        value: a number, a 0-d array or None.

    Returns:
        A finite float or None.
    """
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def save_h5_model(model: keras.Model, path: str) -> None:
    """`model.save(path)` as a Keras .h5 model file, without Keras' legacy-format warning.

    The trainer's model is a `unet3d.UNet3D`, whose `save` writes a temporary file in the same
    folder and renames it, so an interrupted save never leaves a truncated file under `path`.

    Args:
        model: the model to save.
        path: the .h5 file.
    """
    # Keras 3 warns (through absl logging) at every .h5 save that the format is legacy; the
    # original's users expect this file, so the warning is silenced here.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        model.save(path)
    finally:
        absl_logger.setLevel(level)


class AtomicBestCheckpoint(keras.callbacks.Callback):
    """ModelCheckpoint(monitor, save_best_only=True) whose .h5 is written atomically.

    Args:
        filepath: the best-weights .h5 file.
        monitor: the logged value to minimise.
        verbose: print a line per epoch when true.
        best: the best value so far (from a resumed run's checkpoint), or None.
    """

    def __init__(
        self, filepath: str, monitor: str = "val_loss", verbose: int = 1, best: float | None = None
    ) -> None:
        super().__init__()
        self.filepath, self.monitor, self.verbose, self.best = filepath, monitor, verbose, best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        current = (logs or {}).get(self.monitor)
        if current is None or not math.isfinite(float(current)):
            return
        current = float(current)
        if self.best is None or current < self.best:
            if self.verbose:
                before = "inf" if self.best is None else f"{self.best:.5f}"
                print(
                    f"\nEpoch {epoch + 1}: {self.monitor} improved from {before} to "
                    f"{current:.5f}, saving model to {self.filepath}"
                )
            self.best = current
            save_h5_model(self.model, self.filepath)
        elif self.verbose:
            print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {self.best:.5f}")


class ResumableCountersMixin:
    """For a Keras callback whose `best` and integer counters survive `--resume`.

    Keras resets them in `on_train_begin`; this puts the restored values back afterwards, and
    `get_state` reads them for the checkpoint. A subclass lists its counters in `_counters`.

    Args:
        restore: a `get_state()` dict of a previous run, or None for a fresh start.
        *args, **kwargs: for the Keras callback.
    """

    _counters: tuple[str, ...] = ()

    def __init__(self, *args: Any, restore: dict | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restore = restore

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        if self._restore:
            self.best = self._restore["best"]
            for name in self._counters:
                setattr(self, name, int(self._restore[name]))

    def get_state(self) -> dict:
        """`best` and the counters, as JSON-able data.

        Returns:
            A dict that `restore=` takes back.
        """
        state = {"best": float_or_none(self.best)}
        state.update({name: int(getattr(self, name)) for name in self._counters})
        return state


class ResumableEarlyStopping(ResumableCountersMixin, keras.callbacks.EarlyStopping):
    """EarlyStopping whose counters survive --resume."""

    _counters = ("wait", "best_epoch")


class ResumableReduceLROnPlateau(ResumableCountersMixin, keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters survive --resume."""

    _counters = ("wait", "cooldown_counter")


class LastEpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, save what --resume needs.

    It must come last in the callback list: after the callbacks whose state it records and
    after the CSV row, so a checkpoint never records an epoch that is not logged.

    Args:
        path: the `.last.npz` checkpoint file.
        best_cb: the run's `AtomicBestCheckpoint`.
        early_cb: the run's `ResumableEarlyStopping`.
        lr_cb: the run's `ResumableReduceLROnPlateau`.
        batch_size: recorded in the checkpoint.
        exp_name: recorded in the checkpoint.
    """

    def __init__(
        self,
        path: str,
        best_cb: AtomicBestCheckpoint,
        early_cb: ResumableEarlyStopping,
        lr_cb: ResumableReduceLROnPlateau,
        batch_size: int,
        exp_name: str,
    ) -> None:
        super().__init__()
        self.path, self.best_cb, self.early_cb, self.lr_cb = path, best_cb, early_cb, lr_cb
        self.batch_size, self.exp_name = batch_size, exp_name

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        state = RunState(
            batch_size=self.batch_size,
            exp_name=self.exp_name,
            epoch=int(epoch),
            finished=bool(self.model.stop_training),
            best=float_or_none(self.best_cb.best),
            learning_rate=float(np.asarray(self.model.optimizer.learning_rate)),
            early_stopping=self.early_cb.get_state(),
            reduce_lr=self.lr_cb.get_state(),
        )
        save_last_checkpoint(self.path, self.model, state.to_dict())


class EpochSetter(keras.callbacks.Callback):
    """Tell the datasets which epoch begins, before Keras asks for its first batch.

    Meant for datasets made with `epoch_from_keras=False` (see `GenesisPairDataset`).

    Args:
        datasets: objects with a `set_epoch(epoch)` method.
    """

    def __init__(self, datasets: Sequence[Any]) -> None:
        super().__init__()
        self.datasets = datasets

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for ds in self.datasets:
            ds.set_epoch(epoch)


class CollapseWarning(keras.callbacks.Callback):
    """Warn when the prediction on a fixed validation batch is (nearly) constant.

    That is how training collapses with the original's lr 1.0, which its users report.

    Args:
        x_batch: the inputs of the batch to predict on after every epoch.
        threshold: the standard deviation below which the output counts as constant.

    Attributes:
        collapsed_epochs: the epochs (0-based) that warned.
    """

    def __init__(self, x_batch: np.ndarray, threshold: float = 1e-4) -> None:
        super().__init__()
        self.x_batch, self.threshold = x_batch, threshold
        self.collapsed_epochs: list[int] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        pred = np.asarray(self.model.predict_on_batch(self.x_batch), dtype=np.float64)
        std = float(pred.std())
        if not math.isfinite(std) or std < self.threshold:
            self.collapsed_epochs.append(epoch)
            warnings.warn(
                f"Epoch {epoch + 1}: the model's output is constant over a validation batch "
                f"(std={std:.3g} < {self.threshold:g}): training has collapsed. This "
                "happens with the original's lr 1.0; restart with a lower --lr (e.g. 0.1).",
                RuntimeWarning,
                stacklevel=2,
            )
