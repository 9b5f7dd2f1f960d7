"""Data augmentation for segmentation fine-tuning (NumPy and SciPy, no Keras).

Spatial: rotation, scaling, optional elastic deformation and mirroring. Intensity: Gaussian
noise, Gaussian blur, brightness, contrast, low-resolution simulation and gamma (with and
without inversion). The defaults follow nnU-Net's probabilities (`AugmentSettings`).

Every random transform has two halves: `draw_spatial` and `draw_intensity` draw the
parameters from an explicitly passed `np.random.Generator`, and pure functions apply them
(`sample_patch`, `augment_intensity` and the single transforms), so the same generator state
gives the same patch, and an augmentation can be replayed, printed and tested.

Spatial transforms resample the whole case volume, not a cut patch: for each voxel of the
output patch, `source_coordinates` gives the point of the volume it comes from (the patch
grid around `centre`, rotated and scaled, elastically displaced), and
`scipy.ndimage.map_coordinates` samples the image there (linear by default) and the label with
nearest-neighbour interpolation. A rotated patch therefore shows the volume's own voxels up to
its corners; only points outside the volume get the caller's fill (the label gets 0). Only the
block of the volume those points cover is read, so a memory-mapped volume stays on disk. When
no spatial transform is drawn, the patch is a plain slice of the volume.

Arrays: images (channels, X, Y, Z) or (X, Y, Z), floating point; labels (X, Y, Z) of integer
classes. Outputs keep the shape convention and dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# fmt: off
__all__ = [
    "AugmentInputError", "AugmentSettings", "ElasticParams", "SpatialParams", "IntensityParams",
    "draw_spatial", "draw_intensity", "augment_patch", "crop_padded",
    "rotation_matrix", "elastic_displacement", "source_coordinates", "sample_patch", "mirror",
    "augment_intensity", "add_gaussian_noise", "gaussian_blur", "adjust_brightness",
    "adjust_contrast", "simulate_low_resolution", "adjust_gamma",
]
# fmt: on

# Voxels read around the source points: linear and nearest interpolation need the next voxel;
# the cubic spline's prefilter depends on every voxel, with a weight that falls by 0.27 per
# voxel (the pole sqrt(3) - 2), so 10 more voxels keep the difference from filtering the
# whole volume below 1e-5 of the intensity range.
_MARGIN_LINEAR = 1
_MARGIN_SPLINE = 12
_EPS = 1e-7


class AugmentInputError(ValueError):
    """Bad augmentation settings or arrays."""


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> None:
    ok = (
        len(value) == 2
        and all(math.isfinite(v) for v in value)
        and low <= value[0] <= value[1] <= high
    )
    if not ok:
        raise AugmentInputError(
            f"Expected {name} as (low, high) with {low} <= low <= high <= {high}. "
            f"Received: {name}={value!r}"
        )


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """What augmentation draws, and how often. The defaults are nnU-Net's probabilities.

    Each `p_*` is the probability per patch (mirroring: per axis); 0 turns a transform off.
    `AugmentSettings.none()` turns everything off: the patch is then a plain crop.

    Attributes:
        p_rotation: rotate the patch grid; each rotated axis gets an angle drawn uniformly
            from +-`rotation_degrees`.
        rotation_degrees: the largest angle, in degrees.
        in_plane_axis: None rotates about all three axes; an axis (for anisotropic data,
            the one with the coarse spacing) restricts rotation to the plane of the other two,
            leaves that axis unscaled and undeformed, and blurs and lowers the resolution
            only within the planes (`AugmentSettings.anisotropic`).
        p_scale: scale the patch grid by one factor for all axes: half of the draws from
            [low, 1), half from [1, high]. Below 1 zooms in (structures look larger).
        scale_range: (low, high).
        p_elastic: displace the patch grid by a smooth random field (off by default: slow,
            and nnU-Net leaves it off).
        elastic_alpha: the field's strength range (uniform noise in [-1, 1] is smoothed,
            then multiplied by alpha; alpha 900 with sigma 11 moves points by about 1.5 voxels
            per axis on average, up to about 6).
        elastic_sigma: the smoothing's Gaussian sigma range, in voxels.
        p_mirror: flip each axis of `mirror_axes` with this probability.
        mirror_axes: the axes (0, 1, 2 for X, Y, Z) that may be flipped.
        image_order: spline order for the image when resampled: 1 (linear, the default of
            MONAI and TorchIO) or 3 (cubic, nnU-Net's; about 5 times slower). Labels are
            always nearest-neighbour.
        p_noise: add Gaussian noise, variance drawn uniformly from `noise_variance`.
        noise_variance: (low, high).
        p_blur: blur with a Gaussian; each channel with probability `p_per_channel`, each
            axis's sigma drawn from `blur_sigma`.
        blur_sigma: (low, high), in voxels.
        p_brightness: multiply each channel by a factor drawn from `brightness_range`.
        brightness_range: (low, high).
        p_contrast: scale each channel about its mean by a factor (half of the draws below 1,
            half above), then clip to the channel's former range.
        contrast_range: (low, high).
        p_low_res: down-sample each channel (probability `p_per_channel`) by a zoom drawn
            from `low_res_zoom` with nearest neighbours, then up-sample it back linearly.
        low_res_zoom: (low, high) with 0 < low <= high <= 1.
        p_gamma_inverted: gamma on the inverted intensities (`adjust_gamma(invert=True)`).
        p_gamma: gamma on the intensities. Gamma is drawn from `gamma_range`, half of the
            draws below 1, half above; the patch keeps its mean and standard deviation.
        gamma_range: (low, high).
        p_per_channel: for blur and low resolution, the chance each channel is changed.
    """

    p_rotation: float = 0.2
    rotation_degrees: float = 30.0
    in_plane_axis: int | None = None
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_elastic: float = 0.0
    elastic_alpha: tuple[float, float] = (0.0, 900.0)
    elastic_sigma: tuple[float, float] = (9.0, 13.0)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    image_order: int = 1
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_low_res: float = 0.25
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_per_channel: float = 0.5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.startswith("p_"):
                p = getattr(self, f.name)
                if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                    raise AugmentInputError(
                        f"Expected {f.name} as a probability in [0, 1]. Received: {f.name}={p!r}"
                    )
        if not (math.isfinite(self.rotation_degrees) and 0 <= self.rotation_degrees <= 180):
            raise AugmentInputError(
                "Expected rotation_degrees in [0, 180]. "
                f"Received: rotation_degrees={self.rotation_degrees!r}"
            )
        if self.in_plane_axis not in (None, 0, 1, 2):
            raise AugmentInputError(
                f"Expected in_plane_axis None, 0, 1 or 2. Received: in_plane_axis="
                f"{self.in_plane_axis!r}"
            )
        if not set(self.mirror_axes) <= {0, 1, 2}:
            raise AugmentInputError(
                f"Expected mirror_axes among 0, 1, 2. Received: mirror_axes={self.mirror_axes!r}"
            )
        if self.image_order not in (0, 1, 2, 3, 4, 5):
            raise AugmentInputError(
                f"Expected image_order 0 to 5. Received: image_order={self.image_order!r}"
            )
        _check_range("scale_range", self.scale_range, _EPS, math.inf)
        _check_range("elastic_alpha", self.elastic_alpha, 0.0, math.inf)
        _check_range("elastic_sigma", self.elastic_sigma, _EPS, math.inf)
        _check_range("noise_variance", self.noise_variance, 0.0, math.inf)
        _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf)
        _check_range("brightness_range", self.brightness_range, 0.0, math.inf)
        _check_range("contrast_range", self.contrast_range, 0.0, math.inf)
        _check_range("low_res_zoom", self.low_res_zoom, _EPS, 1.0)
        _check_range("gamma_range", self.gamma_range, _EPS, math.inf)

    @classmethod
    def none(cls) -> AugmentSettings:
        """Every probability 0: `augment_patch` returns the plain crop."""
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name.startswith("p_")})

    @classmethod
    def anisotropic(cls, axis: int = 2, degrees: float = 180.0, **changes) -> AugmentSettings:
        """nnU-Net's choice for anisotropic data (coarse spacing along `axis`): rotation in
        the plane of the other two axes only, by up to +-`degrees`; the rest as `changes` say."""
        return cls(in_plane_axis=axis, rotation_degrees=degrees, **changes)


@dataclasses.dataclass(frozen=True)
class ElasticParams:
    """A drawn elastic deformation: `elastic_displacement` rebuilds the field from these."""

    alpha: float
    sigma: float
    seed: int
    axes: tuple[int, ...] = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class SpatialParams:
    """A drawn spatial transform. The defaults are the identity.

    Attributes:
        angles: rotation about the X, Y and Z axes, in radians (`rotation_matrix`).
        scale: per-axis factor on the patch grid (below 1 zooms in).
        elastic: the deformation, or None.
        mirror: which axes of the patch are flipped.
    """

    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    elastic: ElasticParams | None = None
    mirror: tuple[bool, bool, bool] = (False, False, False)

    @property
    def moves_grid(self) -> bool:
        """Whether the patch grid is rotated, scaled or deformed (else a crop will do)."""
        return (
            any(a != 0.0 for a in self.angles)
            or any(s != 1.0 for s in self.scale)
            or self.elastic is not None
        )


@dataclasses.dataclass(frozen=True)
class IntensityParams:
    """A drawn intensity augmentation, applied in this order by `augment_intensity`.

    Per-channel entries are tuples with one item per channel; None (or an empty tuple) leaves
    the channel alone.

    Attributes:
        noise_std: standard deviation of the added noise (0: none), all channels.
        noise_seed: the seed of the noise (`add_gaussian_noise`).
        blur_sigma: per channel, (sx, sy, sz) or None.
        brightness: per channel, the factor or None.
        contrast: per channel, the factor or None.
        low_res_zoom: per channel, (zx, zy, zz) or None.
        gamma_inverted: per channel, gamma on the inverted intensities, or None.
        gamma: per channel, gamma, or None.
    """

    noise_std: float = 0.0
    noise_seed: int = 0
    blur_sigma: tuple[tuple[float, float, float] | None, ...] = ()
    brightness: tuple[float | None, ...] = ()
    contrast: tuple[float | None, ...] = ()
    low_res_zoom: tuple[tuple[float, float, float] | None, ...] = ()
    gamma_inverted: tuple[float | None, ...] = ()
    gamma: tuple[float | None, ...] = ()


# ------------------------------------------------------------------------------------------
# Drawing the parameters
# ------------------------------------------------------------------------------------------


def _chance(rng: np.random.Generator, p: float) -> bool:
    # A probability of 0 draws nothing, so turning augmentation off leaves the caller's
    # random stream (and so every other choice of a seeded sampler) as it was.
    return p > 0.0 and bool(rng.random() < p)


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _around_one(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    """A factor from (low, high): half of the draws below 1, half above, when 1 lies inside."""
    low, high = bounds
    if low < 1.0 < high and rng.random() < 0.5:
        return float(rng.uniform(low, 1.0))
    if low < 1.0 < high:
        return float(rng.uniform(1.0, high))
    return float(rng.uniform(low, high))


def _plane_axes(settings: AugmentSettings) -> tuple[int, ...]:
    return tuple(a for a in range(3) if a != settings.in_plane_axis)


def draw_spatial(settings: AugmentSettings, rng: np.random.Generator) -> SpatialParams:
    """Draw a spatial transform: rotation, scale, elastic field, mirroring, in that order.

    Args:
        settings: the probabilities and ranges.
        rng: the generator every choice is drawn from.

    Returns:
        The parameters (the identity when nothing is drawn).
    """
    angles = [0.0, 0.0, 0.0]
    if _chance(rng, settings.p_rotation):
        limit = math.radians(settings.rotation_degrees)
        about = (0, 1, 2) if settings.in_plane_axis is None else (settings.in_plane_axis,)
        for a in about:
            angles[a] = float(rng.uniform(-limit, limit))
    scale = [1.0, 1.0, 1.0]
    if _chance(rng, settings.p_scale):
        factor = _around_one(rng, settings.scale_range)
        for a in _plane_axes(settings):
            scale[a] = factor
    elastic = None
    if _chance(rng, settings.p_elastic):
        elastic = ElasticParams(
            alpha=_uniform(rng, settings.elastic_alpha),
            sigma=_uniform(rng, settings.elastic_sigma),
            seed=int(rng.integers(2**63)),
            axes=_plane_axes(settings),
        )
    flips = tuple(a in settings.mirror_axes and _chance(rng, settings.p_mirror) for a in range(3))
    return SpatialParams(tuple(angles), tuple(scale), elastic, flips)


def draw_intensity(
    settings: AugmentSettings, n_channels: int, rng: np.random.Generator
) -> IntensityParams:
    """Draw an intensity augmentation for an image of `n_channels` channels.

    Order (nnU-Net's): noise, blur, brightness, contrast, low resolution, inverted gamma,
    gamma.

    Args:
        settings: the probabilities and ranges.
        n_channels: the image's channels.
        rng: the generator every choice is drawn from.

    Returns:
        The parameters (the identity when nothing is drawn).
    """
    n = int(n_channels)
    planes = _plane_axes(settings)
    noise_std, noise_seed = 0.0, 0
    if _chance(rng, settings.p_noise):
        noise_std = math.sqrt(_uniform(rng, settings.noise_variance))
        noise_seed = int(rng.integers(2**63))

    def per_channel(p: float, draw, p_channel: float = 1.0) -> tuple:
        if not _chance(rng, p):
            return ()
        return tuple(draw() if _chance(rng, p_channel) else None for _ in range(n))

    def sigmas() -> tuple[float, float, float]:
        return tuple(_uniform(rng, settings.blur_sigma) if a in planes else 0.0 for a in range(3))

    def zooms() -> tuple[float, float, float]:
        z = _uniform(rng, settings.low_res_zoom)
        return tuple(z if a in planes else 1.0 for a in range(3))

    return IntensityParams(
        noise_std=noise_std,
        noise_seed=noise_seed,
        blur_sigma=per_channel(settings.p_blur, sigmas, settings.p_per_channel),
        brightness=per_channel(
            settings.p_brightness, lambda: _uniform(rng, settings.brightness_range)
        ),
        contrast=per_channel(
            settings.p_contrast, lambda: _around_one(rng, settings.contrast_range)
        ),
        low_res_zoom=per_channel(settings.p_low_res, zooms, settings.p_per_channel),
        gamma_inverted=per_channel(
            settings.p_gamma_inverted, lambda: _around_one(rng, settings.gamma_range)
        ),
        gamma=per_channel(settings.p_gamma, lambda: _around_one(rng, settings.gamma_range)),
    )


def augment_patch(
    image: np.ndarray,
    label: np.ndarray | None,
    centre: Sequence[float],
    patch: Sequence[int],
    settings: AugmentSettings,
    rng: np.random.Generator,
    image_fill: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw and apply a spatial and an intensity augmentation: one training patch.

    Args:
        image: the whole case, (channels, X, Y, Z) or (X, Y, Z), e.g. memory-mapped.
        label: (X, Y, Z) integer classes, or None.
        centre: the voxel of the volume at the patch's voxel `patch // 2`; for a patch
            that would start at `start`, pass `start + patch // 2`.
        patch: (R, C, D).
        settings: what to draw (`AugmentSettings.none()`: the plain crop).
        rng: the generator; spatial parameters are drawn first, then intensity ones.
        image_fill: the image's value outside the volume (the label's is 0).

    Returns:
        (image patch, label patch) in the inputs' layouts and dtypes.
    """
    spatial = draw_spatial(settings, rng)
    n_channels = image.shape[0] if image.ndim == 4 else 1
    intensity = draw_intensity(settings, n_channels, rng)
    out, lab = sample_patch(image, label, centre, patch, spatial, image_fill, settings.image_order)
    return augment_intensity(out, intensity), lab


# ------------------------------------------------------------------------------------------
# Spatial transforms
# ------------------------------------------------------------------------------------------


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """The rotation by `angles` (radians) about the X, then the Y, then the Z axis.

    Returns Rz @ Ry @ Rx, each a right-handed rotation (Rx turns +Y towards +Z).
    """
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def elastic_displacement(params: ElasticParams, patch: Sequence[int]) -> np.ndarray:
    """The elastic field on the patch grid, (3, R, C, D) float64, in voxels.

    Uniform noise in [-1, 1] from `default_rng(params.seed)` for each axis of `params.axes`
    (the other axes do not move), smoothed by a Gaussian of `params.sigma` (zero outside the
    patch), times `params.alpha`.
    """
    noise_rng = np.random.default_rng(params.seed)
    field = np.zeros((3, *patch))
    for a in params.axes:
        noise = noise_rng.uniform(-1.0, 1.0, tuple(patch))
        field[a] = ndimage.gaussian_filter(noise, params.sigma, mode="constant") * params.alpha
    return field


def source_coordinates(
    centre: Sequence[float], patch: Sequence[int], params: SpatialParams
) -> np.ndarray:
    """Where each voxel of the output patch comes from in the volume: (3, R, C, D) float64.

    Output voxel i (per axis) sits at offset o = i - patch // 2 from the patch's centre voxel;
    elastic displacement is added to o, then o is scaled and rotated:
    ``source = centre + rotation_matrix(angles) @ (scale * (o + displacement))``.
    Mirroring is not part of it (`sample_patch` flips the patch afterwards).
    """
    patch = tuple(int(p) for p in patch)
    offsets = [np.arange(p, dtype=np.float64) - p // 2 for p in patch]
    shapes = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    grid = [offsets[a].reshape(shapes[a]) for a in range(3)]
    if params.elastic is not None:
        field = elastic_displacement(params.elastic, patch)
        grid = [grid[a] + field[a] for a in range(3)]
    m = rotation_matrix(params.angles) * np.asarray(params.scale, dtype=np.float64)[None, :]
    coords = np.empty((3, *patch))
    for i in range(3):
        # Rows of the matrix times the (broadcast) offsets: no full grid built unless elastic.
        coords[i] = float(centre[i]) + m[i, 0] * grid[0] + m[i, 1] * grid[1] + m[i, 2] * grid[2]
    return coords


def crop_padded(
    array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0
) -> np.ndarray:
    """The block of `array`'s last three axes from `start` of `size`; outside it, `fill`.

    Args:
        array: (..., X, Y, Z), e.g. a memory-mapped volume.
        start: the first voxel (may be negative or run past the end: padded).
        size: the block's (R, C, D).
        fill: the value outside the volume.

    Returns:
        A new array (..., R, C, D) of `array`'s dtype.
    """
    out = np.full(array.shape[:-3] + tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, total in zip(start, size, array.shape[-3:], strict=True):
        lo, hi = max(0, s), min(total, s + n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def _resample(
    array: np.ndarray, coords: np.ndarray, order: int, fill: float, dtype: np.dtype
) -> np.ndarray:
    """`array` (..., X, Y, Z) sampled at `coords` (3, R, C, D), through the block they cover.

    A point outside [0, n - 1] on any axis gets `fill` (map_coordinates' "constant" mode), the
    same for a block as for the whole volume: the block reaches the volume's edge wherever a
    point lies beyond it.
    """
    size = array.shape[-3:]
    margin = _MARGIN_LINEAR if order <= 1 else _MARGIN_SPLINE
    flat = coords.reshape(3, -1)
    lo = [max(0, int(math.floor(v)) - margin) for v in flat.min(axis=1)]
    hi = [
        min(n, int(math.floor(v)) + margin + 2) for n, v in zip(size, flat.max(axis=1), strict=True)
    ]
    lead = array.shape[:-3]
    out = np.full((*lead, *coords.shape[1:]), fill, dtype=dtype)
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return out  # every point lies outside the volume
    block = np.asarray(array[(Ellipsis, *(slice(a, b) for a, b in zip(lo, hi, strict=True)))])
    local = coords - np.asarray(lo, dtype=np.float64).reshape(3, 1, 1, 1)
    flat_block = block.reshape(-1, *block.shape[-3:])
    flat_out = out.reshape(-1, *coords.shape[1:])
    for c in range(flat_block.shape[0]):
        ndimage.map_coordinates(
            flat_block[c], local, output=flat_out[c], order=order, mode="constant", cval=fill
        )
    return out


def _check_sample_inputs(image, label, centre, patch) -> tuple[int, int, int]:
    if image.ndim not in (3, 4):
        raise AugmentInputError(
            f"Expected an image (channels, X, Y, Z) or (X, Y, Z). Received: shape {image.shape}"
        )
    if label is not None and tuple(label.shape) != tuple(image.shape[-3:]):
        raise AugmentInputError(
            f"Expected a label of the image's size {tuple(image.shape[-3:])}. "
            f"Received: label shape {tuple(label.shape)}"
        )
    if label is not None and not np.issubdtype(label.dtype, np.integer):
        raise AugmentInputError(f"Expected integer labels. Received: dtype {label.dtype}")
    if len(patch) != 3 or any(int(p) != p or p < 1 for p in patch):
        raise AugmentInputError(f"Expected patch as 3 positive sizes. Received: patch={patch!r}")
    if len(centre) != 3 or not all(math.isfinite(float(c)) for c in centre):
        raise AugmentInputError(f"Expected centre as 3 finite numbers. Received: centre={centre!r}")
    return tuple(int(p) for p in patch)


def sample_patch(
    image: np.ndarray,
    label: np.ndarray | None,
    centre: Sequence[float],
    patch: Sequence[int],
    params: SpatialParams,
    image_fill: float = 0.0,
    order: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The patch around `centre`, resampled from the whole volume by `params`, then mirrored.

    With no rotation, scale or elastic field and an integer `centre`, the patch is the plain
    crop starting at ``centre - patch // 2`` (padded with the fills outside the volume);
    otherwise `map_coordinates` samples the volume at `source_coordinates` (image: spline of
    `order`; label: nearest voxel), and points outside the volume get the fills.

    Args:
        image: (channels, X, Y, Z) or (X, Y, Z), floating point (e.g. memory-mapped).
        label: (X, Y, Z) integer classes, or None.
        centre: the voxel of the volume at the patch's voxel `patch // 2`.
        patch: (R, C, D).
        params: the spatial transform (`draw_spatial`).
        image_fill: the image's value outside the volume; the label's is 0.
        order: the image's spline order (0 to 5).

    Returns:
        (image patch, label patch or None), new arrays in the inputs' dtypes (an integer image
        comes out float32).
    """
    patch = _check_sample_inputs(image, label, centre, patch)
    dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.dtype(np.float32)
    if not params.moves_grid and all(float(c).is_integer() for c in centre):
        start = [int(c) - p // 2 for c, p in zip(centre, patch, strict=True)]
        out = crop_padded(image, start, patch, image_fill).astype(dtype, copy=False)
        lab = None if label is None else crop_padded(label, start, patch, 0)
    else:
        coords = source_coordinates(centre, patch, params)
        out = _resample(image, coords, order, image_fill, dtype)
        lab = None if label is None else _resample(label, coords, 0, 0, label.dtype)
    flip = [a for a in range(3) if params.mirror[a]]
    out = mirror(out, flip)
    lab = None if lab is None else mirror(lab, flip)
    return out, lab


def mirror(x: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """`x` flipped along the given axes of its last three (0, 1, 2 for X, Y, Z), contiguous."""
    if not axes:
        return x
    return np.ascontiguousarray(np.flip(x, axis=tuple(x.ndim - 3 + a for a in axes)))


# ------------------------------------------------------------------------------------------
# Intensity transforms
# ------------------------------------------------------------------------------------------


def augment_intensity(patch: np.ndarray, params: IntensityParams) -> np.ndarray:
    """Apply `params` to an image patch, (channels, R, C, D) or (R, C, D): a new array, same
    dtype. Order: noise, blur, brightness, contrast, low resolution, inverted gamma, gamma."""
    out = np.array(patch, dtype=patch.dtype, copy=True)
    if params.noise_std > 0:
        out = add_gaussian_noise(out, params.noise_std, params.noise_seed)
    channels = out.reshape(-1, *out.shape[-3:])  # a view: channel edits land in `out`

    def each(values, fn) -> None:
        for c, value in enumerate(values):
            if value is not None:
                channels[c] = fn(channels[c], value)

    each(params.blur_sigma, gaussian_blur)
    each(params.brightness, adjust_brightness)
    each(params.contrast, adjust_contrast)
    each(params.low_res_zoom, simulate_low_resolution)
    each(params.gamma_inverted, lambda x, g: adjust_gamma(x, g, invert=True))
    each(params.gamma, adjust_gamma)
    return out


def add_gaussian_noise(x: np.ndarray, std: float, seed: int) -> np.ndarray:
    """`x` plus noise of standard deviation `std` from `default_rng(seed)`, in `x`'s dtype."""
    noise = np.random.default_rng(seed).standard_normal(x.shape, dtype=np.float32)
    return (x + noise * np.float32(std)).astype(x.dtype, copy=False)


def gaussian_blur(x: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """`x` (X, Y, Z) blurred by a Gaussian of per-axis `sigma` (0: that axis unblurred), the
    kernel cut at 4 sigma, edge voxels repeated beyond the border."""
    return ndimage.gaussian_filter(x, tuple(float(s) for s in sigma), mode="nearest", truncate=4.0)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
    """`x` times `factor`."""
    return (x * np.float32(factor)).astype(x.dtype, copy=False)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """`x` scaled about its mean by `factor`, then clipped to its former [min, max]."""
    mean = x.mean(dtype=np.float64)
    out = (x - mean) * factor + mean
    return np.clip(out, x.min(), x.max()).astype(x.dtype, copy=False)


def _resize_axis(x: np.ndarray, axis: int, size: int, linear: bool) -> np.ndarray:
    n = x.shape[axis]
    if n == size:
        return x
    # Voxel centres of the new grid, in the old grid's voxel coordinates.
    u = (np.arange(size) + 0.5) * (n / size) - 0.5
    if not linear:
        return np.take(x, np.clip(np.floor(u + 0.5), 0, n - 1).astype(np.intp), axis=axis)
    u = np.clip(u, 0, n - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1, 1, 1]
    shape[axis] = size
    w = (u - i0).reshape(shape)
    return np.take(x, i0, axis=axis) * (1 - w) + np.take(x, i1, axis=axis) * w


def simulate_low_resolution(x: np.ndarray, zoom: Sequence[float]) -> np.ndarray:
    """`x` (X, Y, Z) at a lower resolution: down-sampled to ``max(1, round(n * zoom))`` voxels
    per axis by nearest neighbours, then up-sampled back to n by linear interpolation (voxel
    centres aligned, edges held)."""
    small = x
    for a in range(3):
        m = max(1, int(round(x.shape[a] * float(zoom[a]))))
        small = _resize_axis(small, a, m, linear=False)
    out = small
    for a in range(3):
        out = _resize_axis(out, a, x.shape[a], linear=True)
    return out.astype(x.dtype, copy=False)


def adjust_gamma(x: np.ndarray, gamma: float, invert: bool = False) -> np.ndarray:
    """Gamma on `x` (inverted first when `invert`), keeping its mean and standard deviation.

    The intensities are mapped to [0, 1] by the patch's min and max, raised to `gamma`,
    mapped back, then shifted and scaled to the former mean and standard deviation. With
    `invert`, the same is done to -x and the result negated (gamma acts on the bright end).
    """
    v = -x.astype(np.float64) if invert else x.astype(np.float64)
    mean, std = v.mean(), v.std()
    low, span = v.min(), v.max() - v.min()
    out = ((v - low) / max(span, _EPS)) ** gamma * span + low
    out = (out - out.mean()) / max(out.std(), _EPS) * std + mean
    return (-out if invert else out).astype(x.dtype, copy=False)
