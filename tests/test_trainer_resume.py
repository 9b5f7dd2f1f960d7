"""Real tiny pre-training runs in this process (keras/genesis_trainer.py): resuming exactly,
mixed precision, and the datasets the trainer makes."""

import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT

from genesis_trainer import make_datasets, prepare, train
from pretraining_helpers import csv_rows, tiny_config, write_cubes


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    """3 epochs in one go == 1 epoch, then --resume to 3: same CSV rows, same weights."""
    write_cubes(tmp_path / "cubes")
    common = dict(steps_per_epoch=2, validation_steps=1, seed=3)
    train(tiny_config(tmp_path, nb_epoch=3, model_path=str(tmp_path / "a"), **common))
    train(tiny_config(tmp_path, nb_epoch=1, model_path=str(tmp_path / "b"), **common))
    train(tiny_config(tmp_path, nb_epoch=3, model_path=str(tmp_path / "b"), resume=True, **common))
    a_rows = csv_rows(tmp_path / "a" / "Vnet-genesis_chest_ct.csv")
    b_rows = csv_rows(tmp_path / "b" / "Vnet-genesis_chest_ct.csv")
    assert [r["epoch"] for r in b_rows] == ["0", "1", "2"]
    for ra, rb in zip(a_rows, b_rows, strict=True):
        for key in ("loss", "val_loss", "learning_rate"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-4, abs=1e-6), key
    with (
        np.load(tmp_path / "a" / "Vnet-genesis_chest_ct.last.npz") as za,
        np.load(tmp_path / "b" / "Vnet-genesis_chest_ct.last.npz") as zb,
    ):
        np.testing.assert_allclose(za["weight_0000"], zb["weight_0000"], rtol=1e-3, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "b" / "Logs" / "Vnet-genesis_chest_ct")) == [
        "run-1",
        "run-2",
    ]


def test_mixed_precision_run_writes_sample_pngs_and_float32_weights(tmp_path, monkeypatch):
    """--mixed_precision trains (bfloat16 compute, float32 weights), and the training dataset
    writes the original's sample pair PNGs to {sample_path}/{exp_name} (made certain here)."""
    import keras
    from PIL import Image

    import transforms

    write_cubes(tmp_path / "cubes")
    monkeypatch.setattr(transforms, "SAMPLE_PNG_PROB", 1.0)  # every batch writes one
    # lr 0.1, not 1.0: at 1.0 this 4-filter network is on the edge of diverging, and bfloat16
    # rounding (which varies with the CPU's thread scheduling) can tip it into NaN.
    config = tiny_config(
        tmp_path,
        lr=0.1,
        nb_epoch=1,
        steps_per_epoch=2,
        validation_steps=1,
        mixed_precision=True,
        save_samples="png",
        sample_path=str(tmp_path / "samples"),
    )
    try:
        history = train(config)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert history.model.get_layer("depth_0_conv").compute_dtype == "bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rows = csv_rows(tmp_path / "w" / "Vnet-genesis_chest_ct.csv")
    assert [r["epoch"] for r in rows] == ["0"] and np.isfinite(float(rows[0]["val_loss"]))
    pngs = sorted((tmp_path / "samples" / "Vnet-genesis_chest_ct").glob("*.png"))
    assert len(pngs) >= 2  # one per training batch; validation batches write none
    assert Image.open(pngs[0]).size == (2 * 16, 4 * 16)  # (width 2C, height 4R)
    import unet3d

    model = unet3d.unet_model_3d(
        (16, 16, 16, 1), batch_normalization=True, n_base_filters=4, data_format="channels_last"
    )
    model.load_weights(str(tmp_path / "w" / "Vnet-genesis_chest_ct.h5"))
    assert model.get_layer("depth_0_conv").kernel.dtype == "float32"
    with h5py.File(tmp_path / "w" / "Vnet-genesis_chest_ct.h5", "r") as f:
        kinds = set()
        f.visititems(
            lambda k, v: kinds.add(v.dtype.name) if isinstance(v, h5py.Dataset) and v.ndim else None
        )
    assert kinds == {"float32"}, kinds


def test_datasets_pickle_by_name_and_ignore_keras_epoch_calls(tmp_path):
    """Spawned data workers unpickle the dataset: its class must be found by name."""
    write_cubes(tmp_path / "cubes")
    config = tiny_config(tmp_path)
    train_ds, valid_ds = make_datasets(config, prepare(config))
    assert train_ds.epoch_from_keras is False and valid_ds.epoch_from_keras is False
    train_ds.set_epoch(5)
    train_ds.on_epoch_end()  # Keras' calls do not move the epoch: the trainer sets it
    assert train_ds.epoch == 5
    back = pickle.loads(pickle.dumps(train_ds))
    assert type(back) is type(train_ds) and back.epoch == 5
    np.testing.assert_array_equal(back[1][0], train_ds[1][0])
    assert valid_ds.seed != train_ds.seed and valid_ds.status == "test"
    code = (
        "import pickle, sys; sys.path[:0] = [sys.argv[1]]; "
        "ds = pickle.load(open(sys.argv[2], 'rb')); ds.on_epoch_end(); "
        "print(type(ds).__name__, ds.epoch)"
    )
    (tmp_path / "ds.pkl").write_bytes(pickle.dumps(train_ds))
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "keras"), str(tmp_path / "ds.pkl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.split()[-2:] == ["GenesisPairDataset", "5"], out.stderr[-2000:]
