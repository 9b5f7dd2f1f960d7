"""Pre-training on cube files named by paths and globs, and the split by source volume."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from config import models_genesis_config
from genesis_dataset import GenesisPairDataset
from genesis_trainer import (
    PretrainingInputError,
    SubsetPairDataset,
    make_datasets,
    prepare,
    resolve_cube_files,
    split_by_source,
)
from pretraining_helpers import TINY, run_cli, tiny_config


def write_file(path, sources, seed=0, shape=(16, 16, 16), csv_file=True):
    """A cube file with one cube per entry of `sources`, and its CSV (source,x,y,z)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(path, rng.random((len(sources),) + shape).astype(np.float32))
    if csv_file:
        with open(os.path.splitext(path)[0] + ".csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source", "x", "y", "z"])
            for k, s in enumerate(sources):
                writer.writerow([s, k, 0, 0])
    return str(path)


def test_globs_are_sorted_deduplicated_and_absolute(tmp_path, monkeypatch):
    for name in ("b.npy", "a.npy", "sub/c.npy"):
        write_file(str(tmp_path / name), ["v"], csv_file=False)
    (tmp_path / "notes.txt").write_text("not matched by *.npy")
    monkeypatch.chdir(tmp_path)
    got = resolve_cube_files(["*.npy", "a.npy", "**/c.npy"], "training")
    assert got == [str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), str(tmp_path / "sub/c.npy")]
    with pytest.raises(PretrainingInputError, match=r"training pattern 'x\*.npy' to match"):
        resolve_cube_files(["*.npy", "x*.npy"], "training")
    with pytest.raises(PretrainingInputError, match="validation cube file at 'gone.npy'"):
        resolve_cube_files(["gone.npy"], "validation")


def test_prepare_reads_train_and_valid_files(tmp_path):
    write_file(str(tmp_path / "c" / "t1.npy"), ["a"] * 3)
    write_file(str(tmp_path / "c" / "t2.npy"), ["b"] * 4)
    write_file(str(tmp_path / "c" / "v.npy"), ["c"] * 2)
    config = tiny_config(
        tmp_path,
        data=str(tmp_path / "no-such-folder"),  # the folds' folder is not looked at
        train_files=[str(tmp_path / "c" / "t*.npy")],
        valid_files=[str(tmp_path / "c" / "v.npy")],
    )
    plan = prepare(config)
    assert plan.train_files == [str(tmp_path / "c" / "t1.npy"), str(tmp_path / "c" / "t2.npy")]
    assert (plan.n_train, plan.n_valid, plan.steps, plan.val_steps) == (7, 2, 3, 1)
    assert plan.train_indices is None and plan.valid_indices is None


def test_too_few_cubes_in_files_says_files(tmp_path):
    write_file(str(tmp_path / "t.npy"), ["a"] * 3)
    write_file(str(tmp_path / "v.npy"), ["c"])
    config = tiny_config(
        tmp_path, train_files=[str(tmp_path / "t.npy")], valid_files=[str(tmp_path / "v.npy")]
    )
    with pytest.raises(ValueError, match="Received: 1 cubes in the validation files"):
        prepare(config)


def test_wrong_cube_size_in_a_listed_file_names_it(tmp_path):
    write_file(str(tmp_path / "t.npy"), ["a"] * 3, shape=(8, 8, 8))
    config = tiny_config(
        tmp_path, train_files=[str(tmp_path / "t.npy")], valid_files=[str(tmp_path / "t.npy")]
    )
    with pytest.raises(ValueError, match=r"t.npy.*Received: shape=\(3, 8, 8, 8\)"):
        prepare(config)


def test_split_by_source_keeps_each_volume_on_one_side(tmp_path):
    # Five sources over two files; "c" appears in both.
    f1 = write_file(str(tmp_path / "1.npy"), ["a", "a", "b", "c", "c", "c"])
    f2 = write_file(str(tmp_path / "2.npy"), ["c", "d", "d", "e"])
    sources = ["a", "a", "b", "c", "c", "c", "c", "d", "d", "e"]
    splits = set()
    for seed in range(8):
        train, valid, n_train_src, n_valid_src = split_by_source([f1, f2], 0.4, seed)
        assert (n_train_src, n_valid_src) == (3, 2)  # round(0.4 * 5) = 2 sources validate
        assert sorted(np.concatenate([train, valid]).tolist()) == list(range(10))
        valid_sources = {sources[k] for k in valid}
        assert len(valid_sources) == 2
        assert not valid_sources & {sources[k] for k in train}
        again = split_by_source([f1, f2], 0.4, seed)
        assert np.array_equal(again[0], train) and np.array_equal(again[1], valid)
        splits.add(tuple(sorted(valid_sources)))
    assert len(splits) > 1  # the seed chooses


def test_split_by_source_extremes_and_errors(tmp_path):
    f = write_file(str(tmp_path / "1.npy"), ["a", "b", "b"])
    train, valid, _, n_valid = split_by_source([f], 0.01, 0)
    assert n_valid == 1 and len(train) and len(valid)  # at least one source on each side
    _, _, n_train, _ = split_by_source([f], 0.99, 0)
    assert n_train == 1
    one = write_file(str(tmp_path / "one.npy"), ["a", "a"])
    with pytest.raises(ValueError, match="at least 2 source volumes"):
        split_by_source([one], 0.5, 0)
    bare = write_file(str(tmp_path / "bare.npy"), ["a", "b"], csv_file=False)
    with pytest.raises(PretrainingInputError, match=r"bare.csv beside .*bare.npy"):
        split_by_source([bare], 0.5, 0)
    short = write_file(str(tmp_path / "short.npy"), ["a", "b"])
    np.save(short, np.zeros((3, 16, 16, 16), np.float32))
    with pytest.raises(ValueError, match="one row per cube .*3 cubes.*Received: 2 rows"):
        split_by_source([short], 0.5, 0)


def test_prepare_with_valid_fraction(tmp_path, capsys):
    f = write_file(str(tmp_path / "all.npy"), ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4)
    config = tiny_config(tmp_path, train_files=[f], valid_fraction=0.25, seed=3)
    plan = prepare(config)
    assert plan.train_files == plan.valid_files == [f]
    assert (plan.n_train, plan.n_valid) == (12, 4)
    blocks = [list(range(4 * b, 4 * b + 4)) for b in range(4)]  # one source each
    assert plan.valid_indices.tolist() in blocks
    assert sorted(plan.train_indices.tolist() + plan.valid_indices.tolist()) == list(range(16))
    assert "1 source volumes (4 cubes) validate, 3 (12 cubes) train" in capsys.readouterr().out
    train_ds, valid_ds = make_datasets(config, plan)
    assert isinstance(train_ds, SubsetPairDataset) and valid_ds.num_cubes == 4


def constant_cubes(path, n):
    """Cube k holds the value k / n everywhere: a batch's originals say which cubes it drew."""
    values = (np.arange(n, dtype=np.float32) / n)[:, None, None, None]
    np.save(path, np.broadcast_to(values, (n, 16, 16, 16)).copy())
    return str(path)


@pytest.mark.multibackend
def test_subset_dataset_draws_only_its_cubes_as_a_file_of_them(tmp_path):
    n = 12
    whole = constant_cubes(tmp_path / "whole.npy", n)
    chosen = np.array([1, 4, 5, 9, 11])
    alone = tmp_path / "alone.npy"
    np.save(alone, np.load(whole)[chosen])
    config = models_genesis_config(save_samples=None)
    subset = SubsetPairDataset([whole], 2, config, indices=chosen, seed=5, steps=4)
    plain = GenesisPairDataset([str(alone)], 2, config, seed=5, steps=4)
    allowed = set((chosen / n).astype(np.float32).tolist())
    for i in range(4):
        (xs, ys), (xp, yp) = subset[i], plain[i]
        assert np.array_equal(xs, xp) and np.array_equal(ys, yp)
        assert {float(y.flat[0]) for y in ys} <= allowed
    with pytest.raises(ValueError, match=r"distinct cube indices in \[0, 12\)"):
        SubsetPairDataset([whole], 2, config, indices=[1, 1, 3])
    with pytest.raises(ValueError, match="distinct cube indices"):
        SubsetPairDataset([whole], 2, config, indices=[12])
    with pytest.raises(ValueError, match="at most 2 cubes per batch"):
        SubsetPairDataset([whole], 3, config, indices=[0, 1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(train_files=["a.npy"]), "Expected valid_files or valid_fraction with train_files"),
        (dict(valid_fraction=1.0), r"valid_fraction in \(0, 1\)"),
        (dict(valid_fraction=0.0), r"valid_fraction in \(0, 1\)"),
        (dict(valid_files=["v.npy"], valid_fraction=0.2), "not both"),
        (dict(train_files="a.npy", valid_fraction=0.2), "list of paths or glob patterns"),
    ],
)
def test_config_checks_the_file_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models_genesis_config(**kwargs)


@pytest.mark.slow
def test_command_line_trains_on_a_glob_with_valid_fraction(tmp_path):
    for k in range(2):
        write_file(str(tmp_path / "cubes" / f"part{k}.npy"), [["a", "b"], ["c", "d"]][k] * 3)
    args = [
        *TINY,
        "--train_files",
        "cubes/part*.npy",
        "--valid_fraction",
        "0.25",
        "--nb_epoch",
        "1",
        "--model_path",
        "w",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 source volumes (3 cubes) validate, 3 (9 cubes) train" in proc.stdout
    assert os.path.isfile(tmp_path / "w" / "Vnet-genesis_chest_ct.h5")
    bad = run_cli([*TINY, "--train_files", "nothing*.npy", "--valid_fraction", "0.2"], tmp_path)
    assert bad.returncode == 2
    assert "training pattern 'nothing*.npy' to match cube files" in bad.stderr
