"""Non-linear intensity transform (docs/REFERENCE.md section 3): every voxel mapped through a
random monotone Bezier curve."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transvw_jax.transforms import cube_ops as C


def _bernstein(p1: jax.Array, p2: jax.Array, s: jax.Array) -> jax.Array:
    """One coordinate of the reference's cubic Bezier through 0, p1, p2, 1 at parameter s,
    in the reference's Bernstein order (point i weighs C(3, i) s^(3-i) (1-s)^i): the curve
    runs from the end point 1 at s = 0 to the origin at s = 1."""
    u = 1.0 - s
    return 3.0 * s * s * u * p1 + 3.0 * s * u * u * p2 + u * u * u


def nonlinear_curve(key: jax.Array, size: int = 1025, iters: int = 24):
    """The reference's random intensity curve as a lookup table on a uniform grid of [0, 1].

    A cubic Bezier through (0,0), p1, p2, (1,1), p1 and p2 uniform in [0,1]^2. The
    reference samples it at 100,000 values of s, sorts the x samples and (half the time)
    the y samples, and interpolates. With control points in [0,1] each coordinate is
    monotone in s (the derivative is a quadratic form that is non-negative on [0,1]), so
    the sorts only reverse the order: the curve maps g = X(s) to Y(s), or to Y(1 - s) when
    only x is sorted (a decreasing curve, "inverted"). Here s is solved from X(s) = g for
    every grid value g by `iters` bisection steps (float32 resolution), which is the
    exact curve where the reference has a piecewise-linear approximation of it, and costs
    far less than sampling, sorting and interpolating (benchmarks/RESULTS.md). The
    bisection is unrolled (a rolled loop runs its 24 small steps one by one) and wrapped in
    `cube_ops.computed_once`, so that the table is computed once, never re-fused into the
    per-voxel lookup. The table is monotone and maps {0, 1} onto {0, 1} exactly.

    Returns:
      (table of `size` values, inverted flag).
    """
    k_points, k_invert = jax.random.split(key)
    p = jax.random.uniform(k_points, (2, 2))
    inverted = jax.random.uniform(k_invert) < 0.5
    g = jnp.linspace(0.0, 1.0, size)

    def solve():
        lo, hi = jnp.zeros(size), jnp.ones(size)
        for _ in range(iters):  # unrolled: one fused pass instead of a loop of small steps
            mid = 0.5 * (lo + hi)
            right = _bernstein(p[0, 0], p[1, 0], mid) > g  # X decreases in s: the root is right of mid
            lo, hi = jnp.where(right, mid, lo), jnp.where(right, hi, mid)
        s = 0.5 * (lo + hi)
        table = _bernstein(p[0, 1], p[1, 1], jnp.where(inverted, 1.0 - s, s))
        ends = jnp.where(inverted, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
        return table.at[0].set(ends[0]).at[-1].set(ends[1])

    return C.computed_once(k_invert, solve), inverted


def apply_table(table: jax.Array, x: jax.Array) -> jax.Array:
    """x (clipped to [0, 1]) through the lookup table, linearly interpolated; float32."""
    pos = jnp.clip(x.astype(jnp.float32), 0.0, 1.0) * (table.shape[0] - 1)
    i = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, table.shape[0] - 2)
    frac = pos - i
    return table[i] * (1 - frac) + table[i + 1] * frac


def nonlinear(key: jax.Array, x: jax.Array) -> jax.Array:
    """Map every voxel through a random Bezier intensity curve (see `nonlinear_curve`)."""
    table, _ = nonlinear_curve(key)
    return apply_table(table, x).astype(x.dtype)
