"""Models Genesis pre-training: restore cubes corrupted by the Genesis transforms.

Trains the 3D U-Net of `unet3d.py` to map corrupted cubes back to their originals (Zhou et al.,
"Models Genesis", MedIA 2021; docs/pretraining.md), reading (corrupted, original) batches from
memory-mapped cube files through `GenesisPairDataset`. `Genesis_Chest_CT.py` parses the command
line and calls `run_with_oom_retry`; the steps are:

* `prepare`: every input check that needs no model (files, shapes, step counts, output folder);
* `setup`: model, weights or checkpoint, datasets, callbacks, the run's records;
* `train`: `setup`, then `model.fit`;
* `run_with_oom_retry`: `train`, with a smaller batch after an accelerator out-of-memory error.

Bad input (cube files, flags, weights, the output folder, a checkpoint that does not fit) is
raised as `PretrainingInputError` where it is checked, and the command line prints it in one
line; every other error, during setup or training, keeps its type and traceback.

Imports: stdlib, numpy, keras, unet3d, genesis_dataset, genesis_callbacks, genesis_checkpoint,
genesis_files, genesis_multihost, config (this module is imported only after the command line
is parsed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

import unet3d
from config import PretrainingInputError, models_genesis_config
from genesis_callbacks import (
    AtomicBestCheckpoint,
    CollapseWarning,
    EpochSetter,
    LastEpochCheckpoint,
    ResumableEarlyStopping,
    ResumableReduceLROnPlateau,
)
from genesis_checkpoint import (
    RunPaths,
    RunState,
    check_writable,
    load_last_checkpoint,
    next_run_dir,
    read_checkpoint_state,
    truncate_csv,
    write_text_atomic,
)
from genesis_dataset import GenesisPairDataset
from genesis_files import cube_file_names
from genesis_multihost import current as current_group
from genesis_multihost import describe_failure, initialize, is_writer

__all__ = [
    "PretrainingInputError",
    "TrainingPlan",
    "TrainingSession",
    "build_model",
    "check_cube_file",
    "find_cube_files",
    "find_listed_cube_files",
    "is_oom_error",
    "load_weights_checked",
    "make_datasets",
    "prepare",
    "resolve_cube_files",
    "run_with_oom_retry",
    "select_distribution",
    "setup",
    "split_by_source",
    "SubsetPairDataset",
    "tensorboard_available",
    "train",
]

EXTRACTION_HINT = (
    "Extract them first, e.g.: python infinite_generator_3D.py --fold {fold} "
    "--scale {scale} --input_rows {r} --input_cols {c} --input_deps {d} "
    "--data LUNA16_ROOT --save {data}"
)
# unet_model_3d's default depth 4 pools three times by 2.
POOLING_FACTOR = 2**3


@dataclasses.dataclass
class TrainingPlan:
    """What `prepare` found: the cube files, their counts and the step counts.

    Attributes:
        paths: where the run writes.
        train_files, valid_files: one cube file per training / validation fold.
        n_train, n_valid: cubes over those files.
        steps, val_steps: training / validation batches per epoch.
    """

    paths: RunPaths
    train_files: list[str]
    valid_files: list[str]
    n_train: int
    n_valid: int
    steps: int
    val_steps: int
    # With valid_fraction: the cubes (indices over the files, in order) of each side.
    train_indices: np.ndarray | None = None
    valid_indices: np.ndarray | None = None


@dataclasses.dataclass
class TrainingSession:
    """What `setup` made for `fit`.

    Attributes:
        model: the compiled U-Net (weights or checkpoint loaded).
        train_ds, valid_ds: the datasets, whose epoch the `EpochSetter` callback sets.
        callbacks: for `fit`, in order.
        initial_epoch: 0, or the epoch a resumed run continues at.
        plan: `prepare`'s result.
    """

    model: keras.Model
    train_ds: GenesisPairDataset
    valid_ds: GenesisPairDataset
    callbacks: list[keras.callbacks.Callback]
    initial_epoch: int
    plan: TrainingPlan


# ------------------------------------------------------------------------------------------
# Input checks (all run before any training)
# ------------------------------------------------------------------------------------------


def find_cube_files(
    config: models_genesis_config, folds: Sequence[int], role: str
) -> tuple[list[str], int]:
    """Locate and check the cube file of each fold.

    Args:
        config: the run's configuration (data folder, scale, cube size).
        folds: the fold numbers.
        role: "training" or "validation", for messages.

    Returns:
        One absolute path per fold, and the number of cubes in them all.

    Raises:
        PretrainingInputError: a fold has no cube file (the message lists the names tried), or
            a file holds cubes of another shape or type than the config expects.
    """
    data = os.path.abspath(config.data)
    paths, n_cubes = [], 0
    for fold in folds:
        names = cube_file_names(
            config.scale, config.input_rows, config.input_cols, config.input_deps, fold
        )
        found = [os.path.join(data, n) for n in names if os.path.isfile(os.path.join(data, n))]
        if not found:
            hint = EXTRACTION_HINT.format(
                fold=fold,
                scale=config.scale,
                r=config.input_rows,
                c=config.input_cols,
                d=config.input_deps,
                data=config.data,
            )
            raise PretrainingInputError(
                f"No cube file for {role} fold {fold} in {data}. Expected one of: "
                f"{', '.join(names)}. {hint}"
            )
        n_cubes += check_cube_file(found[0], config)
        paths.append(found[0])
    return paths, n_cubes


def resolve_cube_files(patterns: Sequence[str], role: str) -> list[str]:
    """The cube files named by paths and glob patterns (``*``, ``?``, ``[``; ``**`` any depth).

    Args:
        patterns: the ``train_files`` or ``valid_files`` entries, relative to the current folder.
        role: "training" or "validation", for messages.

    Returns:
        Absolute paths: each pattern's matches sorted, patterns in order, each file once.

    Raises:
        PretrainingInputError: a pattern matches no file, or a path does not exist.
    """
    import glob

    out: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
            if not matches:
                raise PretrainingInputError(
                    f"Expected the {role} pattern {pattern!r} to match cube files (.npy) "
                    f"from {os.getcwd()}. Received: no file matches it"
                )
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise PretrainingInputError(
                f"Expected a {role} cube file at {pattern!r} (from {os.getcwd()}). "
                "Received: no such file"
            )
        for m in matches:
            full = os.path.abspath(m)
            if full not in out:
                out.append(full)
    return out


def find_listed_cube_files(
    config: models_genesis_config, patterns: Sequence[str], role: str
) -> tuple[list[str], int]:
    """Like `find_cube_files`, for files named by paths or glob patterns instead of folds.

    Args:
        config: gives the expected cube size.
        patterns: paths or glob patterns (`resolve_cube_files`).
        role: "training" or "validation", for messages.

    Returns:
        The absolute paths and the number of cubes in them all.
    """
    paths = resolve_cube_files(patterns, role)
    return paths, sum(check_cube_file(p, config) for p in paths)


def split_by_source(
    files: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Split the cubes of ``files`` into training and validation by source volume.

    Each cube file ``F.npy`` needs its ``F.csv`` (``source,x,y,z``, one row per cube, written by
    ``infinite_generator_3D.py --output``). The distinct sources, sorted, are shuffled by
    ``numpy.random.default_rng(seed)``; the first ``round(fraction * n)`` (at least 1, at most
    ``n - 1``) validate, the others train, so no volume gives cubes to both sides.

    Args:
        files: the cube files, in order.
        fraction: share of the sources that validate, in (0, 1).
        seed: the run's seed.

    Returns:
        (training indices, validation indices, training sources, validation sources): indices
        over the cubes of all files in order, sorted.

    Raises:
        PretrainingInputError: a file has no CSV beside it, a CSV does not list one row per
            cube, or there are fewer than 2 sources.
    """
    import csv

    sources: list[str] = []
    for path in files:
        table = os.path.splitext(path)[0] + ".csv"
        if not os.path.isfile(table):
            raise PretrainingInputError(
                f"Expected {table} beside {path} for valid_fraction (the per-cube CSV that "
                "infinite_generator_3D.py --input ... --output writes). Received: no such file; "
                "pass valid_files instead"
            )
        with open(table, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "source" not in reader.fieldnames:
                raise PretrainingInputError(
                    f"Expected a 'source' column in {table}. Received: {reader.fieldnames}"
                )
            rows = [r["source"] for r in reader]
        n = int(np.load(path, mmap_mode="r").shape[0])
        if len(rows) != n:
            raise PretrainingInputError(
                f"Expected one row per cube in {table} ({n} cubes in {path}). "
                f"Received: {len(rows)} rows"
            )
        sources += rows
    names = sorted(set(sources))
    if len(names) < 2:
        raise PretrainingInputError(
            "Expected cubes from at least 2 source volumes to split by valid_fraction. "
            f"Received: {len(names)} source in {', '.join(files)}"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    n_valid = min(max(1, round(fraction * len(names))), len(names) - 1)
    valid_names = {names[i] for i in order[:n_valid]}
    is_valid = np.array([s in valid_names for s in sources], dtype=bool)
    return (
        np.flatnonzero(~is_valid),
        np.flatnonzero(is_valid),
        len(names) - n_valid,
        n_valid,
    )


def check_cube_file(path: str, config: models_genesis_config) -> int:
    """Check one cube file's header (memory-mapped: no cube is read).

    Args:
        path: a .npy file of cubes (N, R, C, D) or (N, 1, R, C, D).
        config: gives the expected R, C, D.

    Returns:
        The number of cubes N.

    Raises:
        PretrainingInputError: the file cannot be read, or holds no float cubes of the
            expected size.
    """
    try:
        cubes = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:  # a truncated or foreign file: say which
        raise PretrainingInputError(f"Cannot read cube file {path}: {exc}") from exc
    expected = (config.input_rows, config.input_cols, config.input_deps)
    shape = tuple(cubes.shape)
    if len(shape) == 4:
        spatial = shape[1:]
    elif len(shape) == 5 and shape[1] == 1:
        spatial = shape[2:]
    else:
        spatial = None
    if spatial != expected:
        raise PretrainingInputError(
            f"Expected cubes of shape (N, {expected[0]}, {expected[1]}, {expected[2]}) in {path} "
            f"(from --input_rows/--input_cols/--input_deps). Received: shape={shape}"
        )
    if cubes.dtype not in (np.float32, np.float64):
        raise PretrainingInputError(
            f"Expected float32 or float64 cubes in {path}. Received: dtype={cubes.dtype}"
        )
    if shape[0] < 1:
        raise PretrainingInputError(
            f"Expected at least one cube in {path}. Received: shape={shape}"
        )
    return int(shape[0])


def prepare(config: models_genesis_config, overwrite: bool = False) -> TrainingPlan:
    """All input checks that need no model: files, shapes, step counts, output folder.

    Args:
        config: the run's configuration.
        overwrite: allow replacing an existing run without `config.resume` (used only when
            retrying after an out-of-memory error within the same invocation).

    Returns:
        The `TrainingPlan`.

    Raises:
        PretrainingInputError: model_path cannot be written to; a run already exists there
            and neither resume nor overwrite is set; missing or unfitting cube files, sizes or
            counts.
    """
    paths = RunPaths.of(config)
    if is_writer():  # the other processes of a multi-process run write nothing
        try:
            check_writable(os.path.dirname(paths.best))
        except PermissionError as exc:  # the check's own refusal, which names the folder
            raise PretrainingInputError(str(exc)) from exc
    existing = [p for p in (paths.last, paths.best) if os.path.exists(p)]
    if existing and not config.resume and not overwrite:
        raise PretrainingInputError(
            f"A run already exists ({', '.join(existing)}). Pass --resume to continue it, or "
            "choose another --model_path or --exp_name."
        )
    # Each header is read once: find_cube_files checks the files and counts their cubes.
    if config.train_files:
        train_files, n_train = find_listed_cube_files(config, config.train_files, "training")
    else:
        train_files, n_train = find_cube_files(config, config.train_fold, "training")
    train_indices = valid_indices = None
    if config.valid_fraction is not None:
        # The same files on both sides, split by source volume.
        valid_files = list(train_files)
        train_indices, valid_indices, n_src_train, n_src_valid = split_by_source(
            train_files, config.valid_fraction, config.seed
        )
        n_train, n_valid = len(train_indices), len(valid_indices)
        print(
            f"valid_fraction {config.valid_fraction}: {n_src_valid} source volumes "
            f"({n_valid} cubes) validate, {n_src_train} ({n_train} cubes) train."
        )
    elif config.valid_files:
        valid_files, n_valid = find_listed_cube_files(config, config.valid_files, "validation")
    else:
        valid_files, n_valid = find_cube_files(config, config.valid_fold, "validation")
    for role, n in (("training", n_train), ("validation", n_valid)):
        if n < config.batch_size:
            kind = "folds" if not config.train_files and config.valid_fraction is None else "files"
            raise PretrainingInputError(
                f"Expected at least batch_size={config.batch_size} {role} cubes. "
                f"Received: {n} cubes in the {role} {kind}."
            )
    steps = config.steps_per_epoch or n_train // config.batch_size
    val_steps = config.validation_steps or n_valid // config.batch_size
    for name in ("input_rows", "input_cols", "input_deps"):
        size = getattr(config, name)
        lower, upper = unet3d.valid_spatial_sizes(size, POOLING_FACTOR)
        if (lower, upper) != (size, size):
            nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise PretrainingInputError(
                f"Expected {name} divisible by {POOLING_FACTOR} (three 2x poolings). "
                f"Received: {name}={size}; the nearest that work are {nearest}."
            )
    return TrainingPlan(
        paths=paths,
        train_files=train_files,
        valid_files=valid_files,
        n_train=n_train,
        n_valid=n_valid,
        steps=steps,
        val_steps=val_steps,
        train_indices=train_indices,
        valid_indices=valid_indices,
    )


# ------------------------------------------------------------------------------------------
# Model, weights, datasets, devices
# ------------------------------------------------------------------------------------------


def build_model(config: models_genesis_config) -> unet3d.UNet3D:
    """The pre-training U-Net, compiled as the original: SGD (momentum 0.9), MSE; MAE, MSE.

    Args:
        config: gives the input shape, data format, width and learning rate.

    Returns:
        The compiled `unet3d.UNet3D`.
    """
    model = unet3d.unet_model_3d(
        config.input_shape,
        batch_normalization=True,
        n_base_filters=config.n_base_filters,
        data_format=config.data_format,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=config.lr, momentum=0.9),
        loss="mse",
        metrics=["mae", "mse"],
    )
    return model


def load_weights_checked(model: keras.Model, path: str) -> None:
    """`model.load_weights(path)`, raising a clear error when the file is missing or unfitting.

    Args:
        model: the model to load into.
        path: the `--weights` file, or `hf:FILE` for a published file of Hugging Face's
            MrGiovanni/ModelsGenesis (through the hub's cache; `download_weights`).

    Raises:
        PretrainingInputError: no file at `path`, an `hf:` name that cannot be fetched, or a
            file that does not fit the model.
    """
    if path.startswith("hf:"):
        from download_weights import resolve_weights  # only then: it needs huggingface_hub

        try:
            path = resolve_weights(path)
        except (ValueError, ImportError, FileNotFoundError) as exc:  # its documented refusals
            raise PretrainingInputError(str(exc)) from exc
    if not os.path.isfile(path):
        raise PretrainingInputError(f"Expected a weight file at --weights {path!r}; none found.")
    try:
        model.load_weights(path)
    except (ValueError, OSError) as exc:  # unfitting weights, or not a weight file at all
        raise PretrainingInputError(
            f"The weight file {path} does not fit this model (input "
            f"{model.input_shape[1:]}, {model.count_params()} parameters): {exc}. Expected "
            "weights of unet_model_3d with the same --n_base_filters (the published "
            "Genesis_Chest_CT.h5 needs the default 32)."
        ) from exc


def make_datasets(
    config: models_genesis_config, plan: TrainingPlan
) -> tuple[GenesisPairDataset, GenesisPairDataset]:
    """Training and validation datasets whose epoch the trainer sets itself.

    Args:
        config: the run's configuration.
        plan: `prepare`'s result.

    Returns:
        (training dataset, validation dataset), both with `epoch_from_keras=False`.
    """
    common = dict(
        data_format=config.data_format,
        workers=config.workers,
        use_multiprocessing=config.use_multiprocessing,
        max_queue_size=config.max_queue_size,
        epoch_from_keras=False,
        # Multi-process training: each process makes only its share of every global batch.
        process_index=current_group().index,
        process_count=current_group().count,
    )
    train_ds = _pair_dataset(
        plan.train_files,
        plan.train_indices,
        config.batch_size,
        config,
        seed=config.seed,
        status="train",
        steps=plan.steps,
        **common,
    )
    # Another seed keeps validation pairs independent of the training pairs. Validation pairs
    # change every epoch, as the original's endless validation generator did.
    valid_ds = _pair_dataset(
        plan.valid_files,
        plan.valid_indices,
        config.batch_size,
        config,
        seed=config.seed + 1,
        status="test",
        steps=plan.val_steps,
        **common,
    )
    return train_ds, valid_ds


class SubsetPairDataset(GenesisPairDataset):
    """`GenesisPairDataset` over some of its files' cubes (a `valid_fraction` split).

    Cube k of the dataset is cube ``indices[k]`` of all files in order; batches draw from
    these only, exactly as a `GenesisPairDataset` would over files holding just them.

    Args:
        cube_files, batch_size, config: as `GenesisPairDataset`.
        indices: distinct indices over all the files' cubes, in order.
        **kwargs: the other `GenesisPairDataset` arguments.
    """

    def __init__(
        self, cube_files: Sequence[str], batch_size: int, config: Any, *, indices: Any, **kwargs
    ) -> None:
        super().__init__(cube_files, batch_size, config, **kwargs)
        chosen = np.asarray(indices, dtype=np.int64).reshape(-1)
        if (
            chosen.size == 0
            or chosen.min() < 0
            or chosen.max() >= self.num_cubes
            or len(np.unique(chosen)) != chosen.size
        ):
            raise ValueError(
                f"Expected distinct cube indices in [0, {self.num_cubes}). "
                f"Received: {chosen.size} indices"
            )
        self._subset = chosen
        self.num_cubes = int(chosen.size)
        if self.batch_size > self.num_cubes:
            raise ValueError(
                f"Expected at most {self.num_cubes} cubes per batch (the subset's cubes). "
                f"Received: batch_size={self.batch_size}"
            )

    def _locate(self, k: int) -> tuple[int, int]:
        return super()._locate(int(self._subset[k]))


def _pair_dataset(
    files: Sequence[str], indices: np.ndarray | None, *args: Any, **kwargs: Any
) -> GenesisPairDataset:
    """A `GenesisPairDataset` over the files, or a `SubsetPairDataset` when indices are given."""
    if indices is None:
        return GenesisPairDataset(files, *args, **kwargs)
    return SubsetPairDataset(files, *args, indices=indices, **kwargs)


def select_distribution(config: models_genesis_config) -> tuple[Any, int]:
    """Choose data-parallel training over several accelerators.

    With `distribute="auto"` (default), more than one visible GPU/TPU selects
    `keras.distribution.DataParallel` on JAX or `tf.distribute.MirroredStrategy` on TensorFlow
    (PyTorch: one device, with a notice). `"all"` uses every visible device even when they are
    CPUs (for tests with virtual devices); `"off"` uses one device.

    Args:
        config: gives `distribute`.

    Returns:
        (a context manager to build and compile the model in, the number of devices).
    """
    backend = keras.backend.backend()
    group = current_group()
    if group.is_multi:
        return _multi_process_distribution(config, group)
    if config.distribute == "off":
        return contextlib.nullcontext(), 1
    if backend == "jax":
        devices = keras.distribution.list_devices()
        if config.distribute == "auto":
            devices = [d for d in devices if not d.lower().startswith("cpu")]
        if len(devices) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
            print(
                f"Data-parallel training over {len(devices)} devices "
                f"(keras.distribution.DataParallel): {', '.join(devices)}"
            )
            return contextlib.nullcontext(), len(devices)
    elif backend == "tensorflow":
        # TensorFlow-only glue: Keras 3 has no data-parallel API of its own on this backend.
        import tensorflow as tf

        devices = tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")
        if config.distribute == "all" and len(devices) < 2:
            devices = tf.config.list_logical_devices("CPU")
        if len(devices) > 1:
            names = [d.name for d in devices]
            strategy = tf.distribute.MirroredStrategy(names)
            print(
                f"Data-parallel training over {len(names)} devices "
                f"(tf.distribute.MirroredStrategy): {', '.join(names)}"
            )
            return strategy.scope(), len(names)
    else:
        count = _torch_gpu_count()
        if count > 1:
            print(
                f"Notice: {count} GPUs visible, but multi-GPU training is supported on the JAX "
                "and TensorFlow backends only; training on one."
            )
    return contextlib.nullcontext(), 1


def _multi_process_distribution(config: models_genesis_config, group: Any) -> tuple[Any, int]:
    """Data parallelism over every device of every process of a multi-process run."""
    if config.distribute == "off":
        raise PretrainingInputError(
            f"Expected distribute 'auto' or 'all' in a multi-process run ({group.count} "
            "processes). Received: distribute='off'"
        )
    # Only JAX forms multi-process groups (genesis_multihost): every device of every process,
    # the default platform's (GPUs, else the CPUs).
    devices = keras.distribution.list_devices()
    # The datasets already make only this process' share of each batch.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
    )
    print(
        f"Process {group.index} of {group.count}: data-parallel training over "
        f"{len(devices)} devices of {group.count} processes (keras.distribution)."
    )
    return contextlib.nullcontext(), len(devices)


def _torch_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch absent or without CUDA
        return 0


def tensorboard_available() -> bool:
    """Whether the TensorBoard callback can run: it writes through tf.summary on any backend.

    Returns:
        True when both tensorflow and tensorboard are installed.
    """
    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorboard"))


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def _resume_state(config: models_genesis_config, paths: RunPaths) -> RunState | None:
    """The checkpoint state to continue from; None for a fresh start."""
    if not config.resume:
        return None
    if not os.path.exists(paths.last):
        print(f"Notice: --resume given but no checkpoint {paths.last}; starting from epoch 1.")
        return None
    return RunState.from_dict(read_checkpoint_state(paths.last))


def _write_records(config: models_genesis_config, model: keras.Model, paths: RunPaths) -> None:
    """Record what runs: the resolved config beside the weights, and the model summary."""
    config.display()
    write_text_atomic(paths.config_json, config.to_json() + "\n")
    summary = io.StringIO()
    model.summary(print_fn=lambda text, *a, **k: summary.write(text + "\n"))
    write_text_atomic(paths.summary, summary.getvalue())


def _make_callbacks(
    config: models_genesis_config,
    paths: RunPaths,
    state: RunState | None,
    datasets: Sequence[GenesisPairDataset],
    probe: np.ndarray,
) -> list[keras.callbacks.Callback]:
    """The run's callbacks, in the order they must run (the checkpoint last)."""
    best_cb = AtomicBestCheckpoint(
        paths.best, best=None if state is None else state.best, verbose=config.verbose
    )
    early_cb = ResumableEarlyStopping(
        monitor="val_loss",
        patience=config.patience,
        verbose=config.verbose,
        restore=None if state is None else state.early_stopping,
    )
    lr_cb = ResumableReduceLROnPlateau(
        monitor="val_loss",
        factor=0.5,
        patience=10,
        min_delta=1e-4,
        min_lr=1e-6,
        verbose=config.verbose,
        restore=None if state is None else state.reduce_lr,
    )
    writer = is_writer()
    if state is not None and writer:
        truncate_csv(paths.csv, state.epoch + 1)
    callbacks = [EpochSetter(datasets), CollapseWarning(probe), best_cb, early_cb, lr_cb]
    if not writer:
        # Another process writes the files; this one only trains (and stops early with it).
        callbacks.remove(best_cb)
        return callbacks
    if tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=next_run_dir(paths.logs)))
    else:
        print(
            "Notice: tensorflow or tensorboard is not installed, so no TensorBoard logs "
            "are written."
        )
    callbacks.append(keras.callbacks.CSVLogger(paths.csv, append=state is not None))
    callbacks.append(
        LastEpochCheckpoint(
            paths.last, best_cb, early_cb, lr_cb, config.batch_size, config.exp_name
        )
    )
    return callbacks


def setup(config: models_genesis_config, overwrite: bool = False) -> TrainingSession | None:
    """Everything before `fit`: checks, model, weights or checkpoint, datasets, callbacks.

    Args:
        config: the run's configuration.
        overwrite: see `prepare`.

    Returns:
        The `TrainingSession`; None when a resumed run had already finished.
    """
    # Before anything runs on the backend: jax.distributed must start first.
    try:
        initialize(
            config.coordinator_address,
            config.num_processes,
            config.process_id,
            timeout=config.collective_timeout,
        )
    except ValueError as exc:  # its refusals of the flags or of the cluster's TF_CONFIG
        raise PretrainingInputError(str(exc)) from exc
    plan = prepare(config, overwrite=overwrite)
    paths = plan.paths
    state = _resume_state(config, paths)
    if state is not None and (state.finished or state.epoch + 1 >= config.nb_epoch):
        print(
            f"Training already finished at epoch {state.epoch + 1} "
            f"({paths.last}); nothing to resume."
        )
        return None

    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if config.mixed_precision else "float32"
    )
    scope, n_devices = select_distribution(config)
    if (keras.backend.backend() == "jax" or current_group().is_multi) and (
        config.batch_size % n_devices
    ):
        raise PretrainingInputError(
            f"Expected batch_size divisible by the {n_devices} devices of "
            f"data-parallel training. Received: batch_size={config.batch_size}"
        )
    with scope:
        model = build_model(config)
        if config.weights and state is None:
            load_weights_checked(model, config.weights)
        elif config.weights:
            print(f"Notice: resuming from {paths.last}; --weights {config.weights} is not loaded.")
        model.optimizer.build(model.trainable_variables)
        if state is not None:
            try:
                load_last_checkpoint(paths.last, model)
            except ValueError as exc:  # a checkpoint of another model: its message says which
                raise PretrainingInputError(str(exc)) from exc

    train_ds, valid_ds = make_datasets(config, plan)
    # The collapse check always predicts on validation batch 0 of epoch 0 (in full: every
    # process of a multi-process run predicts on the same batch).
    probe = valid_ds.whole_batch(0)[0]
    initial_epoch = 0 if state is None else state.epoch + 1
    if state is not None:
        # Batch i of epoch e depends only on (seed, e, i): resuming makes the same pairs as an
        # uninterrupted run (the EpochSetter callback sets each epoch as it begins).
        print(
            f"Resuming from {paths.last}: epoch {initial_epoch + 1} of {config.nb_epoch}, "
            f"best val_loss {state.best}, learning rate {state.learning_rate:g}"
        )
    if is_writer():
        _write_records(config, model, paths)
    print(
        f"Training cubes: {plan.n_train} ({plan.steps} steps of {config.batch_size}); "
        f"validation cubes: {plan.n_valid} ({plan.val_steps} steps)."
    )
    callbacks = _make_callbacks(config, paths, state, [train_ds, valid_ds], probe)
    return TrainingSession(
        model=model,
        train_ds=train_ds,
        valid_ds=valid_ds,
        callbacks=callbacks,
        initial_epoch=initial_epoch,
        plan=plan,
    )


def train(config: models_genesis_config, overwrite: bool = False) -> keras.callbacks.History | None:
    """Run (or resume) pre-training.

    Args:
        config: the run's configuration; `config.resume` continues from the last checkpoint.
        overwrite: see `prepare`.

    Returns:
        The Keras History of the run (None when a resumed run had already finished).

    Raises:
        PretrainingInputError: bad input, found before `fit` started.
    """
    session = setup(config, overwrite=overwrite)
    if session is None:
        return None
    try:
        return session.model.fit(
            session.train_ds,
            epochs=config.nb_epoch,
            initial_epoch=session.initial_epoch,
            validation_data=session.valid_ds,
            callbacks=session.callbacks,
            verbose=config.verbose,
            # Every batch already draws random cubes; Keras' shuffling of the batch order would
            # only make a resumed run differ from an uninterrupted one.
            shuffle=False,
        )
    except Exception as exc:
        if not current_group().is_multi or is_oom_error(exc):
            raise
        # Say which process stopped and that another one probably died.
        raise RuntimeError(describe_failure(exc)) from exc


# ------------------------------------------------------------------------------------------
# Out-of-memory retry
# ------------------------------------------------------------------------------------------

_OOM_TYPES = ("ResourceExhaustedError", "OutOfMemoryError")
_OOM_MESSAGES = ("RESOURCE_EXHAUSTED", "CUDA out of memory", "Out of memory while trying")


def is_oom_error(exc: BaseException) -> bool:
    """True for the backends' accelerator out-of-memory errors (also when wrapped).

    TensorFlow raises ResourceExhaustedError, JAX an XlaRuntimeError / JaxRuntimeError whose
    message starts with RESOURCE_EXHAUSTED, PyTorch torch.OutOfMemoryError.

    Args:
        exc: an exception; its causes and contexts are looked at too.

    Returns:
        Whether it is (or wraps) an out-of-memory error.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _OOM_TYPES:
            return True
        if not isinstance(exc, MemoryError) and any(m in str(exc) for m in _OOM_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def run_with_oom_retry(
    config: models_genesis_config, train_fn: Callable[..., Any] | None = None
) -> Any:
    """Train; on an accelerator out-of-memory error lower the batch size by 2 and start again
    while it stays above 1, as the original did.

    Args:
        config: the run's configuration (its batch_size is lowered in place on retries).
        train_fn: the training function (tests pass a fake); defaults to `train`.

    Returns:
        What `train_fn` returns.

    Raises:
        RuntimeError: out of memory with no smaller batch left to try.
    """
    train_fn = train_fn or train
    overwrite = False
    while True:
        try:
            return train_fn(config, overwrite=overwrite)
        except Exception as exc:
            if not is_oom_error(exc) or current_group().is_multi:
                # Processes of one run cannot agree on a smaller batch: stop them all.
                raise
            smaller = config.batch_size - 2
            if smaller <= 1:
                raise RuntimeError(
                    f"Out of accelerator memory at batch_size={config.batch_size}; no smaller "
                    "batch to try. Use a smaller --n_base_filters or input size."
                ) from exc
            print(
                f"\n> Out of accelerator memory at batch_size={config.batch_size} "
                f"({type(exc).__name__}); retrying with batch_size={smaller}."
            )
            config.batch_size = smaller
            # What this invocation already wrote is continued, not refused.
            if os.path.exists(RunPaths.of(config).last):
                config.resume = True
            else:
                overwrite = True
            keras.backend.clear_session()
            gc.collect()
