"""Random flips of Models Genesis (docs/REFERENCE.md section 3), the same on input and target."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def flip_coords(parity, shape, coords):
    """Per-axis coordinates (broadcastable int arrays) mirrored where `parity` is set: the
    source coordinates of a flip, to fold it into a gather."""
    return [jnp.where(p, n - 1 - c, c) for p, n, c in zip(parity, shape, coords, strict=True)]


def flip_each_axis(keys: jax.Array, prob: float, *arrays: jax.Array) -> list[jax.Array]:
    """Fine-tuning's augmentation: per sample, each axis flipped with `prob`, the same flips
    on every array (an image and its label)."""

    def one(key, *xs):
        f = jax.random.bernoulli(key, prob, (3,))
        out = list(xs)
        for axis in range(3):
            out = [jnp.where(f[axis], jnp.flip(x, axis), x) for x in out]
        return tuple(out)

    return list(jax.vmap(one)(keys, *arrays))
