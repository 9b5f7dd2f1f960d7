"""Pre-training through its command line (keras/Genesis_Chest_CT.py) in child processes:
every output, kill -9 then --resume, data-parallel runs, and the fine-tuning demo."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT

from config import models_genesis_config
from genesis_checkpoint import read_checkpoint_state
from pretraining_helpers import TINY, TRAINER, csv_rows, run_cli, write_cubes


@pytest.mark.multibackend
@pytest.mark.slow
def test_tiny_cli_run_writes_every_output_and_weights_load_in_both_layouts(tmp_path):
    """Two epochs from another working directory, on the original's file names (float64),
    training channels-first; the best .h5 loads into unet_model_3d in both layouts."""
    write_cubes(tmp_path / "cubes", n=6, dtype=np.float64, original_name=True)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    proc = run_cli(
        [
            "--data",
            "../cubes",
            "--model_path",
            "out",
            "--nb_epoch",
            "2",
            "--data_format",
            "channels_first",
            *TINY,
        ],
        cwd=workdir,
    )
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
    saved = models_genesis_config.from_dict(json.loads((out / (name + ".json")).read_text()))
    assert saved.n_base_filters == 4 and saved.data_format == "channels_first"
    assert "depth_13_relu" in (out / (name + ".txt")).read_text()
    assert "Configurations:" in proc.stdout  # the resolved config is printed
    assert "Data-parallel" not in proc.stdout  # one CPU: "auto" distributes nothing
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # no temporary left behind

    import unet3d

    first = unet3d.unet_model_3d((1, 16, 16, 16), batch_normalization=True, n_base_filters=4)
    last = unet3d.unet_model_3d(
        (16, 16, 16, 1), batch_normalization=True, n_base_filters=4, data_format="channels_last"
    )
    first.load_weights(str(out / (name + ".h5")))
    last.load_weights(str(out / (name + ".h5")))
    # Compare with the file read by h5py, not through Keras.
    with h5py.File(out / (name + ".h5"), "r") as f:
        group = f["model_weights"]["depth_0_conv"]
        stored = {}
        group.visititems(
            lambda k, v: (
                stored.update({k.split("/")[-1]: v[()]}) if isinstance(v, h5py.Dataset) else None
            )
        )
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
    args = [
        "--data",
        str(tmp_path / "cubes"),
        "--model_path",
        str(tmp_path / "w"),
        "--nb_epoch",
        "40",
        "--steps_per_epoch",
        "1",
        "--validation_steps",
        "1",
        *TINY,
    ]
    ckpt = tmp_path / "w" / "Vnet-genesis_chest_ct.last.npz"
    csv_path = tmp_path / "w" / "Vnet-genesis_chest_ct.csv"
    proc = subprocess.Popen(
        [sys.executable, TRAINER, *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ckpt.exists(), "no checkpoint appeared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_checkpoint_state(str(ckpt))["epoch"]
    assert killed_at < 39, "the run finished before it could be killed"
    before = csv_rows(csv_path)[: killed_at + 1]

    # Without --resume the run is refused, and nothing is touched.
    refused = run_cli(args, cwd=tmp_path)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert "\nError: A run already exists" in "\n" + refused.stderr  # one line, no traceback
    assert "Traceback" not in refused.stderr
    assert read_checkpoint_state(str(ckpt))["epoch"] == killed_at

    resumed = run_cli(args + ["--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"epoch {killed_at + 2} of 40" in resumed.stdout
    assert f"Epoch {killed_at + 2}/40" in resumed.stdout
    assert f"Epoch {killed_at + 1}/40" not in resumed.stdout
    rows = csv_rows(csv_path)
    assert [int(r["epoch"]) for r in rows] == list(range(40))
    assert rows[: killed_at + 1] == before  # earlier epochs untouched
    assert read_checkpoint_state(str(ckpt))["epoch"] == 39
    assert (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").is_file()

    again = run_cli(args + ["--resume"], cwd=tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout


@pytest.mark.slow
def test_data_parallel_over_two_virtual_jax_devices(tmp_path):
    write_cubes(tmp_path / "cubes")
    env = {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = run_cli(
        [
            "--data",
            str(tmp_path / "cubes"),
            "--model_path",
            str(tmp_path / "w"),
            "--nb_epoch",
            "1",
            "--steps_per_epoch",
            "2",
            "--validation_steps",
            "1",
            "--distribute",
            "all",
            *TINY,
        ],
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Data-parallel training over 2 devices (keras.distribution.DataParallel)" in proc.stdout
    assert (tmp_path / "w" / "Vnet-genesis_chest_ct.h5").is_file()


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
    args = [
        "--data",
        str(tmp_path / "cubes"),
        "--model_path",
        str(tmp_path / "w"),
        "--steps_per_epoch",
        "2",
        "--validation_steps",
        "1",
        "--distribute",
        "all",
        *TINY,
    ]
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    for epochs, extra in (("1", []), ("2", ["--resume"])):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                TF_TWO_CPUS,
                str(ROOT / "keras"),
                *args,
                "--nb_epoch",
                epochs,
                *extra,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "over 2 devices (tf.distribute.MirroredStrategy)" in proc.stdout
    assert "Resuming from" in proc.stdout
    rows = csv_rows(tmp_path / "w" / "Vnet-genesis_chest_ct.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]


@pytest.mark.slow
def test_demo_finetune_loads_pretrained_weights_into_the_readme_snippet(tmp_path):
    """datasets/demo_finetune.py (step 4 of `make demo`): the README's segmentation snippet
    loads a small pre-trained .h5, checks it against the file read by h5py, fine-tunes."""
    import unet3d

    pretrained = unet3d.unet_model_3d((1, 64, 64, 32), batch_normalization=True, n_base_filters=2)
    pretrained.save(str(tmp_path / "pre.h5"))
    cubes = np.random.default_rng(0).random((4, 64, 64, 32), dtype=np.float32)
    np.save(tmp_path / "cubes.npy", cubes)

    def demo(n_base_filters):
        return subprocess.run(
            [
                sys.executable,
                str(ROOT / "datasets" / "demo_finetune.py"),
                "--weights",
                str(tmp_path / "pre.h5"),
                "--cubes",
                str(tmp_path / "cubes.npy"),
                "--n_base_filters",
                str(n_base_filters),
                "--steps",
                "1",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = demo(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "equals the file's" in proc.stdout and "Fine-tuned 2 cubes" in proc.stdout
    # Weights of another width do not load: the demo fails loudly, not silently.
    assert demo(4).returncode != 0
