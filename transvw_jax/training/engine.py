"""Tasks and their compiled steps: the one training update of the project.

A `Task` states what an objective computes, as pure functions of (variables, batch,
per-cube keys); `place` compiles them once for a model, an optimiser and a mesh into a
`Run`. The update (value_and_grad -> tx.update -> apply_updates) is written here only,
so a fix to it, to sharding or to frozen parts reaches every task: pretraining,
segmentation, classification and the discovery auto-encoder.

Per-cube keys are `fold_in(fold_in(key(seed), step), cube index in the global batch)`:
a function of the step and of the cube's position only, so results do not depend on how
many devices or processes share the batch, nor on restarts.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from transvw_jax import multihost, parallel
from transvw_jax.models import abstract_variables, init_variables
from transvw_jax.training.optim import is_frozen
from transvw_jax.training.state import TrainState

Variables = dict[str, Any]
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
    """What an objective computes; every function is traced inside a jitted step.

    prepare(batch, keys, train) -> inputs: the step's non-differentiated part (decoding,
      on-device augmentation; `train` is False in evaluation and samples); its output feeds
      `loss`, `eval_step` and `samples`.
    loss(variables, inputs) -> (loss, (metrics, new batch_stats)): metrics are scalars
      named in `metric_names` (besides "loss" and "grad_norm", which the engine adds).
    eval_step(variables, inputs) -> outputs: sums over the batch's real rows (padding rows
      have `inputs["mask"]` False), added over a validation pass; with `eval_rows`, per-row
      values instead, kept where the mask is set and concatenated.
    summarize(totals) -> host metrics, including "loss" (lower is better).
    samples(variables, inputs) -> a few arrays for a picture (pretraining's PNG grids).
    frozen: top-level module-name prefixes that neither train nor update their BatchNorm
      statistics (fine-tuning's `freeze_encoder`).
    """

    name: str
    model: nn.Module
    prepare: Callable[[Batch, jax.Array, bool], Batch]
    loss: Callable[[Variables, Batch], tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]
    metric_names: tuple[str, ...]
    eval_step: Callable[[Variables, Batch], dict[str, jax.Array]] | None = None
    summarize: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None
    eval_rows: bool = False
    samples: Callable[[Variables, Batch], tuple[jax.Array, ...]] | None = None
    frozen: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled functions of a run."""

    train: Any  # (TrainState, batch) -> (TrainState, metrics); the state is donated
    eval: Any  # (variables, batch, rng) -> outputs of task.eval_step, or None
    samples: Any  # (variables, batch, rng) -> task.samples' arrays, replicated, or None


def cube_keys(rng: jax.Array, step: jax.Array, batch: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def _without_gradient(params: Variables, frozen: tuple[str, ...]) -> Variables:
    """Frozen modules' parameters as constants: no gradient is computed for them, and the
    gradient norm counts what trains."""
    if not frozen:
        return params
    return {k: jax.lax.stop_gradient(v) if is_frozen(k, frozen) else v for k, v in params.items()}


def _keep_frozen_stats(old: Variables, new: Variables, frozen: tuple[str, ...]) -> Variables:
    if not frozen:
        return new
    return {k: (old[k] if is_frozen(k, frozen) else v) for k, v in new.items()}


def build_steps(task: Task, tx: optax.GradientTransformation, mesh, state_sharding: TrainState) -> Steps:
    """`task`'s train, eval and samples steps, jitted for `state_sharding` on `mesh`."""
    batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    variables_sharding = state_sharding.variables

    def train_step(state: TrainState, batch: Batch):
        inputs = task.prepare(batch, cube_keys(state.rng, state.step, batch["cube"].shape[0]), True)

        def loss_fn(params):
            params = _without_gradient(params, task.frozen)
            return task.loss({"params": params, "batch_stats": state.batch_stats}, inputs)

        (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            params=optax.apply_updates(state.params, updates),
            batch_stats=_keep_frozen_stats(state.batch_stats, stats, task.frozen),
            opt_state=opt_state,
            step=state.step + 1,
        )
        return new_state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

    def evaluated(fn):
        def step(variables: Variables, batch: Batch, rng: jax.Array):
            keys = cube_keys(rng, jnp.int32(0), batch["cube"].shape[0])
            return fn(variables, task.prepare(batch, keys, False))
        return step

    names = ("loss", *task.metric_names, "grad_norm")
    train = jax.jit(train_step, donate_argnums=(0,), in_shardings=(state_sharding, batch_sh),
                    out_shardings=(state_sharding, {k: rep for k in names}))
    eval_ = samples = None
    if task.eval_step is not None:
        eval_ = jax.jit(evaluated(task.eval_step), in_shardings=(variables_sharding, batch_sh, rep),
                        out_shardings=rep)
    if task.samples is not None:
        samples = jax.jit(evaluated(task.samples), in_shardings=(variables_sharding, batch_sh, rep),
                          out_shardings=rep)
    return Steps(train=train, eval=eval_, samples=samples)


@dataclasses.dataclass(frozen=True)
class Run:
    """A task with its optimiser, compiled on a mesh: what a run, the benchmarks and the
    tests set up before the first step (reusable across runs of the same shapes)."""

    task: Task
    tx: optax.GradientTransformation
    mesh: Any
    steps: Steps
    like_state: TrainState  # ShapeDtypeStructs with their shardings (restore targets)

    @property
    def model(self) -> nn.Module:
        return self.task.model

    @property
    def like_variables(self) -> Variables:
        return self.like_state.variables

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("loss", *self.task.metric_names, "grad_norm")

    def init(self, seed: int, variables: Variables | None = None) -> TrainState:
        """A fresh state, sharded: `variables` (host arrays, e.g. pretrained weights) or the
        model's initialisation from `seed`. The reference networks fit on one device before
        being placed; `init_variables`' compile options apply only to a top-level jit."""
        shardings = jax.tree.map(lambda s: s.sharding, self.like_state)
        if variables is None:
            variables = init_variables(self.model, jax.random.key(seed))
        variables = jax.device_put(variables, shardings.variables)
        return jax.jit(lambda v: TrainState.create(self.tx, v, seed), out_shardings=shardings)(variables)

    def place_variables(self, variables: Variables) -> Variables:
        """Host variables (e.g. a stored checkpoint) placed like the run's."""
        return jax.device_put(variables, jax.tree.map(lambda s: s.sharding, self.like_variables))

    def evaluate(self, variables: Variables, batches: Iterable[dict[str, np.ndarray]], rng: jax.Array,
                 max_batches: int | None = None) -> dict[str, Any]:
        """`task.summarize` of `task.eval_step` over `batches` (host batches of this
        process; the first `max_batches` only). Sums stay on the devices until the end."""
        sharding = parallel.batch_sharding(self.mesh)
        totals, rows = None, []
        for batch in itertools.islice(batches, max_batches):
            out = self.steps.eval(variables, parallel.global_batch(batch, sharding), rng)
            if self.task.eval_rows:
                out = jax.device_get(out)
                keep = np.asarray(out.pop("mask"), bool)
                rows.append({k: np.asarray(v)[keep] for k, v in out.items()})
            else:
                totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        if self.task.eval_rows:
            totals = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}
        else:
            totals = jax.device_get(totals)
        return self.task.summarize(totals)


def place(task: Task, tx: optax.GradientTransformation, mesh) -> Run:
    """Shardings of `task.model`'s variables and `tx`'s state on `mesh`, and the task's
    steps compiled for them."""
    abstract_vars = abstract_variables(task.model)
    abstract = jax.eval_shape(lambda v: TrainState.create(tx, v, 0), abstract_vars)
    var_sh = parallel.state_shardings(mesh, abstract_vars)
    opt_sh = parallel.state_shardings(mesh, {"opt_state": abstract.opt_state})["opt_state"]
    rep = parallel.replicated(mesh)
    shardings = TrainState(params=var_sh["params"], batch_stats=var_sh.get("batch_stats", {}),
                           opt_state=opt_sh, step=rep, rng=rep)
    like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    steps = multihost.aligned(build_steps(task, tx, mesh, shardings))
    return Run(task=task, tx=tx, mesh=mesh, steps=steps, like_state=like)
