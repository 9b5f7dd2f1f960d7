"""Pre-training throughput on one GPU (JAX backend): cubes/s end to end and per step.

Meant for a machine with a GPU (`--tiny` is a quick smoke test on a CPU):

    KERAS_BACKEND=jax python benchmarks/gpu_train_throughput.py --json out.json   # GPU
    KERAS_BACKEND=jax python benchmarks/gpu_train_throughput.py --sweep        # + more settings
    KERAS_BACKEND=jax python benchmarks/gpu_train_throughput.py --tiny     # CPU smoke test

For each setting it measures, after a warm-up epoch (compilation):
  end-to-end   model.fit on GenesisPairDataset over a memory-mapped cube file: the real
               input pipeline (the four transforms, `--workers` threads) feeding the GPU
  compute      model.fit on in-memory arrays (batches ready): the GPU step alone
  pipeline     GenesisPairDataset batches made by `--workers` threads, no model
Settings: "original" (batch 6, float32, channels_first, as the original trained) and
"fastest" (batch 32, mixed bfloat16, channels_last; JAX always compiles the step with XLA).
`--sweep` adds batch 32 float32 channels_last, batch 32 bfloat16 channels_first and bfloat16
channels_last at batch 64 and 128, to find the fastest combination.

For comparison (one H200, docs/benchmarks.md): the original PyTorch network trains 140 cubes/s
(fp32, batch 6) and 381 cubes/s (bf16, channels-last, batch 32); a Keras 3 JAX model 156 and 395
cubes/s. The transforms make about 10 cubes/s per core in the original's code, so on a GPU the
input pipeline, not the network, can bound end-to-end speed: compare end-to-end with compute.

Imports: stdlib, numpy, keras and jax (lazily), config, genesis_dataset, genesis_trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("KERAS_BACKEND", "jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "keras"))

import numpy as np
from common import write_json


def settings(tiny: bool, sweep: bool = False) -> list:
    """The settings to measure: the original's and the expected fastest (+ a sweep).

    Args:
        tiny: small batches for the CPU smoke test.
        sweep: add the other combinations of batch, precision and data format.
    Returns:
        A list of dicts with name, batch, mixed (bfloat16) and data_format.
    """
    big = 4 if tiny else 32
    chosen = [
        dict(name="original", batch=2 if tiny else 6, mixed=False, data_format="channels_first"),
        dict(name="fastest", batch=big, mixed=True, data_format="channels_last"),
    ]
    if sweep:
        chosen += [
            dict(name="fp32-last", batch=big, mixed=False, data_format="channels_last"),
            dict(name="bf16-first", batch=big, mixed=True, data_format="channels_first"),
        ]
        chosen += [
            dict(name=f"bf16-last-{b}", batch=b, mixed=True, data_format="channels_last")
            for b in ((6, 8) if tiny else (64, 128))
        ]
    return chosen


class EpochTimer:
    """Wall time of each epoch (the logs are read at epoch end, which waits for the device)."""

    def __init__(self):
        import keras

        times = self.times = []

        class _CB(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                float((logs or {}).get("loss", 0.0))  # make sure the step really finished
                times.append(time.perf_counter() - self.t0)

        self.callback = _CB()


def build(config, mixed: bool):
    import keras

    import genesis_trainer

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed else "float32")
    keras.utils.set_random_seed(0)
    return genesis_trainer.build_model(config)


def measure(args, setting: dict, cube_file: str) -> dict:
    """End-to-end, compute-only and pipeline-only cubes/s for one setting."""
    import keras

    from config import models_genesis_config
    from genesis_dataset import GenesisPairDataset

    r, c, d = args.cube
    config = models_genesis_config(
        input_rows=r,
        input_cols=c,
        input_deps=d,
        batch_size=setting["batch"],
        n_base_filters=args.n_base_filters,
        data_format=setting["data_format"],
        mixed_precision=setting["mixed"],
        save_samples=None,
        workers=args.workers,
        max_queue_size=4 * args.workers,
    )
    steps = args.steps
    result = dict(setting)

    # Pipeline only: `workers` threads making batches, as the PyDataset's workers do.
    ds = GenesisPairDataset(
        [cube_file],
        setting["batch"],
        config,
        seed=0,
        status="test",
        data_format=setting["data_format"],
        steps=steps,
    )
    ds[0]  # warm up (numba compilation)
    t = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(lambda i: ds[i], range(steps)))
    result["pipeline_cubes_per_s"] = steps * setting["batch"] / (time.perf_counter() - t)

    # End to end: fit on the dataset (epoch 1 compiles; epoch 2 is timed).
    model = build(config, setting["mixed"])
    train = GenesisPairDataset(
        [cube_file],
        setting["batch"],
        config,
        seed=0,
        status="test",
        data_format=setting["data_format"],
        steps=steps,
        workers=args.workers,
        max_queue_size=4 * args.workers,
    )
    timer = EpochTimer()
    model.fit(train, epochs=2, verbose=0, callbacks=[timer.callback], shuffle=False)
    result["end_to_end_cubes_per_s"] = steps * setting["batch"] / timer.times[-1]
    result["end_to_end_step_ms"] = 1000 * timer.times[-1] / steps

    # Compute only: the same number of steps on batches already in memory.
    x, y = ds[0]
    reps = max(1, steps)
    xs, ys = np.concatenate([x] * reps), np.concatenate([y] * reps)
    timer = EpochTimer()
    model.fit(
        xs,
        ys,
        batch_size=setting["batch"],
        epochs=2,
        verbose=0,
        callbacks=[timer.callback],
        shuffle=False,
    )
    result["compute_cubes_per_s"] = reps * setting["batch"] / timer.times[-1]
    result["compute_step_ms"] = 1000 * timer.times[-1] / reps
    result["input_pipeline_overhead_ms"] = result["end_to_end_step_ms"] - result["compute_step_ms"]
    del model
    keras.backend.clear_session()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Pre-training throughput (JAX): end to end, compute only, pipeline only.",
        epilog="example: KERAS_BACKEND=jax python benchmarks/gpu_train_throughput.py --tiny",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="32x32x16 cubes, 4 base filters, few steps: a CPU smoke test",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per timed epoch (default: 40; --tiny: 3)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="pair-making threads (default: CPU count, at most 16)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also measure the other batch / precision / layout combinations",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.cube = (32, 32, 16) if args.tiny else (64, 64, 32)
    args.n_base_filters = 4 if args.tiny else 32
    args.steps = args.steps or (3 if args.tiny else 40)
    args.workers = args.workers or min(16, os.cpu_count() or 1)

    import jax
    import keras

    print(
        f"keras {keras.__version__} on {keras.backend.backend()}, devices: {jax.devices()}",
        flush=True,
    )
    n_cubes = 256  # more than any batch; a memory-mapped file like real cube files
    with tempfile.TemporaryDirectory(prefix="genesis-throughput-") as tmp:
        rng = np.random.default_rng(0)
        cube_file = os.path.join(tmp, "cubes.npy")
        arr = np.lib.format.open_memmap(
            cube_file, mode="w+", dtype=np.float32, shape=(n_cubes,) + args.cube
        )
        arr[:] = rng.random(arr.shape, dtype=np.float32)
        arr.flush()
        del arr
        results = []
        for setting in settings(args.tiny, args.sweep):
            r = measure(args, setting, cube_file)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(
        f"\n{'setting':10s} {'batch':>5s} {'end-to-end':>12s} {'compute':>12s} "
        f"{'pipeline':>12s}  (cubes/s; {args.workers} workers)"
    )
    for r in results:
        print(
            f"{r['name']:10s} {r['batch']:5d} {r['end_to_end_cubes_per_s']:12.1f} "
            f"{r['compute_cubes_per_s']:12.1f} {r['pipeline_cubes_per_s']:12.1f}"
        )
    best = max(results, key=lambda r: r["end_to_end_cubes_per_s"])
    print(
        f"fastest end to end: {best['name']} at {best['end_to_end_cubes_per_s']:.1f} cubes/s; "
        f"input pipeline alone {best['pipeline_cubes_per_s']:.1f} cubes/s"
    )
    if args.json:
        write_json(
            args.json,
            dict(
                device=str(jax.devices()),
                keras=keras.__version__,
                backend=keras.backend.backend(),
                tiny=args.tiny,
                steps=args.steps,
                workers=args.workers,
                cube=args.cube,
                n_base_filters=args.n_base_filters,
                fastest=best["name"],
                results=results,
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
