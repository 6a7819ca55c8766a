"""Small building blocks of the cube transforms: inclusive randint, box masks, flat
indices, and a keyed counter hash for cheap per-voxel random numbers."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def randint(key: jax.Array, shape: tuple[int, ...], lo: Any, hi: Any) -> jax.Array:
    """python's randint(lo, hi): both ends included."""
    return jax.random.randint(key, shape, lo, jnp.asarray(hi) + 1)


def axis_masks(shape: tuple[int, ...], start: jax.Array, size: jax.Array) -> list[jax.Array]:
    """Per-axis membership of boxes [start, start+size): start/size (K, 3) -> 3 x (K, n)."""
    return [
        (jnp.arange(n) >= start[:, a, None]) & (jnp.arange(n) < (start + size)[:, a, None])
        for a, n in enumerate(shape)
    ]


def union_of_boxes(shape, start, size, present) -> jax.Array:
    mx, my, mz = axis_masks(shape, start, size)
    inside = mx[:, :, None, None] & my[:, None, :, None] & mz[:, None, None, :]
    return jnp.any(inside & present[:, None, None, None], axis=0)


def margin_positions(key, shape, size, margin: int = 3) -> jax.Array:
    """randint(margin, n - size - margin) per axis, the reference's block placement; on
    cubes too small for the margins the range shrinks towards the border."""
    n = jnp.asarray(shape)
    lo = jnp.minimum(margin, n - size)
    hi = jnp.maximum(lo, n - size - margin)
    return randint(key, size.shape, lo, hi)


def flat_index(shape, ix, iy, iz) -> jax.Array:
    return (ix * shape[1] + iy) * shape[2] + iz


def grid(shape):
    return (jnp.arange(shape[0])[:, None, None], jnp.arange(shape[1])[None, :, None],
            jnp.arange(shape[2])[None, None, :])


_TRACE_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_backend", default=None)


@contextlib.contextmanager
def tracing_for(backend: str):
    """Trace the transforms for `backend` ("cpu", "gpu", "cuda", "rocm", "tpu"): the
    platform of the mesh that runs the step, which `trace_backend` reports inside the
    block (outside it, `jax.default_backend()`). The train and eval steps trace their
    transforms inside this, so the backend-specific forms follow the mesh."""
    token = _TRACE_BACKEND.set("gpu" if backend in ("cuda", "rocm") else backend)
    try:
        yield
    finally:
        _TRACE_BACKEND.reset(token)


def trace_backend() -> str:
    """The backend the computation being traced will run on (see `tracing_for`)."""
    return _TRACE_BACKEND.get() or jax.default_backend()


def computed_once(key: jax.Array, fn):
    """fn(), materialised once instead of re-fused into its consumers (on the CPU backend).

    XLA fuses cheap elementwise work (hashes, multiply-adds) into every consumer, and into
    a gather it is recomputed for every element gathered: a per-tile table read by every
    voxel of its tile is then computed per voxel. Neither `lax.optimization_barrier` nor
    a one-trip loop stops that on XLA:CPU (the barrier is dropped, the loop unrolled).
    A while loop whose trip count the compiler cannot know (always 1: it tests a uniform
    draw of `key` against 2) keeps `fn` in its own computation, evaluated once.

    Only on the CPU backend (`trace_backend`, decided when tracing): on GPU a while loop
    with a data-dependent trip count reads its condition back to the host every trip,
    a device-to-host sync in the middle of the step, and recomputing a small table per
    element is cheap there. Elsewhere this is just fn(), which XLA fuses as it likes.
    """
    if trace_backend() != "cpu":
        return fn()
    trips = 1 + (jax.random.uniform(key) >= 2.0).astype(jnp.int32)
    out = jax.eval_shape(fn)
    init = (jnp.int32(0), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out))
    return jax.lax.while_loop(lambda c: c[0] < trips, lambda c: (c[0] + 1, fn()), init)[1]


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_bits(key: jax.Array, counter: jax.Array) -> jax.Array:
    """32 random bits per entry of `counter` (distinct uint32 ids), keyed by `key`.

    Why not jax.random.uniform: full-cube threefry draws dominated the cost of the
    transforms on CPU, an order of magnitude above this hash (benchmarks/RESULTS.md). The
    key's own threefry bits seed a counter-based hash (two rounds of the MurmurHash3
    finaliser), the construction of counter-based generators; its outputs are uniform and
    uncorrelated between neighbouring counters, which is all that noise filling and
    per-tile draws need. Keys keep their usual meaning: same key, same bits.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    h = _mix32(counter.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) ^ seed[0])
    return _mix32(h ^ seed[1])


def hash_uniform(key: jax.Array, counter: jax.Array) -> jax.Array:
    """Uniform float32 in [0, 1) with 24 random bits, one per counter."""
    return (hash_bits(key, counter) >> 8).astype(jnp.float32) * np.float32(2.0**-24)
