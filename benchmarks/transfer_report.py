"""The transfer benchmark's arms and its report: per-cell summaries, paired differences with
bootstrap intervals, Markdown tables and the figure (benchmarks/bench_transfer.py runs it)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from common import bootstrap_interval, save_figure

# Arm -> (initialisation, fine-tuning recipe, further flags). The order is the tables' and the
# plot's. The default recipe maps CT intensities differently with and without pre-trained
# weights (the weights' window, or the foreground's z-score); scratch_ct_window trains from
# scratch on the weights' window, so that genesis - scratch_ct_window is the weights alone, and
# genesis_ct_foreground fine-tunes the weights on the z-scored intensities scratch gets, and
# genesis_pretrain_spacing does the same at the spacing the weights were pre-trained at instead
# of the one the plan chooses for the fine-tuning cases (PRETRAIN_SPACING stands for it);
# scratch_pretrain_spacing trains from scratch at that spacing, to tell the spacing's effect on
# any network from its effect on pre-trained weights.
PRETRAIN_SPACING = "<pretrain spacing>"
ARMS: dict[str, tuple[str, str, list[str]]] = {
    "genesis": ("genesis", "default", []),
    "scratch": ("scratch", "default", []),
    "genesis_original": ("genesis", "original", []),
    "scratch_ct_window": ("scratch", "default", ["--intensity", "ct"]),
    "genesis_ct_foreground": ("genesis", "default", ["--intensity", "ct_foreground"]),
    "genesis_pretrain_spacing": (
        "genesis",
        "default",
        ["--intensity", "ct_foreground", "--spacing", PRETRAIN_SPACING],
    ),
    "scratch_pretrain_spacing": ("scratch", "default", ["--spacing", PRETRAIN_SPACING]),
}
DEFAULT_ARMS = ("genesis", "scratch", "genesis_original")
INITS = ("genesis", "scratch")


def needs_pretrain_spacing(arm: str) -> bool:
    """Whether the arm trains at the spacing the weights were pre-trained at."""
    return PRETRAIN_SPACING in ARMS[arm][2]


def summarise(runs: list[dict]) -> list[dict]:
    """Mean, standard deviation, minimum and maximum of the mean Dice over seeds, per cell.

    Args:
        runs: results with keys arm (or init), budget, seed and mean_dice.

    Returns:
        One row per (budget, arm), sorted by budget then the order of ARMS.
    """
    cells: dict[tuple[int, str], list[float]] = {}
    for r in runs:
        cells.setdefault((r["budget"], r.get("arm", r["init"])), []).append(r["mean_dice"])
    rows = []
    for (budget, arm), values in sorted(
        cells.items(), key=lambda kv: (kv[0][0], list(ARMS).index(kv[0][1]))
    ):
        rows.append(
            {
                "budget": budget,
                "arm": arm,
                "seeds": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        )
    return rows


def paired(runs: list[dict], a: str, b: str, n_boot: int, seed: int = 0) -> list[dict]:
    """Arm `a` minus arm `b`, run by run (the same budget and seed: the same training cases and
    test cases), per budget: the mean difference, its 95 % bootstrap interval over seeds and
    test cases, and in how many runs `a` scored higher.

    Args:
        runs: results with keys arm, budget, seed, dice ({case: Dice}) and mean_dice.
        a, b: the arms compared.
        n_boot: bootstrap draws.
        seed: the bootstrap generator's seed.

    Returns:
        One row per budget that has both arms.
    """
    by_key = {(r["budget"], r["seed"], r.get("arm", r["init"])): r for r in runs}
    rows = []
    for budget in sorted({r["budget"] for r in runs}):
        seeds = [
            sd
            for sd in sorted({r["seed"] for r in runs if r["budget"] == budget})
            if (budget, sd, a) in by_key and (budget, sd, b) in by_key
        ]
        if not seeds:
            continue
        cases = sorted(by_key[(budget, seeds[0], a)]["dice"])
        diffs = np.array(
            [
                [
                    by_key[(budget, sd, a)]["dice"][c] - by_key[(budget, sd, b)]["dice"][c]
                    for c in cases
                ]
                for sd in seeds
            ]
        )
        per_run = diffs.mean(axis=1)
        low, high = bootstrap_interval(diffs, n_boot, np.random.default_rng(seed))
        rows.append(
            {
                "budget": budget,
                "a": a,
                "b": b,
                "pairs": len(seeds),
                "cases": len(cases),
                "mean_difference": float(diffs.mean()),
                "ci_low": low,
                "ci_high": high,
                "run_differences": [float(d) for d in per_run],
                "a_higher": int((per_run > 0).sum()),
            }
        )
    return rows


def paired_table(rows: list[dict]) -> str:
    lines = [
        "| labelled cases | comparison | runs (seeds) | mean difference | 95 % interval | "
        "higher in |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['a']} - {r['b']} | {r['pairs']} | "
            f"{r['mean_difference']:+.3f} | {r['ci_low']:+.3f} .. {r['ci_high']:+.3f} | "
            f"{r['a_higher']} of {r['pairs']} |"
        )
    return "\n".join(lines)


def table(rows: list[dict], priors: list[dict] | None = None) -> str:
    lines = [
        "| labelled cases | arm | seeds | Dice mean | std | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['arm']} | {r['seeds']} | {r['mean']:.3f} | {r['std']:.3f} "
            f"| {r['min']:.3f} | {r['max']:.3f} |"
        )
    for p in priors or []:
        lines.append(
            f"| {p['budget']} | centred ellipsoid ({p['prior']}) | - | {p['mean_dice']:.3f} "
            "| - | - | - |"
        )
    return "\n".join(lines)


COLOURS = {
    "genesis": "tab:red",
    "scratch": "tab:blue",
    "genesis_original": "tab:orange",
    "scratch_ct_window": "tab:cyan",
    "genesis_ct_foreground": "tab:purple",
    "genesis_pretrain_spacing": "tab:green",
    "scratch_pretrain_spacing": "tab:olive",
}


def plot(
    rows: list[dict],
    runs: list[dict],
    pairs: list[dict],
    priors: list[dict],
    pretrain_rows: list[dict],
    path: Path,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    budgets = sorted({r["budget"] for r in rows})
    offsets = {arm: (i - (len(ARMS) - 1) / 2) * 0.13 for i, arm in enumerate(ARMS)}
    for arm in ARMS:
        cell = [r for r in rows if r["arm"] == arm]
        if not cell:
            continue
        xs = [budgets.index(r["budget"]) + offsets[arm] for r in cell]
        ax1.errorbar(
            xs,
            [r["mean"] for r in cell],
            yerr=[r["std"] for r in cell],
            color=COLOURS[arm],
            marker="o",
            ls="-" if len(cell) > 1 else "none",
            capsize=4,
            label=f"{arm} (mean ± std)",
        )
        pts = [r for r in runs if r.get("arm", r["init"]) == arm]
        ax1.scatter(
            [budgets.index(r["budget"]) + offsets[arm] for r in pts],
            [r["mean_dice"] for r in pts],
            color=COLOURS[arm],
            alpha=0.35,
            s=14,
        )
    for mode, style in (("fixed", ":"), ("margin", "--")):
        cell = [p for p in priors if p["prior"] == mode and p["budget"] in budgets]
        for p in cell:
            i = budgets.index(p["budget"])
            ax1.hlines(p["mean_dice"], i - 0.4, i + 0.4, colors="grey", linestyles=style)
        if cell:
            ax1.plot([], [], color="grey", ls=style, label=f"centred ellipsoid ({mode})")
    ax1.set_xticks(range(len(budgets)), [str(b) for b in budgets])
    ax1.set_xlabel("labelled training cases")
    ax1.set_ylabel("mean tumour Dice on the test cases")
    ax1.set_title("Fine-tuning on sts_ct")
    ax1.set_ylim(0.0, 1.0)
    ax1.legend(fontsize=7, loc="upper left")
    ax1.grid(alpha=0.3)

    labels = []
    for i, p in enumerate(pairs):
        ax2.scatter(
            [i] * len(p["run_differences"]), p["run_differences"], color="grey", alpha=0.5, s=14
        )
        ax2.errorbar(
            [i + 0.15],
            [p["mean_difference"]],
            yerr=[[p["mean_difference"] - p["ci_low"]], [p["ci_high"] - p["mean_difference"]]],
            color="black",
            marker="D",
            capsize=5,
        )
        labels.append(f"{p['a']}\n- {p['b']}\n{p['budget']} cases")
    ax2.axhline(0.0, color="grey", lw=1)
    ax2.set_xticks(range(len(pairs)), labels, fontsize=8)
    ax2.set_ylabel("Dice difference (runs; mean, 95 % interval)")
    ax2.set_title("Paired differences")
    ax2.grid(alpha=0.3)

    if pretrain_rows:
        epochs = [int(r["epoch"]) + 1 for r in pretrain_rows]
        ax3.plot(epochs, [r["loss"] for r in pretrain_rows], marker="o", label="training cubes")
        ax3.plot(
            epochs, [r["val_loss"] for r in pretrain_rows], marker="o", label="held-out volumes"
        )
        if all("identity_val_loss" in r for r in pretrain_rows):
            ax3.plot(
                epochs,
                [r["identity_val_loss"] for r in pretrain_rows],
                ls="--",
                color="grey",
                label="held-out, input returned unchanged",
            )
        ax3.set_yscale("log")
        ax3.xaxis.get_major_locator().set_params(integer=True)
        ax3.set_xlabel("pre-training epoch")
        ax3.set_ylabel("restoration loss (MSE, log scale)")
        ax3.legend(fontsize=8)
        ax3.grid(alpha=0.3)
    else:
        ax3.text(0.5, 0.5, "pre-trained weights given\n(--pretrained)", ha="center", va="center")
        ax3.set_axis_off()
    ax3.set_title("Pre-training")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
