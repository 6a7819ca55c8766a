"""In-painting and out-painting (docs/REFERENCE.md section 3): random blocks of the cube, or
everything but random blocks, replaced by uniform noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transvw_jax.transforms import cube_ops as C


def in_paint_blocks(key: jax.Array, shape, max_blocks: int, continue_prob: float = 0.95):
    """Blocks of size randint(n//6, n//3) at randint(3, n - size - 3), per axis. The first
    is always there; each further one with probability `continue_prob` while the previous
    ones were. Returns (origins, sizes, present)."""
    k_size, k_pos, k_more = jax.random.split(key, 3)
    n = np.asarray(shape)
    size = C.randint(k_size, (max_blocks, 3), n // 6, n // 3)
    origin = C.margin_positions(k_pos, shape, size)
    more = jax.random.uniform(k_more, (max_blocks,)) < continue_prob
    present = jnp.cumprod(more.at[0].set(True)).astype(bool)
    return origin, size, present


def out_paint_blocks(key: jax.Array, shape, max_extra_blocks: int, continue_prob: float = 0.95):
    """Kept blocks of size n - randint(3n//7, 4n//7) at randint(3, n - size - 3): one, then
    up to `max_extra_blocks` more, each with probability `continue_prob` while the previous
    ones were. Returns (origins, sizes, present)."""
    k_size, k_pos, k_more = jax.random.split(key, 3)
    n = np.asarray(shape)
    size = n - C.randint(k_size, (1 + max_extra_blocks, 3), 3 * n // 7, 4 * n // 7)
    origin = C.margin_positions(k_pos, shape, size)
    more = jax.random.uniform(k_more, (1 + max_extra_blocks,)) < continue_prob
    present = jnp.cumprod(more.at[0].set(True)).astype(bool)
    return origin, size, present


def noise(key: jax.Array, x: jax.Array) -> jax.Array:
    """Uniform noise in [0, 1), one value per voxel of x."""
    return C.hash_uniform(jax.random.fold_in(key, 7), jnp.arange(x.size).reshape(x.shape))


def in_paint(key: jax.Array, x: jax.Array, max_blocks: int) -> jax.Array:
    """Replace random blocks by uniform noise (TransVW: 1 block; Models Genesis: up to 5)."""
    mask = C.union_of_boxes(x.shape, *in_paint_blocks(key, x.shape, max_blocks))
    return jnp.where(mask, noise(key, x), x.astype(jnp.float32)).astype(x.dtype)


def out_paint(key: jax.Array, x: jax.Array, max_extra_blocks: int) -> jax.Array:
    """Replace everything by uniform noise except random kept blocks (1 + up to extras)."""
    mask = C.union_of_boxes(x.shape, *out_paint_blocks(key, x.shape, max_extra_blocks))
    return jnp.where(mask, x.astype(jnp.float32), noise(key, x)).astype(x.dtype)


def paint_where(key: jax.Array, x: jax.Array, active, inner, max_blocks: int,
                max_extra_blocks: int) -> jax.Array:
    """in_paint(key, x) where `inner`, out_paint(key, x) elsewhere, x where not `active`:
    one mask and one noise field instead of both transforms' outputs (the policies' form)."""
    shape = x.shape
    holes = C.union_of_boxes(shape, *in_paint_blocks(key, shape, max_blocks))
    kept = C.union_of_boxes(shape, *out_paint_blocks(key, shape, max_extra_blocks))
    return jnp.where(active & jnp.where(inner, holes, ~kept), noise(key, x), x)
