"""Models Genesis image transforms and the training-pair generator (pure NumPy + numba).

The four corruptions of Models Genesis (plus the flip augmentation) and `generate_pair`, with
the original's names, arguments and defaults (SPEC.md section 2). Every function that draws
takes a keyword `rng` (an `np.random.Generator`; None means a fresh, unseeded one).

Each transform is split in two: `draw_*_params(..., rng=)` draws the random parameters and
`apply_*(x, params)` applies them without drawing anything, so a transform can be replayed,
inspected and tested against a plain loop. The public original-style functions
(`data_augmentation`, `local_pixel_shuffling`, ...) just draw then apply.

Speed (see benchmarks/bench_transforms.py): local shuffling and the intensity mapping run in
numba kernels; their results equal the plain versions (a Python loop over the blocks;
`np.interp`) exactly, which the tests check.

Cubes are `(1, R, C, D)` float32 or float64 arrays with values in [0, 1]; outputs keep the
input dtype. This module never imports Keras.
"""
from __future__ import annotations

import argparse
import functools
import math
import mmap
import os
import string
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from numba import njit

# Numbers of the original method (SPEC.md section 2).
NONLINEAR_NTIMES = 100_000  # points on the Bezier curve of the intensity mapping
LOCAL_SHUFFLE_BLOCKS = 10_000  # blocks shuffled per cube
PAINT_CONTINUE_PROB = 0.95  # in/out-painting: probability of drawing one more block

# Pre-training rates and sample-PNG settings of the original config, used when a duck-typed
# config lacks an attribute.
CONFIG_DEFAULTS = {
    "flip_rate": 0.4,
    "local_rate": 0.5,
    "nonlinear_rate": 0.9,
    "paint_rate": 0.9,
    "outpaint_rate": 0.8,
    "inpaint_rate": 0.2,
    "save_samples": "png",
    "exp_name": "Vnet-genesis_chest_ct",
    "sample_path": "pair_samples",
}
RATE_NAMES = ("flip_rate", "local_rate", "nonlinear_rate", "paint_rate", "outpaint_rate",
              "inpaint_rate")
SAMPLE_PNG_PROB = 0.01  # "about one batch in 100" writes a sample picture


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

def _rng(rng: Optional[np.random.Generator]) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"Expected rng to be a numpy.random.Generator or None. Received: "
                        f"rng={rng!r} of type {type(rng).__name__}")
    return rng


def check_prob(value: Any, name: str = "prob") -> float:
    """Return `value` as a float, raising ValueError unless it is a number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected {name} to be a number in [0, 1]. Received: {name}={value!r}")
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"Expected {name} to be in [0, 1]. Received: {name}={value!r}")
    return v


@njit(cache=True, nogil=True)
def _bits_in_unit_range(bits, one, neg_zero):
    # True when every float (given as its unsigned bits) is in [0, 1]: +0..1 are exactly the
    # bit patterns 0..bits(1.0), and -0.0 is the one other value in range; negatives and
    # NaN have larger patterns. An integer max, which vectorises (a float min/max pass with
    # NaN checks does not).
    hi = bits.dtype.type(0)
    for i in range(bits.shape[0]):
        b = bits[i]
        hi = max(hi, b if b != neg_zero else bits.dtype.type(0))
    return hi <= one


def check_values(a: np.ndarray, what: str = "x") -> None:
    """Raise ValueError unless every value of `a` is in [0, 1] (NaN fails too)."""
    if a.size == 0:
        return
    if type(a) is np.ndarray and a.flags.c_contiguous and a.dtype in (np.float32, np.float64):
        # One pass over the bits; min/max below only to word the error.
        u = np.uint32 if a.dtype == np.float32 else np.uint64
        one = np.array(1.0, a.dtype).view(u)[()]
        neg_zero = np.array(-0.0, a.dtype).view(u)[()]
        if _bits_in_unit_range(a.reshape(-1).view(u), one, neg_zero):
            return
    lo, hi = float(np.min(a)), float(np.max(a))
    # min/max propagate NaN, and NaN fails both comparisons.
    if not (lo >= 0.0 and hi <= 1.0):
        if np.isnan(lo) or np.isnan(hi):
            raise ValueError(f"Expected {what} to hold values in [0, 1] with no NaN. "
                             f"Received: {what} contains NaN")
        raise ValueError(f"Expected {what} to hold values in [0, 1] (CT scaled from HU). "
                         f"Received: {what} with min={lo:g}, max={hi:g}")


def check_cube(x: Any, name: str = "x", values: bool = True) -> np.ndarray:
    """Check that `x` is one cube of shape (1, R, C, D), float, values in [0, 1]."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"Expected {name} to be a numpy array of shape (1, R, C, D). "
                        f"Received: {name} of type {type(x).__name__}")
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"Expected {name} to have shape (1, R, C, D) (one channel-first "
                         f"cube). Received: {name}.shape={x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"Expected {name} to be float32 or float64. Received: "
                         f"{name}.dtype={x.dtype}")
    if values:
        check_values(x, name)
    return x


def _randint(rng: np.random.Generator, lo: int, hi: int, what: str) -> int:
    """Python's random.randint(lo, hi) (both ends inclusive) from a numpy Generator."""
    if lo > hi:
        raise ValueError(f"Expected a cube large enough for {what}: the range [{lo}, {hi}] "
                         f"is empty. Received: a smaller cube")
    return int(rng.integers(lo, hi + 1))


def _spatial(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise ValueError(f"Expected a cube shape ending in (R, C, D). Received: shape={shape}")
    r, c, d = (int(s) for s in shape[-3:])
    return r, c, d


# --------------------------------------------------------------------------------------------
# Bezier curve
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _bernstein_basis(n: int, n_times: int) -> np.ndarray:
    """B_i(t) = comb(n, i) t**(n-i) (1-t)**i on t = linspace(0, 1, n_times); shape (n+1, T).

    Cached: it depends only on (n, n_times), and the non-linear transform asks for the same
    100,000-point cubic basis for every cube.
    """
    t = np.linspace(0.0, 1.0, n_times)
    basis = np.stack([math.comb(n, i) * t ** (n - i) * (1.0 - t) ** i for i in range(n + 1)])
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=8)
def _bernstein_basis_rev_t(n: int, n_times: int) -> np.ndarray:
    """_bernstein_basis reversed along t and transposed, shape (T, n+1): row k holds the
    basis at t index T-1-k, contiguous for the knots kernel."""
    basis = np.ascontiguousarray(_bernstein_basis(n, n_times)[:, ::-1].T)
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=8)
def _bernstein_basis_coarse(n: int, n_times: int) -> np.ndarray:
    """Every _CURVE_STRIDE-th row of _bernstein_basis_rev_t, contiguous (the coarse knots are
    computed for every cube: one stream instead of a cache miss per row)."""
    basis = np.ascontiguousarray(_bernstein_basis_rev_t(n, n_times)[::_CURVE_STRIDE])
    basis.setflags(write=False)
    return basis


@njit(cache=True, nogil=True)
def _bezier_eval(points, basis, xvals, yvals):
    # One fused pass: xvals[k] = sum_i points[i, 0] * basis[i, k] (likewise y).
    m = points.shape[0]
    for k in range(basis.shape[1]):
        sx = 0.0
        sy = 0.0
        for i in range(m):
            sx += points[i, 0] * basis[i, k]
            sy += points[i, 1] * basis[i, k]
        xvals[k] = sx
        yvals[k] = sy


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
        raise ValueError(f"Expected points of shape (n+1, 2) with n >= 1. Received: "
                         f"points with shape {pts.shape}")
    if isinstance(nTimes, bool) or int(nTimes) != nTimes or nTimes < 2:
        raise ValueError(f"Expected nTimes to be an integer >= 2. Received: nTimes={nTimes!r}")
    basis = _bernstein_basis(pts.shape[0] - 1, int(nTimes))
    xvals = np.empty(int(nTimes))
    yvals = np.empty(int(nTimes))
    _bezier_eval(np.ascontiguousarray(pts), basis, xvals, yvals)
    return xvals, yvals


# --------------------------------------------------------------------------------------------
# Fast np.interp for many queries against many sorted knots
# --------------------------------------------------------------------------------------------

_CACHE_BITS = 14  # slots of the per-call value cache (2**14)
_PROBE = 8192  # voxels looked at before choosing between the cache and the passes


@njit(inline="always")
def _interp_finish(v, j, xp, fp, n):
    # np.interp's arithmetic once j (the largest index with xp[j] <= v) is known.
    if j < 0:
        return fp[0]
    if j >= n - 1:
        return fp[n - 1]
    if xp[j] == v:
        return fp[j]
    slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
    r = slope * (v - xp[j]) + fp[j]
    if r != r:  # numpy's fallbacks for non-finite slopes
        r = slope * (v - xp[j + 1]) + fp[j + 1]
        if r != r and fp[j] == fp[j + 1]:
            r = fp[j]
    return r


@njit(inline="always")
def _interp_start(v, xp, first, lo, hi, scale, top):
    # A knot index below the answer, from v's bucket (+inf and NaN search as hi).
    v = v if v <= hi else hi
    f = min(max((v - lo) * scale, 0.0), top)
    return first[np.int64(f)] - 1, v


@njit(cache=True, nogil=True, error_model="numpy")
def _interp_passes(xf, xp, fp, n, out, first, jbuf, lo, hi, scale, top):
    # The cache-free strategy: three passes over the queries, each a stream of independent
    # loads (one fused loop per query waits on a chain of cache misses).
    m = xf.shape[0]
    for i in range(m):
        v = np.float64(xf[i])
        v = v if v <= hi else hi  # +inf and NaN search as hi (NaN is fixed at the end)
        f = min(max((v - lo) * scale, 0.0), top)
        jbuf[i] = first[np.int64(f)] - 1
    for i in range(m):
        v = np.float64(xf[i])
        v = v if v <= hi else hi
        j = jbuf[i]
        j += xp[j + 1] <= v  # two branch-free steps cover most buckets
        j += xp[j + 1] <= v
        if xp[j + 1] <= v:  # a crowded bucket: finish the walk
            while xp[j + 1] <= v:
                j += 1
        jbuf[i] = j
    for i in range(m):
        v = np.float64(xf[i])
        j = jbuf[i]
        if j < 0:
            r = fp[0]
        elif j >= n - 1:
            r = fp[n - 1]
        elif xp[j] == v:
            r = fp[j]
        else:
            slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
            r = slope * (v - xp[j]) + fp[j]
            if r != r:  # numpy's fallbacks for non-finite slopes
                r = slope * (v - xp[j + 1]) + fp[j + 1]
                if r != r and fp[j] == fp[j + 1]:
                    r = fp[j]
        if v != v:
            r = v
        out[i] = r


@njit(cache=True, nogil=True, error_model="numpy")
def _interp_kernel(xf, xbits, xp, fp, n, out, first, jbuf, keys, vals, stamps, gen):
    """out[i] = np.interp(xf[i], xp[:n], fp[:n]), bit for bit, for non-decreasing xp.

    xp has n knots plus one +inf sentinel (length n + 1). A uniform grid of n buckets over
    [xp[0], xp[n-1]] gives each query a starting knot; short walks then find j = the largest
    index with xp[j] <= v, the knot np.interp uses, and the arithmetic mirrors numpy's.

    Two strategies, chosen on the first _PROBE voxels:
    - a direct-mapped cache keyed by the value's bits (xbits): CT cubes hold few distinct
      values (integer HU: at most 2,001), so most voxels are a cache hit;
    - otherwise (e.g. uniform noise) passes over all remaining queries, each pass a stream of
      independent loads (one fused loop per query waits on a chain of cache misses).
    first (n + 1), jbuf (len(xf)), keys/vals/stamps (2**_CACHE_BITS) are workspaces; slots
    are valid when their stamp equals gen, so the cache needs no clearing between calls.
    """
    nb = n
    lo = xp[0]
    hi = xp[n - 1]
    span = hi - lo
    scale = nb / span if span > 0.0 else 0.0
    top = nb - 1.0
    # first[b] = the first knot whose bucket is >= b (first[nb] = n). Buckets are monotone
    # in v, so knots of lower buckets are < v and knots of higher buckets are > v.
    # Counting sort of the knots' buckets: first = exclusive cumulative count.
    for b in range(nb + 1):
        first[b] = 0
    for j in range(n):
        f = min(max((xp[j] - lo) * scale, 0.0), top)
        first[np.int64(f) + 1] += 1
    for b in range(1, nb + 1):
        first[b] += first[b - 1]
    m = xf.shape[0]
    shift = np.uint64(64 - _CACHE_BITS)
    mult = np.uint64(0x9E3779B97F4A7C15)
    stop = m
    misses = 0
    i = 0
    while i < stop:
        v = np.float64(xf[i])
        if v != v:
            out[i] = v
            i += 1
            continue
        key = np.int64(xbits[i])
        h = np.int64((np.uint64(key) * mult) >> shift)
        if stamps[h] == gen and keys[h] == key:
            out[i] = vals[h]
        else:
            misses += 1
            j, vs = _interp_start(v, xp, first, lo, hi, scale, top)
            while xp[j + 1] <= vs:
                j += 1
            r = _interp_finish(v, j, xp, fp, n)
            stamps[h] = gen
            keys[h] = key
            vals[h] = r
            out[i] = r
        i += 1
        if i == _PROBE and misses * 4 > _PROBE:
            stop = i  # many distinct values: the cache does not pay, use the passes
    if stop < m:
        _interp_passes(xf[stop:], xp, fp, n, out[stop:], first, jbuf, lo, hi, scale, top)
    return stop


class _Workspace(threading.local):
    """Per-thread scratch arrays, reused across cubes: writing into freshly allocated
    megabyte arrays costs page faults that were a large part of the time per cube."""

    def get(self, name: str, size: int, dtype: Any) -> np.ndarray:
        a = self.__dict__.get(name)
        if a is None or a.shape[0] < size or a.dtype != dtype:
            a = np.empty(size, dtype)
            self.__dict__[name] = a
        return a[:size]


_WS = _Workspace()


def _interp_into(xc: np.ndarray, xp_padded: np.ndarray, fp: np.ndarray, n: int,
                 out: np.ndarray) -> None:
    first = _WS.get("first", n + 1, np.int64)
    jbuf = _WS.get("jbuf", xc.size, np.int32)
    slots = 1 << _CACHE_BITS
    keys = _WS.get("keys", slots, np.int64)
    vals = _WS.get("vals", slots, np.float64)
    stamps = _WS.get("stamps", slots, np.int64)
    if _WS.__dict__.get("gen") is None:
        stamps[:] = 0
        _WS.gen = 0
    _WS.gen += 1
    xf = xc.reshape(-1)
    xbits = xf.view(np.int32 if xf.dtype.itemsize == 4 else np.int64)
    _interp_kernel(xf, xbits, xp_padded, fp, n, out.reshape(-1), first, jbuf, keys, vals,
                   stamps, _WS.gen)


def _curve_interp_into(xf: np.ndarray, points: np.ndarray, invert: bool, n: int,
                       out: np.ndarray) -> int:
    """Run _curve_interp_kernel on flat xf -> out with this thread's workspaces."""
    ws = _WS.__dict__
    name = f"curve_tab{xf.dtype.itemsize}"
    if ws.get("curve_gen", 2**31) >= 2**31 - 1:  # first call, or gen outgrew 32 bits
        ws["curve_tab4"] = ws["curve_tab8"] = None
        ws["curve_gen"] = 0
    if ws[name] is None:  # stamps 0: never valid (gen starts at 1)
        ws[name] = np.zeros((1 << _VALUE_TABLE_BITS, 2 if xf.dtype.itemsize == 4 else 4),
                            np.int64)
    ws["curve_gen"] += 1
    tab = ws[name]
    coarse = _WS.get("curve_coarse", (n - 1) // _CURVE_STRIDE + 1, np.float64)
    firstc = _WS.get("curve_firstc", _CURVE_BUCKETS + 1, np.int32)
    xbits = xf.view(np.int32 if xf.dtype.itemsize == 4 else np.int64)
    basis_rt = _bernstein_basis_rev_t(points.shape[0] - 1, n)
    basis_c = _bernstein_basis_coarse(points.shape[0] - 1, n)
    return int(_curve_interp_kernel(xf, xbits, out, basis_rt, basis_c, points, invert, coarse,
                                    firstc, tab, tab.view(np.float64), ws["curve_gen"]))


def fast_interp(x: np.ndarray, xp: np.ndarray, fp: np.ndarray,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """Equal to `np.interp(x, xp, fp).astype(x.dtype)` for non-decreasing `xp`, much faster.

    Args:
        x: query values (any shape; float32 or float64).
        xp: non-decreasing knots. fp: their values (same length).
        out: optional C-contiguous output of x's shape (may be `x` itself: the mapping is
            elementwise).

    Returns:
        The interpolated values in an array of x's shape and dtype (`out` if given).
    """
    xp = np.asarray(xp, dtype=np.float64)
    fp = np.ascontiguousarray(fp, dtype=np.float64)
    if xp.ndim != 1 or xp.shape != fp.shape or xp.size == 0:
        raise ValueError(f"Expected 1-D xp and fp of the same non-zero length. Received: "
                         f"xp.shape={xp.shape}, fp.shape={fp.shape}")
    if xp.size > 1 and not np.all(xp[1:] >= xp[:-1]):
        raise ValueError("Expected non-decreasing xp (as np.interp assumes). Received: "
                         "unsorted xp")
    xc = np.ascontiguousarray(x)
    if out is None:
        out = np.empty_like(xc)
    if out.shape != xc.shape or not out.flags.c_contiguous:
        raise ValueError(f"Expected out to be C-contiguous with shape {xc.shape}. Received: "
                         f"out.shape={out.shape}")
    _interp_into(xc, np.append(xp, np.inf), fp, xp.size, out)
    return out


@njit(cache=True, nogil=True)
def _bezier_knots_kernel(points, basis_rt, invert, xp, fp):
    """Knots of the non-linear mapping, written straight into sorted order.

    xp[k] = xvals[T-1-k]; fp = yvals (invert) or yvals reversed; both evaluated exactly as
    bezier_curve does. The reversal equals np.sort when the reversed arrays are
    non-decreasing, which the return value reports (the caller falls back to np.sort if not).
    """
    T = basis_rt.shape[0]
    # Cubic curves (the transform's) are written out so the loop over k vectorises; the
    # sums keep bezier_curve's order ((0 + a0) + a1) + ..., so the values are identical.
    cubic = points.shape[0] == 4
    p00, p01, p10, p11 = points[0, 0], points[0, 1], points[1, 0], points[1, 1]
    p20, p21, p30, p31 = points[2 % points.shape[0], 0], points[2 % points.shape[0], 1], \
        points[3 % points.shape[0], 0], points[3 % points.shape[0], 1]
    if cubic:
        for k in range(T):
            b0 = basis_rt[k, 0]
            b1 = basis_rt[k, 1]
            b2 = basis_rt[k, 2]
            b3 = basis_rt[k, 3]
            xp[k] = (((0.0 + p00 * b0) + p10 * b1) + p20 * b2) + p30 * b3
            fp[k] = (((0.0 + p01 * b0) + p11 * b1) + p21 * b2) + p31 * b3
    else:
        m = points.shape[0]
        for k in range(T):
            sx = 0.0
            sy = 0.0
            for i in range(m):
                sx += points[i, 0] * basis_rt[k, i]
                sy += points[i, 1] * basis_rt[k, i]
            xp[k] = sx
            fp[k] = sy
    bad = 0
    for k in range(1, T):
        bad += xp[k] < xp[k - 1]
    if not invert:
        for k in range(1, T):
            bad += fp[k] < fp[k - 1]
    ok = bad == 0
    if invert:
        for k in range(T // 2):
            t = fp[k]
            fp[k] = fp[T - 1 - k]
            fp[T - 1 - k] = t
    return ok


# The non-linear mapping of a CT cube without writing out the 100,000 knots: the knots of the
# few thousand distinct voxel values are evaluated on demand (bit for bit as
# _bezier_knots_kernel writes them) and each value's result is cached.

_CURVE_STRIDE = 64  # knots between the entries of the coarse table that starts each search
_CURVE_BUCKETS = 4096  # buckets over [xp[0], xp[-1]] indexing the coarse table
_VALUE_TABLE_BITS = 17  # slots of the value cache, indexed by bits of the float itself
_MONOTONE_MARGIN = 1e-7  # see _curve_certified


def _curve_certified(points: np.ndarray, invert: bool) -> bool:
    """True when the knots of a cubic curve are provably monotone, so that writing them in
    reverse order equals np.sort (what the on-demand mapping relies on).

    For control values q0..q3 in [0, 1] the curve's derivative is 3 * (a (1-s)^2 +
    2 b s (1-s) + c s^2) with a, b, c = q1-q0, q2-q1, q3-q2. If its minimum over [0, 1]
    exceeds _MONOTONE_MARGIN, neighbouring knots (1e-5 apart in s) differ by more than
    3e-12, far above the float64 error of each knot (a few 1e-16: four terms, each at most 1),
    so the computed knots are strictly monotone too. Control points (0,0) and (1,1) with
    p1..p4 in [0, 1] always give a derivative >= 0; the margin only rejects curves with an
    (almost) flat point, about one draw in 10^12, which then take the sorting path.
    """
    if points.shape != (4, 2) or not (np.all(points >= 0.0) and np.all(points <= 1.0)):
        return False
    for col in ((0,) if invert else (0, 1)):
        q = points[:, col]
        a, b, c = q[1] - q[0], q[2] - q[1], q[3] - q[2]
        lowest = min(a, c)
        den = a - 2.0 * b + c
        if den > 0.0 and 0.0 < (a - b) / den < 1.0:
            lowest = min(lowest, (a * c - b * b) / den)
        if not lowest > _MONOTONE_MARGIN:
            return False
    return True


@njit(inline="always")
def _curve_knot(basis_rt, k, c0, c1, c2, c3):
    # The same expression as _bezier_knots_kernel (no fastmath: no reassociation or FMA).
    return (((0.0 + c0 * basis_rt[k, 0]) + c1 * basis_rt[k, 1]) + c2 * basis_rt[k, 2]) \
        + c3 * basis_rt[k, 3]


@njit(inline="always")
def _curve_map_value(v, n, lo, hi, scale, top, firstc, coarse, nc, basis_rt, invert,
                     px0, px1, px2, px3, py0, py1, py2, py3):
    # np.interp(v, xp, fp) for the knots xp[k] = x knot k, fp[k] = y knot k (or n-1-k when
    # inverting), evaluated on demand. Monotone xp (certified by the caller).
    S = _CURVE_STRIDE
    vs = v if v <= hi else hi  # +inf searches as hi
    f = min(max((vs - lo) * scale, 0.0), top)
    c = np.int64(firstc[np.int64(f)]) - 1  # a coarse entry below v (or -1)
    while c + 1 < nc and coarse[c + 1] <= vs:
        c += 1
    if c < 0:
        j = -1
    else:
        # coarse[c] = xp[c*S] <= v < xp[(c+1)*S]: guess linearly inside, then walk to the
        # largest j with xp[j] <= v (np.interp's knot) comparing exact knots.
        end = min((c + 1) * S, n - 1)
        x_end = coarse[c + 1] if c + 1 < nc else hi
        j = c * S
        d = x_end - coarse[c]
        if d > 0.0:
            j += np.int64((vs - coarse[c]) / d * (end - c * S))
        j = min(j, n - 1)
        while j > c * S and _curve_knot(basis_rt, j, px0, px1, px2, px3) > vs:
            j -= 1
        while j + 1 < n and _curve_knot(basis_rt, j + 1, px0, px1, px2, px3) <= vs:
            j += 1
    # np.interp's arithmetic (see _interp_finish).
    if j < 0:
        return _curve_knot(basis_rt, n - 1 if invert else 0, py0, py1, py2, py3)
    if j >= n - 1:
        return _curve_knot(basis_rt, 0 if invert else n - 1, py0, py1, py2, py3)
    xj = _curve_knot(basis_rt, j, px0, px1, px2, px3)
    fj = _curve_knot(basis_rt, n - 1 - j if invert else j, py0, py1, py2, py3)
    if xj == v:
        return fj
    xj1 = _curve_knot(basis_rt, j + 1, px0, px1, px2, px3)
    fj1 = _curve_knot(basis_rt, n - 2 - j if invert else j + 1, py0, py1, py2, py3)
    slope = (fj1 - fj) / (xj1 - xj)
    r = slope * (v - xj) + fj
    if r != r:
        r = slope * (v - xj1) + fj1
        if r != r and fj == fj1:
            r = fj
    return r


@njit(cache=True, nogil=True, error_model="numpy")
def _curve_interp_kernel(xf, xbits, out, basis_rt, basis_c, points, invert, coarse, firstc,
                         tab, tabf, gen):
    """out[i] = np.interp(xf[i], xp, fp) for the knots of nonlinear_knots, bit for bit,
    without computing all knots; returns how many voxels were done (all of them, or fewer
    when the cube holds too many distinct values for the value cache to pay).

    The knots are monotone (_curve_certified). A coarse table of every _CURVE_STRIDE-th x
    knot and a bucket index over it start each search; a value's result is cached in tab
    (slot from the float's exponent and top 10 mantissa bits: neighbouring CT values get
    neighbouring slots and rarely collide), valid when its stamp equals gen. tab rows are
    (gen << 32 | float32 bits, result) for float32 cubes (16 bytes: more of the hot slots
    stay in L1) and (float64 bits, result, gen, -) for float64; tabf is the float64 view of
    the same memory.
    """
    n = basis_rt.shape[0]
    px0, px1, px2, px3 = points[0, 0], points[1, 0], points[2, 0], points[3, 0]
    py0, py1, py2, py3 = points[0, 1], points[1, 1], points[2, 1], points[3, 1]
    S = _CURVE_STRIDE
    nc = (n - 1) // S + 1
    for c in range(nc):  # basis_c holds rows 0, S, 2S... of basis_rt, contiguous
        coarse[c] = _curve_knot(basis_c, c, px0, px1, px2, px3)
    lo = coarse[0]
    hi = _curve_knot(basis_rt, n - 1, px0, px1, px2, px3)
    nb = firstc.shape[0] - 1
    span = hi - lo
    scale = nb / span if span > 0.0 else 0.0
    top = nb - 1.0
    # firstc[b] = the first coarse entry whose bucket is >= b (counting sort, as in
    # _interp_kernel): entries of lower buckets are < v for a v in bucket b.
    for b in range(nb + 1):
        firstc[b] = 0
    for c in range(nc):
        f = min(max((coarse[c] - lo) * scale, 0.0), top)
        firstc[np.int64(f) + 1] += 1
    for b in range(1, nb + 1):
        firstc[b] += firstc[b - 1]
    narrow = xbits.itemsize == 4
    shift = np.uint64(13 if narrow else 42)  # keep exponent + 10 mantissa bits
    mask = np.uint64(tab.shape[0] - 1)
    m = xf.shape[0]
    misses = 0
    done = 0
    # Checkpoints: stop early on cubes of (nearly) all distinct values, e.g. uniform noise.
    for end, most in ((min(m, 1024), 768), (min(m, _PROBE), _PROBE // 4), (m, m)):
        for i in range(done, end):
            h = np.int64((np.uint64(xbits[i]) >> shift) & mask)
            if narrow:  # float32: the stamp shares the key's int64
                key = (np.int64(xbits[i]) & np.int64(0xFFFFFFFF)) | (gen << 32)
                if tab[h, 0] == key:
                    out[i] = tabf[h, 1]
                    continue
            else:
                key = np.int64(xbits[i])
                if tab[h, 0] == key and tab[h, 2] == gen:
                    out[i] = tabf[h, 1]
                    continue
            v = np.float64(xf[i])
            if v != v:
                out[i] = v  # np.interp gives NaN for NaN
                continue
            misses += 1
            r = _curve_map_value(v, n, lo, hi, scale, top, firstc, coarse, nc, basis_rt,
                                 invert, px0, px1, px2, px3, py0, py1, py2, py3)
            tab[h, 0] = key
            if not narrow:
                tab[h, 2] = gen
            tabf[h, 1] = r
            out[i] = r
        done = end
        if done < m and misses > most:
            return done
    return m


# --------------------------------------------------------------------------------------------
# Flip (data_augmentation)
# --------------------------------------------------------------------------------------------

def draw_flip_params(prob: float = 0.5, *, rng: Optional[np.random.Generator] = None
                     ) -> tuple[int, ...]:
    """Draw the flips of `data_augmentation`: up to 3 times, while random() < prob, an axis.

    Args:
        prob: probability of each (further) flip.
        rng: numpy Generator.

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
    """Flip `x` along each axis of `axes` in turn. Not in place: `x` is not modified.

    Args:
        x: array to flip (a cube (1, R, C, D) in the transforms).
        axes: axes from draw_flip_params, applied in order.

    Returns:
        A flipped view of `x` (`x` itself when axes is empty).
    """
    for a in axes:
        x = np.flip(x, axis=a)
    return x


def data_augmentation(x: np.ndarray, y: np.ndarray, prob: float = 0.5, *,
                      rng: Optional[np.random.Generator] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Flip input and target together (up to 3 flips, each while random() < prob).

    Not in place: returns flipped views of `x` and `y`, which are left unchanged.

    Args:
        x, y: cubes of the same shape (1, R, C, D).
        prob: probability of each flip.
        rng: numpy Generator.

    Returns:
        (x, y) flipped along the same drawn axes.
    """
    check_cube(x, "x")
    check_cube(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"Expected x and y of the same shape. Received: x.shape={x.shape}, "
                         f"y.shape={y.shape}")
    axes = draw_flip_params(prob, rng=rng)
    return apply_flip(x, axes), apply_flip(y, axes)


# --------------------------------------------------------------------------------------------
# Local pixel shuffling
# --------------------------------------------------------------------------------------------

@njit(inline="always")
def _splitmix64(state):
    # SplitMix64: a small, well-mixed PRNG; each cube's stream is seeded from `rng`.
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(inline="always")
def _below2(state, bound1, bound2):
    # Two uniform integers in [0, bound1) and [0, bound2) from one 64-bit draw, one from each
    # 32-bit half (Lemire's multiply-shift; the bias, at most bound / 2**32 < 3e-8 here, is far
    # below anything measurable).
    state, z = _splitmix64(state)
    a = np.int64(((z & np.uint64(0xFFFFFFFF)) * np.uint64(bound1)) >> np.uint64(32))
    b = np.int64(((z >> np.uint64(32)) * np.uint64(bound2)) >> np.uint64(32))
    return state, a, b


@njit(inline="always")
def _draw_block(state, R, C, D):
    # Block size randint(1, R // 10) (likewise C, D), then corner randint(0, R - b).
    state, bx, by = _below2(state, R // 10, C // 10)
    state, bz, _unused = _below2(state, D // 10, 1)
    bx += 1
    by += 1
    bz += 1
    state, nx, ny = _below2(state, R - bx + 1, C - by + 1)
    state, nz, _unused = _below2(state, D - bz + 1, 1)
    return state, nx, ny, nz, bx, by, bz


@njit(inline="always")
def _inside_out_step(state, i, m):
    # Bounds of the next one or two steps of the inside-out shuffle at position i (i < m):
    # j1 uniform in [0, i], and j2 in [0, i + 1] when i + 1 < m (one 64-bit draw for both).
    if i + 1 < m:
        return _below2(state, i + 1, i + 2)
    return _below2(state, i + 1, 1)


@njit(cache=True, nogil=True)
def _local_shuffle_kernel(orig, out, n_blocks, seed, offtab, offstart):
    """Write the n_blocks shuffled blocks of orig (R, C, D) into out (a copy of orig).

    Per block: its voxels are gathered from orig through the block's flat offsets and
    shuffled as they arrive (Durstenfeld's inside-out Fisher-Yates: buf[i] = buf[j];
    buf[j] = src[i], j uniform in [0, i]), then scattered to out. Sources always come from
    orig; later blocks overwrite earlier ones where they overlap. offtab[offstart[s]:] holds
    the flat offsets of a block of size s = (bx-1, by-1, bz-1) relative to its corner (see
    _block_offsets); an empty offtab (very large cubes) computes them per block instead.
    """
    R, C, D = orig.shape
    src = orig.reshape(-1)
    dst = out.reshape(-1)
    state = np.uint64(seed)
    cap = (R // 10) * (C // 10) * (D // 10)
    buf = np.empty(cap, orig.dtype)
    tmp = np.empty(cap if offtab.shape[0] == 0 else 1, np.int64)
    nby = C // 10
    nbz = D // 10
    for _ in range(n_blocks):
        state, nx, ny, nz, bx, by, bz = _draw_block(state, R, C, D)
        base = (nx * C + ny) * D + nz
        m = bx * by * bz
        if offtab.shape[0] > 0:
            offs = offtab[offstart[((bx - 1) * nby + (by - 1)) * nbz + (bz - 1)]:]
        else:
            k = 0
            for a in range(bx):
                for b in range(by):
                    o = (a * C + b) * D
                    for c in range(bz):
                        tmp[k] = o + c
                        k += 1
            offs = tmp
        buf[0] = src[base + offs[0]]
        i = 1
        while i < m:
            state, j1, j2 = _inside_out_step(state, i, m)
            buf[i] = buf[j1]
            buf[j1] = src[base + offs[i]]
            if i + 1 < m:
                buf[i + 1] = buf[j2]
                buf[j2] = src[base + offs[i + 1]]
            i += 2
        for i in range(m):
            dst[base + offs[i]] = buf[i]


@njit(cache=True, nogil=True)
def _local_shuffle_plan_kernel(R, C, D, n_blocks, seed, blocks, perms):
    # Same stream as _local_shuffle_kernel, written out: blocks[k] = (nx, ny, nz, bx, by, bz)
    # and perms[k, :bx*by*bz] such that the shuffled block is flat_block[perm] (the
    # inside-out shuffle run on the indices 0..m-1 instead of the voxel values).
    state = np.uint64(seed)
    for k in range(n_blocks):
        state, nx, ny, nz, bx, by, bz = _draw_block(state, R, C, D)
        blocks[k, 0] = nx
        blocks[k, 1] = ny
        blocks[k, 2] = nz
        blocks[k, 3] = bx
        blocks[k, 4] = by
        blocks[k, 5] = bz
        m = bx * by * bz
        row = perms[k]
        row[0] = 0
        i = 1
        while i < m:
            state, j1, j2 = _inside_out_step(state, i, m)
            row[i] = row[j1]
            row[j1] = i
            if i + 1 < m:
                row[i + 1] = row[j2]
                row[j2] = i + 1
            i += 2


_OFFSET_TABLE_MAX = 1 << 22  # entries (int64): larger cubes compute block offsets per block


@functools.lru_cache(maxsize=16)
def _block_offsets(R: int, C: int, D: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat offsets (relative to the corner) of the voxels of every block size, in C order.

    Block size (bx, by, bz) starts at offtab[offstart[((bx-1)*(C//10) + by-1)*(D//10) + bz-1]].
    Looking them up replaces three nested loops of a few steps each (whose exits the CPU
    mispredicts) by flat loops in the kernel. Empty arrays when the table would be too large.
    """
    sizes = [np.arange(1, d // 10 + 1) for d in (R, C, D)]
    total = int(sizes[0].sum() * sizes[1].sum() * sizes[2].sum())
    if total > _OFFSET_TABLE_MAX:
        empty = np.zeros(0, np.int64)
        empty.setflags(write=False)
        return empty, empty
    offtab = np.empty(total, np.int64)
    offstart = np.empty(len(sizes[0]) * len(sizes[1]) * len(sizes[2]), np.int64)
    k = s = 0
    for bx in sizes[0]:
        for by in sizes[1]:
            for bz in sizes[2]:
                a, b, c = np.meshgrid(np.arange(bx), np.arange(by), np.arange(bz),
                                      indexing="ij")
                o = ((a * C + b) * D + c).ravel()
                offstart[s] = k
                offtab[k:k + o.size] = o
                k += o.size
                s += 1
    offtab.setflags(write=False)
    offstart.setflags(write=False)
    return offtab, offstart


@dataclass(frozen=True)
class LocalShuffleParams:
    """Parameters of one local shuffle: the blocks and permutations come from `seed`.

    `local_shuffle_plan(params)` writes them out (block corners/sizes and permutations).
    """
    shape: tuple[int, int, int]
    seed: int
    n_blocks: int = LOCAL_SHUFFLE_BLOCKS


def _check_local_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    R, C, D = _spatial(shape)
    if min(R, C, D) < 10:
        raise ValueError(f"Expected every cube dimension >= 10 for local_pixel_shuffling "
                         f"(block sizes are randint(1, dim // 10)). Received: (R, C, D)="
                         f"{(R, C, D)}")
    return R, C, D


def draw_local_shuffle_params(shape: Sequence[int], prob: float = 0.5, *,
                              rng: Optional[np.random.Generator] = None,
                              n_blocks: int = LOCAL_SHUFFLE_BLOCKS
                              ) -> Optional[LocalShuffleParams]:
    """Draw a local shuffle for a cube of `shape` (..., R, C, D); None (skip) with 1 - prob.

    Args:
        shape: cube shape; the last three entries are (R, C, D), each >= 10.
        prob: probability of shuffling.
        rng: numpy Generator.
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
    R, C, D = _check_local_shape(shape)
    return LocalShuffleParams((R, C, D), int(rng.integers(0, 2**63, dtype=np.uint64)),
                              int(n_blocks))


def local_shuffle_plan(params: LocalShuffleParams) -> tuple[np.ndarray, np.ndarray]:
    """Write out the blocks and permutations a LocalShuffleParams stands for.

    Returns:
        blocks: int64 (n_blocks, 6) rows (nx, ny, nz, bx, by, bz); block k covers
        [nx:nx+bx, ny:ny+by, nz:nz+bz] (sizes randint(1, dim//10), corners randint(0, dim-b)).
        perms: int64 (n_blocks, max block voxels); row k's first bx*by*bz entries are the
        permutation p with shuffled_block.ravel() = original_block.ravel()[p].
    """
    R, C, D = params.shape
    blocks = np.zeros((params.n_blocks, 6), np.int64)
    perms = np.full((params.n_blocks, (R // 10) * (C // 10) * (D // 10)), -1, np.int64)
    _local_shuffle_plan_kernel(R, C, D, params.n_blocks, np.uint64(params.seed), blocks, perms)
    return blocks, perms


def apply_local_pixel_shuffling(x: np.ndarray, params: Optional[LocalShuffleParams],
                                out: Optional[np.ndarray] = None) -> np.ndarray:
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
        raise ValueError("Expected out to be a separate array from x: shuffled blocks are "
                         "read from the untouched input. Received: out sharing memory with x")
    out[...] = x
    if params is None:
        return out
    if tuple(params.shape) != _spatial(x.shape):
        raise ValueError(f"Expected params drawn for shape {params.shape}. Received: "
                         f"x.shape={x.shape}")
    if out[0].flags.c_contiguous:
        _shuffle_blocks(np.ascontiguousarray(x[0]), out[0], params)
    else:  # the kernel works on flat views
        tmp = np.ascontiguousarray(out[0])
        _shuffle_blocks(np.ascontiguousarray(x[0]), tmp, params)
        out[0] = tmp
    return out


def _shuffle_blocks(orig: np.ndarray, out: np.ndarray, params: LocalShuffleParams) -> None:
    # orig, out: C-contiguous (R, C, D), out holding a copy of orig.
    offtab, offstart = _block_offsets(*params.shape)
    _local_shuffle_kernel(orig, out, params.n_blocks, np.uint64(params.seed), offtab, offstart)


def local_pixel_shuffling(x: np.ndarray, prob: float = 0.5, *,
                          rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Shuffle the voxels inside 10,000 small random blocks, with probability `prob`.

    Not in place (like the original): returns a new array; `x` is unchanged. On a
    64x64x32 cube of distinct values a shuffle changes 78.5% of the voxels on average (82%
    lie in at least one block; a block can leave a voxel where it was).

    Args:
        x: cube (1, R, C, D), values in [0, 1], every dimension >= 10.
        prob: probability of shuffling (else x is returned unchanged, as a copy).
        rng: numpy Generator.

    Returns:
        The shuffled cube, same shape and dtype.
    """
    check_cube(x)
    params = draw_local_shuffle_params(x.shape, prob, rng=rng)
    return apply_local_pixel_shuffling(x, params)


# --------------------------------------------------------------------------------------------
# Non-linear intensity transformation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NonlinearParams:
    """Control points [[0, 0], [p1, p2], [p3, p4], [1, 1]] and whether the mapping inverts."""
    points: tuple[tuple[float, float], ...]
    invert: bool


def draw_nonlinear_params(prob: float = 0.5, *, rng: Optional[np.random.Generator] = None
                          ) -> Optional[NonlinearParams]:
    """Draw a non-linear mapping; None (skip) with probability 1 - prob.

    p1..p4 are four random() draws in order; the mapping inverts intensities when a fifth
    random() < 0.5 (then only xvals are sorted).

    Args:
        prob: probability of transforming.
        rng: numpy Generator.

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


def _knots_into(params: NonlinearParams, n_times: int, xp: np.ndarray, fp: np.ndarray) -> None:
    # xp has n_times + 1 entries (the last one a +inf sentinel for the interpolation kernel).
    pts = np.asarray(params.points, dtype=np.float64)
    basis_rt = _bernstein_basis_rev_t(pts.shape[0] - 1, n_times)
    xp[n_times] = np.inf
    if not _bezier_knots_kernel(pts, basis_rt, bool(params.invert), xp, fp):
        # Not monotone (impossible for control values in [0, 1], but keep np.sort's meaning).
        xvals, yvals = bezier_curve(pts, n_times)
        xp[:n_times] = np.sort(xvals)
        fp[:] = yvals if params.invert else np.sort(yvals)


def nonlinear_knots(params: NonlinearParams, nTimes: int = NONLINEAR_NTIMES
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The knots of a drawn non-linear mapping (the original's inversion rule).

    Args:
        params: from draw_nonlinear_params.
        nTimes: points on the Bezier curve (the original's 100,000).

    Returns:
        (xp, fp) float64 arrays of length nTimes, from xvals, yvals = bezier_curve(points,
        nTimes): xp = np.sort(xvals); fp = yvals if params.invert else np.sort(yvals).
    """
    xp = np.empty(nTimes + 1)
    fp = np.empty(nTimes)
    _knots_into(params, nTimes, xp, fp)
    return xp[:nTimes], fp


def apply_nonlinear_transformation(x: np.ndarray, params: Optional[NonlinearParams],
                                   out: Optional[np.ndarray] = None) -> np.ndarray:
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
        raise ValueError(f"Expected out to be C-contiguous with shape {xc.shape}. Received: "
                         f"out.shape={out.shape}")
    if params is None:
        out[...] = xc
        return out
    n = NONLINEAR_NTIMES
    xf = xc.reshape(-1)
    of = out.reshape(-1)
    done = 0
    pts = np.asarray(params.points, dtype=np.float64)
    if _curve_certified(pts, bool(params.invert)):
        done = _curve_interp_into(xf, pts, bool(params.invert), n, of)
    if done < xf.size:
        # Many distinct values (or an uncertified curve): all knots, then the passes.
        xp = _WS.get("xp", n + 1, np.float64)
        fp = _WS.get("fp", n, np.float64)
        _knots_into(params, n, xp, fp)
        _interp_into(xf[done:], xp, fp, n, of[done:])
    return out


def nonlinear_transformation(x: np.ndarray, prob: float = 0.5, *,
                             rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Monotone Bezier intensity mapping (half of the time inverting), with probability `prob`.

    Not in place (like the original): returns a new array; `x` is unchanged.

    Args:
        x: cube (1, R, C, D), values in [0, 1].
        prob: probability of transforming.
        rng: numpy Generator.

    Returns:
        The mapped cube, same shape and dtype, values in [0, 1].
    """
    check_cube(x)
    return apply_nonlinear_transformation(x, draw_nonlinear_params(prob, rng=rng))


# --------------------------------------------------------------------------------------------
# In-painting and out-painting
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PaintParams:
    """Blocks (rows nx, ny, nz, bx, by, bz) and the noise of a painting transform.

    In-painting: `noise[k]` is block k's fill, shape (bx, by, bz).
    Out-painting: `noise` is a single (R, C, D) fill; the blocks are restored from the input.
    """
    blocks: np.ndarray
    noise: Any


def _draw_inpaint_block(rng, R, C, D):
    bx = _randint(rng, R // 6, R // 3, f"in-painting along R={R}")
    by = _randint(rng, C // 6, C // 3, f"in-painting along C={C}")
    bz = _randint(rng, D // 6, D // 3, f"in-painting along D={D}")
    nx = _randint(rng, 3, R - bx - 3, f"in-painting along R={R}")
    ny = _randint(rng, 3, C - by - 3, f"in-painting along C={C}")
    nz = _randint(rng, 3, D - bz - 3, f"in-painting along D={D}")
    return nx, ny, nz, bx, by, bz


def _draw_outpaint_block(rng, R, C, D):
    bx = R - _randint(rng, 3 * R // 7, 4 * R // 7, f"out-painting along R={R}")
    by = C - _randint(rng, 3 * C // 7, 4 * C // 7, f"out-painting along C={C}")
    bz = D - _randint(rng, 3 * D // 7, 4 * D // 7, f"out-painting along D={D}")
    nx = _randint(rng, 3, R - bx - 3, f"out-painting along R={R}")
    ny = _randint(rng, 3, C - by - 3, f"out-painting along C={C}")
    nz = _randint(rng, 3, D - bz - 3, f"out-painting along D={D}")
    return nx, ny, nz, bx, by, bz


def _noise_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"Expected dtype float32 or float64. Received: dtype={dtype}")
    return dtype


@njit(cache=True, nogil=True)
def _uniform_fill_kernel(flat, seed, bits):
    # flat[i] = k * 2**-bits with k uniform in [0, 2**bits): numpy's float32 (bits=24) and
    # float64 (bits=53) uniform grids. One 64-bit draw per float64, one per two float32.
    state = np.uint64(seed)
    scale = 1.0 / (1 << bits)
    n = flat.shape[0]
    if bits == 24:
        i = 0
        while i + 1 < n:
            state, z = _splitmix64(state)
            flat[i] = np.float64(z >> np.uint64(40)) * scale
            flat[i + 1] = np.float64((z >> np.uint64(8)) & np.uint64(0xFFFFFF)) * scale
            i += 2
        if i < n:
            state, z = _splitmix64(state)
            flat[i] = np.float64(z >> np.uint64(40)) * scale
    else:
        for i in range(n):
            state, z = _splitmix64(state)
            flat[i] = np.float64(z >> np.uint64(11)) * scale


def uniform_fill(out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fill `out` (float32 or float64, C-contiguous) with uniform [0, 1) noise and return it.

    Same distribution as `rng.random(dtype=out.dtype)` (multiples of 2**-24, or 2**-53),
    drawn by a numba kernel from one seed taken from `rng`: about 4x faster for a cube.
    """
    if not out.flags.c_contiguous:
        raise ValueError("Expected a C-contiguous array for noise. Received: a strided one")
    seed = np.uint64(rng.integers(0, 2**63, dtype=np.uint64))
    _uniform_fill_kernel(out.reshape(-1), seed, 24 if out.dtype == np.float32 else 53)
    return out


def draw_in_painting_params(shape: Sequence[int], *, rng: Optional[np.random.Generator] = None,
                            dtype: Any = np.float32) -> PaintParams:
    """Draw in-painting: up to 5 times, while random() < 0.95, a block of size
    randint(dim // 6, dim // 3) at corner randint(3, dim - b - 3), and its uniform [0, 1) noise.

    Args:
        shape: cube shape; the last three entries are (R, C, D).
        rng: numpy Generator.
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
    for (nx, ny, nz, bx, by, bz), n in zip(params.blocks, params.noise):
        x[0, nx:nx + bx, ny:ny + by, nz:nz + bz] = n
    return x


def image_in_painting(x: np.ndarray, *, rng: Optional[np.random.Generator] = None
                      ) -> np.ndarray:
    """Replace up to 5 random inner blocks with uniform noise.

    IN PLACE, like the original: `x` itself is modified and returned. On a 64x64x32 cube
    the noise covers 5.5% of the voxels on average.

    Args:
        x: cube (1, R, C, D), values in [0, 1].
        rng: numpy Generator.

    Returns:
        x.
    """
    check_cube(x)
    if not x.flags.writeable:
        raise ValueError("Expected a writable cube: image_in_painting works in place, like the "
                         "original. Received: a read-only array (pass a copy)")
    return apply_in_painting(x, draw_in_painting_params(x.shape, rng=rng, dtype=x.dtype))


def draw_out_painting_params(shape: Sequence[int], *,
                             rng: Optional[np.random.Generator] = None,
                             dtype: Any = np.float32,
                             noise_out: Optional[np.ndarray] = None) -> PaintParams:
    """Draw out-painting: noise for the whole cube, then one block of size
    dim - randint(3*dim//7, 4*dim//7) at corner randint(3, dim - b - 3), then up to 4 more
    while random() < 0.95.

    Args:
        shape: cube shape; the last three entries are (R, C, D).
        rng: numpy Generator.
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
        raise ValueError(f"Expected noise_out of shape {(R, C, D)} and dtype {dtype}. "
                         f"Received: {noise_out.shape}, {noise_out.dtype}")
    noise = uniform_fill(noise_out, rng)
    blocks = [_draw_outpaint_block(rng, R, C, D)]
    for _ in range(4):
        if not rng.random() < PAINT_CONTINUE_PROB:
            break
        blocks.append(_draw_outpaint_block(rng, R, C, D))
    return PaintParams(np.array(blocks, np.int64).reshape(-1, 6), noise)


def apply_out_painting(x: np.ndarray, params: PaintParams,
                       out: Optional[np.ndarray] = None) -> np.ndarray:
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
        raise ValueError("Expected out to be a separate array from x. Received: out sharing "
                         "memory with x")
    out[0] = params.noise
    for nx, ny, nz, bx, by, bz in params.blocks:
        sl = (0, slice(nx, nx + bx), slice(ny, ny + by), slice(nz, nz + bz))
        out[sl] = x[sl]
    return out


def image_out_painting(x: np.ndarray, *, rng: Optional[np.random.Generator] = None
                       ) -> np.ndarray:
    """Keep 1 to 5 random central blocks of the cube and fill the rest with uniform noise.

    Not in place (like the original): returns a new array; `x` is unchanged. On a
    64x64x32 cube the noise covers 68.2% of the voxels on average.

    Args:
        x: cube (1, R, C, D), values in [0, 1].
        rng: numpy Generator.

    Returns:
        The out-painted cube, same shape and dtype.
    """
    check_cube(x)
    return apply_out_painting(x, draw_out_painting_params(x.shape, rng=rng, dtype=x.dtype))


# --------------------------------------------------------------------------------------------
# Training pairs
# --------------------------------------------------------------------------------------------

def config_value(config: Any, name: str) -> Any:
    """`config.name`, or the original's default when the (duck-typed) config lacks it."""
    return getattr(config, name, CONFIG_DEFAULTS[name])


def check_config(config: Any) -> dict[str, float]:
    """Return the six transform rates of `config`, raising ValueError unless each is in [0, 1]."""
    return {name: check_prob(config_value(config, name), f"config.{name}")
            for name in RATE_NAMES}


def check_batch_size(batch_size: Any, n_cubes: int, what: str = "img") -> int:
    """Check 1 <= batch_size <= n_cubes (the batch holds distinct cubes)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"Expected batch_size to be a positive integer. Received: "
                         f"batch_size={batch_size!r}")
    if n_cubes < batch_size:
        raise ValueError(f"Expected at least batch_size={batch_size} cubes (a batch holds "
                         f"distinct cubes). Received: {n_cubes} cubes in {what}")
    return int(batch_size)


def corrupt_into(y: np.ndarray, x: np.ndarray, rates: dict[str, float],
                 rng: np.random.Generator) -> None:
    """Make one training pair in place, in the original's order of operations.

    On entry `y` (1, R, C, D) holds the target cube. Afterwards `y` is the (possibly
    flipped) target and `x` (same shape, separate memory) its corrupted input: flip (x and y
    together, flip_rate), local shuffle (local_rate), non-linear (nonlinear_rate), then with
    paint_rate: in-painting with inpaint_rate, else out-painting. Values are not re-checked.
    Both must be C-contiguous (as the cubes of a batch are).
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
        _shuffle_blocks(y[0], x[0], shuffle)
    mapping = draw_nonlinear_params(rates["nonlinear_rate"], rng=rng)
    if mapping is not None:
        apply_nonlinear_transformation(x, mapping, out=x)
    if rng.random() < rates["paint_rate"]:
        if rng.random() < rates["inpaint_rate"]:
            apply_in_painting(x, draw_in_painting_params(x.shape, rng=rng, dtype=x.dtype))
        else:
            # The noise goes into a reused scratch cube, then the kept blocks are copied
            # into it and it into x: as apply_out_painting, without fresh allocations.
            noise = _WS.get("noise_" + x.dtype.name, x.size, x.dtype).reshape(x.shape[1:])
            params = draw_out_painting_params(x.shape, rng=rng, dtype=x.dtype,
                                              noise_out=noise)
            for nx, ny, nz, bx, by, bz in params.blocks:
                sl = (slice(nx, nx + bx), slice(ny, ny + by), slice(nz, nz + bz))
                noise[sl] = x[0][sl]
            x[0] = noise


def pair_sample_image(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The original's sample picture of one pair (1, R, C, D): four rows (depth slices at
    2/6, 3/6, 4/6, 5/6 of D), each the input slice beside the target slice; uint8 (4R, 2C)."""
    D = x.shape[-1]
    rows = [np.concatenate([x[0, :, :, k * D // 6], y[0, :, :, k * D // 6]], axis=1)
            for k in (2, 3, 4, 5)]
    img = np.concatenate(rows, axis=0)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _atomic_save_png(image: Any, path: str, fmt: str = "png") -> None:
    """Save a PIL image through a temp file in the same folder, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix="." + fmt)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt.upper() if fmt.lower() != "jpg" else "JPEG")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; pictures are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def maybe_save_sample(x: np.ndarray, y: np.ndarray, config: Any, status: str,
                      rng: np.random.Generator) -> Optional[str]:
    """With status "train" and config.save_samples set, write a sample PNG of one pair of the
    batch (B, 1, R, C, D) with probability 0.01. Returns the path written, or None."""
    fmt = config_value(config, "save_samples")
    if status != "train" or not fmt:
        return None
    if not rng.random() < SAMPLE_PNG_PROB:
        return None
    from PIL import Image  # only needed here; keeps import of this module light

    n = int(rng.integers(0, x.shape[0]))
    chars = string.ascii_letters + string.digits
    name = "".join(chars[int(i)] for i in rng.integers(0, len(chars), 10))
    folder = os.path.join(config_value(config, "sample_path"), config_value(config, "exp_name"))
    path = os.path.join(folder, f"{name}.{fmt}")
    _atomic_save_png(Image.fromarray(pair_sample_image(x[n], y[n])), path, str(fmt))
    return path


def make_batch(source: np.ndarray, index: Sequence[int], config: Any,
               rng: np.random.Generator, status: str = "test", what: str = "img"
               ) -> tuple[np.ndarray, np.ndarray]:
    """One batch of pairs from the target cubes source[index] (source (N, 1, R, C, D), e.g.
    memory-mapped; never modified).

    Returns (x, y) of source's dtype, and with status "train" maybe writes a sample PNG.
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


def generate_pair(img: np.ndarray, batch_size: int, config: Any, status: str = "test", *,
                  rng: Optional[np.random.Generator] = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless generator of (corrupted input, original) batches, as in the original.

    Args:
        img: cubes, shape (N, 1, R, C, D), float32/float64, values in [0, 1].
        batch_size: cubes per batch (distinct cubes, drawn at random for each batch).
        config: any object with the rates (flip_rate, local_rate, nonlinear_rate, paint_rate,
            outpaint_rate, inpaint_rate) and save_samples, exp_name, sample_path; missing
            attributes take the original defaults.
        status: "train" enables the sample PNGs (about one batch in 100).
        rng: numpy Generator.

    Yields:
        (x, y): new arrays (batch_size, 1, R, C, D) of img's dtype; `img` is never modified.
    """
    if not isinstance(img, np.ndarray) or img.ndim != 5 or img.shape[1] != 1:
        raise ValueError(f"Expected img of shape (N, 1, R, C, D). Received: img with shape "
                         f"{getattr(img, 'shape', type(img).__name__)}")
    check_config(config)
    batch_size = check_batch_size(batch_size, img.shape[0])
    rng = _rng(rng)
    check_values(img[0], "img[0]")  # fail at the start, not at an unlucky batch
    while True:
        index = rng.choice(img.shape[0], batch_size, replace=False)
        yield make_batch(img, index, config, rng, status, "img")


# --------------------------------------------------------------------------------------------
# Preview CLI
# --------------------------------------------------------------------------------------------

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
        try:
            mm.madvise(mmap.MADV_RANDOM)
        except OSError:
            pass  # only a hint
    if a.ndim == 4:
        a = a[:, None]
    if a.ndim != 5 or a.shape[1] != 1:
        raise ValueError(f"Expected cubes of shape (N, R, C, D) or (N, 1, R, C, D). "
                         f"Received: {path} with shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"Expected float32 or float64 cubes. Received: {path} with dtype "
                         f"{a.dtype}")
    return a


def preview(cubes: np.ndarray, n: int = 3, seed: int = 0, zoom: int = 2) -> Any:
    """Picture of each transform applied to a few cubes.

    Args:
        cubes: (N, 1, R, C, D) cubes, values in [0, 1] (e.g. from load_cubes).
        n: number of cubes (rows), picked at random.
        seed: seed of every random choice.
        zoom: pixels per voxel.

    Returns:
        A greyscale PIL image: one row per cube, columns original, flip, local shuffle,
        non-linear, in-painting, out-painting; the middle depth slice of each, titled.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    n = min(n, cubes.shape[0])
    picks = np.sort(rng.choice(cubes.shape[0], n, replace=False))
    titles = ["original", "flip", "local shuffle", "non-linear", "in-painting",
              "out-painting"]
    rows = []
    for i in picks:
        x = np.array(cubes[i], dtype=np.float32)
        check_values(x, f"cube {i}")
        # A visible flip (rows or columns): axis 0, the channel, would change nothing.
        flipped = apply_flip(x, (1 + int(rng.integers(0, 2)),))
        cols = [
            x,
            flipped,
            local_pixel_shuffling(x, prob=1.0, rng=rng),
            nonlinear_transformation(x, prob=1.0, rng=rng),
            image_in_painting(x.copy(), rng=rng),
            image_out_painting(x, rng=rng),
        ]
        D = x.shape[-1]
        rows.append(np.concatenate([np.pad(c[0, :, :, D // 2], 1, constant_values=1.0)
                                    for c in cols], axis=1))
    grid = np.concatenate(rows, axis=0)
    grid = np.kron(grid, np.ones((zoom, zoom)))
    body = Image.fromarray(np.clip(np.rint(grid * 255), 0, 255).astype(np.uint8))
    header = 14
    canvas = Image.new("L", (body.width, body.height + header), color=255)
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    w = body.width / len(titles)
    for k, t in enumerate(titles):
        draw.text((k * w + 3, 1), t, fill=0)
    return canvas


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The preview CLI (see --help). Returns the exit status: 0, or 2 on bad input."""
    parser = argparse.ArgumentParser(
        description="Draw a picture of each Models Genesis transform applied to a few cubes "
                    "(middle depth slice of each).",
        epilog="example: python keras/transforms.py --cubes "
               "generated_cubes/bat_32_s_64x64x32_0.npy --out preview.png --n 3 --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cubes", required=True,
                        help=".npy file of cubes (N, R, C, D) or (N, 1, R, C, D), values in [0, 1]")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--n", type=int, default=3, help="number of cubes (rows); default 3")
    parser.add_argument("--seed", type=int, default=0, help="random seed; default 0")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"Expected --n >= 1. Received: --n {args.n}")
    try:
        cubes = load_cubes(args.cubes)
        img = preview(cubes, n=args.n, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _atomic_save_png(img, args.out, "png")
    print(f"wrote {args.out} ({img.width}x{img.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
