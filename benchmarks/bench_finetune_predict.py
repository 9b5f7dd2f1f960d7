"""Whole-volume prediction: `finetune.py predict`'s total time against the model's own time.

A small segmentation U-Net (``unet_model_3d``, --n_base_filters 4 by default, softmax over two
classes, channels-last) is saved as a run folder. Then, in the same process and on the same
volume (a crop of ../shared/data/chest_ct_512x512x141.nii.gz, or the whole of it with --full):

* predict: ``finetune_predict.predict`` from the run folder to the label map on disk, all
  included (loading the model, reading, normalising, cutting windows, the model, Gaussian
  weighting, argmax, writing the .nii.gz);
* model only: the same windows, cut beforehand, through ``predict_on_batch`` in a loop with the
  same batch size, on an already warm model.

The ratio predict / model only is the overhead of everything around the model.

example: .venv/bin/python benchmarks/bench_finetune_predict.py --crop 192 192
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "keras"))
from common import write_json

CHEST_CT = ROOT.parent / "shared" / "data" / "chest_ct_512x512x141.nii.gz"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--volume", default=str(CHEST_CT), help="the CT volume")
    parser.add_argument(
        "--crop",
        type=int,
        nargs=2,
        default=(192, 192),
        metavar=("X", "Y"),
        help="predict a central in-plane crop of this size, all slices (default 192 192)",
    )
    parser.add_argument("--full", action="store_true", help="the whole volume, no crop")
    parser.add_argument("--n_base_filters", type=int, default=4)
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "bench_finetune_predict.json")
    )
    args = parser.parse_args(argv)
    if not os.path.isfile(args.volume):
        print(f"error: no volume at {args.volume} (see ../shared/data/README.md)", file=sys.stderr)
        return 2

    import finetune_predict as fp
    import unet3d
    import volume_io as vio

    patch = tuple(args.patch)
    image = vio.read_image(args.volume)
    geometry = vio.Geometry.of(image)
    with tempfile.TemporaryDirectory() as tmp:
        volume_path = os.path.join(tmp, "chest_0000.nii.gz")
        if args.full:
            volume_path = args.volume
        else:
            size = image.GetSize()
            lo = [(n - c) // 2 for n, c in zip(size[:2], args.crop, strict=True)] + [0]
            crop = [*args.crop, size[2]]
            vio.write_image(
                vio.image_to_array(image)[
                    lo[0] : lo[0] + crop[0], lo[1] : lo[1] + crop[1], : crop[2]
                ],
                vio.Geometry.of(image[lo[0] : lo[0] + crop[0], lo[1] : lo[1] + crop[1], :]),
                volume_path,
            )
            geometry = vio.read_geometry(volume_path)

        model = unet3d.unet_model_3d(
            (*patch, 1),
            n_labels=2,
            n_base_filters=args.n_base_filters,
            data_format="channels_last",
            activation_name="softmax",
        )
        run = os.path.join(tmp, "run")
        os.makedirs(run)
        model.save(os.path.join(run, "best_model.keras"))
        config = {
            "task": "segmentation",
            "patch": list(patch),
            "data_format": "channels_last",
            "n_classes": 2,
            "n_channels": 1,
            "labels": {"background": 0, "foreground": 1},
            "intensity": ["ct"],
            "spacing": None,
            "file_ending": ".nii.gz",
            "channel_names": ["CT"],
            "n_base_filters": args.n_base_filters,
            "seed": 0,
        }
        write_json(os.path.join(run, "finetune_config.json"), config)

        # The same windows, cut beforehand.
        volume = vio.normalise_intensity(vio.image_to_array(vio.read_image(volume_path)), "ct")
        starts = [
            (a, b, c)
            for a in fp.window_starts(max(volume.shape[0], patch[0]), patch[0], args.overlap)
            for b in fp.window_starts(max(volume.shape[1], patch[1]), patch[1], args.overlap)
            for c in fp.window_starts(max(volume.shape[2], patch[2]), patch[2], args.overlap)
        ]
        batches = []
        for i in range(0, len(starts), args.batch_size):
            cubes = [
                volume[a : a + patch[0], b : b + patch[1], c : c + patch[2]]
                for a, b, c in starts[i : i + args.batch_size]
            ]
            batches.append(np.stack(cubes)[..., None])
        del volume
        model.predict_on_batch(batches[0])  # warm: tracing is not the model's running time
        t0 = time.perf_counter()
        for batch in batches:
            model.predict_on_batch(batch)
        model_s = time.perf_counter() - t0

        pred_dir = os.path.join(tmp, "pred")
        settings = fp.PredictSettings(
            model=run,
            input=(volume_path,),
            output=pred_dir,
            overlap=args.overlap,
            batch_size=args.batch_size,
        )
        t0 = time.perf_counter()
        fp.predict(settings)
        total_s = time.perf_counter() - t0
        written = vio.read_geometry(os.path.join(pred_dir, os.listdir(pred_dir)[0]))
        assert not written.differences(geometry), written.differences(geometry)

    ratio = total_s / model_s
    result = {
        "volume": os.path.basename(args.volume),
        "size": list(geometry.size),
        "windows": len(starts),
        "patch": list(patch),
        "overlap": args.overlap,
        "batch_size": args.batch_size,
        "n_base_filters": args.n_base_filters,
        "model_only_s": round(model_s, 3),
        "predict_total_s": round(total_s, 3),
        "ratio": round(ratio, 3),
        "commit": _commit(),
        "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "cpus": os.cpu_count(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_json(args.output, result)
    print(
        f"{result['volume']} {tuple(geometry.size)}: {len(starts)} windows; model only "
        f"{model_s:.1f} s, predict total {total_s:.1f} s: ratio {ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
