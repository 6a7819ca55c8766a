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
    gx, gy, gz = C.grid(shape)
    cx, cy = gx + dx, gy + dy
    x0, y0 = jnp.floor(cx), jnp.floor(cy)
    fx, fy = cx - x0, cy - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = x.reshape(-1).astype(jnp.float32)
    gz = jnp.broadcast_to(gz, shape)

    def at(ix, iy):
        return flat[C.flat_index(shape, _reflect(ix, shape[0]), _reflect(iy, shape[1]), gz)]

    out = ((1 - fx) * ((1 - fy) * at(x0, y0) + fy * at(x0, y0 + 1))
           + fx * ((1 - fy) * at(x0 + 1, y0) + fy * at(x0 + 1, y0 + 1)))
    return out.astype(x.dtype)
