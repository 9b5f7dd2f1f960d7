"""The pre-training callbacks (keras/genesis_callbacks.py)."""

import logging
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from genesis_callbacks import (
    AtomicBestCheckpoint,
    CollapseWarning,
    ResumableEarlyStopping,
    ResumableReduceLROnPlateau,
    save_h5_model,
)
from genesis_trainer import build_model
from pretraining_helpers import tiny_config


def test_collapse_warning_fires_on_constant_output_only():
    x = np.zeros((2, 4), np.float32)
    constant = SimpleNamespace(predict_on_batch=lambda b: np.full((2, 4), 0.37, np.float32))
    varied = SimpleNamespace(predict_on_batch=lambda b: np.linspace(0, 1, 8).reshape(2, 4))
    warn = CollapseWarning(x)
    warn.set_model(constant)
    with pytest.warns(RuntimeWarning, match="constant.*collapsed.*--lr"):
        warn.on_epoch_end(4)
    assert warn.collapsed_epochs == [4]
    quiet = CollapseWarning(x)
    quiet.set_model(varied)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.on_epoch_end(0)
    assert quiet.collapsed_epochs == []


def test_restored_callbacks_keep_their_counters_after_train_begin():
    early = ResumableEarlyStopping(
        monitor="val_loss", patience=5, restore={"wait": 3, "best": 0.25, "best_epoch": 7}
    )
    early.on_train_begin()
    assert (early.wait, early.best, early.best_epoch) == (3, 0.25, 7)
    lr = ResumableReduceLROnPlateau(
        monitor="val_loss", patience=10, restore={"wait": 9, "best": 0.5, "cooldown_counter": 0}
    )
    lr.on_train_begin()
    assert (lr.wait, lr.best) == (9, 0.5)
    fresh = ResumableEarlyStopping(monitor="val_loss", patience=5)
    fresh.wait = 4
    fresh.on_train_begin()
    assert fresh.wait == 0 and fresh.best is None
    assert early.get_state() == {"best": 0.25, "wait": 3, "best_epoch": 7}


def test_best_checkpoint_saves_improvements_only_and_quietly(tmp_path, caplog):
    """The .h5 is written when val_loss improves, without Keras' legacy-format warning."""
    model = build_model(tiny_config(tmp_path))
    target = tmp_path / "best.h5"
    best = AtomicBestCheckpoint(str(target), verbose=0)
    best.set_model(model)
    with caplog.at_level(logging.WARNING, logger="absl"):
        best.on_epoch_end(0, {"val_loss": 0.5})
    assert target.is_file() and best.best == 0.5
    assert not [r for r in caplog.records if "legacy" in r.getMessage()]
    stamp = os.stat(target).st_mtime_ns
    best.on_epoch_end(1, {"val_loss": 0.7})
    best.on_epoch_end(2, {"val_loss": float("nan")})
    assert os.stat(target).st_mtime_ns == stamp and best.best == 0.5
    assert os.listdir(tmp_path) == ["best.h5"]


def test_interrupted_best_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """A save interrupted half-way (Ctrl-C, full disk) leaves the old .h5 whole, no temp."""
    import keras

    target = tmp_path / "best.h5"
    target.write_bytes(b"previous weights")
    model = build_model(tiny_config(tmp_path))  # a unet3d.UNet3D: its save renames a temp

    def interrupted(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a fi")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_h5_model(model, str(target))
    assert target.read_bytes() == b"previous weights"
    assert os.listdir(tmp_path) == ["best.h5"]
