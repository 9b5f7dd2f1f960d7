"""Extraction's runner: which volumes, read ahead in threads or cut in processes, one report each.

`list_volumes` (a LUNA16 fold folder) and `expand_inputs` (``--input``: files, folders, glob
patterns) say which volumes to cut, in order. `extract_fold` reads each through
`volume_io.read_volume`, cuts it with the sampler and reports per volume how many cubes it gave
and why fewer than wanted; a volume that cannot be used (`volume_io.VolumeError`: unreadable,
truncated, NaN voxels, a broken DICOM series, not 3-D) is skipped with a warning naming it.

Randomness: by default one generator draws every window, volume after volume (the original's
single stream); with ``processes >= 1`` volume ``i`` draws from its own stream,
`extraction_sampler.volume_generator` ``(seed, i)``, so the cubes do not depend on the number
of processes.

Imports: the standard library, NumPy, tqdm (the progress bar), `extraction_presets`,
`extraction_sampler` and `volume_io`. Never Keras.
"""

from __future__ import annotations

import os
import random
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from extraction_presets import setup_config
from extraction_sampler import (
    GeneratorRandint,
    infinite_generator_from_one_volume,
    size_problem,
    volume_generator,
)
from volume_io import VOLUME_SUFFIXES, VolumeError, read_volume

if TYPE_CHECKING:  # numpy.typing is slow to import; annotations are strings here
    from numpy.typing import DTypeLike

__all__ = [
    "FoldResult",
    "VolumeReport",
    "expand_inputs",
    "extract_fold",
    "iter_volumes",
    "list_volumes",
]

# The function cutting one volume's cubes: (config, array, rng, positions=list) -> cubes or None.
Sampler = Callable[..., "np.ndarray | None"]

# ----------------------------------------------------------------------------------------------
# Which volumes


def list_volumes(fold_dir: str) -> list[str]:
    """The volumes of one fold folder, in sorted name order.

    Files ending in .mhd, .mha, .nii, .nii.gz or .nrrd (any case) are volumes; so is every
    sub-folder (read as a DICOM series). Hidden entries and other files (.raw data) are ignored.

    Args:
        fold_dir: e.g. ``datasets/luna16/subset0``.

    Returns:
        Paths, sorted by name.
    """
    found = []
    for name in sorted(os.listdir(fold_dir)):
        if name.startswith("."):
            continue
        path = os.path.join(fold_dir, name)
        if os.path.isdir(path) or name.lower().endswith(VOLUME_SUFFIXES):
            found.append(path)
    return found


def _is_dicom_file(path: str) -> bool:
    """A file with the DICOM marker (``DICM`` at byte 128), or named ``*.dcm``."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _volumes_under(folder: str) -> list[str]:
    """Volumes in a folder and its sub-folders, sorted: volume files, and every folder that
    directly holds DICOM files (one series each)."""
    found = []
    seen = set()
    # Linked folders are followed (collections are often assembled from links), each once.
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        visible = sorted(f for f in files if not f.startswith("."))
        found += [os.path.join(here, f) for f in visible if f.lower().endswith(VOLUME_SUFFIXES)]
        others = [f for f in visible if not f.lower().endswith(VOLUME_SUFFIXES + (".raw",))]
        if any(_is_dicom_file(os.path.join(here, f)) for f in others[:20]):
            found.append(here)
    return sorted(found)


def expand_inputs(items: Sequence[str]) -> list[str]:
    """The volumes named by ``--input``: files, folders searched recursively, glob patterns.

    A folder gives its volume files (.mhd, .mha, .nii, .nii.gz, .nrrd) and every sub-folder
    holding DICOM files, at any depth; a pattern (``*``, ``?``, ``[``; ``**`` for any depth)
    gives what it matches, expanded the same way. Each item's volumes are sorted by path, items
    keep their order, and a volume named twice is read once.

    Args:
        items: the ``--input`` values.

    Returns:
        The volume paths, in extraction order.

    Raises:
        FileNotFoundError: an item names nothing that exists, or a pattern matches nothing.
        ValueError: a file is not a volume, or a folder holds no volume.
    """
    import glob

    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(
                    f"Expected --input pattern {item!r} to match volume files or folders. "
                    "Received: no match"
                )
        elif os.path.exists(item):
            matches = [item]
        else:
            raise FileNotFoundError(
                f"Expected --input {item!r} to be a volume file, a folder or a glob pattern. "
                "Received: no such file or folder"
            )
        volumes: list[str] = []
        for match in matches:
            if os.path.isdir(match):
                volumes += _volumes_under(match)
            elif match.lower().endswith(VOLUME_SUFFIXES):
                volumes.append(match)
            elif not any(c in item for c in "*?["):
                raise ValueError(
                    f"Expected --input {item!r} to be a .mhd, .mha, .nii, .nii.gz or .nrrd "
                    "file, or a folder. Received: a file of another type"
                )
        if not volumes:
            raise ValueError(
                f"Expected --input {item!r} to hold .mhd, .mha, .nii, .nii.gz or .nrrd files or "
                "DICOM series folders. Received: none found"
            )
        for v in volumes:
            key = os.path.abspath(v)
            if key not in seen:
                seen.add(key)
                out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# Reading ahead


def _read_or_reason(
    path: str, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray | None, str | None]:
    """Read one volume: (array, None), or (None, why it cannot be used)."""
    try:
        return read_volume(path, spacing), None
    except VolumeError as exc:
        return None, exc.problem  # the caller names the file
    except (OSError, MemoryError, ValueError) as exc:
        return None, f"cannot read: {exc}"


def iter_volumes(
    paths: Sequence[str], workers: int, spacing: Sequence[float] | None = None
) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """Yield ``(path, array or None, reason or None)`` for each path, in order.

    With ``workers > 0``, that many threads read the next volumes while the caller samples the
    current one (SimpleITK releases the GIL while reading); the order never changes.

    Args:
        paths: volume files or DICOM folders, in the order wanted.
        workers: reading threads (0: read in the caller's thread).
        spacing: resample each volume to this (x, y, z) spacing in mm (None: native).

    Returns:
        An iterator over ``(path, array in (x, y, z) order or None, reason or None)``.
    """
    if workers <= 0:
        for path in paths:
            yield (path, *_read_or_reason(path, spacing))
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-volume")
    try:
        todo = iter(paths)
        pending: deque = deque()
        for path in todo:
            pending.append((path, pool.submit(_read_or_reason, path, spacing)))
            if len(pending) >= workers:
                break
        while pending:
            path, future = pending.popleft()
            result = future.result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_or_reason, nxt, spacing)))
            yield (path, *result)
            del result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# One fold


@dataclass
class VolumeReport:
    """What one volume gave: the number of cubes and, when fewer than wanted, why."""

    path: str
    cubes: int
    reason: str | None = None


@dataclass
class FoldResult:
    """The cubes of one fold (or of a list of volumes) and a report per volume.

    Attributes:
        cubes: one array per volume that gave any cube, in order.
        volumes: one report per volume read, in order.
        sources: the path of each array of ``cubes``.
        positions: for each array of ``cubes``, the ``(n, 3)`` first voxels (x, y, z) of its
            windows in the volume as cut (after any resampling).
    """

    cubes: list[np.ndarray] = field(default_factory=list)
    volumes: list[VolumeReport] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)

    @property
    def n_cubes(self) -> int:
        return sum(len(c) for c in self.cubes)


def _cut_one(
    path: str,
    array: np.ndarray | None,
    reason: str | None,
    config: setup_config,
    rng: random.Random | GeneratorRandint,
    dtype: DTypeLike,
    warn_all_sizes: bool,
    sampler: Sampler = infinite_generator_from_one_volume,
) -> tuple[VolumeReport, np.ndarray | None, np.ndarray, list[str]]:
    """Sample one volume already read: (report, cubes or None, positions, warnings)."""
    warnings: list[str] = []
    positions = np.zeros((0, 3), dtype=np.int64)
    if array is None:
        warnings.append(f"warning: skipping {path}: {reason}")
        return VolumeReport(path, 0, reason), None, positions, warnings
    reason = size_problem(config, array.shape)
    # The original gives nothing silently for too few slices; with --input every size problem
    # is named at once, since a preset's borders may not fit a whole collection.
    if reason is not None and (warn_all_sizes or reason.startswith("too small")):
        warnings.append(f"warning: skipping {path}: {reason}")
    cubes = None
    if reason is None:
        where: list[tuple[int, int, int]] = []
        try:
            cubes = sampler(config, array, rng, positions=where)
        except VolumeError as exc:
            reason = exc.problem
            warnings.append(f"warning: skipping {path}: {reason}")
        else:
            positions = np.asarray(where, dtype=np.int64).reshape(-1, 3)
    del array
    if reason is None and cubes is None:
        what = (
            "failed the air test (too little lung)"
            if config.test == "air"
            else f"failed the foreground test (under {config.foreground_fraction:g} of the "
            f"voxels at or above {config.foreground_threshold:g} once scaled to [0, 1])"
        )
        reason = f"gave no cube: all {50 * config.scale} windows {what}"
    elif cubes is not None and len(cubes) < config.scale:
        reason = f"gave {len(cubes)} of {config.scale} cubes: {50 * config.scale} windows tried"
    if cubes is not None:
        cubes = cubes.astype(dtype, copy=False)
    report = VolumeReport(path, 0 if cubes is None else len(cubes), reason)
    return report, cubes, positions, warnings


def _process_one(
    task: tuple[int, str, setup_config, int, Sequence[float] | None, str, bool, Sampler],
) -> tuple[VolumeReport, np.ndarray | None, np.ndarray, list[str]]:
    """Read and sample volume ``index`` in a worker process, from its own random stream."""
    index, path, config, seed, spacing, dtype, warn_all_sizes, sampler = task
    array, reason = _read_or_reason(path, spacing)
    rng = volume_generator(seed, index)
    return _cut_one(path, array, reason, config, rng, dtype, warn_all_sizes, sampler)


def _init_worker(itk_threads: int) -> None:
    """Worker processes leave Ctrl-C to the main process, which stops the pool."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
    except ImportError:  # read_volume says so, per volume
        pass


def _iter_processes(
    paths: Sequence[str],
    config: setup_config,
    seed: int,
    processes: int,
    spacing: Sequence[float] | None,
    dtype: DTypeLike,
    warn_all_sizes: bool,
    sampler: Sampler,
) -> Iterator[tuple[VolumeReport, np.ndarray | None, np.ndarray, list[str]]]:
    """The results of ``_process_one`` for each volume, in order, from a pool of processes.

    At most ``2 * processes`` volumes are in flight, so memory stays bounded however many
    volumes there are. Processes are spawned (not forked): a fork of a process whose threads
    hold locks (ITK's, tqdm's) can hang.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    itk_threads = max(1, (os.cpu_count() or 1) // processes)
    pool = ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(itk_threads,),
    )
    try:
        tasks = iter(
            (i, p, config, seed, spacing, np.dtype(dtype).str, warn_all_sizes, sampler)
            for i, p in enumerate(paths)
        )
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(_process_one, task))
            if len(pending) >= 2 * processes:
                break
        while pending:
            result = pending.popleft().result()
            task = next(tasks, None)
            if task is not None:
                pending.append(pool.submit(_process_one, task))
            yield result
            del result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def extract_fold(
    paths: Sequence[str],
    config: setup_config,
    rng: random.Random | None,
    dtype: DTypeLike = np.float32,
    workers: int = 2,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
    *,
    spacing: Sequence[float] | None = None,
    processes: int = 0,
    seed: int | None = None,
    warn_all_sizes: bool = False,
    sampler: Sampler = infinite_generator_from_one_volume,
) -> FoldResult:
    """Sample the cubes of every volume in ``paths``, in that order.

    By default one generator, ``rng``, draws every window, volume after volume (the original's
    single stream). With ``processes >= 1`` each volume draws from its own stream,
    ``volume_generator(seed, index)``, in that many worker processes: the cubes then depend on
    the seed and the order of ``paths`` only, not on the number of processes.

    Args:
        paths: volume files or DICOM folders.
        config: the extraction settings.
        rng: the seeded generator, shared by all volumes in order (ignored with processes).
        dtype: dtype of the kept cubes (sampling is in float64; the cast happens per volume).
        workers: threads reading ahead (0: read in this thread); single-stream mode only.
        progress: show a tqdm progress bar over the volumes.
        warn: callable taking a message, for volumes skipped with a problem (default: stderr).
        spacing: resample each volume to this (x, y, z) spacing in mm first (None: native).
        processes: 0 for the single stream; N >= 1 for N worker processes, one stream per
            volume.
        seed: the seed of the per-volume streams (required with processes).
        warn_all_sizes: warn about every volume too small for the settings (default: only
            those too small in x or y, as before).
        sampler: cuts one volume's cubes (default: the original's algorithm); with processes,
            a module-level function, since it is sent to the workers.

    Returns:
        A FoldResult with the cubes (one array per volume that gave any), where they were cut,
        and a report per volume.
    """
    if processes and seed is None:
        raise ValueError("Expected a seed for the per-volume streams. Received: seed=None")
    result = FoldResult()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="volume", file=sys.stderr, dynamic_ncols=True)
    if warn is None:
        warn = (
            (lambda m: bar.write(m, file=sys.stderr))
            if bar is not None
            else (lambda m: print(m, file=sys.stderr))
        )
    if processes:
        outcomes = _iter_processes(
            paths, config, int(seed), processes, spacing, dtype, warn_all_sizes, sampler
        )
    else:
        outcomes = (
            _cut_one(path, array, reason, config, rng, dtype, warn_all_sizes, sampler)
            for path, array, reason in iter_volumes(paths, workers, spacing)
        )
    try:
        for report, cubes, positions, warnings in outcomes:
            for message in warnings:
                warn(message)
            if cubes is not None:
                result.cubes.append(cubes)
                result.sources.append(report.path)
                result.positions.append(positions)
            result.volumes.append(report)
            del cubes
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cubes=result.n_cubes)
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()
        if bar is not None:
            bar.close()
    return result
