"""A `keras.utils.PyDataset` of Models Genesis training pairs over memory-mapped cube files.

`GenesisPairDataset` replaces the original's endless `generate_pair` generator for
`model.fit`: it reads `.npy` cube files with `np.load(mmap_mode="r")` (never loading them
whole, and unmapping the pages each batch read, so the resident size does not grow over an
epoch), and batch i of epoch e is a pure function of (seed, e, i), so results do not depend
on the number of workers, on threads versus processes, or on the order Keras asks for batches.
The transforms themselves live in `transforms.py` (pure NumPy); see docs/pretraining.md.

Layouts: like `unet3d.unet_model_3d`, the dataset defaults to the original's channels-first
layout (`genesis_files.MODEL_DATA_FORMAT`), so code written for the original keeps working;
the pre-training command line asks for channels-last (`genesis_files.TRAINING_DATA_FORMAT`),
which trains faster. The weights do not depend on the layout.

Imports: stdlib, numpy, keras, transforms, genesis_files.
"""

from __future__ import annotations

import copy
import ctypes
import mmap
import os
import sys
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

import transforms
from genesis_files import DATA_FORMATS, MODEL_DATA_FORMAT

STATUSES = ("train", "test")


class GenesisPairDataset(keras.utils.PyDataset):
    """(corrupted input, original) batches for Models Genesis pre-training.

    Batch i of epoch e draws from `np.random.default_rng([seed, e, i])`: batch_size distinct
    cubes out of all files, then the transforms of `transforms.corrupt_into` in the original's
    order and rates (from `config`). `on_epoch_end` moves to the next epoch; `set_epoch(e)`
    jumps to one (e.g. when resuming).

    Keras' `model.fit` calls `on_epoch_end` once before its first epoch too (its epoch
    iterator's `reset()`), and a validation dataset gets two more calls from each evaluation,
    so counting those calls gives epoch numbers that differ between a fresh and a resumed run:
    fit's epoch k reads dataset epoch k + 1. To resume with `fit(..., initial_epoch=k)`, call
    `set_epoch(k)` first: the batches are then those an uninterrupted run would have seen.
    Or pass `epoch_from_keras=False`, so `on_epoch_end` does nothing, and call
    `set_epoch(epoch)` from a callback's `on_epoch_begin` (Keras starts its workers after the
    callbacks), as the trainer does: batch i of epoch e is then the same in a fresh and in a
    resumed run. The epoch only changes between epochs (after Keras has stopped its workers),
    so threads and worker processes all see the right one.

    Args:
        cube_files: a path or list of paths of `.npy` files, each (N, R, C, D) or
            (N, 1, R, C, D), float32 or float64, values in [0, 1]; all with the same (R, C, D).
        batch_size: cubes per batch (distinct within a batch).
        config: object with the transform rates (flip_rate, local_rate, nonlinear_rate,
            paint_rate, outpaint_rate, inpaint_rate) and save_samples, exp_name, sample_path
            (missing attributes take the original defaults), e.g. `models_genesis_config`.
        seed: base seed of every batch's generator.
        status: "train" (the original's sample PNGs, about one batch in 100, when
            config.save_samples is set) or "test" (no PNGs).
        data_format: "channels_first" (the default, the original's layout) gives
            (B, 1, R, C, D); "channels_last" (B, R, C, D, 1).
        steps: batches per epoch; None means total cubes // batch_size (as the original's
            steps_per_epoch).
        workers, use_multiprocessing, max_queue_size: passed to `keras.utils.PyDataset`.
        epoch_from_keras: True: each `on_epoch_end` call moves to the next epoch. False:
            `on_epoch_end` is ignored and only `set_epoch` changes the epoch.
        process_index, process_count: multi-process training (docs/multihost.md): each of
            `process_count` processes makes only its share of every global batch of
            `batch_size`, samples [p * b, (p + 1) * b) with b = batch_size // process_count.
            The shares put together are the batch a single process makes, byte for byte;
            only process 0 writes sample PNGs.

    Attributes:
        cube_shape: (R, C, D). num_cubes: total cubes over all files. epoch: current epoch.
        epoch_from_keras: as given.
    """

    def __init__(
        self,
        cube_files: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int,
        config: Any,
        *,
        seed: int = 0,
        status: str = "train",
        data_format: str = MODEL_DATA_FORMAT,
        steps: int | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        epoch_from_keras: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        super().__init__(
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
        if isinstance(cube_files, (str, os.PathLike)):
            cube_files = [cube_files]
        self.cube_files = [os.fspath(f) for f in cube_files]
        if not self.cube_files:
            raise ValueError("Expected at least one cube file. Received: cube_files=[]")
        if data_format not in DATA_FORMATS:
            raise ValueError(
                f"Expected data_format in {DATA_FORMATS}. Received: data_format={data_format!r}"
            )
        if status not in STATUSES:
            raise ValueError(f"Expected status in {STATUSES}. Received: status={status!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"Expected seed to be a non-negative integer. Received: seed={seed!r}")
        self.rates = transforms.check_config(config)
        self.config = config
        self.seed = int(seed)
        self.status = status
        self.data_format = data_format
        self._arrays = []
        shape = None
        for f in self.cube_files:
            a = transforms.load_cubes(f)
            if shape is not None and a.shape[2:] != shape:
                raise ValueError(
                    f"Expected every cube file to hold cubes of shape {shape}. "
                    f"Received: {f} with cubes of shape {a.shape[2:]}"
                )
            shape = a.shape[2:]
            if a.shape[0] > 0:
                # A cheap check of the value range: the first cube of each file.
                transforms.check_values(np.asarray(a[0]), f"{f} (cube 0)")
            self._arrays.append(a)
        self.cube_shape: tuple[int, int, int] = tuple(int(s) for s in shape)
        self._offsets = np.cumsum([0] + [a.shape[0] for a in self._arrays])
        self.num_cubes: int = int(self._offsets[-1])
        self.batch_size = transforms.check_batch_size(
            batch_size, self.num_cubes, " + ".join(self.cube_files)
        )
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1
        ):
            raise ValueError(
                f"Expected steps to be a positive integer or None. Received: steps={steps!r}"
            )
        self.steps = None if steps is None else int(steps)
        self.epoch_from_keras = bool(epoch_from_keras)
        self._epoch = 0
        for name, value, low in (
            ("process_count", process_count, 1),
            ("process_index", process_index, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(
                    f"Expected {name} to be an integer >= {low}. Received: {name}={value!r}"
                )
        if process_index >= process_count or self.batch_size % process_count:
            raise ValueError(
                f"Expected process_index < process_count and batch_size divisible by "
                f"process_count. Received: process_index={process_index}, "
                f"process_count={process_count}, batch_size={self.batch_size}"
            )
        self.process_index, self.process_count = int(process_index), int(process_count)
        share = self.batch_size // self.process_count
        self.share = slice(self.process_index * share, (self.process_index + 1) * share)

    def __getstate__(self) -> dict:
        # Memory maps would pickle as whole arrays: processes started with "spawn" reopen the
        # files instead ("fork", Linux's default, shares them without pickling).
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._arrays = [transforms.load_cubes(f) for f in self.cube_files]

    # -- epochs ------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch whose batches __getitem__ returns."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Jump to `epoch` (e.g. to resume training with the batches it would have seen)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(
                f"Expected epoch to be a non-negative integer. Received: epoch={epoch!r}"
            )
        self._epoch = int(epoch)

    def on_epoch_end(self) -> None:
        """Called by Keras after each epoch: the next batches come from the next epoch.

        Ignored when the dataset was made with `epoch_from_keras=False`.
        """
        if self.epoch_from_keras:
            self._epoch += 1

    # -- batches -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps if self.steps is not None else self.num_cubes // self.batch_size

    def _locate(self, k: int) -> tuple[int, int]:
        """(file index, cube index in that file) of global cube index k."""
        f = int(np.searchsorted(self._offsets, k, side="right")) - 1
        return f, int(k - self._offsets[f])

    def _cube(self, k: int) -> np.ndarray:
        f, i = self._locate(k)
        return self._arrays[f][i]

    def batch_indices(self, index: int, epoch: int | None = None) -> np.ndarray:
        """Global indices of the cubes of batch `index` of `epoch` (default: current)."""
        rng = self._batch_rng(index, epoch)
        return rng.choice(self.num_cubes, self.batch_size, replace=False)

    def _batch_rng(self, index: int, epoch: int | None) -> np.random.Generator:
        e = self._epoch if epoch is None else int(epoch)
        return np.random.default_rng([self.seed, e, int(index)])

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"Expected a non-negative batch index. Received: index={index!r}")
        rng = self._batch_rng(index, None)
        chosen = rng.choice(self.num_cubes, self.batch_size, replace=False)
        source = _CubeView(self)
        try:
            if self.process_count == 1:
                x, y = transforms.make_batch(
                    source, chosen, self.config, rng, self.status, what="cubes"
                )
            else:
                x, y = self._make_share(source, chosen, rng)
                chosen = chosen[self.share]
        except ValueError:
            for k in chosen:  # name the offending file and cube
                f, i = self._locate(int(k))
                transforms.check_values(
                    np.asarray(self._arrays[f][i]), f"{self.cube_files[f]} (cube {i})"
                )
            raise
        # make_batch has copied the cubes: unmap every page of the files this batch read, so
        # the pages of cubes read over an epoch do not pile up in the resident size. The whole
        # file, not just the cubes read: the kernel maps pages in large blocks around each one.
        for f in {self._locate(int(k))[0] for k in chosen}:
            release_pages(self._arrays[f])
        if x.dtype != np.float32:
            x, y = x.astype(np.float32), y.astype(np.float32)
        if self.data_format == "channels_last":
            x, y = np.moveaxis(x, 1, -1), np.moveaxis(y, 1, -1)
        return x, y

    def whole_batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index` of the current epoch in full, even on a process that makes a share.

        For a fixed batch every process of a multi-process run must see whole (the trainer's
        collapse check). It writes no sample PNG.

        Args:
            index: the batch index.

        Returns:
            (x, y) of all `batch_size` pairs, as a single process' `self[index]`.
        """
        whole = copy.copy(self)  # shares the memory maps
        whole.process_index, whole.process_count = 0, 1
        whole.share = slice(0, self.batch_size)
        whole.status = "test"
        return whole[index]

    def _make_share(
        self, source: _CubeView, chosen: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """This process' share of the batch of `chosen`, as `transforms.make_batch` would.

        The pairs of a batch draw from one stream in order, so the draws of the samples before
        this share are made and discarded (`_skip_pair`: random numbers only, no cube read,
        no transform); the samples after it are not drawn at all.
        """
        mine = chosen[self.share]
        dtype = np.dtype(source.dtype)
        for _ in range(self.share.start):
            _skip_pair(source.shape[1:], dtype, self.rates, rng)
        buf = np.empty((2, len(mine)) + tuple(source.shape[1:]), dtype)
        x, y = buf[0], buf[1]
        for k, i in enumerate(mine):
            y[k] = source[i]
        transforms.check_values(y, f"cubes[{list(map(int, mine))}]")
        for n in range(len(mine)):
            transforms.corrupt_into(y[n], x[n], self.rates, rng)
        if self.process_index == 0:
            # Which pair of the batch a sample PNG shows depends on the number of processes;
            # the training pairs do not.
            transforms.maybe_save_sample(x, y, self.config, self.status, rng)
        return x, y


def _skip_pair(
    shape: tuple, dtype: np.dtype, rates: dict[str, float], rng: np.random.Generator
) -> None:
    """Draw from `rng` exactly what `transforms.corrupt_into` draws for one cube, and nothing
    else: the draws never depend on the cube's values, so no cube is needed."""
    transforms.draw_flip_params(rates["flip_rate"], rng=rng)
    transforms.draw_local_shuffle_params(shape, rates["local_rate"], rng=rng)
    transforms.draw_nonlinear_params(rates["nonlinear_rate"], rng=rng)
    if rng.random() < rates["paint_rate"]:
        if rng.random() < rates["inpaint_rate"]:
            transforms.draw_in_painting_params(shape, rng=rng, dtype=dtype)
        else:
            noise = np.empty(shape[1:], dtype)
            transforms.draw_out_painting_params(shape, rng=rng, dtype=dtype, noise_out=noise)


class _CubeView:
    """Indexable view over all files' cubes as one (N, 1, R, C, D) sequence, for make_batch."""

    def __init__(self, ds: GenesisPairDataset) -> None:
        self._ds = ds
        first = ds._arrays[0]
        self.shape = (ds.num_cubes,) + first.shape[1:]
        self.dtype = np.result_type(*[a.dtype for a in ds._arrays])

    def __getitem__(self, k: Any) -> np.ndarray:
        return self._ds._cube(int(k))


def _load_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _load_madvise()
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def release_pages(view: np.ndarray) -> bool:
    """Unmap the pages of a memory-mapped, read-only array (or slice) from this process.

    Why: every cube a batch reads would stay mapped, and mapped file pages count in the process'
    resident size, so over an epoch on a large cube file `top` would show the trainer growing
    towards the file's size (the pages are page cache the kernel could drop, but RSS limits of
    clusters and schedulers count them). MADV_DONTNEED on a read-only file mapping only drops
    the process' page-table entries: the data stay in the page cache and a later read of the
    same bytes faults them back in, so other threads reading neighbouring cubes are unaffected.

    Args:
        view: a C-contiguous read-only np.memmap or slice of one. Only the whole pages inside
            it are released (never memory outside the array).
    Returns:
        True if the kernel took the advice; False for anything else (not a read-only memmap,
        no madvise on this system): then it does nothing. Only memory accounting, never
        results, depends on it.
    """
    # Only ever on a read-only file mapping: on anonymous or copy-on-write memory MADV_DONTNEED
    # would throw the data away.
    if (
        _MADVISE is None
        or getattr(view, "_mmap", None) is None
        or getattr(view, "mode", None) != "r"
        or view.nbytes == 0
        or not view.flags.c_contiguous
    ):
        return False
    page = mmap.PAGESIZE
    start = view.ctypes.data
    # Only whole pages inside the array: a page it shares with the file's header stays.
    lo = -(-start // page) * page
    hi = (start + view.nbytes) // page * page
    if hi <= lo:
        return False
    return _MADVISE(ctypes.c_void_p(lo), hi - lo, _MADV_DONTNEED) == 0
