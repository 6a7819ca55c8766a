"""Layers of the 3D U-Net, written so that every parameter maps one to one onto PyTorch.

Each layer owns its parameter layout explicitly (rather than relying on flax's built-in
modules) for two reasons: the PyTorch export needs a fixed, documented layout, and the
convolution arithmetic can later be swapped for a faster formulation on a given backend
without touching parameter names or shapes.

Layouts (Flax <-> PyTorch):
  Conv3D.kernel          (kx, ky, kz, C_in, C_out)  <->  weight (C_out, C_in, kx, ky, kz)
  ConvTranspose2x.kernel (2, 2, 2, C_in, C_out)     <->  weight (C_in, C_out, 2, 2, 2)
  Dense.kernel           (C_in, C_out)              <->  weight (C_out, C_in)
  BatchNorm scale/bias, batch_stats mean/var        <->  weight/bias, running_mean/var
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from transvw_jax import native

Dtype = Any

BN_MODES = ("reference", "standard")


def torch_default_init(fan_in: int):
    """PyTorch's default Conv/Linear initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Matching it keeps the early training dynamics of the reference (kaiming_uniform with
    a=sqrt(5) reduces to this bound for weights, and biases use the same bound).
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


CONV_IMPLS = ("xla3d", "matmul", "onednn")

# Patch matrix of one slab of x-planes in the matmul form, at most this many bytes.
_SLAB_BYTES = 16 << 20


def _slab_planes(shape: tuple[int, ...], taps: int, itemsize: int) -> int:
    """Largest divisor of X whose slab's patch matrix (whole batch) fits in _SLAB_BYTES,
    at least 1."""
    b, sx, sy, sz, cin = shape
    per_plane = b * sy * sz * taps * cin * itemsize
    return max(d for d in range(1, sx + 1) if sx % d == 0 and (d == 1 or d * per_plane <= _SLAB_BYTES))


def _patches(xp: jax.Array, start: int | jax.Array, planes: int, shape: tuple[int, ...], k: int) -> jax.Array:
    """Patch matrix (B * planes * Y * Z, k^3 * C) of x-planes [start, start + planes) of the
    padded batch xp (B, X + k - 1, Y + k - 1, Z + k - 1, C), columns ordered (i, j, m, c)
    like kernel.reshape(k^3 * C, C_out).

    One slab covering the whole cube (small cubes) is built axis by axis (k shifts along
    z, then y, then x: 3k small concatenations), which XLA compiles faster than one
    concatenation of k^3 views, and compile time dominates for small models (the tests).
    Slabs of a large cube take the single k^3-view concatenation, which writes fewer
    bytes and runs faster (figures: benchmarks/RESULTS.md)."""
    b, sx, sy, sz, cin = shape
    slab = lax.dynamic_slice_in_dim(xp, start, planes + k - 1, axis=1)
    if planes == sx:
        by_z = jnp.concatenate([slab[:, :, :, m:m + sz] for m in range(k)], axis=-1)
        by_y = jnp.concatenate([by_z[:, :, j:j + sy] for j in range(k)], axis=-1)
        cols = jnp.concatenate([by_y[:, i:i + planes] for i in range(k)], axis=-1)
    else:
        taps = [(i, j, m) for i in range(k) for j in range(k) for m in range(k)]
        cols = jnp.concatenate([slab[:, i:i + planes, j:j + sy, m:m + sz] for i, j, m in taps], axis=-1)
    return cols.reshape(b * planes * sy * sz, k**3 * cin)


def _padded_slabs(x: jax.Array, k: int) -> tuple[jax.Array, int]:
    """x padded by k // 2 on the three spatial axes, and the x-planes per slab."""
    h = k // 2
    xp = jnp.pad(x, ((0, 0), (h, h), (h, h), (h, h), (0, 0)))
    return xp, _slab_planes(x.shape, k**3, x.dtype.itemsize)


def _matmul_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' correlation as patch-matrix matmuls, slab of x-planes by slab (`lax.map`),
    so that one slab's patch matrix stays small; the batch axis stays whole (and sharded
    where the batch is)."""
    b, sx, sy, sz, cin = x.shape
    k, cout = kernel.shape[0], kernel.shape[-1]
    xp, planes = _padded_slabs(x, k)
    weights = kernel.reshape(k**3 * cin, cout)

    def slab(i):
        return (_patches(xp, i * planes, planes, x.shape, k) @ weights).reshape(b, planes, sy, sz, cout)

    if planes == sx:  # one slab: no loop (small cubes compile faster)
        return slab(0)
    out = lax.map(slab, jnp.arange(sx // planes))  # (slabs, B, planes, Y, Z, C_out)
    return jnp.moveaxis(out, 0, 1).reshape(b, sx, sy, sz, cout)


def _matmul_kernel_grad(x: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """d(sum(g * conv(x, W)))/dW = patches(x)^T @ g summed over slabs of x-planes."""
    b, sx, sy, sz, cin = x.shape
    cout = g.shape[-1]
    xp, planes = _padded_slabs(x, k)

    def add_slab(i, acc):
        cols = _patches(xp, i * planes, planes, x.shape, k)
        gs = lax.dynamic_slice_in_dim(g, i * planes, planes, axis=1).reshape(-1, cout)
        return acc + jnp.dot(cols.T, gs, preferred_element_type=jnp.float32)

    zero = jnp.zeros((k**3 * cin, cout), jnp.float32)
    acc = add_slab(0, zero) if planes == sx else lax.fori_loop(0, sx // planes, add_slab, zero)
    return acc.reshape(k, k, k, cin, cout)


@jax.custom_vjp
def _conv3d_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _matmul_forward(x, kernel)


def _conv3d_matmul_fwd(x, kernel):
    return _matmul_forward(x, kernel), (x, kernel)


def _conv3d_matmul_bwd(res, g):
    x, kernel = res
    k = kernel.shape[0]
    # The input gradient of a 'same' correlation is the 'same' correlation of g with the
    # kernel flipped in space and transposed in channels: the same matmul form.
    dx = _matmul_forward(g, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4))
    return dx, _matmul_kernel_grad(x, g, k).astype(kernel.dtype)


_conv3d_matmul.defvjp(_conv3d_matmul_fwd, _conv3d_matmul_bwd)


def _onednn_call(name: str, shape: tuple[int, ...], *args: jax.Array) -> jax.Array:
    """One of the three oneDNN custom calls; the result has the operands' dtype."""
    native.load()
    out = jax.ShapeDtypeStruct(shape, args[0].dtype)
    return jax.ffi.ffi_call(native.TARGETS[name], out, vmap_method="sequential")(*args)


@jax.custom_vjp
def _conv3d_onednn(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _onednn_call("forward", (*x.shape[:-1], kernel.shape[-1]), x, kernel)


def _conv3d_onednn_fwd(x, kernel):
    return _conv3d_onednn(x, kernel), (x, kernel)


def _conv3d_onednn_bwd(res, g):
    x, kernel = res
    # Each gradient is its own custom call, so XLA drops the input gradient where nothing
    # uses it (the first layer's).
    dx = _onednn_call("backward_data", x.shape, g, kernel)
    return dx, _onednn_call("backward_weights", kernel.shape, x, g)


_conv3d_onednn.defvjp(_conv3d_onednn_fwd, _conv3d_onednn_bwd)


def default_conv_impl(backend: str | None = None) -> str:
    """What `model.conv_impl = "auto"` means. On GPU/TPU "xla3d" (cuDNN / the TPU
    compiler). On the CPU backend "onednn" where it can run (see `transvw_jax.native`)
    and there is one device: XLA does not know how to split a custom call along a
    sharded batch, so with several (simulated) CPU devices "matmul", XLA's own fast path,
    keeps the batch sharded. Without oneDNN (no C++ compiler, no oneDNN headers, another
    platform), "matmul" too, and one warning per process names the reason and the fix."""
    from transvw_jax import resolve  # the one decision, also the command's

    return resolve.choose_conv_impl("auto", resolve.Platform.current(backend))[0]


def conv3d_same(x: jax.Array, kernel: jax.Array, impl: str = "xla3d") -> jax.Array:
    """Stride-1 'same' 3D convolution (cross-correlation) of x (B, X, Y, Z, C_in) with
    kernel (kx, ky, kz, C_in, C_out), odd kernel sizes.

    impl="xla3d" is XLA's 3D convolution (cuDNN / the TPU compiler on accelerators).
    impl="onednn" (the CPU default where it can run, see `default_conv_impl`) calls
    oneDNN's convolution, forward and both gradients, through XLA FFI custom calls
    (`transvw_jax.native`), in float32, or bfloat16 on CPUs with AVX-512 (other cases take
    the matmul form): XLA:CPU's own 3D convolution runs on a generic path, and oneDNN's
    kernels are the ones PyTorch uses on the CPU. impl="matmul" computes it, and both its
    gradients (a custom VJP), as matmuls of patch matrices built slab of x-planes by slab:
    the input gradient is the same correlation of the output gradient with the kernel
    flipped and transposed, the kernel gradient patches(x)^T @ g; it is XLA's fastest CPU
    path that keeps a sharded batch sharded. Step times of each: benchmarks/RESULTS.md.
    """
    if impl == "xla3d":
        return lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if impl == "matmul":
        return _conv3d_matmul(x, kernel)
    if impl == "onednn":
        supported = x.dtype == jnp.float32 or (x.dtype == jnp.bfloat16 and native.supports_bfloat16())
        if not supported or kernel.dtype != x.dtype:
            return _conv3d_matmul(x, kernel)  # float32, and bfloat16 where the CPU has it
        return _conv3d_onednn(x, kernel)
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")


class Conv3D(nn.Module):
    """3D convolution with 'same' padding (PyTorch padding=k//2 for odd k) and a bias.

    `impl` chooses the arithmetic (see `conv3d_same`); parameters are the same for all.
    """

    features: int
    kernel_size: int = 3
    dtype: Dtype = jnp.float32
    impl: str = "xla3d"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        init = torch_default_init(cin * k**3)
        kernel = self.param("kernel", init, (k, k, k, cin, self.features), jnp.float32)
        bias = self.param("bias", init, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        if k == 1:
            y = jnp.einsum("...c,co->...o", x, kernel[0, 0, 0].astype(self.dtype))
        else:
            y = conv3d_same(x, kernel.astype(self.dtype), self.impl)
        return y + bias.astype(self.dtype)


class ConvTranspose2x(nn.Module):
    """Transposed convolution with kernel 2 and stride 2, as one matmul and a reshape.

    With kernel == stride the output windows do not overlap: every input voxel writes its
    own 2x2x2 output block, out[2x+i, 2y+j, 2z+k] = x[x, y, z] @ W[i, j, k]. An einsum to
    (..., 2, 2, 2, C_out) followed by an interleaving reshape computes exactly that, and
    avoids the lhs-dilated convolution that XLA (CPU, and cuDNN for 3D) lowers slowly.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        # PyTorch computes fan_in of a ConvTranspose weight (C_in, C_out, 2, 2, 2) from
        # its second dimension: C_out * 8.
        init = torch_default_init(self.features * 8)
        kernel = self.param("kernel", init, (2, 2, 2, cin, self.features), jnp.float32)
        bias = self.param("bias", init, (self.features,), jnp.float32)
        b, sx, sy, sz, _ = x.shape
        y = jnp.einsum("bxyzc,ijkco->bxiyjzko", x.astype(self.dtype), kernel.astype(self.dtype))
        y = y.reshape(b, 2 * sx, 2 * sy, 2 * sz, self.features)
        return y + bias.astype(self.dtype)


class Dense(nn.Module):
    """Fully connected layer with PyTorch's default initialisation."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        init = torch_default_init(cin)
        kernel = self.param("kernel", init, (cin, self.features), jnp.float32)
        bias = self.param("bias", init, (self.features,), jnp.float32)
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class BatchNorm(nn.Module):
    """Batch normalisation with PyTorch's conventions (eps 1e-5, momentum 0.1).

    mode="reference" normalises with the current batch's statistics in training and in
    evaluation alike, as the original TransVW / Models Genesis code does (its
    ContBatchNorm3d always calls batch_norm in training mode). mode="standard" uses the
    running averages when train=False. Running averages are updated only when train=True
    (the original also updates them during evaluation; they are unused in reference mode).
    The running variance uses the unbiased batch variance, as PyTorch does. Statistics
    are computed in float32 whatever the compute dtype.

    `mask` (B,) bool, optional: only the rows where it is true enter the batch statistics
    (the others are normalised with them too, and changed nothing). Evaluation pads its
    last batch with copies of a real cube; with the mask those copies do not move any
    real cube's result, so validation figures do not depend on the batch size or the
    device count. The sums run over the whole (sharded) batch axis: under jit the
    statistics are global, as without a mask. None: every row.
    """

    mode: str = "reference"
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        if self.mode not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {self.mode!r}")
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))

        xf = x.astype(jnp.float32)
        if train or self.mode == "reference":
            axes = tuple(range(x.ndim - 1))
            if mask is None:
                mean = xf.mean(axes)
                var = jnp.square(xf - mean).mean(axes)
                n = x.size // c
                bessel = n / max(n - 1, 1)
            else:
                keep = mask.astype(jnp.bool_).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
                n = keep.sum(dtype=jnp.float32) * (x.size // (c * x.shape[0]))
                mean = jnp.where(keep, xf, 0.0).sum(axes) / jnp.maximum(n, 1.0)
                var = jnp.where(keep, jnp.square(xf - mean), 0.0).sum(axes) / jnp.maximum(n, 1.0)
                bessel = n / jnp.maximum(n - 1.0, 1.0)
            if train and not self.is_initializing():
                unbiased = var * bessel
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        y = (xf - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def _halve_max(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The max of the two entries along `axis` (of size 2), and where the first one won.
    A NaN wins, as in jnp.max and PyTorch: a diverging run must not lose it here."""
    first, second = lax.index_in_dim(x, 0, axis, keepdims=False), lax.index_in_dim(x, 1, axis, keepdims=False)
    keep_first = (first >= second) | jnp.isnan(first)
    return jnp.where(keep_first, first, second), keep_first


def _split_back(g: jax.Array, keep_first: jax.Array, axis: int) -> jax.Array:
    zero = jnp.zeros_like(g)
    return jnp.stack([jnp.where(keep_first, g, zero), jnp.where(keep_first, zero, g)], axis)


def _windows(x: jax.Array) -> jax.Array:
    b, sx, sy, sz, c = x.shape
    return x.reshape(b, sx // 2, 2, sy // 2, 2, sz // 2, 2, c)


def _max_pool_2x_fwd(x: jax.Array):
    # The window's axes 6, 4, 2, one pair at a time: each choice is kept for the backward.
    y, keep_z = _halve_max(_windows(x), 6)
    y, keep_y = _halve_max(y, 4)
    y, keep_x = _halve_max(y, 2)
    return y, (keep_x, keep_y, keep_z)


def _max_pool_2x_bwd(res, g: jax.Array):
    keep_x, keep_y, keep_z = res
    g = _split_back(g, keep_x, 2)
    g = _split_back(g, keep_y, 4)
    g = _split_back(g, keep_z, 6)
    b, x, _, y, _, z, _, c = g.shape
    return (g.reshape(b, 2 * x, 2 * y, 2 * z, c),)


@jax.custom_vjp
def max_pool_2x(x: jax.Array) -> jax.Array:
    """2x2x2 max pooling with stride 2, as reshapes and elementwise maxima (XLA:CPU runs
    them, forward and backward, much faster than nn.max_pool's reduce_window).

    The gradient goes to one element of each window (the first of tied maxima), as in
    PyTorch's max_pool3d, through the choices made in the forward pass. `jnp.max`'s own
    gradient instead finds the maxima again by comparing the input with the result and
    divides by their count: when XLA computes the input twice, in two fusions rounded
    differently, no element compares equal and the gradient is 0/0 = NaN (seen on CPU
    with JAX_DISABLE_MOST_OPTIMIZATIONS=1: training diverged at its second step). Being a
    custom VJP, it has reverse-mode derivatives only (grad, vjp), not jvp / jacfwd.
    """
    return _max_pool_2x_fwd(x)[0]


max_pool_2x.defvjp(_max_pool_2x_fwd, _max_pool_2x_bwd)
