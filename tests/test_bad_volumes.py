"""Bad volumes are refused alike by every reader, naming the file and what is wrong.

`volume_io` raises `VolumeError`; `finetune.py train` stops before any training (exit 2, one
line, no weight file); `finetune.py predict` names and skips the case and writes the others
(exit 1); extraction warns and skips the volume. Every bad file is a real file written by
SimpleITK in tmp_path and then damaged on purpose: a NIfTI cut to half its size (as an
interrupted copy leaves it), NaN voxels, DICOM series missing a slice, holding one twice or
holding one only, a 2-D image, a three-component image.
"""

from __future__ import annotations

import csv
import locale
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT
from test_finetune_predict import PATCH, predict_settings, threshold_model, write_run

import finetune
import finetune_predict as fp
import infinite_generator_3D as ig
import volume_io as vio
from finetune_helpers import make_segmentation_folder, read_xyz, write_xyz

SIZE = (16, 16, 8)  # (x, y, z): the predict tests' patch, so one window per case

# What each reader says about each kind of damage (re.search on the message).
PROBLEMS = {
    "truncated": r"truncated: the header needs \d+ bytes of image data, the file holds \d+",
    "nan": r"Expected finite (voxel|HU) values\. Received: 2 NaN or infinite voxels",
    "not_3d": r"Expected a 3-D volume\. Received: 2-D image of size \(16, 16\)",
    "components": r"Expected one value per voxel .*Received: 3 components",
    "dicom_missing": r"missing slice: DICOM files s002\.dcm and s004\.dcm are 5 mm apart, "
    r"the other slices 2\.5 mm",
    "dicom_duplicate": r"duplicated slice: DICOM files s002\.dcm and s002b\.dcm are at the same "
    r"position",
    "dicom_one_slice": r"too few slices: expected a DICOM series of at least 2 slices",
}
FILE_KINDS = ("truncated", "nan", "not_3d", "components")
DICOM_KINDS = ("dicom_missing", "dicom_duplicate", "dicom_one_slice")


def hu_volume(size=SIZE, seed=0) -> np.ndarray:
    """int16 CT-like values in (x, y, z) order."""
    return np.random.default_rng(seed).normal(-300, 400, size).astype(np.int16)


def damage(kind: str, path: Path) -> Path:
    """Write a volume at `path` (its ending chooses the format) damaged as `kind` says."""
    if kind == "truncated":
        write_xyz(hu_volume(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "nan":
        values = hu_volume().astype(np.float32)
        values[3, 4, 5] = np.nan
        values[0, 0, 0] = np.inf
        write_xyz(values, path)
    elif kind == "not_3d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.int16)), str(path))
    elif kind == "components":
        zyx = np.zeros((*SIZE[::-1], 3), np.int16)
        sitk.WriteImage(sitk.GetImageFromArray(zyx, isVector=True), str(path))
    else:
        raise ValueError(kind)
    return path


def write_dicom_series(folder: Path, array_xyz: np.ndarray, spacing=(0.7, 0.8, 2.5)) -> list[Path]:
    """One CT series, a file per slice `s000.dcm`.., with the position and orientation tags."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    volume.SetSpacing(spacing)
    volume.SetOrigin((-20.0, 10.0, 5.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    paths = []
    for k in range(volume.GetDepth()):
        plane = volume[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0008|0018": f"{uid}.3.{k}",
            "0020|000d": f"{uid}.1",
            "0020|000e": f"{uid}.2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(
                f"{v:g}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))
            ),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{spacing[2]:g}",
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        paths.append(folder / f"s{k:03d}.dcm")
        writer.SetFileName(str(paths[-1]))
        # GDCM's writer sets the process's LC_CTYPE to "C", after which Python reads text files
        # and subprocess output as ASCII: put the locale back as it was.
        saved = locale.setlocale(locale.LC_ALL)
        try:
            writer.Execute(plane)
        finally:
            locale.setlocale(locale.LC_ALL, saved)
    return paths


def damaged_series(kind: str, folder: Path) -> Path:
    """A DICOM series folder damaged as `kind` says."""
    files = write_dicom_series(folder, hu_volume((16, 16, 6)))
    if kind == "dicom_missing":
        files[3].unlink()
    elif kind == "dicom_duplicate":
        shutil.copy(files[2], folder / "s002b.dcm")
    elif kind == "dicom_one_slice":
        for f in files[1:]:
            f.unlink()
    else:
        raise ValueError(kind)
    return folder


# --------------------------------------------------------------------------------------------
# volume_io


@pytest.mark.parametrize(
    "kind,name",
    [
        ("truncated", "v.nii"),
        ("truncated", "v.nii.gz"),
        ("nan", "v.nii"),
        ("nan", "v.nii.gz"),
        ("nan", "v.mha"),
        ("not_3d", "v.nii.gz"),
        ("components", "v.nii.gz"),
        ("components", "v.nrrd"),
    ],
)
def test_read_image_refuses_a_bad_file_naming_it(tmp_path, kind, name):
    path = damage(kind, tmp_path / name)
    with pytest.raises(vio.VolumeError, match=PROBLEMS[kind]) as caught:
        vio.read_image(path)
    assert caught.value.path == str(path)
    assert str(caught.value) == f"{path}: {caught.value.problem}"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("kind", DICOM_KINDS)
def test_read_image_refuses_a_broken_dicom_series(tmp_path, kind):
    folder = damaged_series(kind, tmp_path / "series")
    with pytest.raises(vio.VolumeError, match=PROBLEMS[kind]) as caught:
        vio.read_image(folder)
    assert caught.value.path == str(folder)


def test_a_whole_dicom_series_reads_as_written(tmp_path):
    values = hu_volume((16, 16, 6))
    folder = tmp_path / "series"
    write_dicom_series(folder, values)
    image = vio.read_image(folder)
    assert image.GetSpacing() == pytest.approx((0.7, 0.8, 2.5))
    np.testing.assert_array_equal(vio.image_to_array(image), values)


def test_the_header_check_refuses_2d_and_multi_component_files(tmp_path):
    for kind in ("not_3d", "components"):
        path = damage(kind, tmp_path / f"{kind}.nii.gz")
        with pytest.raises(vio.VolumeError, match=PROBLEMS[kind]):
            vio.read_geometry(path)


def test_resample_fill_and_type_differ_for_images_and_labels():
    # 4 voxels of 2 mm along x resampled to 1 mm: new voxel 7 lies past the last centre, so it
    # takes the fill value. Images: the volume's minimum (-1000 here, air), float32; labels: 0,
    # their own integer type.
    geometry = vio.Geometry(
        (4, 3, 2), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    )
    hu = np.full((4, 3, 2), 40, np.int16)
    hu[0] = -1000
    image = vio.resample_image(vio.array_to_image(hu, geometry), (1.0, 1.0, 1.0))
    assert image.GetPixelID() == sitk.sitkFloat32
    line = vio.image_to_array(image)[:, 0, 0]
    np.testing.assert_allclose(line, [-1000, -480, 40, 40, 40, 40, 40, -1000])
    told = vio.resample_image(vio.array_to_image(hu, geometry), (1.0, 1.0, 1.0), fill=7.0)
    assert vio.image_to_array(told)[7, 0, 0] == 7.0
    mask = np.full((4, 3, 2), 2, np.uint16)
    label = vio.resample_image(vio.array_to_image(mask, geometry), (1.0, 1.0, 1.0), label=True)
    assert label.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(vio.image_to_array(label)[:, 0, 0], [2, 2, 2, 2, 2, 2, 2, 0])


def test_one_ct_window_and_one_normaliser():
    assert ig.PRESETS["ct-chest"]["hu_min"] == vio.CT_WINDOW[0] == ig.setup_config.hu_min
    assert ig.PRESETS["mri"]["hu_max"] == vio.MRI_WINDOW[1]
    hu = np.arange(-1500, 1600, 7, dtype=np.int16)
    by_hand = (np.clip(hu.astype(np.float64), -1000, 1000) + 1000) / 2000
    np.testing.assert_array_equal(ig.normalise_hu(hu, -1000.0, 1000.0), by_hand)
    np.testing.assert_allclose(vio.normalise_intensity(hu, "ct"), by_hand, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# finetune.py train: stops before any training


TRAIN = ["--weights", "none", "--n_base_filters", "4", "--patch", "16", "16", "8"]
TRAIN += ["--batch_size", "2", "--steps_per_epoch", "1", "--validation_steps", "1"]
TRAIN += ["--epochs", "1", "--verbose", "0"]


def _damaged_data_set(tmp_path, kind, ending, which):
    data = make_segmentation_folder(tmp_path / "data", n_cases=3, size=SIZE, file_ending=ending)
    target = {
        "label": data / "labelsTr" / f"case_001{ending}",
        "image": data / "imagesTr" / f"case_001_0000{ending}",
    }[which]
    damage(kind, target)
    return data, target


def _no_run_written(run: Path):
    for name in ("best_model.keras", "last_checkpoint.npz", "finetune_config.json"):
        assert not (run / name).exists(), name


@pytest.mark.parametrize(
    "kind,ending,which",
    [
        ("truncated", ".nii", "label"),
        ("nan", ".nii.gz", "image"),
        ("nan", ".mha", "label"),
        ("not_3d", ".nii.gz", "label"),
        ("components", ".nii.gz", "image"),
    ],
)
def test_train_stops_on_a_bad_volume_naming_it(tmp_path, capsys, kind, ending, which):
    data, bad = _damaged_data_set(tmp_path, kind, ending, which)
    run = tmp_path / "run"
    assert finetune.main(["train", "--data", str(data), "--output", str(run), *TRAIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"finetune.py train: error: {bad}: ")
    assert re.search(PROBLEMS[kind], err[0]), err[0]
    _no_run_written(run)


def test_train_command_on_a_half_copied_nifti_label(tmp_path):
    """The case an interrupted copy leaves: before, ITK read it with zeros and training went on."""
    data, bad = _damaged_data_set(tmp_path, "truncated", ".nii", "label")
    run = tmp_path / "run"
    cli = [sys.executable, str(ROOT / "keras" / "finetune.py"), "train"]
    result = subprocess.run(
        [*cli, "--data", str(data), "--output", str(run), *TRAIN],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("finetune.py")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{bad}: truncated: the header needs" in lines[0]
    _no_run_written(run)


# --------------------------------------------------------------------------------------------
# finetune.py predict: names and skips the case, writes the others


def _predict(tmp_path, inputs, ending=".nii.gz"):
    # A run trained on `ending` files: a folder of them is read with that ending.
    run = write_run(tmp_path / "run", threshold_model(), file_ending=ending)
    out = tmp_path / "pred"
    return fp.predict(predict_settings(run, inputs, out)), out


@pytest.mark.parametrize(
    "kind,ending",
    [
        ("truncated", ".nii"),
        ("nan", ".nii.gz"),
        ("nan", ".mha"),
        ("not_3d", ".nii.gz"),
        ("components", ".nii.gz"),
    ],
)
def test_predict_skips_a_bad_file_and_writes_the_others(tmp_path, capsys, kind, ending):
    data, bad = _damaged_data_set(tmp_path, kind, ending, "image")
    code, out = _predict(tmp_path, [data / "imagesTr"], ending)
    assert code == 1
    assert sorted(os.listdir(out)) == [f"case_000{ending}", f"case_002{ending}"]
    good = read_xyz(data / "imagesTr" / f"case_000_0000{ending}").astype(np.float64)
    np.testing.assert_array_equal(read_xyz(out / f"case_000{ending}"), good > 0)
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: skipping case")]
    assert len(warning) == 1 and f"case case_001: {bad}: " in warning[0], err
    assert re.search(PROBLEMS[kind], warning[0]), warning[0]
    assert "error: 1 case(s) skipped because a volume could not be used: case_001" in err


@pytest.mark.parametrize("kind", DICOM_KINDS)
def test_predict_skips_a_broken_dicom_series(tmp_path, capsys, kind):
    series = damaged_series(kind, tmp_path / "series")
    good = tmp_path / "good.nii.gz"
    write_xyz(hu_volume(PATCH, seed=3), good)
    code, out = _predict(tmp_path, [series, good])
    assert code == 1
    assert os.listdir(out) == ["good.nii.gz"]
    err = capsys.readouterr().err
    assert re.search(rf"warning: skipping case series: {series}: {PROBLEMS[kind]}", err), err


# --------------------------------------------------------------------------------------------
# Extraction: warns and skips


def test_extraction_warns_about_each_bad_volume_and_cuts_the_good_one(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "a_good.nii.gz"
    write_xyz(np.full((66, 66, 36), 40, np.int16), good)  # soft tissue: every window passes
    bad = {
        "truncated": damage("truncated", folder / "b_truncated.nii"),
        "nan": damage("nan", folder / "c_nan.nii.gz"),
        "not_3d": damage("not_3d", folder / "d_flat.nii.gz"),
        "components": damage("components", folder / "e_rgb.nrrd"),
    }
    for kind in DICOM_KINDS:
        bad[kind] = damaged_series(kind, folder / f"f_{kind}")
    out = tmp_path / "cubes.npy"
    argv = ["--input", str(folder), "--output", str(out), "--preset", "ct", "--scale", "2"]
    assert ig.main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(bad), captured.err
    for kind, path in bad.items():
        pattern = rf"warning: skipping {re.escape(str(path))}: {PROBLEMS[kind]}"
        assert any(re.match(pattern, w) for w in warnings), (kind, warnings)
        assert f"   0 cubes from {path} (" in captured.out
    assert np.load(out).shape == (2, 64, 64, 32)
    with open(tmp_path / "cubes.csv", newline="") as f:
        assert {row["source"] for row in csv.DictReader(f)} == {str(good)}
