"""Sliding-window inference over whole volumes of any size.

A network trained on 64x64x32 cubes predicts a whole CT by tiling it with overlapping
windows, running them in fixed-size batches through one jit-compiled function, and
blending the window outputs with per-voxel weights. Windows are placed nnU-Net style: per
axis, `ceil((size - window) / step) + 1` starts spread evenly from 0 to `size - window`
(step = window * (1 - overlap)), so the last window ends exactly at the border and every
voxel is covered; a volume smaller than the window is edge-padded up to it and cropped
back. Weights: uniform, or a Gaussian centred on the window (sigma = window *
`sigma_scale`, floored at a small positive value so that border voxels keep a weight),
which down-weights the less reliable window edges.

Blending is sum(weight * output) / sum(weight): with an identity network the input comes
back exactly (up to float rounding), whatever the overlap and weighting (tested).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transvw_jax.progress import Progress


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Starts of the windows along one axis (first 0, last size - window)."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    count = math.ceil((size - window) / step) + 1
    return [int(round(i * (size - window) / (count - 1))) for i in range(count)]


def importance_map(window: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Per-voxel blending weights of one window (float32, max 1)."""
    if mode == "constant":
        return np.ones(tuple(window), np.float32)
    if mode != "gaussian":
        raise ValueError(f"blending must be 'gaussian' or 'constant', got {mode!r}")
    axes = []
    for n in window:
        c = (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-3)
        axes.append(np.exp(-0.5 * ((np.arange(n) - c) / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    return np.maximum(w, 1e-4).astype(np.float32)


def sliding_window(predict: Callable[..., jax.Array], volume: np.ndarray, window: Sequence[int], *,
                   overlap: float = 0.5, batch_size: int = 4, blending: str = "gaussian",
                   sigma_scale: float = 0.125, progress: bool = False, params: Any = None) -> np.ndarray:
    """Predict a whole volume (X, Y, Z) with a network trained on `window`-sized cubes.

    Args:
      predict: (B, wx, wy, wz) float32 -> (B, wx, wy, wz, C) (or (B, wx, wy, wz)); it is
        jit-compiled here once, for one batch shape.
      volume: (X, Y, Z), any size.
      window: the network's input size.
      overlap: fraction of a window shared with its neighbour, in [0, 1).
      batch_size: windows per call (the last batch is padded).
      blending: "gaussian" or "constant".
      params: when given, `predict(params, cubes)` is called instead, with `params` (e.g. the
        network's variables) a jit argument rather than constants baked into the program.

    Returns:
      (X, Y, Z, C) float32 (C = 1 when `predict` returns no channel axis).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"sliding_window needs a 3D volume, got shape {volume.shape}")
    window = tuple(int(w) for w in window)
    pad = [(0, max(0, w - s)) for s, w in zip(volume.shape, window, strict=True)]
    padded = np.pad(volume, pad, mode="edge") if any(p[1] for p in pad) else volume
    starts = list(itertools.product(*(window_starts(s, w, overlap) for s, w in zip(padded.shape, window,
                                                                                    strict=True))))
    weight = importance_map(window, blending, sigma_scale)
    run = jax.jit(predict)
    out = None
    norm = np.zeros(padded.shape, np.float32)
    bar = Progress("inference", len(starts), "windows") if progress else None
    for b in range(0, len(starts), batch_size):
        chunk = starts[b:b + batch_size]
        cubes = np.stack([padded[x:x + window[0], y:y + window[1], z:z + window[2]] for x, y, z in chunk])
        if len(chunk) < batch_size:
            cubes = np.concatenate([cubes, np.repeat(cubes[-1:], batch_size - len(chunk), axis=0)])
        args = (jnp.asarray(cubes),) if params is None else (params, jnp.asarray(cubes))
        pred = np.asarray(run(*args), np.float32)
        if pred.ndim == 4:
            pred = pred[..., None]
        if out is None:
            out = np.zeros(padded.shape + (pred.shape[-1],), np.float32)
        for (x, y, z), p in zip(chunk, pred, strict=False):
            region = (slice(x, x + window[0]), slice(y, y + window[1]), slice(z, z + window[2]))
            out[region] += p * weight[..., None]
            norm[region] += weight
        if bar:
            bar.update(len(chunk))
    out /= norm[..., None]
    return out[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
