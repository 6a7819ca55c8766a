"""The compiled steps keep the batch split over the devices (issue 20, items 9, 10), and the
CPU-only loop of `cube_ops.computed_once` stays off other backends (item 13)."""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transvw_jax import parallel
from transvw_jax import transforms as T
from transvw_jax.tasks import pretraining
from transvw_jax.transforms import cube_ops
from transvw_jax.transforms.shuffle import tiled_shuffle_source

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import demo  # noqa: E402

B = 8  # global batch: the tiny demo's, 1 cube per simulated device
SHAPE = (16, 16, 8)
COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^=]*? (all-gather|all-reduce|all-to-all|collective-permute)"
                        r"(-start)?\(")


@pytest.fixture(scope="module")
def run():
    assert jax.device_count() == 8
    config = demo.get_config("runlocal")
    config.train.batch_size = B
    return pretraining.build_run(config, parallel.make_mesh(1))


def _batch(run, mask=True):
    sh = parallel.batch_sharding(run.mesh)
    batch = {"cube": jax.ShapeDtypeStruct((B, *SHAPE), np.uint16, sharding=sh),
             "label": jax.ShapeDtypeStruct((B,), np.int32, sharding=sh)}
    if mask:
        batch["mask"] = jax.ShapeDtypeStruct((B,), np.bool_, sharding=sh)
    return batch


RNG = jax.ShapeDtypeStruct((2,), np.uint32)


def whole_batch_collectives(hlo: str) -> list[str]:
    """Collectives whose result holds the whole batch of cubes: (B, X, Y, Z, ...) of any dtype."""
    prefix = [B, *SHAPE]
    found = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m and [int(d) for d in m.group(2).split(",") if d][:4] == prefix:
            found.append(line.strip()[:160])
    return found


@pytest.mark.slow
def test_train_step_holds_no_gather_of_the_batch(run):
    """Keys, decoded cubes, inputs, targets and transform ids stay split over the 8 devices.
    (A guard: today's compiler keeps them split even without the constraints.)"""
    batch = _batch(run, mask=False)
    hlo = run.steps.train.lower(run.like_state, batch).compile().as_text()
    assert whole_batch_collectives(hlo) == []


@pytest.mark.slow
def test_eval_step_holds_no_gather_of_the_batch(run):
    hlo = run.steps.eval.lower(run.like_variables, _batch(run), RNG).compile().as_text()
    assert whole_batch_collectives(hlo) == []


@pytest.mark.slow
def test_samples_return_and_gather_only_the_cubes_drawn(run):
    """The samples step hands back SAMPLE_CUBES cubes, replicated; the rest of the batch never
    leaves its device."""
    out = jax.eval_shape(run.steps.samples, run.like_variables, _batch(run), RNG)
    assert [o.shape for o in out] == [(pretraining.SAMPLE_CUBES, *SHAPE)] * 3 + [(pretraining.SAMPLE_CUBES,)]
    hlo = run.steps.samples.lower(run.like_variables, _batch(run), RNG).compile().as_text()
    assert whole_batch_collectives(hlo) == []


def _whiles(fn, *args, platform="cuda") -> int:
    """While loops in `fn` lowered for `platform` (no such device needed). On cuda
    jax.random's threefry is unrolled, so every loop left is the transforms' own."""
    # A new function object per call: jit's trace cache must not hand back another backend's trace.
    traced = jax.jit(lambda *a: fn(*a)).trace(*args)
    return traced.lower(lowering_platforms=(platform,)).as_text().count("stablehlo.while")


@pytest.mark.parametrize("name", ["nonlinear", "tiled_shuffle"])
def test_computed_once_loops_only_on_the_cpu_backend(name):
    """On CPU the tables are computed in a while loop of unknown trip count (so that XLA:CPU
    does not re-fuse them into every voxel); traced for GPU/TPU there is no loop, whose
    data-dependent condition XLA:GPU would read back to the host in the middle of the step."""
    if name == "nonlinear":
        fn, args = T.nonlinear, (jax.random.key(0), jnp.zeros(SHAPE))
    else:
        fn, args = (lambda k: tiled_shuffle_source(k, SHAPE, 200)), (jax.random.key(0),)
    assert cube_ops.trace_backend() == "cpu"  # outside `tracing_for`: jax.default_backend()
    assert _whiles(fn, *args) > 0
    for backend in ("gpu", "cuda", "tpu"):
        with cube_ops.tracing_for(backend):
            assert cube_ops.trace_backend() in ("gpu", "tpu")
            assert _whiles(fn, *args) == 0
    with cube_ops.tracing_for("cpu"):
        assert _whiles(fn, *args) > 0


def test_computed_once_gives_the_same_values_either_way():
    key, cube = jax.random.key(3), jnp.linspace(0, 1, np.prod(SHAPE)).reshape(SHAPE)
    on_cpu = jax.jit(lambda k, x: T.nonlinear(k, x))(key, cube)
    with cube_ops.tracing_for("gpu"):
        fused = jax.jit(lambda k, x: T.nonlinear(k, x))(key, cube)
    np.testing.assert_allclose(on_cpu, fused, rtol=1e-6, atol=1e-7)
