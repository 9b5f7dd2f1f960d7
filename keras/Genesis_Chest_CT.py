"""Models Genesis pre-training: restore cubes corrupted by the Genesis transforms (SPEC section 4).

Trains the 3D U-Net of `unet3d.py` to map corrupted cubes back to their originals, reading
(corrupted, original) batches from memory-mapped cube files through `GenesisPairDataset`.
Every field of `config.models_genesis_config` is a command-line flag; see `--help`.

Outputs, in `--model_path` (default `pretrained_weights/`):
  {exp_name}.h5           best weights so far (lowest val_loss): a Keras .h5 model file
  {exp_name}.last.npz     last finished epoch: weights, optimizer and callback state (for --resume)
  {exp_name}.csv          one row per epoch (loss, mae, mse, val_*, learning_rate)
  {exp_name}.json         the resolved configuration
  {exp_name}.txt          the model summary
  Logs/{exp_name}/run-N/  TensorBoard logs, a new run folder per start
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import typing
import warnings
from typing import Callable, List, Optional, Sequence

# Sibling modules (config, unet3d, genesis_dataset) are imported from this script's own folder,
# so the script works from any working directory.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402

from config import FIELD_CHOICES, FIELD_HELP, models_genesis_config  # noqa: E402

EXAMPLE = """\
example (a small run on the demo's cubes, under a minute on a CPU):
  bash datasets/demo.sh demo_output      # makes demo_output/generated_cubes (folds 0 and 1)
  python keras/Genesis_Chest_CT.py --data demo_output/generated_cubes --train_fold 0 \\
      --valid_fold 1 --nb_epoch 3 --batch_size 2 --n_base_filters 4 --steps_per_epoch 6 \\
      --validation_steps 2 --model_path my_weights

full pre-training as the original (LUNA16 folds 0-6 extracted with infinite_generator_3D.py):
  python keras/Genesis_Chest_CT.py --data generated_cubes
after a crash or kill, continue from the last finished epoch: the same command plus --resume.
"""

EXTRACTION_HINT = ("Extract them first, e.g.: python infinite_generator_3D.py --fold {fold} "
                   "--scale {scale} --input_rows {r} --input_cols {c} --input_deps {d} "
                   "--data LUNA16_ROOT --save {data}")


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def _field_kind(f: dataclasses.Field) -> tuple:
    """(base type, is_list, is_optional) of a config field from its annotation."""
    hints = typing.get_type_hints(models_genesis_config)
    tp = hints[f.name]
    optional = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if typing.get_origin(tp) in (list, List):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _optional(base: type) -> Callable[[str], object]:
    """An argparse type that maps 'none' / 'None' to None."""
    def convert(text: str):
        return None if text.lower() == "none" else base(text)
    convert.__name__ = base.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    """An argument parser with one `--field` flag per config field (generated, never listed).

    Returns:
        The parser; `parse_config` turns its result into a `models_genesis_config`.
    """
    parser = argparse.ArgumentParser(
        prog="Genesis_Chest_CT.py",
        description="Models Genesis self-supervised pre-training of a 3D U-Net on CT cubes.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = models_genesis_config()
    for f in dataclasses.fields(models_genesis_config):
        base, is_list, optional = _field_kind(f)
        flag = f"--{f.name}"
        default = getattr(defaults, f.name)
        text = FIELD_HELP.get(f.name, "")
        if base is bool:
            # Booleans are flags that are off by default.
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        elif is_list:
            parser.add_argument(flag, type=base, nargs="+", default=argparse.SUPPRESS, metavar="N",
                                help=f"{text}; space-separated (default: "
                                     f"{' '.join(map(str, default))})")
        else:
            shown = {"exp_name": "MODEL-SUFFIX", "logs_path": "MODEL_PATH/Logs"}.get(
                f.name, default)
            parser.add_argument(flag, type=_optional(base) if optional else base,
                                default=argparse.SUPPRESS,
                                choices=FIELD_CHOICES.get(f.name),
                                metavar=base.__name__.upper(), help=f"{text} (default: {shown})")
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> models_genesis_config:
    """Parse command-line arguments into a config (unset flags keep the config's defaults).

    Args:
        argv: the arguments, without the program name; None reads sys.argv.
    Returns:
        The resolved `models_genesis_config`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(args)  # only the flags given: defaults are suppressed
    try:
        return models_genesis_config(**given)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2 and the usage line


# ------------------------------------------------------------------------------------------
# Input checks (all run before any training)
# ------------------------------------------------------------------------------------------

def cube_file_names(config: models_genesis_config, fold: int) -> List[str]:
    """The cube file names tried for one fold, in order: this project's, then the original's."""
    size = f"{config.input_rows}x{config.input_cols}x{config.input_deps}"
    return [f"bat_{config.scale}_s_{size}_{fold}.npy", f"bat_{config.scale}_{size}_{fold}.npy"]


def find_cube_files(config: models_genesis_config, folds: Sequence[int], role: str) -> List[str]:
    """Locate and check the cube file of each fold.

    Args:
        config: the run's configuration (data folder, scale, cube size).
        folds: the fold numbers.
        role: "training" or "validation", for messages.
    Returns:
        One absolute path per fold.
    Raises:
        FileNotFoundError: a fold has no cube file (the message lists the names tried).
        ValueError: a file holds cubes of another shape or type than the config expects.
    """
    data = os.path.abspath(config.data)
    paths = []
    for fold in folds:
        names = cube_file_names(config, fold)
        found = [os.path.join(data, n) for n in names if os.path.isfile(os.path.join(data, n))]
        if not found:
            hint = EXTRACTION_HINT.format(fold=fold, scale=config.scale, r=config.input_rows,
                                          c=config.input_cols, d=config.input_deps,
                                          data=config.data)
            raise FileNotFoundError(
                f"No cube file for {role} fold {fold} in {data}. Expected one of: "
                f"{', '.join(names)}. {hint}")
        check_cube_file(found[0], config)
        paths.append(found[0])
    return paths


def check_cube_file(path: str, config: models_genesis_config) -> int:
    """Check one cube file's header (memory-mapped: no cube is read).

    Args:
        path: a .npy file of cubes (N, R, C, D) or (N, 1, R, C, D).
        config: gives the expected R, C, D.
    Returns:
        The number of cubes N.
    """
    try:
        cubes = np.load(path, mmap_mode="r")
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"Cannot read cube file {path}: {exc}") from exc
    expected = (config.input_rows, config.input_cols, config.input_deps)
    shape = tuple(cubes.shape)
    spatial = shape[1:] if len(shape) == 4 else shape[2:] if (
        len(shape) == 5 and shape[1] == 1) else None
    if spatial != expected:
        raise ValueError(
            f"Expected cubes of shape (N, {expected[0]}, {expected[1]}, {expected[2]}) in {path} "
            f"(from --input_rows/--input_cols/--input_deps). Received: shape={shape}")
    if cubes.dtype not in (np.float32, np.float64):
        raise ValueError(f"Expected float32 or float64 cubes in {path}. "
                         f"Received: dtype={cubes.dtype}")
    if shape[0] < 1:
        raise ValueError(f"Expected at least one cube in {path}. Received: shape={shape}")
    return int(shape[0])


def check_writable(folder: str) -> None:
    """Create `folder` if needed and check a file can be written in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(f"Cannot write to model_path {folder!r}: {exc}. "
                              "Expected a writable folder; pass another --model_path.") from exc


@dataclasses.dataclass
class RunPaths:
    """Where one run writes its outputs."""
    best: str
    last: str
    csv: str
    config_json: str
    summary: str
    logs: str

    @classmethod
    def of(cls, config: models_genesis_config) -> "RunPaths":
        base = os.path.join(os.path.abspath(config.model_path), config.exp_name)
        return cls(best=base + ".h5", last=base + ".last.npz", csv=base + ".csv",
                   config_json=base + ".json", summary=base + ".txt",
                   logs=os.path.join(os.path.abspath(config.logs_path), config.exp_name))


def next_run_dir(logs: str) -> str:
    """`logs/run-N` with N one above the highest existing run (old runs are never wiped)."""
    numbers = [int(m.group(1)) for name in (os.listdir(logs) if os.path.isdir(logs) else [])
               if (m := re.fullmatch(r"run-(\d+)", name))]
    return os.path.join(logs, f"run-{max(numbers, default=0) + 1}")


# ------------------------------------------------------------------------------------------
# Atomic writes, checkpoint and CSV handling
# ------------------------------------------------------------------------------------------

def _temp_path(path: str, suffix: str = "") -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}{suffix}")


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file through a temporary file in the same folder and os.replace."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model_atomic(model, path: str) -> None:
    """`model.save(path)` (a Keras .h5 model file) through a temporary file and os.replace,
    so an interrupted save never leaves a truncated file under the final name."""
    tmp = _temp_path(path, suffix=".h5")  # Keras picks the legacy HDF5 writer by the suffix
    try:
        # Keras 3 warns (through absl logging) at every save that .h5 is a legacy format;
        # the original's users expect this file, so the warning is silenced here.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            model.save(tmp)
        finally:
            absl_logger.setLevel(level)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_last_checkpoint(path: str, model, state: dict) -> None:
    """Write weights, optimizer variables and `state` (JSON-able) to one .npz, atomically.

    Args:
        path: the checkpoint file (`{exp_name}.last.npz`).
        model: a compiled model whose optimizer is built.
        state: epoch and callback state.
    """
    arrays = {"state": np.array(json.dumps(state))}
    for i, w in enumerate(model.get_weights()):
        arrays[f"weight_{i:04d}"] = w
    for i, v in enumerate(model.optimizer.variables):
        arrays[f"optimizer_{i:04d}"] = np.asarray(v.numpy())
    tmp = _temp_path(path, suffix=".npz")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint_state(path: str) -> dict:
    """The `state` dict of a last-epoch checkpoint."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["state"]))


def load_last_checkpoint(path: str, model) -> dict:
    """Restore weights and optimizer variables from `save_last_checkpoint`'s file.

    Returns:
        The checkpoint's state dict.
    Raises:
        ValueError: the checkpoint does not fit this model (naming the file).
    """
    with np.load(path, allow_pickle=False) as z:
        state = json.loads(str(z["state"]))
        weights = [z[k] for k in sorted(k for k in z.files if k.startswith("weight_"))]
        opt_values = [z[k] for k in sorted(k for k in z.files if k.startswith("optimizer_"))]
    expected = [tuple(w.shape) for w in model.weights]
    received = [tuple(w.shape) for w in weights]
    if expected != received:
        raise ValueError(
            f"The checkpoint {path} does not fit this model: expected {len(expected)} weights "
            f"of shapes {expected[:3]}..., received {len(received)} of shapes {received[:3]}... "
            "Resume with the same --input_rows/--input_cols/--input_deps/--n_base_filters.")
    model.set_weights(weights)
    opt = model.optimizer
    if not opt.built:
        opt.build(model.trainable_variables)
    if [tuple(v.shape) for v in opt.variables] != [tuple(v.shape) for v in opt_values]:
        raise ValueError(f"The optimizer state in {path} does not fit this model's optimizer.")
    for var, value in zip(opt.variables, opt_values):
        var.assign(value.astype(var.dtype) if hasattr(value, "astype") else value)
    return state


def truncate_csv(path: str, first_dropped_epoch: int) -> None:
    """Keep the header and the rows of epochs < `first_dropped_epoch` (rewritten atomically).

    A crash between the CSV row and the checkpoint of an epoch leaves a row that the resumed
    run will write again; this drops it so every epoch appears exactly once.
    """
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]]
    for line in lines[1:]:
        if not line.endswith(("\n", "\r")):
            continue  # a row cut off by the crash
        first = line.split(",", 1)[0].strip()
        if first.isdigit() and int(first) < first_dropped_epoch:
            kept.append(line)
    atomic_write_text(path, "".join(kept))


# ------------------------------------------------------------------------------------------
# Out-of-memory detection
# ------------------------------------------------------------------------------------------

_OOM_TYPES = ("ResourceExhaustedError", "OutOfMemoryError")
_OOM_MESSAGES = ("RESOURCE_EXHAUSTED", "CUDA out of memory", "Out of memory while trying")


def is_oom_error(exc: BaseException) -> bool:
    """True for the backends' accelerator out-of-memory errors (also when wrapped).

    TensorFlow raises ResourceExhaustedError, JAX an XlaRuntimeError / JaxRuntimeError whose
    message starts with RESOURCE_EXHAUSTED, PyTorch torch.OutOfMemoryError.
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


# ------------------------------------------------------------------------------------------
# Keras pieces (imported lazily so --help and config parsing stay fast)
# ------------------------------------------------------------------------------------------

def _keras():
    import keras
    return keras


def make_callbacks_module():
    """Define the Keras callback classes (needs keras imported)."""
    keras = _keras()

    class AtomicBestCheckpoint(keras.callbacks.Callback):
        """ModelCheckpoint(monitor, save_best_only=True) whose .h5 is written atomically."""

        def __init__(self, filepath: str, monitor: str = "val_loss", verbose: int = 1,
                     best: Optional[float] = None):
            super().__init__()
            self.filepath, self.monitor, self.verbose, self.best = filepath, monitor, verbose, best

        def on_epoch_end(self, epoch, logs=None):
            current = (logs or {}).get(self.monitor)
            if current is None or not math.isfinite(float(current)):
                return
            current = float(current)
            if self.best is None or current < self.best:
                if self.verbose:
                    before = "inf" if self.best is None else f"{self.best:.5f}"
                    print(f"\nEpoch {epoch + 1}: {self.monitor} improved from {before} to "
                          f"{current:.5f}, saving model to {self.filepath}")
                self.best = current
                save_model_atomic(self.model, self.filepath)
            elif self.verbose:
                print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {self.best:.5f}")

    class _RestorableCounters:
        """Mixin for a Keras callback whose `best` and integer counters (`_counters`) are put
        back after `on_train_begin` resets them, and read by `get_state` for the checkpoint."""

        _counters: tuple = ()

        def __init__(self, *args, restore: Optional[dict] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._restore = restore

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if self._restore:
                self.best = self._restore["best"]
                for name in self._counters:
                    setattr(self, name, int(self._restore[name]))

        def get_state(self) -> dict:
            state = {"best": _float_or_none(self.best)}
            state.update({name: int(getattr(self, name)) for name in self._counters})
            return state

    class ResumableEarlyStopping(_RestorableCounters, keras.callbacks.EarlyStopping):
        """EarlyStopping whose counters survive --resume."""

        _counters = ("wait", "best_epoch")

    class ResumableReduceLROnPlateau(_RestorableCounters, keras.callbacks.ReduceLROnPlateau):
        """ReduceLROnPlateau whose counters survive --resume."""

        _counters = ("wait", "cooldown_counter")

    class LastEpochCheckpoint(keras.callbacks.Callback):
        """After every epoch, save what --resume needs. Must come last in the callback list,
        after the callbacks whose state it records and after the CSV row."""

        def __init__(self, path: str, best_cb, early_cb, lr_cb, extra: dict):
            super().__init__()
            self.path, self.best_cb, self.early_cb, self.lr_cb = path, best_cb, early_cb, lr_cb
            self.extra = extra

        def on_epoch_end(self, epoch, logs=None):
            lr = float(np.asarray(self.model.optimizer.learning_rate))
            state = dict(self.extra, epoch=int(epoch), finished=bool(self.model.stop_training),
                         best=_float_or_none(self.best_cb.best), learning_rate=lr,
                         early_stopping=self.early_cb.get_state(),
                         reduce_lr=self.lr_cb.get_state())
            save_last_checkpoint(self.path, self.model, state)

    class EpochSetter(keras.callbacks.Callback):
        """Tell the datasets which epoch begins (before Keras asks for its first batch)."""

        def __init__(self, datasets):
            super().__init__()
            self.datasets = datasets

        def on_epoch_begin(self, epoch, logs=None):
            for ds in self.datasets:
                ds.set_epoch(epoch)

    class CollapseWarning(keras.callbacks.Callback):
        """Warn when the prediction on a fixed validation batch is (nearly) constant, the
        failure users of the original report with lr 1.0."""

        def __init__(self, x_batch, threshold: float = 1e-4):
            super().__init__()
            self.x_batch, self.threshold = x_batch, threshold
            self.collapsed_epochs: List[int] = []

        def on_epoch_end(self, epoch, logs=None):
            pred = np.asarray(self.model.predict_on_batch(self.x_batch), dtype=np.float64)
            std = float(pred.std())
            if not math.isfinite(std) or std < self.threshold:
                self.collapsed_epochs.append(epoch)
                warnings.warn(
                    f"Epoch {epoch + 1}: the model's output is constant over a validation batch "
                    f"(std={std:.3g} < {self.threshold:g}): training has collapsed. This "
                    "happens with the original's lr 1.0; restart with a lower --lr (e.g. 0.1).",
                    RuntimeWarning, stacklevel=2)

    return dict(AtomicBestCheckpoint=AtomicBestCheckpoint,
                ResumableEarlyStopping=ResumableEarlyStopping,
                ResumableReduceLROnPlateau=ResumableReduceLROnPlateau,
                LastEpochCheckpoint=LastEpochCheckpoint, CollapseWarning=CollapseWarning,
                EpochSetter=EpochSetter)


def _float_or_none(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def select_distribution(config: models_genesis_config):
    """Choose data-parallel training over several accelerators.

    With `distribute="auto"` (default), more than one visible GPU/TPU selects
    `keras.distribution.DataParallel` on JAX or `tf.distribute.MirroredStrategy` on TensorFlow
    (PyTorch: one device, with a notice). `"all"` uses every visible device even when they are
    CPUs (for tests with virtual devices); `"off"` uses one device.

    Returns:
        (a context manager to build and compile the model in, the number of devices).
    """
    keras = _keras()
    backend = keras.backend.backend()
    if config.distribute == "off":
        return contextlib.nullcontext(), 1
    if backend == "jax":
        devices = keras.distribution.list_devices()
        if config.distribute == "auto":
            devices = [d for d in devices if not d.lower().startswith("cpu")]
        if len(devices) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
            print(f"Data-parallel training over {len(devices)} devices "
                  f"(keras.distribution.DataParallel): {', '.join(devices)}")
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
            print(f"Data-parallel training over {len(names)} devices "
                  f"(tf.distribute.MirroredStrategy): {', '.join(names)}")
            return strategy.scope(), len(names)
    else:
        count = _torch_gpu_count()
        if count > 1:
            print(f"Notice: {count} GPUs visible, but multi-GPU training is supported on the JAX "
                  "and TensorFlow backends only; training on one.")
    return contextlib.nullcontext(), 1


def _torch_gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # torch absent or without CUDA
        return 0


def _tensorboard_available() -> bool:
    """The TensorBoard callback writes through tf.summary, on any backend: it needs both."""
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorboard"))


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------

def prepare(config: models_genesis_config, overwrite: bool = False) -> dict:
    """All input checks that need no model: files, shapes, step counts, output folder.

    Args:
        config: the run's configuration.
        overwrite: allow replacing an existing run without `config.resume` (used only when
            retrying after an out-of-memory error within the same invocation).
    Returns:
        A dict with the cube file lists, cube counts, step counts and output paths.
    """
    paths = RunPaths.of(config)
    check_writable(os.path.dirname(paths.best))
    existing = [p for p in (paths.last, paths.best) if os.path.exists(p)]
    if existing and not config.resume and not overwrite:
        raise FileExistsError(
            f"A run already exists ({', '.join(existing)}). Pass --resume to continue it, or "
            "choose another --model_path or --exp_name.")
    train_files = find_cube_files(config, config.train_fold, "training")
    valid_files = find_cube_files(config, config.valid_fold, "validation")
    n_train = sum(check_cube_file(p, config) for p in train_files)
    n_valid = sum(check_cube_file(p, config) for p in valid_files)
    for role, n in (("training", n_train), ("validation", n_valid)):
        if n < config.batch_size:
            raise ValueError(f"Expected at least batch_size={config.batch_size} {role} cubes. "
                             f"Received: {n} cubes in the {role} folds.")
    steps = config.steps_per_epoch or n_train // config.batch_size
    val_steps = config.validation_steps or n_valid // config.batch_size
    levels = 2 ** 3  # unet_model_3d's default depth 4 pools three times by 2
    for name in ("input_rows", "input_cols", "input_deps"):
        if getattr(config, name) % levels:
            raise ValueError(f"Expected {name} divisible by {levels} (three 2x poolings). "
                             f"Received: {name}={getattr(config, name)}")
    return dict(paths=paths, train_files=train_files, valid_files=valid_files,
                n_train=n_train, n_valid=n_valid, steps=steps, val_steps=val_steps)


def _epoch_set_dataset_class():
    """`EpochSetPairDataset`, made on first use (it needs keras) and kept as a module global,
    so that pickle finds it by name when worker processes are spawned."""
    cls = globals().get("_EpochSetPairDataset")
    if cls is not None:
        return cls
    from genesis_dataset import GenesisPairDataset

    class EpochSetPairDataset(GenesisPairDataset):
        """A GenesisPairDataset that ignores Keras' `on_epoch_end` calls.

        Keras calls `on_epoch_end` once when fit starts and twice per evaluation, so counting
        those calls gives epoch numbers that differ between a fresh and a resumed run. The
        trainer's `EpochSetter` callback calls `set_epoch(epoch)` instead, before any batch of
        the epoch is made: batch i of epoch e is then the same in both.
        """

        def on_epoch_end(self) -> None:
            pass

    EpochSetPairDataset.__module__ = __name__
    EpochSetPairDataset.__qualname__ = "EpochSetPairDataset"
    globals()["_EpochSetPairDataset"] = EpochSetPairDataset
    return EpochSetPairDataset


def __getattr__(name: str):
    # Lets pickle (spawned data workers) resolve the lazily made dataset class by name.
    if name == "EpochSetPairDataset":
        return _epoch_set_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_datasets(config: models_genesis_config, plan: dict):
    """Training and validation `GenesisPairDataset`s whose epoch the trainer sets itself."""
    dataset_class = _epoch_set_dataset_class()
    common = dict(data_format=config.data_format, workers=config.workers,
                  use_multiprocessing=config.use_multiprocessing,
                  max_queue_size=config.max_queue_size)
    train_ds = dataset_class(plan["train_files"], config.batch_size, config, seed=config.seed,
                             status="train", steps=plan["steps"], **common)
    # Another seed keeps validation pairs independent of the training pairs. Validation pairs
    # change every epoch, as the original's endless validation generator did.
    valid_ds = dataset_class(plan["valid_files"], config.batch_size, config,
                             seed=config.seed + 1, status="test", steps=plan["val_steps"],
                             **common)
    return train_ds, valid_ds


def build_model(config: models_genesis_config):
    """The pre-training U-Net of SPEC section 4, compiled (SGD, momentum 0.9, MSE; MAE, MSE)."""
    keras = _keras()
    import unet3d
    model = unet3d.unet_model_3d(config.input_shape, batch_normalization=True,
                                 n_base_filters=config.n_base_filters,
                                 data_format=config.data_format)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=config.lr, momentum=0.9),
                  loss="mse", metrics=["mae", "mse"])
    return model


def load_weights_checked(model, path: str) -> None:
    """`model.load_weights(path)`, raising a clear ValueError when the file does not fit."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected a weight file at --weights {path!r}; none found.")
    try:
        model.load_weights(path)
    except Exception as exc:
        raise ValueError(
            f"The weight file {path} does not fit this model (input "
            f"{model.input_shape[1:]}, {model.count_params()} parameters): {exc}. Expected "
            "weights of unet_model_3d with the same --n_base_filters (the published "
            "Genesis_Chest_CT.h5 needs the default 32).") from exc


@contextlib.contextmanager
def _setup_phase():
    """Mark exceptions raised before training starts, so `main` reports them as bad input
    (one clear line) while errors during training keep their traceback."""
    try:
        yield
    except Exception as exc:
        exc.before_training = True
        raise


def train(config: models_genesis_config, overwrite: bool = False):
    """Run (or resume) pre-training as SPEC section 4.

    Args:
        config: the run's configuration; `config.resume` continues from the last checkpoint.
        overwrite: see `prepare`.
    Returns:
        The Keras History of the run (None when a resumed run had already finished).
    """
    with _setup_phase():
        session = setup(config, overwrite=overwrite)
    if session is None:
        return None
    return session["model"].fit(
        session["train_ds"], epochs=config.nb_epoch, initial_epoch=session["initial_epoch"],
        validation_data=session["valid_ds"], callbacks=session["callbacks"],
        verbose=config.verbose,
        # Every batch already draws random cubes; Keras' shuffling of the batch order would
        # only make a resumed run differ from an uninterrupted one.
        shuffle=False)


def setup(config: models_genesis_config, overwrite: bool = False) -> Optional[dict]:
    """Everything before `fit`: checks, model, weights or checkpoint, datasets, callbacks.

    Returns:
        A dict with model, train_ds, valid_ds, callbacks and initial_epoch; None when a
        resumed run had already finished.
    """
    plan = prepare(config, overwrite=overwrite)
    paths: RunPaths = plan["paths"]
    state = None
    if config.resume:
        if os.path.exists(paths.last):
            state = read_checkpoint_state(paths.last)
            if state.get("finished") or state["epoch"] + 1 >= config.nb_epoch:
                print(f"Training already finished at epoch {state['epoch'] + 1} "
                      f"({paths.last}); nothing to resume.")
                return None
        else:
            print(f"Notice: --resume given but no checkpoint {paths.last}; starting from epoch 1.")

    keras = _keras()
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if config.mixed_precision
                                            else "float32")
    scope, n_devices = select_distribution(config)
    if keras.backend.backend() == "jax" and config.batch_size % n_devices:
        raise ValueError(f"Expected batch_size divisible by the {n_devices} devices of "
                         f"data-parallel training. Received: batch_size={config.batch_size}")
    with scope:
        model = build_model(config)
        if config.weights and state is None:
            load_weights_checked(model, config.weights)
        elif config.weights:
            print(f"Notice: resuming from {paths.last}; --weights {config.weights} is not loaded.")
        model.optimizer.build(model.trainable_variables)
        if state is not None:
            load_last_checkpoint(paths.last, model)

    train_ds, valid_ds = _make_datasets(config, plan)
    # The collapse check always predicts on validation batch 0 of epoch 0.
    probe = valid_ds[0][0]
    initial_epoch = 0 if state is None else state["epoch"] + 1
    if initial_epoch:
        # Batch i of epoch e depends only on (seed, e, i): resuming makes the same pairs as an
        # uninterrupted run (the EpochSetter callback sets each epoch as it begins).
        print(f"Resuming from {paths.last}: epoch {initial_epoch + 1} of {config.nb_epoch}, "
              f"best val_loss {state['best']}, learning rate {state['learning_rate']:g}")

    # Record what ran: the resolved config beside the weights, and the model summary.
    config.display()
    atomic_write_text(paths.config_json, config.to_json() + "\n")
    summary = io.StringIO()
    model.summary(print_fn=lambda text, *a, **k: summary.write(text + "\n"))
    atomic_write_text(paths.summary, summary.getvalue())
    print(f"Training cubes: {plan['n_train']} ({plan['steps']} steps of {config.batch_size}); "
          f"validation cubes: {plan['n_valid']} ({plan['val_steps']} steps).")

    cb = make_callbacks_module()
    best_cb = cb["AtomicBestCheckpoint"](paths.best, best=None if state is None else state["best"],
                                         verbose=config.verbose)
    early_cb = cb["ResumableEarlyStopping"](
        monitor="val_loss", patience=config.patience, verbose=config.verbose,
        restore=None if state is None else state["early_stopping"])
    lr_cb = cb["ResumableReduceLROnPlateau"](
        monitor="val_loss", factor=0.5, patience=10, min_delta=1e-4, min_lr=1e-6,
        verbose=config.verbose, restore=None if state is None else state["reduce_lr"])
    if state is None:
        append = False
    else:
        truncate_csv(paths.csv, initial_epoch)
        append = True
    callbacks = [cb["EpochSetter"]([train_ds, valid_ds]), cb["CollapseWarning"](probe),
                 best_cb, early_cb, lr_cb]
    if _tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=next_run_dir(paths.logs)))
    else:
        print("Notice: tensorflow or tensorboard is not installed, so no TensorBoard logs "
              "are written.")
    callbacks.append(keras.callbacks.CSVLogger(paths.csv, append=append))
    extra = {"batch_size": config.batch_size, "exp_name": config.exp_name}
    callbacks.append(cb["LastEpochCheckpoint"](paths.last, best_cb, early_cb, lr_cb, extra))

    return dict(model=model, train_ds=train_ds, valid_ds=valid_ds, callbacks=callbacks,
                initial_epoch=initial_epoch, plan=plan)


def run_with_oom_retry(config: models_genesis_config,
                       train_fn: Optional[Callable] = None):
    """Train; on an accelerator out-of-memory error lower the batch size by 2 and start again
    while it stays above 1, as the original did.

    Args:
        config: the run's configuration (its batch_size is lowered in place on retries).
        train_fn: the training function (tests pass a fake); defaults to `train`.
    Returns:
        What `train_fn` returns.
    """
    train_fn = train_fn or train
    overwrite = False
    while True:
        try:
            return train_fn(config, overwrite=overwrite)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            smaller = config.batch_size - 2
            if smaller <= 1:
                raise RuntimeError(
                    f"Out of accelerator memory at batch_size={config.batch_size}; no smaller "
                    "batch to try. Use a smaller --n_base_filters or input size.") from exc
            print(f"\n> Out of accelerator memory at batch_size={config.batch_size} "
                  f"({type(exc).__name__}); retrying with batch_size={smaller}.")
            config.batch_size = smaller
            # What this invocation already wrote is continued, not refused.
            paths = RunPaths.of(config)
            if os.path.exists(paths.last):
                config.resume = True
            else:
                overwrite = True
            _free_memory()


def _free_memory() -> None:
    keras = _keras()
    keras.backend.clear_session()
    gc.collect()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point. Returns the process exit status."""
    config = parse_config(argv)
    try:
        run_with_oom_retry(config)
    except Exception as exc:
        if not getattr(exc, "before_training", False):
            raise
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
