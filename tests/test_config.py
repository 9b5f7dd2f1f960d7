"""The pre-training config and its command line (no training here)."""

import dataclasses
import json

import pytest

import config as config_module
from config import models_genesis_config

pytestmark = pytest.mark.multibackend


def test_defaults_are_the_originals():
    c = models_genesis_config()
    # The original's values (docs/pretraining.md), written out by hand.
    expected = dict(
        model="Vnet",
        suffix="genesis_chest_ct",
        exp_name="Vnet-genesis_chest_ct",
        train_fold=[0, 1, 2, 3, 4],
        valid_fold=[5, 6],
        test_fold=[7, 8, 9],
        scale=32,
        input_rows=64,
        input_cols=64,
        input_deps=32,
        batch_size=6,
        optimizer="sgd",
        lr=1.0,
        nb_epoch=10000,
        patience=50,
        workers=10,
        max_queue_size=40,
        save_samples="png",
        flip_rate=0.4,
        local_rate=0.5,
        nonlinear_rate=0.9,
        paint_rate=0.9,
        outpaint_rate=0.8,
        inpaint_rate=0.2,
        model_path="pretrained_weights",
        logs_path="pretrained_weights/Logs",
        sample_path="pair_samples",
        weights=None,
        data="generated_cubes",
        # Additions, with defaults that keep the original's behaviour.
        n_base_filters=32,
        steps_per_epoch=None,
        validation_steps=None,
        mixed_precision=False,
        data_format="channels_last",
        resume=False,
    )
    for name, value in expected.items():
        assert getattr(c, name) == value, name


def test_derived_names_follow_the_parts():
    c = models_genesis_config(model="Unet", suffix="abc", model_path="/x/w")
    assert c.exp_name == "Unet-abc"
    assert c.logs_path == "/x/w/Logs"
    assert models_genesis_config(exp_name="mine").exp_name == "mine"
    assert models_genesis_config(logs_path="L").logs_path == "L"


def test_input_shape_per_layout():
    assert models_genesis_config(data_format="channels_first").input_shape == (1, 64, 64, 32)
    assert models_genesis_config().input_shape == (64, 64, 32, 1)


def test_list_defaults_are_not_shared():
    a, b = models_genesis_config(), models_genesis_config()
    a.train_fold.append(9)
    assert b.train_fold == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(input_rows=-3), "input_rows"),
        (dict(flip_rate=1.5), "flip_rate"),
        (dict(lr=0.0), "lr"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(data_format="NCDHW"), "data_format"),
        (dict(train_fold=[]), "train_fold"),
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(distribute="some"), "distribute"),
    ],
)
def test_bad_values_are_refused(kwargs, word):
    # Pre-training's one bad-input type, raised by the config's own check.
    with pytest.raises(config_module.PretrainingInputError, match=word):
        models_genesis_config(**kwargs)


def test_json_round_trip():
    c = models_genesis_config(train_fold=[3], lr=0.1, resume=True, weights="w.h5")
    back = models_genesis_config.from_dict(json.loads(c.to_json()))
    assert back == c
    with pytest.raises(ValueError, match="unknown keys"):
        models_genesis_config.from_dict({"nope": 1})


def test_display_prints_every_resolved_field(capsys):
    models_genesis_config(model="M").display()
    out = capsys.readouterr().out
    for f in dataclasses.fields(models_genesis_config):
        assert f"\n{f.name}" in out, f.name
    assert "M-genesis_chest_ct" in out and "pretrained_weights/Logs" in out


def test_every_field_has_help():
    names = {f.name for f in dataclasses.fields(models_genesis_config)}
    assert names == set(config_module.FIELD_HELP)


def test_layouts_come_from_genesis_files():
    import genesis_files

    assert config_module.DATA_FORMATS is genesis_files.DATA_FORMATS
    assert models_genesis_config().data_format == genesis_files.TRAINING_DATA_FORMAT


def test_config_module_does_not_import_keras():
    import subprocess
    import sys

    code = "import sys; sys.path.insert(0, 'keras'); import config; print('keras' in sys.modules)"
    from conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------- command line


def parse(argv):
    import Genesis_Chest_CT

    return Genesis_Chest_CT.parse_config(argv)


def test_cli_defaults_equal_the_dataclass():
    assert parse([]) == models_genesis_config()


def test_cli_sets_every_kind_of_field():
    c = parse(
        [
            "--data",
            "cubes",
            "--train_fold",
            "0",
            "2",
            "--valid_fold",
            "1",
            "--nb_epoch",
            "2",
            "--batch_size",
            "2",
            "--input_rows",
            "32",
            "--input_cols",
            "32",
            "--input_deps",
            "16",
            "--n_base_filters",
            "4",
            "--model_path",
            "DIR",
            "--lr",
            "0.1",
            "--resume",
            "--mixed_precision",
            "--data_format",
            "channels_first",
            "--save_samples",
            "none",
            "--steps_per_epoch",
            "7",
            "--model",
            "Unet",
        ]
    )
    assert c.data == "cubes" and c.train_fold == [0, 2] and c.valid_fold == [1]
    assert (c.nb_epoch, c.batch_size) == (2, 2)
    assert (c.input_rows, c.input_cols, c.input_deps) == (32, 32, 16)
    assert c.n_base_filters == 4 and c.model_path == "DIR" and c.logs_path == "DIR/Logs"
    assert c.lr == pytest.approx(0.1) and isinstance(c.lr, float)
    assert c.resume is True and c.mixed_precision is True
    assert c.data_format == "channels_first" and c.save_samples is None
    assert c.steps_per_epoch == 7 and c.validation_steps is None
    assert c.exp_name == "Unet-genesis_chest_ct"


def test_cli_every_field_is_a_flag():
    import Genesis_Chest_CT

    dests = {a.dest for a in Genesis_Chest_CT.build_parser()._actions}
    for f in dataclasses.fields(models_genesis_config):
        assert f.name in dests, f.name


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch_size", "two"],
        ["--batch_size", "0"],
        ["--data_format", "x"],
        ["--train_fold"],
        ["--no_such_flag", "1"],
    ],
)
def test_cli_bad_values_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_help_imports_neither_keras_nor_numpy():
    """--help answers at once: the trainer (Keras, NumPy) is imported only after parsing."""
    import subprocess
    import sys

    from conftest import ROOT

    code = (
        "import runpy, sys\n"
        "sys.argv = [sys.argv[1], '--help']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print('keras' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "keras" / "Genesis_Chest_CT.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "usage: Genesis_Chest_CT.py" in out
    assert out.strip().splitlines()[-1] == "False False"


def test_help_shows_a_real_example(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    assert "python keras/Genesis_Chest_CT.py --data" in out
    assert "--resume" in out and "--train_fold" in out
