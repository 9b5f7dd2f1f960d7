#!/usr/bin/env python
"""Compare variants of the transfer benchmark at one label budget: a table and a strip plot.

Each variant is a `bench_transfer.py` output folder (its transfer.json), usually made with
`--reuse` and `--set`; every seed's mean tumour Dice is one point, the bar is the mean over
seeds. Variants that ran only the Genesis initialisation show only that.

Example:
    .venv/bin/python benchmarks/plot_transfer_variants.py --budget 7 \\
        --variant "as in the table=benchmarks/results/transfer_cpu" \\
        --variant "frozen encoder=benchmarks/results/exp_freeze" \\
        --png docs/transfer_variants.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure  # noqa: E402  (benchmarks/ is not a package)

INITS = ("genesis", "scratch")
COLOURS = {"genesis": "tab:red", "scratch": "tab:blue"}


def load_cells(folder: Path, budget: int) -> dict[str, list[tuple[int, float]]]:
    """(seed, mean Dice) of every run at `budget` in a benchmark folder, per initialisation.

    Raises:
        SystemExit: the folder has no transfer.json, or no run at that budget.
    """
    path = folder / "transfer.json"
    if not path.exists():
        raise SystemExit(f"Expected a bench_transfer.py output folder. Received: {folder}")
    runs = json.loads(path.read_text())["runs"]
    cells: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        # Runs of other arms (the original's recipe) are not variants of these two.
        arm = r.get("arm", r["init"])
        if r["budget"] == budget and arm in INITS:
            cells.setdefault(arm, []).append((r["seed"], r["mean_dice"]))
    if not cells:
        raise SystemExit(f"Expected runs with {budget} labelled cases in {path}. Received: none")
    return {init: sorted(v) for init, v in cells.items()}


def table(variants: list[tuple[str, dict[str, list[tuple[int, float]]]]]) -> str:
    """A Markdown table: one row per variant and initialisation."""
    lines = [
        "| variant | initialisation | seeds | Dice per seed | mean | std |",
        "|---|---|---|---|---|---|",
    ]
    for label, cells in variants:
        for init in INITS:
            if init not in cells:
                continue
            values = [d for _, d in cells[init]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            per_seed = ", ".join(f"{d:.3f}" for d in values)
            lines.append(
                f"| {label} | {init} | {len(values)} | {per_seed} | "
                f"{statistics.fmean(values):.3f} | {std:.3f} |"
            )
    return "\n".join(lines)


def plot(
    variants: list[tuple[str, dict[str, list[tuple[int, float]]]]], budget: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.9 * len(variants) + 2.5, 4.2))
    for i, (_, cells) in enumerate(variants):
        for init in INITS:
            if init not in cells:
                continue
            x = i + (-0.13 if init == "genesis" else 0.13)
            values = [d for _, d in cells[init]]
            ax.scatter([x] * len(values), values, color=COLOURS[init], alpha=0.6, s=22)
            ax.hlines(statistics.fmean(values), x - 0.1, x + 0.1, color=COLOURS[init], lw=2.5)
    for init in INITS:
        ax.scatter([], [], color=COLOURS[init], label=f"{init} (points: seeds, bar: mean)")
    ax.set_xticks(range(len(variants)), [label for label, _ in variants], fontsize=8)
    ax.set_ylabel("mean tumour Dice on the held-out cases")
    ax.set_title(f"Variants of the transfer benchmark, {budget} labelled cases")
    ax.set_ylim(bottom=-0.02)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--budget", type=int, default=7, help="labelled cases (default: 7)")
    p.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="LABEL=FOLDER",
        help="a label for the plot and a bench_transfer.py output folder (repeatable)",
    )
    p.add_argument("--png", default=None, help="write the strip plot here")
    args = p.parse_args(argv)
    variants = []
    for item in args.variant:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"Expected --variant LABEL=FOLDER. Received: --variant {item!r}")
        variants.append((label.replace("\\n", "\n"), load_cells(Path(folder), args.budget)))
    print(table([(label.replace("\n", " "), cells) for label, cells in variants]))
    if args.png:
        plot(variants, args.budget, Path(args.png))
        print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
