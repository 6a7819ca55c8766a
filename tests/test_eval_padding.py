"""Evaluation's padding rows change no real cube's result (issue 20, item 7), and one
validation pipeline serves every evaluation (item 11).

The last validation batch is padded with copies of cube 0 (mask False). With
model.bn="reference" BatchNorm normalises with the batch's own statistics at evaluation
too; the mask keeps the copies out of them, so the validation loss does not depend on the
batch size or the device count.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transvw_jax import finetune, parallel
from transvw_jax.data import loader
from transvw_jax.models import EncoderClassifier, YNet3D, init_variables
from transvw_jax.tasks import pretraining

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import demo, demo_finetune  # noqa: E402

SHAPE = (16, 16, 8)


class CubeSource:
    """Random-access cubes {"cube", "label"}, as a store's split gives them."""

    def __init__(self, n, seed=0, classes=4):
        rng = np.random.default_rng(seed)
        # Smooth cubes (4^3 blocks), uint16 like a store.
        base = rng.random((n, 4, 4, 2), dtype=np.float32)
        cubes = np.kron(base, np.ones((1, 4, 4, 4), np.float32))
        self.cubes = (cubes * 65535).round().astype(np.uint16)
        self.labels = (np.arange(n) % classes).astype(np.int32)

    def __len__(self):
        return len(self.cubes)

    def __getitem__(self, i):
        return {"cube": self.cubes[i], "label": self.labels[i]}


def pretrain_config(batch_size):
    config = demo.get_config("runlocal")
    config.train.batch_size = batch_size
    return config


def _run(batch_size):
    config = pretrain_config(batch_size)
    mesh = parallel.make_mesh(1)
    run = pretraining.build_run(config, mesh)
    return config, mesh, run, run.init(0).variables


RNG = np.array([0, 1], np.uint32)  # the eval key data


def _evaluate(run, variables, source, config, dataset=None):
    """A validation pass as pretraining runs it (a fresh pipeline unless `dataset`)."""
    ds = pretraining.eval_dataset(source, config) if dataset is None else dataset
    return run.evaluate(variables, ds, RNG, config.train.eval_batches or None)


@pytest.fixture(scope="module")
def batch8_run():
    """TransVW, global batch 8 on the 8 simulated devices."""
    return _run(8)


@pytest.mark.slow
def test_validation_loss_does_not_depend_on_the_padding(batch8_run):
    """6 real cubes in one batch of 8 (2 copies of cube 0) or of 16 (10 copies), the batch
    sharded over 8 devices (the global batch must divide by them): the same figures."""
    source = CubeSource(6)
    results = []
    for config, _, run, variables in (batch8_run, _run(16)):
        results.append(_evaluate(run, variables, source, config))
    a, b = results
    assert a.keys() == b.keys()
    for k in a:
        # To float32 rounding: the two batch sizes add their rows in different orders, and
        # the suite's -O0 kernels (conftest.py) round differently from one program to the other.
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_two_evaluations_of_one_pipeline_are_identical(batch8_run):
    """The run's one validation pass, iterated again, gives the same cubes in the same order."""
    config, mesh, run, variables = batch8_run
    source = CubeSource(20)
    dataset = pretraining.eval_dataset(source, config)
    first = _evaluate(run, variables, source, config, dataset)
    second = _evaluate(run, variables, source, config, dataset)
    assert first == second
    assert first == _evaluate(run, variables, source, config)  # a fresh pipeline
    limited = config.copy_and_resolve_references()
    limited.train.eval_batches = 1  # 8 of the 20 cubes
    one = _evaluate(run, variables, source, limited, dataset)
    assert one != first and one == _evaluate(run, variables, source, limited, dataset)
    assert [b["cube"].tolist() for b in dataset] == [b["cube"].tolist() for b in dataset]


@pytest.mark.parametrize("make", [
    lambda: YNet3D(num_classes=3, width=2),  # the encoder, decoder and head: UNet3D's parts too
    lambda: EncoderClassifier(num_classes=3, width=2),
])
@pytest.mark.slow
def test_masked_rows_leave_the_real_rows_unchanged(make):
    """Every model: rows outside the mask (here garbage) change no output of the real rows,
    which equal a forward of the real rows alone; without a mask all rows count as before."""
    model = make()
    variables = init_variables(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    real = rng.random((3, *SHAPE, 1), dtype=np.float32)
    padded = np.concatenate([real, 10 * rng.random((2, *SHAPE, 1), dtype=np.float32)])
    mask = np.array([True, True, True, False, False])
    apply = jax.jit(model.apply, static_argnames=("train",))
    alone = jax.tree.leaves(apply(variables, real, train=False))
    masked = jax.tree.leaves(apply(variables, padded, train=False, mask=mask))
    for x, y in zip(alone, masked, strict=True):
        np.testing.assert_allclose(x, y[:3], rtol=1e-5, atol=1e-6)
    all_rows = jax.tree.leaves(apply(variables, padded, train=False, mask=np.ones(5, bool)))
    unmasked = jax.tree.leaves(apply(variables, padded, train=False))
    for x, y in zip(all_rows, unmasked, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert not np.allclose(unmasked[0][:3], alone[0], atol=1e-4)  # without the mask the padding counts


@pytest.mark.slow
def test_finetune_eval_step_ignores_the_padding():
    """Fine-tuning's eval step (classification): 6 candidates in a batch of 6 or 8."""
    config = demo_finetune.get_config("runlocal")
    config.finetune.task = "classification"
    mesh = parallel.make_mesh(1, jax.devices()[:2])
    source = CubeSource(6, classes=2)
    out = []
    for bs in (6, 8):
        config.finetune.train.batch_size = bs
        run = finetune.build_run(config, 2, mesh)
        variables = run.init(0).variables
        batch = next(iter(loader.eval_dataset(source, batch_size=bs, num_threads=1)))
        sharded = parallel.global_batch(batch, parallel.batch_sharding(mesh))
        o = jax.device_get(run.steps.eval(variables, sharded, RNG))
        keep = np.asarray(o["mask"], bool)
        assert keep.sum() == 6
        out.append(np.asarray(o["scores"])[keep])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_masked_statistics_are_global_under_jit():
    """The masked mean/var of a batch sharded over 8 devices are those of the real rows."""
    from transvw_jax.models.layers import BatchNorm

    bn = BatchNorm()
    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 4, 4, 3)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
    mesh = parallel.make_mesh(1)
    sh = parallel.batch_sharding(mesh)
    variables = bn.init(jax.random.key(0), x, False)
    f = jax.jit(lambda x, m: bn.apply(variables, x, False, m), in_shardings=(sh, sh))
    y = np.asarray(f(jax.device_put(x, sh), jax.device_put(mask, sh)))
    real = x[mask]
    expect = (real - real.mean((0, 1, 2, 3))) / np.sqrt(real.var((0, 1, 2, 3)) + 1e-5)
    np.testing.assert_allclose(y[mask], expect, rtol=1e-4, atol=1e-4)
    assert jnp.isfinite(y).all()
