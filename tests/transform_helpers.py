"""Test inputs shared by the transforms, kernels and training-pair tests."""

import math

import numpy as np


def cube(shape=(20, 20, 20), seed=0, dtype=np.float32):
    """A random cube with its channel axis, (1, *shape), values in [0, 1)."""
    return np.random.default_rng(seed).random((1,) + shape).astype(dtype)


def ct_like(shape=(64, 64, 32), seed=0):
    """Integer-HU-like values (few distinct values, smooth), as real CT cubes have."""
    rng = np.random.default_rng(seed)
    hu = np.round(np.cumsum(rng.normal(0, 40, (1,) + shape), axis=3)).clip(-1000, 1000)
    return ((hu + 1000) / 2000).astype(np.float32)


def within(p_hat, p, n, k=4.5):
    """A frequency `p_hat` over `n` draws is within `k` standard errors of the probability `p`."""
    return abs(p_hat - p) <= k * math.sqrt(p * (1 - p) / n) + 1e-12
