"""Models Genesis image transforms and the training-pair generator (NumPy, no Keras).

Models Genesis (Zhou et al., "Models Genesis", MedIA 2021; MICCAI 2019) pre-trains a 3D U-Net to
restore CT cubes from corrupted copies. This module is the corruption, in the paper's order: the
flip augmentation, local pixel shuffling, the non-linear intensity transformation (a Bezier
curve), in-painting and out-painting; then `generate_pair`, which chains them into (input,
target) batches, and the sample-picture writer. Names, arguments and defaults are the original's;
docs/transforms.md describes the transforms, their parameters and the voxels each changes.

Each transform is two halves: `draw_*_params(..., rng=)` draws its parameters from an explicit
`np.random.Generator` (`rng`; None means a fresh, unseeded one), and `apply_*(x, params)` applies
them without drawing, so a corruption can be replayed, inspected and tested against a plain loop.
The original-style functions (`data_augmentation`, `local_pixel_shuffling`, ...) draw, then apply.
Cubes are `(1, R, C, D)` float32/float64 arrays with values in [0, 1]; outputs keep the dtype.
The inner loops run in numba kernels (genesis_kernels.py) that equal the plain NumPy definitions
bit for bit. preview_transforms.py draws a picture of the transforms.

Imports: numpy, the standard library, genesis_kernels, genesis_files; PIL lazily (sample PNGs).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import string
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import genesis_kernels
from genesis_files import SAMPLE_DEFAULTS, TRANSFORM_RATES, atomic_path

# Part of this module's API as well: the out-painting noise, and the fast np.interp.
from genesis_kernels import fast_interp, uniform_fill

# fmt: off
__all__ = [
    # the method's numbers and the config defaults
    "NONLINEAR_NTIMES", "LOCAL_SHUFFLE_BLOCKS", "PAINT_CONTINUE_PROB", "CONFIG_DEFAULTS",
    "RATE_NAMES", "SAMPLE_PNG_PROB",
    # flip
    "draw_flip_params", "apply_flip", "data_augmentation",
    # local pixel shuffling
    "LocalShuffleParams", "draw_local_shuffle_params", "local_shuffle_plan",
    "apply_local_pixel_shuffling", "local_pixel_shuffling",
    # non-linear intensity transformation
    "bezier_curve", "NonlinearParams", "draw_nonlinear_params", "nonlinear_knots",
    "apply_nonlinear_transformation", "nonlinear_transformation",
    # in-painting and out-painting
    "PaintParams", "uniform_fill", "draw_in_painting_params", "apply_in_painting",
    "image_in_painting", "draw_out_painting_params", "apply_out_painting", "image_out_painting",
    # training pairs, sample pictures, cube files
    "corrupt_into", "make_batch", "generate_pair", "config_value", "check_config",
    "check_batch_size", "pair_sample_image", "maybe_save_sample", "load_cubes",
    # checks and utilities
    "check_prob", "check_values", "check_cube", "fast_interp",
]
# fmt: on

# Numbers of the original method (docs/transforms.md).
NONLINEAR_NTIMES = 100_000  # points on the Bezier curve of the intensity mapping
LOCAL_SHUFFLE_BLOCKS = 10_000  # blocks shuffled per cube
PAINT_CONTINUE_PROB = 0.95  # in/out-painting: probability of drawing one more block

# Pre-training rates and sample-PNG settings of the original config, used when a duck-typed
# config lacks an attribute.
CONFIG_DEFAULTS = {**TRANSFORM_RATES, **SAMPLE_DEFAULTS}
# The six rates, in the order above: flip_rate, local_rate, ..., inpaint_rate.
RATE_NAMES = tuple(name for name in CONFIG_DEFAULTS if name.endswith("_rate"))
SAMPLE_PNG_PROB = 0.01  # "about one batch in 100" writes a sample picture


# Flip (data_augmentation) ------------------------------------------------------------------------
def draw_flip_params(
    prob: float = 0.5, *, rng: np.random.Generator | None = None
) -> tuple[int, ...]:
    """Draw the flips of `data_augmentation`: up to 3 times, while random() < prob, an axis.

    Args:
        prob: probability of each (further) flip.

    Returns:
        The axes to flip, in order; each uniform on {0, 1, 2} of the (1, R, C, D) array
        (axis 0 is the channel, so those flips do nothing: the original's behaviour).
    """
    prob = check_prob(prob, "prob")
    rng = _rng(rng)
    axes = []
    for _ in range(3):
        if not rng.random() < prob:
            break
        axes.append(int(rng.integers(0, 3)))
    return tuple(axes)


def apply_flip(x: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Flip `x` (a cube (1, R, C, D)) along each axis of `axes` (from draw_flip_params) in turn.

    Returns:
        A flipped view of `x`, which is not modified (`x` itself when axes is empty).
    """
    for a in axes:
        x = np.flip(x, axis=a)
    return x


def data_augmentation(
    x: np.ndarray, y: np.ndarray, prob: float = 0.5, *, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Flip input and target together (up to 3 flips, each while random() < prob).

    Not in place: returns flipped views of `x` and `y`, which are left unchanged.

    Args:
        x, y: cubes of the same shape (1, R, C, D).
        prob: probability of each flip.

    Returns:
        (x, y) flipped along the same drawn axes.
    """
    check_cube(x, "x")
    check_cube(y, "y")
    if x.shape != y.shape:
        raise ValueError(
            f"Expected x and y of the same shape. Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    axes = draw_flip_params(prob, rng=rng)
    return apply_flip(x, axes), apply_flip(y, axes)


# Local pixel shuffling ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalShuffleParams:
    """One local shuffle: its blocks and permutations come from `seed` (see local_shuffle_plan)."""

    shape: tuple[int, int, int]
    seed: int
    n_blocks: int = LOCAL_SHUFFLE_BLOCKS


def draw_local_shuffle_params(
    shape: Sequence[int],
    prob: float = 0.5,
    *,
    rng: np.random.Generator | None = None,
    n_blocks: int = LOCAL_SHUFFLE_BLOCKS,
) -> LocalShuffleParams | None:
    """Draw a local shuffle for a cube of `shape` (..., R, C, D); None (skip) with 1 - prob.

    The blocks and their permutations are a stream of the one seed drawn (local_shuffle_plan).

    Args:
        shape: cube shape; the last three entries are (R, C, D), each >= 10.
        prob: probability of shuffling.
        n_blocks: number of blocks (the original's 10,000).

    Returns:
        LocalShuffleParams, or None when the cube is left alone.
    """
    prob = check_prob(prob, "prob")
    rng = _rng(rng)
    _spatial(shape)
    if not rng.random() < prob:
        return None
    # Checked after the coin, like the original (it failed only when it shuffled).
    R, C, D = _spatial(shape)
    if min(R, C, D) < 10:
        raise ValueError(
            f"Expected every cube dimension >= 10 for local_pixel_shuffling (block sizes are "
            f"randint(1, dim // 10)). Received: (R, C, D)={(R, C, D)}"
        )
    seed = int(rng.integers(0, 2**63, dtype=np.uint64))
    return LocalShuffleParams((R, C, D), seed, int(n_blocks))


def local_shuffle_plan(params: LocalShuffleParams) -> tuple[np.ndarray, np.ndarray]:
    """Write out the blocks and permutations a LocalShuffleParams stands for.

    Returns:
        blocks: int64 (n_blocks, 6) rows (nx, ny, nz, bx, by, bz); block k covers
        [nx:nx+bx, ny:ny+by, nz:nz+bz] (sizes randint(1, dim//10), corners randint(0, dim-b)).
        perms: int64 (n_blocks, max block voxels); row k's first bx*by*bz entries are the
        permutation p with shuffled_block.ravel() = original_block.ravel()[p].
    """
    return genesis_kernels.shuffle_plan(tuple(params.shape), params.n_blocks, params.seed)


def apply_local_pixel_shuffling(
    x: np.ndarray, params: LocalShuffleParams | None, out: np.ndarray | None = None
) -> np.ndarray:
    """Apply a drawn local shuffle to cube `x` (1, R, C, D); draws nothing.

    Not in place: returns a new array (or `out`, which must not share memory with `x`).
    Equals a loop over `local_shuffle_plan(params)`: each block read from the untouched `x`,
    permuted, written to the output, later blocks winning where they overlap.

    Args:
        x: cube (1, R, C, D) of the shape params was drawn for.
        params: from draw_local_shuffle_params; None returns a copy of x.
        out: optional output array of x's shape and dtype.

    Returns:
        The shuffled cube (`out` if given).
    """
    if out is None:
        out = np.empty(x.shape, x.dtype)  # a plain array even for a memmap x
    if np.may_share_memory(out, x):
        raise ValueError(
            "Expected out to be a separate array from x: shuffled blocks are read from the "
            "untouched input. Received: out sharing memory with x"
        )
    out[...] = x
    if params is None:
        return out
    if tuple(params.shape) != _spatial(x.shape):
        raise ValueError(
            f"Expected params drawn for shape {params.shape}. Received: x.shape={x.shape}"
        )
    orig = np.ascontiguousarray(x[0])
    if out[0].flags.c_contiguous:
        genesis_kernels.shuffle_blocks(orig, out[0], params.n_blocks, params.seed)
    else:  # the kernel works on flat views: go through a contiguous copy
        dst = np.ascontiguousarray(out[0])
        genesis_kernels.shuffle_blocks(orig, dst, params.n_blocks, params.seed)
        out[0] = dst
    return out


def local_pixel_shuffling(
    x: np.ndarray, prob: float = 0.5, *, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Shuffle the voxels inside 10,000 small random blocks, with probability `prob`.

    Not in place (like the original): returns a new array; `x` is unchanged. On a
    64x64x32 cube of distinct values a shuffle changes 78.5% of the voxels on average (82%
    lie in at least one block; a block can leave a voxel where it was).

    Args:
        x: cube (1, R, C, D), values in [0, 1], every dimension >= 10.
        prob: probability of shuffling (else x is returned unchanged, as a copy).

    Returns:
        The shuffled cube, same shape and dtype.
    """
    check_cube(x)
    params = draw_local_shuffle_params(x.shape, prob, rng=rng)
    return apply_local_pixel_shuffling(x, params)


# Non-linear intensity transformation (Bezier curve) ----------------------------------------------
def bezier_curve(points: Any, nTimes: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Bezier curve through control points, indexed like the original (t=0 gives the last point).

    Args:
        points: sequence of (x, y) control points, shape (n+1, 2).
        nTimes: number of samples of t in linspace(0, 1, nTimes).

    Returns:
        (xvals, yvals): float64 arrays of length nTimes, with
        xvals = sum_i points[i][0] * comb(n, i) * t**(n-i) * (1-t)**i (likewise yvals).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
        raise ValueError(
            f"Expected points of shape (n+1, 2) with n >= 1. Received: points with shape "
            f"{pts.shape}"
        )
    if isinstance(nTimes, bool) or int(nTimes) != nTimes or nTimes < 2:
        raise ValueError(f"Expected nTimes to be an integer >= 2. Received: nTimes={nTimes!r}")
    return genesis_kernels.bezier_values(pts, int(nTimes))


@dataclass(frozen=True)
class NonlinearParams:
    """Control points [[0, 0], [p1, p2], [p3, p4], [1, 1]] and whether the mapping inverts."""

    points: tuple[tuple[float, float], ...]
    invert: bool


def draw_nonlinear_params(
    prob: float = 0.5, *, rng: np.random.Generator | None = None
) -> NonlinearParams | None:
    """Draw a non-linear mapping; None (skip) with probability 1 - prob.

    p1..p4 are four random() draws in order; the mapping inverts intensities when a fifth
    random() < 0.5 (then only xvals are sorted).

    Args:
        prob: probability of transforming.

    Returns:
        NonlinearParams, or None when the cube is left alone.
    """
    prob = check_prob(prob, "prob")
    rng = _rng(rng)
    if not rng.random() < prob:
        return None
    p = rng.random(4)
    points = ((0.0, 0.0), (float(p[0]), float(p[1])), (float(p[2]), float(p[3])), (1.0, 1.0))
    return NonlinearParams(points, bool(rng.random() < 0.5))


def nonlinear_knots(
    params: NonlinearParams, nTimes: int = NONLINEAR_NTIMES
) -> tuple[np.ndarray, np.ndarray]:
    """The knots of a drawn non-linear mapping (the original's inversion rule).

    Args:
        params: from draw_nonlinear_params.
        nTimes: points on the Bezier curve (the original's 100,000).

    Returns:
        (xp, fp) float64 arrays of length nTimes, from xvals, yvals = bezier_curve(points,
        nTimes): xp = np.sort(xvals); fp = yvals if params.invert else np.sort(yvals).
    """
    xp = np.empty(nTimes + 1)  # one more: a sentinel the kernels use
    fp = np.empty(nTimes)
    points = np.asarray(params.points, dtype=np.float64)
    genesis_kernels.curve_knots_into(points, params.invert, nTimes, xp, fp)
    return xp[:nTimes], fp


def apply_nonlinear_transformation(
    x: np.ndarray, params: NonlinearParams | None, out: np.ndarray | None = None
) -> np.ndarray:
    """Map intensities through the drawn curve: equals np.interp(x, xp, fp) cast to x's dtype,
    with (xp, fp) = nonlinear_knots(params).

    Not in place unless `out` is `x` (allowed: the mapping is elementwise). Draws nothing.

    Args:
        x: cube (any shape), float32 or float64.
        params: from draw_nonlinear_params; None returns a copy of x (or x copied into out).
        out: optional C-contiguous output of x's shape and dtype (may be x).

    Returns:
        The mapped cube, x's shape and dtype (`out` if given).
    """
    xc = np.ascontiguousarray(x)
    if out is None:
        out = np.empty_like(xc)
    if out.shape != xc.shape or not out.flags.c_contiguous:
        raise ValueError(
            f"Expected out to be C-contiguous with shape {xc.shape}. Received: "
            f"out.shape={out.shape}"
        )
    if params is None:
        out[...] = xc
        return out
    points = np.asarray(params.points, dtype=np.float64)
    genesis_kernels.map_through_curve(
        xc.reshape(-1), points, bool(params.invert), NONLINEAR_NTIMES, out.reshape(-1)
    )
    return out


def nonlinear_transformation(
    x: np.ndarray, prob: float = 0.5, *, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Monotone Bezier intensity mapping (half of the time inverting), with probability `prob`.

    Not in place (like the original): returns a new array; `x` is unchanged.

    Args:
        x: cube (1, R, C, D), values in [0, 1].
        prob: probability of transforming.

    Returns:
        The mapped cube, same shape and dtype, values in [0, 1].
    """
    check_cube(x)
    return apply_nonlinear_transformation(x, draw_nonlinear_params(prob, rng=rng))


# In-painting and out-painting --------------------------------------------------------------------
@dataclass(frozen=True)
class PaintParams:
    """Blocks (rows nx, ny, nz, bx, by, bz) and the noise of a painting transform.

    In-painting: `noise[k]` is block k's fill, shape (bx, by, bz).
    Out-painting: `noise` is a single (R, C, D) fill; the blocks are restored from the input.
    """

    blocks: np.ndarray
    noise: Any


def _draw_inpaint_block(rng: np.random.Generator, R: int, C: int, D: int) -> tuple[int, ...]:
    # Size randint(dim // 6, dim // 3), corner at least 3 voxels from each border.
    bx = _randint(rng, R // 6, R // 3, f"in-painting along R={R}")
    by = _randint(rng, C // 6, C // 3, f"in-painting along C={C}")
    bz = _randint(rng, D // 6, D // 3, f"in-painting along D={D}")
    nx = _randint(rng, 3, R - bx - 3, f"in-painting along R={R}")
    ny = _randint(rng, 3, C - by - 3, f"in-painting along C={C}")
    nz = _randint(rng, 3, D - bz - 3, f"in-painting along D={D}")
    return nx, ny, nz, bx, by, bz


def _draw_outpaint_block(rng: np.random.Generator, R: int, C: int, D: int) -> tuple[int, ...]:
    # Size dim - randint(3 dim // 7, 4 dim // 7), corner at least 3 voxels from each border.
    bx = R - _randint(rng, 3 * R // 7, 4 * R // 7, f"out-painting along R={R}")
    by = C - _randint(rng, 3 * C // 7, 4 * C // 7, f"out-painting along C={C}")
    bz = D - _randint(rng, 3 * D // 7, 4 * D // 7, f"out-painting along D={D}")
    nx = _randint(rng, 3, R - bx - 3, f"out-painting along R={R}")
    ny = _randint(rng, 3, C - by - 3, f"out-painting along C={C}")
    nz = _randint(rng, 3, D - bz - 3, f"out-painting along D={D}")
    return nx, ny, nz, bx, by, bz


def draw_in_painting_params(
    shape: Sequence[int], *, rng: np.random.Generator | None = None, dtype: Any = np.float32
) -> PaintParams:
    """Draw in-painting: up to 5 times, while random() < 0.95, a block of size
    randint(dim // 6, dim // 3) at corner randint(3, dim - b - 3), and its uniform [0, 1) noise.

    Args:
        shape: cube shape; the last three entries are (R, C, D).
        dtype: float32 or float64, the noise's dtype (the cube's).

    Returns:
        PaintParams with 0 to 5 blocks and one noise array per block.
    """
    rng = _rng(rng)
    R, C, D = _spatial(shape)
    dtype = _noise_dtype(dtype)
    blocks, noise = [], []
    for _ in range(5):
        if not rng.random() < PAINT_CONTINUE_PROB:
            break
        blk = _draw_inpaint_block(rng, R, C, D)
        blocks.append(blk)
        noise.append(rng.random(blk[3:], dtype=dtype))
    return PaintParams(np.array(blocks, np.int64).reshape(-1, 6), tuple(noise))


def apply_in_painting(x: np.ndarray, params: PaintParams) -> np.ndarray:
    """Fill each drawn block of cube `x` (1, R, C, D) with its noise; draws nothing.

    IN PLACE, like the original in-painting.

    Args:
        x: writable cube (1, R, C, D).
        params: from draw_in_painting_params.

    Returns:
        x.
    """
    for (nx, ny, nz, bx, by, bz), n in zip(params.blocks, params.noise, strict=True):
        x[0, nx : nx + bx, ny : ny + by, nz : nz + bz] = n
    return x


def image_in_painting(x: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """Replace up to 5 random inner blocks with uniform noise.

    IN PLACE, like the original: `x` itself is modified and returned. On a 64x64x32 cube
    the noise covers 5.5% of the voxels on average.

    Args:
        x: cube (1, R, C, D), values in [0, 1].

    Returns:
        x.
    """
    check_cube(x)
    if not x.flags.writeable:
        raise ValueError(
            "Expected a writable cube: image_in_painting works in place, like the original. "
            "Received: a read-only array (pass a copy)"
        )
    return apply_in_painting(x, draw_in_painting_params(x.shape, rng=rng, dtype=x.dtype))


def draw_out_painting_params(
    shape: Sequence[int],
    *,
    rng: np.random.Generator | None = None,
    dtype: Any = np.float32,
    noise_out: np.ndarray | None = None,
) -> PaintParams:
    """Draw out-painting: noise for the whole cube, then one block of size
    dim - randint(3*dim//7, 4*dim//7) at corner randint(3, dim - b - 3), then up to 4 more
    while random() < 0.95.

    Args:
        shape: cube shape; the last three entries are (R, C, D).
        dtype: float32 or float64, the noise's dtype (the cube's).
        noise_out: optional (R, C, D) array of `dtype` that receives the noise.

    Returns:
        PaintParams with 1 to 5 blocks and the (R, C, D) noise.
    """
    rng = _rng(rng)
    R, C, D = _spatial(shape)
    dtype = _noise_dtype(dtype)
    if noise_out is None:
        noise_out = np.empty((R, C, D), dtype)
    elif noise_out.shape != (R, C, D) or noise_out.dtype != dtype:
        raise ValueError(
            f"Expected noise_out of shape {(R, C, D)} and dtype {dtype}. Received: "
            f"{noise_out.shape}, {noise_out.dtype}"
        )
    noise = uniform_fill(noise_out, rng)
    blocks = [_draw_outpaint_block(rng, R, C, D)]
    for _ in range(4):
        if not rng.random() < PAINT_CONTINUE_PROB:
            break
        blocks.append(_draw_outpaint_block(rng, R, C, D))
    return PaintParams(np.array(blocks, np.int64).reshape(-1, 6), noise)


def apply_out_painting(
    x: np.ndarray, params: PaintParams, out: np.ndarray | None = None
) -> np.ndarray:
    """Noise everywhere except the drawn blocks, which keep `x`'s values; draws nothing.

    Not in place: returns a new array (or `out`, which must not share memory with `x`).

    Args:
        x: cube (1, R, C, D).
        params: from draw_out_painting_params.
        out: optional output array of x's shape and dtype.

    Returns:
        The out-painted cube (`out` if given).
    """
    if out is None:
        out = np.empty(x.shape, x.dtype)  # a plain array even for a memmap x
    elif np.may_share_memory(out, x):
        raise ValueError(
            "Expected out to be a separate array from x. Received: out sharing memory with x"
        )
    out[0] = params.noise
    for nx, ny, nz, bx, by, bz in params.blocks:
        sl = (0, slice(nx, nx + bx), slice(ny, ny + by), slice(nz, nz + bz))
        out[sl] = x[sl]
    return out


def image_out_painting(x: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """Keep 1 to 5 random central blocks of the cube and fill the rest with uniform noise.

    Not in place (like the original): returns a new array; `x` is unchanged. On a
    64x64x32 cube the noise covers 68.2% of the voxels on average.

    Args:
        x: cube (1, R, C, D), values in [0, 1].

    Returns:
        The out-painted cube, same shape and dtype.
    """
    check_cube(x)
    return apply_out_painting(x, draw_out_painting_params(x.shape, rng=rng, dtype=x.dtype))


# Training pairs ----------------------------------------------------------------------------------
def corrupt_into(
    y: np.ndarray, x: np.ndarray, rates: dict[str, float], rng: np.random.Generator
) -> None:
    """Make one training pair in place, in the original's order of operations.

    On entry `y` (1, R, C, D) holds the target cube. Afterwards `y` is the (possibly
    flipped) target and `x` (same shape, separate memory) its corrupted input: flip (x and y
    together, flip_rate), local shuffle (local_rate), non-linear (nonlinear_rate), then with
    paint_rate: in-painting with inpaint_rate, else out-painting. Values are not re-checked.
    Both must be C-contiguous (as the cubes of a batch are).

    Args:
        y, x: the target cube, and where its corrupted input goes.
        rates: the six rates, as check_config returns them.
    """
    if not (y.flags.c_contiguous and x.flags.c_contiguous):
        raise ValueError("Expected C-contiguous cubes y and x. Received: a strided view")
    axes = draw_flip_params(rates["flip_rate"], rng=rng)
    # x receives a copy of the (flipped) target: flipping through x needs no temporary.
    if axes:
        x[...] = apply_flip(y, axes)
        y[...] = x
    else:
        x[...] = y
    shuffle = draw_local_shuffle_params(y.shape, rates["local_rate"], rng=rng)
    if shuffle is not None:  # as apply_local_pixel_shuffling(y, shuffle, out=x)
        genesis_kernels.shuffle_blocks(y[0], x[0], shuffle.n_blocks, shuffle.seed)
    mapping = draw_nonlinear_params(rates["nonlinear_rate"], rng=rng)
    if mapping is not None:
        apply_nonlinear_transformation(x, mapping, out=x)
    if rng.random() < rates["paint_rate"]:
        if rng.random() < rates["inpaint_rate"]:
            apply_in_painting(x, draw_in_painting_params(x.shape, rng=rng, dtype=x.dtype))
        else:
            # The noise goes into a reused scratch cube, then the kept blocks are copied
            # into it and it into x: as apply_out_painting, without fresh allocations.
            noise = genesis_kernels.scratch("noise_" + x.dtype.name, x.size, x.dtype)
            noise = noise.reshape(x.shape[1:])
            params = draw_out_painting_params(x.shape, rng=rng, dtype=x.dtype, noise_out=noise)
            for nx, ny, nz, bx, by, bz in params.blocks:
                sl = (slice(nx, nx + bx), slice(ny, ny + by), slice(nz, nz + bz))
                noise[sl] = x[0][sl]
            x[0] = noise


def make_batch(
    source: np.ndarray,
    index: Sequence[int],
    config: Any,
    rng: np.random.Generator,
    status: str = "test",
    what: str = "img",
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of pairs from the target cubes source[index]; "train" may write a sample PNG.

    Args:
        source: cubes (N, 1, R, C, D), e.g. memory-mapped; never modified.
        index, config, rng, status: the batch's cubes, and as in generate_pair.
        what: the name of `source` in error messages.

    Returns:
        (x, y) of source's dtype, shape (len(index), 1, R, C, D).
    """
    rates = check_config(config)
    shape = source.shape[1:]
    dtype = np.dtype(source.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"Expected float32 or float64 cubes. Received: {what}.dtype={dtype}")
    # x and y share one allocation: at >= 4 MB numpy asks for huge pages, which roughly
    # halves the page-fault cost of writing a fresh batch.
    buf = np.empty((2, len(index)) + tuple(shape), dtype)
    x, y = buf[0], buf[1]
    for k, i in enumerate(index):
        y[k] = source[i]
    check_values(y, f"{what}[{list(map(int, index))}]")
    for n in range(y.shape[0]):
        corrupt_into(y[n], x[n], rates, rng)
    maybe_save_sample(x, y, config, status, rng)
    return x, y


def generate_pair(
    img: np.ndarray,
    batch_size: int,
    config: Any,
    status: str = "test",
    *,
    rng: np.random.Generator | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless generator of (corrupted input, original) batches, as in the original.

    Args:
        img: cubes, shape (N, 1, R, C, D), float32/float64, values in [0, 1].
        batch_size: cubes per batch (distinct cubes, drawn at random for each batch).
        config: any object with the rates (flip_rate, local_rate, nonlinear_rate, paint_rate,
            outpaint_rate, inpaint_rate) and save_samples, exp_name, sample_path; missing
            attributes take the original defaults.
        status: "train" enables the sample PNGs (about one batch in 100).

    Yields:
        (x, y): new arrays (batch_size, 1, R, C, D) of img's dtype; `img` is never modified.
    """
    if not isinstance(img, np.ndarray) or img.ndim != 5 or img.shape[1] != 1:
        raise ValueError(
            f"Expected img of shape (N, 1, R, C, D). Received: img with shape "
            f"{getattr(img, 'shape', type(img).__name__)}"
        )
    check_config(config)
    batch_size = check_batch_size(batch_size, img.shape[0])
    rng = _rng(rng)
    check_values(img[0], "img[0]")  # fail at the start, not at an unlucky batch
    while True:
        index = rng.choice(img.shape[0], batch_size, replace=False)
        yield make_batch(img, index, config, rng, status, "img")


def config_value(config: Any, name: str) -> Any:
    """`config.name`, or the original's default when the (duck-typed) config lacks it."""
    return getattr(config, name, CONFIG_DEFAULTS[name])


def check_config(config: Any) -> dict[str, float]:
    """Return the six transform rates of `config`, raising ValueError unless each is in [0, 1]."""
    return {name: check_prob(config_value(config, name), f"config.{name}") for name in RATE_NAMES}


def check_batch_size(batch_size: Any, n_cubes: int, what: str = "img") -> int:
    """Check 1 <= batch_size <= n_cubes (the batch holds distinct cubes); return it as an int."""
    is_int = isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
    if not is_int or batch_size < 1:
        raise ValueError(
            f"Expected batch_size to be a positive integer. Received: batch_size={batch_size!r}"
        )
    if n_cubes < batch_size:
        raise ValueError(
            f"Expected at least batch_size={batch_size} cubes (a batch holds distinct cubes). "
            f"Received: {n_cubes} cubes in {what}"
        )
    return int(batch_size)


# Sample pictures of training pairs ---------------------------------------------------------------
def pair_sample_image(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The original's sample picture of one pair (1, R, C, D): four rows (depth slices at
    2/6, 3/6, 4/6, 5/6 of D), each the input slice beside the target slice; uint8 (4R, 2C)."""
    D = x.shape[-1]
    rows = [
        np.concatenate([x[0, :, :, k * D // 6], y[0, :, :, k * D // 6]], axis=1)
        for k in (2, 3, 4, 5)
    ]
    img = np.concatenate(rows, axis=0)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def maybe_save_sample(
    x: np.ndarray, y: np.ndarray, config: Any, status: str, rng: np.random.Generator
) -> str | None:
    """With status "train" and config.save_samples set, write a sample PNG of one pair of the
    batch (B, 1, R, C, D) with probability SAMPLE_PNG_PROB (0.01).

    The file is `{sample_path}/{exp_name}/{10 random letters and digits}.{save_samples}`,
    written through a temporary file and renamed, so a reader never sees half a picture.

    Args:
        x, y: the batch's inputs and targets, (B, 1, R, C, D).
        config, status, rng: as in generate_pair.

    Returns:
        The path written, or None.
    """
    fmt = config_value(config, "save_samples")
    if status != "train" or not fmt:
        return None
    if not rng.random() < SAMPLE_PNG_PROB:
        return None
    from PIL import Image  # only needed here; keeps importing this module light

    n = int(rng.integers(0, x.shape[0]))
    chars = string.ascii_letters + string.digits
    name = "".join(chars[int(i)] for i in rng.integers(0, len(chars), 10))
    folder = os.path.join(config_value(config, "sample_path"), config_value(config, "exp_name"))
    path = os.path.join(folder, f"{name}.{fmt}")
    fmt = str(fmt)
    os.makedirs(folder, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(pair_sample_image(x[n], y[n])).save(
            tmp, format="JPEG" if fmt.lower() == "jpg" else fmt.upper()
        )
    return path


# Cube files --------------------------------------------------------------------------------------
def load_cubes(path: str) -> np.ndarray:
    """Memory-map a cube file, read-only, without loading it.

    Args:
        path: `.npy` file of float32/float64 cubes (N, R, C, D) or (N, 1, R, C, D).

    Returns:
        A read-only np.memmap of shape (N, 1, R, C, D). Values are not checked here.
    """
    try:
        a = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"Expected a .npy file of cubes. Received: {path} ({e})") from None
    # Batches pick cubes at random: tell the kernel not to read ahead around each one, which
    # would fill the page cache (and the process' resident size) with cubes no batch asked for.
    mm = getattr(a, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        with contextlib.suppress(OSError):  # only a hint
            mm.madvise(mmap.MADV_RANDOM)
    if a.ndim == 4:
        a = a[:, None]
    if a.ndim != 5 or a.shape[1] != 1:
        raise ValueError(
            f"Expected cubes of shape (N, R, C, D) or (N, 1, R, C, D). Received: {path} with "
            f"shape {a.shape}"
        )
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"Expected float32 or float64 cubes. Received: {path} with dtype {a.dtype}"
        )
    return a


# Argument checks ---------------------------------------------------------------------------------
def check_prob(value: Any, name: str = "prob") -> float:
    """Return `value` as a float, raising ValueError unless it is a number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected {name} to be a number in [0, 1]. Received: {name}={value!r}"
        ) from None
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"Expected {name} to be in [0, 1]. Received: {name}={value!r}")
    return v


def check_values(a: np.ndarray, what: str = "x") -> None:
    """Raise ValueError unless every value of `a` is in [0, 1] (NaN fails too)."""
    if a.size == 0 or genesis_kernels.all_in_unit_range(a):
        return
    # The fast check failed or did not apply: min/max decide, and word the error.
    lo, hi = float(np.min(a)), float(np.max(a))
    # min/max propagate NaN, and NaN fails both comparisons.
    if not (lo >= 0.0 and hi <= 1.0):
        if np.isnan(lo) or np.isnan(hi):
            raise ValueError(
                f"Expected {what} to hold values in [0, 1] with no NaN. "
                f"Received: {what} contains NaN"
            )
        raise ValueError(
            f"Expected {what} to hold values in [0, 1] (CT scaled from HU). "
            f"Received: {what} with min={lo:g}, max={hi:g}"
        )


def check_cube(x: Any, name: str = "x", values: bool = True) -> np.ndarray:
    """Check that `x` is one cube of shape (1, R, C, D), float, values in [0, 1]; return it."""
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"Expected {name} to be a numpy array of shape (1, R, C, D). "
            f"Received: {name} of type {type(x).__name__}"
        )
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(
            f"Expected {name} to have shape (1, R, C, D) (one channel-first "
            f"cube). Received: {name}.shape={x.shape}"
        )
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"Expected {name} to be float32 or float64. Received: {name}.dtype={x.dtype}"
        )
    if values:
        check_values(x, name)
    return x


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"Expected rng to be a numpy.random.Generator or None. Received: "
            f"rng={rng!r} of type {type(rng).__name__}"
        )
    return rng


def _randint(rng: np.random.Generator, lo: int, hi: int, what: str) -> int:
    """Python's random.randint(lo, hi) (both ends inclusive) from a numpy Generator."""
    if lo > hi:
        raise ValueError(
            f"Expected a cube large enough for {what}: the range [{lo}, {hi}] "
            f"is empty. Received: a smaller cube"
        )
    return int(rng.integers(lo, hi + 1))


def _spatial(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise ValueError(f"Expected a cube shape ending in (R, C, D). Received: shape={shape}")
    r, c, d = (int(s) for s in shape[-3:])
    return r, c, d


def _noise_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"Expected dtype float32 or float64. Received: dtype={dtype}")
    return dtype


if __name__ == "__main__":
    # The preview picture lives in preview_transforms.py; this keeps old instructions working.
    import preview_transforms

    sys.exit(preview_transforms.main())
