"""Tests of keras/preview_transforms.py, the picture of the transforms (and its old entry point,
`python keras/transforms.py`, which forwards to it)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import preview_transforms as P

ROOT = Path(__file__).resolve().parents[1]


def ct_like(shape=(64, 64, 32), seed=0):
    """Integer-HU-like values (few distinct values, smooth), as real CT cubes have."""
    rng = np.random.default_rng(seed)
    hu = np.round(np.cumsum(rng.normal(0, 40, (1,) + shape), axis=3)).clip(-1000, 1000)
    return ((hu + 1000) / 2000).astype(np.float32)


def test_preview_cli(tmp_path, capsys):
    from PIL import Image

    cubes = np.stack([ct_like((32, 32, 16), seed=s)[0] for s in range(4)])
    np.save(tmp_path / "c.npy", cubes)
    out = tmp_path / "p.png"
    assert P.main(["--cubes", str(tmp_path / "c.npy"), "--out", str(out), "--n", "2"]) == 0
    im = Image.open(out)
    assert im.size == (6 * 34 * 2, 2 * 34 * 2 + 14)
    assert P.main(["--cubes", str(tmp_path / "missing.npy"), "--out", str(out)]) == 2
    assert "Expected a .npy file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        P.main(["--help"])
    assert "example: python keras/preview_transforms.py --cubes" in capsys.readouterr().out


def test_transforms_script_forwards_to_preview(tmp_path):
    cubes = np.stack([ct_like((32, 32, 16), seed=s)[0] for s in range(4)])
    np.save(tmp_path / "c.npy", cubes)
    args = ["--cubes", str(tmp_path / "c.npy"), "--n", "3", "--seed", "1"]
    assert P.main(args + ["--out", str(tmp_path / "direct.png")]) == 0
    for script in ("keras/transforms.py", "keras/preview_transforms.py"):
        out = tmp_path / "sub" / (Path(script).stem + ".png")  # the folder is created
        run = subprocess.run(
            [sys.executable, script, *args, "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"wrote {out} (")
        assert out.read_bytes() == (tmp_path / "direct.png").read_bytes()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "preview_transforms.png",
        "transforms.png",
    ]  # no temporary file left behind


def test_preview_bad_n_and_bad_values(tmp_path, capsys):
    bad = np.full((2, 16, 16, 12), 1.5, np.float32)
    np.save(tmp_path / "bad.npy", bad)
    assert P.main(["--cubes", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "p.png")]) == 2
    assert "max=1.5" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(SystemExit):
        P.main(["--cubes", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "p.png"), "--n", "0"])
    assert "Expected --n >= 1" in capsys.readouterr().err
