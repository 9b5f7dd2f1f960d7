#!/usr/bin/env python
"""Fine-tuning speed on this machine: one training step and one prediction batch of the U-Net,
per backend, precision and tensor layout, in one command.

Each configuration runs in a fresh process (a Keras backend is chosen at import): it builds
`unet3d.unet_model_3d` with the fine-tuning head's shape, compiles it with Adam and the default
segmentation loss, and times `train_on_batch` (after warm-up) and `predict_on_batch` of a batch
of windows. Prints seconds per step, patches/s and the ratio to the first configuration (the
original's: TensorFlow, float32, channels-first).

Example:
    .venv/bin/python benchmarks/bench_finetune_step.py                     # all configurations
    .venv/bin/python benchmarks/bench_finetune_step.py --configs tensorflow:float32:channels_last
    .venv/bin/python benchmarks/bench_finetune_step.py --n_base_filters 32 --batch_size 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import write_json  # noqa: E402

CONFIGS = (
    "tensorflow:float32:channels_first",
    "tensorflow:float32:channels_last",
    "tensorflow:mixed_bfloat16:channels_last",
    "torch:float32:channels_last",
    "torch:mixed_bfloat16:channels_last",
    "jax:float32:channels_last",
)

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, keras
backend, precision, fmt = sys.argv[2].split(":")
nb, bs, pb, steps = (int(v) for v in sys.argv[3:7])
patch = tuple(int(v) for v in sys.argv[7:10])
keras.mixed_precision.set_global_policy(precision)
import unet3d
shape = (1, *patch) if fmt == "channels_first" else (*patch, 1)
model = unet3d.unet_model_3d(shape, batch_normalization=True, n_base_filters=nb,
                             data_format=fmt, n_labels=2, activation_name="softmax")
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=unet3d.bce_foreground_dice_loss(fmt))
rng = np.random.default_rng(0)
x = rng.random((bs, *shape), dtype=np.float32)
lab = (rng.random((bs, *patch)) > 0.7).astype(np.float32)
y = np.stack([1 - lab, lab], axis=1 if fmt == "channels_first" else -1)
for _ in range(2):
    model.train_on_batch(x, y)
t0 = time.perf_counter()
for _ in range(steps):
    model.train_on_batch(x, y)
step = (time.perf_counter() - t0) / steps
w = rng.random((pb, *shape), dtype=np.float32)
model.predict_on_batch(w)
t0 = time.perf_counter()
for _ in range(2):
    model.predict_on_batch(w)
window = (time.perf_counter() - t0) / 2 / pb
print("RESULT " + json.dumps({"config": sys.argv[2], "step_s": step, "window_s": window}))
"""


def measure(config: str, args: argparse.Namespace) -> dict:
    """One configuration in a fresh process; its result, or the reason it failed."""
    backend = config.split(":")[0]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(ROOT / "keras"),
        config,
        *(str(v) for v in (args.n_base_filters, args.batch_size, args.predict_batch, args.steps)),
        *(str(p) for p in args.patch),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"config": config, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="BACKEND:DTYPE:LAYOUT")
    parser.add_argument("--n_base_filters", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--predict_batch", type=int, default=8, help="windows per predict call")
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = [measure(c, args) for c in args.configs]
    base = next((r for r in results if "step_s" in r), None)
    print(
        f"U-Net {args.n_base_filters} filters, patch {'x'.join(map(str, args.patch))}, "
        f"batch {args.batch_size}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'configuration':42s} {'step s':>8s} {'patches/s':>10s} {'x first':>8s} {'window s':>9s}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['config']:42s} failed: {r['error']}")
            continue
        ratio = base["step_s"] / r["step_s"]
        print(
            f"{r['config']:42s} {r['step_s']:8.2f} {args.batch_size / r['step_s']:10.2f} "
            f"{ratio:8.2f} {r['window_s']:9.3f}"
        )
    if args.json:
        write_json(
            args.json, {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "results": results}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
