#!/usr/bin/env python
"""Models Genesis against training from scratch, on real CT, in one command.

1. Extract: cut 64x64x32 cubes out of the two real chest CTs in ../shared/data with
   `infinite_generator_3D.py`: the LIDC scan's cubes for training, the other patient's held out.
2. Pre-train: `keras/Genesis_Chest_CT.py` on the training cubes for a fixed budget; the
   restoration loss on the held-out cubes is recorded each epoch (the trainer's CSV).
3. Fine-tune: `keras/finetune.py train` on ../shared/data/sts_ct (36 sarcoma CTs with tumour
   masks), from the step-2 weights and from scratch, everything else equal: the same held-out
   test cases, label budgets (numbers of labelled training cases), seeds and step budget.
4. Score: `finetune.py predict` and `evaluate` on the held-out test cases (Dice per case).
5. Report: a JSON of every run (settings, per-case Dice, times), a table on stdout, and a PNG
   (Dice against the number of labelled cases, one line per initialisation, the spread over
   seeds; and the pre-training loss curve).

Every stage keeps its outputs in --out and is skipped on a rerun when its outputs exist with the
same settings, so an interrupted benchmark continues where it stopped. A variant changes one
setting and reuses what it shares with an earlier run (benchmarks/HISTORY.md lists those measured).

Scales: `--scale cpu` (default; a U-Net with 8 base filters, about half an hour on a 2-core
machine) and `--scale gpu` (the published 32-filter network, longer budgets). `--tiny` shrinks
either to a smoke test of a few minutes on the CPU.

Example:
    .venv/bin/python benchmarks/bench_transfer.py                       # CPU scale
    .venv/bin/python benchmarks/bench_transfer.py --scale gpu           # on a GPU machine
    .venv/bin/python benchmarks/bench_transfer.py --scale gpu --tiny    # smoke test of it
    .venv/bin/python benchmarks/bench_transfer.py --out benchmarks/results/exp_freeze \
        --reuse benchmarks/results/transfer_cpu --inits genesis --budgets 7 \
        --set freeze_encoder=true                                       # one variant
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import save_figure, write_json, write_text  # noqa: E402  (benchmarks/ is not a package)

SHARED = ROOT.parent / "shared" / "data"
CHEST_CTS = ("chest_ct_512x512x141.nii.gz", "chest_ct_lidc0314_512x512x275.nii.gz")
INITS = ("genesis", "scratch")


@dataclass
class Settings:
    """Everything a run of the benchmark depends on (saved beside its outputs)."""

    scale: str = "cpu"
    tiny: bool = False
    # Stage 1: cubes cut from each chest CT (one scan for training, the other held out).
    train_scale: int = 192
    # Stage 2: pre-training.
    n_base_filters: int = 8
    pretrain_epochs: int = 20
    pretrain_steps: int = 32
    pretrain_validation_steps: int = 8
    pretrain_batch_size: int = 4
    pretrain_lr: float = 0.1
    # Stage 3: fine-tuning.
    test_cases: int = 8
    budgets: list[int] = field(default_factory=lambda: [7, 28])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    finetune_epochs: int = 16
    finetune_steps: int = 8
    finetune_batch_size: int = 2
    finetune_lr: float = 1e-3
    finetune_patience: int = 8
    finetune_validation_steps: int = 8
    # The Dice of the original's dice_coef_loss (and of bce_dice_loss) counts the background
    # channel too: an all-background output scores 1 - f on patches with foreground fraction f,
    # and most short runs ended there (tumour Dice 0). This loss's Dice is the tumour's alone.
    finetune_loss: str = "bce_foreground_dice_loss"
    # Keras' 0.99 leaves the inference statistics far behind the weights after ~100 steps.
    bn_momentum: float = 0.9
    # Channels-last: TensorFlow's CPU convolutions are many times slower channels-first.
    data_format: str = "channels_last"
    overlap: float = 0.25
    split_seed: int = 0
    # Fine-tune only the decoder and head of the Genesis runs (scratch runs train everything).
    freeze_encoder: bool = False

    @classmethod
    def for_scale(cls, scale: str, tiny: bool) -> Settings:
        s = cls(scale=scale, tiny=tiny)
        if scale == "gpu":
            s.train_scale = 1024
            s.n_base_filters = 32
            s.pretrain_epochs, s.pretrain_steps, s.pretrain_validation_steps = 40, 100, 20
            s.pretrain_batch_size = 16
            s.finetune_epochs, s.finetune_steps, s.finetune_batch_size = 40, 25, 8
            s.overlap = 0.5
        if tiny:
            s.train_scale = 8
            s.n_base_filters = 2
            s.pretrain_epochs, s.pretrain_steps, s.pretrain_validation_steps = 2, 2, 1
            s.pretrain_batch_size = 2
            s.test_cases = 2
            s.budgets = [2, 4]
            s.seeds = [0]  # a smoke test: every stage once per cell
            s.finetune_epochs, s.finetune_steps, s.finetune_batch_size = 1, 2, 2
            s.overlap = 0.0
        return s

    def digest(self, *names: str) -> str:
        """A short hash of the named settings: a stage's outputs are reused only when equal."""
        values = {n: getattr(self, n) for n in names}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], log_path: Path) -> float:
    """Run one of the project's commands, its output into `log_path`; returns seconds taken.

    Raises:
        SystemExit: the command failed; the last lines of its log are shown.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    log("$ " + " ".join(str(c) for c in cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        rc = subprocess.call([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise SystemExit(
            f"command failed with exit status {rc} (log {log_path}):\n" + "\n".join(tail)
        )
    return seconds


def clear_stage(folder: Path) -> None:
    """Remove a stage's outputs, or only the link when they were borrowed with --reuse."""
    if folder.is_symlink():
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def borrow_stage(folder: Path, reuse: Path | None, digest: str) -> bool:
    """Link `folder` to the same stage of the run in `reuse` when it was done with the same
    settings. Returns whether the stage is now done."""
    if stage_done(folder, digest):
        return True
    if reuse is None or not stage_done(reuse / folder.name, digest):
        return False
    clear_stage(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to((reuse / folder.name).resolve(), target_is_directory=True)
    log(f"{folder.name}: borrowed from {reuse}")
    return True


def stage_done(folder: Path, digest: str) -> bool:
    stamp = folder / "stage.done"
    return stamp.exists() and stamp.read_text().strip() == digest


def mark_done(folder: Path, digest: str, seconds: float | None = None) -> None:
    """Stamp a stage as done with these settings; `seconds`, what it took, is kept beside it
    so that a rerun which keeps the stage still reports its time."""
    if seconds is not None:
        write_json(folder / "stage_seconds.json", round(seconds, 1))
    write_text(folder / "stage.done", digest + "\n")


def stage_seconds(folder: Path) -> float | None:
    """What a done stage took when it ran (None when not recorded)."""
    path = folder / "stage_seconds.json"
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def extract(s: Settings, out: Path, py: str, times: dict, reuse: Path | None = None) -> Path:
    """Cubes: fold 0 from the LIDC chest CT (training), fold 1 from the other patient (held out)."""
    folder = out / "cubes"
    digest = s.digest("train_scale")
    if borrow_stage(folder, reuse, digest):
        log(f"extraction: kept {folder}")
        times["extract_s"] = stage_seconds(folder)
        return folder
    clear_stage(folder)
    (folder / "volumes").mkdir(parents=True)
    t = 0.0
    # The trainer reads one scale for every fold: the held-out fold is cut at the same scale and
    # --validation_steps bounds how many of its cubes are used.
    for fold, name in enumerate((CHEST_CTS[1], CHEST_CTS[0])):
        sub = folder / "volumes" / f"subset{fold}"
        sub.mkdir()
        (sub / name).symlink_to(SHARED / name)
        t += run(
            [
                py,
                ROOT / "infinite_generator_3D.py",
                "--fold",
                fold,
                "--scale",
                s.train_scale,
                "--data",
                folder / "volumes",
                "--save",
                folder,
                "--no-progress",
            ],
            folder / f"extract_{fold}.log",
        )
    times["extract_s"] = round(t, 1)
    mark_done(folder, digest, t)
    return folder


def pretrain(
    s: Settings, out: Path, py: str, cubes: Path, times: dict, reuse: Path | None = None
) -> tuple[Path, list[dict]]:
    """Pre-train on fold 0; validate on the held-out fold 1. Returns the weights and CSV rows."""
    folder = out / "pretrain"
    digest = s.digest(
        "train_scale",
        "n_base_filters",
        "pretrain_epochs",
        "pretrain_steps",
        "pretrain_validation_steps",
        "pretrain_batch_size",
        "pretrain_lr",
    )
    weights = folder / "Vnet-genesis_chest_ct.h5"
    if not borrow_stage(folder, reuse, digest):
        clear_stage(folder)
        folder.mkdir(parents=True)
        times["pretrain_s"] = round(
            run(
                [
                    py,
                    ROOT / "keras" / "Genesis_Chest_CT.py",
                    "--data",
                    cubes,
                    "--train_fold",
                    "0",
                    "--valid_fold",
                    "1",
                    "--scale",
                    s.train_scale,
                    "--n_base_filters",
                    s.n_base_filters,
                    "--nb_epoch",
                    s.pretrain_epochs,
                    "--steps_per_epoch",
                    s.pretrain_steps,
                    "--validation_steps",
                    s.pretrain_validation_steps,
                    "--batch_size",
                    s.pretrain_batch_size,
                    "--lr",
                    s.pretrain_lr,
                    "--patience",
                    s.pretrain_epochs,
                    "--seed",
                    0,
                    "--workers",
                    2,
                    "--verbose",
                    2,
                    "--save_samples",
                    "none",
                    "--model_path",
                    folder,
                    "--sample_path",
                    folder / "samples",
                ],
                folder / "pretrain.log",
            ),
            1,
        )
        mark_done(folder, digest, times["pretrain_s"])
    else:
        log(f"pre-training: kept {folder}")
        times["pretrain_s"] = stage_seconds(folder)
    with open(folder / "Vnet-genesis_chest_ct.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return weights, rows


def identity_losses(cubes: Path, pretrain_dir: Path, epochs: int) -> list[float]:
    """The MSE of the corrupted held-out cubes against their originals, per pre-training epoch:
    the loss of a network that returns its input unchanged, on the very pairs the trainer
    scored (its own validation dataset, rebuilt from the run's saved configuration).

    Kept in `pretrain_dir`/identity_mse.json beside the pre-training outputs.
    """
    import tempfile

    path = pretrain_dir / "identity_mse.json"
    if path.exists():
        kept = json.loads(path.read_text())
        if len(kept) == epochs:
            return kept
    sys.path.insert(0, str(ROOT / "keras"))
    from config import models_genesis_config
    from genesis_trainer import make_datasets, prepare

    saved = json.loads((pretrain_dir / "Vnet-genesis_chest_ct.json").read_text())
    values = []
    with tempfile.TemporaryDirectory() as tmp:
        config = models_genesis_config.from_dict(
            {**saved, "data": str(cubes), "model_path": tmp, "logs_path": tmp, "resume": False}
        )
        config.workers = 1
        _, valid = make_datasets(config, prepare(config))
        for epoch in range(epochs):
            valid.set_epoch(epoch)
            mse = [float(((x - y) ** 2).mean()) for x, y in (valid[i] for i in range(len(valid)))]
            values.append(statistics.fmean(mse))
    write_json(str(path), values)
    return values


def split_cases(s: Settings, out: Path) -> tuple[list[str], list[str]]:
    """A fixed set of held-out test cases, and the training cases in a fixed random order."""
    import numpy as np

    images = sorted((SHARED / "sts_ct" / "imagesTr").glob("*_0000.nii.gz"))
    cases = [p.name[: -len("_0000.nii.gz")] for p in images]
    order = np.random.default_rng(s.split_seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    test, train = sorted(shuffled[: s.test_cases]), shuffled[s.test_cases :]
    if max(s.budgets) > len(train):
        raise SystemExit(
            f"Expected label budgets of at most {len(train)} training cases. "
            f"Received: budgets={s.budgets}"
        )
    return test, train


def case_folder(dst: Path, cases: list[str]) -> Path:
    """An nnU-Net-layout folder of the given sts_ct cases (symbolic links) and its dataset.json."""
    src = SHARED / "sts_ct"
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for case in cases:
        (dst / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(
            src / "imagesTr" / f"{case}_0000.nii.gz"
        )
        (dst / "labelsTr" / f"{case}.nii.gz").symlink_to(src / "labelsTr" / f"{case}.nii.gz")
    meta = json.loads((src / "dataset.json").read_text())
    meta["numTraining"] = len(cases)
    write_text(dst / "dataset.json", json.dumps(meta, indent=2))
    return dst


def per_case_dice(report_path: Path) -> dict[str, float]:
    """Foreground Dice per case (the mean over foreground classes) from `finetune.py evaluate`'s
    JSON report, whose "cases" list has one entry per case and class."""
    report = json.loads(report_path.read_text())
    per_case: dict[str, list[float]] = {}
    for entry in report["cases"]:
        per_case.setdefault(entry["case"], []).append(float(entry["dice"]))
    return {case: statistics.fmean(values) for case, values in per_case.items()}


def finetune_one(
    s: Settings,
    out: Path,
    py: str,
    init: str,
    budget: int,
    seed: int,
    weights: Path,
    train_cases: list[str],
    test_dir: Path,
) -> dict:
    name = f"{init}_n{budget:02d}_seed{seed}"
    folder = out / "finetune" / name
    digest = s.digest(
        "n_base_filters",
        "finetune_epochs",
        "finetune_steps",
        "finetune_batch_size",
        "finetune_lr",
        "finetune_patience",
        "finetune_validation_steps",
        "finetune_loss",
        "bn_momentum",
        "data_format",
        "overlap",
        "test_cases",
        "split_seed",
        *(
            ("train_scale", "pretrain_epochs", "pretrain_steps", "pretrain_lr")
            if init == "genesis"
            else ()
        ),
        # Only named when on, so that the stamps of runs without it stay valid.
        *(("freeze_encoder",) if init == "genesis" and s.freeze_encoder else ()),
    )
    result_path = folder / "result.json"
    if stage_done(folder, digest) and result_path.exists():
        log(f"fine-tuning {name}: kept")
        return json.loads(result_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = case_folder(folder / "data", train_cases[:budget])
    run_dir = folder / "run"
    cmd = [
        py,
        ROOT / "keras" / "finetune.py",
        "train",
        "--data",
        data,
        "--output",
        run_dir,
        "--weights",
        weights if init == "genesis" else "none",
        "--epochs",
        s.finetune_epochs,
        "--steps_per_epoch",
        s.finetune_steps,
        "--batch_size",
        s.finetune_batch_size,
        "--lr",
        s.finetune_lr,
        "--patience",
        s.finetune_patience,
        "--validation_steps",
        s.finetune_validation_steps,
        "--cache",
        out / "cache",
        "--verbose",
        2,
        "--loss",
        s.finetune_loss,
        "--bn_momentum",
        s.bn_momentum,
        "--data_format",
        s.data_format,
        "--seed",
        seed,
        "--workers",
        1,
        # The settings its published table was measured with: the original's recipe (native
        # spacing, a 64x64x32 patch, no augmentation, the plateau schedule) with the flags
        # above. A benchmark under the default recipe is bench_recipe.py's.
        "--recipe",
        "original",
    ]
    if init == "scratch":
        cmd += ["--n_base_filters", s.n_base_filters]
    elif s.freeze_encoder:
        cmd += ["--freeze_encoder"]
    t_train = run(cmd, folder / "train.log")
    t_pred = run(
        [
            py,
            ROOT / "keras" / "finetune.py",
            "predict",
            "--model",
            run_dir,
            "--input",
            test_dir / "imagesTr",
            "--output",
            folder / "predictions",
            "--overlap",
            s.overlap,
        ],
        folder / "predict.log",
    )
    t_eval = run(
        [
            py,
            ROOT / "keras" / "finetune.py",
            "evaluate",
            "--predictions",
            folder / "predictions",
            "--labels",
            test_dir / "labelsTr",
            "--output",
            folder / "report.json",
        ],
        folder / "evaluate.log",
    )
    dice = per_case_dice(folder / "report.json")
    result = {
        "name": name,
        "init": init,
        "budget": budget,
        "seed": seed,
        "train_cases": train_cases[:budget],
        "dice": dice,
        "mean_dice": statistics.fmean(dice.values()),
        "train_s": round(t_train, 1),
        "predict_s": round(t_pred, 1),
        "evaluate_s": round(t_eval, 1),
    }
    write_json(str(result_path), result)
    mark_done(folder, digest)
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> list[dict]:
    """Mean, standard deviation, minimum and maximum of the mean Dice over seeds, per cell.

    Args:
        runs: results with keys init, budget, seed and mean_dice.

    Returns:
        One row per (budget, init), sorted by budget then initialisation order.
    """
    cells: dict[tuple[int, str], list[float]] = {}
    for r in runs:
        cells.setdefault((r["budget"], r["init"]), []).append(r["mean_dice"])
    rows = []
    for (budget, init), values in sorted(
        cells.items(), key=lambda kv: (kv[0][0], INITS.index(kv[0][1]))
    ):
        rows.append(
            {
                "budget": budget,
                "init": init,
                "seeds": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        )
    return rows


def paired(runs: list[dict]) -> list[dict]:
    """Genesis minus scratch, run by run: the same budget and seed (so the same training cases,
    patches and test cases), per budget.

    Args:
        runs: results with keys init, budget, seed and mean_dice.

    Returns:
        One row per budget that has both initialisations: the number of pairs, the mean and
        standard deviation of the differences, and in how many pairs Genesis scored higher.
    """
    by_key = {(r["budget"], r["seed"], r["init"]): r["mean_dice"] for r in runs}
    rows = []
    for budget in sorted({r["budget"] for r in runs}):
        diffs = [
            by_key[(budget, seed, "genesis")] - by_key[(budget, seed, "scratch")]
            for seed in sorted({r["seed"] for r in runs if r["budget"] == budget})
            if (budget, seed, "genesis") in by_key and (budget, seed, "scratch") in by_key
        ]
        if diffs:
            rows.append(
                {
                    "budget": budget,
                    "pairs": len(diffs),
                    "mean_difference": statistics.fmean(diffs),
                    "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                    "genesis_higher": sum(d > 0 for d in diffs),
                }
            )
    return rows


def paired_table(rows: list[dict]) -> str:
    lines = [
        "| labelled cases | pairs (seeds) | Genesis - scratch, mean | std | Genesis higher |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['pairs']} | {r['mean_difference']:+.3f} | {r['std']:.3f} "
            f"| {r['genesis_higher']} of {r['pairs']} |"
        )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| labelled cases | initialisation | seeds | Dice mean | std | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['init']} | {r['seeds']} | {r['mean']:.3f} | {r['std']:.3f} "
            f"| {r['min']:.3f} | {r['max']:.3f} |"
        )
    return "\n".join(lines)


def plot(
    rows: list[dict], runs: list[dict], pretrain_rows: list[dict], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for init, colour in zip(INITS, ("tab:red", "tab:blue"), strict=True):
        cell = [r for r in rows if r["init"] == init]
        if not cell:
            continue
        xs = [r["budget"] for r in cell]
        ax1.errorbar(
            xs,
            [r["mean"] for r in cell],
            yerr=[r["std"] for r in cell],
            color=colour,
            marker="o",
            capsize=4,
            label=f"{init} (mean ± std over seeds)",
        )
        pts = [r for r in runs if r["init"] == init]
        ax1.scatter(
            [r["budget"] for r in pts],
            [r["mean_dice"] for r in pts],
            color=colour,
            alpha=0.35,
            s=14,
        )
    ax1.set_xlabel("labelled training cases")
    ax1.set_ylabel("mean Dice on the held-out cases")
    ax1.set_title("Fine-tuning on sts_ct")
    ax1.legend()
    ax1.grid(alpha=0.3)
    epochs = [int(r["epoch"]) + 1 for r in pretrain_rows]
    ax2.plot(epochs, [r["loss"] for r in pretrain_rows], marker="o", label="training cubes")
    ax2.plot(epochs, [r["val_loss"] for r in pretrain_rows], marker="o", label="held-out cubes")
    if all("identity_val_loss" in r for r in pretrain_rows):
        ax2.plot(
            epochs,
            [r["identity_val_loss"] for r in pretrain_rows],
            ls="--",
            color="grey",
            label="held-out, input returned unchanged",
        )
    ax2.set_yscale("log")
    ax2.set_xlabel("pre-training epoch")
    ax2.set_ylabel("restoration loss (MSE, log scale)")
    ax2.set_title("Pre-training on the chest CTs")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def apply_overrides(s: Settings, items: list[str]) -> None:
    """Set fields of `s` from NAME=VALUE strings, each value read as its field's type.

    Raises:
        SystemExit: an unknown name or a value that is not of the field's type.
    """
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields or name in ("scale", "tiny"):
            raise SystemExit(
                "Expected --set NAME=VALUE with NAME a setting other than scale and tiny "
                f"({', '.join(n for n in fields if n not in ('scale', 'tiny'))}). "
                f"Received: --set {item!r}"
            )
        kind = str(fields[name].type)
        try:
            if kind == "bool":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                parsed: Any = value.lower() in ("true", "1")
            elif kind.startswith("list"):
                parsed = [int(v) for v in value.replace(",", " ").split()]
            else:
                parsed = {"int": int, "float": float, "str": str}[kind](value)
        except ValueError:
            raise SystemExit(
                f"Expected a value of type {kind} for {name}. Received: --set {item!r}"
            ) from None
        setattr(s, name, parsed)


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  .venv/bin/python benchmarks/bench_transfer.py --seeds 0 1 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scale",
        choices=("cpu", "gpu"),
        default="cpu",
        help="network and budget sizes (default: cpu)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="a smoke test of the chosen scale: minutes on a CPU"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: benchmarks/results/transfer_{scale}[_tiny])",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default: 0 1 2)"
    )
    p.add_argument(
        "--budgets", type=int, nargs="+", default=None, help="numbers of labelled training cases"
    )
    p.add_argument(
        "--loss",
        choices=("dice_coef_loss", "bce_dice_loss", "bce_foreground_dice_loss"),
        default=None,
        help="fine-tuning loss (default: bce_foreground_dice_loss)",
    )
    p.add_argument(
        "--inits",
        nargs="+",
        choices=INITS,
        default=list(INITS),
        help="initialisations to fine-tune from (default: both)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change one setting of the chosen scale, e.g. --set pretrain_lr=1.0 "
        "--set freeze_encoder=true (repeatable; the names are those printed at start)",
    )
    p.add_argument(
        "--reuse",
        default=None,
        help="an earlier run's --out: its extraction, pre-training and preprocessed volumes "
        "are linked instead of redone when their settings are the same",
    )
    p.add_argument(
        "--python", default=sys.executable, help="interpreter that runs the project's commands"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (SHARED / "sts_ct" / "dataset.json").exists() or not all(
        (SHARED / n).exists() for n in CHEST_CTS
    ):
        print(
            f"error: the real CT data is missing: expected {SHARED}/sts_ct and "
            f"{', '.join(CHEST_CTS)}",
            file=sys.stderr,
        )
        return 2
    s = Settings.for_scale(args.scale, args.tiny)
    if args.seeds:
        s.seeds = args.seeds
    if args.budgets:
        s.budgets = sorted(args.budgets)
    if args.loss:
        s.finetune_loss = args.loss
    apply_overrides(s, args.overrides)
    reuse = Path(args.reuse) if args.reuse else None
    if reuse is not None and not (reuse / "settings.json").exists():
        print(
            f"error: expected --reuse to be an earlier run's output folder with a "
            f"settings.json. Received: --reuse {args.reuse}",
            file=sys.stderr,
        )
        return 2
    out = Path(
        args.out
        or ROOT / "benchmarks" / "results" / f"transfer_{s.scale}{'_tiny' if s.tiny else ''}"
    )
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(dataclasses.asdict(s), indent=2), flush=True)
    write_json(str(out / "settings.json"), dataclasses.asdict(s))
    t_start = time.perf_counter()
    times: dict[str, Any] = {}

    if reuse is not None and (reuse / "cache").is_dir() and not (out / "cache").exists():
        (out / "cache").symlink_to((reuse / "cache").resolve(), target_is_directory=True)
    cubes = extract(s, out, args.python, times, reuse)
    weights, pretrain_rows = pretrain(s, out, args.python, cubes, times, reuse)
    identity = identity_losses(cubes, out / "pretrain", len(pretrain_rows))
    for row, value in zip(pretrain_rows, identity, strict=True):
        row["identity_val_loss"] = value
    test, train = split_cases(s, out)
    test_dir = case_folder(out / "test_cases", test)
    log(f"held-out test cases ({len(test)}): {' '.join(test)}")

    runs = []
    for budget in s.budgets:
        for seed in s.seeds:
            for init in args.inits:
                r = finetune_one(s, out, args.python, init, budget, seed, weights, train, test_dir)
                log(f"{r['name']}: mean Dice {r['mean_dice']:.3f} (train {r['train_s']} s)")
                runs.append(r)
    rows = summarise(runs)
    pairs = paired(runs)
    times["finetune_s"] = round(
        sum(r["train_s"] + r["predict_s"] + r["evaluate_s"] for r in runs), 1
    )
    # Every stage's own time, also of those this invocation kept from an earlier one.
    parts = [times.get("extract_s"), times.get("pretrain_s"), times["finetune_s"]]
    times["stages_s"] = round(sum(parts), 1) if None not in parts else None
    times["total_s"] = round(time.perf_counter() - t_start, 1)  # this invocation
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "command": "python benchmarks/bench_transfer.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": dataclasses.asdict(s),
        "test_cases": test,
        "times": times,
        "pretraining": pretrain_rows,
        "summary": rows,
        "paired": pairs,
        "runs": runs,
    }
    write_json(str(out / "transfer.json"), results)
    plot(
        rows,
        runs,
        pretrain_rows,
        out / "transfer.png",
        f"Models Genesis vs scratch, {s.scale} scale{' (tiny)' if s.tiny else ''}, "
        f"{s.n_base_filters} base filters, {len(s.seeds)} seeds",
    )
    print(table(rows))
    if pairs:
        print(paired_table(pairs))
    print(f"pre-training val_loss by epoch: {[round(r['val_loss'], 5) for r in pretrain_rows]}")
    print(
        "held-out loss of the input returned unchanged, by epoch: "
        f"{[round(r['identity_val_loss'], 4) for r in pretrain_rows]}"
    )
    print(
        "val_loss / that, by epoch: "
        f"{[round(r['val_loss'] / r['identity_val_loss'], 4) for r in pretrain_rows]}"
    )
    print(f"times: {times}; results in {out}/transfer.json, plot {out}/transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
