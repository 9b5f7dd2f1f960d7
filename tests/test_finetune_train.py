"""Fine-tuning runs: both tasks, every layout, weights, resume (tiny U-Nets, few steps)."""

from __future__ import annotations

import csv
import dataclasses
import json

import h5py
import keras
import numpy as np
import pytest

import finetune
import unet3d
from finetune_cases import FinetuneInputError
from finetune_helpers import (
    make_candidates,
    make_classification_arrays,
    make_segmentation_arrays,
    make_segmentation_folder,
)
from finetune_prepare import FinetuneSettings, prepare, weight_file_width
from finetune_trainer import build_model

# The original recipe: these tests check its settings exactly (the default recipe has its own).
TINY = ["--n_base_filters", "4", "--batch_size", "2", "--verbose", "0", "--recipe", "original"]


def _weights(path, n_base_filters=4, channels=1):
    """A pre-trained-like U-Net weight file (the published network's layout, tiny)."""
    model = unet3d.unet_model_3d(
        (channels, 16, 16, 8), batch_normalization=True, n_base_filters=n_base_filters
    )
    model.save_weights(str(path))
    return path


def _h5_first_kernel(path):
    """The first convolution's kernel read straight from the file with h5py."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim == 5 and obj.shape[:3] == (3, 3, 3):
            found.append(obj[()])

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return min(found, key=lambda k: k.shape[-1])


def _args(argv):
    """The settings `finetune.py train` makes of these flags."""
    args = finetune.build_parser("train").parse_args(["train", *argv])
    return finetune.settings_from_args(FinetuneSettings, args)


def _log_epochs(run):
    with open(run / "training_log.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_segmentation_folder_train_then_resume(tmp_path, capsys):
    data = make_segmentation_folder(tmp_path / "data", n_cases=4, size=(20, 20, 12))
    weights = _weights(tmp_path / "pre.weights.h5")
    run = tmp_path / "run"
    argv = [
        "--data",
        str(data),
        "--output",
        str(run),
        "--weights",
        str(weights),
        "--patch",
        "16",
        "16",
        "8",
        "--steps_per_epoch",
        "2",
        "--validation_steps",
        "1",
        *TINY[2:],
    ]
    assert finetune.main(["train", *argv, "--epochs", "1"]) == 0
    for name in (
        "best_model.keras",
        "last_checkpoint.npz",
        "finetune_config.json",
        "training_log.csv",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "finetune_config.json").read_text())
    assert cfg["task"] == "segmentation" and cfg["patch"] == [16, 16, 8]
    assert cfg["n_classes"] == 2 and cfg["labels"] == {"background": 0, "tumour": 1}
    assert cfg["intensity"] == ["ct"] and cfg["n_base_filters"] == 4  # width from the file
    assert cfg["file_ending"] == ".nii.gz" and cfg["channel_names"] == ["CT"]
    assert sorted(cfg["train_cases"] + cfg["valid_cases"]) == [f"case_{i:03d}" for i in range(4)]
    # The settings as given: printed first, and saved beside the resolved ones.
    assert cfg["settings"]["weights"] == str(weights) and cfg["settings"]["n_base_filters"] is None
    assert capsys.readouterr().out.startswith("Fine-tuning settings:")
    model = keras.models.load_model(run / "best_model.keras")  # needs only `import unet3d`
    x = np.random.default_rng(0).random((1, 1, 16, 16, 8), dtype=np.float32)
    p = np.asarray(model.predict_on_batch(x))
    assert p.shape == (1, 2, 16, 16, 8)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)  # softmax over the class axis
    assert _log_epochs(run) == [0]
    # A rerun without --resume refuses; with it, epoch 2 follows and each epoch is logged once.
    assert finetune.main(["train", *argv, "--epochs", "2"]) == 2
    assert finetune.main(["train", *argv, "--epochs", "2", "--resume"]) == 0
    assert _log_epochs(run) == [0, 1]
    # A resumed run must keep the settings that shape the model.
    assert (
        finetune.main(["train", *argv[:-2], "--batch_size", "4", "--epochs", "3", "--resume"]) == 2
    )


@pytest.mark.multibackend
def test_weights_are_loaded_into_the_unet(tmp_path):
    weights = _weights(tmp_path / "pre.weights.h5")
    assert weight_file_width(str(weights)) == (1, 4)
    model = build_model("segmentation", (16, 16, 8), 1, 3, 4, "channels_last", str(weights))
    np.testing.assert_array_equal(
        model.get_layer("depth_0_conv").get_weights()[0], _h5_first_kernel(weights)
    )
    assert model.output_shape == (None, 16, 16, 8, 3)
    cls = build_model(
        "classification", (16, 16, 8), 1, 2, 4, "channels_first", None, freeze_encoder=True
    )
    assert cls.output_shape == (None, 2)
    assert not cls.get_layer("depth_7_conv").trainable and cls.get_layer("cls_dense").trainable


def test_weight_file_that_does_not_fit(tmp_path):
    data = make_segmentation_folder(tmp_path / "data", n_cases=2)
    weights = _weights(tmp_path / "pre.weights.h5", n_base_filters=4)
    base = ["--data", str(data), "--output", str(tmp_path / "r"), "--weights", str(weights)]
    with pytest.raises(FinetuneInputError, match=r"--n_base_filters 8, but .* trained with 4"):
        prepare(_args([*base, "--n_base_filters", "8"]))
    two = _weights(tmp_path / "two.weights.h5", channels=2)
    with pytest.raises(FinetuneInputError, match=r"1 input channel.*two\.weights\.h5 has 2"):
        prepare(_args([*base[:-1], str(two), "--patch", "16", "16", "8"]))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FinetuneInputError, match=r"junk\.h5"):
        prepare(_args([*base[:-1], str(tmp_path / "junk.h5")]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_arrays_train(tmp_path, kind):
    make = make_segmentation_arrays if kind == "segmentation" else make_classification_arrays
    data = make(tmp_path / "data")
    run = tmp_path / "run"
    loss = "bce_foreground_dice_loss" if kind == "segmentation" else "bce_dice_loss"
    argv = [
        "train",
        "--data",
        str(data),
        "--output",
        str(run),
        "--weights",
        "none",
        "--epochs",
        "1",
        "--data_format",
        "channels_last",
        "--loss",
        loss,
        *TINY,
    ]
    assert finetune.main(argv) == 0
    cfg = json.loads((run / "finetune_config.json").read_text())
    assert cfg["task"] == kind and cfg["patch"] == [16, 16, 8] and cfg["intensity"] == ["none"]
    assert cfg["loss"] == loss
    if kind == "segmentation":  # the foreground loss logs the foreground Dice too
        header = (run / "training_log.csv").read_text().splitlines()[0].split(",")
        assert "foreground_dice_coef" in header and "val_foreground_dice_coef" in header
    model = keras.models.load_model(run / "best_model.keras")
    out = model.output_shape
    assert out == ((None, 16, 16, 8, 2) if kind == "segmentation" else (None, 2))


def test_compile_uses_the_chosen_segmentation_loss():
    from finetune_trainer import compile_model

    model = build_model("segmentation", (16, 16, 8), 1, 2, 2, "channels_last", None, False)
    compile_model(model, "segmentation", "adam", 1e-3)
    assert model.loss is unet3d.dice_coef_loss  # the original's default
    compile_model(model, "segmentation", "adam", 1e-3, "bce_dice_loss")
    assert model.loss is unet3d.bce_dice_loss
    compile_model(model, "segmentation", "adam", 1e-3, "bce_foreground_dice_loss", "channels_last")
    assert model.loss.__name__ == "bce_foreground_dice_loss"
    t = np.zeros((1, 16, 16, 8, 2), "float32")
    t[..., 0] = 1
    # All background: the foreground Dice term is smooth / (0 + 0 + smooth) = 1 here (no
    # foreground anywhere), so the loss is 0.5 * bce - 1 with bce ~ 0 for exact predictions.
    assert float(np.mean(model.loss(t, t))) == pytest.approx(-1.0, abs=1e-4)
    with pytest.raises(ValueError, match="Expected loss in"):
        compile_model(model, "segmentation", "adam", 1e-3, "focal")


def test_optimizers_by_name():
    from finetune_trainer import make_optimizer

    nesterov = make_optimizer("sgd_nesterov", 0.01)
    assert isinstance(nesterov, keras.optimizers.SGD) and nesterov.nesterov
    assert (nesterov.momentum, float(nesterov.learning_rate)) == (0.99, pytest.approx(0.01))
    plain = make_optimizer("SGD", 0.1)
    assert not plain.nesterov and plain.momentum == 0.9
    assert isinstance(make_optimizer("adamw", 1e-3), keras.optimizers.AdamW)
    with pytest.raises(FinetuneInputError, match="--optimizer in"):
        make_optimizer("lbfgs", 0.1)


def test_bn_momentum_is_set_on_every_batch_norm_layer():
    from finetune_trainer import set_bn_momentum

    model = build_model("segmentation", (16, 16, 8), 1, 2, 2, "channels_last", None, False)
    bns = [x for x in model.layers if isinstance(x, keras.layers.BatchNormalization)]
    assert bns and all(b.momentum == 0.99 for b in bns)
    assert set_bn_momentum(model, None) == 0 and bns[0].momentum == 0.99
    assert set_bn_momentum(model, 0.9) == len(bns)
    assert all(b.momentum == 0.9 for b in bns)
    assert bns[0].get_config()["momentum"] == 0.9  # saved with the model
    with pytest.raises(ValueError, match="bn_momentum"):
        set_bn_momentum(model, 1.0)


def test_candidates_split_by_series(tmp_path):
    make_candidates(tmp_path / "data", n_volumes=3, per_volume=4)
    plan = prepare(
        _args(
            [
                "--data",
                str(tmp_path / "data"),
                "--output",
                str(tmp_path / "r"),
                "--weights",
                "none",
                "--patch",
                "8",
                "8",
                "8",
                "--batch_size",
                "2",
                "--recipe",
                "original",
            ]
        )
    )
    cfg = plan.config
    assert (
        cfg["task"] == "classification" and cfg["n_classes"] == 2 and cfg["layout"] == "candidates"
    )
    assert len(cfg["valid_cases"]) == 1 and len(cfg["train_cases"]) == 2
    x, y = plan.valid_ds[0]
    assert x.shape == (2, 1, 8, 8, 8) and y.shape == (2, 2)
    # Every validation cube comes from the validation series.
    assert len(plan.valid_ds.indices) == 4 and len(plan.train_ds.indices) == 8


def test_settings_defaults_are_the_command_line_s(tmp_path):
    assert _args(["--data", "d", "--output", "o"]) == FinetuneSettings(data="d", output="o")
    given = _args(["--data", "d", "--output", "o", "--patch", "16", "16", "8", "--lr", "0.01"])
    assert given.patch == (16, 16, 8) and given.lr == 0.01


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(batch_size=0), "--batch_size of at least 1"),
        (dict(lr=0.0), "--lr > 0"),
        (dict(bn_momentum=1.0), r"--bn_momentum in \[0, 1\)"),
        (dict(foreground_fraction=-0.1), r"--foreground_fraction in \[0, 1\]"),
        (dict(loss="focal"), "--loss in"),
        (dict(optimizer="lbfgs"), "--optimizer in"),
        (dict(data_format="NDHWC"), "--data_format channels_first or channels_last"),
    ],
)
def test_bad_settings_are_refused_before_the_run_folder_is_made(tmp_path, change, message):
    data = make_segmentation_arrays(tmp_path / "data")
    settings = FinetuneSettings(data=str(data), output=str(tmp_path / "r"), weights="none")
    with pytest.raises(FinetuneInputError, match=message):
        prepare(dataclasses.replace(settings, **change))
    assert not (tmp_path / "r").exists()


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Bad input: exit 2 and one line. A programming error during setup: raised as itself."""
    import finetune_trainer

    data = make_segmentation_arrays(tmp_path / "data")
    argv = ["train", "--data", str(data), "--output", str(tmp_path / "r"), "--weights", "none"]
    assert finetune.main([*argv, "--bn_momentum", "2"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("finetune.py train: error: Expected --bn_momentum") and err.count("\n") == 1
    )

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in the trainer")

    monkeypatch.setattr(finetune_trainer, "build_model", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the trainer") as info:
        finetune.main([*argv, *TINY])
    assert info.traceback[-1].name == "broken"
    assert "error:" not in capsys.readouterr().err


def test_curves_picture_from_the_log(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from PIL import Image

    from finetune_trainer import draw_curves

    drawn = []
    save = Figure.savefig

    def record(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    log = tmp_path / "training_log.csv"
    log.write_text(
        "epoch,dice_coef,loss,val_dice_coef,val_loss\n0,0.1,0.9,0.05,1.0\n1,0.3,0.7,0.2,0.8\n"
    )
    png = tmp_path / "curves.png"
    draw_curves(str(log), str(png), "dice_coef")
    assert Image.open(png).size == (800, 350) and png.stat().st_size > 5000
    loss, dice = drawn[0].axes
    assert [line.get_label() for line in loss.lines] == ["training", "validation"]
    np.testing.assert_array_equal(loss.lines[1].get_xdata(), [1, 2])  # epochs from 1
    np.testing.assert_array_equal(dice.lines[0].get_ydata(), [0.1, 0.3])
    assert dice.get_ylabel() == "dice_coef" and loss.get_xlabel() == "epoch"
    draw_curves(str(tmp_path / "no_log_yet.csv"), str(png), "dice_coef")  # before epoch 1
    assert not drawn[1].axes[0].lines
