#!/usr/bin/env python
"""Cut Models Genesis training cubes out of CT volumes (docs/extraction.md).

For one LUNA16 fold (``{data}/subset{fold}/``) this reads every CT volume in sorted order,
draws up to ``--scale`` random 64x64x32 windows from each with Python's ``random`` (seeded once
with ``--seed``), keeps those that pass the original's air test (lung windows: little tissue),
and saves all cubes of the fold, stacked to ``(N, rows, cols, deps)`` with values in [0, 1], as
``{save}/bat_{scale}_s_{rows}x{cols}x{deps}_{fold}.npy``.

With ``--input PATH ... --output FILE.npy`` it reads any collection of volumes instead, with a
``--preset`` (``ct-chest``, the original's constants and the default; ``ct``; ``mri``), optional
resampling (``--spacing``), worker processes with one random stream per volume
(``--processes``), a per-cube ``FILE.csv`` (source,x,y,z) and a preview PNG
(docs/own_data.md).

This file is the command line. The work is done by modules in ``keras/``, in the order a volume
goes through them:

- ``volume_io``: reading, with the checks that skip a bad volume (truncated, NaN voxels, a
  broken DICOM series, not 3-D), resampling, the intensity windows and the one normaliser;
- ``extraction_presets``: ``setup_config`` (the original's constants) and the presets;
- ``extraction_sampler``: the original algorithm, cube by cube, with its air test;
- ``extraction_runner``: which volumes, reading ahead, worker processes, a report per volume;
- ``extraction_outputs``: the cube file, the CSV and the preview, each written atomically.

The names tests and scripts import from here stay importable from here::

    from infinite_generator_3D import setup_config, infinite_generator_from_one_volume
    config = setup_config(scale=32)
    cubes = infinite_generator_from_one_volume(config, hu_xyz, random.Random(1))

Imports: NumPy and those modules (SimpleITK lazily, tqdm for the progress bar, scikit-image
only when the crop size differs from the cube size, Pillow only for ``--preview``). It never
imports Keras.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

# The extraction modules live in keras/ beside the trainer that reads these files. Appended, not
# prepended, so keras/'s other modules never shadow an installed package.
_KERAS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras")
if _KERAS_DIR not in sys.path:
    sys.path.append(_KERAS_DIR)
from extraction_outputs import (
    csv_path,
    output_path,
    save_cubes_atomically,
    write_positions,
    write_preview,
)
from extraction_presets import (
    DEFAULT_PRESET,
    PRESETS,
    WINDOW_TESTS,
    config_from_preset,
    setup_config,
)
from extraction_runner import FoldResult, VolumeReport, expand_inputs, extract_fold, list_volumes
from extraction_sampler import (
    GeneratorRandint,
    air_test_limit,
    infinite_generator_from_one_volume,
    raw_threshold,
    size_problem,
    tissue_score_sum,
    volume_generator,
    volume_window,
)
from genesis_files import atomic_path
from volume_io import VOLUME_SUFFIXES, VolumeError, read_volume, resample_image
from volume_io import normalise_window as normalise_hu  # the one normaliser, in float64

# What this module offers to importers: its own command line, and the names the extraction's
# parts had when they lived here.
__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "VOLUME_SUFFIXES",
    "WINDOW_TESTS",
    "FoldResult",
    "GeneratorRandint",
    "VolumeError",
    "VolumeReport",
    "air_test_limit",
    "build_parser",
    "config_from_preset",
    "csv_path",
    "expand_inputs",
    "extract_fold",
    "infinite_generator_from_one_volume",
    "list_volumes",
    "main",
    "normalise_hu",
    "output_path",
    "raw_threshold",
    "read_volume",
    "resample_image",
    "save_cubes_atomically",
    "setup_config",
    "size_problem",
    "tissue_score_sum",
    "volume_generator",
    "volume_window",
    "write_positions",
    "write_preview",
]

EXAMPLE = (
    "example (one fold):\n"
    "  python infinite_generator_3D.py --fold 0 --scale 32 --data datasets/luna16 "
    "--save generated_cubes\n"
    "\n"
    "example (all ten LUNA16 folds):\n"
    "  for fold in 0 1 2 3 4 5 6 7 8 9; do\n"
    "    python infinite_generator_3D.py --fold $fold --scale 32 --data /path/to/LUNA16 "
    "--save generated_cubes\n"
    "  done\n"
    "\n"
    "example (your own CT collection, docs/own_data.md):\n"
    "  python infinite_generator_3D.py --input ../shared/data/sts_ct/imagesTr "
    "--output generated_cubes/sts_ct.npy \\\n"
    "      --preset ct --preview generated_cubes/sts_ct_preview.png\n"
    "\n"
    "Writes {save}/bat_{scale}_s_{rows}x{cols}x{deps}_{fold}.npy, "
    "e.g. generated_cubes/bat_32_s_64x64x32_0.npy:\n"
    "float32 (N, rows, cols, deps), values in [0, 1] (HU clipped to [-1000, 1000], then scaled).\n"
    "Exit status: 0 when a cube file was written, 1 when nothing usable was found, "
    "2 for bad flags,\n"
    "130 after Ctrl-C and 143 after SIGTERM (then nothing is written).\n"
)


# ----------------------------------------------------------------------------------------------
# Command line


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"Expected {what}. Received: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"Expected {what}. Received: {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags: the original's, plus --seed, --workers and --dtype."""
    parser = argparse.ArgumentParser(
        prog="infinite_generator_3D.py",
        description="Cut Models Genesis training cubes out of the CT volumes of one LUNA16 fold "
        "({data}/subset{fold}/: .mhd, .mha, .nii, .nii.gz, .nrrd files and DICOM series folders), "
        "or out of any collection of CT or MRI volumes (--input ... --output FILE.npy).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        choices=range(10),
        metavar="{0..9}",
        help="the LUNA16 fold: reads {data}/subset{fold}/ (required unless --input is given)",
    )
    parser.add_argument(
        "--scale", type=_positive_int, default=32, help="cubes per volume (default: 32)"
    )
    parser.add_argument(
        "--data",
        default="datasets/luna16",
        help="LUNA16 root folder holding subset0 .. subset9 (default: datasets/luna16)",
    )
    parser.add_argument(
        "--save",
        default="generated_cubes",
        help="output folder, created if missing (default: generated_cubes)",
    )
    parser.add_argument(
        "--input_rows", type=_positive_int, default=64, help="cube rows (default: 64)"
    )
    parser.add_argument(
        "--input_cols", type=_positive_int, default=64, help="cube columns (default: 64)"
    )
    parser.add_argument(
        "--input_deps", type=_positive_int, default=32, help="cube depth in slices (default: 32)"
    )
    parser.add_argument(
        "--crop_rows",
        type=_positive_int,
        default=64,
        help="rows cut from the volume, resized to input_rows when different (default: 64)",
    )
    parser.add_argument(
        "--crop_cols",
        type=_positive_int,
        default=64,
        help="columns cut from the volume, resized to input_cols when different (default: 64)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the one random.Random drawing every window (default: 1, as the original)",
    )
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=2,
        help="threads reading the next volumes while the current one is sampled; "
        "0 reads in the main thread. The output does not depend on it (default: 2)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="stored dtype; the original stored float64 (default: float32)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )
    own = parser.add_argument_group(
        "your own data (docs/own_data.md)",
        "Flags left out take the preset's value; the default preset is the original's.",
    )
    own.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="volume files, folders (searched recursively: volume files and DICOM series "
        "folders) or glob patterns (quote them; ** for any depth); instead of --data/--fold",
    )
    own.add_argument(
        "--output",
        metavar="FILE.npy",
        help="the cube file to write with --input; the per-cube FILE.csv (source,x,y,z) is "
        "written beside it",
    )
    own.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=DEFAULT_PRESET,
        help="what the constants are: ct-chest (the original's: 100-voxel border, lung test), "
        "ct (HU window, body test, no border) or mri (clip [0, 4000], foreground test, no "
        f"border) (default: {DEFAULT_PRESET})",
    )
    own.add_argument(
        "--border_xy",
        type=_non_negative_int,
        help="voxels kept away from the x and y edges (ct-chest: 100; ct, mri: 0)",
    )
    own.add_argument(
        "--border_z",
        type=_non_negative_int,
        help="slices kept away from the z ends (ct-chest: 30; ct, mri: 0)",
    )
    own.add_argument(
        "--hu_min", type=float, help="window low end, clipped to and scaled to 0 (CT: -1000)"
    )
    own.add_argument(
        "--hu_max", type=float, help="window high end, clipped to and scaled to 1 (CT: 1000)"
    )
    own.add_argument(
        "--percentiles",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="take each volume's window from these percentiles of its voxels instead of "
        "--hu_min/--hu_max, e.g. 0.5 99.5 for MRI",
    )
    own.add_argument(
        "--test",
        choices=WINDOW_TESTS,
        help="how windows are kept: air (the original's lung test) or foreground "
        "(ct-chest: air; ct, mri: foreground)",
    )
    own.add_argument(
        "--air_hu",
        type=float,
        help="air test: voxels at or above this value count as tissue (ct-chest: -150)",
    )
    own.add_argument(
        "--lung_max",
        type=float,
        help="air test: reject a window whose tissue score exceeds this fraction (0.15)",
    )
    own.add_argument(
        "--foreground_threshold",
        type=float,
        help="foreground test: a voxel is foreground when its value scaled to [0, 1] is at "
        "least this (ct: 0.25, which is -500 HU; mri: 0.02)",
    )
    own.add_argument(
        "--foreground_fraction",
        type=float,
        help="foreground test: keep a cube with at least this fraction of foreground voxels (0.5)",
    )
    own.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="resample every volume to this voxel size in mm (SimpleITK, linear) before "
        "cutting (default: native spacing, as the original)",
    )
    own.add_argument(
        "--processes",
        type=_non_negative_int,
        default=0,
        help="cut volumes in N worker processes, each volume from its own random stream "
        "(SeedSequence(seed) child i for volume i), so the cubes do not depend on N. "
        "0 keeps the original's single stream (default: 0)",
    )
    own.add_argument(
        "--preview",
        metavar="FILE.png",
        help="also write a PNG of the first 4 cubes of each source (mid slices)",
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check alone (exits with status 2 on an error)."""
    if args.input is None:
        if args.fold is None:
            parser.error(
                "the following arguments are required: --fold "
                "(or --input PATH ... --output FILE.npy)"
            )
        if args.output is not None:
            parser.error(
                "Expected --output only with --input (a fold is written to --save). "
                f"Received: --output={args.output!r} with --fold {args.fold}"
            )
    else:
        if args.fold is not None:
            parser.error(
                "Expected either --fold (with --data) or --input, not both. "
                f"Received: --fold {args.fold} and --input {' '.join(args.input)}"
            )
        if args.output is None or not args.output.lower().endswith(".npy"):
            parser.error(
                f"Expected --output FILE.npy with --input. Received: --output={args.output!r}"
            )
    if args.preview is not None and not args.preview.lower().endswith(".png"):
        parser.error(f"Expected --preview FILE.png. Received: --preview={args.preview!r}")
    if args.spacing is not None and not all(v > 0 for v in args.spacing):
        parser.error(f"Expected --spacing X Y Z, each > 0 mm. Received: {args.spacing}")
    for name in ("foreground_threshold", "foreground_fraction", "lung_max"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"Expected --{name} in [0, 1]. Received: {value}")
    try:
        args.config = _config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def _config_from_args(args: argparse.Namespace) -> setup_config:
    """The extraction settings: the preset's, with the flags given."""
    return config_from_preset(
        args.preset,
        input_rows=args.input_rows,
        input_cols=args.input_cols,
        input_deps=args.input_deps,
        crop_rows=args.crop_rows,
        crop_cols=args.crop_cols,
        scale=args.scale,
        DATA_DIR=args.data if args.input is None else None,
        len_border=args.border_xy,
        len_border_z=args.border_z,
        hu_min=args.hu_min,
        hu_max=args.hu_max,
        percentiles=args.percentiles,
        test=args.test,
        air_hu=args.air_hu,
        lung_max=args.lung_max,
        foreground_threshold=args.foreground_threshold,
        foreground_fraction=args.foreground_fraction,
    )


def _sigterm_to_exit() -> Callable[[], None]:
    """Make SIGTERM (``kill``, a scheduler's time limit) raise SystemExit(143) in the main thread.

    The exception unwinds like Ctrl-C does, so a half-written temporary file is removed. Returns
    a function restoring the previous handler (a no-op outside the main thread).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the extraction for one fold.

    Args:
        argv: the command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when the cube file was written, 1 when nothing usable was found,
        130 after Ctrl-C (bad flags exit with 2 from argparse; SIGTERM with 143).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    restore_sigterm = _sigterm_to_exit()
    try:
        return _run(args)
    finally:
        restore_sigterm()


def _output_folder_problem(folder: str, flag: str, value: str) -> str | None:
    """Why ``folder`` cannot take the output (a file in the way, not writable), or None."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the part of the path that exists must be a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return (
            f"Expected {flag} to be a folder. Received: {flag}={value!r} ({existing!r} is a file)"
        )
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        return f"Expected a writable {flag} folder. Received: {flag}={value!r} (not writable)"
    return None


def _run(args: argparse.Namespace) -> int:
    """The body of main, once the flags are parsed."""
    start = time.perf_counter()

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 1

    own_data = args.input is not None
    if own_data:
        try:
            paths = expand_inputs(args.input)
        except (OSError, ValueError) as exc:
            return fail(str(exc))
        target = args.output
        folder = os.path.dirname(os.path.abspath(target))
        problem = _output_folder_problem(folder, "--output's folder", folder)
        if problem:
            return fail(problem)
        if os.path.isdir(target):
            return fail(f"Expected --output to be a file name. Received: {target!r} is a folder")
        label, where = "input", "--input"
    else:
        if not os.path.isdir(args.data):
            return fail(
                f"Expected --data to be a LUNA16 root folder holding subset0 .. subset9. "
                f"Received: --data={args.data!r} (no such folder)"
            )
        fold_dir = os.path.join(args.data, f"subset{args.fold}")
        if not os.path.isdir(fold_dir):
            return fail(
                f"Expected a fold folder {fold_dir!r} (--data {args.data!r}, --fold {args.fold}). "
                f"Received: no such folder"
            )
        problem = _output_folder_problem(args.save, "--save", args.save)
        if problem:
            return fail(problem)
        paths = list_volumes(fold_dir)
        if not paths:
            return fail(
                f"no volume in {fold_dir!r}: expected .mhd, .mha, .nii, .nii.gz or .nrrd files "
                f"or DICOM series folders"
            )
        folder = args.save
        target = output_path(
            args.save, args.scale, args.input_rows, args.input_cols, args.input_deps, args.fold
        )
        label, where = f"fold {args.fold}", repr(fold_dir)

    config = args.config
    # The single stream is the original's; --processes gives each volume its own stream.
    rng = None if args.processes else random.Random(args.seed)
    dtype = np.dtype(args.dtype)
    written = []
    try:
        result = extract_fold(
            paths,
            config,
            rng,
            dtype=dtype,
            workers=args.workers,
            progress=args.progress,
            spacing=args.spacing,
            processes=args.processes,
            seed=args.seed,
            warn_all_sizes=own_data,
            # Looked up here at each run, so a test can stand in for the sampler.
            sampler=infinite_generator_from_one_volume,
        )
        shape = None
        if result.n_cubes:
            os.makedirs(folder, exist_ok=True)
            if own_data:
                # The CSV is renamed into place right after the cubes, so the two match.
                with atomic_path(csv_path(target)) as tmp_csv:
                    rows = write_positions(tmp_csv, result.sources, result.positions)
                    shape = save_cubes_atomically(result.cubes, target, dtype)
                written.append(f"saved {csv_path(target)}: {rows} rows (source,x,y,z)")
            else:
                shape = save_cubes_atomically(result.cubes, target, dtype)
            if args.preview:
                size = write_preview(args.preview, result.sources, result.cubes)
                written.append(f"saved {args.preview}: {size[0]}x{size[1]} preview")
    except KeyboardInterrupt:
        print("\ninterrupted: no cube file written", file=sys.stderr)
        return 130
    except OSError as exc:
        if own_data:
            return fail(f"cannot write --output={target!r}: {exc}")
        return fail(f"cannot write the cube file in --save={args.save!r}: {exc}")

    used = [v for v in result.volumes if v.cubes > 0]
    empty = [v for v in result.volumes if v.cubes == 0]
    partial = [v for v in used if v.reason]
    seconds = time.perf_counter() - start
    print(
        f"{label}: {len(paths)} volumes, {len(used)} used, {len(empty)} gave no cube; "
        f"{result.n_cubes} cubes written; {seconds:.1f} s"
    )
    if own_data:  # a collection is new to the user: every source's count, and why if short
        for v in result.volumes:
            why = f" ({v.reason})" if v.reason else ""
            print(f"  {v.cubes:4d} cubes from {v.path}{why}")
    else:
        for v in empty:
            print(f"  no cube from {v.path}: {v.reason}")
        for v in partial:
            print(f"  fewer cubes from {v.path}: {v.reason}")
    if shape is None:
        return fail(f"no cube extracted from the {len(paths)} volumes of {where}; nothing written")
    print(f"saved {target}: {dtype.name} {shape}")
    for line in written:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
