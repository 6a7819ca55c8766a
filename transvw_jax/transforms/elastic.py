"""Elastic deformation of TransVW (docs/REFERENCE.md section 3, transforms): x and y displacement fields,
Gaussian-smoothed uniform noise, linear interpolation with reflected edges.

Two implementations of the same arithmetic (`impl`): "xla", pure JAX (the definition, and
what accelerators run), and "native", one XLA FFI custom call on the CPU
(native/elastic_cpu.cc) that evaluates the low-rank field voxel by voxel instead of writing
it to memory, and samples with plain loads where XLA:CPU emits a scalar gather loop.
"auto" takes native on a one-device CPU backend where it can be built, else xla. They
agree to float32 rounding (tested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from transvw_jax import native
from transvw_jax.transforms import cube_ops as C

ELASTIC_IMPLS = ("auto", "xla", "native")
# The native kernel's limit on the smoothing ranks (elastic_cpu.cc: kMaxRank; about n / sigma
# per axis, 9 x 9 x 5 at 64x64x32 and sigma 8); "auto" uses xla beyond it.
NATIVE_MAX_RANK = 64


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


def native_fits(shape, sigma: float) -> bool:
    return max(_smoothing_basis(int(n), float(sigma)).shape[1] for n in shape) <= NATIVE_MAX_RANK


def check_impl(impl: str) -> None:
    """Raise ValueError naming transforms.elastic.impl when `impl` is not a known value.
    Pure: whether "native" can run here is decided with the platform (`transvw_jax.resolve`,
    or `resolve_impl` for library callers), never while a config is validated."""
    if impl not in ELASTIC_IMPLS:
        raise ValueError(f"transforms.elastic.impl: {impl!r} is not one of {', '.join(ELASTIC_IMPLS)}")


def resolve_impl(impl: str, shape, sigma: float = 8.0) -> str:
    """"xla" or "native" for a cube shape; raises ValueError naming transforms.elastic.impl
    when "native" is asked for and cannot run here (see `check_impl`) or on this shape."""
    from transvw_jax import resolve  # the one decision, also the command's
    from transvw_jax.errors import ConfigError

    check_impl(impl)
    if impl == "xla":  # the command's resolved choice on accelerators: nothing to probe
        return impl
    try:
        return resolve.choose_elastic_impl(impl, resolve.Platform.current(), tuple(shape), sigma)[0]
    except ConfigError as e:
        raise ValueError(str(e)) from None


def _elastic_native(key: jax.Array, x: jax.Array, alpha: float, sigma: float) -> jax.Array:
    native.load_elastic()
    core, bx, by, bz = _field_factors(key, x.shape, alpha, sigma)
    call = jax.ffi.ffi_call(native.ELASTIC_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                            vmap_method="expand_dims")
    return call(x.astype(jnp.float32), core, bx, by, bz)


def elastic(key: jax.Array, x: jax.Array, alpha: float = 991.0, sigma: float = 8.0,
            impl: str = "auto") -> jax.Array:
    """Elastic deformation in x and y (not z), linear interpolation, reflected edges.
    `impl`: "xla", "native" or "auto" (see the module docstring)."""
    if resolve_impl(impl, x.shape, sigma) == "native":
        return _elastic_native(key, x, alpha, sigma).astype(x.dtype)
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
