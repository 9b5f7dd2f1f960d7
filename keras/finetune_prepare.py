"""Fine-tuning settings and every check before a model exists (docs/finetuning.md).

`FinetuneSettings` holds ``finetune.py train``'s flags (the command line converts its parsed
arguments once). `prepare` runs the steps, each a function of its own:

* `check_settings`: value ranges and names;
* `run_paths`, `check_run_dir`: the run folder (RUN_DIR), refused when it holds a run;
* `resolve_width`: the weight file and the U-Net width it was trained with;
* `discover_data`: the data set (folder of volumes, the original's arrays, or candidates),
  checked, preprocessed into the cache, split, and its datasets;
* `resolved_config`: what finetune_config.json records (`finetune.py predict` reads it);
* the resumed run's state, refused when its settings differ.

Bad input is raised as `finetune_cases.FinetuneInputError` where it is checked.

Imports: stdlib, NumPy, h5py, finetune_cases, finetune_patches, finetune_arrays,
genesis_checkpoint; download_weights only for
``hf:`` weights.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from typing import Any

import h5py
import numpy as np

from finetune_arrays import ArrayBatches, discover_arrays, discover_candidates
from finetune_cases import (
    FinetuneInputError,
    default_intensity,
    detect_layout,
    discover_segmentation,
    prepare_cases,
    split_cases,
)
from finetune_patches import FOREGROUND_FRACTION, SegmentationPatches, check_patch
from genesis_checkpoint import RunState, read_checkpoint_state
from volume_io import background_value

__all__ = [
    "DEFAULT_WEIGHTS",
    "FILES",
    "OPTIMIZERS",
    "SEGMENTATION_LOSSES",
    "DataPlan",
    "FinetuneSettings",
    "RunPlan",
    "check_run_dir",
    "check_settings",
    "discover_data",
    "prepare",
    "resolve_weights",
    "resolve_width",
    "resolved_config",
    "run_paths",
    "weight_file_width",
]

DEFAULT_WEIGHTS = os.path.join("pretrained_weights", "Genesis_Chest_CT.h5")
# What a run writes in its folder.
FILES = {
    "config": "finetune_config.json",
    "best": "best_model.keras",
    "last": "last_checkpoint.npz",
    "csv": "training_log.csv",
    "curves": "curves.png",
    "fingerprint": "fingerprint.json",
    "plan": "plan.json",
    "cache": "preprocessed",
}
OPTIMIZERS = ("adam", "sgd", "sgd_nesterov", "rmsprop", "adamw")
# Settings a resumed run must share with the run it continues.
_RESUME_KEYS = (
    "task",
    "patch",
    "data_format",
    "n_base_filters",
    "n_classes",
    "n_channels",
    "batch_size",
    "freeze_encoder",
)
# nnU-Net's batches per epoch for volumes (training, validation).
VOLUME_STEPS = (250, 50)
SCHEDULES = ("plateau", "poly")
AUGMENTATIONS = ("default", "none")
# What each recipe sets for the flags left out. "original" is the original code's downstream
# recipe exactly; "default" is this project's (docs/finetuning.md, "Recipes"): a plan made
# from the data set's fingerprint (spacing, patch, batch size, intensities), augmentation,
# cross-entropy with the foreground Dice, a polynomial learning-rate decay, batch-norm
# statistics that follow short runs, and the faster channels-last layout.
RECIPES: dict[str, dict[str, Any]] = {
    "original": dict(
        plan=False,
        patch=None,  # 64 64 32 for volumes and candidates; pre-cut arrays have their own size
        batch_size=8,
        epochs=10000,
        lr=1e-3,
        optimizer="adam",
        loss="dice_coef_loss",
        schedule="plateau",
        bn_momentum=None,
        augment="none",
        foreground_fraction=FOREGROUND_FRACTION,
        data_format="channels_first",
        tta="off",
        postprocess="none",
    ),
    "default": dict(
        plan=True,
        patch=None,
        batch_size=None,
        epochs=1000,
        lr=1e-3,
        optimizer="adam",
        loss="bce_foreground_dice_loss",
        schedule="poly",
        bn_momentum=0.9,
        augment="default",
        foreground_fraction=FOREGROUND_FRACTION,
        data_format="channels_last",
        tta="on",
        # Keeping only the largest piece did not raise the cross-validated Dice (+0.006, an
        # interval that holds 0; docs/finetuning.md): nothing is removed.
        postprocess="none",
    ),
}
# Where a polynomial decay ends: lr * (1 - epoch / epochs) ** POLY_EXPONENT (nnU-Net's 0.9).
POLY_EXPONENT = 0.9
# Segmentation losses of unet3d by name; the first is the original's and the default.
SEGMENTATION_LOSSES = ("dice_coef_loss", "bce_dice_loss", "bce_foreground_dice_loss")


# ------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------


def resolve_weights(spec: str | None) -> str | None:
    """The weight file a ``--weights`` value names; None for ``none`` (training from scratch).

    Args:
        spec: a path, ``none``, ``hf:...`` (fetched by `download_weights.resolve_weights`), or
            None for the default ``pretrained_weights/Genesis_Chest_CT.h5``.

    Returns:
        A local file path, or None.

    Raises:
        FinetuneInputError: the file does not exist (for the default: how to get it), or an
            ``hf:`` name that cannot be fetched.
    """
    if spec is not None and spec.strip().lower() == "none":
        return None
    if spec is not None and spec.startswith("hf:"):
        from download_weights import resolve_weights as fetch  # only when asked: network code

        try:
            return fetch(spec)
        except (ValueError, ImportError, FileNotFoundError) as exc:  # its documented refusals
            raise FinetuneInputError(str(exc)) from exc
    path = DEFAULT_WEIGHTS if spec is None else spec
    if not os.path.isfile(path):
        if spec is None:
            raise FinetuneInputError(
                f"Expected the pre-trained weights at {DEFAULT_WEIGHTS} (the default --weights). "
                "Received: no such file. Run `python keras/download_weights.py` to fetch "
                "Genesis_Chest_CT.h5, pass --weights FILE, or --weights none to train from scratch."
            )
        raise FinetuneInputError(f"Expected a weight file at --weights {path!r}. Received: none")
    return path


def _h5_kernels(source: Any) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    with h5py.File(source, "r") as f:
        f.visititems(
            lambda name, obj: (
                shapes.append(tuple(obj.shape))
                if isinstance(obj, h5py.Dataset) and obj.ndim == 5
                else None
            )
        )
    return shapes


def weight_file_width(path: str) -> tuple[int, int]:
    """(input channels, n_base_filters) of a U-Net weight file, read with h5py.

    The first convolution's kernel is (3, 3, 3, channels, n_base_filters) and has the fewest
    output channels of all 3x3x3 kernels, in any of the file formats (Keras 2 ``.h5``,
    ``.weights.h5``, ``.keras``).

    Args:
        path: the file.

    Returns:
        (channels, n_base_filters).

    Raises:
        FinetuneInputError: not an HDF5/Keras file, or no 3x3x3 kernel in it.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                shapes = _h5_kernels(io.BytesIO(archive.read("model.weights.h5")))
        else:
            shapes = _h5_kernels(path)
    except (OSError, KeyError) as exc:
        raise FinetuneInputError(
            f"Expected a Keras weight file (.h5, .weights.h5 or .keras) at --weights {path}. "
            f"Received: a file h5py cannot read ({exc})"
        ) from None
    kernels = [s for s in shapes if s[:3] == (3, 3, 3)]
    if not kernels:
        raise FinetuneInputError(
            f"Expected 3D U-Net weights (3x3x3 convolution kernels) in --weights {path}. "
            f"Received: {len(shapes)} 5-D arrays, none 3x3x3"
        )
    first = min(kernels, key=lambda s: s[4])
    return int(first[3]), int(first[4])


# ------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneSettings:
    """The settings of a fine-tuning run: one field per ``finetune.py train`` flag.

    None means "not given": `prepare` resolves it from the data or the weights (the flag's help
    says how). The defaults are the command line's.

    Attributes:
        data: the data set folder (volumes, the original's arrays, or a candidates CSV beside
            its volumes).
        output: the run folder.
        task: "segmentation" or "classification"; None: from the data.
        patch: (R, C, D), each divisible by 8; None: 64 64 32 (arrays: their own size).
        intensity: one mode for all channels or one per channel; None: from the data.
        spacing: resample volumes to this spacing (mm) first; None: off.
        fold, folds: the validation fold of ``folds``; fold None: an 80/20 split.
        candidates: the candidates CSV; None: the one in ``data``.
        cache: preprocessed volumes; None: ``{output}/preprocessed``.
        weights: a weight file, "none" (from scratch), "hf:FILE"; None: the default file.
        n_base_filters: the U-Net's width; None: the weights', or 32 from scratch.
        freeze_encoder: train only the decoder and the head.
        data_format: "channels_first" or "channels_last".
        mixed_precision: mixed bfloat16.
        batch_size, epochs: as in `fit`.
        steps_per_epoch, validation_steps: None: 250 and 50 for volumes, one pass for arrays.
        lr, optimizer, loss: the optimizer (`OPTIMIZERS`) at ``lr``; the segmentation loss
            (`SEGMENTATION_LOSSES`).
        bn_momentum: batch normalization momentum; None: the recipe's (original: Keras' 0.99).
        recipe: "default" or "original": what the flags left out are (`RECIPES`).
        schedule: "plateau" (halve the rate when val_loss stalls, the original's) or "poly"
            (``lr * (1 - epoch / epochs) ** 0.9``); None: the recipe's.
        augment: "default" (`finetune_augment.AugmentSettings()`) or "none"; None: the
            recipe's.
        foreground_fraction: the share of training patches centred on a foreground voxel;
            None: the recipe's (a third).
        patience: early stopping's.
        seed: the split, the patches and the new weights.
        workers: threads making batches.
        resume, overwrite: continue the run in ``output``, or start it again.
        verbose: `fit`'s verbosity.
    """

    data: str
    output: str
    task: str | None = None
    patch: tuple[int, int, int] | None = None
    intensity: tuple[str, ...] | None = None
    spacing: tuple[float, float, float] | None = None
    fold: int | None = None
    folds: int = 5
    candidates: str | None = None
    cache: str | None = None
    weights: str | None = None
    n_base_filters: int | None = None
    freeze_encoder: bool = False
    data_format: str | None = None
    mixed_precision: bool = False
    batch_size: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    loss: str | None = None
    bn_momentum: float | None = None
    recipe: str = "default"
    schedule: str | None = None
    augment: str | None = None
    foreground_fraction: float | None = None
    patience: int = 50
    seed: int = 0
    workers: int = 1
    resume: bool = False
    overwrite: bool = False
    verbose: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-able data (tuples as lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def display(self) -> None:
        """Print the settings, one ``name: value`` line per field."""
        print("Fine-tuning settings:")
        for name, value in self.to_dict().items():
            print(f"  {name:20s}{value}")


def resolve_recipe(settings: FinetuneSettings) -> FinetuneSettings:
    """The settings with every flag left out (None) taken from the recipe (`RECIPES`).

    The patch and the batch size stay None where the recipe plans them from the data.

    Args:
        settings: the run's settings as given.

    Returns:
        A new `FinetuneSettings`.

    Raises:
        FinetuneInputError: an unknown recipe.
    """
    if settings.recipe not in RECIPES:
        raise FinetuneInputError(
            f"Expected --recipe in {tuple(RECIPES)}. Received: {settings.recipe!r}"
        )
    recipe = RECIPES[settings.recipe]
    changes = {
        name: value
        for name, value in recipe.items()
        if name not in ("plan", "tta", "postprocess")
        and getattr(settings, name) is None
        and value is not None
    }
    return dataclasses.replace(settings, **changes)


def check_settings(settings: FinetuneSettings) -> None:
    """Check the value ranges and names that need no data.

    Args:
        settings: the run's settings.

    Raises:
        FinetuneInputError: naming the flag and what was expected.
    """
    if settings.recipe not in RECIPES:
        raise FinetuneInputError(
            f"Expected --recipe in {tuple(RECIPES)}. Received: {settings.recipe!r}"
        )
    if settings.schedule not in SCHEDULES:
        raise FinetuneInputError(
            f"Expected --schedule in {SCHEDULES}. Received: {settings.schedule!r}"
        )
    if settings.augment not in AUGMENTATIONS:
        raise FinetuneInputError(
            f"Expected --augment in {AUGMENTATIONS}. Received: {settings.augment!r}"
        )
    for name, low in (("batch_size", 1), ("epochs", 1), ("patience", 0), ("workers", 1)):
        value = getattr(settings, name)
        if value is not None and value < low:
            raise FinetuneInputError(f"Expected --{name} of at least {low}. Received: {value}")
    if not settings.lr > 0:
        raise FinetuneInputError(f"Expected --lr > 0. Received: {settings.lr}")
    if settings.optimizer.lower() not in OPTIMIZERS:
        raise FinetuneInputError(
            f"Expected --optimizer in {OPTIMIZERS}. Received: {settings.optimizer!r}"
        )
    if settings.loss not in SEGMENTATION_LOSSES:
        raise FinetuneInputError(
            f"Expected --loss in {SEGMENTATION_LOSSES}. Received: {settings.loss!r}"
        )
    if settings.data_format not in ("channels_first", "channels_last"):
        raise FinetuneInputError(
            "Expected --data_format channels_first or channels_last. Received: "
            f"{settings.data_format!r}"
        )
    if settings.patch is not None:
        check_patch(settings.patch)
    if settings.bn_momentum is not None and not 0.0 <= settings.bn_momentum < 1.0:
        raise FinetuneInputError(
            f"Expected --bn_momentum in [0, 1). Received: {settings.bn_momentum}"
        )
    fraction = settings.foreground_fraction
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise FinetuneInputError(f"Expected --foreground_fraction in [0, 1]. Received: {fraction}")


# ------------------------------------------------------------------------------------------
# Prepare: every check before a model exists
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunPlan:
    """What `prepare` found.

    Attributes:
        config: the resolved configuration (written to finetune_config.json).
        paths: name -> absolute path of the run's files (`FILES`).
        weights: the weight file, or None.
        train_ds, valid_ds: the datasets.
        resume_state: the last checkpoint's state to continue from, or None.
    """

    config: dict
    paths: dict[str, str]
    weights: str | None
    train_ds: Any
    valid_ds: Any
    resume_state: RunState | None


@dataclasses.dataclass
class DataPlan:
    """What the data discovery found: the task, its shapes, the split and the datasets.

    Attributes:
        task, patch, intensity: resolved from the data and the settings.
        n_classes, n_channels: the model's output classes and input channels.
        train_ds, valid_ds: the datasets.
        train_ids, valid_ids: the cases of each side.
        info: what the config records of the data (labels, channel names, file ending,
            layout; the candidates CSV).
        batch_size, spacing, intensity_params: as given, or planned.
        plan, fingerprint: the `finetune_plan.Plan` and the data set's fingerprint, when the
            recipe plans (volumes only); else None.
    """

    task: str
    patch: tuple[int, int, int]
    intensity: list[str]
    n_classes: int
    n_channels: int
    train_ds: Any
    valid_ds: Any
    train_ids: list[str]
    valid_ids: list[str]
    info: dict[str, Any]
    batch_size: int = 8
    spacing: tuple[float, float, float] | None = None
    intensity_params: list[dict[str, Any]] | None = None
    plan: Any = None
    fingerprint: dict[str, Any] | None = None


def run_paths(settings: FinetuneSettings) -> dict[str, str]:
    """Absolute paths of the run's files (`FILES`), the cache where ``--cache`` puts it.

    Args:
        settings: gives ``output`` and ``cache``.

    Returns:
        name -> path.
    """
    run_dir = os.path.abspath(settings.output)
    paths = {k: os.path.join(run_dir, v) for k, v in FILES.items()}
    if settings.cache:
        paths["cache"] = os.path.abspath(settings.cache)
    return paths


def check_run_dir(paths: dict[str, str], resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds a run unless resuming or overwriting; create it.

    Args:
        paths: from `run_paths`.
        resume, overwrite: the settings'.

    Raises:
        FinetuneInputError: the folder holds a run and neither is set.
    """
    exists = os.path.isfile(paths["config"])
    if exists and not resume and not overwrite:
        raise FinetuneInputError(
            f"Expected a new run folder. Received: {os.path.dirname(paths['config'])} already "
            "holds a run; pass --resume to continue it or --overwrite to start again"
        )
    os.makedirs(os.path.dirname(paths["config"]), exist_ok=True)


def resolve_width(settings: FinetuneSettings) -> tuple[str | None, int | None, int]:
    """The weight file, its input channels and the U-Net width to build.

    Args:
        settings: gives ``weights`` and ``n_base_filters``.

    Returns:
        (weight file or None, the file's input channels or None, n_base_filters).

    Raises:
        FinetuneInputError: no such file, not a U-Net weight file, or a width other than the
            file's.
    """
    weights = resolve_weights(settings.weights)
    n_base = settings.n_base_filters
    if weights is None:
        return None, None, 32 if n_base is None else int(n_base)
    file_channels, width = weight_file_width(weights)
    if n_base is not None and int(n_base) != width:
        raise FinetuneInputError(
            f"Expected --n_base_filters to match the weights, or to be left out. Received: "
            f"--n_base_filters {n_base}, but {weights} was trained with {width}"
        )
    return weights, file_channels, width


def _array_batches(
    settings: FinetuneSettings, x: Any, t: Any, n_classes: int, training: bool, indices: Any
) -> ArrayBatches:
    # Training batches are shuffled each epoch; validation batches are the same each epoch.
    steps = settings.steps_per_epoch if training else settings.validation_steps
    return ArrayBatches(
        x,
        t,
        n_classes,
        settings.batch_size or 8,
        settings.seed,
        settings.data_format,
        training,
        steps,
        indices,
        workers=settings.workers,
        use_multiprocessing=False,
        max_queue_size=10,
    )


def device_budget() -> tuple[int, int | None]:
    """(memory budget in bytes, the largest patch in voxels or None) for the device in use.

    On a GPU the budget is 85 % of its memory (16 GiB assumed on TensorFlow, which does not
    report it) and only memory limits the patch. On a CPU the
    budget is half the memory available, and a patch holds at most 64 x 64 x 64 voxels: a CPU
    runs out of time long before it runs out of memory (a step of the 8-filter U-Net on a
    64 x 64 x 32 patch takes about a second on two cores).
    """
    from finetune_plan import default_memory_budget

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    total = None
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                total = torch.cuda.mem_get_info()[1]
        elif backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform == "gpu":
                total = (device.memory_stats() or {}).get("bytes_limit")
        else:
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                # TensorFlow reports no device size: plan for 16 GiB, the smallest common
                # training GPU (--patch and --batch_size override the plan).
                total = 16 * 2**30
    except (ImportError, RuntimeError):  # no such backend or device: plan for the CPU
        total = None
    if total:
        return int(total * 0.85), None
    return default_memory_budget(), 64**3


def plan_volumes(
    settings: FinetuneSettings,
    source: Any,
    n_base: int,
    pretrained: bool,
) -> tuple[Any, dict[str, Any]]:
    """The data set's fingerprint (every case's geometry, labels and foreground intensities)
    and the plan made from it (`finetune_plan.make_plan`), with the flags given as overrides.

    Returns:
        (the `Plan`, the fingerprint).

    Raises:
        FinetuneInputError: an override the planner refuses.
    """
    from finetune_cases import fingerprint_cases
    from finetune_plan import PlanInputError, dataset_fingerprint, make_plan
    from volume_io import intensity_mode_for

    prints = fingerprint_cases(source, settings.seed, progress=bool(settings.verbose))
    fingerprint = dataset_fingerprint(prints)
    budget, max_voxels = device_budget()
    modality = [intensity_mode_for(name) for name in source.channel_names]
    modality = [m if m in ("ct", "mri") else "other" for m in modality]
    intensity = None
    if settings.intensity is not None:
        intensity = default_intensity(source.channel_names, settings.intensity)
    try:
        plan = make_plan(
            fingerprint,
            modality=modality,
            pretrained=pretrained,
            patch=settings.patch,
            spacing=settings.spacing,
            batch_size=settings.batch_size,
            intensity=intensity,
            memory_budget_bytes=budget,
            n_base_filters=n_base,
            n_classes=source.n_classes,
            dtype="mixed_bfloat16" if settings.mixed_precision else "float32",
            max_patch_voxels=None if settings.patch is not None else max_voxels,
        )
    except PlanInputError as exc:
        raise FinetuneInputError(str(exc)) from exc
    return plan, fingerprint


def _augment_settings(settings: FinetuneSettings, spacing: Any) -> Any:
    """The training patches' augmentation: None (plain crops), or nnU-Net's, rotating only
    in-plane when the slices are more than 3 times coarser than the in-plane spacing."""
    if settings.augment != "default":
        return None
    from finetune_augment import AugmentSettings

    if spacing is not None and max(spacing) > 3 * min(spacing):
        return AugmentSettings.anisotropic(axis=int(np.argmax(spacing)))
    return AugmentSettings()


def _volume_data(
    settings: FinetuneSettings, cache: str, n_base: int = 32, pretrained: bool = False
) -> DataPlan:
    """A folder of labelled volumes: planned (default recipe), preprocessed into the cache,
    patches sampled from it."""
    if settings.task not in (None, "segmentation"):
        raise FinetuneInputError(
            f"Expected --task segmentation for a folder of labelled volumes ({settings.data}). "
            f"Received: --task {settings.task}"
        )
    source = discover_segmentation(settings.data)
    plan = fingerprint = None
    if RECIPES[settings.recipe]["plan"]:
        plan, fingerprint = plan_volumes(settings, source, n_base, pretrained)
        patch, spacing, bs = check_patch(plan.patch), tuple(plan.spacing), int(plan.batch_size)
        intensity, params = list(plan.intensity), [dict(p) for p in plan.intensity_params]
    else:
        patch = check_patch(settings.patch or (64, 64, 32))
        spacing = None if settings.spacing is None else tuple(settings.spacing)
        bs = int(settings.batch_size or 8)
        intensity, params = default_intensity(source.channel_names, settings.intensity), None
    train_ids, valid_ids = split_cases(
        [c.case_id for c in source.cases], settings.fold, settings.folds, settings.seed
    )
    prepared = prepare_cases(
        source, cache, intensity, spacing, progress=bool(settings.verbose), intensity_params=params
    )
    by_id = {p.case_id: p for p in prepared}
    train_cases = [by_id[i] for i in train_ids]
    if not any(c.has_foreground for c in train_cases):
        raise FinetuneInputError(
            f"Expected foreground in at least one training case. Received: none in "
            f"{train_ids} (the foreground is only in validation cases; change --seed/--fold)"
        )
    n_classes = source.n_classes
    common = dict(workers=settings.workers, use_multiprocessing=False, max_queue_size=10)
    seed, layout = settings.seed, settings.data_format
    fill = background_value(intensity[0], params[0] if params else None)
    steps = int(settings.steps_per_epoch or VOLUME_STEPS[0])
    # The original's recipe validates on 50 batches; the default on as many as it trains on
    # (at most 50), so that a short run does not spend most of its time validating.
    valid_steps = settings.validation_steps or (
        VOLUME_STEPS[1] if not RECIPES[settings.recipe]["plan"] else min(VOLUME_STEPS[1], steps)
    )
    train_ds = SegmentationPatches(
        train_cases,
        patch,
        bs,
        n_classes,
        steps,
        seed,
        layout,
        augment=_augment_settings(settings, spacing),
        image_fill=fill,
        foreground_fraction=settings.foreground_fraction,
        **common,
    )
    valid_ds = SegmentationPatches(
        [by_id[i] for i in valid_ids],
        patch,
        bs,
        n_classes,
        int(valid_steps),
        seed + 1,
        layout,
        fixed_epoch=0,
        image_fill=fill,
        **common,
    )
    info = dict(
        labels=source.labels,
        channel_names=source.channel_names,
        file_ending=source.file_ending,
        layout=source.layout,
    )
    return DataPlan(
        "segmentation",
        patch,
        intensity,
        n_classes,
        len(source.channel_names),
        train_ds,
        valid_ds,
        train_ids,
        valid_ids,
        info,
        batch_size=bs,
        spacing=spacing,
        intensity_params=params,
        plan=plan,
        fingerprint=fingerprint,
    )


def _array_data(settings: FinetuneSettings) -> DataPlan:
    """The original's pre-cut arrays: their own parts, or folds over both parts pooled."""
    if settings.spacing is not None:
        raise FinetuneInputError("Expected no --spacing with pre-cut arrays (they have none).")
    source = discover_arrays(settings.data, settings.task)
    patch = check_patch(source.patch)
    if settings.patch is not None and tuple(settings.patch) != patch:
        raise FinetuneInputError(
            f"Expected --patch to be left out or to match the arrays' size {patch} in "
            f"{settings.data}. Received: --patch {' '.join(map(str, settings.patch))}"
        )
    intensity = default_intensity(["prepared"], settings.intensity or ["none"])
    x_tr, t_tr = source.x["train"], source.t["train"]
    x_va, t_va = source.x["valid"], source.t["valid"]
    tr_idx = va_idx = None
    train_ids, valid_ids = ["x_train"], ["x_valid"]
    if settings.fold is not None:
        # Cross-validation pools both parts; each array item is its own case.
        x_tr = x_va = np.concatenate([x_tr, x_va])
        t_tr = t_va = np.concatenate([t_tr, t_va])
        ids = [f"{i:06d}" for i in range(len(x_tr))]
        train_ids, valid_ids = split_cases(ids, settings.fold, settings.folds, settings.seed)
        tr_idx = np.array(train_ids, dtype=np.int64)
        va_idx = np.array(valid_ids, dtype=np.int64)
    n_classes = source.n_classes
    info = dict(
        labels={"background": 0, "foreground": 1} if source.task == "segmentation" else None,
        channel_names=["prepared"],
        file_ending=None,
        layout="arrays",
    )
    return DataPlan(
        source.task,
        patch,
        intensity,
        n_classes,
        1,
        _array_batches(settings, x_tr, t_tr, n_classes, True, tr_idx),
        _array_batches(settings, x_va, t_va, n_classes, False, va_idx),
        train_ids,
        valid_ids,
        info,
        batch_size=settings.batch_size or 8,
    )


def _candidate_data(settings: FinetuneSettings, cache: str) -> DataPlan:
    """A candidates CSV: cubes cut around each candidate, split by series."""
    if settings.task not in (None, "classification"):
        raise FinetuneInputError(
            f"Expected --task classification for a candidates CSV ({settings.data}). "
            f"Received: --task {settings.task}"
        )
    patch = check_patch(settings.patch or (64, 64, 32))
    intensity = default_intensity(["CT"], settings.intensity)
    if settings.spacing is not None:
        raise FinetuneInputError(
            "Expected no --spacing with candidates (cubes are cut on each volume's own grid)."
        )
    source = discover_candidates(settings.data, patch, cache, intensity[0], settings.candidates)
    cases = source.case_ids
    train_ids, valid_ids = split_cases(cases, settings.fold, settings.folds, settings.seed)
    valid_set = set(valid_ids)
    va_idx = np.array([i for i, c in enumerate(cases) if c in valid_set], np.int64)
    tr_idx = np.array([i for i, c in enumerate(cases) if c not in valid_set], np.int64)
    n_classes = max(2, int(source.labels.max()) + 1)
    info = dict(
        labels=None,
        channel_names=["CT"],
        file_ending=None,
        layout="candidates",
        candidates=source.csv_path,
    )
    return DataPlan(
        "classification",
        patch,
        intensity,
        n_classes,
        1,
        _array_batches(settings, source.cubes, source.labels, n_classes, True, tr_idx),
        _array_batches(settings, source.cubes, source.labels, n_classes, False, va_idx),
        train_ids,
        valid_ids,
        info,
        batch_size=settings.batch_size or 8,
    )


def discover_data(
    settings: FinetuneSettings, cache: str, n_base: int = 32, pretrained: bool = False
) -> DataPlan:
    """Find, check and prepare the data set (planned first, where the recipe plans); make its
    datasets.

    Args:
        settings: the run's settings, the recipe resolved (`resolve_recipe`).
        cache: the folder of preprocessed volumes.
        n_base: the U-Net's width (the plan's memory estimate).
        pretrained: whether training starts from pre-trained weights (the plan's intensities).

    Returns:
        The `DataPlan`.

    Raises:
        FinetuneInputError: bad data or settings that do not fit it.
    """
    layout = detect_layout(settings.data)
    if layout == "volumes":
        return _volume_data(settings, cache, n_base, pretrained)
    if layout == "arrays":
        return _array_data(settings)
    return _candidate_data(settings, cache)


def resolved_config(
    settings: FinetuneSettings,
    paths: dict[str, str],
    weights: str | None,
    n_base: int,
    data: DataPlan,
) -> dict[str, Any]:
    """The configuration finetune_config.json records (`finetune.py predict` reads it).

    Args:
        settings: the run's settings (also recorded as given, under "settings").
        paths: from `run_paths`.
        weights: the weight file, or None.
        n_base: the U-Net's width.
        data: from `discover_data`.

    Returns:
        The JSON-able dict.
    """
    return {
        "task": data.task,
        "data": os.path.abspath(settings.data),
        "output": os.path.dirname(paths["config"]),
        "weights": None if weights is None else os.path.abspath(weights),
        "patch": list(data.patch),
        "data_format": settings.data_format,
        "n_classes": int(data.n_classes),
        "n_channels": int(data.n_channels),
        "intensity": list(data.intensity),
        "intensity_params": data.intensity_params,
        "spacing": None if data.spacing is None else [float(v) for v in data.spacing],
        "n_base_filters": n_base,
        "seed": settings.seed,
        "batch_size": data.batch_size,
        "epochs": settings.epochs,
        "steps_per_epoch": len(data.train_ds),
        "validation_steps": len(data.valid_ds),
        "lr": float(settings.lr),
        "optimizer": settings.optimizer,
        "loss": settings.loss,
        "bn_momentum": settings.bn_momentum,
        "recipe": settings.recipe,
        "schedule": settings.schedule,
        "augment": settings.augment,
        "foreground_fraction": settings.foreground_fraction,
        # What predict does by default: mirroring and the post-processing (docs/finetuning.md).
        "tta": RECIPES[settings.recipe]["tta"],
        "postprocess": RECIPES[settings.recipe]["postprocess"],
        "patience": settings.patience,
        "fold": settings.fold,
        "folds": settings.folds,
        "freeze_encoder": settings.freeze_encoder,
        "mixed_precision": settings.mixed_precision,
        "workers": settings.workers,
        "verbose": settings.verbose,
        "cache": paths["cache"],
        "train_cases": list(data.train_ids),
        "valid_cases": list(data.valid_ids),
        **data.info,
        "settings": settings.to_dict(),
    }


def prepare(settings: FinetuneSettings) -> RunPlan:
    """Every check and all data preparation, before any model is built.

    Args:
        settings: the run's settings.

    Returns:
        The `RunPlan`.

    Raises:
        FinetuneInputError: bad input (data, flags, weights, run folder).
    """
    settings = resolve_recipe(settings)
    check_settings(settings)
    paths = run_paths(settings)
    check_run_dir(paths, settings.resume, settings.overwrite)
    weights, file_channels, n_base = resolve_width(settings)
    data = discover_data(settings, paths["cache"], n_base, pretrained=weights is not None)
    if data.plan is not None:
        from finetune_plan import format_plan_table, save_json

        save_json(paths["fingerprint"], data.fingerprint)
        save_json(paths["plan"], data.plan.to_dict())
        print(format_plan_table(data.plan))
    if file_channels is not None and file_channels != data.n_channels:
        raise FinetuneInputError(
            f"Expected weights for {data.n_channels} input channel(s) "
            f"({data.info['channel_names']}). Received: {weights} has {file_channels}; pass "
            "--weights none to train from scratch"
        )
    config = resolved_config(settings, paths, weights, n_base, data)
    state = _resume_state(paths, config, settings.resume)
    return RunPlan(config, paths, weights, data.train_ds, data.valid_ds, state)


def _resume_state(paths: dict[str, str], config: dict, resume: bool) -> RunState | None:
    if not resume:
        return None
    if not os.path.isfile(paths["last"]):
        print(f"Notice: --resume given but no checkpoint {paths['last']}; starting from epoch 1.")
        return None
    if os.path.isfile(paths["config"]):
        with open(paths["config"]) as f:
            before = json.load(f)
        changed = [k for k in _RESUME_KEYS if before.get(k) != config.get(k)]
        if changed:
            raise FinetuneInputError(
                "Expected the same settings as the run being resumed. Received: "
                + "; ".join(f"{k} {before.get(k)!r} vs {config.get(k)!r}" for k in changed)
            )
    return RunState.from_dict(read_checkpoint_state(paths["last"]))
