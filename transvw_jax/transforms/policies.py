"""The restoration policies of TransVW and Models Genesis (docs/REFERENCE.md section 3), their
configuration and its validation, and `batch_policy`, the form the train step calls.

Every transform works on ONE cube `x` of shape (X, Y, Z) with values in [0, 1], takes its
own PRNG key, has static shapes (masks and gathers, never data-dependent slicing), and
preserves the dtype; a batch is `jax.vmap` over keys and cubes. The arithmetic is float32
whatever the storage dtype.

Policies return `(input, target, transform_id)`:
- `transvw`: elastic deformation of the input (when enabled), then exactly one of
  {local shuffle, non-linear, in-paint, out-paint}; transform_id is that one's index
  (SHUFFLE=0, NONLINEAR=1, IN_PAINT=2, OUT_PAINT=3).
- `genesis`: flip, local shuffle, non-linear and painting composed as Models Genesis does;
  transform_id is a bit mask, bit `1 << T` set for each transform T applied (FLIP=4).

Where the reference draws python `randint(a, b)` (both ends included), `cube_ops.randint`
adds 1 to the upper bound for `jax.random.randint`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transvw_jax.transforms import cube_ops as C
from transvw_jax.transforms.elastic import elastic, elastic_at
from transvw_jax.transforms.elastic import resolve_impl as resolve_elastic_impl
from transvw_jax.transforms.flip import flip_axes, flip_coords
from transvw_jax.transforms.intensity import apply_table, nonlinear_curve
from transvw_jax.transforms.painting import paint_where
from transvw_jax.transforms.shuffle import (
    EXACT_SHUFFLE_MAX_BLOCKS,
    exact_shuffle,
    local_shuffle,
    tiled_shuffle_source,
)

SHUFFLE, NONLINEAR, IN_PAINT, OUT_PAINT, FLIP = range(5)
TRANSFORM_NAMES = ("local_shuffle", "nonlinear", "in_paint", "out_paint", "flip")


def default_config(policy: str = "transvw") -> ml_collections.ConfigDict:
    """Transform settings with the reference defaults of `policy` (transvw | genesis), for
    library callers; configs/default.py (transvw) and configs/luna16_genesis.py (genesis) hold
    the same values with their meanings (a test keeps them equal)."""
    if policy not in ("transvw", "genesis"):
        raise ValueError(f"transforms.policy must be 'transvw' or 'genesis', got {policy!r}")
    genesis = policy == "genesis"
    c = ml_collections.ConfigDict()
    c.policy = policy
    # TransVW: relative weights of shuffle, non-linear, in-paint, out-paint (0 disables one).
    c.choice_weights = (1.0, 1.0, 1.0, 1.0)
    # impl: "auto" (native kernel on a one-device CPU backend, else pure JAX), "xla", "native".
    c.elastic = dict(enabled=not genesis, alpha=991.0, sigma=8.0, impl="auto")
    c.flip = dict(prob=0.4 if genesis else 0.0, max_flips=3)
    c.local_shuffle = dict(prob=0.5, num_blocks=10_000 if genesis else 5)
    c.nonlinear = dict(prob=0.9)
    c.paint = dict(prob=0.9, inpaint_prob=0.2)
    c.in_paint = dict(max_blocks=5 if genesis else 1)
    c.out_paint = dict(max_extra_blocks=4 if genesis else 0)
    # Cubes per device transformed together (see `batch_policy`); -1: the policy's
    # CPU_BATCH_CHUNK on the CPU backend, the whole batch elsewhere; 0: the whole batch.
    c.batch_chunk = -1
    return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first bad `transforms.*` value.

    The checks are `transvw_jax.configuration.validate_transforms` (every config check
    lives there and raises ConfigError); this keeps the ValueError its library callers
    catch."""
    from transvw_jax import configuration  # imports this package: not at module level
    from transvw_jax.errors import ConfigError

    try:
        configuration.validate_transforms(cfg)
    except ConfigError as e:
        raise ValueError(str(e)) from None


# --------------------------------------------------------------------------- policies
def _paint(key, x, active, inner, cfg):
    return paint_where(key, x, active, inner, cfg.in_paint.max_blocks, cfg.out_paint.max_extra_blocks)


def _shuffle_where(key, x, do, num_blocks, read=None):
    if num_blocks <= EXACT_SHUFFLE_MAX_BLOCKS:
        return exact_shuffle(key, x, num_blocks, enabled=do, read=read)
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
    read = None
    if cfg.elastic.enabled:
        e = cfg.elastic
        impl = resolve_elastic_impl(e.get("impl", "auto"), x.shape, e.sigma)
        if impl == "xla":
            # The shuffle reads its sources through the elastic map, so the deformed cube
            # has one consumer and XLA computes it once; the native kernel's output is a
            # buffer anyway, and the shuffle reads that.
            read = functools.partial(elastic_at, k_elastic, x, alpha=e.alpha, sigma=e.sigma)
        x = elastic(k_elastic, x, e.alpha, e.sigma, impl=impl)
    weights = np.asarray(cfg.choice_weights, np.float32)
    choice = jax.random.choice(k_choice, 4, p=jnp.asarray(weights / weights.sum())).astype(jnp.int32)
    x = _shuffle_where(k_t, x, choice == SHUFFLE, cfg.local_shuffle.num_blocks, read)
    x = jnp.where(choice == NONLINEAR, apply_table(nonlinear_curve(k_t)[0], x), x)
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

    flat = x.reshape(-1)
    target = genesis_target(key, x, cfg)
    do_shuffle = u[0] < cfg.local_shuffle.prob
    if cfg.local_shuffle.num_blocks > EXACT_SHUFFLE_MAX_BLOCKS:
        src = tiled_shuffle_source(k_shuffle, shape, cfg.local_shuffle.num_blocks)
        src = [jnp.where(do_shuffle, s, g) for s, g in zip(src, C.grid(shape), strict=True)]
        x = flat[C.flat_index(shape, *flip_coords(parity, shape, src))].astype(jnp.float32)
    else:
        x = exact_shuffle(k_shuffle, target.astype(jnp.float32), cfg.local_shuffle.num_blocks, do_shuffle)
    do_nonlinear = u[1] < cfg.nonlinear.prob
    x = jnp.where(do_nonlinear, apply_table(nonlinear_curve(k_nonlinear)[0], x), x)
    do_paint = u[2] < cfg.paint.prob
    inner = u[3] < cfg.paint.inpaint_prob
    x = _paint(k_paint, x, do_paint, inner, cfg)
    bits = (flipped.astype(jnp.int32) << FLIP | do_shuffle.astype(jnp.int32) << SHUFFLE
            | do_nonlinear.astype(jnp.int32) << NONLINEAR
            | (do_paint & inner).astype(jnp.int32) << IN_PAINT
            | (do_paint & ~inner).astype(jnp.int32) << OUT_PAINT)
    return x.astype(dtype), target, bits


def genesis_target(key: jax.Array, x: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
    """The target `genesis(key, x, cfg)` returns: x with the same flips as the input."""
    parity, _ = flip_axes(jax.random.split(key, 5)[0], cfg.flip.prob, cfg.flip.max_flips)
    return x.reshape(-1)[C.flat_index(x.shape, *flip_coords(parity, x.shape, C.grid(x.shape)))]


def transvw_target(key: jax.Array, x: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
    """The target `transvw(key, x, cfg)` returns: the cube itself."""
    return x


POLICIES = {"transvw": transvw, "genesis": genesis}
TARGETS = {"transvw": transvw_target, "genesis": genesis_target}


def apply_policy(key: jax.Array, x: jax.Array, cfg: ml_collections.ConfigDict):
    """Run the policy named by `cfg.policy` on one cube."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"transforms.policy: unknown policy {cfg.policy!r}; known: {sorted(POLICIES)}")
    return POLICIES[cfg.policy](key, x, cfg)


# Cubes per chunk on the CPU backend, per policy (0: the whole batch in one vmap). The
# best chunk depends on the CPU's caches and vector width, and differs between CPUs
# (benchmarks/RESULTS.md, `benchmarks/transforms.py --chunk N`); Models Genesis gains
# nothing from chunks because the fusion that writes a chunk into the loop's output runs
# on one thread. One vmap, the accelerators' path, is the default; `transforms.batch_chunk`
# picks chunks.
CPU_BATCH_CHUNK = {"transvw": 0, "genesis": 0}


def resolve_batch_chunk(cfg: ml_collections.ConfigDict, backend: str | None = None) -> int:
    """Cubes per device and chunk for `batch_policy`; 0 means the whole batch at once."""
    chunk = cfg.get("batch_chunk", -1)
    if chunk == -1:
        on_cpu = (backend or C.trace_backend()) == "cpu"
        return CPU_BATCH_CHUNK.get(cfg.get("policy", "transvw"), 0) if on_cpu else 0
    return chunk


def batch_policy(keys: jax.Array, cubes: jax.Array, cfg: ml_collections.ConfigDict, shards: int = 1):
    """`apply_policy` over a batch: keys (B,), cubes (B, X, Y, Z).

    With `cfg.batch_chunk` cubes per chunk (see `resolve_batch_chunk`) the batch goes
    through a loop, one vmap of `chunk` cubes per device at a time: on a CPU the
    intermediates of a chunk stay in cache, where a whole batch streams each of them
    through memory. The result is the same as one vmap over the batch (every cube has its
    own key). `shards`: the devices the batch axis is split over; the loop runs over each
    device's own cubes (the batch is viewed as (shards, chunks, chunk) and the loop axis
    is the middle one), so no cube moves between devices. Accelerators take the whole
    batch in one vmap (chunk 0).
    """
    fn = jax.vmap(functools.partial(apply_policy, cfg=cfg))
    batch = cubes.shape[0]
    chunk = resolve_batch_chunk(cfg)
    if chunk == 0 or batch % shards:
        return fn(keys, cubes)
    per_shard = batch // shards
    chunk = max(d for d in range(1, min(chunk, per_shard) + 1) if per_shard % d == 0)
    if chunk == per_shard:
        return fn(keys, cubes)

    def split(a):  # (B, ...) -> (chunks, shards * chunk, ...)
        a = a.reshape(shards, per_shard // chunk, chunk, *a.shape[1:]).swapaxes(0, 1)
        return a.reshape(per_shard // chunk, shards * chunk, *a.shape[3:])

    def join(a):  # inverse of split
        a = a.reshape(per_shard // chunk, shards, chunk, *a.shape[2:]).swapaxes(0, 1)
        return a.reshape(batch, *a.shape[3:])

    # Each chunk's result goes through the loop's stacked output, a fusion XLA:CPU runs on
    # one thread: only the input and id go that way; the targets (the cubes, or flipped
    # cubes) are one pass over the whole batch outside the loop.
    inp, tid = jax.lax.map(lambda args: _input_and_id(fn(*args)), (split(keys), split(cubes)))
    target = jax.vmap(functools.partial(TARGETS[cfg.policy], cfg=cfg))(keys, cubes)
    return join(inp), target, join(tid)


def _input_and_id(out):
    inp, _, tid = out
    return inp, tid
