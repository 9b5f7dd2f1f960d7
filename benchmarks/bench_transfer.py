#!/usr/bin/env python
"""Models Genesis against training from scratch, under the default fine-tuning recipe.

1. Extract: cut cubes (`infinite_generator_3D.py --input ... --preset ct`) out of every unlabelled
   CT at hand: the two chest CTs in ../shared/data and the sts_ct images that are not test cases
   (their labels unused), resampled to the spacing the fine-tuning plan chooses for sts_ct, so
   that pre-training and fine-tuning see the same voxel size. No test image is seen.
2. Pre-train: `keras/Genesis_Chest_CT.py --train_files ... --valid_fraction` (a fifth of the
   volumes held out for the restoration loss, recorded each epoch).
3. Fine-tune: `keras/finetune.py train` on sts_ct (36 sarcoma CTs with tumour masks), everything
   else equal: the same held-out test cases, label budgets, seeds and step budget. Arms:
   `genesis` (the step-2 weights, default recipe), `scratch` (default recipe) and
   `genesis_original` (the step-2 weights, `--recipe original`: the paper's setting) at the
   budgets in `extra_arm_budgets`. Optional (`--arms ...`): `scratch_ct_window`, scratch on
   the pre-trained weights' intensity window, so that the weights' effect is seen apart from the
   window the default recipe gives pre-trained runs, `genesis_ct_foreground`, the weights
   fine-tuned on the z-scored intensities scratch gets, and `genesis_pretrain_spacing`, the same
   at the spacing the weights were pre-trained at rather than the plan's for the labelled cases,
   and `scratch_pretrain_spacing`, scratch at that spacing.
4. Score: `finetune.py predict` and `evaluate` on the held-out test cases (Dice per case); the
   same cases are scored by two centred ellipsoids sized from each budget's training masks,
   which look at no voxel (benchmarks/centred_prior.py).
5. Report: a JSON of every run, tables on stdout (mean and spread per cell; paired differences
   with 95 % bootstrap intervals over test cases and seeds) and a PNG.

`--pretrained FILE` (or `hf:Genesis_Chest_CT.h5`, the published weights, fetched once) skips
steps 1 and 2: the Genesis arms start from that file and scratch takes its width.

Every stage keeps its outputs in --out and is skipped on a rerun when its outputs exist with the
same settings, so an interrupted benchmark continues where it stopped. A variant changes one
setting and reuses what it shares with an earlier run (benchmarks/HISTORY.md lists those measured).

Scales: `--scale cpu` (default; a U-Net with 8 base filters, under two hours on a 2-core
machine) and `--scale gpu` (the published 32-filter network, longer budgets). `--tiny` shrinks
either to a smoke test of a few minutes on the CPU.

Example:
    .venv/bin/python benchmarks/bench_transfer.py                       # CPU scale
    .venv/bin/python benchmarks/bench_transfer.py --scale gpu \\
        --pretrained hf:Genesis_Chest_CT.h5                             # the published weights
    .venv/bin/python benchmarks/bench_transfer.py --scale gpu --tiny    # smoke test of it
    .venv/bin/python benchmarks/bench_transfer.py --out benchmarks/results/exp_lr \\
        --reuse benchmarks/results/transfer_cpu --arms genesis --budgets 7 \\
        --set pretrain_lr=1.0                                           # one variant
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import case_folder, write_json, write_text  # noqa: E402  (benchmarks/ is not a package)
from transfer_report import (  # noqa: E402
    ARMS,
    DEFAULT_ARMS,
    INITS,
    PRETRAIN_SPACING,
    needs_pretrain_spacing,
    paired,
    paired_table,
    plot,
    summarise,
    table,
)

SHARED = ROOT.parent / "shared" / "data"
CHEST_CTS = ("chest_ct_512x512x141.nii.gz", "chest_ct_lidc0314_512x512x275.nii.gz")


@dataclass
class Settings:
    """Everything a run of the benchmark depends on (saved beside its outputs)."""

    scale: str = "cpu"
    tiny: bool = False
    # Held-out test cases of sts_ct (a seeded permutation); never seen in pre-training.
    test_cases: int = 8
    split_seed: int = 0
    # Stage 1: cubes per volume, cut from the chest CTs and the non-test sts_ct images.
    train_scale: int = 32
    # Stage 2: pre-training; a fifth of the volumes validate.
    n_base_filters: int = 8
    pretrain_epochs: int = 16
    pretrain_steps: int = 32
    pretrain_validation_steps: int = 8
    pretrain_batch_size: int = 4
    pretrain_lr: float = 0.1
    pretrain_valid_fraction: float = 0.2
    # Stage 3: fine-tuning. The recipe plans spacing and intensities; the patch, batch and
    # step budget are fixed here so that every arm gets the same compute.
    budgets: list[int] = field(default_factory=lambda: [7, 28])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    # The arms beyond genesis and scratch run at these budgets only.
    extra_arm_budgets: list[int] = field(default_factory=lambda: [7])
    patch: list[int] = field(default_factory=lambda: [64, 64, 32])
    finetune_epochs: int = 20
    finetune_steps: int = 8
    finetune_batch_size: int = 2
    # Mirroring at prediction costs 8 forward passes a window; both arms are scored alike.
    tta: str = "off"
    overlap: float = 0.25
    # Fine-tune only the decoder and head of the Genesis runs (scratch runs train everything).
    freeze_encoder: bool = False
    bootstrap: int = 10000

    @classmethod
    def for_scale(cls, scale: str, tiny: bool) -> Settings:
        s = cls(scale=scale, tiny=tiny)
        if scale == "gpu":
            s.train_scale = 64
            s.n_base_filters = 32
            s.pretrain_epochs, s.pretrain_steps, s.pretrain_validation_steps = 40, 100, 20
            s.pretrain_batch_size = 16
            s.finetune_epochs, s.finetune_steps, s.finetune_batch_size = 100, 25, 8
            s.tta = "on"
            s.overlap = 0.5
        if tiny:
            s.test_cases = 2
            s.train_scale = 2
            s.n_base_filters = 2
            s.pretrain_epochs, s.pretrain_steps, s.pretrain_validation_steps = 2, 2, 1
            s.pretrain_batch_size = 2
            s.budgets = [2, 4]
            s.extra_arm_budgets = [2]
            s.seeds = [0]  # a smoke test: every stage once per cell
            s.patch = [32, 32, 16]
            s.finetune_epochs, s.finetune_steps, s.finetune_batch_size = 1, 2, 2
            s.tta = "off"
            s.overlap = 0.0
            s.bootstrap = 200
        return s

    def digest(self, *names: str, extra: Any = None) -> str:
        """A short hash of the named settings (and `extra`): a stage's outputs are reused only
        when equal."""
        values = {n: getattr(self, n) for n in names}
        if extra is not None:
            values["extra"] = extra
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


def planned_spacing(s: Settings, out: Path, train: list[str]) -> list[float]:
    """The spacing `finetune.py train`'s plan chooses for the training cases with the
    benchmark's patch, starting from pre-trained weights (`finetune_plan.make_plan` on their
    fingerprint); kept in `out`/planned_spacing.json."""
    path = out / "planned_spacing.json"
    digest = s.digest("test_cases", "split_seed", "patch", "n_base_filters", "finetune_batch_size")
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("digest") == digest:
            return kept["spacing"]
    from finetune_cases import discover_segmentation, fingerprint_cases
    from finetune_plan import dataset_fingerprint, make_plan

    source = discover_segmentation(str(case_folder(out / "train_cases", train)))
    fingerprint = dataset_fingerprint(fingerprint_cases(source, 0, progress=False))
    plan = make_plan(
        fingerprint,
        modality="ct",
        pretrained=True,
        patch=s.patch,
        batch_size=s.finetune_batch_size,
        n_base_filters=s.n_base_filters,
        n_classes=source.n_classes,
    )
    spacing = [round(float(v), 4) for v in plan.spacing]
    write_json(path, {"digest": digest, "spacing": spacing, "cases": len(train)})
    return spacing


def extract(
    s: Settings,
    out: Path,
    py: str,
    train: list[str],
    spacing: list[float],
    times: dict,
    reuse: Path | None = None,
) -> Path:
    """Cubes of every unlabelled CT at hand but the test cases: the two chest CTs and the
    training cases' images, at `spacing`. Returns the cube file (its CSV beside it)."""
    folder = out / "cubes"
    digest = s.digest("train_scale", "test_cases", "split_seed", extra=spacing)
    cubes = folder / "pretrain_cubes.npy"
    if borrow_stage(folder, reuse, digest):
        log(f"extraction: kept {folder}")
        times["extract_s"] = stage_seconds(folder)
        return cubes
    clear_stage(folder)
    volumes = folder / "volumes"
    volumes.mkdir(parents=True)
    for name in CHEST_CTS:
        (volumes / name).symlink_to(SHARED / name)
    for case in train:
        name = f"{case}_0000.nii.gz"
        (volumes / name).symlink_to(SHARED / "sts_ct" / "imagesTr" / name)
    t = run(
        [
            py,
            ROOT / "infinite_generator_3D.py",
            "--input",
            volumes,
            "--output",
            cubes,
            "--preset",
            "ct",
            "--spacing",
            *spacing,
            "--scale",
            s.train_scale,
            "--input_deps",
            s.patch[2],
            "--input_rows",
            s.patch[0],
            "--input_cols",
            s.patch[1],
            "--crop_rows",
            s.patch[0],
            "--crop_cols",
            s.patch[1],
            "--no-progress",
        ],
        folder / "extract.log",
    )
    times["extract_s"] = round(t, 1)
    mark_done(folder, digest, t)
    return cubes


def pretrain(
    s: Settings,
    out: Path,
    py: str,
    cubes: Path,
    times: dict,
    reuse: Path | None = None,
) -> tuple[Path, list[dict]]:
    """Pre-train on the cube file, a fifth of its volumes held out. Returns the weights and the
    trainer's CSV rows."""
    folder = out / "pretrain"
    digest = s.digest(
        "train_scale",
        "test_cases",
        "split_seed",
        "n_base_filters",
        "pretrain_epochs",
        "pretrain_steps",
        "pretrain_validation_steps",
        "pretrain_batch_size",
        "pretrain_lr",
        "pretrain_valid_fraction",
        extra=stage_digest(out / "cubes"),
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
                    "--train_files",
                    cubes,
                    "--valid_fraction",
                    s.pretrain_valid_fraction,
                    "--scale",
                    s.train_scale,
                    "--input_rows",
                    s.patch[0],
                    "--input_cols",
                    s.patch[1],
                    "--input_deps",
                    s.patch[2],
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


def stage_digest(folder: Path) -> str | None:
    """The settings digest a done stage was stamped with (None when not done)."""
    stamp = folder / "stage.done"
    return stamp.read_text().strip() if stamp.exists() else None


def resolve_pretrained(spec: str) -> tuple[str, int]:
    """The weight file `--pretrained` names (a path, or ``hf:FILE`` fetched through the
    Hugging Face cache) and its number of base filters.

    Raises:
        SystemExit: no such file, an ``hf:`` name that cannot be fetched, or not U-Net weights.
    """
    from finetune_cases import FinetuneInputError
    from finetune_prepare import resolve_weights, weight_file_width

    try:
        path = resolve_weights(spec)
        if path is None:
            raise FinetuneInputError(
                f"Expected a weight file or hf:FILE for --pretrained. Received: {spec!r}"
            )
        _, width = weight_file_width(path)
    except FinetuneInputError as exc:
        raise SystemExit(f"error: --pretrained: {exc}") from None
    return path, width


def identity_losses(pretrain_dir: Path, epochs: int) -> list[float]:
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
            {**saved, "model_path": tmp, "logs_path": tmp, "resume": False}
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


def per_case_dice(report_path: Path) -> dict[str, float]:
    """Foreground Dice per case (the mean over foreground classes) from `finetune.py evaluate`'s
    JSON report, whose "cases" list has one entry per case and class."""
    report = json.loads(report_path.read_text())
    per_case: dict[str, list[float]] = {}
    for entry in report["cases"]:
        per_case.setdefault(entry["case"], []).append(float(entry["dice"]))
    return {case: statistics.fmean(values) for case, values in per_case.items()}


def arm_flags(arm: str, pretrain_spacing: list[float] | None) -> list:
    """The arm's further `finetune.py train` flags, the pre-training spacing (x, y, z mm) in
    place of PRETRAIN_SPACING."""
    flags: list = []
    for flag in ARMS[arm][2]:
        if flag != PRETRAIN_SPACING:
            flags.append(flag)
        elif pretrain_spacing is None:
            raise ValueError(f"arm {arm} needs the pre-training spacing; none was given")
        else:
            flags.extend(pretrain_spacing)
    return flags


def finetune_one(
    s: Settings,
    out: Path,
    py: str,
    arm: str,
    budget: int,
    seed: int,
    weights: Path | str,
    weights_id: str | None,
    width: int,
    train_cases: list[str],
    test_dir: Path,
    pretrain_spacing: list[float] | None = None,
) -> dict:
    """Train, predict and evaluate one (arm, budget, seed) run; kept when done with the same
    settings and, for the Genesis arms, the same weights (`weights_id`). `pretrain_spacing`
    (x, y, z mm) stands in for PRETRAIN_SPACING in an arm's flags."""
    init, recipe, _ = ARMS[arm]
    flags = arm_flags(arm, pretrain_spacing)
    name = f"{arm}_n{budget:02d}_seed{seed}"
    folder = out / "finetune" / name
    digest = s.digest(
        "patch",
        "finetune_epochs",
        "finetune_steps",
        "finetune_batch_size",
        "tta",
        "overlap",
        "test_cases",
        "split_seed",
        # Only named when on, so that the stamps of runs without it stay valid.
        *(("freeze_encoder",) if init == "genesis" and s.freeze_encoder else ()),
        # The spacing only for the arms that take it, so that the other stamps stay valid
        # (scratch runs have no weights whose stamp would pin it).
        extra=[
            width,
            weights_id if init == "genesis" else None,
            *([pretrain_spacing] if needs_pretrain_spacing(arm) else []),
        ],
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
        *("--data", data, "--output", run_dir),
        *("--weights", weights if init == "genesis" else "none"),
        *("--patch", *s.patch, "--batch_size", s.finetune_batch_size),
        *("--epochs", s.finetune_epochs, "--steps_per_epoch", s.finetune_steps),
        *("--seed", seed, "--workers", 1, "--verbose", 2, "--cache", out / "cache"),
    ]
    if init == "scratch":
        cmd += ["--n_base_filters", width]
    elif s.freeze_encoder:
        cmd += ["--freeze_encoder"]
    if recipe == "original":
        # The original's settings; channels-last only for speed (the same arithmetic).
        cmd += ["--recipe", "original", "--data_format", "channels_last"]
    cmd += flags
    t_train = run(cmd, folder / "train.log")
    t_pred = run(
        [
            py,
            ROOT / "keras" / "finetune.py",
            "predict",
            *("--model", run_dir, "--input", test_dir / "imagesTr"),
            *("--output", folder / "predictions", "--overlap", s.overlap, "--tta", s.tta),
        ],
        folder / "predict.log",
    )
    t_eval = run(
        [
            py,
            ROOT / "keras" / "finetune.py",
            "evaluate",
            *("--predictions", folder / "predictions", "--labels", test_dir / "labelsTr"),
            *("--output", folder / "report.json"),
        ],
        folder / "evaluate.log",
    )
    dice = per_case_dice(folder / "report.json")
    result = {
        "name": name,
        "arm": arm,
        "init": init,
        "recipe": recipe,
        "budget": budget,
        "seed": seed,
        "train_cases": train_cases[:budget],
        "plan": json.loads((run_dir / "plan.json").read_text())
        if (run_dir / "plan.json").exists()
        else None,
        "dice": dice,
        "mean_dice": statistics.fmean(dice.values()),
        "train_s": round(t_train, 1),
        "predict_s": round(t_pred, 1),
        "evaluate_s": round(t_eval, 1),
    }
    write_json(str(result_path), result)
    mark_done(folder, digest)
    return result


def ellipsoid_rows(test: list[str], train: list[str], budgets: list[int]) -> list[dict]:
    """The two centred ellipsoids of benchmarks/centred_prior.py, sized from each budget's
    training masks, scored on the test cases: {budget, prior, dice: {case: Dice}, mean_dice}."""
    import centred_prior

    labels = SHARED / "sts_ct" / "labelsTr"
    test_labels = [labels / f"{c}.nii.gz" for c in test]
    rows = []
    for budget in budgets:
        train_labels = [labels / f"{c}.nii.gz" for c in train[:budget]]
        for mode in ("fixed", "margin"):
            dice = centred_prior.score_prior(train_labels, test_labels, mode)
            rows.append(
                {
                    "budget": budget,
                    "prior": mode,
                    "dice": dice,
                    "mean_dice": statistics.fmean(dice.values()),
                }
            )
    return rows


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
        epilog="examples:\n"
        "  .venv/bin/python benchmarks/bench_transfer.py\n"
        "  .venv/bin/python benchmarks/bench_transfer.py --scale gpu "
        "--pretrained hf:Genesis_Chest_CT.h5",
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
        help="output folder (default: benchmarks/results/transfer_{scale}[_tiny][_pretrained])",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="FILE",
        help="fine-tune the Genesis arms from this weight file (or hf:Genesis_Chest_CT.h5, the "
        "published weights) instead of pre-training here; scratch takes its width",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default: 0 1 2 3 4)"
    )
    p.add_argument(
        "--budgets", type=int, nargs="+", default=None, help="numbers of labelled training cases"
    )
    p.add_argument(
        "--arms",
        nargs="+",
        choices=list(ARMS),
        default=list(DEFAULT_ARMS),
        help="arms to run (default: %(default)s); scratch_ct_window trains from scratch on the "
        "pre-trained weights' intensity window, genesis_ct_foreground fine-tunes the weights on "
        "scratch's z-scored intensities, genesis_pretrain_spacing does so at the spacing the "
        "weights were pre-trained at and scratch_pretrain_spacing trains from scratch there (not "
        "with --pretrained, whose spacing is not known); arms "
        "other than genesis and scratch run at extra_arm_budgets only",
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
    needs_spacing = [a for a in args.arms if needs_pretrain_spacing(a)]
    if args.pretrained and needs_spacing:
        print(
            f"error: expected arms that do not need the pre-training spacing with --pretrained "
            f"(the file's is not known). Received: --arms {' '.join(needs_spacing)}",
            file=sys.stderr,
        )
        return 2
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
    apply_overrides(s, args.overrides)
    reuse = Path(args.reuse) if args.reuse else None
    if reuse is not None and not (reuse / "settings.json").exists():
        print(
            f"error: expected --reuse to be an earlier run's output folder with a "
            f"settings.json. Received: --reuse {args.reuse}",
            file=sys.stderr,
        )
        return 2
    pretrained = resolve_pretrained(args.pretrained) if args.pretrained else None
    out = Path(
        args.out
        or ROOT
        / "benchmarks"
        / "results"
        / (f"transfer_{s.scale}{'_tiny' if s.tiny else ''}{'_pretrained' if pretrained else ''}")
    )
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(dataclasses.asdict(s), indent=2), flush=True)
    write_json(str(out / "settings.json"), dataclasses.asdict(s))
    t_start = time.perf_counter()
    times: dict[str, Any] = {}

    if reuse is not None and (reuse / "cache").is_dir() and not (out / "cache").exists():
        (out / "cache").symlink_to((reuse / "cache").resolve(), target_is_directory=True)
    test, train = split_cases(s, out)
    test_dir = case_folder(out / "test_cases", test)
    log(f"held-out test cases ({len(test)}): {' '.join(test)}")
    pretrain_rows: list[dict] = []
    spacing = None
    if pretrained is not None:
        weights, width = pretrained
        with open(weights, "rb") as f:
            weights_id = hashlib.file_digest(f, "sha256").hexdigest()[:12]
        log(f"pre-trained weights: {weights} ({width} base filters); no pre-training here")
    else:
        width = s.n_base_filters
        spacing = planned_spacing(s, out, train)
        log(f"pre-training spacing (the fine-tuning plan's): {spacing} mm")
        cubes = extract(s, out, args.python, train, spacing, times, reuse)
        weights, pretrain_rows = pretrain(s, out, args.python, cubes, times, reuse)
        weights_id = stage_digest(out / "pretrain")
        identity = identity_losses(out / "pretrain", len(pretrain_rows))
        for row, value in zip(pretrain_rows, identity, strict=True):
            row["identity_val_loss"] = value

    runs = []
    for budget in s.budgets:
        for seed in s.seeds:
            for arm in args.arms:
                if arm not in INITS and budget not in s.extra_arm_budgets:
                    continue
                r = finetune_one(
                    s,
                    out,
                    args.python,
                    arm,
                    budget,
                    seed,
                    weights,
                    weights_id,
                    width,
                    train,
                    test_dir,
                    spacing,
                )
                log(f"{r['name']}: mean Dice {r['mean_dice']:.3f} (train {r['train_s']} s)")
                runs.append(r)
    priors = ellipsoid_rows(test, train, s.budgets)
    rows = summarise(runs)
    pairs = [
        row
        for a, b in (
            ("genesis", "scratch"),
            ("genesis", "scratch_ct_window"),
            ("genesis_ct_foreground", "scratch"),
            ("genesis_pretrain_spacing", "genesis_ct_foreground"),
            ("scratch_pretrain_spacing", "scratch"),
            ("genesis_pretrain_spacing", "scratch_pretrain_spacing"),
            ("genesis", "genesis_original"),
        )
        for row in paired(runs, a, b, s.bootstrap)
    ]
    times["finetune_s"] = round(
        sum(r["train_s"] + r["predict_s"] + r["evaluate_s"] for r in runs), 1
    )
    # Every stage's own time, also of those this invocation kept from an earlier one.
    parts = [times.get("extract_s", 0.0), times.get("pretrain_s", 0.0), times["finetune_s"]]
    times["stages_s"] = round(sum(parts), 1) if None not in parts else None
    times["total_s"] = round(time.perf_counter() - t_start, 1)  # this invocation
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "command": "python benchmarks/bench_transfer.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": dataclasses.asdict(s),
        "pretrained": args.pretrained,
        "pretrain_spacing": spacing,
        "test_cases": test,
        "times": times,
        "pretraining": pretrain_rows,
        "summary": rows,
        "paired": pairs,
        "priors": priors,
        "runs": runs,
    }
    write_json(str(out / "transfer.json"), results)
    source = f"from {args.pretrained}" if args.pretrained else "pre-trained here"
    plot(
        rows,
        runs,
        pairs,
        priors,
        pretrain_rows,
        out / "transfer.png",
        f"Models Genesis ({source}) vs scratch, default recipe, {s.scale} scale"
        f"{' (tiny)' if s.tiny else ''}, {width} base filters, {len(s.seeds)} seeds, "
        f"{len(test)} test cases",
    )
    print(table(rows, priors))
    if pairs:
        print(paired_table(pairs))
    if pretrain_rows:
        print(f"pre-training val_loss by epoch: {[round(r['val_loss'], 5) for r in pretrain_rows]}")
        print(
            "held-out loss of the input returned unchanged, by epoch: "
            f"{[round(r['identity_val_loss'], 4) for r in pretrain_rows]}"
        )
    print(f"times: {times}; results in {out}/transfer.json, plot {out}/transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
