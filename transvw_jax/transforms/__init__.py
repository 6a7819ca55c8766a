"""On-device restoration transforms of TransVW and Models Genesis (docs/REFERENCE.md section 3).

One module per kind of transform, and the policies that compose them:

- `intensity`: the non-linear (Bezier curve) intensity transform;
- `painting`: in-painting and out-painting;
- `shuffle`: local pixel shuffling (exact for a few blocks, a tiling for many);
- `elastic`: TransVW's elastic deformation (pure JAX, and the native CPU kernel in
  `transvw_jax/native`);
- `flip`: Models Genesis' random flips;
- `policies`: the TransVW and Models Genesis policies, `batch_policy` (what the train step
  calls), the `transforms.*` config defaults and their validation;
- `cube_ops`: the building blocks they share (inclusive randint, box masks, flat indices,
  a keyed counter hash, the trace backend);
- `reference_numpy`: the original procedures restated in numpy, against which the tests
  and `benchmarks/transforms.py` check and time these kernels; not used in training.

This package exports what callers use: the single transforms, the policies and the config
functions. Building blocks (block draws, curve tables, displacement fields, ...) are
imported from their modules. The package attributes `elastic` and `flip` are the
functions, not the modules of those names: import from the modules with
`from transvw_jax.transforms.elastic import ...`.
"""

from transvw_jax.transforms.elastic import ELASTIC_IMPLS, elastic
from transvw_jax.transforms.elastic import resolve_impl as resolve_elastic_impl
from transvw_jax.transforms.flip import flip
from transvw_jax.transforms.intensity import nonlinear
from transvw_jax.transforms.painting import in_paint, out_paint
from transvw_jax.transforms.policies import (
    CPU_BATCH_CHUNK,
    FLIP,
    IN_PAINT,
    NONLINEAR,
    OUT_PAINT,
    POLICIES,
    SHUFFLE,
    TRANSFORM_NAMES,
    apply_policy,
    batch_policy,
    default_config,
    genesis,
    resolve_batch_chunk,
    transvw,
    validate_config,
)
from transvw_jax.transforms.shuffle import local_shuffle

__all__ = [
    "CPU_BATCH_CHUNK", "ELASTIC_IMPLS", "FLIP", "IN_PAINT", "NONLINEAR", "OUT_PAINT", "POLICIES", "SHUFFLE",
    "TRANSFORM_NAMES", "apply_policy", "batch_policy", "default_config", "elastic", "flip", "genesis",
    "in_paint", "local_shuffle", "nonlinear", "out_paint", "resolve_batch_chunk", "resolve_elastic_impl",
    "transvw", "validate_config",
]
