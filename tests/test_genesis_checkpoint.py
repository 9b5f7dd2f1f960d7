"""Run paths, the last-epoch checkpoint and the CSV log (keras/genesis_checkpoint.py)."""

import os

import numpy as np
import pytest

from genesis_checkpoint import (
    RunPaths,
    RunState,
    load_last_checkpoint,
    next_run_dir,
    read_checkpoint_state,
    save_last_checkpoint,
    truncate_csv,
)
from genesis_trainer import build_model
from pretraining_helpers import tiny_config


def test_truncate_csv_keeps_earlier_epochs_only(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n0,0.5\n1,0.4\n2,0.3\n3,0.2\n4,0.1")  # last row cut off
    truncate_csv(str(path), 3)
    assert path.read_text() == "epoch,loss\n0,0.5\n1,0.4\n2,0.3\n"
    truncate_csv(str(path), 0)
    assert path.read_text() == "epoch,loss\n"
    truncate_csv(str(tmp_path / "absent.csv"), 1)  # nothing to do, no error
    assert os.listdir(tmp_path) == ["log.csv"]  # no temporary left behind


def test_next_run_dir_never_reuses_a_run(tmp_path):
    logs = tmp_path / "Logs" / "exp"
    assert next_run_dir(str(logs)) == str(logs / "run-1")
    for name in ("run-1", "run-3", "run-x", "other"):
        (logs / name).mkdir(parents=True)
    assert next_run_dir(str(logs)) == str(logs / "run-4")


def test_run_paths_follow_model_path_logs_path_and_exp_name(tmp_path):
    paths = RunPaths.of(tiny_config(tmp_path, exp_name="e"))
    base = str(tmp_path / "w" / "e")
    assert (paths.best, paths.last, paths.csv) == (base + ".h5", base + ".last.npz", base + ".csv")
    assert (paths.config_json, paths.summary) == (base + ".json", base + ".txt")
    assert paths.logs == str(tmp_path / "w" / "Logs" / "e")


def test_run_state_keeps_the_checkpoint_keys_in_order():
    state = RunState(
        batch_size=2,
        exp_name="e",
        epoch=3,
        finished=False,
        best=0.5,
        learning_rate=0.25,
        early_stopping={"best": 0.5, "wait": 1},
        reduce_lr={"best": 0.5, "wait": 1, "cooldown_counter": 0},
    )
    values = state.to_dict()
    assert list(values) == [
        "batch_size",
        "exp_name",
        "epoch",
        "finished",
        "best",
        "learning_rate",
        "early_stopping",
        "reduce_lr",
    ]
    assert RunState.from_dict(values) == state


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    config = tiny_config(tmp_path)
    a = build_model(config)
    x = np.random.default_rng(1).random((2, 16, 16, 16, 1), dtype=np.float32)
    a.fit(x, x, epochs=2, batch_size=2, verbose=0)  # momentum and BN statistics move
    a.optimizer.learning_rate.assign(0.125)
    path = str(tmp_path / "c.npz")
    save_last_checkpoint(path, a, {"epoch": 3, "note": "x"})
    b = build_model(config)
    b.optimizer.build(b.trainable_variables)
    state = load_last_checkpoint(path, b)
    assert state == {"epoch": 3, "note": "x"}
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert len(a.optimizer.variables) == len(b.optimizer.variables) > 3
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
    assert float(np.asarray(b.optimizer.learning_rate)) == 0.125
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary left behind


def test_checkpoint_of_another_model_is_refused(tmp_path):
    a = build_model(tiny_config(tmp_path, n_base_filters=2))
    a.optimizer.build(a.trainable_variables)
    save_last_checkpoint(str(tmp_path / "c.npz"), a, {"epoch": 0})
    b = build_model(tiny_config(tmp_path))
    with pytest.raises(ValueError, match="c.npz does not fit this model"):
        load_last_checkpoint(str(tmp_path / "c.npz"), b)


def test_interrupted_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = build_model(tiny_config(tmp_path))
    model.optimizer.build(model.trainable_variables)
    path = str(tmp_path / "c.npz")
    save_last_checkpoint(path, model, {"epoch": 1})

    def broken_savez(f, **arrays):
        f.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        save_last_checkpoint(path, model, {"epoch": 2})
    monkeypatch.undo()
    assert read_checkpoint_state(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary left behind
