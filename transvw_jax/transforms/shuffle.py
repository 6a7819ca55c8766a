"""Local pixel shuffling (docs/REFERENCE.md section 3, transforms): exact for a few blocks, a tiling with
the same per-voxel statistics for the 10,000-block Models Genesis strength."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from transvw_jax.transforms import cube_ops as C

# Up to this many blocks the local shuffle follows the reference block by block; above it,
# the tiling formulation (see `local_shuffle`) keeps the cost at a few passes over the cube.
EXACT_SHUFFLE_MAX_BLOCKS = 32
_PRIMES = np.array([1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049, 1051, 1061, 1063, 1069,
                    1087, 1091, 1093, 1097], np.uint32)


def _shuffle_sizes_max(shape) -> np.ndarray:
    return np.maximum(1, np.asarray(shape) // 10)


def shuffle_blocks(key: jax.Array, shape: tuple[int, int, int], num_blocks: int):
    """The reference's shuffle blocks: sizes randint(1, n//10), origins randint(0, n - size).

    Returns (origins, sizes), each (num_blocks, 3) int32.
    """
    k_size, k_pos = jax.random.split(key)
    size = C.randint(k_size, (num_blocks, 3), 1, _shuffle_sizes_max(shape))
    origin = C.randint(k_pos, (num_blocks, 3), 0, jnp.asarray(shape) - size)
    return origin, size


# Slot indices take the low bits of a packed sort key; above this many slots the random
# part would be too short (ties) and the permutation comes from a float argsort instead.
_PACKED_SORT_MAX_SLOTS = 256


def _block_permutations(key, volume, slots: int):
    """One uniform random permutation of 0..volume[b]-1 per block b, in the first
    volume[b] entries of a row of `slots` (the rest keep the slots after them).

    A permutation is the order of random sort keys. Sorting the keys with the slot index
    packed into their low bits (one uint32 array, XLA:CPU's fast single-operand sort)
    costs a fraction of an argsort on CPU (benchmarks/RESULTS.md). The random part is then
    32 - ceil(log2(slots)) bits (25 at 64x64x32): two
    slots of a block tie with probability 2^-25, and a tie keeps slot order, so the
    permutation is uniform up to ~slots^2 / 2^26 (< 2e-4 per block here). Blocks of more
    than _PACKED_SORT_MAX_SLOTS slots (cubes above ~160 voxels per side) use the argsort.
    """
    num_blocks = volume.shape[0]
    j = jnp.arange(slots)
    valid = j[None, :] < volume[:, None]
    if slots > _PACKED_SORT_MAX_SLOTS:
        keys = jax.random.uniform(key, (num_blocks, slots))
        return jnp.argsort(jnp.where(valid, keys, 2.0), axis=1)
    index_bits = max(1, int(np.ceil(np.log2(slots))))
    random = jax.random.bits(key, (num_blocks, slots), jnp.uint32) >> index_bits << index_bits
    last = np.uint32((0xFFFFFFFF >> index_bits) << index_bits)  # unused slots sort last, in order
    packed = jnp.where(valid, random, last) | j.astype(jnp.uint32)
    return (jax.lax.sort(packed, dimension=1) & np.uint32((1 << index_bits) - 1)).astype(jnp.int32)


def exact_shuffle(key, x, num_blocks, enabled=True, read=None):
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
    perm = _block_permutations(k_perm, volume, slots)

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
    flat_dest = jnp.where(final, C.flat_index(shape, dest[..., 0], dest[..., 1], dest[..., 2]), x.size)
    flat_src = C.flat_index(shape, src[..., 0], src[..., 1], src[..., 2])
    # `read(flat_indices)` supplies the source values when `x` is computed on the fly
    # (TransVW reads them from the undeformed cube through the elastic map), so that x
    # itself has a single consumer and XLA computes it once.
    values = x.reshape(-1)[flat_src] if read is None else read(flat_src)
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


def _segments(key, n: int, kmax: int, rows: int = 1):
    """Cut [0, n) into random segments, independently in each of `rows` rows. Returns,
    each with a leading `rows` axis: per segment its start and length; per coordinate its
    segment's start, length, its offset inside it, the segment's index. Segments past the
    end have start >= n.

    Lengths k in 1..kmax are drawn with P(k) proportional to 1/(n - k + 1): a coordinate
    then lies in a segment of length k with probability proportional to k/(n - k + 1),
    which is how likely a reference block of size k (origin uniform in [0, n - k]) is to
    cover it. The draws are counter hashes (cube_ops.hash_uniform) compared with the
    cumulative distribution, far cheaper on CPU than threefry's categorical."""
    k = np.arange(1, kmax + 1)
    prob = 1.0 / (n - k + 1.0)
    cdf = jnp.asarray(np.cumsum(prob / prob.sum())[:-1], jnp.float32)
    u = C.hash_uniform(key, jnp.arange(rows * n, dtype=jnp.uint32).reshape(rows, n))
    lengths = 1 + jnp.sum(u[..., None] >= cdf, axis=-1, dtype=jnp.int32)
    starts = jnp.cumsum(lengths, axis=1) - lengths
    row = jnp.arange(rows)[:, None]
    first = jnp.zeros((rows, n), jnp.int32).at[row, starts].add(1, mode="drop")
    seg = jnp.cumsum(first, axis=1) - 1
    start = jnp.take_along_axis(starts, seg, axis=1)
    length = jnp.minimum(jnp.take_along_axis(lengths, seg, axis=1), n - start)
    return starts, lengths, start, length, jnp.arange(n) - start, seg


def _tile_grid(n: int, kmax: int) -> int:
    """Segments per axis given a table entry: the mean segment is ~(kmax + 1) / 2 long, so
    an axis holds ~2n / (kmax + 1) of them; 1.5x that plus 4 is many standard deviations
    above (64 voxels, kmax 6: 18 +- 2 segments, 32 entries). Were an axis ever cut
    into more, the extra segments share the last entry's draws (still a permutation)."""
    return int(min(n, int(np.ceil(3.0 * n / (kmax + 1))) + 4))


def _systematic_draws(key, p, volume, row, bins: int):
    """Booleans with P(entry i) = p[i] exactly, and the number drawn among the entries of
    each volume bin (volume 1, 2-3, 4-7, ..., up to 2^(bins - 1)) within one of its
    expectation: systematic sampling, one uniform offset per bin, entries in order.
    Independent draws per tile would make the shuffled share of the cube vary from cube
    to cube several times more than in the reference, where it is a sum over 10,000
    independent blocks; here it varies only by the spread of volumes inside a bin."""
    which = jnp.clip(jnp.floor(jnp.log2(jnp.maximum(volume, 1.0))), 0, bins - 1).astype(jnp.int32)
    one_hot = which[:, None] == jnp.arange(bins)[None, :]
    # Running sums in entry order, in two levels (rows of `row` entries, then the rows'
    # totals): a long cumsum is a deep associative scan on XLA:CPU.
    w = jnp.where(one_hot, p[:, None], 0.0).reshape(-1, row, bins)
    inner = jnp.cumsum(w, axis=1)
    totals = jnp.cumsum(inner[:, -1], axis=0) - inner[:, -1]
    after = jnp.take_along_axis((inner + totals[:, None]).reshape(-1, bins), which[:, None], axis=1)[:, 0]
    u = jax.random.uniform(key, (bins,))[which]
    return jnp.floor(after + u) > jnp.floor(after - p + u)


def _tile_draws(key, shape, num_blocks, bounds, grid):
    """Per tile of the grid: 0 when the tile stays, else (multiplier << 16 | 16 random
    bits). `bounds`: per axis (tile starts, tile ends), broadcastable to `grid`."""
    k_cover, k_bits = jax.random.split(key)
    # Mean reference coverage over each tile, from a summed-area table: the box sum is the
    # signed sum of the table at the tile's eight corners.
    table = jnp.asarray(_coverage_integral(tuple(shape), num_blocks))
    (lx, hx), (ly, hy), (lz, hz) = bounds
    box = sum(sign * table[cx, cy, cz] for sign, cx, cy, cz in (
        (1, hx, hy, hz), (-1, lx, hy, hz), (-1, hx, ly, hz), (-1, hx, hy, lz),
        (1, lx, ly, hz), (1, lx, hy, lz), (1, hx, ly, lz), (-1, lx, ly, lz)))
    size = [jnp.maximum(h - l_, 1).astype(jnp.float32) for l_, h in bounds]
    coverage = box / (size[0] * size[1] * size[2])
    tile = jnp.arange(int(np.prod(grid)), dtype=jnp.uint32).reshape(grid)
    volume = (size[0] * size[1] * size[2]).reshape(-1)
    bins = int(np.log2(np.prod(_shuffle_sizes_max(shape)))) + 1  # volume 1 to the largest block's
    shuffled = _systematic_draws(k_cover, coverage.reshape(-1), volume, grid[2], bins).reshape(grid)
    bits = C.hash_bits(k_bits, tile)
    multiplier = jnp.asarray(_PRIMES)[(bits & 15).astype(jnp.int32)]
    return jnp.where(shuffled, multiplier << 16 | bits >> 16, jnp.uint32(0))


def tiled_shuffle_source(key, shape, num_blocks):
    """Source coordinates (three int32 arrays) of every voxel for a many-block shuffle, in
    a few passes (see `local_shuffle`). The per-tile draws are made once per tile (a
    table of a few thousand entries, `cube_ops.computed_once`), not once per voxel.

    The tiling is nested: x is cut into slabs, each slab's y independently into columns,
    each column's z independently into tiles (a k-d partition, not a product grid)."""
    k_x, k_y, k_z, k_draws = jax.random.split(key, 4)
    kmax = _shuffle_sizes_max(shape)
    if np.prod(kmax) * int(_PRIMES.max()) >= 2**22:
        raise ValueError(f"local_shuffle: cube {shape} too large for the tiled shuffle (float32 index "
                         "arithmetic); use cubes up to ~160 voxels per side")
    (nx, ny, nz), (mx, my, mz) = shape, (int(m) for m in kmax)
    grid = tuple(_tile_grid(n, int(m)) for n, m in zip(shape, kmax, strict=True))
    gx, gy, gz = grid
    sx_, lx_, x0, lx, rx, tx = (a[0] for a in _segments(k_x, nx, mx))  # (nx,)
    sy_, ly_, y0t, lyt, _, tyt = _segments(k_y, ny, my, gx)  # (gx, ny)
    sz_, lz_, z0t, lzt, _, tzt = _segments(k_z, nz, mz, gx * gy)  # (gx * gy, nz)
    # Tile bounds (clipped to the cube) per axis, broadcastable to the grid.
    bx = (jnp.clip(sx_[:gx], 0, nx), jnp.clip(sx_[:gx] + lx_[:gx], 0, nx))
    by = (jnp.clip(sy_[:, :gy], 0, ny), jnp.clip(sy_[:, :gy] + ly_[:, :gy], 0, ny))
    bz = (jnp.clip(sz_[:, :gz], 0, nz), jnp.clip(sz_[:, :gz] + lz_[:, :gz], 0, nz))
    bounds = [(a[:, None, None], b[:, None, None]) for a, b in [bx]]
    bounds += [(a[:, :, None], b[:, :, None]) for a, b in [by]]
    bounds += [(a.reshape(grid), b.reshape(grid)) for a, b in [bz]]
    draws = C.computed_once(k_draws, lambda: _tile_draws(k_draws, shape, num_blocks, bounds, grid))
    # Per voxel: its slab (x), column (x, y) and tile (x, y, z). Were an axis ever cut into
    # more segments than the grid holds, the extra ones share the last entry's cuts and
    # draws (still a permutation: sources stay inside the voxel's own segment).
    txc = jnp.minimum(tx, gx - 1)
    y0, ly, ty = (a[txc] for a in (y0t, lyt, tyt))  # (nx, ny)
    column = txc[:, None] * gy + jnp.minimum(ty, gy - 1)
    # One gather of the z cuts per voxel: start, length and tile index packed in 8 bits each.
    packed = C.computed_once(k_z, lambda: z0t | lzt << 8 | jnp.minimum(tzt, gz - 1) << 16)
    zcut = packed[column[:, :, None], jnp.arange(nz)[None, None, :]]
    z0, lz, tz = zcut & 255, (zcut >> 8) & 255, zcut >> 16
    d = draws.reshape(-1)[column[:, :, None] * gz + tz]
    # Integer division is scalar on x86 (no SIMD form) and float division slow: these
    # small non-negative integers are exact in float32, so quotients are floor((a + 0.5)
    # * (1 / b)): the +0.5 keeps a / b at least 0.5 / b from an integer, far beyond the
    # rounding of the reciprocal (a < 2^22).
    f32 = jnp.float32
    x0, lx, rx = (a[:, None, None].astype(f32) for a in (x0, lx, rx))
    y0, ly = (a[:, :, None].astype(f32) for a in (y0, ly))
    ry = jnp.arange(ny, dtype=f32)[None, :, None] - y0
    z0, lz = z0.astype(f32), lz.astype(f32)
    rz = jnp.arange(nz, dtype=f32)[None, None, :] - z0
    volume = lx * ly * lz
    local = (rx * ly + ry) * lz + rz
    offset = jnp.floor((d & 0xFFFF).astype(f32) * np.float32(2.0**-16) * volume)
    t = (d >> 16).astype(f32) * local + offset
    src = t - volume * jnp.floor((t + 0.5) * ((1.0 / lx) * (1.0 / ly) * (1.0 / lz)))
    q = jnp.floor((src + 0.5) * (1.0 / lz))
    sz = src - lz * q
    sx = jnp.floor((q + 0.5) * (1.0 / ly))
    sy = q - ly * sx
    return tuple(jnp.where(d != 0, (o + s).astype(jnp.int32), g)
                 for o, s, g in zip((x0, y0, z0), (sx, sy, sz), C.grid(shape), strict=True))


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
    than fragments of overlapping blocks.

    Across cubes, the reference's share of moved voxels is a sum over 10,000 independent
    blocks and varies little. A product grid's per-axis cuts (a few random lengths set
    every tile's volume) and independent whole-tile coverage draws (thousands of tiles,
    not ~130,000 voxels, share the luck) would make it vary several times more. So the
    tiling is nested (each x slab cuts y anew, each column z anew: the same per-voxel
    distribution of tile sizes) and tiles are drawn by systematic sampling per volume
    class (each still with its exact probability, the count per class fixed to within
    one), which brings the spread to the reference's (tests/test_transforms.py; figures in
    benchmarks/RESULTS.md). Cost: per-axis segment tables, a few random values and running
    sums per tile, two gathers of per-column tables and one of the cube.
    """
    shape = tuple(x.shape)
    if num_blocks <= 0:
        return x
    if num_blocks <= EXACT_SHUFFLE_MAX_BLOCKS:
        return exact_shuffle(key, x, num_blocks)
    return x.reshape(-1)[C.flat_index(shape, *tiled_shuffle_source(key, shape, num_blocks))]
