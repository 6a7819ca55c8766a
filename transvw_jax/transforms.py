"""On-device restoration transforms of TransVW and Models Genesis (REFERENCE.md section 3).

Every function works on ONE cube `x` of shape (X, Y, Z) with values in [0, 1], takes its
own PRNG key, has static shapes (masks and gathers, never data-dependent slicing), and
preserves the dtype; a batch is `jax.vmap` over keys and cubes. The arithmetic is float32
whatever the storage dtype.

Policies return `(input, target, transform_id)`:
- `transvw`: elastic deformation of the input (when enabled), then exactly one of
  {local shuffle, non-linear, in-paint, out-paint}; transform_id is that one's index
  (SHUFFLE=0, NONLINEAR=1, IN_PAINT=2, OUT_PAINT=3).
- `genesis`: flip, local shuffle, non-linear and painting composed as Models Genesis does;
  transform_id is a bit mask, bit `1 << T` set for each transform T applied (FLIP=4).

Where the reference draws python `randint(a, b)` (both ends included), `_randint` adds 1
to the upper bound for `jax.random.randint`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

SHUFFLE, NONLINEAR, IN_PAINT, OUT_PAINT, FLIP = range(5)
TRANSFORM_NAMES = ("local_shuffle", "nonlinear", "in_paint", "out_paint", "flip")
# Up to this many blocks the local shuffle follows the reference block by block; above it,
# the tiling formulation (see `local_shuffle`) keeps the cost at a few passes over the cube.
EXACT_SHUFFLE_MAX_BLOCKS = 32
_PRIMES = np.array([1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049, 1051, 1061, 1063, 1069,
                    1087, 1091, 1093, 1097], np.uint32)


def default_config(policy: str = "transvw") -> ml_collections.ConfigDict:
    """Transform settings with the reference defaults of `policy` (transvw | genesis)."""
    if policy not in ("transvw", "genesis"):
        raise ValueError(f"transforms.policy must be 'transvw' or 'genesis', got {policy!r}")
    genesis = policy == "genesis"
    c = ml_collections.ConfigDict()
    c.policy = policy
    # TransVW: relative weights of shuffle, non-linear, in-paint, out-paint (0 disables one).
    c.choice_weights = (1.0, 1.0, 1.0, 1.0)
    c.elastic = dict(enabled=not genesis, alpha=991.0, sigma=8.0)
    c.flip = dict(prob=0.4 if genesis else 0.0, max_flips=3)
    c.local_shuffle = dict(prob=0.5, num_blocks=10_000 if genesis else 5)
    c.nonlinear = dict(prob=0.9)
    c.paint = dict(prob=0.9, inpaint_prob=0.2)
    c.in_paint = dict(max_blocks=5 if genesis else 1)
    c.out_paint = dict(max_extra_blocks=4 if genesis else 0)
    return c


# --------------------------------------------------------------------------- helpers
def _randint(key: jax.Array, shape: tuple[int, ...], lo: Any, hi: Any) -> jax.Array:
    """python's randint(lo, hi): both ends included."""
    return jax.random.randint(key, shape, lo, jnp.asarray(hi) + 1)


def _axis_masks(shape: tuple[int, ...], start: jax.Array, size: jax.Array) -> list[jax.Array]:
    """Per-axis membership of boxes [start, start+size): start/size (K, 3) -> 3 x (K, n)."""
    return [
        (jnp.arange(n) >= start[:, a, None]) & (jnp.arange(n) < (start + size)[:, a, None])
        for a, n in enumerate(shape)
    ]


def _union_of_boxes(shape, start, size, present) -> jax.Array:
    mx, my, mz = _axis_masks(shape, start, size)
    inside = mx[:, :, None, None] & my[:, None, :, None] & mz[:, None, None, :]
    return jnp.any(inside & present[:, None, None, None], axis=0)


def _margin_positions(key, shape, size, margin: int = 3) -> jax.Array:
    """randint(margin, n - size - margin) per axis, the reference's block placement; on
    cubes too small for the margins the range shrinks towards the border."""
    n = jnp.asarray(shape)
    lo = jnp.minimum(margin, n - size)
    hi = jnp.maximum(lo, n - size - margin)
    return _randint(key, size.shape, lo, hi)


def _flat_index(shape, ix, iy, iz) -> jax.Array:
    return (ix * shape[1] + iy) * shape[2] + iz


def _grid(shape):
    return (jnp.arange(shape[0])[:, None, None], jnp.arange(shape[1])[None, :, None],
            jnp.arange(shape[2])[None, None, :])


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hash_bits(key: jax.Array, counter: jax.Array) -> jax.Array:
    """32 random bits per entry of `counter` (distinct uint32 ids), keyed by `key`.

    Why not jax.random.uniform: full-cube draws dominated the cost of the transforms on
    CPU (threefry, measured here: 1.1 ms per 64x64x32 cube, 0.11 ms for this hash). The
    key's own threefry bits seed a counter-based hash (two rounds of the MurmurHash3
    finaliser), the construction of counter-based generators; its outputs are uniform and
    uncorrelated between neighbouring counters, which is all that noise filling and
    per-tile draws need. Keys keep their usual meaning: same key, same bits.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    h = _mix32(counter.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) ^ seed[0])
    return _mix32(h ^ seed[1])


def _hash_uniform(key: jax.Array, counter: jax.Array) -> jax.Array:
    """Uniform float32 in [0, 1) with 24 random bits, one per counter."""
    return (_hash_bits(key, counter) >> 8).astype(jnp.float32) * np.float32(2.0**-24)


# --------------------------------------------------------------------------- non-linear
def nonlinear_curve(key: jax.Array, size: int = 1025, samples: int = 1024):
    """The reference's random intensity curve as a lookup table on a uniform grid of [0, 1].

    A cubic Bezier through (0,0), p1, p2, (1,1), p1 and p2 uniform in [0,1]^2, sampled at
    `samples` values of t; half the time only x is sorted (a decreasing curve), else both.
    With control points in [0,1] each coordinate of the curve is monotone in t, so the
    table is monotone and maps {0, 1} onto {0, 1}.

    Returns:
      (table of `size` values, inverted flag).
    """
    k_points, k_invert = jax.random.split(key)
    p = jax.random.uniform(k_points, (2, 2))
    t = jnp.linspace(0.0, 1.0, samples)
    # Reference Bernstein order: point i weighs C(3, i) t^(3-i) (1-t)^i.
    weights = jnp.stack([t**3, 3 * t**2 * (1 - t), 3 * t * (1 - t) ** 2, (1 - t) ** 3])
    xs = jnp.stack([0.0, p[0, 0], p[1, 0], 1.0]) @ weights
    ys = jnp.stack([0.0, p[0, 1], p[1, 1], 1.0]) @ weights
    inverted = jax.random.uniform(k_invert) < 0.5
    ys = jnp.where(inverted, ys, jnp.sort(ys))
    table = jnp.interp(jnp.linspace(0.0, 1.0, size), jnp.sort(xs), ys)
    return table, inverted


def _materialise(table: jax.Array) -> jax.Array:
    """Return `table` unchanged but computed once. XLA:CPU otherwise fuses the table's
    producer (an interpolation) into the per-voxel lookup and recomputes it per voxel
    (measured: 2.4x slower). A sort is never fused, and sorting by the index is free of
    any effect on the values."""
    return jax.lax.sort((jnp.arange(table.shape[0]), table), num_keys=1)[1]


def _apply_table(table: jax.Array, x: jax.Array) -> jax.Array:
    table = _materialise(table)
    pos = jnp.clip(x.astype(jnp.float32), 0.0, 1.0) * (table.shape[0] - 1)
    i = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, table.shape[0] - 2)
    frac = pos - i
    return table[i] * (1 - frac) + table[i + 1] * frac


def nonlinear(key: jax.Array, x: jax.Array) -> jax.Array:
    """Map every voxel through a random Bezier intensity curve (see `nonlinear_curve`)."""
    table, _ = nonlinear_curve(key)
    return _apply_table(table, x).astype(x.dtype)


# --------------------------------------------------------------------------- local shuffle
def _shuffle_sizes_max(shape) -> np.ndarray:
    return np.maximum(1, np.asarray(shape) // 10)


def shuffle_blocks(key: jax.Array, shape: tuple[int, int, int], num_blocks: int):
    """The reference's shuffle blocks: sizes randint(1, n//10), origins randint(0, n - size).

    Returns (origins, sizes), each (num_blocks, 3) int32.
    """
    k_size, k_pos = jax.random.split(key)
    size = _randint(k_size, (num_blocks, 3), 1, _shuffle_sizes_max(shape))
    origin = _randint(k_pos, (num_blocks, 3), 0, jnp.asarray(shape) - size)
    return origin, size


def _exact_shuffle(key, x, num_blocks, enabled=True):
    """The reference procedure, block by block: each block is read from the ORIGINAL
    cube, permuted uniformly and written back; a later block overwrites an earlier one.

    Only the voxels of the blocks are touched (num_blocks x the largest block volume, 540
    for TransVW at 64x64x32): a scatter of those whose last covering block is their own.
    """
    shape = x.shape
    k_blocks, k_perm = jax.random.split(key)
    origin, size = shuffle_blocks(k_blocks, shape, num_blocks)
    kmax = _shuffle_sizes_max(shape)
    slots = int(np.prod(kmax))
    volume = jnp.prod(size, axis=1)
    # One uniform permutation of 0..n_b-1 per block, in the first n_b slots of a row.
    keys = jax.random.uniform(k_perm, (num_blocks, slots))
    perm = jnp.argsort(jnp.where(jnp.arange(slots) < volume[:, None], keys, 2.0), axis=1)

    def unravel(j, s):  # local index j in a block of size s -> (3,) offsets
        return jnp.stack([j // (s[..., 1] * s[..., 2]), (j // s[..., 2]) % s[..., 1], j % s[..., 2]], -1)

    j = jnp.arange(slots)
    dest = origin[:, None, :] + unravel(j[None, :], size[:, None, :])  # (N, slots, 3)
    src = origin[:, None, :] + unravel(perm, size[:, None, :])
    valid = j[None, :] < volume[:, None]
    # A write is final when no later block covers its destination.
    d = dest[:, :, None, :]
    covers = jnp.all((d >= origin[None, None]) & (d < (origin + size)[None, None]), axis=-1)  # (N, slots, N)
    later = jnp.arange(num_blocks)[None, :] > jnp.arange(num_blocks)[:, None]  # (N, N)
    final = valid & ~jnp.any(covers & later[:, None, :], axis=-1) & enabled
    flat_dest = jnp.where(final, _flat_index(shape, dest[..., 0], dest[..., 1], dest[..., 2]), x.size)
    values = x.reshape(-1)[_flat_index(shape, src[..., 0], src[..., 1], src[..., 2])]
    return x.reshape(-1).at[flat_dest.reshape(-1)].set(values.reshape(-1), mode="drop").reshape(shape)


@functools.lru_cache(maxsize=32)
def _coverage_map(shape: tuple[int, int, int], num_blocks: int) -> np.ndarray:
    """P(voxel lies in at least one of `num_blocks` reference blocks), per voxel."""
    per_axis = []
    for n, kmax in zip(shape, _shuffle_sizes_max(shape), strict=True):
        i = np.arange(n)
        cover = []
        for b in range(1, kmax + 1):  # origins o in [0, n-b] with o <= i <= o + b - 1
            count = np.minimum(i, n - b) - np.maximum(0, i - b + 1) + 1
            cover.append(np.clip(count, 0, None) / (n - b + 1))
        per_axis.append(np.mean(cover, axis=0))
    p = per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]
    return (1.0 - (1.0 - p) ** num_blocks).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _coverage_integral(shape: tuple[int, int, int], num_blocks: int) -> np.ndarray:
    """Summed-area table of `_coverage_map`, zero-padded in front: (X+1, Y+1, Z+1)."""
    c = _coverage_map(shape, num_blocks).astype(np.float64)
    table = np.zeros(tuple(n + 1 for n in shape))
    table[1:, 1:, 1:] = c.cumsum(0).cumsum(1).cumsum(2)
    return table.astype(np.float32)


def _segments(key, n: int, kmax: int):
    """Cut [0, n) into random segments: per coordinate, the start and length of its
    segment, its offset inside it, and the segment's index.

    Lengths k in 1..kmax are drawn with P(k) proportional to 1/(n - k + 1): a coordinate
    then lies in a segment of length k with probability proportional to k/(n - k + 1),
    which is how likely a reference block of size k (origin uniform in [0, n - k]) is to
    cover it."""
    k = np.arange(1, kmax + 1)
    logits = jnp.asarray(-np.log(n - k + 1.0), jnp.float32)
    lengths = jax.random.categorical(key, logits, shape=(n,)) + 1
    starts = jnp.cumsum(lengths) - lengths
    first = jnp.zeros((n,), jnp.int32).at[starts].add(1, mode="drop")
    seg = jnp.cumsum(first) - 1
    start = starts[seg]
    return start, jnp.minimum(lengths[seg], n - start), jnp.arange(n) - start, seg


def _tiled_shuffle_source(key, shape, num_blocks):
    """Source coordinates (three int32 arrays) of every voxel for a many-block shuffle, in
    a few passes (see `local_shuffle`)."""
    keys = jax.random.split(key, 5)
    kmax = _shuffle_sizes_max(shape)
    if np.prod(kmax) * int(_PRIMES.max()) >= 2**22:
        raise ValueError(f"local_shuffle: cube {shape} too large for the tiled shuffle (float32 index "
                         "arithmetic); use cubes up to ~160 voxels per side")
    (x0, lx, rx, tx), (y0, ly, ry, ty), (z0, lz, rz, tz) = (
        _segments(k, n, int(m)) for k, n, m in zip(keys[:3], shape, kmax, strict=True)
    )

    # Mean reference coverage over each voxel's tile, from a summed-area table: box sums
    # by differences along x, then y, then z (separable takes, no per-voxel gather).
    table = jnp.asarray(_coverage_integral(tuple(shape), num_blocks))
    box = table[x0 + lx] - table[x0]
    box = box[:, y0 + ly] - box[:, y0]
    box = box[:, :, z0 + lz] - box[:, :, z0]
    coverage = box / (lx[:, None, None] * ly[None, :, None] * lz[None, None, :])
    # Per-tile random draws: a hash of the tile's id, evaluated at each of its voxels.
    tile = _flat_index(shape, tx[:, None, None], ty[None, :, None], tz[None, None, :])
    shuffled = _hash_uniform(keys[3], tile) < coverage
    bits = _hash_bits(keys[4], tile)
    # Integer division is scalar on x86 (no SIMD form); these small non-negative integers
    # are exact in float32, so quotients and remainders are computed in floating point.
    x0, lx, rx = (a[:, None, None].astype(jnp.float32) for a in (x0, lx, rx))
    y0, ly, ry = (a[None, :, None].astype(jnp.float32) for a in (y0, ly, ry))
    z0, lz, rz = (a[None, None, :].astype(jnp.float32) for a in (z0, lz, rz))
    volume = lx * ly * lz
    local = (rx * ly + ry) * lz + rz
    offset = jnp.floor((bits >> 8).astype(jnp.float32) * np.float32(2.0**-24) * volume)
    multiplier = jnp.asarray(_PRIMES.astype(np.float32))[(bits & 15).astype(jnp.int32)]
    src = _mod(multiplier * local + offset, volume)
    sx = _div(src, ly * lz)
    sy = _mod(_div(src, lz), ly)
    sz = _mod(src, lz)
    return tuple(jnp.where(shuffled, (o + d).astype(jnp.int32), g)
                 for o, d, g in zip((x0, y0, z0), (sx, sy, sz), _grid(shape), strict=True))


def _div(a: jax.Array, b: jax.Array) -> jax.Array:
    """floor(a / b) for non-negative integers held exactly in float32 (a, b < 2^22):
    the +0.5 keeps the quotient at least 0.5/b away from an integer, far beyond rounding."""
    return jnp.floor((a + 0.5) / b)


def _mod(a: jax.Array, b: jax.Array) -> jax.Array:
    return a - b * _div(a, b)


def local_shuffle(key: jax.Array, x: jax.Array, num_blocks: int) -> jax.Array:
    """Local pixel shuffling: permute the voxels inside small random blocks.

    Blocks have sizes randint(1, n//10) per axis at random positions; each is read from the
    original cube. Up to EXACT_SHUFFLE_MAX_BLOCKS blocks (TransVW: 5) this is the reference
    procedure exactly: uniform permutations, later blocks overwriting earlier ones.

    Many blocks (Models Genesis: 10,000, covering the cube ~1.9 times) would need that many
    sequential scatters. The reference's outcome for one voxel is: it is covered by some
    block with probability c(v) (computed exactly from the block distribution), the LAST
    covering block is a size-biased draw (P(size k) proportional to k per axis, because
    larger blocks cover more voxels), the voxel sits at a uniform place inside it, and its
    new value comes from a uniform place inside the same block. A random rectilinear
    tiling whose segment lengths are uniform in 1..n//10 reproduces exactly that: a voxel
    falls in a segment of length k with probability proportional to k (the inspection
    paradox) at a uniform offset; each tile is shuffled with probability c at its origin;
    inside a shuffled tile, voxel j takes the value of voxel (a*j + c) mod n, a bijection
    (a is a prime larger than any tile, c uniform), so the source is uniform in the tile
    and the tile's values are only permuted. So which voxels move, and how far (per-axis
    displacement: difference of two uniform positions in a size-biased block), match the
    reference; what differs is only that the shuffled regions are tiles of a grid rather
    than fragments of overlapping blocks. Cost: per-axis segment tables, two random
    values per tile, one gather of the cube.
    """
    shape = tuple(x.shape)
    if num_blocks <= 0:
        return x
    if num_blocks <= EXACT_SHUFFLE_MAX_BLOCKS:
        return _exact_shuffle(key, x, num_blocks)
    return x.reshape(-1)[_flat_index(shape, *_tiled_shuffle_source(key, shape, num_blocks))]


# --------------------------------------------------------------------------- painting
def in_paint_blocks(key: jax.Array, shape, max_blocks: int, continue_prob: float = 0.95):
    """Blocks of size randint(n//6, n//3) at randint(3, n - size - 3), per axis. The first
    is always there; each further one with probability `continue_prob` while the previous
    ones were. Returns (origins, sizes, present)."""
    k_size, k_pos, k_more = jax.random.split(key, 3)
    n = np.asarray(shape)
    size = _randint(k_size, (max_blocks, 3), n // 6, n // 3)
    origin = _margin_positions(k_pos, shape, size)
    more = jax.random.uniform(k_more, (max_blocks,)) < continue_prob
    present = jnp.cumprod(more.at[0].set(True)).astype(bool)
    return origin, size, present


def out_paint_blocks(key: jax.Array, shape, max_extra_blocks: int, continue_prob: float = 0.95):
    """Kept blocks of size n - randint(3n//7, 4n//7) at randint(3, n - size - 3): one, then
    up to `max_extra_blocks` more, each with probability `continue_prob` while the previous
    ones were. Returns (origins, sizes, present)."""
    k_size, k_pos, k_more = jax.random.split(key, 3)
    n = np.asarray(shape)
    size = n - _randint(k_size, (1 + max_extra_blocks, 3), 3 * n // 7, 4 * n // 7)
    origin = _margin_positions(k_pos, shape, size)
    more = jax.random.uniform(k_more, (1 + max_extra_blocks,)) < continue_prob
    present = jnp.cumprod(more.at[0].set(True)).astype(bool)
    return origin, size, present


def _noise(key, x):
    """Uniform noise in [0, 1), one value per voxel."""
    return _hash_uniform(jax.random.fold_in(key, 7), jnp.arange(x.size).reshape(x.shape))


def in_paint(key: jax.Array, x: jax.Array, max_blocks: int) -> jax.Array:
    """Replace random blocks by uniform noise (TransVW: 1 block; Models Genesis: up to 5)."""
    mask = _union_of_boxes(x.shape, *in_paint_blocks(key, x.shape, max_blocks))
    return jnp.where(mask, _noise(key, x), x.astype(jnp.float32)).astype(x.dtype)


def out_paint(key: jax.Array, x: jax.Array, max_extra_blocks: int) -> jax.Array:
    """Replace everything by uniform noise except random kept blocks (1 + up to extras)."""
    mask = _union_of_boxes(x.shape, *out_paint_blocks(key, x.shape, max_extra_blocks))
    return jnp.where(mask, x.astype(jnp.float32), _noise(key, x)).astype(x.dtype)


# --------------------------------------------------------------------------- flip
def flip_axes(key: jax.Array, prob: float, max_flips: int = 3):
    """The reference's flips: while u < prob (at most max_flips times) flip a random axis.
    Returns (per-axis parity of flips (3,) bool, whether any flip happened)."""
    k_u, k_axis = jax.random.split(key)
    happened = jnp.cumprod(jax.random.uniform(k_u, (max_flips,)) < prob)
    axes = jax.random.randint(k_axis, (max_flips,), 0, 3)
    parity = jnp.zeros((3,), jnp.int32).at[axes].add(happened.astype(jnp.int32)) % 2
    return parity.astype(bool), happened[0].astype(bool) if max_flips else jnp.array(False)


def flip(key: jax.Array, x: jax.Array, y: jax.Array, prob: float = 0.4, max_flips: int = 3):
    """Flip input and target along the same random axes (Models Genesis)."""
    parity, _ = flip_axes(key, prob, max_flips)
    for a in range(3):
        x = jnp.where(parity[a], jnp.flip(x, a), x)
        y = jnp.where(parity[a], jnp.flip(y, a), y)
    return x, y


# --------------------------------------------------------------------------- elastic
@functools.lru_cache(maxsize=32)
def _smoothing_basis(n: int, sigma: float, tol: float = 1e-5) -> np.ndarray:
    """Low-rank factor B (n, r) of scipy's gaussian_filter1d(mode='constant') along an
    axis of length n: the filter matrix A = U S V^T, B = U_r S_r, keeping the singular
    values that carry all but `tol` of the energy."""
    radius = int(4.0 * sigma + 0.5)  # scipy's truncate=4.0
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    i = np.arange(n)
    d = i[:, None] - i[None, :]
    a = np.where(np.abs(d) <= radius, taps[np.clip(d + radius, 0, 2 * radius)], 0.0)
    u, s, _ = np.linalg.svd(a)
    energy = np.cumsum(s**2) / np.sum(s**2)
    r = int(np.searchsorted(energy, 1.0 - tol) + 1)
    return (u[:, :r] * s[:r]).astype(np.float32)


def elastic_displacement(key: jax.Array, shape, alpha: float = 991.0, sigma: float = 8.0):
    """The reference's displacement fields for x and y: gaussian_filter(uniform(-1, 1),
    sigma, mode='constant') * alpha, drawn without filtering a full-size noise volume.

    The filter is separable, F = alpha * W x_1 A_x x_2 A_y x_3 A_z (A: the 1D filter
    matrices, zero padding included). Writing A = U S V^T per axis, V^T W is again white
    noise with the variance of W (1/3), so F = alpha * C x_1 U_x S_x ... with C white of
    shape (r_x, r_y, r_z): the same covariance (borders included), from a few hundred
    random numbers. The smoothing keeps only ~n/(sigma) singular values (e.g. 13 x 13 x 7
    for 64x64x32, sigma 8); C is Gaussian where the reference field is a sum of thousands
    of uniforms, i.e. Gaussian to a very good approximation.
    """
    bases = [jnp.asarray(_smoothing_basis(int(n), float(sigma))) for n in shape]
    core = jax.random.normal(key, (2, *(b.shape[1] for b in bases))) * np.sqrt(1.0 / 3.0)
    # One dot per factor: the full-size field is materialised once. (Written as fused
    # multiply-adds instead, XLA:CPU recomputes it inside each of the four gathers.)
    field = jnp.einsum("fabc,xa,yb,zc->fxyz", core * alpha, *bases)
    return field[0], field[1]


def _reflect(i: jax.Array, n: int) -> jax.Array:
    """scipy's 'reflect' boundary (d c b a | a b c d | d c b a) for integer indices."""
    m = jnp.mod(i, 2 * n)
    return jnp.where(m >= n, 2 * n - 1 - m, m)


def elastic(key: jax.Array, x: jax.Array, alpha: float = 991.0, sigma: float = 8.0) -> jax.Array:
    """Elastic deformation in x and y (not z), linear interpolation, reflected edges."""
    shape = x.shape
    dx, dy = elastic_displacement(key, shape, alpha, sigma)
    gx, gy, gz = _grid(shape)
    cx, cy = gx + dx, gy + dy
    x0, y0 = jnp.floor(cx), jnp.floor(cy)
    fx, fy = cx - x0, cy - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = x.reshape(-1).astype(jnp.float32)
    gz = jnp.broadcast_to(gz, shape)

    def at(ix, iy):
        return flat[_flat_index(shape, _reflect(ix, shape[0]), _reflect(iy, shape[1]), gz)]

    out = ((1 - fx) * ((1 - fy) * at(x0, y0) + fy * at(x0, y0 + 1))
           + fx * ((1 - fy) * at(x0 + 1, y0) + fy * at(x0 + 1, y0 + 1)))
    return out.astype(x.dtype)


# --------------------------------------------------------------------------- policies
def _paint(key, x, active, inner, cfg):
    """in_paint(key, x) where `inner`, out_paint(key, x) elsewhere, x where not `active`:
    one mask and one noise field instead of both transforms' outputs."""
    shape = x.shape
    holes = _union_of_boxes(shape, *in_paint_blocks(key, shape, cfg.in_paint.max_blocks))
    kept = _union_of_boxes(shape, *out_paint_blocks(key, shape, cfg.out_paint.max_extra_blocks))
    return jnp.where(active & jnp.where(inner, holes, ~kept), _noise(key, x), x)


def _shuffle_where(key, x, do, num_blocks):
    if num_blocks <= EXACT_SHUFFLE_MAX_BLOCKS:
        return _exact_shuffle(key, x, num_blocks, enabled=do)
    return jnp.where(do, local_shuffle(key, x, num_blocks), x)


def transvw(key: jax.Array, x: jax.Array, cfg: ml_collections.ConfigDict):
    """TransVW: elastic (if enabled), then exactly one of shuffle / non-linear / in-paint /
    out-paint, drawn with `cfg.choice_weights`. Returns (input, target, transform_id).

    The result equals the chosen transform applied with this key's sub-key (tested); it is
    computed as one pass per kind of work with the others masked off, because under vmap
    a switch evaluates every branch for every cube.
    """
    k_elastic, k_choice, k_t = jax.random.split(key, 3)
    target, dtype = x, x.dtype
    x = x.astype(jnp.float32)
    if cfg.elastic.enabled:
        x = elastic(k_elastic, x, cfg.elastic.alpha, cfg.elastic.sigma)
    weights = np.asarray(cfg.choice_weights, np.float32)
    choice = jax.random.choice(k_choice, 4, p=jnp.asarray(weights / weights.sum())).astype(jnp.int32)
    x = _shuffle_where(k_t, x, choice == SHUFFLE, cfg.local_shuffle.num_blocks)
    x = jnp.where(choice == NONLINEAR, _apply_table(nonlinear_curve(k_t)[0], x), x)
    x = _paint(k_t, x, choice >= IN_PAINT, choice == IN_PAINT, cfg)
    return x.astype(dtype), target, choice


def genesis(key: jax.Array, x: jax.Array, cfg: ml_collections.ConfigDict):
    """Models Genesis: flip (input and target), local shuffle, non-linear, then in- or
    out-painting, each with its probability. Returns (input, target, bit mask of
    transforms applied). The flips and a many-block shuffle are one gather."""
    k_flip, k_shuffle, k_nonlinear, k_paint, k_dice = jax.random.split(key, 5)
    u = jax.random.uniform(k_dice, (4,))
    shape, dtype = x.shape, x.dtype
    parity, flipped = flip_axes(k_flip, cfg.flip.prob, cfg.flip.max_flips)

    def flip_coords(coords):
        return [jnp.where(p, n - 1 - c, c) for p, n, c in zip(parity, shape, coords, strict=True)]

    flat = x.reshape(-1)
    target = flat[_flat_index(shape, *flip_coords(_grid(shape)))]
    do_shuffle = u[0] < cfg.local_shuffle.prob
    if cfg.local_shuffle.num_blocks > EXACT_SHUFFLE_MAX_BLOCKS:
        src = _tiled_shuffle_source(k_shuffle, shape, cfg.local_shuffle.num_blocks)
        src = [jnp.where(do_shuffle, s, g) for s, g in zip(src, _grid(shape), strict=True)]
        x = flat[_flat_index(shape, *flip_coords(src))].astype(jnp.float32)
    else:
        x = _exact_shuffle(k_shuffle, target.astype(jnp.float32), cfg.local_shuffle.num_blocks, do_shuffle)
    do_nonlinear = u[1] < cfg.nonlinear.prob
    x = jnp.where(do_nonlinear, _apply_table(nonlinear_curve(k_nonlinear)[0], x), x)
    do_paint = u[2] < cfg.paint.prob
    inner = u[3] < cfg.paint.inpaint_prob
    x = _paint(k_paint, x, do_paint, inner, cfg)
    bits = (flipped.astype(jnp.int32) << FLIP | do_shuffle.astype(jnp.int32) << SHUFFLE
            | do_nonlinear.astype(jnp.int32) << NONLINEAR
            | (do_paint & inner).astype(jnp.int32) << IN_PAINT
            | (do_paint & ~inner).astype(jnp.int32) << OUT_PAINT)
    return x.astype(dtype), target, bits


POLICIES = {"transvw": transvw, "genesis": genesis}


def apply_policy(key: jax.Array, x: jax.Array, cfg: ml_collections.ConfigDict):
    """Run the policy named by `cfg.policy` on one cube."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"transforms.policy: unknown policy {cfg.policy!r}; known: {sorted(POLICIES)}")
    return POLICIES[cfg.policy](key, x, cfg)


def batch_policy(keys: jax.Array, cubes: jax.Array, cfg: ml_collections.ConfigDict):
    """`apply_policy` over a batch: keys (B,), cubes (B, X, Y, Z)."""
    return jax.vmap(functools.partial(apply_policy, cfg=cfg))(keys, cubes)
