"""Peak memory of pre-training over a cube file larger than 4 GB, against a small file.

The original loads every training fold into memory as float64 and copies it (about 30 GB for
five LUNA16 folds). Here the cube files are memory-mapped and only the cubes of the batches in
flight are read, so the trainer's memory should not depend on how many cubes there are. This
benchmark measures how much memory the trainer takes, and how much of it grows with the file.

It writes random float32 64x64x32 cubes with np.lib.format.open_memmap (no 4 GB array is ever
held in memory) in a temporary folder, runs `keras/Genesis_Chest_CT.py` for 100 steps of a
small network (600 cubes read, 300 MB of the big file) in a child process over (a) a small
training file and (b) the >4 GB file, and reports each child's peak resident memory, sampled
from /proc every 20 ms:
  peak RSS        what `top` shows (anonymous memory + mapped file pages resident right now)
  peak RssAnon    the process' own memory (arrays, model, runtime): what cannot be dropped
  peak RssFile    mapped file pages (the cube file and libraries); the kernel can drop these
plus VmHWM, the kernel's own record of the peak RSS. The temporary folder is deleted at the end.
A third child, the "floor", trains the same model for the same steps on batches held in memory
(no cube file, no transforms): what Keras and its backend take by themselves.
TensorFlow runs hide JAX (`--tf_sees_jax` to not): TensorFlow imports JAX whenever it is
installed, as in the test virtualenv, but requirements.txt, a user's install, has none.

It exits with status 1 unless, on the big file, the peak RSS (VmHWM) stays under 1.5 GiB
(1536 MiB) plus the model's weights, gradients and optimizer state, and the process' own memory
(RssAnon) grows by less than 128 MiB from the small file to the big one.

    python benchmarks/bench_memory.py                 # 4.2 GB file, about 6 minutes on 2 cores
    python benchmarks/bench_memory.py --size_gb 0.5   # quicker
    python benchmarks/bench_memory.py --backends tensorflow jax   # both, one set of files

Imports: stdlib, numpy, common; its child processes run the trainer (genesis_trainer, config).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import KERAS_DIR, atomic_path, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = os.path.join(ROOT, "keras", "Genesis_Chest_CT.py")
CUBE = (64, 64, 32)
CUBE_BYTES = 4 * CUBE[0] * CUBE[1] * CUBE[2]

# Start of both children below. requirements.txt installs no JAX, but the test virtualenv
# does, and TensorFlow imports JAX whenever it is installed (tf.lite's converter): about 150 MiB
# a user's install never loads. Each child reports its own VmHWM (peak RSS, kB) as it exits.
PREAMBLE = r"""
import os, sys
if os.environ.get("BENCH_HIDE_JAX") == "1":
    sys.modules["jax"] = None  # `import jax` now raises ImportError, as if not installed

def report_peak(path):
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
    sys.path.append(KERAS_DIR)
    from genesis_files import atomic_path
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(hwm)
""".replace("KERAS_DIR", repr(KERAS_DIR))

# The child: run the trainer's main() and report its peak RSS on exit.
# (getrusage's ru_maxrss is no use here: Linux carries the parent's peak, which held the
# 4 GB file mapped while writing it, over fork and exec into the child.)
CHILD = (
    PREAMBLE
    + r"""
import runpy
out, argv = sys.argv[1], sys.argv[2:]
sys.argv = [argv[0]] + argv[1:]
try:
    runpy.run_path(argv[0], run_name="__main__")
finally:
    report_peak(out)
"""
)


# The frameworks' floor: the same model compiled and trained for the same steps on batches
# held in memory (no cube file, no transforms), with the trainer's TensorBoard callback.
FLOOR = (
    PREAMBLE
    + r"""
import tempfile
out, keras_dir, steps, batch, filters = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
sys.path.insert(0, keras_dir)
try:
    import numpy as np
    import keras
    import genesis_trainer
    from config import models_genesis_config
    config = models_genesis_config(n_base_filters=filters, batch_size=batch)
    model = genesis_trainer.build_model(config)
    # Two batches, cycled: the floor must not hold `steps` batches in memory itself.
    x = np.random.default_rng(0).random((2 * batch,) + config.input_shape, dtype=np.float32)
    callbacks = []
    if genesis_trainer.tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=tempfile.mkdtemp()))
    model.fit(x, x, batch_size=batch, epochs=max(1, steps // 2), verbose=0, callbacks=callbacks)
finally:
    report_peak(out)
"""
)


def write_cubes(path: str, n: int, seed: int, chunk: int = 256) -> None:
    """n random float32 cubes in [0, 1) written chunk by chunk into a memory-mapped .npy."""
    rng = np.random.default_rng(seed)
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n,) + CUBE)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            arr[start:stop] = rng.random((stop - start,) + CUBE, dtype=np.float32)
            arr.flush()
        del arr


def proc_status(pid: int) -> dict:
    """VmRSS, RssAnon and RssFile of a process, in bytes (empty once it has exited)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _watch(cmd: list, env: dict) -> tuple:
    """Run `cmd`, sampling its memory from /proc every 20 ms; returns (peaks, output)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for key, value in proc_status(proc.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.02)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"child run failed (exit {proc.returncode}):\n{log[-4000:]}")
    return peak, log


def child_env(backend: str, hide_jax: bool) -> dict:
    """Environment of a child run: its Keras backend, and whether to hide JAX from TensorFlow."""
    hide = hide_jax and backend == "tensorflow"
    return dict(os.environ, KERAS_BACKEND=backend, BENCH_HIDE_JAX="1" if hide else "0")


def run_child(script: str, out: str, args: list, backend: str, hide_jax: bool) -> dict:
    """Run `script` (CHILD or FLOOR) in a child process; its peak memory figures in bytes.

    Returns:
        backend, peak_rss, peak_rss_anon, peak_rss_file (sampled), vm_hwm (the child's own
        record, written to {out}/vmhwm.txt as it exits) and the run's wall time (seconds).
    """
    hwm_file = os.path.join(out, "vmhwm.txt")
    start = time.time()
    peak, _ = _watch([sys.executable, "-c", script, hwm_file, *args], child_env(backend, hide_jax))
    with open(hwm_file) as f:
        hwm = int(f.read()) * 1024
    return dict(
        backend=backend,
        peak_rss=peak["VmRSS"],
        peak_rss_anon=peak["RssAnon"],
        peak_rss_file=peak["RssFile"],
        vm_hwm=hwm,
        seconds=time.time() - start,
    )


def run_floor(
    out: str, steps: int, batch: int, filters: int, backend: str, hide_jax: bool = True
) -> dict:
    """The frameworks' floor (FLOOR above) in a child process; its peak memory figures."""
    os.makedirs(out, exist_ok=True)
    r = run_child(
        FLOOR,
        out,
        [os.path.join(ROOT, "keras"), str(steps), str(batch), str(filters)],
        backend,
        hide_jax,
    )
    return dict(r, cubes=0, file_gb=0.0)


def run_training(
    data: str,
    out: str,
    steps: int,
    batch: int,
    filters: int,
    workers: int,
    backend: str,
    hide_jax: bool = True,
) -> dict:
    """One short training run in a child process on Keras backend `backend`.

    Returns:
        Its peak memory figures in bytes (peak_rss, peak_rss_anon, peak_rss_file, vm_hwm),
        the model's parameter count (params) and the run's wall time (seconds).
    """
    args = [
        TRAINER,
        "--data",
        data,
        "--train_fold",
        "0",
        "--valid_fold",
        "1",
        "--nb_epoch",
        "1",
        "--steps_per_epoch",
        str(steps),
        "--validation_steps",
        "1",
        "--batch_size",
        str(batch),
        "--n_base_filters",
        str(filters),
        "--workers",
        str(workers),
        "--max_queue_size",
        str(2 * workers),
        "--save_samples",
        "none",
        "--model_path",
        os.path.join(out, "weights"),
        "--verbose",
        "0",
    ]
    r = run_child(CHILD, out, args, backend, hide_jax)
    # The model summary the trainer wrote gives the parameter count ("Total params: N").
    summary = os.path.join(out, "weights", "Vnet-genesis_chest_ct.txt")
    with open(summary) as f:
        params = int(re.search(r"Total params:\s*([\d,]+)", f.read()).group(1).replace(",", ""))
    return dict(r, params=params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python benchmarks/bench_memory.py --size_gb 4.2 --steps 100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size_gb",
        type=float,
        default=4.2,
        help="size of the big training file in GB (default: 4.2)",
    )
    parser.add_argument(
        "--small_cubes", type=int, default=48, help="cubes in the small training file (default: 48)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="training steps per run (default: 100, i.e. 600 of the big "
        "file's cubes read: enough to see mapped pages pile up if they did)",
    )
    parser.add_argument("--batch_size", type=int, default=6, help="(default: 6, the original's)")
    parser.add_argument("--n_base_filters", type=int, default=4, help="(default: 4)")
    parser.add_argument("--workers", type=int, default=2, help="pair-making threads (default: 2)")
    parser.add_argument(
        "--tmpdir",
        default=None,
        help="where the temporary cubes go "
        "(default: the system temp folder; needs size_gb of free disk)",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=[os.environ.get("KERAS_BACKEND", "tensorflow")],
        choices=("tensorflow", "jax", "torch"),
        help="Keras backends to measure, each on the same files "
        "(default: $KERAS_BACKEND or tensorflow)",
    )
    parser.add_argument(
        "--tf_sees_jax",
        action="store_true",
        help="let TensorFlow import JAX where it is installed (the test "
        "virtualenv); by default the TensorFlow runs hide it, as in an "
        "install from requirements.txt, which has no JAX",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    n_big = int(args.size_gb * 1e9 // CUBE_BYTES) + 1
    need = n_big * CUBE_BYTES * 1.05 + 1e8
    tmp = tempfile.mkdtemp(prefix="genesis-bench-memory-", dir=args.tmpdir)
    try:
        free = shutil.disk_usage(tmp).free
        if free < need:
            raise SystemExit(
                f"Expected {need / 1e9:.1f} GB free in {tmp}. Received: "
                f"{free / 1e9:.1f} GB free; pass --tmpdir or a smaller --size_gb."
            )
        small, big = os.path.join(tmp, "small"), os.path.join(tmp, "big")
        name = "bat_32_s_{}x{}x{}_{{}}.npy".format(*CUBE)
        for folder, n_train in ((small, args.small_cubes), (big, n_big)):
            os.makedirs(folder)
            t = time.time()
            write_cubes(os.path.join(folder, name.format(0)), n_train, seed=0)
            write_cubes(os.path.join(folder, name.format(1)), 2 * args.batch_size, seed=1)
            size = os.path.getsize(os.path.join(folder, name.format(0)))
            print(
                f"wrote {n_train} cubes ({size / 1e9:.2f} GB) to {folder} in "
                f"{time.time() - t:.0f} s",
                flush=True,
            )
        results = {}
        for backend in args.backends:
            r = run_floor(
                os.path.join(tmp, f"out-{backend}-floor"),
                args.steps,
                args.batch_size,
                args.n_base_filters,
                backend,
                hide_jax=not args.tf_sees_jax,
            )
            results[f"{backend}/floor"] = r
            print(f"{backend} floor: {json.dumps(r)}", flush=True)
            for label, folder, n_train in (("small", small, args.small_cubes), ("big", big, n_big)):
                r = run_training(
                    folder,
                    os.path.join(tmp, f"out-{backend}-{label}"),
                    args.steps,
                    args.batch_size,
                    args.n_base_filters,
                    args.workers,
                    backend,
                    hide_jax=not args.tf_sees_jax,
                )
                r["cubes"] = n_train
                r["file_gb"] = n_train * CUBE_BYTES / 1e9
                results[f"{backend}/{label}"] = r
                print(f"{backend} {label}: {json.dumps(r)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mib = 2**20
    ok = True
    print(
        "\n| backend | training file | cubes | peak RSS (VmHWM) | peak RssAnon | peak RssFile "
        "| run |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        what = "none (floor)" if key.endswith("/floor") else f"{r['file_gb']:.2f} GB"
        print(
            f"| {r['backend']} | {what} | {r['cubes']} | "
            f"{r['vm_hwm'] / mib:.0f} MiB | {r['peak_rss_anon'] / mib:.0f} MiB | "
            f"{r['peak_rss_file'] / mib:.0f} MiB | {r['seconds']:.0f} s |"
        )
    for backend in args.backends:
        small_r, big_r = results[f"{backend}/small"], results[f"{backend}/big"]
        more = big_r["file_gb"] - small_r["file_gb"]
        growth = {
            k: (big_r[k] - small_r[k]) / mib for k in ("vm_hwm", "peak_rss_anon", "peak_rss_file")
        }
        # The model's share: float32 weights, their gradients and SGD momentum.
        model_mib = 3 * 4 * big_r["params"] / mib
        limit_mib = 1536 + model_mib
        passed = big_r["vm_hwm"] / mib < limit_mib and growth["peak_rss_anon"] < 128
        ok = ok and passed
        print(
            f"\n{backend}: big - small, for {more:.2f} GB more cubes: peak RSS "
            f"{growth['vm_hwm']:+.0f} MiB, RssAnon {growth['peak_rss_anon']:+.0f} MiB, "
            f"RssFile {growth['peak_rss_file']:+.0f} MiB"
        )
        floor = results[f"{backend}/floor"]["vm_hwm"] / mib
        print(
            f"{backend}: peak RSS over the frameworks' floor ({floor:.0f} MiB): small file "
            f"{small_r['vm_hwm'] / mib - floor:+.0f} MiB, big file "
            f"{big_r['vm_hwm'] / mib - floor:+.0f} MiB"
        )
        print(
            f"{backend}: peak RSS {big_r['vm_hwm'] / mib:.0f} MiB "
            f"({big_r['vm_hwm'] / 1e9:.2f} GB) {'under' if passed else 'NOT under'} "
            f"1.5 GiB + model ({model_mib:.1f} MiB for {big_r['params']} parameters) = "
            f"{limit_mib:.0f} MiB, RssAnon growing by {growth['peak_rss_anon']:+.0f} MiB "
            "(checked: under 128)"
        )
    if args.json:
        write_json(args.json, dict(args=vars(args), results=results, passed=ok))
    # Mapped file pages (the cube file read around each cube, the libraries) count in the peak
    # RSS above although the kernel can drop them: the check is on the whole of it.
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
