"""Pretraining: sharding invariance, schedules, divergence, dtypes (resume: test_pod_resume.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from transvw_jax import checkpointing, parallel, training
from transvw_jax.data import store
from transvw_jax.models import abstract_variables, build_model
from transvw_jax.tasks import pretraining

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import default as base_config  # noqa: E402
from configs import demo  # noqa: E402

SHAPE = (16, 16, 8)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """40 training + 12 validation smooth random cubes in the tiny demo's 8 classes: the
    programs compiled here are then the tiny demo's, so every run that shares the suite's
    compilation cache (these, test_pod_resume, test_main, test_eval_padding) compiles once."""
    path = tmp_path_factory.mktemp("data") / "store"
    rng = np.random.default_rng(0)
    with store.StoreWriter(path, cube_shape=SHAPE) as w:
        for i in range(52):
            base = rng.random((4, 4, 2), dtype=np.float32)
            cube = np.kron(base, np.ones((4, 4, 4), np.float32))
            w.add("train" if i < 40 else "validation", cube, i % 8)
        w.commit(num_classes=8)
    return path


def tiny_config(store_path, **train_overrides):
    config = demo.get_config("runlocal")
    config.stages = ("pretrain",)
    config.data.store_dir = str(store_path)
    config.train.update(sample_every=0, **train_overrides)
    return config


def _run_steps(config, mesh, batches):
    run = pretraining.build_run(config, mesh)
    state = run.init(0)
    sharding = parallel.batch_sharding(mesh)
    for b in batches:
        state, m = run.steps.train(state, parallel.global_batch(b, sharding))
    return jax.device_get(state.variables), jax.device_get(m)


@pytest.mark.slow
def test_eight_devices_train_like_one(tiny_store):
    """Same global batches and keys: 8 devices, replicated or fsdp-sharded == 1 device.

    SGD: Adam's first steps are ~lr * sign(gradient), which turns reduction-order noise in
    near-zero gradients into lr-sized differences and would hide real mistakes. Noise cubes,
    not the store's piecewise-constant ones: those make exact ties in max pooling's windows,
    which the two programs' last-bit differences (a sum in another order) break differently,
    routing a few gradients to another voxel; three steps at learning rate 0.1 made that 8e-5.
    The tolerance sits between reduction-order noise (larger where XLA vectorises 512 bits
    wide, see benchmarks/RESULTS.md) and a real mistake's lr-sized steps (~1e-3).
    """
    assert jax.device_count() == 8
    config = tiny_config(tiny_store, optimizer="sgd", learning_rate=0.1)
    rng = np.random.default_rng(1)
    batches = [{"cube": rng.random((8, *SHAPE), dtype=np.float32), "label": rng.integers(0, 8, 8)}
               for _ in range(3)]
    one, m1 = _run_steps(config, parallel.make_mesh(1, jax.devices()[:1]), batches)
    for fsdp in (1, 2):
        if fsdp > 1:
            parallel.FSDP_MIN_SIZE, saved = 1, parallel.FSDP_MIN_SIZE  # shard even tiny kernels
        try:
            eight, m8 = _run_steps(config, parallel.make_mesh(fsdp), batches)
        finally:
            if fsdp > 1:
                parallel.FSDP_MIN_SIZE = saved
        np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5, err_msg=f"fsdp {fsdp}")
        for (k, a), b in zip(flatten_dict(one).items(), flatten_dict(eight).values(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"fsdp {fsdp}: " + "/".join(k))


def test_step_decay_and_warmup_schedules():
    t = base_config.get_config().train
    t.update(schedule="step", decay_every=10, decay_factor=0.5, learning_rate=1e-3)
    s = training.make_schedule(t)
    assert [float(s(i)) for i in (0, 9, 10, 25)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    t.update(schedule="cosine", warmup_steps=5, steps=25)
    s = training.make_schedule(t)
    assert float(s(0)) == 0 and float(s(5)) == pytest.approx(1e-3)
    assert float(s(25)) == pytest.approx(0, abs=1e-9)
    t.update(optimizer="sgd", grad_clip_norm=1.0)
    assert isinstance(training.make_optimizer(t), optax.GradientTransformation)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".pytest_cache" / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def _main_cmd(workdir, store_path, *overrides):
    return [sys.executable, "-m", "transvw_jax.main", "--config", "configs/demo.py:runlocal", "--workdir",
            str(workdir), "--config.stages=('pretrain',)",
            f"--config.data.store_dir={store_path}", "--config.train.sample_every=0", *overrides]


def _params(workdir, step):
    model = build_model(tiny_config("x").model)
    restored = checkpointing.restore_variables(workdir, abstract_variables(model), step=step)
    assert restored is not None and restored[0] == step
    return flatten_dict(jax.device_get(restored[1]))


@pytest.mark.slow
def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_store, tmp_path):
    proc = subprocess.run(_main_cmd(tmp_path, tiny_store, "--config.train.optimizer=sgd",
                                    "--config.train.learning_rate=1e15", "--config.train.steps=12",
                                    "--config.train.checkpoint_every=1", "--config.train.log_every=4"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")][0]
    bad = int(line.split("step ")[1].split(":")[0])
    assert "training diverged" in line and f"last good checkpoint is step {bad - 1}" in line
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == bad - 1
    for v in _params(tmp_path, bad - 1).values():
        assert np.isfinite(v).all()


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights(tiny_store):
    config = tiny_config(tiny_store)
    config.model.dtype = "bfloat16"
    src = store.open_store(tiny_store).source("train")
    batch = {"cube": np.stack([src[i]["cube"] for i in range(8)]), "label": np.arange(8)}
    variables, m = _run_steps(config, parallel.make_mesh(1, jax.devices()[:1]), [batch, batch])
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables["params"]))
    assert np.isfinite(m["loss"]) and m["loss"] > 0


def test_epoch_schedule_converts_to_steps_of_the_training_source():
    config = demo.get_config("runlocal")
    t = config.train
    t.update(schedule_unit="epochs", batch_size=8, steps=3, decay_every=2, warmup_steps=1, eval_every=2,
             checkpoint_every=1, sample_every=0, patience=5, log_every=7)
    converted, record = pretraining.schedule_in_steps(config, 43)  # 43 // 8 = 5 steps per epoch
    c = converted.train
    assert (c.steps, c.decay_every, c.warmup_steps, c.eval_every, c.checkpoint_every) == (15, 10, 5, 10, 5)
    assert (c.sample_every, c.log_every, c.schedule_unit) == (0, 7, "steps")
    assert c.patience == 3  # 5 epochs of patience = 3 evaluations every 2 epochs, rounded up
    assert record["steps_per_epoch"] == 5 and record["unit"] == "epochs" and record["decay_every"] == 10
    assert t.schedule_unit == "epochs" and t.steps == 3  # the caller's config is left as written
    same, _ = pretraining.schedule_in_steps(demo.get_config("runlocal"), 43)  # steps: unchanged
    assert same.train.steps == demo.get_config("runlocal").train.steps
    from transvw_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="an epoch holds no step"):
        pretraining.schedule_in_steps(config, 7)


@pytest.mark.slow
def test_epoch_schedule_reaches_the_training_loop(tiny_store, tmp_path, caplog, monkeypatch):
    """40 training cubes / batch 8 = 5 steps per epoch: 2 epochs = 10 steps, evaluated every epoch.
    One validation pipeline serves both evaluations and the samples. Decay every 200 epochs =
    1000 steps, the tiny demo's: the learning-rate schedule is part of the compiled step, so
    this runs the programs the command-line runs (test_pod_resume, test_main) compiled."""
    config = tiny_config(tiny_store, schedule_unit="epochs", batch_size=8, steps=2, eval_every=1,
                         checkpoint_every=1, decay_every=200, patience=50, log_every=5)
    config.train.sample_every = 2
    built = []
    eval_dataset = pretraining.loader.eval_dataset
    monkeypatch.setattr(pretraining.loader, "eval_dataset",
                        lambda *a, **k: built.append(1) or eval_dataset(*a, **k))
    with caplog.at_level("INFO"):
        summary = pretraining.train_and_evaluate(config, tmp_path)
    assert len(built) == 1
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step_0000010.png"]
    assert "epoch = 5 steps (40 training cubes / global batch 8)" in caplog.text
    assert summary.step == 10 and summary.schedule["steps"] == 10 and summary.schedule["decay_every"] == 1000
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "eval"] == [5, 10]


def test_released_classes_selects_the_first_classes(tmp_path):
    """`:released` pretrains on classes 0-43 of fold 1's 50, as TransVW's train.py: here 3 of 5."""
    rng = np.random.default_rng(0)
    labels = np.arange(5, dtype=np.float64).reshape(5, 1)
    for prefix, resolutions in (("train", (1, 2, 3)), ("val", (1,))):
        for r in resolutions:
            np.save(tmp_path / f"{prefix}_data{r}_vwGen_ex_ref_fold1.0.npy", rng.random((5, *SHAPE)))
            np.save(tmp_path / f"{prefix}_label{r}_vwGen_ex_ref_fold1.0.npy", labels)
    config = demo.get_config("runlocal")
    config.data.update(source="released", released_dir=str(tmp_path), released_folds=(1,), released_classes=3)
    train_src, val_src, num_classes = pretraining.open_sources(config, tmp_path)
    assert (len(train_src), len(val_src), num_classes) == (9, 3, 3)
    config.data.released_classes = 0  # every class in the files
    assert pretraining.open_sources(config, tmp_path)[2] == 5


def test_unusable_batch_size_and_missing_validation_are_config_errors(tiny_store, tmp_path):
    from transvw_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="train.batch_size=64: batch_size 64 must be in"):
        pretraining.train_and_evaluate(tiny_config(tiny_store, batch_size=64), tmp_path / "a")
    no_val = tmp_path / "no_val"
    with store.StoreWriter(no_val, cube_shape=SHAPE) as w:
        for i in range(16):
            w.add("train", np.zeros(SHAPE, np.float32), i % 8)
        w.commit(num_classes=8)
    with pytest.raises(ConfigError, match="no validation cubes"):
        pretraining.train_and_evaluate(tiny_config(no_val), tmp_path / "b")
