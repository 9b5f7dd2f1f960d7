"""Pre-training input checks (keras/genesis_trainer.py): everything refused before training."""

import os

import numpy as np
import pytest

import Genesis_Chest_CT
from genesis_trainer import (
    PretrainingInputError,
    build_model,
    load_weights_checked,
    prepare,
    train,
)
from pretraining_helpers import TINY, tiny_config, write_cubes


def test_missing_fold_lists_names_and_extraction_command(tmp_path):
    write_cubes(tmp_path / "cubes", folds=(0,))
    with pytest.raises(PretrainingInputError) as info:
        prepare(tiny_config(tmp_path))
    message = str(info.value)
    assert "validation fold 1" in message
    assert "bat_32_s_16x16x16_1.npy" in message and "bat_32_16x16x16_1.npy" in message
    assert "infinite_generator_3D.py --fold 1" in message


def test_cubes_of_another_shape_are_refused(tmp_path):
    write_cubes(tmp_path / "cubes", shape=(16, 16, 16))
    os.rename(tmp_path / "cubes" / "bat_32_s_16x16x16_1.npy", tmp_path / "cubes" / "keep.npy")
    np.save(tmp_path / "cubes" / "bat_32_s_16x16x16_1.npy", np.zeros((4, 16, 16, 8), np.float32))
    with pytest.raises(
        ValueError,
        match=r"Expected cubes of shape \(N, 16, 16, 16\).*"
        r"Received: shape=\(4, 16, 16, 8\)",
    ):
        prepare(tiny_config(tmp_path))


def test_integer_cubes_are_refused(tmp_path):
    write_cubes(tmp_path / "cubes", dtype=np.uint8)
    with pytest.raises(ValueError, match="float32 or float64.*uint8"):
        prepare(tiny_config(tmp_path))


def test_original_names_and_float64_are_read(tmp_path):
    write_cubes(tmp_path / "cubes", n=5, dtype=np.float64, original_name=True)
    plan = prepare(tiny_config(tmp_path))
    assert plan.train_files[0].endswith("bat_32_16x16x16_0.npy")
    assert (plan.n_train, plan.n_valid, plan.steps, plan.val_steps) == (5, 5, 2, 2)


def test_project_name_wins_over_the_original_name(tmp_path):
    write_cubes(tmp_path / "cubes", n=3, original_name=True)
    write_cubes(tmp_path / "cubes", n=6)
    plan = prepare(tiny_config(tmp_path))
    assert os.path.basename(plan.train_files[0]) == "bat_32_s_16x16x16_0.npy"
    assert plan.n_train == 6


def test_step_counts_follow_folds_and_batch(tmp_path):
    write_cubes(tmp_path / "cubes", folds=(0, 1, 2), n=7)
    plan = prepare(tiny_config(tmp_path, train_fold=[0, 2], batch_size=3))
    assert (plan.n_train, plan.steps, plan.val_steps) == (14, 4, 2)
    plan = prepare(tiny_config(tmp_path, steps_per_epoch=5, validation_steps=1))
    assert (plan.steps, plan.val_steps) == (5, 1)


def test_fewer_cubes_than_a_batch_is_refused(tmp_path):
    write_cubes(tmp_path / "cubes", n=3)
    with pytest.raises(ValueError, match="at least batch_size=4 training cubes.*3 cubes"):
        prepare(tiny_config(tmp_path, batch_size=4))


def test_size_not_divisible_by_the_poolings_is_refused(tmp_path):
    write_cubes(tmp_path / "cubes", shape=(16, 16, 12))
    with pytest.raises(ValueError, match="input_deps divisible by 8.*12") as info:
        prepare(tiny_config(tmp_path, input_deps=12))
    assert "the nearest that work are 8 or 16" in str(info.value)


def test_unwritable_model_path_is_refused(tmp_path):
    write_cubes(tmp_path / "cubes")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(PretrainingInputError, match="Cannot write to model_path"):
        prepare(tiny_config(tmp_path, model_path=str(tmp_path / "a_file" / "w")))


def test_existing_run_is_not_overwritten(tmp_path):
    write_cubes(tmp_path / "cubes")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").write_bytes(b"weights")
    with pytest.raises(PretrainingInputError, match="--resume.*--model_path or --exp_name"):
        prepare(tiny_config(tmp_path))
    prepare(tiny_config(tmp_path, resume=True))
    prepare(tiny_config(tmp_path, exp_name="other"))
    assert (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").read_bytes() == b"weights"


def test_bad_input_is_one_error_type_raised_where_it_is_checked(tmp_path):
    """Bad input is a PretrainingInputError from the check itself, not a relabelled error."""
    write_cubes(tmp_path / "cubes")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").write_bytes(b"weights")
    with pytest.raises(PretrainingInputError, match="--resume.*--model_path or --exp_name") as info:
        train(tiny_config(tmp_path))
    assert info.value.__cause__ is None
    assert isinstance(info.value, ValueError)  # callers catching ValueError still see it


@pytest.mark.parametrize("error", [ZeroDivisionError, KeyError])
def test_programming_error_in_setup_keeps_its_type_and_traceback(tmp_path, monkeypatch, error):
    """A bug before fit is not reported as bad input: it reaches the caller as itself."""
    import genesis_trainer

    def broken(config):
        raise error("a bug in the trainer")

    write_cubes(tmp_path / "cubes")
    monkeypatch.setattr(genesis_trainer, "build_model", broken)
    with pytest.raises(error, match="a bug in the trainer") as info:
        Genesis_Chest_CT.main(
            ["--data", str(tmp_path / "cubes"), "--model_path", str(tmp_path / "w"), *TINY]
        )
    assert not isinstance(info.value, PretrainingInputError)
    # The traceback reaches down to the function that raised.
    assert info.traceback[-1].name == "broken"


def test_main_reports_bad_input_in_one_line(tmp_path, capsys):
    rc = Genesis_Chest_CT.main(
        ["--data", str(tmp_path / "nothing"), "--model_path", str(tmp_path / "w"), *TINY]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("Error: No cube file for training fold 0") and "Traceback" not in err


def test_weight_file_that_does_not_fit_is_refused(tmp_path):
    import unet3d

    other = unet3d.unet_model_3d((1, 16, 16, 16), batch_normalization=True, n_base_filters=2)
    other.save(str(tmp_path / "other.h5"))
    model = build_model(tiny_config(tmp_path))
    with pytest.raises(ValueError, match="other.h5 does not fit this model"):
        load_weights_checked(model, str(tmp_path / "other.h5"))
    with pytest.raises(PretrainingInputError, match="missing.h5"):
        load_weights_checked(model, str(tmp_path / "missing.h5"))


def test_main_refuses_unfitting_weights_before_training(tmp_path, capsys):
    import unet3d

    other = unet3d.unet_model_3d((1, 16, 16, 16), batch_normalization=True, n_base_filters=2)
    other.save(str(tmp_path / "other.h5"))
    write_cubes(tmp_path / "cubes")
    rc = Genesis_Chest_CT.main(
        [
            "--data",
            str(tmp_path / "cubes"),
            "--model_path",
            str(tmp_path / "w"),
            "--weights",
            str(tmp_path / "other.h5"),
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "other.h5 does not fit this model" in err
    assert not (tmp_path / "w" / "Vnet-genesis_chest_ct.csv").exists()  # no epoch ran
