"""The fine-tuning plan: spacing, patch, batch size and intensities, each with its reason.

Fine-tuning has to choose, for each new data set, the voxel spacing to resample to, the patch
size, the batch size and how to map intensities. `finetune_fingerprint` measures what those
choices depend on (spacings, image sizes, the size of the labelled objects in millimetres,
foreground intensities); this module turns that *fingerprint* into a *plan* by a few rules,
each stated in one sentence in ``Plan.reasons`` and in docs/finetuning.md ("The plan"). Any
planned value can be fixed by the caller (a command-line flag); the plan then keeps it, plans
the others around it and says so.

The rules follow the spirit of nnU-Net's experiment planning (median spacing, a low percentile
for the coarse axis of anisotropic data, memory-bound patch and batch, at most 5% of the data in
one batch, foreground-percentile clipping and z-scoring for CT) and add one of our own: the
patch must see the typical object whole, with context. On the 36 sarcoma CTs of sts_ct a
64-voxel patch at their 0.98 mm spans 6 cm, while the median tumour is about 8 cm across; at
2 mm the same patch sees it with room around it.

Standard library and NumPy only (psutil inside `default_memory_budget`): plain data in, plain
data out. The fingerprint functions are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from finetune_fingerprint import (
    ALL_INTENSITY_MODES,
    FINGERPRINT_VERSION,
    PLAN_INTENSITY_MODES,
    PlanInputError,
    case_fingerprint,
    check_spacing,
    dataset_fingerprint,
    foreground_objects,
)
from genesis_files import atomic_path
from volume_io import CT_WINDOW

__all__ = [
    "ALL_INTENSITY_MODES",
    "PLAN_INTENSITY_MODES",
    "Plan",
    "PlanInputError",
    "case_fingerprint",
    "dataset_fingerprint",
    "default_memory_budget",
    "foreground_objects",
    "format_plan_table",
    "make_plan",
    "save_json",
    "training_step_bytes",
    "unet_activation_count",
    "unet_parameter_count",
]

# ------------------------------------------------------------------------------------------
# The rules' constants (docs/finetuning.md, "The plan", says what each is for)
# ------------------------------------------------------------------------------------------

# Data whose coarsest axis is more than this many times the finest is anisotropic.
ANISOTROPY_RATIO = 3.0
# For anisotropic data the coarse axis takes this percentile of the cases' coarse spacings.
COARSE_AXIS_PERCENTILE = 10.0
# The typical object: this percentile of the objects' extents, axis by axis.
OBJECT_PERCENTILE = 50.0
# The patch should span this many times the typical object (a quarter of it on each side).
CONTEXT = 1.5
# No axis is coarsened beyond max(coarsest base spacing, MAX_COARSENING x finest base spacing).
MAX_COARSENING = 2.0
# A planned patch has at least this many voxels per axis (unless the images are smaller).
MIN_PLANNED_PATCH = 32
# Shrinking a patch to fit memory stops at this many voxels per axis.
MIN_PATCH = 16
# nnU-Net's smallest batch: batch statistics from one patch are too noisy.
MIN_BATCH = 2
# A batch holds at most this share of the data set's voxels (unless MIN_BATCH needs more).
MAX_DATASET_SHARE = 0.05
# Memory of a training step: stored activations times this, for the gradients and the
# backend's temporaries during the backward pass. Measured on TensorFlow's CPU backend, each
# extra 64x64x32 patch of the 8-filter network took 1.4 times its counted activations (peak RSS
# of batch 3 minus batch 1); 2 leaves room for GPU convolution workspaces (not yet measured).
BACKWARD_FACTOR = 2.0
# Coarsening for memory raises the spacing by this factor per step.
_COARSEN_STEP = 1.05

_AXES = ("x", "y", "z")
_FLAGS = {
    "spacing": "--spacing",
    "patch": "--patch",
    "batch_size": "--batch_size",
    "intensity": "--intensity",
}
_PLAN_VERSION = 1


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


def _ceil_to(value: float, factor: int) -> int:
    return int(math.ceil(value / factor - 1e-9)) * factor


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return " x ".join(f"{float(v):.{digits}g}" for v in values)


def _fmt_mm(values: Sequence[float]) -> str:
    return " x ".join(f"{float(v):.0f}" for v in values) + " mm"


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _axes_named(axes: Sequence[int]) -> str:
    return ", ".join(_AXES[a] for a in axes)


def _round_up_spacing(value: float, base: float, cap: float) -> float:
    """A coarsened spacing rounded up to 0.01 mm (so the patch still spans what it must), kept
    within [base, cap]; an uncoarsened one is left exactly as it was."""
    if value <= base * (1 + 1e-9):
        return float(base)
    return float(min(max(math.ceil(value * 100 - 1e-6) / 100, base), cap))


# ------------------------------------------------------------------------------------------
# Memory of a training step of unet3d
# ------------------------------------------------------------------------------------------


def _levels(n_base_filters: int, depth: int) -> list[int]:
    """Filters of the first conv block of each encoder level (the second has twice as many)."""
    return [int(n_base_filters) * 2**d for d in range(int(depth))]


def unet_parameter_count(
    n_base_filters: int = 32,
    *,
    n_channels: int = 1,
    n_classes: int = 2,
    depth: int = 4,
    batch_normalization: bool = True,
    deconvolution: bool = False,
) -> int:
    """Weights of ``unet3d.unet_model_3d`` with a 1x1x1 output conv of `n_classes`, counted from
    its architecture (kernels, biases, batch-norm scale, offset and moving statistics).

    Args:
        n_base_filters: filters of the first conv block.
        n_channels: input channels.
        n_classes: output channels.
        depth: resolution levels.
        batch_normalization: batch norm after every conv of the blocks.
        deconvolution: learned transposed-conv upsampling.

    Returns:
        The number of weights (what ``model.count_params()`` reports).
    """
    bn = 4 if batch_normalization else 0

    def conv(cin: int, cout: int, k: int = 27) -> int:
        return k * cin * cout + cout

    total, cin = 0, int(n_channels)
    for f in _levels(n_base_filters, depth):
        total += conv(cin, f) + bn * f + conv(f, 2 * f) + bn * 2 * f
        cin = 2 * f
    for d in range(int(depth) - 2, -1, -1):
        skip = 2 * int(n_base_filters) * 2**d
        if deconvolution:
            total += conv(cin, cin, 8)
        total += conv(cin + skip, skip) + bn * skip + conv(skip, skip) + bn * skip
        cin = skip
    return total + conv(cin, int(n_classes), 1)


def unet_activation_count(
    patch: Sequence[int],
    n_base_filters: int = 32,
    *,
    n_channels: int = 1,
    n_classes: int = 2,
    depth: int = 4,
    batch_normalization: bool = True,
) -> int:
    """Values one training sample keeps for the backward pass of ``unet3d.unet_model_3d``.

    Counted layer by layer: the input and the one-hot target; per conv block the conv, batch
    norm and ReLU outputs; each pooling, upsampling and concatenation output; the output conv
    and its softmax. A level's layers hold ``channels x voxels`` values, with ``prod(patch) /
    8**level`` voxels at level ``level``.

    Args:
        patch: (R, C, D), each divisible by ``2 ** (depth - 1)``.
        n_base_filters: filters of the first conv block.
        n_channels: input channels.
        n_classes: output channels (and target channels).
        depth: resolution levels.
        batch_normalization: batch norm after every conv of the blocks.

    Returns:
        The number of values per sample.
    """
    voxels = [int(np.prod([int(p) for p in patch])) // 8**d for d in range(int(depth))]
    per_block = 3 if batch_normalization else 2  # conv, (batch norm), ReLU
    total = (int(n_channels) + int(n_classes)) * voxels[0]  # input and one-hot target
    cin = None
    for d, f in enumerate(_levels(n_base_filters, depth)):
        if d:
            total += cin * voxels[d]  # the pooled input of this level
        total += per_block * (f + 2 * f) * voxels[d]
        cin = 2 * f
    for d in range(int(depth) - 2, -1, -1):
        skip = 2 * int(n_base_filters) * 2**d
        total += cin * voxels[d]  # upsampled
        total += (cin + skip) * voxels[d]  # concatenated with the skip
        total += per_block * 2 * skip * voxels[d]
        cin = skip
    return total + 2 * int(n_classes) * voxels[0]  # output conv and softmax


_HALF = ("bfloat16", "mixed_bfloat16", "float16", "mixed_float16")


def training_step_bytes(
    patch: Sequence[int],
    batch_size: int,
    *,
    n_base_filters: int = 32,
    n_channels: int = 1,
    n_classes: int = 2,
    depth: int = 4,
    dtype: str = "float32",
    batch_normalization: bool = True,
    deconvolution: bool = False,
    optimizer_slots: int = 2,
) -> int:
    """An estimate of the memory one training step of ``unet3d`` takes.

    ``BACKWARD_FACTOR x activations x bytes per value x batch`` for what the forward pass keeps
    and the backward pass adds, plus the weights, their gradients and the optimizer's slots
    (Adam keeps two) in float32.

    Args:
        patch: (R, C, D).
        batch_size: patches per step.
        n_base_filters: filters of the first conv block.
        n_channels: input channels.
        n_classes: output channels.
        depth: resolution levels.
        dtype: "float32", or "bfloat16"/"mixed_bfloat16" (two bytes per activation; weights
            stay float32).
        batch_normalization: batch norm after every conv.
        deconvolution: learned transposed-conv upsampling.
        optimizer_slots: values the optimizer keeps per weight (Adam 2, SGD with momentum 1).

    Returns:
        Bytes.
    """
    if dtype not in ("float32", "mixed_float32", *_HALF):
        raise PlanInputError(f"Expected dtype float32 or bfloat16. Received: dtype={dtype!r}")
    value_bytes = 2 if dtype in _HALF else 4
    acts = unet_activation_count(
        patch,
        n_base_filters,
        n_channels=n_channels,
        n_classes=n_classes,
        depth=depth,
        batch_normalization=batch_normalization,
    )
    params = unet_parameter_count(
        n_base_filters,
        n_channels=n_channels,
        n_classes=n_classes,
        depth=depth,
        batch_normalization=batch_normalization,
        deconvolution=deconvolution,
    )
    per_sample = BACKWARD_FACTOR * acts * value_bytes
    return int(math.ceil(per_sample * int(batch_size) + params * 4 * (2 + int(optimizer_slots))))


def default_memory_budget(fraction: float = 0.5) -> int:
    """A memory budget for training on the CPU: `fraction` of the memory available now.

    For a GPU pass the device's own memory instead, e.g. ``torch.cuda.mem_get_info()[1]`` or
    ``tf.config.experimental.get_memory_info``'s limit, times about 0.85 for the backend's
    workspace: host memory says nothing about it.

    Args:
        fraction: the share of available memory to plan for (the rest is for the data and
            everything else).

    Returns:
        Bytes.
    """
    import psutil  # only here: the rest of the module needs NumPy alone

    if not 0 < fraction <= 1:
        raise PlanInputError(f"Expected 0 < fraction <= 1. Received: fraction={fraction}")
    return int(psutil.virtual_memory().available * fraction)


# ------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What fine-tuning will use, and why.

    Attributes:
        spacing: (x, y, z) mm to resample every case to.
        patch: (R, C, D) voxels, each divisible by ``2 ** (depth - 1)``.
        batch_size: patches per step.
        intensity: one mode per channel of ``volume_io.normalise_intensity``: "ct", "mri",
            "minmax", "none" (the pre-trained weights' range) or "ct_foreground", "zscore"
            (standardised, for training from scratch).
        intensity_params: per channel, the mode's parameters ({} when it has none).
        field_of_view_mm: what the patch spans, ``patch x spacing``.
        wanted_field_of_view_mm: what the context rule asked it to span.
        memory_bytes: `training_step_bytes` of the planned step.
        memory_budget_bytes: the budget it was planned for.
        reasons: value name -> one sentence saying which rule (or flag) gave it.
        warnings: what could not be met (a budget too small, a shortfall of context).
        settings: the planner's inputs (modality, pretrained, width, rule parameters) and the
            fingerprint figures the rules used.
    """

    spacing: tuple[float, float, float]
    patch: tuple[int, int, int]
    batch_size: int
    intensity: list[str]
    intensity_params: list[dict[str, Any]]
    field_of_view_mm: tuple[float, float, float]
    wanted_field_of_view_mm: tuple[float, float, float]
    memory_bytes: int
    memory_budget_bytes: int
    reasons: dict[str, str]
    warnings: list[str] = dataclasses.field(default_factory=list)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = _PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        d = dataclasses.asdict(self)
        for key in ("spacing", "patch", "field_of_view_mm", "wanted_field_of_view_mm"):
            d[key] = list(d[key])
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The Plan written by `to_dict` (e.g. a run's plan.json).

        Args:
            d: the dict.

        Returns:
            The Plan.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        required = [n for n in required if n not in ("warnings", "settings")]
        missing = [n for n in required if n not in d]
        unknown = [k for k in d if k not in names]
        if missing or unknown:
            raise PlanInputError(
                f"Expected a plan with the fields {required}. Received: keys={sorted(d)} "
                f"(missing {missing}, unknown {unknown})"
            )
        if int(d.get("version", _PLAN_VERSION)) != _PLAN_VERSION:
            raise PlanInputError(
                f"Expected a plan of version {_PLAN_VERSION}. Received: version={d['version']!r}"
            )
        return cls(
            spacing=tuple(float(v) for v in d["spacing"]),
            patch=tuple(int(v) for v in d["patch"]),
            batch_size=int(d["batch_size"]),
            intensity=[str(m) for m in d["intensity"]],
            intensity_params=[dict(p) for p in d["intensity_params"]],
            field_of_view_mm=tuple(float(v) for v in d["field_of_view_mm"]),
            wanted_field_of_view_mm=tuple(float(v) for v in d["wanted_field_of_view_mm"]),
            memory_bytes=int(d["memory_bytes"]),
            memory_budget_bytes=int(d["memory_budget_bytes"]),
            reasons={str(k): str(v) for k, v in d["reasons"].items()},
            warnings=[str(w) for w in d.get("warnings", [])],
            settings=dict(d.get("settings", {})),
            version=int(d.get("version", _PLAN_VERSION)),
        )


def _check_fingerprint(fp: Any) -> None:
    needed = ("n_cases", "n_channels", "spacings", "shapes", "objects", "intensity", "size_mm")
    if not isinstance(fp, dict) or any(k not in fp for k in needed):
        keys = sorted(fp) if isinstance(fp, dict) else type(fp).__name__
        raise PlanInputError(
            f"Expected a dataset_fingerprint dict with {list(needed)}. Received: {keys}"
        )
    if int(fp.get("version", FINGERPRINT_VERSION)) != FINGERPRINT_VERSION:
        raise PlanInputError(
            f"Expected a fingerprint of version {FINGERPRINT_VERSION}. "
            f"Received: version={fp['version']!r}"
        )


def _check_patch(patch: Any, factor: int) -> tuple[int, int, int]:
    try:
        values = tuple(int(p) for p in patch)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or any(v < 1 or v % factor for v in values):
        raise PlanInputError(
            f"Expected patch of three positive sizes, each divisible by {factor} (the U-Net "
            f"pools depth - 1 times by 2). Received: patch={patch!r}"
        )
    return values


def _modalities(modality: str | Sequence[str], n_channels: int) -> list[str]:
    names = [modality] * n_channels if isinstance(modality, str) else list(modality)
    if len(names) != n_channels:
        raise PlanInputError(
            f"Expected one modality, or one per channel ({n_channels}). Received: "
            f"modality={modality!r}"
        )
    return [str(m).strip().lower() for m in names]


class _Geometry:
    """The data set's cases seen at a candidate spacing."""

    def __init__(self, fp: dict[str, Any]) -> None:
        self.spacings = np.asarray(fp["spacings"], dtype=np.float64).reshape(-1, 3)
        self.shapes = np.asarray(fp["shapes"], dtype=np.float64).reshape(-1, 3)

    def shapes_at(self, spacing: np.ndarray) -> np.ndarray:
        # volume_io.resample_image's rule: round(size * old spacing / new spacing).
        return np.maximum(1, np.round(self.shapes * self.spacings / spacing))

    def median_shape_at(self, spacing: np.ndarray) -> np.ndarray:
        return np.median(self.shapes_at(spacing), axis=0)

    def voxels_at(self, spacing: np.ndarray) -> float:
        return float(np.prod(self.shapes_at(spacing), axis=1).sum())


def make_plan(
    fingerprint: dict[str, Any],
    *,
    modality: str | Sequence[str] = "ct",
    pretrained: bool = True,
    patch: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    batch_size: int | None = None,
    intensity: Sequence[str] | None = None,
    memory_budget_bytes: int | None = None,
    n_base_filters: int = 32,
    n_classes: int | None = None,
    depth: int = 4,
    dtype: str = "float32",
    batch_normalization: bool = True,
    deconvolution: bool = False,
    context: float = CONTEXT,
    object_percentile: float = OBJECT_PERCENTILE,
    max_coarsening: float = MAX_COARSENING,
    max_patch_voxels: int | None = None,
    pretrained_spacing: Sequence[float] | None = None,
    respect_pretrained_spacing: bool = False,
) -> Plan:
    """Plan spacing, patch, batch size and intensities for fine-tuning on a data set.

    Every value given explicitly (``patch``, ``spacing``, ``batch_size``, ``intensity``: the
    command-line flags) is kept as given, and the other values are planned around it; its
    reason says "set by --flag".

    Args:
        fingerprint: a `dataset_fingerprint`.
        modality: "ct", "mri" or anything else (other), one for all channels or one per channel.
        pretrained: whether training starts from pre-trained weights, whose input range the
            intensities must then match.
        patch: a fixed (R, C, D); the spacing is then chosen so that it spans the context.
        spacing: a fixed (x, y, z) spacing in mm.
        batch_size: a fixed batch size.
        intensity: fixed intensity modes, one for all channels or one per channel.
        memory_budget_bytes: memory a training step may take; None: `default_memory_budget()`.
        n_base_filters: the U-Net's width (32 for the published weights).
        n_classes: output classes, background included; None: from the fingerprint.
        depth: the U-Net's resolution levels (patch sizes divisible by ``2 ** (depth - 1)``).
        dtype: "float32" or "mixed_bfloat16" (activations in two bytes).
        batch_normalization: the model has batch norm (the fine-tuning model does).
        deconvolution: the model upsamples with transposed convolutions.
        context: the patch should span this many times the typical object.
        object_percentile: the typical object is this percentile of the objects' extents.
        max_coarsening: no axis is coarsened beyond ``max(coarsest base spacing,
            max_coarsening x finest base spacing)``.
        max_patch_voxels: a planned patch holds at most this many voxels, for speed (a CPU
            is slow long before its memory is full); reached like the memory budget, by
            coarsening first. None: only memory limits it. A fixed patch is not checked.
        pretrained_spacing: the spacing the pre-trained weights saw, (x, y, z) mm.
        respect_pretrained_spacing: use `pretrained_spacing` as the spacing (no coarsening for
            context) instead of the data's own; off by default.

    Returns:
        The `Plan`.

    Raises:
        PlanInputError: a malformed fingerprint or override.
    """
    _check_fingerprint(fingerprint)
    fp = fingerprint
    depth = int(depth)
    if depth < 1:
        raise PlanInputError(f"Expected depth >= 1. Received: depth={depth}")
    factor = 2 ** (depth - 1)
    n_channels = int(fp["n_channels"])
    classes = [int(c) for c in fp.get("classes", [])]
    n_classes = max(2, max(classes, default=0) + 1) if n_classes is None else int(n_classes)
    modalities = _modalities(modality, n_channels)
    fixed_patch = None if patch is None else _check_patch(patch, factor)
    fixed_spacing = None if spacing is None else np.array(check_spacing(spacing))
    if batch_size is not None and int(batch_size) < 1:
        raise PlanInputError(f"Expected batch_size >= 1. Received: batch_size={batch_size!r}")
    if not context > 0 or not 0 <= object_percentile <= 100 or not max_coarsening >= 1:
        raise PlanInputError(
            "Expected context > 0, 0 <= object_percentile <= 100 and max_coarsening >= 1. "
            f"Received: context={context}, object_percentile={object_percentile}, "
            f"max_coarsening={max_coarsening}"
        )
    if pretrained_spacing is not None:
        pretrained_spacing = check_spacing(pretrained_spacing, "pretrained_spacing")
    if respect_pretrained_spacing and pretrained_spacing is None:
        raise PlanInputError(
            "Expected pretrained_spacing with respect_pretrained_spacing=True. Received: "
            "pretrained_spacing=None"
        )
    reasons: dict[str, str] = {}
    warnings: list[str] = []
    budget_note = ""
    if memory_budget_bytes is None:
        memory_budget_bytes = default_memory_budget()
        budget_note = " (half the memory available now)"
    budget = int(memory_budget_bytes)
    if budget <= 0:
        raise PlanInputError(f"Expected memory_budget_bytes > 0. Received: {memory_budget_bytes}")
    geo = _Geometry(fp)
    n_cases = len(geo.spacings)
    net = dict(
        n_base_filters=int(n_base_filters),
        n_channels=n_channels,
        n_classes=n_classes,
        depth=depth,
        dtype=dtype,
        batch_normalization=batch_normalization,
        deconvolution=deconvolution,
    )

    # Rules 1 and 2: the median spacing; the coarse axis of anisotropic data.
    median = np.median(geo.spacings, axis=0)
    if fixed_spacing is not None:
        base = fixed_spacing
        spacing_reason = f"set by {_FLAGS['spacing']}"
    elif respect_pretrained_spacing:
        base = np.array(pretrained_spacing)
        spacing_reason = (
            "the pre-trained weights' spacing (respect_pretrained_spacing), not coarsened for "
            "context"
        )
    else:
        base = median.copy()
        spacing_reason = f"the median spacing of the {n_cases} cases"
        coarse = int(np.argmax(base))
        others = [a for a in range(3) if a != coarse]
        if base[coarse] > ANISOTROPY_RATIO * base.min():
            low = float(np.percentile(geo.spacings[:, coarse], COARSE_AXIS_PERCENTILE))
            base[coarse] = max(low, float(base[others].max()))
            spacing_reason += (
                f"; anisotropic (the {_AXES[coarse]} axis over {ANISOTROPY_RATIO:g}x the finest), "
                f"so {_AXES[coarse]} takes the {COARSE_AXIS_PERCENTILE:g}th percentile of the "
                f"cases' {_AXES[coarse]} spacings, {base[coarse]:.3g} mm, and fewer cases lose "
                "slices"
            )
    coarsen = fixed_spacing is None and not respect_pretrained_spacing
    cap = float(max(base.max(), max_coarsening * base.min()))

    # Rule 3: the field of view the patch should span.
    image_mm = np.median(geo.shapes * geo.spacings, axis=0)
    extents = np.array([o["extent_mm"] for o in fp["objects"]], dtype=np.float64).reshape(-1, 3)
    if len(extents):
        typical = np.percentile(extents, object_percentile, axis=0)
        wanted = np.minimum(context * typical, image_mm)
        fov_rule = (
            f"{context:g}x the typical object ({_fmt_mm(typical)}, the "
            f"{object_percentile:g}th percentile of {len(extents)} objects' extents), at most the "
            "median image"
        )
    else:
        typical = None
        wanted = image_mm
        fov_rule = "the median image (the labels hold no objects)"

    if max_patch_voxels is not None and int(max_patch_voxels) < MIN_PATCH**3:
        raise PlanInputError(
            f"Expected max_patch_voxels >= {MIN_PATCH**3} (a {MIN_PATCH}-voxel cube). Received: "
            f"max_patch_voxels={max_patch_voxels!r}"
        )
    limit = f"the memory budget at batch {batch_size or MIN_BATCH}"
    if max_patch_voxels is not None:
        limit += f" and max_patch_voxels {int(max_patch_voxels)}"

    def fits(p: Sequence[int]) -> bool:
        small = max_patch_voxels is None or int(np.prod(p)) <= int(max_patch_voxels)
        return small and training_step_bytes(p, batch_size or MIN_BATCH, **net) <= budget

    def planned_patch(s: np.ndarray) -> tuple[int, int, int]:
        image = geo.median_shape_at(s)
        sizes = []
        for a in range(3):
            size = max(_ceil_to(wanted[a] / s[a], factor), _ceil_to(MIN_PLANNED_PATCH, factor))
            sizes.append(max(factor, min(size, _ceil_to(image[a], factor))))
        return tuple(sizes)

    # Rules 4 to 7: spacing and patch together.
    coarsened: list[int] = []
    if fixed_patch is not None:
        p = fixed_patch
        s = base.copy()
        if coarsen:
            need = wanted / np.array(p)
            s = np.clip(need, base, cap)
            for a in range(3):  # axes that shared a spacing keep sharing it
                same = np.isclose(base, base[a], rtol=1e-3)
                s[a] = s[same].max()
            s = np.array([_round_up_spacing(s[a], base[a], cap) for a in range(3)])
            coarsened = [a for a in range(3) if s[a] > base[a]]
        patch_reason = f"set by {_FLAGS['patch']}"
        if coarsened:
            kept = [a for a in range(3) if a not in coarsened]
            spacing_reason += (
                f"; {_axes_named(coarsened)} coarsened so that the fixed patch spans the wanted "
                f"field of view ({_fmt_mm(wanted)})"
            )
            if kept:
                spacing_reason += f"; {_axes_named(kept)} kept"
            at_cap = [a for a in range(3) if s[a] >= cap - 1e-9 and wanted[a] > p[a] * s[a] + 1e-6]
            if at_cap:
                spacing_reason += (
                    f" ({_axes_named(at_cap)} at the limit {cap:.3g} mm: max(coarsest axis, "
                    f"{max_coarsening:g}x the finest))"
                )
    else:
        s = base.copy()
        p = planned_patch(s)
        if coarsen and not fits(p):
            # Rule 6: coarsen, finest axes first, rather than lose context.
            t = float(base.min())
            while not fits(p) and np.any(s < cap - 1e-9):
                t *= _COARSEN_STEP
                s = np.array(
                    [_round_up_spacing(min(max(t, base[a]), cap), base[a], cap) for a in range(3)]
                )
                p = planned_patch(s)
            coarsened = [a for a in range(3) if s[a] > base[a]]
            if coarsened:
                spacing_reason += (
                    f"; {_axes_named(coarsened)} coarsened, finest first and at most to "
                    f"{cap:.3g} mm, until a patch spanning the wanted field of view fits "
                    f"{limit}"
                )
        planned = p
        shrunk = []
        while not fits(p):
            # Rule 7: shrink the longest side (in mm) of the patch until it fits.
            candidates = [a for a in range(3) if p[a] - factor >= max(MIN_PATCH, factor)]
            if not candidates:
                break
            a = max(candidates, key=lambda k: p[k] * s[k])
            p = tuple(v - factor if k == a else v for k, v in enumerate(p))
            shrunk.append(a)
        image = geo.median_shape_at(s)
        patch_reason = (
            f"spans the wanted field of view at the planned spacing, rounded up to a multiple of "
            f"{factor}, at least {MIN_PLANNED_PATCH} and at most the median image "
            f"({_fmt(image, 4)} voxels, rounded up)"
        )
        if shrunk:
            patch_reason += (
                f"; shrunk from {_fmt(planned, 4)} along {_axes_named(sorted(set(shrunk)))} to "
                f"fit {limit}"
            )
    spacing_t = tuple(float(v) for v in s)
    fov = np.array(p) * s
    fov_reason = f"patch x spacing; wanted: {fov_rule}"
    short = [a for a in range(3) if fov[a] < wanted[a] - 0.5]
    if short:
        fov_reason += "; short along " + ", ".join(
            f"{_AXES[a]} ({fov[a]:.0f} of {wanted[a]:.0f} mm)" for a in short
        )
    # Rule 8: the batch size.
    fixed_bytes = training_step_bytes(p, 0, **net)
    per_sample = training_step_bytes(p, 1, **net) - fixed_bytes
    voxels = geo.voxels_at(s)
    by_data = int(MAX_DATASET_SHARE * voxels // int(np.prod(p)))
    if batch_size is not None:
        bs = int(batch_size)
        batch_reason = f"set by {_FLAGS['batch_size']}"
    else:
        by_memory = max(0, (budget - fixed_bytes) // per_sample)
        bs = max(MIN_BATCH, min(by_memory, by_data))
        batch_reason = (
            f"the most that fit the memory budget ({by_memory}), at most {by_data} so that a "
            f"batch holds at most {MAX_DATASET_SHARE:.0%} of the data set's "
            f"{voxels / 1e6:.1f} M voxels at this spacing, at least {MIN_BATCH}"
        )
    memory = training_step_bytes(p, bs, **net)
    if memory > budget:
        warnings.append(
            f"batch {bs} of {_fmt(p, 4)} needs an estimated {_fmt_bytes(memory)}, more than "
            f"the budget {_fmt_bytes(budget)}"
        )

    # Rules 9 to 11: intensities.
    modes, params, intensity_reason = _plan_intensity(fp, modalities, pretrained, intensity)

    reasons["spacing"] = spacing_reason
    reasons["patch"] = patch_reason
    reasons["field_of_view"] = fov_reason
    reasons["batch_size"] = batch_reason
    reasons["intensity"] = intensity_reason
    reasons["memory"] = (
        f"estimated for the U-Net of {n_base_filters} base filters, {dtype}; budget "
        f"{_fmt_bytes(budget)}{budget_note}"
    )
    settings = {
        "modality": modalities,
        "pretrained": bool(pretrained),
        "n_cases": n_cases,
        "n_base_filters": int(n_base_filters),
        "n_channels": n_channels,
        "n_classes": n_classes,
        "depth": depth,
        "dtype": dtype,
        "context": float(context),
        "object_percentile": float(object_percentile),
        "max_coarsening": float(max_coarsening),
        "max_patch_voxels": None if max_patch_voxels is None else int(max_patch_voxels),
        "pretrained_spacing": None if pretrained_spacing is None else list(pretrained_spacing),
        "respect_pretrained_spacing": bool(respect_pretrained_spacing),
        "median_spacing": [float(v) for v in median],
        "base_spacing": [float(v) for v in base],
        "spacing_limit": cap,
        "typical_object_mm": None if typical is None else [float(v) for v in typical],
        "median_image_mm": [float(v) for v in image_mm],
        "dataset_voxels": voxels,
        "overridden": [k for k, v in _overrides(patch, spacing, batch_size, intensity) if v],
    }
    return Plan(
        spacing=spacing_t,
        patch=tuple(int(v) for v in p),
        batch_size=int(bs),
        intensity=modes,
        intensity_params=params,
        field_of_view_mm=tuple(float(v) for v in fov),
        wanted_field_of_view_mm=tuple(float(v) for v in wanted),
        memory_bytes=int(memory),
        memory_budget_bytes=budget,
        reasons=reasons,
        warnings=warnings,
        settings=settings,
    )


def _overrides(patch: Any, spacing: Any, batch_size: Any, intensity: Any) -> list[tuple[str, bool]]:
    return [
        ("patch", patch is not None),
        ("spacing", spacing is not None),
        ("batch_size", batch_size is not None),
        ("intensity", intensity is not None),
    ]


def _plan_intensity(
    fp: dict[str, Any],
    modalities: list[str],
    pretrained: bool,
    override: Sequence[str] | None,
) -> tuple[list[str], list[dict[str, Any]], str]:
    """Rules 9 to 11: one intensity mode (and its parameters) per channel, with the reason."""
    n = len(modalities)
    stats = list(fp["intensity"])
    if override is not None:
        modes = [override] * n if isinstance(override, str) else [str(m) for m in override]
        if len(modes) == 1:
            modes = modes * n
        bad = [m for m in modes if m not in ALL_INTENSITY_MODES]
        if len(modes) != n or bad:
            raise PlanInputError(
                f"Expected --intensity of one mode, or one per channel ({n}), each in "
                f"{ALL_INTENSITY_MODES}. Received: {list(override)!r}"
            )
        params = []
        for c, m in enumerate(modes):
            if m == "ct_foreground" and stats[c] is None:
                raise PlanInputError(
                    f"Expected foreground intensities for 'ct_foreground' on channel {c}. "
                    "Received: no foreground voxel in any case"
                )
            params.append(_ct_params(stats[c]) if m == "ct_foreground" else {})
        return modes, params, f"set by {_FLAGS['intensity']}"
    modes, params, why = [], [], []
    for c, m in enumerate(modalities):
        if m == "ct" and pretrained:
            modes.append("ct")
            params.append({"window": list(CT_WINDOW)})
            why.append(
                f"CT from pre-trained weights: the window [{CT_WINDOW[0]:g}, {CT_WINDOW[1]:g}] HU "
                "-> [0, 1] the weights were pre-trained with, so the inputs match pre-training"
            )
        elif m == "ct" and stats[c] is not None:
            modes.append("ct_foreground")
            params.append(_ct_params(stats[c]))
            lo, hi = params[-1]["clip"]
            why.append(
                f"CT from scratch: clip to the foreground's 0.5-99.5 percentiles ({lo:.0f}, "
                f"{hi:.0f}), then z-score with its mean {params[-1]['mean']:.1f} and std "
                f"{params[-1]['std']:.1f}, the same for every case (nnU-Net's CT scheme)"
            )
        elif m == "ct":
            modes.append("ct")
            params.append({"window": list(CT_WINDOW)})
            why.append("CT without foreground intensities to measure: the fixed CT window")
        elif pretrained:
            modes.append("mri" if m == "mri" else "minmax")
            params.append({})
            why.append(
                f"{m} from pre-trained weights: the project's default mode, which maps to [0, 1] "
                "as the pre-training inputs were"
            )
        else:
            modes.append("zscore")
            params.append({})
            why.append(f"{m} from scratch: each case's own mean and standard deviation (z-score)")
    if n == 1:
        return modes, params, why[0]
    return modes, params, "; ".join(f"channel {c}: {w}" for c, w in enumerate(why))


def _ct_params(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "clip": [float(stats["percentile_00_5"]), float(stats["percentile_99_5"])],
        "mean": float(stats["mean"]),
        "std": float(stats["std"]),
    }


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------


def format_plan_table(plan: Plan) -> str:
    """The plan as a short table (value | planned | why), for the start of training.

    Args:
        plan: the plan.

    Returns:
        The table, lines joined by newlines; warnings follow it.
    """
    intensity = ", ".join(plan.intensity)
    rows = [
        ("spacing", _fmt(plan.spacing, 4) + " mm", plan.reasons.get("spacing", "")),
        ("patch", _fmt(plan.patch, 4), plan.reasons.get("patch", "")),
        ("field of view", _fmt_mm(plan.field_of_view_mm), plan.reasons.get("field_of_view", "")),
        ("batch size", str(plan.batch_size), plan.reasons.get("batch_size", "")),
        ("intensity", intensity, plan.reasons.get("intensity", "")),
        (
            "memory",
            f"{_fmt_bytes(plan.memory_bytes)} of {_fmt_bytes(plan.memory_budget_bytes)}",
            plan.reasons.get("memory", ""),
        ),
    ]
    header = ("value", "planned", "why")
    w0 = max(len(header[0]), *(len(r[0]) for r in rows))
    w1 = max(len(header[1]), *(len(r[1]) for r in rows))
    lines = [f"{header[0]:<{w0}} | {header[1]:<{w1}} | {header[2]}"]
    lines.append(f"{'-' * w0}-+-{'-' * w1}-+-{'-' * 3}")
    lines += [f"{a:<{w0}} | {b:<{w1}} | {c}" for a, b, c in rows]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path`, atomically (fingerprint.json, plan.json).

    Args:
        path: the file.
        obj: JSON-serialisable data (a `Plan` is written through its `to_dict`).
    """
    if isinstance(obj, Plan):
        obj = obj.to_dict()
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
