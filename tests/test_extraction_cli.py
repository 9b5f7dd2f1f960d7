"""Reading volumes, bad input, the command line and the demo data of infinite_generator_3D.py."""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import extraction_reference as ref
import infinite_generator_3D as ig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infinite_generator_3D.py"


def lung_like_volume(seed: int, shape_xyz=(280, 280, 100)) -> np.ndarray:
    """int16 HU in SimpleITK's (z, y, x) order: air with sparse tissue, a tissue slab at high y.

    With the 100-voxel border only windows with x, y in [100, 180) exist; the slab and the
    sparse voxels make some of them fail the air test and others pass.
    """
    gen = np.random.default_rng(seed)
    x, y, z = shape_xyz
    hu = gen.normal(-900, 40, size=(z, y, x))
    hu[gen.random((z, y, x)) < 0.05] = 40
    hu[:, 168:, :] = 40
    return np.rint(hu).astype(np.int16)


def write(path: Path, array_zyx: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(path), **kw)
    return path


def expected_fold_cubes(volumes_zyx, scale, seed=1):
    """Reference cubes of a fold: one Random(seed) over the usable volumes, in order."""
    config = ig.setup_config(scale=scale)
    rng = random.Random(seed)
    out = []
    for vol in volumes_zyx:
        cubes = ref.reference_cubes(config, vol.transpose(2, 1, 0), rng, air_test="argmax")
        if cubes is not None:
            out.append(cubes)
    return np.concatenate(out)


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mhd", ".mha", ".nii", ".nii.gz", ".nrrd"])
def test_read_volume_formats_give_xyz_order(tmp_path, suffix):
    vol = (
        np.random.default_rng(0).integers(-1000, 1000, size=(7, 6, 5)).astype(np.int16)
    )  # (z, y, x)
    path = write(tmp_path / f"v{suffix}", vol)
    got = ig.read_volume(str(path))
    assert got.shape == (5, 6, 7)
    assert np.array_equal(got, vol.transpose(2, 1, 0))


def test_read_dicom_series_folder(abdomen_dicom_path):
    got = ig.read_volume(str(abdomen_dicom_path))
    assert got.shape == (512, 512, 20)
    assert got.min() >= -1024 and got.max() <= 1839


def test_list_volumes_sorted_and_filtered(tmp_path):
    for name in [
        "b.mhd",
        "b.raw",
        "a.nii.gz",
        "C.NRRD",
        "notes.txt",
        ".hidden.mhd",
        "z.mha",
        "d.nii",
    ]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dicom_dir").mkdir()
    names = [os.path.basename(p) for p in ig.list_volumes(str(tmp_path))]
    assert names == ["C.NRRD", "a.nii.gz", "b.mhd", "d.nii", "dicom_dir", "z.mha"]


def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_bad_files_raise_clear_errors(tmp_path):
    vol = np.random.default_rng(0).integers(-1000, 1000, size=(30, 20, 20)).astype(np.int16)
    cases = {}
    p = write(tmp_path / "trunc.mhd", vol)
    _truncate(tmp_path / "trunc.raw")
    cases[p] = r"cannot read: data file trunc\.raw holds 12000 bytes of image data, expected 24000"
    p = write(tmp_path / "trunc.mha", vol)  # ITK itself says "No such file or directory" here
    _truncate(p)
    cases[p] = (
        r"cannot read: trunc\.mha holds \d+ bytes of image data, expected 24000 \(truncated\?\)"
    )
    p = write(tmp_path / "ztrunc.mha", vol, useCompression=True)
    _truncate(p)
    cases[p] = (
        r"cannot read: ztrunc\.mha holds \d+ bytes of image data, expected \d+ \(truncated\?\)"
    )
    p = write(tmp_path / "noraw.mhd", vol)
    (tmp_path / "noraw.raw").unlink()
    cases[p] = r"cannot read: data file noraw\.raw not found"
    p = tmp_path / "garbage.nii.gz"
    p.write_bytes(b"not a gzip file at all" * 10)
    cases[p] = r"cannot read: not a valid gzip file"
    p = write(tmp_path / "trunc.nii.gz", vol)
    _truncate(p)
    cases[p] = r"truncated: the header needs 24352 bytes of image data, the file holds \d+"
    p = write(tmp_path / "trunc.nii", vol)
    _truncate(p, 0.8)
    cases[p] = r"truncated: the header needs 24352 bytes"
    p = write(tmp_path / "trunc.nrrd", vol, useCompression=True)
    _truncate(p)
    cases[p] = r"cannot read: .*nrrd"
    bad = vol.astype(np.float32)
    bad[3, 4, 5] = np.nan
    bad[0, 0, 0] = np.inf
    for name in (
        "nan.mha",
        "nan.nrrd",
        "nan.nii",
        "nan.nii.gz",
    ):  # ITK reads NIfTI's NaN and inf as 0
        p = write(tmp_path / name, bad)
        cases[p] = r"Expected finite HU values\. Received: 2 NaN or infinite voxels"
    p = write(tmp_path / "nan64.nii.gz", bad.astype(np.float64))
    cases[p] = r"Expected finite HU values\. Received: 2 NaN or infinite voxels"
    p = write(tmp_path / "flat.nii.gz", vol[0])
    cases[p] = r"Expected a 3-D volume\. Received: 2-D image"
    p = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(p))
    cases[p] = r"Expected one value per voxel.*Received: 3 components"
    (tmp_path / "empty_dir").mkdir()
    cases[tmp_path / "empty_dir"] = r"no DICOM series found in this folder$"
    write(tmp_path / "nested" / "x.mhd", vol)
    cases[tmp_path / "nested"] = (
        r"no DICOM series found.*holds 1 volume files \(x\.mhd, \.\.\.\): volumes must sit"
    )
    for path, pattern in cases.items():
        with pytest.raises(ig.VolumeError, match=pattern):
            ig.read_volume(str(path))
            pytest.fail(f"{path.name} was read without error")


def test_finite_float_nifti_is_read(tmp_path):
    """The NaN scan of float NIfTI files lets clean ones through, values unchanged."""
    vol = np.random.default_rng(2).normal(-500, 300, size=(9, 8, 7)).astype(np.float32)
    for name in ("f.nii", "f.nii.gz"):
        got = ig.read_volume(str(write(tmp_path / name, vol)))
        assert got.dtype == np.float32 and np.array_equal(got, vol.transpose(2, 1, 0))


def test_dicom_folder_with_a_truncated_slice_is_refused(tmp_path, abdomen_dicom_path):
    """GDCM silently leaves a damaged slice out of the series; the reader names it instead."""
    import shutil

    folder = tmp_path / "dicom"
    shutil.copytree(abdomen_dicom_path, folder)
    (folder / "notes.txt").write_text("not DICOM: ignored")
    assert ig.read_volume(str(folder)).shape == (512, 512, 20)
    victim = sorted(p for p in folder.iterdir() if p.name != "notes.txt")[7]
    _truncate(victim)
    with pytest.raises(
        ig.VolumeError, match=rf"DICOM file {victim.name} in this folder is unreadable or truncated"
    ):
        ig.read_volume(str(folder))


def test_multi_member_gzip_nifti_is_not_called_truncated(tmp_path):
    """The cheap gzip-trailer check must fall back to counting, not reject a valid file."""
    vol = np.random.default_rng(1).integers(-1000, 1000, size=(9, 8, 7)).astype(np.int16)
    plain = write(tmp_path / "v.nii", vol).read_bytes()
    half = len(plain) // 2
    p = tmp_path / "multi.nii.gz"
    p.write_bytes(gzip.compress(plain[:half]) + gzip.compress(plain[half:]))
    assert np.array_equal(ig.read_volume(str(p)), vol.transpose(2, 1, 0))


# --- one fold, in process ------------------------------------------------------------------------


@pytest.fixture
def mixed_fold(tmp_path, abdomen_dicom_path):
    """A fold with two good volumes and one of each bad kind, in sorted-name order."""
    data = tmp_path / "data"
    fold = data / "subset3"
    good = [lung_like_volume(1), lung_like_volume(2)]
    write(fold / "a_good.mhd", good[0])
    write(fold / "b_small.mhd", np.full((100, 200, 280), -1000, np.int16))  # y = 200 < 265
    write(fold / "c_trunc.mhd", good[0])
    _truncate(fold / "c_trunc.raw")
    write(fold / "d_nan.mha", np.full((100, 280, 280), np.nan, np.float32))
    os.symlink(abdomen_dicom_path, fold / "e_dicom20")
    write(fold / "f_good.nii.gz", good[1])
    write(
        fold / "g_tissue.nrrd", np.zeros((100, 280, 280), np.int16)
    )  # all windows fail the air test
    return data, good


def test_cli_end_to_end_workers_give_identical_bytes(mixed_fold, tmp_path):
    data, good = mixed_fold
    outputs = []
    for workers in (1, 2):
        save = tmp_path / f"out{workers}"
        proc = run_cli(
            "--fold", 3, "--scale", 4, "--data", data, "--save", save, "--workers", workers
        )
        assert proc.returncode == 0, proc.stderr
        assert sorted(os.listdir(save)) == ["bat_4_s_64x64x32_3.npy"]  # no temp file left
        outputs.append((save / "bat_4_s_64x64x32_3.npy").read_bytes())
        out = proc.stdout
        assert "fold 3: 7 volumes, 2 used, 5 gave no cube; 8 cubes written" in out
        assert (
            f"no cube from {data}/subset3/b_small.mhd: too small for the borders: "
            "expected x >= 265 and y >= 265" in out
        )
        assert "c_trunc.mhd: cannot read: data file c_trunc.raw holds" in out
        assert "d_nan.mha: Expected finite HU values" in out
        assert "e_dicom20: too few slices: expected z >= 96" in out and "Received: z=20" in out
        assert "g_tissue.nrrd: gave no cube: all 200 windows failed the air test" in out
        # Problems are also warned about on stderr as they happen.
        assert (
            "warning: skipping" in proc.stderr
            and "b_small.mhd" in proc.stderr
            and "c_trunc.mhd" in proc.stderr
        )
        assert "7/7" in proc.stderr and "volume" in proc.stderr  # the tqdm bar over volumes
    assert outputs[0] == outputs[1]
    saved = np.load(tmp_path / "out1" / "bat_4_s_64x64x32_3.npy")
    assert saved.dtype == np.float32 and saved.shape == (8, 64, 64, 32)
    assert np.array_equal(saved, expected_fold_cubes(good, scale=4).astype(np.float32))


def test_float64_output_equals_reference_and_seed_changes_it(mixed_fold, tmp_path, capsys):
    data, good = mixed_fold
    save = tmp_path / "out"
    assert (
        ig.main(
            [
                "--fold",
                "3",
                "--scale",
                "2",
                "--data",
                str(data),
                "--save",
                str(save),
                "--dtype",
                "float64",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    saved = np.load(save / "bat_2_s_64x64x32_3.npy")
    assert saved.dtype == np.float64
    assert np.array_equal(saved, expected_fold_cubes(good, scale=2))
    assert (
        ig.main(
            [
                "--fold",
                "3",
                "--scale",
                "2",
                "--data",
                str(data),
                "--save",
                str(save),
                "--dtype",
                "float64",
                "--seed",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    other = np.load(save / "bat_2_s_64x64x32_3.npy")
    assert np.array_equal(other, expected_fold_cubes(good, scale=2, seed=5))
    assert not np.array_equal(other, saved)


def test_skipped_volume_draws_no_random_numbers(tmp_path):
    """A too-small volume between two good ones leaves the output unchanged."""
    good = [lung_like_volume(3), lung_like_volume(4)]
    runs = {}
    for name, with_bad in (("plain", False), ("with_bad", True)):
        fold = tmp_path / name / "subset0"
        write(fold / "a.mhd", good[0])
        if with_bad:
            write(fold / "b.mhd", np.full((100, 100, 300), -1000, np.int16))  # x too small
            write(fold / "bb.mhd", np.full((40, 300, 300), -1000, np.int16))  # too few slices
        write(fold / "c.mhd", good[1])
        result = ig.extract_fold(
            ig.list_volumes(str(fold)),
            ig.setup_config(scale=3),
            random.Random(1),
            workers=0,
            progress=False,
            warn=lambda m: None,
        )
        runs[name] = np.concatenate(result.cubes)
    assert np.array_equal(runs["plain"], runs["with_bad"])


# --- failures: nothing usable -------------------------------------------------------------------


def test_missing_data_folder(tmp_path, capsys):
    assert (
        ig.main(["--fold", "0", "--data", str(tmp_path / "nope"), "--save", str(tmp_path / "s")])
        == 1
    )
    err = capsys.readouterr().err
    assert "Expected --data to be a LUNA16 root folder" in err and "nope" in err
    assert not (tmp_path / "s").exists()


def test_missing_fold_folder(tmp_path, capsys):
    (tmp_path / "subset0").mkdir()
    assert ig.main(["--fold", "4", "--data", str(tmp_path), "--save", str(tmp_path / "s")]) == 1
    assert "subset4" in capsys.readouterr().err


def test_fold_without_volumes(tmp_path, capsys):
    (tmp_path / "subset0").mkdir()
    (tmp_path / "subset0" / "readme.txt").write_text("x")
    assert ig.main(["--fold", "0", "--data", str(tmp_path), "--save", str(tmp_path / "s")]) == 1
    assert "no volume in" in capsys.readouterr().err


def test_fold_with_only_bad_volumes_writes_nothing(tmp_path):
    fold = tmp_path / "data" / "subset0"
    fold.mkdir(parents=True)
    (fold / "broken.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 300 300 100\n"
        "ElementType = MET_SHORT\nElementDataFile = broken.raw\n"
    )
    write(fold / "tiny.nii.gz", np.full((100, 10, 10), -1000, np.int16))
    save = tmp_path / "save"
    save.mkdir()
    proc = run_cli("--fold", 0, "--data", tmp_path / "data", "--save", save)
    assert proc.returncode == 1
    assert "broken.mhd: cannot read: data file broken.raw not found" in proc.stdout
    assert "tiny.nii.gz: too small for the borders" in proc.stdout
    assert "nothing written" in proc.stderr
    assert os.listdir(save) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fold", "10"], "invalid choice"),
        (["--scale", "4"], "required: --fold"),
        (["--fold", "0", "--scale", "0"], "Expected a positive integer. Received: 0"),
        (["--fold", "0", "--workers", "-1"], "Expected an integer >= 0. Received: -1"),
        (["--fold", "0", "--dtype", "float16"], "invalid choice"),
    ],
)
def test_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        ig.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_shows_example(capsys):
    with pytest.raises(SystemExit):
        ig.main(["--help"])
    out = capsys.readouterr().out
    assert "python infinite_generator_3D.py --fold 0 --scale 32 --data" in out
    for flag in [
        "--fold",
        "--scale",
        "--data",
        "--save",
        "--input_rows",
        "--input_cols",
        "--input_deps",
        "--crop_rows",
        "--crop_cols",
        "--seed",
        "--workers",
        "--dtype",
    ]:
        assert flag in out


# --- atomic output --------------------------------------------------------------------------------


def test_save_is_atomic_on_error_and_interrupt(tmp_path, monkeypatch):
    target = tmp_path / "bat.npy"
    good = [np.zeros((2, 4, 4, 2)), np.ones((1, 4, 4, 2))]
    with pytest.raises(ValueError):  # second block has the wrong shape: fails mid-write
        ig.save_cubes_atomically([good[0], np.ones((1, 5, 4, 2))], str(target), np.float32)
    assert os.listdir(tmp_path) == []

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(ig.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ig.save_cubes_atomically(good, str(target), np.float32)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    shape = ig.save_cubes_atomically(good, str(target), np.float32)
    assert shape == (3, 4, 4, 2) and os.listdir(tmp_path) == ["bat.npy"]
    assert np.array_equal(np.load(target), np.concatenate(good).astype(np.float32))
    assert (target.stat().st_mode & 0o777) != 0o600  # not mkstemp's private mode


def test_interrupt_during_extraction_writes_nothing(mixed_fold, tmp_path, monkeypatch, capsys):
    data, _ = mixed_fold

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ig, "infinite_generator_from_one_volume", interrupt)
    save = tmp_path / "save"
    assert (
        ig.main(["--fold", "3", "--data", str(data), "--save", str(save), "--no-progress"]) == 130
    )
    assert "interrupted" in capsys.readouterr().err
    assert not save.exists() or os.listdir(save) == []


# --- demo volumes ---------------------------------------------------------------------------------


def test_demo_volumes_are_luna16_like_and_give_cubes(tmp_path):
    out = tmp_path / "luna16"
    cmd = [
        sys.executable,
        str(ROOT / "datasets" / "make_demo_volumes.py"),
        "--out",
        str(out),
        "--subsets",
        "2",
        "--per-subset",
        "1",
        "--size",
        "384",
        "384",
        "96",
        "--seed",
        "3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(out / "subset2"))
    assert len(names) == 2 and names[0].endswith(".mhd") and names[1].endswith(".raw")
    assert names[0].startswith("2.25.")
    image = sitk.ReadImage(str(out / "subset2" / names[0]))
    assert image.GetSize() == (384, 384, 96)
    assert image.GetPixelID() == sitk.sitkInt16
    assert image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    hu = sitk.GetArrayFromImage(image)
    assert hu.min() >= -1024 and hu.max() > 300  # air and bone
    centre = hu[48, 100:284, 100:284]
    assert np.mean(centre < -500) > 0.5  # lungs where windows can be drawn
    cubes = ig.infinite_generator_from_one_volume(
        ig.setup_config(scale=4), hu.transpose(2, 1, 0), random.Random(1)
    )
    assert cubes is not None and len(cubes) == 4
    # Same arguments, same bytes; an existing --out is refused.
    proc2 = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc2.returncode == 1 and "exists" in proc2.stderr
    out2 = tmp_path / "again"
    subprocess.run(cmd[:3] + [str(out2)] + cmd[4:], check=True, capture_output=True, timeout=120)
    assert (out2 / "subset2" / names[1]).read_bytes() == (out / "subset2" / names[1]).read_bytes()


def test_unwritable_save_folder_is_an_error_not_a_traceback(mixed_fold, tmp_path, capsys):
    data, _ = mixed_fold
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        ig.main(["--fold", "3", "--data", str(data), "--save", str(blocker), "--no-progress"]) == 1
    )
    assert "Expected --save to be a folder" in capsys.readouterr().err
    # A --save below a file cannot be created: found before any volume is read.
    assert (
        ig.main(
            [
                "--fold",
                "3",
                "--scale",
                "1",
                "--data",
                str(data),
                "--save",
                str(blocker / "sub"),
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "Expected --save to be a folder" in err and "is a file" in err


# --- the real chest CT through the command line ---------------------------------------------------


def test_cli_on_real_ct_writes_the_original_cubes(chest_ct_path, tmp_path):
    """A fold holding one volume: the file holds exactly the reference's cubes (float64), any
    --workers."""
    fold = tmp_path / "data" / "subset5"
    fold.mkdir(parents=True)
    os.symlink(chest_ct_path, fold / chest_ct_path.name)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(chest_ct_path))).transpose(2, 1, 0)
    expected = ref.reference_cubes(
        ig.setup_config(scale=5), volume, random.Random(2), air_test="argmax"
    )
    assert expected.shape == (5, 64, 64, 32)
    for workers in (0, 3):
        save = tmp_path / f"out{workers}"
        proc = run_cli(
            "--fold",
            5,
            "--scale",
            5,
            "--seed",
            2,
            "--dtype",
            "float64",
            "--workers",
            workers,
            "--data",
            tmp_path / "data",
            "--save",
            save,
        )
        assert proc.returncode == 0, proc.stderr
        assert os.listdir(save) == ["bat_5_s_64x64x32_5.npy"]
        assert np.array_equal(np.load(save / "bat_5_s_64x64x32_5.npy"), expected)
        assert "fold 5: 1 volumes, 1 used, 0 gave no cube; 5 cubes written" in proc.stdout


# --- start-up path and signals --------------------------------------------------------------------


def test_import_and_run_load_no_heavy_module(tmp_path):
    """Importing the module loads NumPy only; a whole run never loads Keras, TensorFlow or
    scikit-image."""
    fold = tmp_path / "data" / "subset0"
    write(fold / "a.mhd", lung_like_volume(5))
    code = f"""
import sys
import infinite_generator_3D as ig
heavy = ("SimpleITK", "skimage", "scipy", "tqdm", "keras", "tensorflow", "jax", "torch")
print(sorted(m for m in heavy if m in sys.modules))
status = ig.main(["--fold", "0", "--scale", "2", "--data", {str(tmp_path / "data")!r}, \
"--save", {str(tmp_path / "s")!r}])
print(status, sorted(m for m in heavy if m in sys.modules))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "[]"
    assert lines[-1] == "0 ['SimpleITK', 'tqdm']"


def test_sigterm_while_saving_leaves_no_file(tmp_path):
    """kill (SIGTERM) during the write unwinds like Ctrl-C: exit 143, no temporary or partial
    file."""
    fold = tmp_path / "data" / "subset0"
    write(fold / "a.mhd", lung_like_volume(6))
    save = tmp_path / "save"
    code = f"""
import os, signal, sys, time
import numpy as np
import infinite_generator_3D as ig
real = np.lib.format.open_memmap
def open_then_killed(*args, **kwargs):
    out = real(*args, **kwargs)
    assert any(n.startswith(".tmp-") for n in os.listdir({str(save)!r}))\
  # the temporary file exists now
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    return out
np.lib.format.open_memmap = open_then_killed
sys.exit(ig.main(["--fold", "0", "--scale", "2", "--no-progress", \
"--data", {str(tmp_path / "data")!r},
                  "--save", {str(save)!r}]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 143, proc.stderr
    assert os.listdir(save) == []
