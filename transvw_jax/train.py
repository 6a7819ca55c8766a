"""Pretraining: objectives, optimisers, the jit train/eval steps and the training loop.

One train step = one `jax.jit` program: the raw cube batch (compact dtype, sharded over
the mesh) is decoded, each cube is transformed on the device with its own key (the
policy of `config.transforms`), the network restores it (and, for TransVW, classifies
it), and the optimiser updates; the old state is donated. Keys are
`fold_in(fold_in(key(seed), step), cube index in the global batch)`: a function of the
step and of the cube's position only, so results do not depend on how many devices or
processes share the batch, nor on restarts.

Objectives:
- transvw: lambda_rec * MSE(restoration, target) + lambda_cls * cross-entropy(logits,
  visual-word class), on YNet3D; cross-entropy from log_softmax of the logits (the
  reference's log(softmax) is not finite at 0).
- genesis: MSE only (Models Genesis), on UNet3D; the store's labels are ignored.

State: `{"params", "batch_stats"}` (the variables) and `{"opt_state", "step", "rng"}`,
float32 master weights whatever `model.dtype` computes in.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from transvw_jax import checkpointing, metrics, multihost, parallel
from transvw_jax import transforms as T
from transvw_jax.data import loader, store
from transvw_jax.errors import ConfigError, Preempted, TransVWError
from transvw_jax.models import abstract_variables, build_model, init_variables
from transvw_jax.transforms import cube_ops as C

OBJECTIVES = {"transvw": "ynet3d", "genesis": "unet3d"}
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "cosine")
SCHEDULE_UNITS = ("steps", "epochs")
# Counted in epochs when train.schedule_unit = "epochs" (patience too: see `schedule_in_steps`).
EPOCH_KEYS = ("steps", "decay_every", "warmup_steps", "eval_every", "checkpoint_every", "sample_every")
NUM_TRANSFORMS = len(T.TRANSFORM_NAMES)
METRICS = ("loss", "rec", "cls", "acc", "grad_norm")  # train-step metrics, in display order
SAMPLE_CUBES = 4  # cubes in a sample PNG: all that `Steps.samples` returns


class TrainingDiverged(TransVWError):
    """The loss became NaN or Inf."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "transvw"  # transvw (YNet3D, restoration + visual words) | genesis (UNet3D)
    c.batch_size = 64  # global: split over processes and devices
    # steps | epochs: the unit of steps, decay_every, warmup_steps, eval_every, checkpoint_every,
    # sample_every and patience. "epochs" (the reference's unit) converts them to steps of the
    # actual training data when training starts (`schedule_in_steps`); log_every is always steps.
    c.schedule_unit = "steps"
    c.steps = 10_000
    c.optimizer = "adam"  # adam | sgd (momentum below)
    c.learning_rate = 1e-3
    c.momentum = 0.9
    c.schedule = "step"  # constant | step (x decay_factor every decay_every steps) | cosine
    c.decay_every = 4000  # steps (the reference: every 40 epochs)
    c.decay_factor = 0.5
    c.warmup_steps = 0  # linear warmup (cosine and step)
    # none | sqrt | linear: the peak learning rate is learning_rate x (batch_size /
    # reference_batch_size) ** (1/2 | 1) (`make_schedule`), for a batch far from the one the
    # learning rate was tuned at. "none" (learning_rate as given) is the reference's recipe.
    c.lr_scaling = "none"
    c.reference_batch_size = 64  # the global batch learning_rate was tuned at (the reference's 64)
    c.grad_clip_norm = 0.0  # 0 = off
    c.lambda_rec = 1.0
    c.lambda_cls = 0.01
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = 0  # 0 = the whole validation split
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.sample_every = 1000  # PNG of input / target / restoration; 0 = never
    c.patience = 10  # evaluations without a better validation loss before stopping; 0 = never
    c.seed = 0
    return c


def validate_config(config: ml_collections.ConfigDict) -> None:
    t = config.train
    if t.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective: {t.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if config.model.name != OBJECTIVES[t.objective]:
        raise ConfigError(
            f"train.objective={t.objective!r} trains model.name={OBJECTIVES[t.objective]!r}, "
            f"the config has {config.model.name!r}"
        )
    if (
        t.objective == "transvw"
        and config.transforms.policy != "transvw"
        or (t.objective == "genesis" and config.transforms.policy != "genesis")
    ):
        logging.warning("train.objective=%s with transforms.policy=%s", t.objective, config.transforms.policy)
    validate_loop_config(t, "train")
    if t.get("schedule_unit", "steps") not in SCHEDULE_UNITS:
        raise ConfigError(f"train.schedule_unit: {t.schedule_unit!r} is not one of "
                          f"{', '.join(SCHEDULE_UNITS)}")
    if config.data.get("released_classes", 0) < 0:
        raise ConfigError(f"data.released_classes must be >= 0 (0 = all), got {config.data.released_classes}")
    if t.lambda_rec < 0 or t.lambda_cls < 0:
        raise ConfigError("train.lambda_rec and train.lambda_cls must be >= 0")
    if config.data.source not in ("store", "released"):
        raise ConfigError(f"data.source: {config.data.source!r} is not 'store' or 'released'")


def validate_loop_config(t: ml_collections.ConfigDict, section: str) -> None:
    """The optimiser, schedule and cadence keys `fit` and `make_optimizer` read, named as
    `<section>.<key>` in errors (pretraining's `train`, fine-tuning's `finetune.train`)."""
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"{section}.optimizer: {t.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"{section}.schedule: {t.schedule!r} is not one of {', '.join(SCHEDULES)}")
    for key in ("batch_size", "steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "decay_every"):
        if int(t[key]) < 1:
            raise ConfigError(f"{section}.{key} must be >= 1, got {t[key]}")
    if not t.learning_rate > 0:
        raise ConfigError(f"{section}.learning_rate must be > 0, got {t.learning_rate}")
    # .get: configs written before these keys existed (and fine-tuning's section) still load.
    if t.get("lr_scaling", "none") not in LR_SCALINGS:
        raise ConfigError(f"{section}.lr_scaling: {t.lr_scaling!r} is not one of {', '.join(LR_SCALINGS)}")
    if int(t.get("reference_batch_size", 64)) < 1:
        raise ConfigError(f"{section}.reference_batch_size must be >= 1, got {t.reference_batch_size}")


# --------------------------------------------------------------------------- optimiser


LR_SCALINGS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # train.lr_scaling: exponent of the batch ratio


def peak_learning_rate(t: ml_collections.ConfigDict) -> float:
    """learning_rate scaled by train.lr_scaling: x (batch_size / reference_batch_size) ** p,
    p = 0 (none), 1/2 (sqrt: keeps the update's noise scale, the usual rule for Adam) or 1
    (linear: the SGD rule of Goyal et al. 2017). Both need a warm-up at large ratios."""
    scaling = t.get("lr_scaling", "none")
    if scaling == "none":
        return float(t.learning_rate)
    ratio = t.batch_size / t.get("reference_batch_size", 64)
    return float(t.learning_rate) * ratio ** LR_SCALINGS[scaling]


def make_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
    peak = peak_learning_rate(t)
    if t.get("lr_scaling", "none") != "none":
        logging.info("peak learning rate %.3g = %.3g x (%d / %d) ** %g (lr_scaling=%s), warm-up %d steps",
                     peak, t.learning_rate, t.batch_size, t.get("reference_batch_size", 64),
                     LR_SCALINGS[t.lr_scaling], t.lr_scaling, t.warmup_steps)
    if t.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif t.schedule == "step":
        main = optax.exponential_decay(peak, t.decay_every, t.decay_factor, staircase=True)
    else:
        main = optax.cosine_decay_schedule(peak, max(1, t.steps - t.warmup_steps))
    if t.warmup_steps:
        warm = optax.linear_schedule(0.0, peak, t.warmup_steps)
        return optax.join_schedules([warm, main], [t.warmup_steps])
    return main


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = make_schedule(t)
    opt = optax.adam(schedule) if t.optimizer == "adam" else optax.sgd(schedule, momentum=t.momentum or None)
    if t.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), opt)
    return opt


# --------------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled pieces of a run (built once per model / config / mesh)."""

    train: Any  # (variables, train_state, batch) -> (variables, train_state, metrics)
    eval: Any  # (variables, batch, key) -> sums
    samples: Any  # (variables, batch, key) -> (input, target, restoration, transform) of SAMPLE_CUBES cubes


def transform_membership(objective: str, tid: jax.Array) -> jax.Array:
    """(B, 5) bool: which transforms each cube went through (TransVW: one id; Genesis: bits)."""
    if objective == "genesis":
        return (tid[:, None] >> jnp.arange(NUM_TRANSFORMS)) & 1 == 1
    return jax.nn.one_hot(tid, NUM_TRANSFORMS, dtype=jnp.bool_)


def cube_keys(rng: jax.Array, step: jax.Array, batch: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def _forward(model, objective, variables, x, train, mask=None):
    """(restoration (B,X,Y,Z), logits or None, new batch_stats or None). `mask` (B,): the
    rows that enter BatchNorm's batch statistics (evaluation's padding rows do not)."""
    x = x[..., None]
    if train:
        out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"], mask=mask)
        stats = upd["batch_stats"]
    else:
        out, stats = model.apply(variables, x, train=False, mask=mask), None
    if objective == "transvw":
        restoration, logits = out
    else:
        restoration, logits = out, None
    return restoration[..., 0], logits, stats


def _loss_parts(restoration, logits, target, labels):
    mse = jnp.mean((restoration - target.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
    if logits is None:
        return mse, jnp.zeros_like(mse), jnp.zeros_like(mse)
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    correct = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
    return mse, ce, correct


def build_steps(
    model, tx, config: ml_collections.ConfigDict, mesh, variables_sharding, train_state_sharding
) -> Steps:
    t, tcfg = config.train, config.transforms
    objective = t.objective
    batch_sh = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)
    platform = mesh.devices.flat[0].platform  # the transforms' backend-specific forms follow the mesh

    def pin(*arrays):
        """Per-cube arrays split over the batch sharding, like the batch: no device
        computes (or gathers) another device's cubes."""
        return tuple(jax.lax.with_sharding_constraint(a, batch_sh) for a in arrays)

    def augment(keys, cube):
        keys, x = pin(keys, store.decode_cubes(cube))
        with C.tracing_for(platform):
            return pin(*T.batch_policy(keys, x, tcfg, shards=mesh.size))

    def train_step(variables, state, batch):
        keys = cube_keys(state["rng"], state["step"], batch["cube"].shape[0])
        inp, target, tid = augment(keys, batch["cube"])

        def loss_fn(params):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            restoration, logits, stats = _forward(model, objective, v, inp, True)
            mse, ce, correct = _loss_parts(restoration, logits, target, batch["label"])
            loss = t.lambda_rec * mse.mean() + (t.lambda_cls * ce.mean() if objective == "transvw" else 0.0)
            return loss, (stats, mse.mean(), ce.mean(), correct.mean())

        (loss, (stats, rec, cls, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        new_state = {"opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        out = {"loss": loss, "rec": rec}
        if objective == "transvw":
            out.update(cls=cls, acc=acc)
        out["grad_norm"] = optax.tree.norm(grads)
        return {"params": params, "batch_stats": stats}, new_state, out

    def eval_sums(variables, batch, rng):
        keys = cube_keys(rng, jnp.int32(0), batch["cube"].shape[0])
        inp, target, tid = augment(keys, batch["cube"])
        # Padding rows (mask False) stay out of BatchNorm's batch statistics: no real cube's
        # result depends on the batch size or the device count.
        restoration, logits, _ = _forward(model, objective, variables, inp, False, batch["mask"])
        mse, ce, correct = _loss_parts(restoration, logits, target, batch["label"])
        mask = batch["mask"].astype(jnp.float32)
        member = transform_membership(objective, tid).astype(jnp.float32) * mask[:, None]
        return {
            "count": mask.sum(),
            "rec": (mse * mask).sum(),
            "cls": (ce * mask).sum(),
            "correct": (correct * mask).sum(),
            "per_transform_rec": (member * mse[:, None]).sum(0),
            "per_transform_count": member.sum(0),
        }

    def samples(variables, batch, rng):
        """The first SAMPLE_CUBES cubes only: they alone are replicated and fetched."""
        keys = cube_keys(rng, jnp.int32(0), batch["cube"].shape[0])
        inp, target, tid = augment(keys, batch["cube"])
        restoration, _, _ = _forward(model, objective, variables, inp, False, batch["mask"])
        return tuple(a[:SAMPLE_CUBES] for a in (inp, target, restoration, tid))

    metric_names = [k for k in METRICS if objective == "transvw" or k not in ("cls", "acc")]
    train = jax.jit(
        train_step,
        donate_argnums=(0, 1),
        in_shardings=(variables_sharding, train_state_sharding, batch_sh),
        out_shardings=(variables_sharding, train_state_sharding, {k: rep for k in metric_names}),
    )
    eval_ = jax.jit(eval_sums, in_shardings=(variables_sharding, batch_sh, rep), out_shardings=rep)
    samples_ = jax.jit(samples, in_shardings=(variables_sharding, batch_sh, rep), out_shardings=rep)
    return Steps(train=train, eval=eval_, samples=samples_)


@dataclasses.dataclass(frozen=True)
class Run:
    """A model, its optimiser and compiled steps, placed on a mesh: what a run (and the
    benchmarks, and the tests) set up before the first step."""

    model: Any
    tx: optax.GradientTransformation
    mesh: Any
    steps: Steps
    like_variables: Any  # ShapeDtypeStructs with their shardings (restore targets)
    like_state: Any

    def init(self, seed: int) -> tuple[dict, dict]:
        """Fresh (variables, train state), sharded. The variables are the values of
        `init_variables` (its compile options apply only to a top-level jit); the reference
        networks fit on one device before being placed."""
        var_sh = jax.tree.map(lambda s: s.sharding, self.like_variables)
        state_sh = jax.tree.map(lambda s: s.sharding, self.like_state)
        variables = jax.device_put(init_variables(self.model, jax.random.key(seed)), var_sh)
        state = jax.jit(lambda v: init_train_state(self.tx, v, seed), out_shardings=state_sh)(variables)
        return variables, state


def build_run(config: ml_collections.ConfigDict, mesh) -> Run:
    """Model, optimiser, shardings and compiled steps for `config` on `mesh`."""
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    return place_run(model, tx, mesh, lambda var_sh, state_sh: build_steps(model, tx, config, mesh, var_sh,
                                                                           state_sh))


def place_run(model, tx: optax.GradientTransformation, mesh,
              make_steps: Callable[[Any, Any], Steps]) -> Run:
    """Shardings of `model`'s variables and `tx`'s state on `mesh`, and the steps compiled
    for them by `make_steps(variables_sharding, train_state_sharding)`."""
    abstract_vars = abstract_variables(model)
    var_sh = parallel.state_shardings(mesh, abstract_vars)
    abstract_state = jax.eval_shape(lambda v: init_train_state(tx, v, 0), abstract_vars)
    state_sh = parallel.state_shardings(mesh, abstract_state)
    state_sh["step"] = state_sh["rng"] = parallel.replicated(mesh)

    def placed(abstract, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)

    steps = multihost.aligned(make_steps(var_sh, state_sh))
    return Run(model=model, tx=tx, mesh=mesh, steps=steps,
               like_variables=placed(abstract_vars, var_sh), like_state=placed(abstract_state, state_sh))


def init_train_state(tx, variables, seed: int) -> dict:
    return {
        "opt_state": tx.init(variables["params"]),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


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


# --------------------------------------------------------------------------- the loop


def _finite_or_raise(history: list[tuple[int, dict]], last_good: int | None, workdir: Path) -> None:
    for step, values in history:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            where = (
                f"the last good checkpoint is step {last_good} in {checkpointing.checkpoint_dir(workdir)}"
                if last_good is not None
                else "no checkpoint was written"
            )
            parts = ", ".join(f"{k} {v}" for k, v in bad.items())
            raise TrainingDiverged(f"step {step}: training diverged ({parts}); stopping, {where}")


def _eval_dataset(val_source, config):
    """This process's validation pass (`loader.eval_dataset`), built once per run and
    iterated again at each evaluation: the same cubes in the same order every time."""
    t = config.train
    return loader.eval_dataset(val_source, batch_size=parallel.local_batch_size(t.batch_size),
                               num_threads=config.data.num_threads, shuffle_seed=t.seed)


def _evaluate(steps: Steps, variables, val_source, config, mesh, rng, dataset=None) -> dict[str, float]:
    """Mean validation metrics over the whole split (or train.eval_batches batches).

    The cubes come in one fixed, seeded permutation, so every batch mixes classes and
    patients (with bn="reference" a batch's composition changes its loss), and each cube
    gets the same transform draw at every evaluation (`rng` and its position are fixed). The
    originals draw fresh transforms over a reshuffled validation set each epoch; fixed draws
    make the validation loss a deterministic function of the weights, so the best checkpoint
    and early stopping follow the weights, not the draw. The last batch's padding rows
    count nowhere, not even in BatchNorm's batch statistics (`build_steps`).

    `dataset`: the pass from `_eval_dataset(val_source, config)`, reused between
    evaluations (None: built here).
    """
    t = config.train
    ds = _eval_dataset(val_source, config) if dataset is None else dataset
    sharding = parallel.batch_sharding(mesh)
    totals = None
    for batch in itertools.islice(ds, t.eval_batches or None):
        sums = steps.eval(variables, parallel.global_batch(batch, sharding), rng)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    out = {"rec": float(totals["rec"]) / n}
    if t.objective == "transvw":
        out["cls"] = float(totals["cls"]) / n
        out["acc"] = float(totals["correct"]) / n
        out["loss"] = t.lambda_rec * out["rec"] + t.lambda_cls * out["cls"]
    else:
        out["loss"] = out["rec"]
    for name, s, c in zip(
        T.TRANSFORM_NAMES, totals["per_transform_rec"], totals["per_transform_count"], strict=True
    ):
        if c > 0:
            out[f"rec_{name}"] = float(s) / float(c)
    return out


@dataclasses.dataclass
class Summary:
    """What a run ended with (logged by the stage, returned to callers and tests)."""

    step: int
    stopped_early: bool
    last_train: dict[str, float]
    best_eval: dict[str, float] | None
    best_step: int | None
    checkpoint_dir: Path
    variables: Any = None  # the final {"params", "batch_stats"} (sharded jax arrays)
    schedule: dict[str, Any] | None = None  # pretraining: the schedule in steps (`schedule_in_steps`)


@dataclasses.dataclass(frozen=True)
class Task:
    """What the training loop needs from an objective: pretraining and fine-tuning both
    hand one to `fit`, which owns the loop, checkpoints, early stopping and metrics.

    `evaluate(variables)` runs a whole validation pass and returns host floats including
    "loss" (lower is better: the best checkpoint and early stopping follow it).
    `write_samples(variables, step, write)` draws a PNG (every process calls it; `write`
    is true on process 0 only), or None.
    """

    name: str  # for log lines: "pretrain", "finetune"
    config_section: str  # where the loop's keys live, for error messages: "train", "finetune.train"
    run: Run
    train_source: Any
    init: Callable[[], tuple[dict, dict]]  # fresh (variables, train state), sharded
    evaluate: Callable[[Any], dict[str, float]]
    metric_names: tuple[str, ...]
    write_samples: Callable[[Any, int, bool], None] | None = None


def fit(task: Task, t: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
        workdir: str | Path) -> Summary:
    """Train `task` for `t.steps` steps in `workdir`, resuming from its latest checkpoint.

    Uses from `t`: batch_size, steps, seed, log_every, eval_every, checkpoint_every,
    keep_checkpoints, sample_every, patience; from `data`: num_threads, prefetch.
    """
    workdir = Path(workdir)
    run = task.run
    local = parallel.local_batch_size(t.batch_size)
    ckpt = checkpointing.RunCheckpointer(workdir, keep=t.keep_checkpoints)
    start = ckpt.latest_step()
    try:
        dataset = loader.train_dataset(
            task.train_source,
            batch_size=local,
            global_batch_size=t.batch_size,
            seed=t.seed,
            num_threads=data.num_threads,
            prefetch=data.prefetch,
        )
    except ValueError as e:
        raise ConfigError(f"{task.config_section}.batch_size={t.batch_size}: {e}") from None
    iterator = iter(dataset)
    is_main = jax.process_index() == 0
    writer = metrics.MetricsWriter(workdir, enabled=is_main)
    best_eval, best_step, evals_since_best = None, None, 0
    already_stopped = False
    if start is None:
        ckpt.open_best(None, None)
        variables, state = task.init()
        start = 0
    else:
        variables, state, data_state = ckpt.restore(start, run.like_variables, run.like_state,
                                                    iterator=iterator)
        best_eval = data_state.get("best_eval")
        evals_since_best = int(data_state.get("evals_since_best", 0))
        best_step = data_state.get("best_step")
        ckpt.open_best(start, best_step, variables)
        if best_step is None:  # a checkpoint written before best_step was recorded
            best_step = ckpt.best_step()
        writer.truncate_after(start)
        logging.info("%s: resumed from %s/%d", task.name, checkpointing.checkpoint_dir(workdir), start)
        if t.patience and evals_since_best >= t.patience:
            logging.info("%s: the run had already stopped early (no better validation loss in %d "
                         "evaluations); nothing to do", task.name, evals_since_best)
            already_stopped = True

    sharding = parallel.batch_sharding(run.mesh)
    progress = metrics.ProgressLine(t.steps, t.batch_size, start_step=start)
    pending: list[tuple[int, dict]] = []
    last_good = start if start else None
    last_train: dict[str, float] = {}
    stopped_early = already_stopped

    def flush_pending() -> None:
        nonlocal pending, last_train
        values = jax.device_get([m for _, m in pending])  # one transfer for all pending steps
        fetched = [(s, {k: float(v[k]) for k in task.metric_names if k in v})
                   for (s, _), v in zip(pending, values, strict=True)]
        pending = []
        _finite_or_raise(fetched, last_good, workdir)
        if fetched:
            last_train = fetched[-1][1]

    step = start
    preemption = multihost.Preemption().__enter__()  # left in `finally`
    try:
        while step < t.steps and not already_stopped:
            batch = parallel.global_batch(next(iterator), sharding)
            variables, state, m = run.steps.train(variables, state, batch)
            step += 1
            pending.append((step, m))
            preempted = preemption.reached(step)
            save_now = False
            if step % t.log_every == 0 or step == t.steps:
                flush_pending()
                progress.update(step, last_train)
                writer.write(step, "train", last_train)
            if task.write_samples and t.sample_every and (step % t.sample_every == 0 or step == t.steps):
                task.write_samples(variables, step, is_main)
            if step % t.eval_every == 0 or step == t.steps:
                flush_pending()
                ev = task.evaluate(variables)
                writer.write(step, "eval", ev)
                logging.info("eval step %d: %s", step, " ".join(f"{k} {v:.4g}" for k, v in ev.items()))
                if best_eval is None or ev["loss"] < best_eval["loss"]:
                    best_eval, best_step, evals_since_best = ev, step, 0
                    ckpt.save_best(step, variables)
                    save_now = True  # a latest checkpoint of the best step: see RunCheckpointer
                else:
                    evals_since_best += 1
                if t.patience and evals_since_best >= t.patience:
                    logging.info("%s: no better validation loss in %d evaluations: stopping at step %d",
                                 task.name, evals_since_best, step)
                    stopped_early = True
            periodic = step % t.checkpoint_every == 0 or step == t.steps
            if periodic or stopped_early or save_now or preempted:
                flush_pending()
                run_state = {"best_eval": best_eval, "evals_since_best": evals_since_best,
                             "best_step": best_step}
                ckpt.save(step, variables, state, run_state, iterator=iterator)
                last_good = step
            if preempted and step < t.steps and not stopped_early:
                ckpt.wait()
                saved = checkpointing.checkpoint_dir(workdir) / str(step)
                raise Preempted(f"{task.name}: stopped by SIGTERM at step {step} of {t.steps}; saved "
                                f"checkpoint {saved}: run the same command to resume")
            if stopped_early:
                break
    finally:
        preemption.__exit__()
        ckpt.wait()
        ckpt.close()
        writer.close()
    return Summary(
        step=step,
        stopped_early=stopped_early,
        last_train=last_train,
        best_eval=best_eval,
        best_step=best_step,
        checkpoint_dir=checkpointing.checkpoint_dir(workdir),
        variables=variables,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> Summary:
    """Pretrain per `config` in `workdir`, resuming from the latest checkpoint there."""
    workdir = Path(workdir)
    validate_config(config)
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
    sharding = parallel.batch_sharding(mesh)
    eval_rng = jax.random.key_data(jax.random.key(t.seed + 1))
    eval_ds = _eval_dataset(val_src, config)  # one pipeline for every evaluation and the samples
    sample_batch = []

    def write_samples(variables, step: int, write: bool) -> None:
        if not sample_batch:
            sample_batch.append(_first_val_batch(eval_ds))
        _write_samples(run.steps, variables, sample_batch[0], sharding, eval_rng, workdir, step, t.objective,
                       write=write)

    task = Task(
        name="pretrain",
        config_section="train",
        run=run,
        train_source=train_src,
        init=lambda: run.init(t.seed),
        evaluate=lambda variables: _evaluate(run.steps, variables, val_src, config, mesh, eval_rng, eval_ds),
        metric_names=tuple(k for k in METRICS if t.objective == "transvw" or k not in ("cls", "acc")),
        write_samples=write_samples,
    )
    summary = fit(task, t, config.data, workdir)
    summary.schedule = schedule
    return summary


def _first_val_batch(dataset) -> dict[str, np.ndarray]:
    """The first batch of the validation pass (`_eval_dataset`): the cubes of the samples."""
    return next(iter(dataset))


def _write_samples(
    steps: Steps, variables, local_batch, sharding, rng, workdir: Path, step: int, objective: str, write: bool
) -> None:
    inp, target, restoration, tid = jax.device_get(
        steps.samples(variables, parallel.global_batch(local_batch, sharding), rng)
    )
    if not write:
        return
    member = np.asarray(jax.device_get(transform_membership(objective, jnp.asarray(tid))))
    names = [
        "+".join(n for n, m in zip(T.TRANSFORM_NAMES, row, strict=True) if m) or "none" for row in member
    ]
    metrics.save_sample_grid(
        metrics.sample_path(workdir, step), inp, target, restoration, max_cubes=SAMPLE_CUBES,
        transform_names=names,
    )
