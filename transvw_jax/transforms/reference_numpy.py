"""The original restoration procedures of Models Genesis and TransVW, restated in numpy/scipy.

This is the statement of what the JAX kernels in this package must reproduce, written the
way the original code does it: one cube at a time, a Python loop over shuffle blocks, a
100,000-point Bezier curve with np.interp, scipy's gaussian_filter and map_coordinates.
The tests compare the kernels with it (geometry, statistics, the curve, the sampling), and
`benchmarks/transforms.py` times it as the per-core baseline. Nothing in training uses it.

Every function takes a `numpy.random.Generator` where the procedure draws and works on one
cube (X, Y, Z); the draws follow the original's order within each transform.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BEZIER_SAMPLES = 100_000


# --------------------------------------------------------------------------- non-linear
def bezier_curve(points: np.ndarray, samples: int = BEZIER_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """The cubic Bezier through (0, 0), points[0], points[1], (1, 1), sampled at `samples`
    parameter values in the original's Bernstein order (it runs from (1, 1) to (0, 0)).
    Returns (xs, ys)."""
    p = np.asarray(points, np.float64)
    t = np.linspace(0.0, 1.0, samples)
    w = np.stack([t**3, 3 * t**2 * (1 - t), 3 * t * (1 - t) ** 2, (1 - t) ** 3])
    return np.array([0, p[0, 0], p[1, 0], 1]) @ w, np.array([0, p[0, 1], p[1, 1], 1]) @ w


def nonlinear_with(x: np.ndarray, points: np.ndarray, inverted: bool) -> np.ndarray:
    """x mapped through the curve: the x samples sorted, and the y samples too unless
    `inverted` (then the curve decreases), linearly interpolated."""
    xs, ys = bezier_curve(points)
    return np.interp(x, np.sort(xs), ys if inverted else np.sort(ys))


def nonlinear(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """The non-linear transform: two random control points, inverted half the time."""
    points = rng.random((2, 2))
    return nonlinear_with(x, points, inverted=bool(rng.random() < 0.5))


# --------------------------------------------------------------------------- local shuffle
def local_shuffle(rng: np.random.Generator, x: np.ndarray, num_blocks: int) -> np.ndarray:
    """Block by block: size randint(1, n//10) and origin randint(0, n - size) per axis, the
    block read from the ORIGINAL cube, its voxels permuted uniformly, written back (a later
    block overwrites an earlier one). On a cube of voxel indices the result is each
    voxel's source."""
    out, shape = x.copy(), x.shape
    kmax = [max(1, n // 10) for n in shape]
    for _ in range(num_blocks):
        s = [rng.integers(1, k + 1) for k in kmax]
        o = [rng.integers(0, n - b + 1) for n, b in zip(shape, s, strict=True)]
        region = tuple(slice(a, a + b) for a, b in zip(o, s, strict=True))
        window = x[region].ravel().copy()
        rng.shuffle(window)
        out[region] = window.reshape(s)
    return out


# --------------------------------------------------------------------------- painting
def _margin_box(rng, shape, sizes):
    origin = [rng.integers(min(3, n - s), max(min(3, n - s), n - s - 3) + 1)
              for n, s in zip(shape, sizes, strict=True)]
    return tuple(slice(o, o + s) for o, s in zip(origin, sizes, strict=True))


def in_paint(rng: np.random.Generator, x: np.ndarray, max_blocks: int) -> np.ndarray:
    """Blocks of size randint(n//6, n//3) at randint(3, n - size - 3) filled with uniform
    noise: the first always, each further one with probability 0.95 while the previous
    ones were."""
    out = x.copy()
    for i in range(max_blocks):
        if i and rng.random() >= 0.95:
            break
        sizes = [rng.integers(n // 6, n // 3 + 1) for n in x.shape]
        box = _margin_box(rng, x.shape, sizes)
        out[box] = rng.random(sizes)
    return out


def out_paint(rng: np.random.Generator, x: np.ndarray, max_extra_blocks: int) -> np.ndarray:
    """Uniform noise everywhere except kept blocks of size n - randint(3n//7, 4n//7) at
    randint(3, n - size - 3): one, then up to `max_extra_blocks` more with probability
    0.95 each while the previous ones were."""
    out = rng.random(x.shape).astype(x.dtype)
    for i in range(1 + max_extra_blocks):
        if i and rng.random() >= 0.95:
            break
        sizes = [n - rng.integers(3 * n // 7, 4 * n // 7 + 1) for n in x.shape]
        box = _margin_box(rng, x.shape, sizes)
        out[box] = x[box]
    return out


# --------------------------------------------------------------------------- flip
def flip(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, prob: float = 0.4,
         max_flips: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """While u < prob (at most max_flips times) flip input and target along a random axis."""
    for _ in range(max_flips):
        if rng.random() >= prob:
            break
        axis = rng.integers(0, 3)
        x, y = np.flip(x, axis), np.flip(y, axis)
    return x, y


# --------------------------------------------------------------------------- elastic
def sample(x: np.ndarray, cx: np.ndarray, cy: np.ndarray, iz: np.ndarray) -> np.ndarray:
    """x at real coordinates (cx, cy) and integer iz: linear interpolation, reflected edges
    (scipy's map_coordinates, order 1, mode 'reflect')."""
    return ndimage.map_coordinates(x, [cx, cy, iz], order=1, mode="reflect")


def elastic(rng: np.random.Generator, x: np.ndarray, alpha: float = 991.0, sigma: float = 8.0) -> np.ndarray:
    """Displacement fields in x and y: uniform(-1, 1) noise smoothed by
    gaussian_filter(sigma, mode='constant'), times alpha; the cube sampled there."""
    dx = ndimage.gaussian_filter(rng.random(x.shape) * 2 - 1, sigma, mode="constant") * alpha
    dy = ndimage.gaussian_filter(rng.random(x.shape) * 2 - 1, sigma, mode="constant") * alpha
    gx, gy, gz = np.meshgrid(*[np.arange(n) for n in x.shape], indexing="ij")
    return sample(x, gx + dx, gy + dy, gz)


def elastic_field_std(shape, alpha: float = 991.0, sigma: float = 8.0) -> np.ndarray:
    """Per-voxel standard deviation of `elastic`'s displacement fields, exactly: the
    filter's matrix per axis (scipy's truncate=4.0, zero padding) applied to white noise of
    variance 1/3."""
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    diag = []
    for n in shape:
        i = np.arange(n)
        d = i[:, None] - i[None, :]
        a = np.where(np.abs(d) <= radius, taps[np.clip(d + radius, 0, 2 * radius)], 0)
        diag.append((a**2).sum(1))
    var = diag[0][:, None, None] * diag[1][None, :, None] * diag[2][None, None, :] / 3
    return alpha * np.sqrt(var)


# --------------------------------------------------------------------------- policies
def transvw(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """TransVW's input: elastic, then one of shuffle (5 blocks), non-linear, in-paint (1
    block), out-paint (1 block), each a quarter of the time."""
    x = elastic(rng, x)
    choice = rng.integers(0, 4)
    if choice == 0:
        return local_shuffle(rng, x, 5)
    if choice == 1:
        return nonlinear(rng, x)
    if choice == 2:
        return in_paint(rng, x, 1)
    return out_paint(rng, x, 0)


def genesis(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Models Genesis' input: flip (p 0.4), shuffle of 10,000 blocks (p 0.5), non-linear
    (p 0.9), painting (p 0.9: in-paint up to 5 blocks 20% of the time, else out-paint)."""
    x, _ = flip(rng, x, x)
    if rng.random() < 0.5:
        x = local_shuffle(rng, x, 10_000)
    if rng.random() < 0.9:
        x = nonlinear(rng, x)
    if rng.random() < 0.9:
        x = in_paint(rng, x, 5) if rng.random() < 0.2 else out_paint(rng, x, 4)
    return x
