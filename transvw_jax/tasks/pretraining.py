"""Pretraining tasks: TransVW (restoration + visual words) and Models Genesis (restoration).

One train step = one `jax.jit` program: the raw cube batch (compact dtype, sharded over
the mesh) is decoded, each cube is transformed on the device with its own key (the
policy of `config.transforms`), the network restores it (and, for TransVW, classifies
it), and the optimiser updates (`training.engine`).

Objectives:
- transvw: lambda_rec * MSE(restoration, target) + lambda_cls * cross-entropy(logits,
  visual-word class), on YNet3D.
- genesis: MSE only (Models Genesis), on UNet3D; the store's labels are ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transvw_jax import configuration, losses, metrics, parallel, training
from transvw_jax import transforms as T
from transvw_jax.data import loader, store
from transvw_jax.errors import ConfigError
from transvw_jax.models import build_model
from transvw_jax.transforms import cube_ops as C

# Counted in epochs when train.schedule_unit = "epochs" (patience too: see `schedule_in_steps`).
EPOCH_KEYS = ("steps", "decay_every", "warmup_steps", "eval_every", "checkpoint_every", "sample_every")
NUM_TRANSFORMS = len(T.TRANSFORM_NAMES)
SAMPLE_CUBES = 4  # cubes in a sample PNG: all that the samples step returns


def metric_names(objective: str) -> tuple[str, ...]:
    """The train-step metrics besides loss and grad_norm, in display order."""
    return ("rec", "cls", "acc") if objective == "transvw" else ("rec",)


def transform_membership(objective: str, tid: jax.Array) -> jax.Array:
    """(B, 5) bool: which transforms each cube went through (TransVW: one id; Genesis: bits)."""
    if objective == "genesis":
        return (tid[:, None] >> jnp.arange(NUM_TRANSFORMS)) & 1 == 1
    return jax.nn.one_hot(tid, NUM_TRANSFORMS, dtype=jnp.bool_)


def make_task(config: ml_collections.ConfigDict, mesh) -> training.Task:
    """The pretraining task of `config.train.objective` with `config.transforms` on `mesh`."""
    t, tcfg = config.train, config.transforms
    objective = t.objective
    model = build_model(config.model)
    batch_sh = parallel.batch_sharding(mesh)
    platform = mesh.devices.flat[0].platform  # the transforms' backend-specific forms follow the mesh

    def pin(*arrays):
        """Per-cube arrays split over the batch sharding, like the batch: no device
        computes (or gathers) another device's cubes."""
        return tuple(jax.lax.with_sharding_constraint(a, batch_sh) for a in arrays)

    def prepare(batch, keys, train):
        keys, x = pin(keys, store.decode_cubes(batch["cube"]))
        with C.tracing_for(platform):
            inp, target, tid = pin(*T.batch_policy(keys, x, tcfg, shards=mesh.size))
        return {"input": inp, "target": target, "transform": tid, "label": batch["label"],
                "mask": batch.get("mask")}

    def forward(variables, inputs, train):
        """(restoration (B,X,Y,Z), logits or None, new batch_stats or None). Rows whose
        mask is False (evaluation's padding) stay out of BatchNorm's batch statistics."""
        x = inputs["input"][..., None]
        if train:
            out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"], mask=None)
            stats = upd["batch_stats"]
        else:
            out, stats = model.apply(variables, x, train=False, mask=inputs["mask"]), None
        restoration, logits = out if objective == "transvw" else (out, None)
        return restoration[..., 0], logits, stats

    def terms(variables, inputs, train):
        restoration, logits, stats = forward(variables, inputs, train)
        mse = losses.squared_error(restoration, inputs["target"])
        if logits is None:
            return mse, jnp.zeros_like(mse), jnp.zeros_like(mse), stats
        ce, correct = losses.word_terms(logits, inputs["label"])
        return mse, ce, correct, stats

    def loss(variables, inputs):
        mse, ce, correct, stats = terms(variables, inputs, True)
        value = t.lambda_rec * mse.mean() + (t.lambda_cls * ce.mean() if objective == "transvw" else 0.0)
        out = {"rec": mse.mean()}
        if objective == "transvw":
            out.update(cls=ce.mean(), acc=correct.mean())
        return value, (out, stats)

    def eval_step(variables, inputs):
        mse, ce, correct, _ = terms(variables, inputs, False)
        mask = inputs["mask"].astype(jnp.float32)
        member = transform_membership(objective, inputs["transform"]).astype(jnp.float32) * mask[:, None]
        return {
            "count": mask.sum(),
            "rec": (mse * mask).sum(),
            "cls": (ce * mask).sum(),
            "correct": (correct * mask).sum(),
            "per_transform_rec": (member * mse[:, None]).sum(0),
            "per_transform_count": member.sum(0),
        }

    def summarize(totals) -> dict[str, float]:
        n = max(float(totals["count"]), 1.0)
        out = {"rec": float(totals["rec"]) / n}
        if objective == "transvw":
            out["cls"] = float(totals["cls"]) / n
            out["acc"] = float(totals["correct"]) / n
            out["loss"] = t.lambda_rec * out["rec"] + t.lambda_cls * out["cls"]
        else:
            out["loss"] = out["rec"]
        for name, s, c in zip(T.TRANSFORM_NAMES, totals["per_transform_rec"], totals["per_transform_count"],
                              strict=True):
            if c > 0:
                out[f"rec_{name}"] = float(s) / float(c)
        return out

    def samples(variables, inputs):
        """The first SAMPLE_CUBES cubes only: they alone are replicated and fetched."""
        restoration, _, _ = forward(variables, inputs, False)
        return tuple(a[:SAMPLE_CUBES] for a in (inputs["input"], inputs["target"], restoration,
                                                inputs["transform"]))

    return training.Task(name="pretrain", model=model, prepare=prepare, loss=loss,
                         metric_names=metric_names(objective), eval_step=eval_step, summarize=summarize,
                         samples=samples)


def build_run(config: ml_collections.ConfigDict, mesh) -> training.Run:
    """The pretraining task, its optimiser and compiled steps for `config` on `mesh`."""
    return training.place(make_task(config, mesh), training.make_optimizer(config.train), mesh)


# --------------------------------------------------------------------------- data


def open_sources(config: ml_collections.ConfigDict, workdir: Path) -> tuple[Any, Any, int]:
    """(train source, validation source, number of classes) from `config.data`."""
    d = config.data
    if d.source == "store":
        path = Path(d.store_dir) if d.store_dir else workdir / "store"
        s = store.open_store(path)
        if tuple(s.cube_shape) != tuple(d.cube_shape):
            raise ConfigError(
                f"data.cube_shape={tuple(d.cube_shape)} but the store {path} holds "
                f"{tuple(s.cube_shape)} cubes"
            )
        return s.source("train"), s.source("validation"), s.num_classes
    classes = d.get("released_classes", 0) or None  # 0 = every class in the files
    train = store.ReleasedSource(
        d.released_dir,
        split="train",
        resolutions=tuple(d.released_resolutions),
        folds=tuple(d.released_folds) or None,
        classes=classes,
    )
    val = store.ReleasedSource(
        d.released_dir, split="validation", resolutions=(1,), folds=tuple(d.released_folds) or None,
        classes=classes,
    )
    if tuple(train.cube_shape) != tuple(d.cube_shape):
        raise ConfigError(
            f"data.cube_shape={tuple(d.cube_shape)} but {d.released_dir} holds "
            f"{tuple(train.cube_shape)} cubes"
        )
    return train, val, max(train.num_classes, val.num_classes)


def schedule_in_steps(config: ml_collections.ConfigDict,
                      train_cubes: int) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """`config` with its train schedule in steps, and a record of the conversion.

    The reference counts epochs of the data it trains on (x0.5 every 40 epochs, one
    validation per epoch, patience 50 epochs), so a config written in epochs
    (train.schedule_unit = "epochs") stays right whatever the store holds and whatever the
    batch: only here, with the training source open, is the epoch known. One epoch is
    `train_cubes // batch_size` steps (whole global batches, as Models Genesis' epoch loop;
    the training stream carries the remainder into the next epoch, so no cube is skipped);
    the EPOCH_KEYS become multiples of it, and patience, counted in epochs, becomes the
    evaluations those epochs hold (`fit` counts evaluations), rounded up. A config in steps
    comes back unchanged. The record (unit, steps per epoch, the step values) is logged and
    written to pretrain_summary.json: config.json, written before training, shows the
    values as configured.
    """
    t = config.train
    per_epoch = train_cubes // t.batch_size
    unit = t.get("schedule_unit", "steps")
    if per_epoch < 1 and unit == "epochs":  # in steps, `fit` explains the batch size
        raise ConfigError(f"train.batch_size={t.batch_size}: larger than the {train_cubes} training cubes, "
                          "an epoch holds no step")
    logging.info("epoch = %d steps (%d training cubes / global batch %d)", per_epoch, train_cubes,
                 t.batch_size)
    if unit == "epochs":
        config = config.copy_and_resolve_references()
        t = config.train
        patience_epochs, eval_epochs = t.patience, t.eval_every
        for key in EPOCH_KEYS:
            t[key] = int(t[key]) * per_epoch
        t.patience = -(-patience_epochs // eval_epochs) if patience_epochs else 0
        t.schedule_unit = "steps"
        logging.info("schedule in steps: %s, patience %d evaluations",
                     ", ".join(f"{k} {t[k]}" for k in EPOCH_KEYS), t.patience)
    record: dict[str, Any] = {"unit": unit, "steps_per_epoch": per_epoch, "train_cubes": train_cubes,
                              "global_batch": t.batch_size, "patience_evaluations": t.patience}
    record.update({k: int(t[k]) for k in EPOCH_KEYS})
    return config, record


# --------------------------------------------------------------------------- a run


def eval_dataset(val_source, config: ml_collections.ConfigDict):
    """This process's validation pass, built once per run and iterated again at each
    evaluation: the same cubes in the same order every time.

    The cubes come in one fixed, seeded permutation, so every batch mixes classes and
    patients (with bn="reference" a batch's composition changes its loss), and each cube
    gets the same transform draw at every evaluation (the eval key and its position are
    fixed). The originals draw fresh transforms over a reshuffled validation set each
    epoch; fixed draws make the validation loss a deterministic function of the weights, so
    the best checkpoint and early stopping follow the weights, not the draw. The last
    batch's padding rows count nowhere, not even in BatchNorm's batch statistics.
    """
    t = config.train
    return loader.eval_dataset(val_source, batch_size=parallel.local_batch_size(t.batch_size),
                               num_threads=config.data.num_threads, shuffle_seed=t.seed)


def eval_rng(config: ml_collections.ConfigDict) -> jax.Array:
    return jax.random.key_data(jax.random.key(config.train.seed + 1))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> training.Summary:
    """Pretrain per `config` in `workdir`, resuming from the latest checkpoint there."""
    workdir = Path(workdir)
    configuration.validate(config, stages=("pretrain",))
    train_src, val_src, num_classes = open_sources(config, workdir)
    config, schedule = schedule_in_steps(config, len(train_src))
    t = config.train
    if t.objective == "transvw" and config.model.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes={config.model.num_classes} but the data has {num_classes} "
            f"visual-word classes: set --config.model.num_classes={num_classes}"
        )
    if len(val_src) == 0:
        raise ConfigError("the data has no validation cubes (evaluation, early stopping and the best "
                          "checkpoint need them): set discovery.val_fraction > 0 and discover again")
    mesh = parallel.make_mesh(config.parallel.fsdp)
    run = build_run(config, mesh)
    rng = eval_rng(config)
    val_ds = eval_dataset(val_src, config)  # one pipeline for every evaluation and the samples
    sample_batch = []

    def write_samples(variables, step: int, write: bool) -> None:
        if not sample_batch:
            sample_batch.append(next(iter(val_ds)))
        save_samples(run, variables, sample_batch[0], rng, workdir, step, t.objective, write=write)

    summary = training.fit(
        run, t, config.data, workdir, train_source=train_src, config_section="train",
        evaluate=lambda variables: run.evaluate(variables, val_ds, rng, t.eval_batches or None),
        write_samples=write_samples)
    summary.schedule = schedule
    return summary


def save_samples(run: training.Run, variables, local_batch, rng, workdir: Path, step: int, objective: str,
                 write: bool) -> None:
    """Draw the samples step's cubes (every process computes; process 0 writes the PNG)."""
    sharding = parallel.batch_sharding(run.mesh)
    inp, target, restoration, tid = jax.device_get(
        run.steps.samples(variables, parallel.global_batch(local_batch, sharding), rng))
    if not write:
        return
    member = np.asarray(jax.device_get(transform_membership(objective, jnp.asarray(tid))))
    names = ["+".join(n for n, m in zip(T.TRANSFORM_NAMES, row, strict=True) if m) or "none"
             for row in member]
    metrics.save_sample_grid(metrics.sample_path(workdir, step), inp, target, restoration,
                             max_cubes=SAMPLE_CUBES, transform_names=names)
