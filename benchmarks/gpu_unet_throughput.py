#!/usr/bin/env python
"""Training throughput of the 3D U-Net alone on one GPU (JAX backend): forward+backward cubes/s.

The full pre-training model (unet_model_3d, 64x64x32, 32 base filters, batch norm; SGD with
momentum and MSE as the trainer compiles it) is trained on random in-memory cubes, so no input
pipeline is involved (benchmarks/gpu_train_throughput.py measures that). Every combination of
batch 6 and 32, float32 and mixed bfloat16, channels_first and channels_last is run: one warm-up
epoch (XLA compilation), then the median of `--repeats` timed epochs of `--steps` steps.

Needs a GPU; on a GPU machine with the requirements installed (JAX with CUDA):

    KERAS_BACKEND=jax python benchmarks/gpu_unet_throughput.py --json $OUT/unet_throughput.json
    KERAS_BACKEND=jax python benchmarks/gpu_unet_throughput.py --tiny  # CPU smoke test, 1 to 3 min

Expect a few minutes on the GPU, most of it XLA compilation (8 settings, each compiled once);
`--batches 6` or `--batches 32` halves it. Results vary by card: compare only within one run.

Reference figures measured on one H200: the original PyTorch network 140 cubes/s (fp32, batch 6) and
381 cubes/s (bf16, channels-last, batch 32); an equivalent Keras 3 model on JAX 156 cubes/s (fp32,
batch 6) and 395 cubes/s (mixed bf16, batch 32). A step costs about 710 GFLOP per cube, so the
table also gives the achieved TFLOP/s (the H200's bf16 peak is about 790).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "keras"))

import numpy as np
from common import write_json

GFLOP_PER_CUBE = 710.0  # forward + backward, 64x64x32 cube, 32 base filters
# (batch, dtype, data_format) -> (what, cubes/s) measured on one H200.
REFERENCE = {
    (6, "float32", "channels_first"): "PyTorch 140 / Keras-JAX 156",
    (32, "mixed_bfloat16", "channels_last"): "PyTorch 381 / Keras-JAX 395",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
        "  KERAS_BACKEND=jax python benchmarks/gpu_unet_throughput.py --json unet.json\n"
        "  KERAS_BACKEND=jax python benchmarks/gpu_unet_throughput.py --tiny",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="16x16x8 cubes, 4 base filters, batches 2 and 4, few steps: checks the script on CPU",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="steps per timed epoch (default 20; tiny 3)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed epochs per setting (default 2; tiny 1)"
    )
    p.add_argument(
        "--batches", type=int, nargs="+", default=None, help="batch sizes (default 6 32)"
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


class EpochTimes:
    """Collects the wall time of each epoch; reading the loss at epoch end waits for the device."""

    def __init__(self, keras):
        times = self.times = []

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                float((logs or {})["loss"])
                times.append(time.perf_counter() - self.t0)

        self.callback = _Callback()


def measure(
    keras, unet3d, cube, base, batch, dtype, data_format, steps, repeats, gflop_per_cube
) -> dict:
    """cubes/s of model.fit over in-memory random cubes for one setting."""
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(dtype)
    keras.utils.set_random_seed(0)
    r, c, d = cube
    shape = (1, r, c, d) if data_format == "channels_first" else (r, c, d, 1)
    model = unet3d.unet_model_3d(
        shape, batch_normalization=True, n_base_filters=base, data_format=data_format
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps,) + shape, dtype=np.float32)
    timer = EpochTimes(keras)
    model.fit(
        x,
        x,
        batch_size=batch,
        epochs=1 + repeats,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback],
    )
    timed = timer.times[1:]  # the first epoch compiles
    seconds = statistics.median(timed)
    cubes_per_s = batch * steps / seconds
    return dict(
        batch=batch,
        dtype=dtype,
        data_format=data_format,
        cubes_per_s=cubes_per_s,
        ms_per_step=1000 * seconds / steps,
        epochs_s=timed,
        tflops=cubes_per_s * gflop_per_cube / 1000 if gflop_per_cube else None,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import keras

    import unet3d

    cube, base = ((16, 16, 8), 4) if args.tiny else ((64, 64, 32), 32)
    batches = args.batches or ([2, 4] if args.tiny else [6, 32])
    steps = args.steps or (3 if args.tiny else 20)
    repeats = args.repeats or (1 if args.tiny else 2)
    device = jax.devices()[0]
    print(
        f"backend {keras.backend.backend()}, device {device.device_kind} ({device.platform}), "
        f"keras {keras.__version__}, jax {jax.__version__}"
    )
    print(
        f"cube {cube}, {base} base filters, batch norm; {steps} steps x {repeats} timed epochs "
        "after a warm-up"
    )
    results = []
    for batch, dtype, data_format in itertools.product(
        batches, ("float32", "mixed_bfloat16"), ("channels_first", "channels_last")
    ):
        try:
            res = measure(
                keras,
                unet3d,
                cube,
                base,
                batch,
                dtype,
                data_format,
                steps,
                repeats,
                None if args.tiny else GFLOP_PER_CUBE,
            )
        except Exception as exc:  # out of memory at batch 32 fp32 on a small card: keep going
            res = dict(
                batch=batch,
                dtype=dtype,
                data_format=data_format,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
        results.append(res)
        print(json.dumps(res), flush=True)
    keras.mixed_precision.set_global_policy("float32")

    print()
    print(
        "| batch | dtype | data format | cubes/s | ms/step | TFLOP/s | reference (H200), cubes/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for res in results:
        ref = (
            REFERENCE.get((res["batch"], res["dtype"], res["data_format"]), "")
            if not args.tiny
            else ""
        )
        if "error" in res:
            print(
                f"| {res['batch']} | {res['dtype']} | {res['data_format']} | "
                f"failed: {res['error'][:60]} | | | {ref} |"
            )
            continue
        tflops = f"{res['tflops']:.0f}" if res["tflops"] is not None else "-"
        print(
            f"| {res['batch']} | {res['dtype']} | {res['data_format']} | "
            f"{res['cubes_per_s']:.1f} | {res['ms_per_step']:.1f} | {tflops} | {ref} |"
        )
    if args.json:
        write_json(
            args.json,
            dict(
                device=str(device.device_kind),
                cube=cube,
                base_filters=base,
                steps=steps,
                repeats=repeats,
                results=results,
            ),
            indent=1,
        )
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
