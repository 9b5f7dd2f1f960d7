#!/usr/bin/env python
"""Which fine-tuning recipe, by cross-validation on the 36 sts_ct cases, in one command.

The cases are split into K folds (a seeded permutation). For each fold and each arm, the
arm's `finetune.py train` runs on the other folds' cases (its own validation split comes out of
those), `finetune.py predict` segments the fold's cases (also with mirroring for the arms named by
--mirrored), and the
per-case Dice is computed here, with and without keeping only the largest connected tumour.
Beside the arms, the same held-out cases are scored by two centred ellipsoids sized from the
training folds' masks (benchmarks/centred_prior.py), which look at no voxel.

Every arm trains the same way apart from its recipe: scratch, `--n_base_filters 8
--batch_size 2 --patch 64 64 32 --epochs 64 --steps_per_epoch 8 --validation_steps 8` (the
CPU budget of docs/finetuning.md's sts_ct example). Arms:

* default: the project's default recipe (plan, augmentation, loss, schedule);
* original: `--recipe original` (the original's settings; channels-last only for speed, the
  same arithmetic);
* the components (`--arms all`): the default recipe with one part changed, each named after the
  change (`COMPONENTS`: no augmentation, the original's batch-norm momentum, schedule or loss,
  more patches on foreground, mixed bfloat16);
* further arms with `--arm NAME='FLAGS'`.

Each (arm, fold) keeps its outputs in --out and is skipped on a rerun when done with the same
settings. Prints a table of each arm's Dice and one of paired differences against --reference
(the same held-out cases; a 95 % bootstrap interval over cases); writes recipe.json and
recipe.png.

Example:
    .venv/bin/python benchmarks/bench_recipe.py                        # 3 folds, both arms
    .venv/bin/python benchmarks/bench_recipe.py --arms all             # and every component
    .venv/bin/python benchmarks/bench_recipe.py --tiny                 # smoke test, minutes
    .venv/bin/python benchmarks/bench_recipe.py --arm sgd='--optimizer sgd_nesterov --lr 0.01'
    .venv/bin/python benchmarks/bench_recipe.py --arms default --arm no_augment='--augment none'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "keras"))
from common import bootstrap_interval, case_folder, save_figure, write_json  # noqa: E402

import centred_prior  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
STS = SHARED / "sts_ct"
BUDGET = [
    *("--weights", "none", "--n_base_filters", "8", "--batch_size", "2"),
    *("--patch", "64", "64", "32", "--epochs", "64", "--steps_per_epoch", "8"),
    # The same validation for every arm (it picks the kept model, and costs time).
    *("--validation_steps", "8"),
]
TINY_BUDGET = [
    *("--weights", "none", "--n_base_filters", "4", "--batch_size", "2"),
    *("--patch", "32", "32", "16", "--epochs", "2", "--steps_per_epoch", "2"),
    *("--validation_steps", "1"),
]
ARMS = {
    "default": [],
    "original": ["--recipe", "original", "--data_format", "channels_last"],
}
# The default recipe with one part changed: what each part is worth.
COMPONENTS = {
    "no_augment": ["--augment", "none"],
    "bn_0.99": ["--bn_momentum", "0.99"],
    "plateau": ["--schedule", "plateau"],
    "dice_coef_loss": ["--loss", "dice_coef_loss"],
    "foreground_0.67": ["--foreground_fraction", "0.67"],
    "bfloat16": ["--mixed_precision"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list, log_path: Path) -> float:
    """Run a command, its output into `log_path`; seconds taken. Stops on failure."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    log("$ " + " ".join(str(c) for c in cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        rc = subprocess.call([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise SystemExit(f"command failed ({rc}), log {log_path}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def all_cases() -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (STS / "labelsTr").glob("*.nii.gz"))


def folds_of(cases: list[str], k: int, seed: int) -> list[list[str]]:
    """K folds of a seeded permutation of the cases, each sorted."""
    order = np.random.default_rng(seed).permutation(len(cases))
    return [sorted(cases[i] for i in order[f::k]) for f in range(k)]


def score_folder(pred_dir: Path, cases: list[str]) -> dict[str, dict[str, float]]:
    """Per case, the tumour Dice of the prediction as written, and of its largest piece."""
    import volume_io
    from finetune_predict import keep_largest_component

    out: dict[str, dict[str, float]] = {"raw": {}, "largest": {}}
    for case in cases:
        truth = volume_io.image_to_array(volume_io.read_image(STS / "labelsTr" / f"{case}.nii.gz"))
        pred = volume_io.image_to_array(volume_io.read_image(pred_dir / f"{case}.nii.gz"))
        out["raw"][case] = centred_prior.dice(pred > 0, truth > 0)
        out["largest"][case] = centred_prior.dice(keep_largest_component(pred) > 0, truth > 0)
    return out


def _digest(flags: list, budget: list, train: list, test: list, seed: int, mirrored: bool) -> str:
    return hashlib.sha256(
        json.dumps([flags, budget, train, test, seed, mirrored]).encode()
    ).hexdigest()


def _predict(folder: Path, cases: list, tta: str, py: str) -> tuple[dict, float]:
    """Segment the fold's test cases with the arm's model; (scores by variant, seconds)."""
    pred = folder / f"pred_tta_{tta}"
    seconds = run(
        [
            py,
            ROOT / "keras" / "finetune.py",
            "predict",
            "--model",
            folder / "run",
            "--input",
            folder / "test" / "imagesTr",
            "--output",
            pred,
            "--tta",
            tta,
            "--postprocess",
            "none",
        ],
        folder / f"predict_tta_{tta}.log",
    )
    scores = {f"tta_{tta}/{post}": v for post, v in score_folder(pred, cases).items()}
    return scores, round(seconds, 1)


def one_run(
    out: Path,
    arm: str,
    flags: list[str],
    fold: int,
    train: list,
    test: list,
    budget: list,
    seed: int,
    py: str,
    mirrored: bool = False,
) -> dict:
    """Train one arm on one fold's training cases, predict and score its test cases.

    A kept run is reused when it had the same settings; asked for mirroring as well, a kept run
    without it is only predicted again, not trained again.
    """
    folder = out / arm / f"fold{fold}"
    plain, with_mirror = (_digest(flags, budget, train, test, seed, m) for m in (False, True))
    digest = with_mirror if mirrored else plain
    result_path = folder / "result.json"
    kept = json.loads(result_path.read_text()) if result_path.exists() else {}
    # A run kept with mirroring serves one asked without it too (it holds both predictions).
    if kept.get("digest") in (digest, with_mirror):
        log(f"{arm} fold {fold}: kept")
        return kept
    if mirrored and kept.get("digest") == plain and (folder / "run").is_dir():
        log(f"{arm} fold {fold}: kept, predicted again with mirroring")
        scores, seconds = _predict(folder, test, "on", py)
        kept["dice"].update(scores)
        kept["seconds"]["predict_tta_on"] = seconds
        kept["digest"] = digest
        write_json(str(result_path), kept)
        return kept
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = case_folder(folder / "data", train)
    case_folder(folder / "test", test)
    t_train = run(
        [
            py,
            ROOT / "keras" / "finetune.py",
            "train",
            "--data",
            data,
            "--output",
            folder / "run",
            *budget,
            "--seed",
            seed,
            "--verbose",
            2,
            # Last, so that an arm's own flags (even --seed or the budget's) win.
            *flags,
        ],
        folder / "train.log",
    )
    dice, seconds = {}, {"train": round(t_train, 1)}
    for tta in ("off", "on") if mirrored else ("off",):
        scores, seconds[f"predict_tta_{tta}"] = _predict(folder, test, tta, py)
        dice.update(scores)
    result = {
        "arm": arm,
        "fold": fold,
        "flags": flags,
        "train_cases": train,
        "test_cases": test,
        "dice": dice,
        "seconds": seconds,
        "digest": digest,
    }
    write_json(str(result_path), result)
    return result


def summary_rows(results: list[dict], priors: dict[str, dict[str, float]]) -> list[dict]:
    """One row per (arm, prediction variant): mean and spread of the per-case Dice pooled over
    folds, and the spread of the fold means."""
    rows = []
    variants = sorted({v for r in results for v in r["dice"]})
    for arm in dict.fromkeys(r["arm"] for r in results):
        for v in variants:
            per_fold = [r["dice"][v] for r in results if r["arm"] == arm and v in r["dice"]]
            if not per_fold:  # a prediction only other arms made (mirroring)
                continue
            pooled = [d for f in per_fold for d in f.values()]
            means = [statistics.fmean(f.values()) for f in per_fold]
            rows.append(_row(f"{arm} ({v})", pooled, means))
    for name, per_case in priors.items():
        rows.append(_row(f"centred ellipsoid, {name}", list(per_case.values()), None))
    return rows


def paired_rows(
    results: list[dict],
    priors: dict[str, dict[str, float]],
    reference: str = "default",
    variant: str = "tta_off/raw",
    n_boot: int = 10000,
    seed: int = 0,
) -> list[dict]:
    """Every other arm, the reference's other predictions (largest piece, mirrored) and each
    ellipsoid minus the reference arm, case by case on the held-out cases both scored: the mean
    difference, its 95 % bootstrap interval over cases, and on how many cases the first scored
    higher.

    Args:
        results: `one_run` results (arm, dice: {variant: {case: Dice}}).
        priors: {ellipsoid: {case: Dice}}.
        reference: the arm every row is compared with.
        variant: the prediction compared ("tta_off/raw": not mirrored, every piece kept).
        n_boot: bootstrap draws.
        seed: the bootstrap generator's seed.

    Returns:
        One row per comparison; none when the reference did not run.
    """

    def per_case(arm: str, v: str) -> dict[str, float]:
        return {c: d for r in results if r["arm"] == arm for c, d in r["dice"].get(v, {}).items()}

    ref = per_case(reference, variant)
    if not ref:
        return []
    others = {
        f"{arm} ({variant})": per_case(arm, variant)
        for arm in dict.fromkeys(r["arm"] for r in results)
        if arm != reference
    }
    # The reference's other predictions: its largest piece, mirrored if it was.
    variants = {v for r in results if r["arm"] == reference for v in r["dice"]} - {variant}
    for v in sorted(variants, key=lambda v: (v != variant.replace("/raw", "/largest"), v)):
        others[f"{reference} ({v})"] = per_case(reference, v)
    others.update({f"centred ellipsoid, {name}": values for name, values in priors.items()})
    rows = []
    for name, values in others.items():
        cases = sorted(set(values) & set(ref))
        if not cases:
            continue
        diffs = np.array([values[c] - ref[c] for c in cases])
        low, high = bootstrap_interval(diffs[None, :], n_boot, np.random.default_rng(seed))
        rows.append(
            {
                "name": f"{name} - {reference} ({variant})",
                "cases": len(cases),
                "mean_difference": float(diffs.mean()),
                "ci_low": low,
                "ci_high": high,
                "higher": int((diffs > 0).sum()),
            }
        )
    return rows


def paired_table(rows: list[dict]) -> str:
    lines = [
        "| comparison | cases | mean difference | 95 % interval (cases) | higher on |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['cases']} | {r['mean_difference']:+.3f} | "
            f"{r['ci_low']:+.3f} .. {r['ci_high']:+.3f} | {r['higher']} of {r['cases']} |"
        )
    return "\n".join(lines)


def _row(name: str, pooled: list[float], fold_means: list[float] | None) -> dict:
    return {
        "name": name,
        "cases": len(pooled),
        "mean": statistics.fmean(pooled),
        "case_std": statistics.stdev(pooled) if len(pooled) > 1 else 0.0,
        "fold_std": statistics.stdev(fold_means) if fold_means and len(fold_means) > 1 else None,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| arm (prediction) | cases | mean Dice | sd over cases | sd of fold means |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        fold = "" if r["fold_std"] is None else f"{r['fold_std']:.3f}"
        lines.append(
            f"| {r['name']} | {r['cases']} | {r['mean']:.3f} | {r['case_std']:.3f} | {fold} |"
        )
    return "\n".join(lines)


def plot(
    rows: list[dict], results: list[dict], priors: dict, paired: list[dict], path: Path
) -> None:
    """Left: each held-out case's Dice per arm (bar: the mean). Right: each comparison's paired
    difference with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.4 * max(len(rows), len(paired)) + 1.4
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, height), width_ratios=(1, 1))
    for i, r in enumerate(rows):
        if r["name"].startswith("centred ellipsoid"):
            values = list(priors[r["name"].split(", ")[1]].values())
        else:
            arm, v = r["name"][:-1].split(" (")
            values = [d for res in results if res["arm"] == arm for d in res["dice"][v].values()]
        ax.scatter(
            values, np.full(len(values), i) + np.linspace(-0.2, 0.2, len(values)), s=8, alpha=0.5
        )
        ax.plot([r["mean"]] * 2, [i - 0.3, i + 0.3], color="black")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.set_xlabel("Dice per held-out case (bar: mean)")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    for i, r in enumerate(paired):
        low, high, mean = r["ci_low"], r["ci_high"], r["mean_difference"]
        colour = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:grey"
        bx.plot([low, high], [i, i], color=colour, linewidth=3)
        bx.plot([mean], [i], "o", color="black", markersize=4)
    bx.axvline(0, color="black", linewidth=0.8)
    bx.set_yticks(range(len(paired)), [f"{r['name']} ({r['cases']})" for r in paired])
    bx.set_xlabel("paired difference (bar: 95 % interval)")
    bx.yaxis.tick_right()
    bx.invert_yaxis()
    bx.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recipe")
    parser.add_argument("--folds", type=int, default=3, help="K (default: 3)")
    parser.add_argument(
        "--only_folds",
        type=int,
        nargs="+",
        default=None,
        help="run only these folds (default: all)",
    )
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(ARMS),
        choices=[*ARMS, *COMPONENTS, "all"],
        help="all: both recipes and every component (default: default original)",
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME='FLAGS'",
        help="another arm: its train flags",
    )
    parser.add_argument(
        "--reference",
        default="default",
        help="the arm the paired differences are taken against (default: default)",
    )
    parser.add_argument(
        "--reference_prediction",
        choices=("tta_off/raw", "tta_on/raw"),
        default="tta_off/raw",
        help="which of the reference's predictions: not mirrored (default) or mirrored (the "
        "reference must be among --mirrored)",
    )
    parser.add_argument("--tiny", action="store_true", help="a smoke test: 2 folds of 3 cases")
    parser.add_argument(
        "--mirrored",
        nargs="*",
        default=[],
        metavar="ARM",
        help="arms also predicted with mirroring (8 times the model's time)",
    )
    args = parser.parse_args(argv)
    if args.reference_prediction == "tta_on/raw" and args.reference not in args.mirrored:
        parser.error(
            f"expected the reference among --mirrored with --reference_prediction tta_on/raw. "
            f"Received: --reference {args.reference}, --mirrored {' '.join(args.mirrored)}"
        )
    if not STS.is_dir():
        raise SystemExit(f"Expected the sts_ct data set at {STS} (see ../shared/data/README.md).")
    known = {**ARMS, **COMPONENTS}
    names = list(known) if "all" in args.arms else args.arms
    arms = {name: known[name] for name in names}
    for item in args.arm:
        name, _, flags = item.partition("=")
        arms[name] = shlex.split(flags)
    cases = all_cases()
    budget = BUDGET
    if args.tiny:
        cases, budget, args.folds = cases[:6], TINY_BUDGET, 2
    folds = folds_of(cases, args.folds, args.split_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    results, priors = [], {"margin": {}, "fixed": {}}
    for f in args.only_folds if args.only_folds is not None else range(args.folds):
        test = folds[f]
        train = sorted(c for c in cases if c not in test)
        labels = STS / "labelsTr"
        for mode in priors:
            priors[mode].update(
                centred_prior.score_prior(
                    [labels / f"{c}.nii.gz" for c in train],
                    [labels / f"{c}.nii.gz" for c in test],
                    mode,
                )
            )
        for arm, flags in arms.items():
            results.append(
                one_run(
                    args.out,
                    arm,
                    flags,
                    f,
                    train,
                    test,
                    budget,
                    args.seed,
                    sys.executable,
                    arm in args.mirrored,
                )
            )
    rows = summary_rows(results, priors)
    print(table(rows))
    paired = paired_rows(results, priors, args.reference, args.reference_prediction)
    print(paired_table(paired))
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    write_json(
        str(args.out / "recipe.json"),
        {
            "date": time.strftime("%Y-%m-%d"),
            "commit": commit,
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "command": " ".join(sys.argv),
            "rows": rows,
            "paired": paired,
            "priors": priors,
            "runs": results,
        },
    )
    # The figure leaves out the largest-piece variants but the reference's.
    shown = [
        r
        for r in rows
        if "/largest" not in r["name"] or r["name"].startswith(f"{args.reference} (")
    ]
    plot(shown, results, priors, paired, args.out / "recipe.png")
    log(f"wrote {args.out / 'recipe.json'} and recipe.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
