"""Training pairs per second: keras/transforms.py against a loop version written like the original.

The fast version is keras/transforms.py with its numba kernels (keras/genesis_kernels.py).

Both run the per-sample pipeline of `generate_pair` with the original's rates (flip 0.4, local
shuffle 0.5, non-linear 0.9, painting 0.9 of which in-painting 0.2) on 64x64x32 float32 cubes
in [0, 1]: real cubes cut from ../shared/data/chest_ct_512x512x141.nii.gz when present (else
synthetic CT-like cubes). The loop version shuffles each of the 10,000 blocks with a Python
loop and `np.random.permutation`, builds the 100,000-point Bezier curve with `math.comb` and
powers, sorts it and calls `np.interp`, and draws float64 noise, as the original did.

The one-core numbers pin this process to one CPU (`os.sched_setaffinity`) after the
multi-worker PyDataset measurement, which uses two cores. The fast and loop versions are timed
in interleaved slices (--rounds), so that on a shared machine both see the same load.

example: .venv/bin/python benchmarks/bench_transforms.py --pairs 3000 --loop-pairs 60
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "keras"))
from common import atomic_path, write_json

import transforms as T

CHEST_CT = ROOT.parent / "shared" / "data" / "chest_ct_512x512x141.nii.gz"
RATES = {name: T.CONFIG_DEFAULTS[name] for name in T.RATE_NAMES}  # the original's rates


# ------------------------------------------------------------------- loop version (baseline)


def loop_flip(x, y, prob, rng):
    cnt = 3
    while rng.random() < prob and cnt > 0:
        axis = int(rng.integers(0, 3))
        x = np.flip(x, axis=axis)
        y = np.flip(y, axis=axis)
        cnt -= 1
    return x, y


def loop_local_shuffle(x, prob, rng):
    if rng.random() >= prob:
        return x
    out = x.copy()
    orig = x.copy()
    _, R, C, D = x.shape
    for _ in range(T.LOCAL_SHUFFLE_BLOCKS):
        bx = int(rng.integers(1, R // 10 + 1))
        by = int(rng.integers(1, C // 10 + 1))
        bz = int(rng.integers(1, D // 10 + 1))
        nx = int(rng.integers(0, R - bx + 1))
        ny = int(rng.integers(0, C - by + 1))
        nz = int(rng.integers(0, D - bz + 1))
        window = orig[0, nx : nx + bx, ny : ny + by, nz : nz + bz].flatten()
        window = window[rng.permutation(window.size)]
        out[0, nx : nx + bx, ny : ny + by, nz : nz + bz] = window.reshape((bx, by, bz))
    return out


def loop_bezier(points, n_times):
    n = len(points) - 1
    t = np.linspace(0.0, 1.0, n_times)
    poly = np.array([math.comb(n, i) * t ** (n - i) * (1 - t) ** i for i in range(n + 1)])
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    return xs @ poly, ys @ poly


def loop_nonlinear(x, prob, rng):
    if rng.random() >= prob:
        return x
    p = rng.random(4)
    xv, yv = loop_bezier([[0, 0], [p[0], p[1]], [p[2], p[3]], [1, 1]], T.NONLINEAR_NTIMES)
    if rng.random() < 0.5:
        xv = np.sort(xv)
    else:
        xv, yv = np.sort(xv), np.sort(yv)
    return np.interp(x, xv, yv)


def loop_in_painting(x, rng):
    _, R, C, D = x.shape
    cnt = 5
    while cnt > 0 and rng.random() < 0.95:
        bx = int(rng.integers(R // 6, R // 3 + 1))
        by = int(rng.integers(C // 6, C // 3 + 1))
        bz = int(rng.integers(D // 6, D // 3 + 1))
        nx = int(rng.integers(3, R - bx - 3 + 1))
        ny = int(rng.integers(3, C - by - 3 + 1))
        nz = int(rng.integers(3, D - bz - 3 + 1))
        x[:, nx : nx + bx, ny : ny + by, nz : nz + bz] = rng.random((bx, by, bz))
        cnt -= 1
    return x


def loop_out_painting(x, rng):
    _, R, C, D = x.shape
    keep = x.copy()
    x = rng.random(x.shape)

    def block():
        bx = R - int(rng.integers(3 * R // 7, 4 * R // 7 + 1))
        by = C - int(rng.integers(3 * C // 7, 4 * C // 7 + 1))
        bz = D - int(rng.integers(3 * D // 7, 4 * D // 7 + 1))
        nx = int(rng.integers(3, R - bx - 3 + 1))
        ny = int(rng.integers(3, C - by - 3 + 1))
        nz = int(rng.integers(3, D - bz - 3 + 1))
        x[:, nx : nx + bx, ny : ny + by, nz : nz + bz] = keep[
            :, nx : nx + bx, ny : ny + by, nz : nz + bz
        ]

    block()
    cnt = 4
    while cnt > 0 and rng.random() < 0.95:
        block()
        cnt -= 1
    return x


def loop_generate_pair(img, batch_size, rng):
    while True:
        index = np.arange(img.shape[0])
        rng.shuffle(index)  # the original shuffled the whole index list for every batch
        y = img[index[:batch_size]].copy()
        x = y.copy()
        for n in range(batch_size):
            x[n], y[n] = loop_flip(x[n], y[n], RATES["flip_rate"], rng)
            x[n] = loop_local_shuffle(x[n], RATES["local_rate"], rng)
            x[n] = loop_nonlinear(x[n], RATES["nonlinear_rate"], rng)
            if rng.random() < RATES["paint_rate"]:
                if rng.random() < RATES["inpaint_rate"]:
                    x[n] = loop_in_painting(x[n], rng)
                else:
                    x[n] = loop_out_painting(x[n], rng)
        yield x, y


# ------------------------------------------------------------------------------ cubes


def load_cubes(n: int, seed: int) -> tuple[np.ndarray, str]:
    """n cubes (n, 1, 64, 64, 32) float32: real chest-CT cubes when the data is present."""
    rng = np.random.default_rng(seed)
    if CHEST_CT.exists():
        import SimpleITK as sitk

        vol = sitk.GetArrayFromImage(sitk.ReadImage(str(CHEST_CT))).transpose(2, 1, 0)
        vol = (np.clip(vol, -1000, 1000).astype(np.float64) + 1000) / 2000
        X, Y, Z = vol.shape
        cubes = []
        for _ in range(n):  # inside the extraction borders (100 in x, y; 30 in z)
            sx = rng.integers(100, X - 64 - 100)
            sy = rng.integers(100, Y - 64 - 100)
            sz = rng.integers(30, Z - 32 - 30)
            cubes.append(vol[sx : sx + 64, sy : sy + 64, sz : sz + 32])
        return np.stack(cubes)[:, None].astype(np.float32), f"real: {CHEST_CT.name}"
    hu = np.round(np.cumsum(rng.normal(0, 40, (n, 1, 64, 64, 32)), axis=4)).clip(-1000, 1000)
    return ((hu + 1000) / 2000).astype(np.float32), "synthetic CT-like (real data absent)"


# ------------------------------------------------------------------------------ timing


def pairs_per_s(gens: list, pairs: list[int], batch: int, rounds: int) -> list[float]:
    """Pairs per second of each generator, timed in `rounds` interleaved slices (fast, loop,
    fast, loop...) so that both see the same load on a shared machine."""
    for gen in gens:
        next(gen)  # warm-up (numba kernels are compiled or loaded from cache here)
    per_round = [max(1, p // batch // rounds) for p in pairs]
    spent = [0.0] * len(gens)
    for _ in range(rounds):
        for k, gen in enumerate(gens):
            t0 = time.perf_counter()
            for _ in range(per_round[k]):
                next(gen)
            spent[k] += time.perf_counter() - t0
    return [n * rounds * batch / t for n, t in zip(per_round, spent, strict=True)]


def per_transform_ms(img: np.ndarray, reps: int, rng: np.random.Generator) -> dict:
    """ms per cube of each transform applied (prob 1), fast vs loop."""
    x = img[0].copy()
    cases = {
        "local shuffle": (
            lambda: T.local_pixel_shuffling(x, 1.0, rng=rng),
            lambda: loop_local_shuffle(x, 1.0, rng),
        ),
        "non-linear": (
            lambda: T.nonlinear_transformation(x, 1.0, rng=rng),
            lambda: loop_nonlinear(x, 1.0, rng),
        ),
        "in-painting": (
            lambda: T.image_in_painting(x.copy(), rng=rng),
            lambda: loop_in_painting(x.copy(), rng),
        ),
        "out-painting": (
            lambda: T.image_out_painting(x, rng=rng),
            lambda: loop_out_painting(x, rng),
        ),
    }
    res = {}
    for name, (fast, loop) in cases.items():
        fast()
        t0 = time.perf_counter()
        for _ in range(reps):
            fast()
        f = (time.perf_counter() - t0) / reps * 1e3
        k = max(3, reps // 20)
        t0 = time.perf_counter()
        for _ in range(k):
            loop()
        s = (time.perf_counter() - t0) / k * 1e3
        res[name] = {"fast_ms": round(f, 3), "loop_ms": round(s, 2)}
    return res


def dataset_pairs_per_s(
    img: np.ndarray, workers: int, multiprocessing: bool, steps: int, batch: int
) -> float:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    from genesis_dataset import GenesisPairDataset

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cubes.npy")
        with atomic_path(path) as tmp:
            np.save(tmp, img[:, 0])
        ds = GenesisPairDataset(
            path,
            batch,
            SimpleNamespace(save_samples=None, **RATES),
            seed=0,
            steps=steps,
            workers=workers,
            use_multiprocessing=multiprocessing,
            max_queue_size=10,
        )
        adapter = PyDatasetAdapter(ds, shuffle=False)
        times = []
        for _ in range(2):  # the first epoch warms up the workers
            adapter.on_epoch_begin()
            t0 = time.perf_counter()
            n = sum(1 for _ in adapter.get_numpy_iterator())
            times.append(time.perf_counter() - t0)
            adapter.on_epoch_end()
        return n * batch / times[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: .venv/bin/python benchmarks/bench_transforms.py --pairs 3000 "
        "--loop-pairs 60",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=1800, help="pairs timed, fast version")
    parser.add_argument("--loop-pairs", type=int, default=36, help="pairs timed, loop version")
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="interleaved timing slices of the fast and loop versions",
    )
    parser.add_argument("--cubes", type=int, default=32, help="distinct cubes to draw from")
    parser.add_argument("--steps", type=int, default=60, help="PyDataset batches per epoch")
    parser.add_argument("--reps", type=int, default=100, help="repeats per transform timing")
    parser.add_argument(
        "--skip-dataset",
        action="store_true",
        help="skip the PyDataset measurement (no Keras import)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    img, source = load_cubes(args.cubes, seed=0)
    batch = 6
    results = {"cubes": source, "batch": batch, "rates": RATES}
    cpus = sorted(os.sched_getaffinity(0))
    if not args.skip_dataset and len(cpus) >= 2:
        for mp in (False, True):
            key = f"dataset_2_workers_{'processes' if mp else 'threads'}_pairs_per_s"
            results[key] = round(dataset_pairs_per_s(img, 2, mp, args.steps, batch), 1)
            print(f"{key}: {results[key]}", flush=True)

    # One core from here on: numba kernels are single-threaded; pin BLAS/numpy too.
    os.sched_setaffinity(0, {cpus[0]})
    cfg = SimpleNamespace(save_samples=None, **RATES)
    fast, loop = pairs_per_s(
        [
            T.generate_pair(img, batch, cfg, rng=np.random.default_rng(1)),
            loop_generate_pair(img, batch, np.random.default_rng(1)),
        ],
        [args.pairs, args.loop_pairs],
        batch,
        args.rounds,
    )
    results.update(
        fast_pairs_per_s_one_core=round(fast, 1),
        loop_pairs_per_s_one_core=round(loop, 2),
        speedup=round(fast / loop, 1),
    )
    results["per_transform_one_core"] = per_transform_ms(img, args.reps, np.random.default_rng(2))
    print(f"cubes: {source}")
    print(f"one core, pairs/s: fast {fast:.1f}  loop {loop:.2f}  speed-up {fast / loop:.1f}x")
    for name, r in results["per_transform_one_core"].items():
        print(f"  {name:13s} fast {r['fast_ms']:7.3f} ms  loop {r['loop_ms']:8.2f} ms")
    if args.json:
        write_json(args.json, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
