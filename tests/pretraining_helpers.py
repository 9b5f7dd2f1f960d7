"""What the pre-training tests share: tiny cube files, a tiny config, running the CLI.

The runs use 16x16x16 cubes and 4 base filters, so an epoch takes well under a second.
"""

import csv
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

from config import models_genesis_config

TRAINER = str(ROOT / "keras" / "Genesis_Chest_CT.py")
TINY = [
    "--input_rows",
    "16",
    "--input_cols",
    "16",
    "--input_deps",
    "16",
    "--n_base_filters",
    "4",
    "--batch_size",
    "2",
    "--workers",
    "1",
    "--max_queue_size",
    "2",
    "--verbose",
    "2",
    "--train_fold",
    "0",
    "--valid_fold",
    "1",
    "--save_samples",
    "none",
]


def write_cubes(
    folder, folds=(0, 1), n=8, shape=(16, 16, 16), dtype=np.float32, original_name=False, seed=0
):
    """Random cubes in [0, 1) saved as the extraction would name them."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for fold in folds:
        size = "x".join(map(str, shape))
        name = f"bat_32_{size}_{fold}.npy" if original_name else f"bat_32_s_{size}_{fold}.npy"
        np.save(os.path.join(folder, name), rng.random((n,) + tuple(shape)).astype(dtype))


def tiny_config(tmp_path, **kwargs):
    values = dict(
        data=str(tmp_path / "cubes"),
        train_fold=[0],
        valid_fold=[1],
        input_rows=16,
        input_cols=16,
        input_deps=16,
        n_base_filters=4,
        batch_size=2,
        workers=1,
        max_queue_size=2,
        save_samples=None,
        model_path=str(tmp_path / "w"),
        verbose=0,
    )
    values.update(kwargs)
    return models_genesis_config(**values)


def run_cli(args, cwd, env=None, timeout=240):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, TRAINER, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_error(type_name, message=""):
    """An exception of a class named `type_name` (the backends' OOM errors, without them)."""
    return type(type_name, (Exception,), {})(message)
