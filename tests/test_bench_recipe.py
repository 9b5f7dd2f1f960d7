"""The recipe benchmark's folds and paired comparisons, on made-up scores."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, require_shared

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_recipe")
    finally:
        sys.path.remove(str(BENCH))


def _result(arm: str, fold: int, raw: dict, largest: dict | None = None) -> dict:
    dice = {"tta_off/raw": raw}
    if largest is not None:
        dice["tta_off/largest"] = largest
    return {"arm": arm, "fold": fold, "dice": dice}


def test_folds_cover_every_case_once(bench):
    cases = [f"c{i:02d}" for i in range(11)]
    folds = bench.folds_of(cases, 3, seed=4)
    assert sorted(c for f in folds for c in f) == cases
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    assert folds == bench.folds_of(cases, 3, seed=4)


def test_paired_rows_by_hand(bench):
    results = [
        _result("default", 0, {"a": 0.5, "b": 0.6}, {"a": 0.55, "b": 0.6}),
        _result("default", 1, {"c": 0.2}, {"c": 0.1}),
        _result("other", 0, {"a": 0.7, "b": 0.5}),
        _result("other", 1, {"c": 0.5}),
        # An arm that ran only one fold is compared on that fold's cases alone.
        _result("half", 1, {"c": 0.3}),
    ]
    priors = {"fixed": {"a": 0.4, "b": 0.4, "c": 0.4}}
    rows = {r["name"]: r for r in bench.paired_rows(results, priors, n_boot=500)}
    other = rows["other (tta_off/raw) - default (tta_off/raw)"]
    # (0.2 - 0.1 + 0.3) / 3, higher on a and c.
    assert other["cases"] == 3 and other["higher"] == 2
    assert other["mean_difference"] == pytest.approx(0.4 / 3)
    assert other["ci_low"] <= other["mean_difference"] <= other["ci_high"]
    # Every bootstrap mean lies between the smallest and largest difference.
    assert other["ci_low"] >= -0.1 - 1e-12 and other["ci_high"] <= 0.3 + 1e-12
    half = rows["half (tta_off/raw) - default (tta_off/raw)"]
    assert (half["cases"], half["higher"]) == (1, 1)
    assert half["mean_difference"] == pytest.approx(0.1) == half["ci_low"] == half["ci_high"]
    largest = rows["default (tta_off/largest) - default (tta_off/raw)"]
    assert largest["mean_difference"] == pytest.approx((0.05 + 0.0 - 0.1) / 3)
    assert largest["higher"] == 1  # b ties: not higher
    fixed = rows["centred ellipsoid, fixed - default (tta_off/raw)"]
    assert fixed["mean_difference"] == pytest.approx(np.mean([-0.1, -0.2, 0.2]))
    # The reference's mirrored prediction is compared with its plain one, after its largest piece.
    results[0]["dice"]["tta_on/raw"] = {"a": 0.6, "b": 0.6}
    with_mirrored = bench.paired_rows(results, priors, n_boot=50)
    names = [r["name"] for r in with_mirrored]
    at = names.index("default (tta_on/raw) - default (tta_off/raw)")
    assert names[at - 1] == "default (tta_off/largest) - default (tta_off/raw)"
    # Cases a and b only: (0.1 + 0.0) / 2.
    assert with_mirrored[at]["cases"] == 2
    assert with_mirrored[at]["mean_difference"] == pytest.approx(0.05)
    # Against the mirrored prediction: the ellipsoid on a and b, (0.4 - 0.6) each.
    on_mirrored = {
        r["name"]: r for r in bench.paired_rows(results, priors, variant="tta_on/raw", n_boot=50)
    }
    fixed_on = on_mirrored["centred ellipsoid, fixed - default (tta_on/raw)"]
    assert fixed_on["cases"] == 2 and fixed_on["mean_difference"] == pytest.approx(-0.2)
    del results[0]["dice"]["tta_on/raw"]
    # Another reference; one that did not run gives no rows.
    assert bench.paired_rows(results, priors, reference="missing") == []
    flipped = bench.paired_rows(results, priors, reference="other", n_boot=100)
    first = flipped[0]
    assert first["name"].startswith("default (tta_off/raw) - other")
    assert first["mean_difference"] == pytest.approx(-0.4 / 3)
    assert "| other (tta_off/raw) - default (tta_off/raw) | 3 | +0.133 |" in bench.paired_table(
        list(rows.values())
    )


def test_a_mirrored_reference_must_be_predicted_mirrored(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--reference_prediction", "tta_on/raw", "--mirrored", "other"])
    assert exit_info.value.code == 2
    assert "Received: --reference default, --mirrored other" in capsys.readouterr().err


def test_summary_and_figure(bench, tmp_path):
    results = [
        _result("default", 0, {"a": 0.5, "b": 0.7}, {"a": 0.5, "b": 0.7}),
        _result("other", 0, {"a": 0.6, "b": 0.6}, {"a": 0.6, "b": 0.6}),
    ]
    # Only the default arm was also predicted mirrored: the other arm has no such row.
    results[0]["dice"]["tta_on/raw"] = {"a": 0.7, "b": 0.7}
    priors = {"fixed": {"a": 0.4, "b": 0.2}}
    rows = bench.summary_rows(results, priors)
    by_name = {r["name"]: r for r in rows}
    assert by_name["default (tta_on/raw)"]["mean"] == pytest.approx(0.7)
    assert "other (tta_on/raw)" not in by_name
    assert by_name["default (tta_off/raw)"]["mean"] == pytest.approx(0.6)
    assert by_name["default (tta_off/raw)"]["case_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert by_name["centred ellipsoid, fixed"]["mean"] == pytest.approx(0.3)
    path = tmp_path / "recipe.png"
    bench.plot(rows, results, priors, bench.paired_rows(results, priors, n_boot=50), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kept_runs_are_reused_and_mirroring_only_predicts_again(bench, tmp_path, monkeypatch):
    sts = require_shared(SHARED_DATA / "sts_ct")
    calls, commands = [], []

    def fake_run(cmd: list, log_path: Path) -> float:
        # Training makes the run folder; predicting writes the true labels (Dice 1).
        cmd = [str(c) for c in cmd]
        calls.append(cmd[2])
        commands.append(cmd)
        out = Path(cmd[cmd.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if cmd[2] == "predict":
            for case in test:
                shutil.copy(sts / "labelsTr" / f"{case}.nii.gz", out / f"{case}.nii.gz")
        return 1.0

    monkeypatch.setattr(bench, "run", fake_run)
    train, test = ["STS_001", "STS_002"], ["STS_004"]
    args = (tmp_path, "default", [], 0, train, test, ["--epochs", "1"], 0, "python")
    first = bench.one_run(*args)
    assert calls == ["train", "predict"]
    assert first["dice"] == {"tta_off/raw": {"STS_004": 1.0}, "tta_off/largest": {"STS_004": 1.0}}
    assert bench.one_run(*args) == first and calls == ["train", "predict"]
    mirrored = bench.one_run(*args, mirrored=True)
    assert calls == ["train", "predict", "predict"]
    assert mirrored["dice"]["tta_on/raw"] == {"STS_004": 1.0}
    assert mirrored["dice"]["tta_off/raw"] == first["dice"]["tta_off/raw"]
    assert bench.one_run(*args, mirrored=True) == mirrored and len(calls) == 3
    assert bench.one_run(*args) == mirrored and len(calls) == 3  # holds the unmirrored too
    # Other flags: trained again.
    bench.one_run(tmp_path, "default", ["--lr", "0.1"], *args[3:])
    assert calls[3:] == ["train", "predict"]
    # An arm's own flags come last, so they win over the benchmark's (argparse keeps the last).
    bench.one_run(tmp_path, "seed5", ["--seed", "5"], *args[3:])
    train_cmd = commands[5]
    assert train_cmd[2] == "train"
    last = len(train_cmd) - 1 - train_cmd[::-1].index("--seed")
    assert train_cmd[last + 1] == "5" and train_cmd.count("--seed") == 2
