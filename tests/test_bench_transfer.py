"""The transfer benchmark's bookkeeping: the per-cell summary, paired intervals, stage stamps
and the --pretrained weights."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_transfer", ROOT / "benchmarks" / "bench_transfer.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_summary_per_budget_and_initialisation_matches_hand_values(bench):
    runs = [
        {"init": "scratch", "budget": 7, "seed": 0, "mean_dice": 0.2},
        {"init": "genesis", "budget": 7, "seed": 0, "mean_dice": 0.5},
        {"init": "genesis", "budget": 7, "seed": 1, "mean_dice": 0.7},
        {"init": "scratch", "budget": 7, "seed": 1, "mean_dice": 0.4},
        {"init": "genesis", "budget": 28, "seed": 0, "mean_dice": 0.9},
    ]
    rows = bench.summarise(runs)
    assert [(r["budget"], r["arm"], r["seeds"]) for r in rows] == [
        (7, "genesis", 2),
        (7, "scratch", 2),
        (28, "genesis", 1),
    ]
    assert [r["arm"] for r in rows] == ["genesis", "scratch", "genesis"]
    # mean of 0.5 and 0.7 is 0.6; sample std is |0.7 - 0.5| / sqrt(2)
    assert rows[0]["mean"] == pytest.approx(0.6)
    assert rows[0]["std"] == pytest.approx(0.2 / 2**0.5)
    assert (rows[1]["min"], rows[1]["max"]) == (0.2, 0.4)
    assert rows[2]["std"] == 0.0
    text = bench.table(rows, [{"budget": 7, "prior": "fixed", "mean_dice": 0.25}])
    assert "| 7 | genesis | 2 | 0.600 |" in text
    assert "| 7 | centred ellipsoid (fixed) | - | 0.250 |" in text


def test_a_stage_is_kept_only_with_the_same_settings(bench, tmp_path):
    s = bench.Settings()
    digest = s.digest("n_base_filters", "finetune_epochs")
    assert not bench.stage_done(tmp_path, digest)
    bench.mark_done(tmp_path, digest)
    assert bench.stage_done(tmp_path, digest)
    s.finetune_epochs = 99
    assert not bench.stage_done(tmp_path, s.digest("n_base_filters", "finetune_epochs"))
    # The time a stage took is kept with its stamp, for reruns that keep it.
    assert bench.stage_seconds(tmp_path) is None
    bench.mark_done(tmp_path, digest, 12.34)
    assert bench.stage_seconds(tmp_path) == 12.3 and bench.stage_done(tmp_path, digest)
    # Written through the one atomic writer: no temporary file is left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage.done", "stage_seconds.json"]


def test_tiny_shrinks_every_budget(bench):
    full, tiny = bench.Settings.for_scale("gpu", False), bench.Settings.for_scale("gpu", True)
    assert full.n_base_filters == 32 and tiny.n_base_filters < full.n_base_filters
    assert tiny.finetune_epochs < full.finetune_epochs and len(full.seeds) == 5
    assert len(tiny.seeds) < len(full.seeds) and max(tiny.budgets) < max(full.budgets)
    assert json.dumps(bench.dataclasses.asdict(tiny))  # the settings file is plain JSON


def test_per_case_dice_reads_the_evaluation_report(bench, tmp_path):
    report = {
        "cases": [
            {"case": "a", "class": "tumour", "dice": 0.5, "iou": 1 / 3},
            {"case": "b", "class": "tumour", "dice": 0.2, "iou": 0.1},
            {"case": "b", "class": "oedema", "dice": 0.6, "iou": 0.4},
        ]
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    dice = bench.per_case_dice(path)
    assert dice["a"] == 0.5 and dice["b"] == pytest.approx(0.4)


def test_set_reads_each_value_as_its_settings_type(bench):
    s = bench.Settings()
    bench.apply_overrides(
        s,
        [
            "pretrain_lr=1.0",
            "pretrain_epochs=2",
            "freeze_encoder=true",
            "budgets=7,28",
            "tta=on",
        ],
    )
    assert s.pretrain_lr == 1.0 and isinstance(s.pretrain_lr, float)
    assert s.pretrain_epochs == 2 and isinstance(s.pretrain_epochs, int)
    assert s.freeze_encoder is True and s.budgets == [7, 28]
    assert s.tta == "on"
    bench.apply_overrides(s, ["freeze_encoder=0"])
    assert s.freeze_encoder is False


@pytest.mark.parametrize(
    "item, message",
    [
        ("pretrain_lr", "NAME=VALUE"),
        ("no_such_setting=1", "no_such_setting"),
        ("scale=gpu", "other than scale"),
        ("pretrain_epochs=two", "Expected a value of type int for pretrain_epochs"),
        ("freeze_encoder=maybe", "Expected a value of type bool"),
    ],
)
def test_set_refuses_unknown_names_and_bad_values(bench, item, message):
    with pytest.raises(SystemExit, match=message):
        bench.apply_overrides(bench.Settings(), [item])


def test_reuse_links_a_stage_only_with_the_same_settings(bench, tmp_path):
    earlier, now = tmp_path / "earlier", tmp_path / "now"
    (earlier / "pretrain").mkdir(parents=True)
    (earlier / "pretrain" / "weights.h5").write_text("w")
    bench.mark_done(earlier / "pretrain", "abc")
    assert not bench.borrow_stage(now / "pretrain", earlier, "other")
    assert not (now / "pretrain").exists()
    assert bench.borrow_stage(now / "pretrain", earlier, "abc")
    assert (now / "pretrain").is_symlink()
    assert (now / "pretrain" / "weights.h5").read_text() == "w"
    # Redoing the stage removes the link, never the earlier run's outputs.
    bench.clear_stage(now / "pretrain")
    assert not (now / "pretrain").exists() and (earlier / "pretrain" / "weights.h5").exists()


@pytest.fixture(scope="module")
def variants_script():
    spec = importlib.util.spec_from_file_location(
        "plot_transfer_variants", ROOT / "benchmarks" / "plot_transfer_variants.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_table_lists_each_seed_and_the_mean(variants_script, tmp_path, capsys):
    base, frozen = tmp_path / "base", tmp_path / "frozen"
    for folder, runs in (
        (
            base,
            [
                {"init": "genesis", "budget": 7, "seed": 1, "mean_dice": 0.3},
                {"init": "genesis", "budget": 7, "seed": 0, "mean_dice": 0.1},
                {"init": "scratch", "budget": 7, "seed": 0, "mean_dice": 0.0},
                {"init": "genesis", "budget": 28, "seed": 0, "mean_dice": 0.9},
            ],
        ),
        (frozen, [{"init": "genesis", "budget": 7, "seed": 0, "mean_dice": 0.25}]),
    ):
        folder.mkdir()
        (folder / "transfer.json").write_text(json.dumps({"runs": runs}))
    png = tmp_path / "v.png"
    variants_script.main(
        ["--variant", f"as run={base}", "--variant", f"frozen={frozen}", "--png", str(png)]
    )
    out = capsys.readouterr().out
    # seeds sorted; mean of 0.1 and 0.3 is 0.2, sample std 0.2 / sqrt(2) = 0.141
    assert "| as run | genesis | 2 | 0.100, 0.300 | 0.200 | 0.141 |" in out
    assert "| as run | scratch | 1 | 0.000 | 0.000 | 0.000 |" in out
    assert "| frozen | genesis | 1 | 0.250 |" in out and "frozen | scratch" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="Expected runs with 3 labelled cases"):
        variants_script.main(["--budget", "3", "--variant", f"x={base}"])
    with pytest.raises(SystemExit, match="bench_transfer.py output folder"):
        variants_script.main(["--variant", f"x={tmp_path / 'none'}"])


def test_identity_loss_is_scored_on_the_trainers_validation_pairs(bench, tmp_path):
    sys.path.insert(0, str(ROOT / "keras"))
    import numpy as np

    from config import models_genesis_config
    from genesis_dataset import GenesisPairDataset

    cubes, run = tmp_path / "cubes", tmp_path / "pretrain"
    cubes.mkdir()
    run.mkdir()
    rng = np.random.default_rng(0)
    for fold in (0, 1):
        a = rng.random((8, 64, 64, 32), dtype=np.float32)
        np.save(cubes / f"bat_8_s_64x64x32_{fold}.npy", a)
    config = models_genesis_config(
        data=str(cubes),
        train_fold=[0],
        valid_fold=[1],
        scale=8,
        batch_size=4,
        validation_steps=2,
        seed=3,
        model_path=str(run),
    )
    (run / "Vnet-genesis_chest_ct.json").write_text(config.to_json())
    got = bench.identity_losses(run, 2)
    # The trainer validates on seed + 1 with the epoch set before each epoch.
    ds = GenesisPairDataset(
        str(cubes / "bat_8_s_64x64x32_1.npy"),
        4,
        config,
        seed=4,
        status="test",
        steps=2,
        epoch_from_keras=False,
    )
    want = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        want.append(np.mean([np.mean((ds[i][0] - ds[i][1]) ** 2) for i in range(2)]))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] != got[1] and all(v > 0 for v in got)
    # Kept beside the run: a second call reads the file.
    (run / "identity_mse.json").write_text(json.dumps([1.0, 2.0]))
    assert bench.identity_losses(run, 2) == [1.0, 2.0]


def _run(arm, budget, seed, dice):
    return {
        "arm": arm,
        "init": "scratch" if arm == "scratch" else "genesis",
        "budget": budget,
        "seed": seed,
        "dice": dice,
        "mean_dice": sum(dice.values()) / len(dice),
    }


def test_paired_differences_match_only_the_same_budget_seed_and_case(bench):
    runs = [
        _run("genesis", 7, 0, {"a": 0.5, "b": 0.7}),
        _run("scratch", 7, 0, {"a": 0.2, "b": 0.4}),
        _run("genesis", 7, 1, {"a": 0.1, "b": 0.1}),
        _run("scratch", 7, 1, {"a": 0.2, "b": 0.2}),
        _run("genesis", 7, 2, {"a": 0.9, "b": 0.9}),  # no scratch twin
        _run("genesis", 28, 0, {"a": 0.4, "b": 0.4}),  # no scratch at 28
    ]
    (row,) = bench.paired(runs, "genesis", "scratch", n_boot=500)
    # run differences +0.3 and -0.1: mean 0.1
    assert row["budget"] == 7 and row["pairs"] == 2 and row["cases"] == 2
    assert row["a_higher"] == 1
    assert row["run_differences"] == pytest.approx([0.3, -0.1])
    assert row["mean_difference"] == pytest.approx(0.1)
    # every draw is a mean of some of the four differences (+0.3, +0.3, -0.1, -0.1)
    assert -0.1 - 1e-9 <= row["ci_low"] <= 0.1 <= row["ci_high"] <= 0.3 + 1e-9
    text = bench.paired_table([row])
    assert "| 7 | genesis - scratch | 2 | +0.100 |" in text and "| 1 of 2 |" in text
    assert bench.paired(runs, "genesis", "genesis_original", n_boot=10) == []


def test_bootstrap_interval_against_a_slow_reference(bench):
    import numpy as np
    from common import bootstrap_interval  # on the path once bench_transfer is loaded

    diffs = np.array([[0.1, 0.3, -0.2], [0.0, 0.4, 0.2]])
    low, high = bootstrap_interval(diffs, 2000, np.random.default_rng(5))
    # The same draws, one loop at a time.
    rng = np.random.default_rng(5)
    means = []
    for _ in range(2000):
        rows = rng.integers(0, 2, 2)
        cols = rng.integers(0, 3, 3)
        means.append(sum(diffs[r, c] for r in rows for c in cols) / 6)
    assert (low, high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert low < diffs.mean() < high
    # No spread: the interval is the point.
    assert bootstrap_interval(np.full((3, 4), 0.2), 100, np.random.default_rng(0)) == (
        pytest.approx(0.2),
        pytest.approx(0.2),
    )


def test_pretrained_resolves_an_hf_name_through_a_hub_cache_offline(tmp_path):
    """--pretrained hf:Genesis_Chest_CT.h5 finds the file in the Hugging Face cache without the
    network, and reads the width that scratch will take from it."""
    from test_download_weights import make_hub_cache

    weights = tmp_path / "Genesis_Chest_CT.h5"
    code = (
        "import sys; sys.path.insert(0, 'keras'); from unet3d import unet_model_3d;"
        "m = unet_model_3d((1, 32, 32, 16), n_base_filters=4, batch_normalization=True);"
        f"m.save({str(weights)!r})"
    )
    env = dict(os.environ, KERAS_BACKEND="torch", HF_HUB_OFFLINE="1")
    made = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert made.returncode == 0, made.stderr.decode()[-2000:]
    cache = tmp_path / "hub"
    make_hub_cache(cache, {"Genesis_Chest_CT.h5": weights})
    code = (
        "import sys, runpy; sys.path.insert(0, 'benchmarks');"
        "b = runpy.run_path('benchmarks/bench_transfer.py');"
        "print(b['resolve_pretrained']('hf:Genesis_Chest_CT.h5'))"
    )
    env["HF_HUB_CACHE"] = str(cache)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    path, width = eval(out.stdout.strip().splitlines()[-1])  # a printed (str, int) tuple
    assert width == 4 and os.path.samefile(path, cache.glob("**/Genesis_Chest_CT.h5").__next__())
    # A name the cache lacks stops with the hub's own explanation, not a traceback.
    code = code.replace("Genesis_Chest_CT.h5", "Genesis_Chest_CT_x.h5")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode != 0 and "error: --pretrained:" in out.stderr
    assert "Traceback" not in out.stderr


def test_case_folder_links_the_named_cases_and_counts_them(bench, tmp_path):
    src = tmp_path / "src"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    for case in ("A_1", "A_2", "A_3"):
        (src / "imagesTr" / f"{case}_0000.nii.gz").write_text(f"image {case}")
        (src / "labelsTr" / f"{case}.nii.gz").write_text(f"label {case}")
    (src / "dataset.json").write_text(json.dumps({"numTraining": 3, "labels": {"x": 0}}))
    dst = tmp_path / "dst"
    (dst / "stale").mkdir(parents=True)  # an earlier folder is replaced, not merged
    assert bench.case_folder(dst, ["A_3", "A_1"], src) == dst
    assert sorted(p.name for p in (dst / "imagesTr").iterdir()) == [
        "A_1_0000.nii.gz",
        "A_3_0000.nii.gz",
    ]
    assert (dst / "labelsTr" / "A_3.nii.gz").read_text() == "label A_3"
    assert (dst / "imagesTr" / "A_1_0000.nii.gz").is_symlink()
    assert json.loads((dst / "dataset.json").read_text()) == {"numTraining": 2, "labels": {"x": 0}}
    assert not (dst / "stale").exists()


def test_pretrain_spacing_arm_takes_the_pre_training_spacing(bench):
    assert [a for a in bench.ARMS if bench.needs_pretrain_spacing(a)] == [
        "genesis_pretrain_spacing",
        "scratch_pretrain_spacing",
    ]
    assert bench.arm_flags("genesis", [1.95, 1.95, 3.27]) == []
    assert bench.arm_flags("genesis_ct_foreground", None) == ["--intensity", "ct_foreground"]
    assert bench.arm_flags("genesis_pretrain_spacing", [1.95, 1.95, 3.27]) == [
        "--intensity",
        "ct_foreground",
        "--spacing",
        1.95,
        1.95,
        3.27,
    ]
    assert bench.arm_flags("scratch_pretrain_spacing", [2.0, 2.0, 3.0]) == [
        "--spacing",
        2.0,
        2.0,
        3.0,
    ]
    with pytest.raises(ValueError, match="genesis_pretrain_spacing needs the pre-training"):
        bench.arm_flags("genesis_pretrain_spacing", None)


def test_pretrain_spacing_arm_is_refused_with_given_weights(bench, capsys):
    code = bench.main(["--pretrained", "weights.h5", "--arms", "genesis_pretrain_spacing"])
    assert code == 2
    assert "Received: --arms genesis_pretrain_spacing" in capsys.readouterr().err
