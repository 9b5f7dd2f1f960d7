"""Fine-tuning recipes: the original's settings exactly, and the default recipe's plan, its
augmentation and schedule, and the plan's way through predict (tiny runs)."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

import finetune
import finetune_predict as fp
import volume_io
from finetune_augment import AugmentSettings
from finetune_helpers import make_segmentation_folder
from finetune_plan import Plan
from finetune_prepare import RECIPES, FinetuneSettings, prepare, resolve_recipe
from finetune_trainer import poly_learning_rate

TINY = ["--n_base_filters", "2", "--verbose", "0", "--weights", "none"]


def _settings(argv):
    args = finetune.build_parser("train").parse_args(["train", *argv])
    return finetune.settings_from_args(FinetuneSettings, args)


def test_original_recipe_is_the_original_code_s_settings():
    s = resolve_recipe(FinetuneSettings(data="d", output="o", recipe="original"))
    # The original's downstream defaults, as the command had them before recipes existed.
    assert (s.data_format, s.batch_size, s.epochs, s.lr, s.optimizer, s.loss) == (
        "channels_first",
        8,
        10000,
        1e-3,
        "adam",
        "dice_coef_loss",
    )
    assert (s.schedule, s.bn_momentum, s.augment, s.patch, s.spacing, s.intensity) == (
        "plateau",
        None,
        "none",
        None,
        None,
        None,
    )
    # A flag given wins over the recipe.
    s = resolve_recipe(FinetuneSettings(data="d", output="o", recipe="original", lr=0.1))
    assert s.lr == 0.1 and s.loss == "dice_coef_loss"


def test_default_recipe_resolves_what_is_left_out():
    s = resolve_recipe(FinetuneSettings(data="d", output="o"))
    assert (s.loss, s.schedule, s.bn_momentum, s.augment, s.data_format) == (
        "bce_foreground_dice_loss",
        "poly",
        0.9,
        "default",
        "channels_last",
    )
    assert s.patch is None and s.batch_size is None  # planned from the data
    # nnU-Net's third of the patches centred on foreground, in both recipes.
    assert s.foreground_fraction == 1 / 3
    assert (
        resolve_recipe(
            FinetuneSettings(data="d", output="o", recipe="original")
        ).foreground_fraction
        == 1 / 3
    )
    assert set(RECIPES) == {"default", "original"}


def test_original_recipe_prepares_as_before(tmp_path):
    data = make_segmentation_folder(tmp_path / "data", n_cases=4, size=(20, 20, 12))
    plan = prepare(
        _settings(
            [*TINY, "--data", str(data), "--output", str(tmp_path / "r"), "--recipe", "original"]
        )
    )
    cfg = plan.config
    assert cfg["patch"] == [64, 64, 32] and cfg["spacing"] is None and cfg["intensity"] == ["ct"]
    assert cfg["batch_size"] == 8 and cfg["validation_steps"] == 50
    assert cfg["steps_per_epoch"] == 250 and cfg["tta"] == "off"
    assert plan.train_ds.augment is None and plan.valid_ds.augment is None
    assert not (tmp_path / "r" / "plan.json").exists()


def test_default_recipe_plans_from_the_fingerprint(tmp_path):
    # Voxels of 0.8 x 0.9 x 2.5 mm (the test data's): anisotropy below 3x, so no in-plane-only
    # augmentation, and a z axis kept at the cases' own spacing.
    data = make_segmentation_folder(tmp_path / "data", n_cases=4, size=(40, 40, 24))
    run = tmp_path / "r"
    argv = ["--data", str(data), "--output", str(run), "--patch", "16", "16", "8", *TINY]
    plan = prepare(_settings([*argv, "--steps_per_epoch", "3"]))
    cfg = plan.config
    saved = Plan.from_dict(json.loads((run / "plan.json").read_text()))
    assert json.loads((run / "fingerprint.json").read_text())["n_cases"] == 4
    assert cfg["spacing"] == pytest.approx(list(saved.spacing))
    assert cfg["patch"] == [16, 16, 8] == list(saved.patch)
    assert cfg["batch_size"] == saved.batch_size and cfg["intensity"] == saved.intensity
    assert cfg["intensity"] == ["ct_foreground"]  # CT from scratch: standardised
    assert cfg["intensity_params"] == saved.intensity_params and cfg["intensity_params"][0]["std"]
    assert saved.reasons["patch"] == "set by --patch"
    assert cfg["validation_steps"] == 3  # as many as it trains on, at most 50
    assert isinstance(plan.train_ds.augment, AugmentSettings)
    assert plan.valid_ds.augment is None  # validation patches are never augmented
    # The cache holds the planned intensities: the foreground's mean maps to 0.
    case = plan.train_ds.cases[0]
    inside = np.asarray(case.image[0])[np.asarray(case.label) == 1]
    assert abs(float(inside.mean())) < 1.5
    # A flag given is kept, and the plan says so.
    again = prepare(_settings([*argv, "--output", str(tmp_path / "r2"), "--batch_size", "3"]))
    assert again.config["batch_size"] == 3
    assert "set by --batch_size" in json.loads((tmp_path / "r2" / "plan.json").read_text())[
        "reasons"
    ].get("batch_size", "")


def test_poly_learning_rate_by_hand():
    assert poly_learning_rate(1e-3, 0, 10) == pytest.approx(1e-3)
    assert poly_learning_rate(1e-3, 5, 10) == pytest.approx(1e-3 * 0.5**0.9)
    assert poly_learning_rate(1e-3, 10, 10) == 0.0


def test_default_recipe_trains_and_predict_follows_the_plan(tmp_path, monkeypatch):
    data = make_segmentation_folder(tmp_path / "data", n_cases=4, size=(40, 40, 24))
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--output", str(run), *TINY]
    argv += ["--patch", "16", "16", "8", "--batch_size", "2", "--epochs", "3"]
    argv += ["--steps_per_epoch", "2", "--validation_steps", "1"]
    assert finetune.main(argv) == 0
    with open(run / "training_log.csv", newline="") as f:
        rates = [float(r["learning_rate"]) for r in csv.DictReader(f)]
    assert rates == pytest.approx([poly_learning_rate(1e-3, e, 3) for e in range(3)], rel=1e-5)
    plan = json.loads((run / "plan.json").read_text())

    # Predict reads the plan from the run: its spacing, its intensities with their parameters,
    # and the recipe's mirroring.
    seen = {"modes": [], "mirror": []}
    normalise, window = volume_io.normalise_intensity, fp.sliding_window_predict

    def spy_normalise(array, mode, params=None):
        seen["modes"].append((mode, params))
        return normalise(array, mode, params)

    def spy_window(*args, **kwargs):
        seen["mirror"].append(tuple(kwargs.get("mirror_axes", ())))
        return window(*args, **kwargs)

    monkeypatch.setattr(volume_io, "normalise_intensity", spy_normalise)
    monkeypatch.setattr(fp, "sliding_window_predict", spy_window)
    image = data / "imagesTr" / "case_000_0000.nii.gz"
    out = tmp_path / "pred"
    assert (
        finetune.main(["predict", "--model", str(run), "--input", str(image), "--output", str(out)])
        == 0
    )
    assert seen["modes"] == [("ct_foreground", plan["intensity_params"][0])]
    assert seen["mirror"] == [(0, 1, 2)]
    assert json.loads((run / "finetune_config.json").read_text())["postprocess"] == "none"
    written = volume_io.read_geometry(out / "case_000.nii.gz")
    assert not written.differences(volume_io.read_geometry(image))  # back on the input's grid
    # Mirroring off, one flag away.
    seen["mirror"].clear()
    argv = ["predict", "--model", str(run), "--input", str(image), "--output", str(out)]
    assert finetune.main([*argv, "--tta", "off", "--overwrite"]) == 0
    assert seen["mirror"] == [()]


def test_settings_know_every_train_flag():
    names = {f.name for f in dataclasses.fields(FinetuneSettings)}
    assert {"recipe", "schedule", "augment"} <= names
    assert _settings(["--data", "d", "--output", "o"]) == FinetuneSettings(data="d", output="o")
