"""`finetune.py`: help with examples, and bad input answered in one line before training."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from finetune_helpers import make_segmentation_folder, read_xyz, write_xyz

CLI = str(ROOT / "keras" / "finetune.py")


def _run(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_of_every_subcommand_shows_an_example():
    top = _run("--help")
    assert top.returncode == 0 and "train" in top.stdout and "evaluate" in top.stdout
    train = _run("train", "--help")
    assert train.returncode == 0
    assert "python keras/finetune.py train --data ../shared/data/sts_ct" in train.stdout
    for flag in ("--patch", "--fold", "--freeze_encoder", "--resume", "--mixed_precision"):
        assert flag in train.stdout
    for sub in ("predict", "evaluate"):
        out = _run(sub, "--help")
        assert out.returncode == 0 and f"python keras/finetune.py {sub}" in out.stdout


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("finetune.py")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def data(tmp_path):
    return make_segmentation_folder(tmp_path / "data", n_cases=2)


def test_bad_patch(tmp_path, data):
    r = _run(
        "train",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "r"),
        "--weights",
        "none",
        "--patch",
        "64",
        "60",
        "32",
    )
    _one_line_error(r, "C=60", "56 or 64")
    assert not (tmp_path / "r" / "best_model.keras").exists()


def test_missing_default_weights_says_how_to_get_them(tmp_path, data):
    r = _run("train", "--data", str(data), "--output", str(tmp_path / "r"), cwd=tmp_path)
    _one_line_error(
        r, "pretrained_weights/Genesis_Chest_CT.h5", "download_weights.py", "--weights none"
    )


def test_geometry_mismatch_from_the_command_line(tmp_path, data):
    lab = data / "labelsTr" / "case_000.nii.gz"
    write_xyz(read_xyz(lab), lab, origin=(0.0, 0.0, 0.0))
    r = _run(
        "train",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "r"),
        "--weights",
        "none",
        "--n_base_filters",
        "4",
        "--patch",
        "16",
        "16",
        "8",
        "--verbose",
        "0",
    )
    _one_line_error(r, "case_000.nii.gz", "origin")
    assert not (tmp_path / "r" / "best_model.keras").exists()


def test_not_a_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run(
        "train",
        "--data",
        str(tmp_path / "empty"),
        "--output",
        str(tmp_path / "r"),
        "--weights",
        "none",
    )
    _one_line_error(r, "imagesTr", "empty")
