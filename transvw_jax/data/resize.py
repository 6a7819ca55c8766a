"""Linear resizing of 3D arrays on the host, exactly reproducible.

Separable: one small (out, in) interpolation matrix per axis, applied with tensordot, so a
resize costs three matrix products, is the same on every machine for the same input, and
needs no compiled kernel per shape (discovery resizes crops of many sizes). Sampling is
"half-pixel centred" (output voxel i looks at input position (i + 0.5) * in / out - 0.5,
clamped to the edges), the convention of skimage/scipy zoom with grid_mode and of
torch's align_corners=False; no anti-aliasing.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=256)
def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of linear interpolation from n_in to n_out samples."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float64)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    m.setflags(write=False)
    return m.astype(np.float32)


def resize_linear(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize a 3D array to `shape` (trilinear), float32 out."""
    a = np.asarray(a, np.float32)
    if a.ndim != 3 or len(shape) != 3:
        raise ValueError(f"resize_linear needs a 3D array and a 3D shape, got {a.shape} -> {tuple(shape)}")
    out = a
    for axis, n in enumerate(shape):
        if out.shape[axis] == n:
            continue
        m = interpolation_matrix(out.shape[axis], int(n))
        out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out, np.float32)
