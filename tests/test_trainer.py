"""Pre-training (keras/Genesis_Chest_CT.py): input checks, resume, OOM retry, real tiny runs.

The runs use 16x16x16 cubes and 4 base filters, so an epoch takes well under a second.
"""
import csv
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from conftest import ROOT

import Genesis_Chest_CT as trainer
from config import models_genesis_config

TRAINER = str(ROOT / "keras" / "Genesis_Chest_CT.py")
TINY = ["--input_rows", "16", "--input_cols", "16", "--input_deps", "16", "--n_base_filters", "4",
        "--batch_size", "2", "--workers", "1", "--max_queue_size", "2", "--verbose", "2",
        "--train_fold", "0", "--valid_fold", "1", "--save_samples", "none"]


def write_cubes(folder, folds=(0, 1), n=8, shape=(16, 16, 16), dtype=np.float32,
                original_name=False, seed=0):
    """Random cubes in [0, 1) saved as the extraction would name them."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for fold in folds:
        size = "x".join(map(str, shape))
        name = f"bat_32_{size}_{fold}.npy" if original_name else f"bat_32_s_{size}_{fold}.npy"
        np.save(os.path.join(folder, name), rng.random((n,) + tuple(shape)).astype(dtype))


def tiny_config(tmp_path, **kwargs):
    values = dict(data=str(tmp_path / "cubes"), train_fold=[0], valid_fold=[1], input_rows=16,
                  input_cols=16, input_deps=16, n_base_filters=4, batch_size=2, workers=1,
                  max_queue_size=2, save_samples=None, model_path=str(tmp_path / "w"),
                  verbose=0)
    values.update(kwargs)
    return models_genesis_config(**values)


def run_cli(args, cwd, env=None, timeout=240):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, TRAINER, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- input checks

def test_missing_fold_lists_names_and_extraction_command(tmp_path):
    write_cubes(tmp_path / "cubes", folds=(0,))
    with pytest.raises(FileNotFoundError) as info:
        trainer.prepare(tiny_config(tmp_path))
    message = str(info.value)
    assert "validation fold 1" in message
    assert "bat_32_s_16x16x16_1.npy" in message and "bat_32_16x16x16_1.npy" in message
    assert "infinite_generator_3D.py --fold 1" in message


def test_cubes_of_another_shape_are_refused(tmp_path):
    write_cubes(tmp_path / "cubes", shape=(16, 16, 16))
    os.rename(tmp_path / "cubes" / "bat_32_s_16x16x16_1.npy",
              tmp_path / "cubes" / "keep.npy")
    np.save(tmp_path / "cubes" / "bat_32_s_16x16x16_1.npy", np.zeros((4, 16, 16, 8), np.float32))
    with pytest.raises(ValueError, match=r"Expected cubes of shape \(N, 16, 16, 16\).*"
                                         r"Received: shape=\(4, 16, 16, 8\)"):
        trainer.prepare(tiny_config(tmp_path))


def test_integer_cubes_are_refused(tmp_path):
    write_cubes(tmp_path / "cubes", dtype=np.uint8)
    with pytest.raises(ValueError, match="float32 or float64.*uint8"):
        trainer.prepare(tiny_config(tmp_path))


def test_original_names_and_float64_are_read(tmp_path):
    write_cubes(tmp_path / "cubes", n=5, dtype=np.float64, original_name=True)
    plan = trainer.prepare(tiny_config(tmp_path))
    assert plan["train_files"][0].endswith("bat_32_16x16x16_0.npy")
    assert (plan["n_train"], plan["n_valid"], plan["steps"], plan["val_steps"]) == (5, 5, 2, 2)


def test_project_name_wins_over_the_original_name(tmp_path):
    write_cubes(tmp_path / "cubes", n=3, original_name=True)
    write_cubes(tmp_path / "cubes", n=6)
    plan = trainer.prepare(tiny_config(tmp_path))
    assert os.path.basename(plan["train_files"][0]) == "bat_32_s_16x16x16_0.npy"
    assert plan["n_train"] == 6


def test_step_counts_follow_folds_and_batch(tmp_path):
    write_cubes(tmp_path / "cubes", folds=(0, 1, 2), n=7)
    plan = trainer.prepare(tiny_config(tmp_path, train_fold=[0, 2], batch_size=3))
    assert (plan["n_train"], plan["steps"], plan["val_steps"]) == (14, 4, 2)
    plan = trainer.prepare(tiny_config(tmp_path, steps_per_epoch=5, validation_steps=1))
    assert (plan["steps"], plan["val_steps"]) == (5, 1)


def test_fewer_cubes_than_a_batch_is_refused(tmp_path):
    write_cubes(tmp_path / "cubes", n=3)
    with pytest.raises(ValueError, match="at least batch_size=4 training cubes.*3 cubes"):
        trainer.prepare(tiny_config(tmp_path, batch_size=4))


def test_size_not_divisible_by_the_poolings_is_refused(tmp_path):
    write_cubes(tmp_path / "cubes", shape=(16, 16, 12))
    with pytest.raises(ValueError, match="input_deps divisible by 8.*12"):
        trainer.prepare(tiny_config(tmp_path, input_deps=12))


def test_unwritable_model_path_is_refused(tmp_path):
    write_cubes(tmp_path / "cubes")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(PermissionError, match="Cannot write to model_path"):
        trainer.prepare(tiny_config(tmp_path, model_path=str(tmp_path / "a_file" / "w")))


def test_existing_run_is_not_overwritten(tmp_path):
    write_cubes(tmp_path / "cubes")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="--resume.*--model_path or --exp_name"):
        trainer.prepare(tiny_config(tmp_path))
    trainer.prepare(tiny_config(tmp_path, resume=True))
    trainer.prepare(tiny_config(tmp_path, exp_name="other"))
    assert (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").read_bytes() == b"weights"


def test_main_reports_bad_input_in_one_line(tmp_path, capsys):
    rc = trainer.main(["--data", str(tmp_path / "nothing"), "--model_path", str(tmp_path / "w"),
                       *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("Error: No cube file for training fold 0") and "Traceback" not in err


def test_weight_file_that_does_not_fit_is_refused(tmp_path):
    import unet3d
    other = unet3d.unet_model_3d((1, 16, 16, 16), batch_normalization=True, n_base_filters=2)
    other.save(str(tmp_path / "other.h5"))
    model = trainer.build_model(tiny_config(tmp_path))
    with pytest.raises(ValueError, match="other.h5 does not fit this model"):
        trainer.load_weights_checked(model, str(tmp_path / "other.h5"))
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        trainer.load_weights_checked(model, str(tmp_path / "missing.h5"))


def test_main_refuses_unfitting_weights_before_training(tmp_path, capsys):
    import unet3d
    other = unet3d.unet_model_3d((1, 16, 16, 16), batch_normalization=True, n_base_filters=2)
    other.save(str(tmp_path / "other.h5"))
    write_cubes(tmp_path / "cubes")
    rc = trainer.main(["--data", str(tmp_path / "cubes"), "--model_path", str(tmp_path / "w"),
                       "--weights", str(tmp_path / "other.h5"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "other.h5 does not fit this model" in err
    assert not (tmp_path / "w" / "Vnet-genesis_chest_ct.csv").exists()  # no epoch ran


# ------------------------------------------------------------------------------ utilities

def test_truncate_csv_keeps_earlier_epochs_only(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n0,0.5\n1,0.4\n2,0.3\n3,0.2\n4,0.1")  # last row cut off
    trainer.truncate_csv(str(path), 3)
    assert path.read_text() == "epoch,loss\n0,0.5\n1,0.4\n2,0.3\n"
    trainer.truncate_csv(str(path), 0)
    assert path.read_text() == "epoch,loss\n"
    trainer.truncate_csv(str(tmp_path / "absent.csv"), 1)  # nothing to do, no error


def test_next_run_dir_never_reuses_a_run(tmp_path):
    logs = tmp_path / "Logs" / "exp"
    assert trainer.next_run_dir(str(logs)) == str(logs / "run-1")
    for name in ("run-1", "run-3", "run-x", "other"):
        (logs / name).mkdir(parents=True)
    assert trainer.next_run_dir(str(logs)) == str(logs / "run-4")


def _error(type_name, message=""):
    return type(type_name, (Exception,), {})(message)


@pytest.mark.parametrize("exc, expected", [
    (_error("ResourceExhaustedError", "OOM when allocating tensor"), True),
    (_error("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes"), True),
    (_error("JaxRuntimeError", "RESOURCE_EXHAUSTED: Failed to allocate"), True),
    (_error("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB"), True),
    (_error("XlaRuntimeError", "INVALID_ARGUMENT: shapes differ"), False),
    (ValueError("bad value"), False),
    (MemoryError("host memory"), False),
])
def test_is_oom_error(exc, expected):
    assert trainer.is_oom_error(exc) is expected


def test_is_oom_error_sees_a_wrapped_error():
    try:
        try:
            raise _error("ResourceExhaustedError", "OOM")
        except Exception as inner:
            raise RuntimeError("fit failed") from inner
    except RuntimeError as outer:
        assert trainer.is_oom_error(outer)


def test_oom_retry_lowers_the_batch_by_two(tmp_path, capsys):
    seen = []

    def fake_train(config, overwrite=False):
        seen.append((config.batch_size, overwrite))
        if config.batch_size > 2:
            raise _error("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory")
        return "trained"

    config = tiny_config(tmp_path, batch_size=6)
    assert trainer.run_with_oom_retry(config, fake_train) == "trained"
    assert seen == [(6, False), (4, True), (2, True)]
    assert config.batch_size == 2
    out = capsys.readouterr().out
    assert "batch_size=6" in out and "retrying with batch_size=4" in out


def test_oom_retry_gives_up_at_batch_one(tmp_path):
    seen = []

    def always_oom(config, overwrite=False):
        seen.append(config.batch_size)
        raise _error("ResourceExhaustedError", "OOM")

    with pytest.raises(RuntimeError, match="batch_size=3; no smaller"):
        trainer.run_with_oom_retry(tiny_config(tmp_path, batch_size=5), always_oom)
    assert seen == [5, 3]  # 1 is not tried, as the original's `while batch_size > 1`


def test_oom_retry_resumes_what_this_invocation_wrote(tmp_path):
    seen = []

    def fake_train(config, overwrite=False):
        seen.append((config.batch_size, config.resume))
        if len(seen) == 1:
            # The first attempt finished an epoch (checkpoint written) and then ran out.
            os.makedirs(config.model_path, exist_ok=True)
            open(os.path.join(config.model_path, config.exp_name + ".last.npz"), "w").close()
            raise _error("OutOfMemoryError", "CUDA out of memory")
        return "ok"

    trainer.run_with_oom_retry(tiny_config(tmp_path, batch_size=4), fake_train)
    assert seen == [(4, False), (2, True)]


def test_other_errors_are_not_retried(tmp_path):
    calls = []

    def broken(config, overwrite=False):
        calls.append(1)
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        trainer.run_with_oom_retry(tiny_config(tmp_path), broken)
    assert len(calls) == 1


def test_oom_inside_real_fit_is_retried(tmp_path, monkeypatch, capsys):
    """The retry around the real `train`: fit raises a fake XLA OOM at batch 4, then works."""
    import keras
    write_cubes(tmp_path / "cubes")
    real_fit = keras.Model.fit
    batches = []

    def fit(self, x, *args, **kwargs):
        batches.append(x[0][0].shape[0])
        if len(batches) == 1:
            raise _error("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory while trying to "
                                            "allocate 1.00GiB")
        return real_fit(self, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    config = tiny_config(tmp_path, batch_size=4, nb_epoch=1, steps_per_epoch=1,
                         validation_steps=1)
    trainer.run_with_oom_retry(config)
    assert batches == [4, 2]
    assert "retrying with batch_size=2" in capsys.readouterr().out
    rows = csv_rows(tmp_path / "w" / "Vnet-genesis_chest_ct.csv")
    assert [r["epoch"] for r in rows] == ["0"]


# ---------------------------------------------------------------------- callbacks, state

def test_collapse_warning_fires_on_constant_output_only():
    cb = trainer.make_callbacks_module()["CollapseWarning"]
    x = np.zeros((2, 4), np.float32)
    constant = SimpleNamespace(predict_on_batch=lambda b: np.full((2, 4), 0.37, np.float32))
    varied = SimpleNamespace(predict_on_batch=lambda b: np.linspace(0, 1, 8).reshape(2, 4))
    warn = cb(x)
    warn.set_model(constant)
    with pytest.warns(RuntimeWarning, match="constant.*collapsed.*--lr"):
        warn.on_epoch_end(4)
    assert warn.collapsed_epochs == [4]
    quiet = cb(x)
    quiet.set_model(varied)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.on_epoch_end(0)
    assert quiet.collapsed_epochs == []


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    config = tiny_config(tmp_path)
    a = trainer.build_model(config)
    x = np.random.default_rng(1).random((2, 16, 16, 16, 1), dtype=np.float32)
    a.fit(x, x, epochs=2, batch_size=2, verbose=0)  # momentum and BN statistics move
    a.optimizer.learning_rate.assign(0.125)
    path = str(tmp_path / "c.npz")
    trainer.save_last_checkpoint(path, a, {"epoch": 3, "note": "x"})
    b = trainer.build_model(config)
    b.optimizer.build(b.trainable_variables)
    state = trainer.load_last_checkpoint(path, b)
    assert state == {"epoch": 3, "note": "x"}
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert len(a.optimizer.variables) == len(b.optimizer.variables) > 3
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
    assert float(np.asarray(b.optimizer.learning_rate)) == 0.125
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary left behind


def test_checkpoint_of_another_model_is_refused(tmp_path):
    a = trainer.build_model(tiny_config(tmp_path, n_base_filters=2))
    a.optimizer.build(a.trainable_variables)
    trainer.save_last_checkpoint(str(tmp_path / "c.npz"), a, {"epoch": 0})
    b = trainer.build_model(tiny_config(tmp_path))
    with pytest.raises(ValueError, match="c.npz does not fit this model"):
        trainer.load_last_checkpoint(str(tmp_path / "c.npz"), b)


def test_restored_callbacks_keep_their_counters_after_train_begin():
    cb = trainer.make_callbacks_module()
    early = cb["ResumableEarlyStopping"](monitor="val_loss", patience=5,
                                         restore={"wait": 3, "best": 0.25, "best_epoch": 7})
    early.on_train_begin()
    assert (early.wait, early.best, early.best_epoch) == (3, 0.25, 7)
    lr = cb["ResumableReduceLROnPlateau"](monitor="val_loss", patience=10,
                                          restore={"wait": 9, "best": 0.5, "cooldown_counter": 0})
    lr.on_train_begin()
    assert (lr.wait, lr.best) == (9, 0.5)
    fresh = cb["ResumableEarlyStopping"](monitor="val_loss", patience=5)
    fresh.wait = 4
    fresh.on_train_begin()
    assert fresh.wait == 0 and fresh.best is None


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    """3 epochs in one go == 1 epoch, then --resume to 3: same CSV rows, same weights."""
    write_cubes(tmp_path / "cubes")
    common = dict(steps_per_epoch=2, validation_steps=1, seed=3)
    trainer.train(tiny_config(tmp_path, nb_epoch=3, model_path=str(tmp_path / "a"), **common))
    trainer.train(tiny_config(tmp_path, nb_epoch=1, model_path=str(tmp_path / "b"), **common))
    trainer.train(tiny_config(tmp_path, nb_epoch=3, model_path=str(tmp_path / "b"), resume=True,
                              **common))
    a_rows = csv_rows(tmp_path / "a" / "Vnet-genesis_chest_ct.csv")
    b_rows = csv_rows(tmp_path / "b" / "Vnet-genesis_chest_ct.csv")
    assert [r["epoch"] for r in b_rows] == ["0", "1", "2"]
    for ra, rb in zip(a_rows, b_rows):
        for key in ("loss", "val_loss", "learning_rate"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-4, abs=1e-6), key
    with np.load(tmp_path / "a" / "Vnet-genesis_chest_ct.last.npz") as za, \
            np.load(tmp_path / "b" / "Vnet-genesis_chest_ct.last.npz") as zb:
        np.testing.assert_allclose(za["weight_0000"], zb["weight_0000"], rtol=1e-3, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "b" / "Logs" / "Vnet-genesis_chest_ct")) == [
        "run-1", "run-2"]


def test_mixed_precision_run_writes_sample_pngs_and_float32_weights(tmp_path, monkeypatch):
    """--mixed_precision trains (bfloat16 compute, float32 weights), and the training dataset
    writes the original's sample pair PNGs to {sample_path}/{exp_name} (made certain here)."""
    import keras
    import transforms
    from PIL import Image
    write_cubes(tmp_path / "cubes")
    monkeypatch.setattr(transforms, "SAMPLE_PNG_PROB", 1.0)  # every batch writes one
    config = tiny_config(tmp_path, nb_epoch=1, steps_per_epoch=2, validation_steps=1,
                         mixed_precision=True, save_samples="png",
                         sample_path=str(tmp_path / "samples"))
    try:
        history = trainer.train(config)
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
    model = unet3d.unet_model_3d((16, 16, 16, 1), batch_normalization=True, n_base_filters=4,
                                 data_format="channels_last")
    model.load_weights(str(tmp_path / "w" / "Vnet-genesis_chest_ct.h5"))
    assert model.get_layer("depth_0_conv").kernel.dtype == "float32"
    with h5py.File(tmp_path / "w" / "Vnet-genesis_chest_ct.h5", "r") as f:
        kinds = set()
        f.visititems(lambda k, v: kinds.add(v.dtype.name) if isinstance(v, h5py.Dataset)
                     and v.ndim else None)
    assert kinds == {"float32"}, kinds


# ------------------------------------------------------------------------ real CLI runs

@pytest.mark.multibackend
@pytest.mark.slow
def test_tiny_cli_run_writes_every_output_and_weights_load_in_both_layouts(tmp_path):
    """Two epochs from another working directory, on the original's file names (float64),
    training channels-first; the best .h5 loads into unet_model_3d in both layouts."""
    write_cubes(tmp_path / "cubes", n=6, dtype=np.float64, original_name=True)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    proc = run_cli(["--data", "../cubes", "--model_path", "out", "--nb_epoch", "2",
                    "--data_format", "channels_first", *TINY], cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = workdir / "out"
    name = "Vnet-genesis_chest_ct"
    for suffix in (".h5", ".last.npz", ".csv", ".json", ".txt"):
        assert (out / (name + suffix)).is_file(), suffix
    assert (out / "Logs" / name / "run-1").is_dir()
    rows = csv_rows(out / (name + ".csv"))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"loss", "mae", "mse", "val_loss", "val_mae", "val_mse"} <= set(rows[0])
    assert all(np.isfinite(float(r["val_loss"])) for r in rows)
    saved = models_genesis_config.from_dict(
        __import__("json").loads((out / (name + ".json")).read_text()))
    assert saved.n_base_filters == 4 and saved.data_format == "channels_first"
    assert "depth_13_relu" in (out / (name + ".txt")).read_text()
    assert "Configurations:" in proc.stdout  # the resolved config is printed
    assert "Data-parallel" not in proc.stdout  # one CPU: "auto" distributes nothing

    import unet3d
    first = unet3d.unet_model_3d((1, 16, 16, 16), batch_normalization=True, n_base_filters=4)
    last = unet3d.unet_model_3d((16, 16, 16, 1), batch_normalization=True, n_base_filters=4,
                                data_format="channels_last")
    first.load_weights(str(out / (name + ".h5")))
    last.load_weights(str(out / (name + ".h5")))
    # Compare with the file read by h5py, not through Keras.
    with h5py.File(out / (name + ".h5"), "r") as f:
        group = f["model_weights"]["depth_0_conv"]
        stored = {}
        group.visititems(lambda k, v: stored.update({k.split("/")[-1]: v[()]})
                         if isinstance(v, h5py.Dataset) else None)
    kernel = [v for k, v in stored.items() if "kernel" in k][0]
    np.testing.assert_array_equal(first.get_layer("depth_0_conv").kernel.numpy(), kernel)
    x = np.random.default_rng(2).random((1, 1, 16, 16, 16), dtype=np.float32)
    p_first = first.predict(x, verbose=0)
    p_last = last.predict(np.moveaxis(x, 1, -1), verbose=0)
    np.testing.assert_allclose(np.moveaxis(p_last, -1, 1), p_first, rtol=1e-4, atol=1e-5)
    assert p_first.std() > 0


@pytest.mark.slow
def test_kill_9_then_resume_logs_every_epoch_once(tmp_path):
    write_cubes(tmp_path / "cubes")
    args = ["--data", str(tmp_path / "cubes"), "--model_path", str(tmp_path / "w"),
            "--nb_epoch", "40", "--steps_per_epoch", "1", "--validation_steps", "1", *TINY]
    ckpt = tmp_path / "w" / "Vnet-genesis_chest_ct.last.npz"
    csv_path = tmp_path / "w" / "Vnet-genesis_chest_ct.csv"
    proc = subprocess.Popen([sys.executable, TRAINER, *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ckpt.exists(), "no checkpoint appeared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = trainer.read_checkpoint_state(str(ckpt))["epoch"]
    assert killed_at < 39, "the run finished before it could be killed"
    before = csv_rows(csv_path)[:killed_at + 1]

    # Without --resume the run is refused, and nothing is touched.
    refused = run_cli(args, cwd=tmp_path)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert trainer.read_checkpoint_state(str(ckpt))["epoch"] == killed_at

    resumed = run_cli(args + ["--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"epoch {killed_at + 2} of 40" in resumed.stdout
    assert f"Epoch {killed_at + 2}/40" in resumed.stdout
    assert f"Epoch {killed_at + 1}/40" not in resumed.stdout
    rows = csv_rows(csv_path)
    assert [int(r["epoch"]) for r in rows] == list(range(40))
    assert rows[:killed_at + 1] == before  # earlier epochs untouched
    assert trainer.read_checkpoint_state(str(ckpt))["epoch"] == 39
    assert (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").is_file()

    again = run_cli(args + ["--resume"], cwd=tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.slow
def test_data_parallel_over_two_virtual_jax_devices(tmp_path):
    write_cubes(tmp_path / "cubes")
    env = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = run_cli(["--data", str(tmp_path / "cubes"), "--model_path", str(tmp_path / "w"),
                    "--nb_epoch", "1", "--steps_per_epoch", "2", "--validation_steps", "1",
                    "--distribute", "all", *TINY], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Data-parallel training over 2 devices (keras.distribution.DataParallel)" in proc.stdout
    assert (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").is_file()


@pytest.mark.slow
def test_demo_finetune_loads_pretrained_weights_into_the_readme_snippet(tmp_path):
    """datasets/demo_finetune.py (step 4 of `make demo`): the README's segmentation snippet
    loads a small pre-trained .h5, checks it against the file read by h5py, fine-tunes."""
    import unet3d
    pretrained = unet3d.unet_model_3d((1, 64, 64, 32), batch_normalization=True,
                                      n_base_filters=2)
    pretrained.save(str(tmp_path / "pre.h5"))
    cubes = np.random.default_rng(0).random((4, 64, 64, 32), dtype=np.float32)
    np.save(tmp_path / "cubes.npy", cubes)

    def demo(n_base_filters):
        return subprocess.run([sys.executable, str(ROOT / "datasets" / "demo_finetune.py"),
                               "--weights", str(tmp_path / "pre.h5"), "--cubes",
                               str(tmp_path / "cubes.npy"), "--n_base_filters",
                               str(n_base_filters), "--steps", "1"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    proc = demo(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "equals the file's" in proc.stdout and "Fine-tuned 2 cubes" in proc.stdout
    # Weights of another width do not load: the demo fails loudly, not silently.
    assert demo(4).returncode != 0


TF_TWO_CPUS = r"""
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import Genesis_Chest_CT
sys.exit(Genesis_Chest_CT.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_mirrored_strategy_over_two_virtual_tf_devices_and_resume(tmp_path):
    write_cubes(tmp_path / "cubes")
    args = ["--data", str(tmp_path / "cubes"), "--model_path", str(tmp_path / "w"),
            "--steps_per_epoch", "2", "--validation_steps", "1", "--distribute", "all", *TINY]
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    for epochs, extra in (("1", []), ("2", ["--resume"])):
        proc = subprocess.run([sys.executable, "-c", TF_TWO_CPUS, str(ROOT / "keras"),
                               *args, "--nb_epoch", epochs, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "over 2 devices (tf.distribute.MirroredStrategy)" in proc.stdout
    assert "Resuming from" in proc.stdout
    rows = csv_rows(tmp_path / "w" / "Vnet-genesis_chest_ct.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]


def test_datasets_pickle_by_name_and_ignore_keras_epoch_calls(tmp_path):
    """Spawned data workers unpickle the dataset: its class must be found by name."""
    import pickle
    write_cubes(tmp_path / "cubes")
    config = tiny_config(tmp_path)
    train_ds, valid_ds = trainer._make_datasets(config, trainer.prepare(config))
    train_ds.set_epoch(5)
    train_ds.on_epoch_end()  # Keras' calls do not move the epoch: the trainer sets it
    assert train_ds.epoch == 5
    back = pickle.loads(pickle.dumps(train_ds))
    assert type(back) is type(train_ds) and back.epoch == 5
    np.testing.assert_array_equal(back[1][0], train_ds[1][0])
    assert valid_ds.seed != train_ds.seed and valid_ds.status == "test"
    code = ("import pickle, sys; sys.path[:0] = [sys.argv[1]]; "
            "ds = pickle.load(open(sys.argv[2], 'rb')); print(type(ds).__name__, ds.epoch)")
    (tmp_path / "ds.pkl").write_bytes(pickle.dumps(train_ds))
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "keras"),
                          str(tmp_path / "ds.pkl")], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == ["EpochSetPairDataset", "5"], out.stderr[-2000:]


def test_interrupted_best_save_keeps_the_previous_file(tmp_path):
    """A save interrupted half-way (Ctrl-C, full disk) leaves the old .h5 whole, no temp."""
    target = tmp_path / "best.h5"
    target.write_bytes(b"previous weights")

    class Interrupted:
        def save(self, path):
            with open(path, "wb") as f:
                f.write(b"half a fi")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.save_model_atomic(Interrupted(), str(target))
    assert target.read_bytes() == b"previous weights"
    assert os.listdir(tmp_path) == ["best.h5"]


def test_interrupted_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    model = trainer.build_model(tiny_config(tmp_path))
    model.optimizer.build(model.trainable_variables)
    path = str(tmp_path / "c.npz")
    trainer.save_last_checkpoint(path, model, {"epoch": 1})

    def broken_savez(f, **arrays):
        f.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_last_checkpoint(path, model, {"epoch": 2})
    monkeypatch.undo()
    assert trainer.read_checkpoint_state(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary left behind
