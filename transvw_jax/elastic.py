"""Elastic deformation of TransVW (REFERENCE.md section 3): x and y displacement fields,
Gaussian-smoothed uniform noise, linear interpolation with reflected edges."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from transvw_jax import cube_ops as C


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


def _field_factors(key: jax.Array, shape, alpha: float, sigma: float):
    """The random core (2, r_x, r_y, r_z), scaled, and the three per-axis bases: the one
    draw that `elastic_displacement` and `elastic_at` must share to agree."""
    bx, by, bz = (jnp.asarray(_smoothing_basis(int(n), float(sigma))) for n in shape)
    core = jax.random.normal(key, (2, bx.shape[1], by.shape[1], bz.shape[1])) * (np.sqrt(1.0 / 3.0) * alpha)
    return core, bx, by, bz


def _partial_field(key: jax.Array, shape, alpha: float, sigma: float):
    """The fields contracted on x and y, (2, X, Y, r_z), and the z basis (Z, r_z): the one
    draw that `elastic_displacement` and `elastic_at` share to agree, and the step both
    reuse (XLA computes it once when both are traced on the same key)."""
    core, bx, by, bz = _field_factors(key, shape, alpha, sigma)
    return jnp.einsum("fabc,xa,yb->fxyc", core, bx, by), bz


def elastic_displacement(key: jax.Array, shape, alpha: float = 991.0, sigma: float = 8.0):
    """The reference's displacement fields for x and y: gaussian_filter(uniform(-1, 1),
    sigma, mode='constant') * alpha, drawn without filtering a full-size noise volume.

    The filter is separable, F = alpha * W x_1 A_x x_2 A_y x_3 A_z (A: the 1D filter
    matrices, zero padding included). Writing A = U S V^T per axis, V^T W is again white
    noise with the variance of W (1/3), so F = alpha * C x_1 U_x S_x ... with C white of
    shape (r_x, r_y, r_z): the same covariance (borders included), from a few hundred
    random numbers. The smoothing keeps only ~n/(sigma) singular values (9 x 9 x 5
    for 64x64x32, sigma 8); C is Gaussian where the reference field is a sum of thousands
    of uniforms, i.e. Gaussian to a very good approximation.
    """
    # Contract x and y on the small core first, z last as one matmul whose output is
    # already in (X, Y, Z) order: z has the smallest rank, so the full-size step is the
    # cheapest, and a dot is computed once (written as fused multiply-adds instead,
    # XLA:CPU recomputes the field inside each of the four gathers). Under vmap the
    # matmul absorbs the batch.
    partial, bz = _partial_field(key, shape, alpha, sigma)
    field = (partial.reshape(-1, bz.shape[1]) @ bz.T).reshape(2, *shape)
    return field[0], field[1]


def _reflect(i: jax.Array, n: int) -> jax.Array:
    """scipy's 'reflect' boundary (d c b a | a b c d | d c b a) for integer indices."""
    m = jnp.mod(i, 2 * n)
    return jnp.where(m >= n, 2 * n - 1 - m, m)


def _sample(x: jax.Array, cx: jax.Array, cy: jax.Array, iz: jax.Array) -> jax.Array:
    """Bilinear value of cube x at real (cx, cy) and integer iz, reflected edges."""
    shape = x.shape
    x0, y0 = jnp.floor(cx), jnp.floor(cy)
    fx, fy = cx - x0, cy - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = x.reshape(-1).astype(jnp.float32)

    def at(ix, iy):
        return flat[C.flat_index(shape, _reflect(ix, shape[0]), _reflect(iy, shape[1]), iz)]

    return ((1 - fx) * ((1 - fy) * at(x0, y0) + fy * at(x0, y0 + 1))
            + fx * ((1 - fy) * at(x0 + 1, y0) + fy * at(x0 + 1, y0 + 1)))


def elastic(key: jax.Array, x: jax.Array, alpha: float = 991.0, sigma: float = 8.0) -> jax.Array:
    """Elastic deformation in x and y (not z), linear interpolation, reflected edges."""
    dx, dy = elastic_displacement(key, x.shape, alpha, sigma)
    gx, gy, gz = C.grid(x.shape)
    return _sample(x, gx + dx, gy + dy, jnp.broadcast_to(gz, x.shape)).astype(x.dtype)


def elastic_at(key: jax.Array, x: jax.Array, flat_index: jax.Array, alpha: float = 991.0,
               sigma: float = 8.0) -> jax.Array:
    """`elastic(key, x, ...).reshape(-1)[flat_index]` (float32) without deforming the whole
    cube: the fields at just those voxels, from the same low-rank factors."""
    shape = x.shape
    partial, bz = _partial_field(key, shape, alpha, sigma)
    ix, iy, iz = jnp.unravel_index(flat_index, shape)
    # Unrolled multiply-adds over the few z components: written as a sum (or einsum),
    # XLA:CPU makes it a batch of tiny dots, which costs more than the products.
    rows, bz_rows = partial[:, ix, iy, :], bz[iz]
    field = sum(rows[..., c] * bz_rows[..., c] for c in range(bz.shape[1]))
    return _sample(x, ix + field[0], iy + field[1], iz)
