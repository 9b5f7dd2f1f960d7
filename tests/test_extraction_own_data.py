"""Extraction from your own data: --input/--output, presets, spacing, processes, CSV, preview."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA, require_shared
from PIL import Image

import extraction_reference as ref
import infinite_generator_3D as ig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infinite_generator_3D.py"
STS_IMAGES = SHARED_DATA / "sts_ct" / "imagesTr"


def write(path: Path, array_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(image, str(path))
    return path


def limb_volume(seed: int, shape_xyz=(96, 90, 44)) -> np.ndarray:
    """int16 HU, (z, y, x): a soft-tissue cylinder (with a bone) in air, like a CT of a limb."""
    gen = np.random.default_rng(seed)
    x, y, z = shape_xyz
    yy, xx = np.mgrid[0:y, 0:x]
    inside = (xx - x / 2) ** 2 + (yy - y / 2) ** 2 < (0.35 * min(x, y)) ** 2
    bone = (xx - x / 2) ** 2 + (yy - y / 2) ** 2 < (0.08 * min(x, y)) ** 2
    hu = gen.normal(-1000, 10, size=(z, y, x))
    hu[:, inside] = gen.normal(40, 20, size=(z, int(inside.sum())))
    hu[:, bone] = 900
    return np.rint(hu).astype(np.int16)


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_csv(path) -> list[tuple[str, int, int, int]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["source", "x", "y", "z"]
    return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows[1:]]


def window_by_hand(volume_xyz, pos, size, hu_min, hu_max):
    """The cube at a CSV position: clip and scale the raw voxels, written out plainly."""
    x, y, z = pos
    r, c, d = size
    raw = volume_xyz[x : x + r, y : y + c, z : z + d].astype(np.float64)
    return (np.clip(raw, hu_min, hu_max) - hu_min) / (hu_max - hu_min)


def reference_foreground(config, volume_xyz, rng, hu_min, hu_max):
    """The foreground sampler, voxel by voxel: the draws of the original, a plain count test."""
    X, Y, Z = volume_xyz.shape
    r, c, d, depth = config.input_rows, config.input_cols, config.input_deps, config.len_depth
    b, bz = config.len_border, config.len_border_z
    cubes, where = [], []
    attempts = 0
    while len(cubes) < config.scale:
        attempts += 1
        if attempts > 50 * config.scale:
            break
        sx = rng.randint(b, X - r - 1 - b)
        sy = rng.randint(b, Y - c - 1 - b)
        sz = rng.randint(bz, Z - d - depth - 1 - bz)
        cube = window_by_hand(volume_xyz, (sx, sy, sz), (r, c, d), hu_min, hu_max)
        count = 0
        for value in cube.ravel().tolist():
            if value >= config.foreground_threshold:
                count += 1
        if count / (r * c * d) >= config.foreground_fraction:
            cubes.append(cube)
            where.append((sx, sy, sz))
    return (np.stack(cubes) if cubes else None), where


# --- presets ----------------------------------------------------------------------------------


def test_ct_chest_preset_is_the_original_config():
    a, b = ig.setup_config(scale=7), ig.config_from_preset("ct-chest", scale=7)
    for name in ("hu_min", "hu_max", "len_border", "len_border_z", "lung_max", "len_depth"):
        assert getattr(a, name) == getattr(b, name)
    assert b.HU_thred == a.HU_thred == (-150.0 + 1000.0) / 2000.0
    assert b.test == "air"


def test_preset_values_can_be_overridden_one_by_one():
    config = ig.config_from_preset("ct", len_border=5, hu_min=-200.0, foreground_fraction=0.9)
    assert (config.len_border, config.len_border_z) == (5, 0)
    assert (config.hu_min, config.hu_max) == (-200.0, 1000.0)
    assert config.foreground_fraction == 0.9 and config.test == "foreground"
    with pytest.raises(ValueError, match="Expected preset in"):
        ig.config_from_preset("pet")
    with pytest.raises(ValueError, match="Expected hu_max > hu_min"):
        ig.config_from_preset("ct", hu_min=10.0, hu_max=0.0)


@pytest.mark.parametrize("seed", [0, 3])
def test_ct_preset_matches_a_plain_reference_and_keeps_body_cubes(seed):
    vol = limb_volume(seed).transpose(2, 1, 0)  # (x, y, z)
    config = ig.config_from_preset("ct", scale=6)
    where: list = []
    got = ig.infinite_generator_from_one_volume(config, vol, random.Random(seed), positions=where)
    want, want_where = reference_foreground(config, vol, random.Random(seed), -1000.0, 1000.0)
    assert got is not None and len(got) == 6
    assert where == want_where
    assert np.array_equal(got, want)
    body = (vol >= -500).mean()
    assert body < 0.5  # the volume is mostly air, but no cube is
    for cube in got:
        assert (cube >= 0.25).mean() >= 0.5


def test_foreground_test_rejects_every_window_of_air():
    air = np.full((80, 80, 40), -1000, dtype=np.int16)
    config = ig.config_from_preset("ct", scale=3)
    rng = random.Random(1)
    assert ig.infinite_generator_from_one_volume(config, air, rng) is None
    # 50 * scale attempts, three draws each, were made.
    replay = random.Random(1)
    for _ in range(50 * 3):
        replay.randint(0, 80 - 64 - 1)
        replay.randint(0, 80 - 64 - 1)
        replay.randint(0, 40 - 32 - 3 - 1)
    assert rng.getstate() == replay.getstate()


def test_mri_preset_fixed_window_and_percentiles():
    gen = np.random.default_rng(5)
    vol = np.zeros((90, 90, 40), dtype=np.float32)
    vol[10:80, 10:80, :] = gen.uniform(300, 900, size=(70, 70, 40))
    config = ig.config_from_preset("mri", scale=4)
    where: list = []
    got = ig.infinite_generator_from_one_volume(config, vol, random.Random(2), positions=where)
    assert got is not None and len(got) == 4
    for cube, pos in zip(got, where, strict=True):
        assert np.array_equal(cube, window_by_hand(vol, pos, (64, 64, 32), 0.0, 4000.0))
        assert (cube >= 0.02).mean() >= 0.5

    config = ig.config_from_preset("mri", scale=4, percentiles=(1.0, 99.0))
    low, high = np.percentile(vol, [1.0, 99.0])
    where = []
    got = ig.infinite_generator_from_one_volume(config, vol, random.Random(2), positions=where)
    for cube, pos in zip(got, where, strict=True):
        np.testing.assert_allclose(
            cube, window_by_hand(vol, pos, (64, 64, 32), low, high), rtol=0, atol=1e-12
        )
    assert got.max() == 1.0  # values above the 99th percentile are clipped


def test_percentiles_of_a_constant_volume_are_a_clear_skip(tmp_path):
    write(tmp_path / "in" / "flat.nii.gz", np.full((40, 70, 70), 7, dtype=np.int16))
    write(tmp_path / "in" / "limb.nii.gz", limb_volume(0))
    out = tmp_path / "out" / "c.npy"
    proc = run_cli(
        "--input", tmp_path / "in", "--output", out, "--preset", "mri",
        "--percentiles", 1, 99, "--scale", 2, "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "flat.nii.gz: Expected percentiles (1.0, 99.0) of the voxels to differ" in proc.stderr


def test_border_larger_than_volume_is_said_per_volume(tmp_path):
    write(tmp_path / "in" / "a.nii.gz", limb_volume(0, shape_xyz=(96, 90, 100)))
    write(tmp_path / "in" / "b.nii.gz", limb_volume(1, shape_xyz=(70, 70, 40)))
    out = tmp_path / "out" / "c.npy"
    proc = run_cli("--input", tmp_path / "in", "--output", out, "--no-progress")  # ct-chest
    assert proc.returncode == 1
    assert (
        f"skipping {tmp_path / 'in' / 'a.nii.gz'}: too small for the borders: expected x >= 265"
        in proc.stderr
    )
    assert f"skipping {tmp_path / 'in' / 'b.nii.gz'}: too few slices" in proc.stderr
    assert "nothing written" in proc.stderr
    assert not out.parent.exists() or os.listdir(out.parent) == []
    # With borders of 10 the first fits; the second, 40 slices, has too few.
    proc = run_cli(
        "--input", tmp_path / "in", "--output", out, "--preset", "ct", "--border_xy", 10,
        "--border_z", 10, "--scale", 2, "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"skipping {tmp_path / 'in' / 'b.nii.gz'}: too few slices" in proc.stderr
    assert "2 cubes from" in proc.stdout and "0 cubes from" in proc.stdout


# --- the command line: --input, --output, CSV -----------------------------------------------


def test_input_output_and_csv_trace_every_cube(tmp_path):
    vols = [limb_volume(s) for s in range(3)]
    paths = [write(tmp_path / "in" / f"sub{s % 2}" / f"v{s}.nii.gz", v) for s, v in enumerate(vols)]
    out = tmp_path / "out" / "cubes.npy"
    proc = run_cli(
        "--input", tmp_path / "in", "--output", out, "--preset", "ct", "--scale", 5,
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out.parent)) == ["cubes.csv", "cubes.npy"]  # no temporary file
    cubes = np.load(out)
    rows = read_csv(out.parent / "cubes.csv")
    assert cubes.dtype == np.float32 and len(rows) == len(cubes) == 15
    # Recursive search, sorted by path: sub0/v0, sub0/v2, sub1/v1.
    order = [paths[0], paths[2], paths[1]]
    assert [r[0] for r in rows] == [str(p) for p in order for _ in range(5)]
    by_path = {str(p): v.transpose(2, 1, 0) for p, v in zip(paths, vols, strict=True)}
    for cube, (source, x, y, z) in zip(cubes, rows, strict=True):
        want = window_by_hand(by_path[source], (x, y, z), (64, 64, 32), -1000.0, 1000.0)
        assert np.array_equal(cube, want.astype(np.float32))


def test_input_ct_chest_single_stream_equals_the_fold_command(tmp_path):
    gen = np.random.default_rng(0)
    hu = gen.normal(-900, 40, size=(100, 270, 270))
    hu[gen.random(hu.shape) < 0.05] = 40
    write(tmp_path / "data" / "subset0" / "a.mha", np.rint(hu).astype(np.int16))
    fold = run_cli(
        "--fold", 0, "--data", tmp_path / "data", "--save", tmp_path / "s", "--scale", 3,
        "--no-progress",
    )  # fmt: skip
    own = run_cli(
        "--input", tmp_path / "data" / "subset0", "--output", tmp_path / "o" / "c.npy",
        "--scale", 3, "--no-progress",
    )  # fmt: skip
    assert fold.returncode == own.returncode == 0, fold.stderr + own.stderr
    a = np.load(tmp_path / "s" / "bat_3_s_64x64x32_0.npy")
    b = np.load(tmp_path / "o" / "c.npy")
    assert a.tobytes() == b.tobytes()
    # And the reference sampler agrees (the original's algorithm).
    config = ig.setup_config(scale=3)
    want = ref.reference_cubes(
        config, np.rint(hu).astype(np.int16).transpose(2, 1, 0), random.Random(1), "argmax"
    )
    assert np.array_equal(b, want.astype(np.float32))


def test_globs_files_and_duplicates(tmp_path):
    for s in range(3):
        write(tmp_path / "in" / f"v{s}.nii.gz", limb_volume(s))
    assert ig.expand_inputs([str(tmp_path / "in" / "v[12].nii.gz"), str(tmp_path / "in")]) == [
        str(tmp_path / "in" / "v1.nii.gz"),
        str(tmp_path / "in" / "v2.nii.gz"),
        str(tmp_path / "in" / "v0.nii.gz"),
    ]
    assert ig.expand_inputs([str(tmp_path / "**" / "v0.nii.gz")]) == [
        str(tmp_path / "in" / "v0.nii.gz")
    ]
    with pytest.raises(FileNotFoundError, match=r"pattern '.*\*\.mhd' to match.*no match"):
        ig.expand_inputs([str(tmp_path / "in" / "*.mhd")])
    with pytest.raises(FileNotFoundError, match="nope.nii.gz' to be a volume file"):
        ig.expand_inputs([str(tmp_path / "nope.nii.gz")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt' to be a .mhd"):
        ig.expand_inputs([str(tmp_path / "notes.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty' to hold .mhd"):
        ig.expand_inputs([str(tmp_path / "empty")])


def test_dicom_series_folders_are_found_recursively(tmp_path, abdomen_dicom_path):
    link = tmp_path / "collection" / "patient1" / "ct"
    link.parent.mkdir(parents=True)
    link.symlink_to(abdomen_dicom_path, target_is_directory=True)
    assert ig.expand_inputs([str(tmp_path / "collection")]) == [str(link)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scale", "4"], "required: --fold (or --input"),
        (["--input", "x.nii", "--fold", "0", "--output", "c.npy"], "not both"),
        (["--input", "x.nii"], "Expected --output FILE.npy with --input"),
        (["--input", "x.nii", "--output", "c.txt"], "Expected --output FILE.npy"),
        (["--fold", "0", "--output", "c.npy"], "Expected --output only with --input"),
        (["--input", "x", "--output", "c.npy", "--preview", "p.jpg"], "--preview FILE.png"),
        (["--input", "x", "--output", "c.npy", "--spacing", "1", "0", "1"], "each > 0"),
        (["--input", "x", "--output", "c.npy", "--foreground_fraction", "2"], "in [0, 1]"),
        (["--input", "x", "--output", "c.npy", "--preset", "pet"], "invalid choice"),
        (["--input", "x", "--output", "c.npy", "--hu_min", "5", "--hu_max", "1"], "hu_max >"),
        (["--input", "x", "--output", "c.npy", "--percentiles", "9", "1"], "LOW < HIGH"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        ig.main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_input_that_matches_nothing_fails_naming_it(tmp_path, capsys):
    code = ig.main(["--input", str(tmp_path / "*.nii.gz"), "--output", str(tmp_path / "c.npy")])
    assert code == 1
    err = capsys.readouterr().err
    assert f"pattern {str(tmp_path / '*.nii.gz')!r} to match" in err


def test_output_in_a_file_fails_before_reading(tmp_path, capsys):
    write(tmp_path / "in" / "v.nii.gz", limb_volume(0))
    (tmp_path / "f").write_text("x")
    code = ig.main(
        [
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "f" / "c.npy"),
            "--preset",
            "ct",
        ]
    )
    assert code == 1
    assert "is a file" in capsys.readouterr().err


def test_interrupt_leaves_neither_cubes_nor_csv(tmp_path, monkeypatch, capsys):
    write(tmp_path / "in" / "v.nii.gz", limb_volume(0))

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ig, "save_cubes_atomically", interrupt)
    out = tmp_path / "out" / "c.npy"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--preset", "ct"]
    assert ig.main([*args, "--scale", "2", "--no-progress"]) == 130
    assert os.listdir(out.parent) == []


# --- spacing ----------------------------------------------------------------------------------


def ramp(spacing, size_xyz, coef=(3.0, 2.0, 1.0)):
    """Values a*x + b*y + c*z of the physical position (mm) of each voxel, (z, y, x) order."""
    x, y, z = (np.arange(n) * s for n, s in zip(size_xyz, spacing, strict=True))
    a, b, c = coef
    return (a * x[None, None, :] + b * y[None, :, None] + c * z[:, None, None]).astype(np.float32)


def test_spacing_resamples_to_the_physical_grid(tmp_path):
    path = write(tmp_path / "v.nii.gz", ramp((2.0, 2.5, 4.0), (40, 32, 20)), (2.0, 2.5, 4.0))
    got = ig.read_volume(str(path), spacing=(1.0, 1.0, 1.0))
    assert got.shape == (80, 80, 80) and got.dtype == np.float32
    want = ramp((1.0, 1.0, 1.0), (80, 80, 80)).transpose(2, 1, 0)
    # Linear interpolation of a linear ramp is exact inside the old grid (up to 78, 77.5, 76 mm).
    inside = (slice(0, 79), slice(0, 78), slice(0, 77))
    np.testing.assert_allclose(got[inside], want[inside], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="three spacings > 0"):
        ig.resample_image(sitk.ReadImage(str(path)), (1.0, 0.0, 1.0))


def test_spacing_gives_windows_of_the_expected_physical_size(tmp_path):
    # 0.5 x 0.5 x 2 mm voxels resampled to 1 mm: a 64x64x32 cube spans 64 x 64 x 32 mm.
    spacing, size = (0.5, 0.5, 2.0), (200, 200, 30)
    write(tmp_path / "in" / "v.nii.gz", ramp(spacing, size, (5.0, 3.0, 1.0)), spacing)
    out = tmp_path / "o" / "c.npy"
    proc = run_cli(
        "--input", tmp_path / "in", "--output", out, "--spacing", 1, 1, 1, "--preset", "mri",
        "--hu_min", 0, "--hu_max", 2000, "--foreground_threshold", 0, "--scale", 3,
        "--dtype", "float64", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cubes = np.load(out)
    for cube, (_, x, y, z) in zip(cubes, read_csv(tmp_path / "o" / "c.csv"), strict=True):
        # Position in mm = index in the 1 mm grid; values 5 per mm in x, 3 in y, 1 in z.
        assert x + 63 <= 99 and y + 63 <= 99 and z + 31 <= 58  # drawn inside the resampled grid
        span = np.array([cube[63, 0, 0] - cube[0, 0, 0], cube[0, 63, 0] - cube[0, 0, 0]])
        np.testing.assert_allclose(span * 2000, [5 * 63, 3 * 63], atol=1e-2)
        np.testing.assert_allclose((cube[0, 0, 31] - cube[0, 0, 0]) * 2000, 31, atol=1e-2)
        np.testing.assert_allclose(cube[0, 0, 0] * 2000, 5 * x + 3 * y + z, atol=1e-2)


# --- processes --------------------------------------------------------------------------------


def test_processes_1_and_2_give_identical_bytes(tmp_path):
    for s in range(3):
        write(tmp_path / "in" / f"v{s}.nii.gz", limb_volume(s))
    outs = []
    for n in (1, 2):
        out = tmp_path / f"p{n}" / "c.npy"
        proc = run_cli(
            "--input", tmp_path / "in", "--output", out, "--preset", "ct", "--scale", 4,
            "--processes", n, "--seed", 7, "--no-progress",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs.append((out.read_bytes(), (out.parent / "c.csv").read_bytes()))
    assert outs[0] == outs[1]
    # Each volume drew from SeedSequence(7) child i, whatever the process: replay in-process.
    cubes = np.load(tmp_path / "p1" / "c.npy")
    config = ig.config_from_preset("ct", scale=4)
    children = np.random.SeedSequence(7).spawn(3)
    for i in range(3):
        vol = ig.read_volume(str(tmp_path / "in" / f"v{i}.nii.gz"))
        rng = ig.GeneratorRandint(np.random.default_rng(children[i]))
        want = ig.infinite_generator_from_one_volume(config, vol, rng)
        assert np.array_equal(cubes[4 * i : 4 * i + 4], want.astype(np.float32))


def test_volume_generator_is_the_spawned_child():
    for index in (0, 5):
        a = ig.volume_generator(3, index)
        b = np.random.default_rng(np.random.SeedSequence(3).spawn(6)[index])
        draws = [a.randint(0, 100) for _ in range(20)]
        assert draws == [int(v) for v in b.integers(0, 101, size=20)]
    assert all(0 <= ig.GeneratorRandint(np.random.default_rng(0)).randint(2, 4) <= 4 for _ in "ab")


# --- preview ----------------------------------------------------------------------------------


def test_preview_shows_mid_slices_of_each_source(tmp_path):
    gen = np.random.default_rng(0)
    cubes = [gen.random((2, 64, 64, 32)), gen.random((3, 64, 64, 32))]
    path = tmp_path / "p.png"
    width, height = ig.write_preview(str(path), ["a/x.nii.gz", "b/y.nii.gz"], cubes)
    picture = np.asarray(Image.open(path))
    assert picture.shape == (height, width)
    # Row 1, cube 2 (k=1): axial mid slice at label + (64 + 32 + 4 + 4) and top 4 + 64 + 4.
    top, left = 4 + 68, 160 + 104
    want = np.clip(np.rint(cubes[1][1][:, :, 16] * 255), 0, 255).astype(np.uint8).T
    assert np.array_equal(picture[top : top + 64, left : left + 64], want)
    across = np.clip(np.rint(cubes[1][1][:, 32, :] * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(picture[top : top + 64, left + 68 : left + 100], across)
    with pytest.raises(ValueError, match="at least one cube"):
        ig.write_preview(str(tmp_path / "q.png"), [], [])


def test_preview_flag_writes_a_png(tmp_path):
    write(tmp_path / "in" / "v.nii.gz", limb_volume(0))
    out = tmp_path / "o" / "c.npy"
    proc = run_cli(
        "--input", tmp_path / "in", "--output", out, "--preset", "ct", "--scale", 2,
        "--preview", tmp_path / "o" / "p.png", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out.parent)) == ["c.csv", "c.npy", "p.png"]
    assert Image.open(tmp_path / "o" / "p.png").size == (160 + 4 * 104, 4 + 68)


# --- the real CTs -----------------------------------------------------------------------------


@pytest.fixture
def sts_images() -> list[Path]:
    return sorted(require_shared(STS_IMAGES).glob("*.nii.gz"))


def test_real_sts_ct_ct_preset_gives_body_cubes(sts_images, tmp_path):
    chosen = sts_images[:3]
    out = tmp_path / "c.npy"
    proc = run_cli(
        "--input", *chosen, "--output", out, "--preset", "ct", "--scale", 8, "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cubes = np.load(out)
    rows = read_csv(tmp_path / "c.csv")
    assert len(cubes) == len(rows) == 24
    for path in chosen:
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
        mine = [(c, r) for c, r in zip(cubes, rows, strict=True) if r[0] == str(path)]
        assert len(mine) == 8
        for cube, (_, x, y, z) in mine:
            want = window_by_hand(raw, (x, y, z), (64, 64, 32), -1000.0, 1000.0)
            assert np.array_equal(cube, want.astype(np.float32))
            assert (want >= 0.25).mean() >= 0.5  # mostly inside the body (-500 HU and above)


def test_real_sts_ct_are_too_small_for_the_chest_preset(sts_images, tmp_path):
    chosen = sts_images[:2]
    # Without the 30-slice z border, the 100-voxel border alone is too large in-plane.
    proc = run_cli(
        "--input", *chosen, "--output", tmp_path / "c.npy", "--border_z", 0, "--no-progress"
    )  # fmt: skip
    assert proc.returncode == 1
    for path in chosen:
        assert f"skipping {path}: too small for the borders: expected x >= 265" in proc.stderr


def test_real_sts_ct_mri_preset_with_percentiles(sts_images, tmp_path):
    # The per-volume window path on a real volume: each cube is its window scaled by that
    # volume's own 0.5 and 99.5 percentiles, computed here with NumPy.
    path = sts_images[0]
    out = tmp_path / "c.npy"
    proc = run_cli(
        "--input", path, "--output", out, "--preset", "mri", "--percentiles", 0.5, 99.5,
        "--scale", 4, "--dtype", "float64", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    low, high = np.percentile(raw, [0.5, 99.5])
    cubes = np.load(out)
    rows = read_csv(tmp_path / "c.csv")
    assert len(cubes) == len(rows) == 4
    for cube, (_, x, y, z) in zip(cubes, rows, strict=True):
        want = window_by_hand(raw, (x, y, z), (64, 64, 32), low, high)
        np.testing.assert_allclose(cube, want, rtol=0, atol=1e-12)
        assert (want >= 0.02).mean() >= 0.5
