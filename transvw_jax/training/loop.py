"""The training loop every task runs in: resume, checkpoints, evaluation, early stopping,
NaN stop, metrics, progress and preemption live here once."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections

from transvw_jax import checkpointing, metrics, multihost, parallel
from transvw_jax.data import loader
from transvw_jax.errors import ConfigError, Preempted, TransVWError
from transvw_jax.training.engine import Run, Variables
from transvw_jax.training.state import TrainState


class TrainingDiverged(TransVWError):
    """The loss became NaN or Inf."""


@dataclasses.dataclass
class Summary:
    """What a run ended with (logged by the stage, returned to callers and tests)."""

    step: int
    stopped_early: bool
    last_train: dict[str, float]
    best_eval: dict[str, float] | None
    best_step: int | None
    checkpoint_dir: Path
    state: TrainState | None = None  # the final state (sharded jax arrays)
    resumed_from: int | None = None  # the checkpoint step the run started from (None: fresh)
    schedule: dict[str, Any] | None = None  # pretraining: the schedule in steps (`schedule_in_steps`)

    @property
    def variables(self) -> Variables | None:
        return None if self.state is None else self.state.variables


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


def fit(run: Run, t: ml_collections.ConfigDict, data: ml_collections.ConfigDict, workdir: str | Path, *,
        train_source: Any, config_section: str,
        evaluate: Callable[[Variables], dict[str, float]] | None = None,
        init: Callable[[], TrainState] | None = None,
        write_samples: Callable[[Variables, int, bool], None] | None = None) -> Summary:
    """Train `run` for `t.steps` steps in `workdir`, resuming from its latest checkpoint.

    train_source: the training data (a random-access source of host batches' rows).
    config_section: where the loop's keys live, for error messages ("train", "finetune.train").
    evaluate(variables): a whole validation pass -> host floats including "loss" (the best
      checkpoint and early stopping follow it); None: no evaluation.
    init(): the fresh state (default: `run.init(t.seed)`).
    write_samples(variables, step, write): a picture every `t.sample_every` steps (every
      process calls it; `write` is true on process 0 only).

    Uses from `t`: batch_size, steps, seed, log_every, eval_every, checkpoint_every,
    keep_checkpoints, sample_every, patience; from `data`: num_threads, prefetch.
    """
    workdir = Path(workdir)
    name = run.task.name
    local = parallel.local_batch_size(t.batch_size, run.mesh, f"{config_section}.batch_size")
    ckpt = checkpointing.RunCheckpointer(workdir, keep=t.keep_checkpoints)
    start = ckpt.latest_step()
    try:
        dataset = loader.train_dataset(train_source, batch_size=local, global_batch_size=t.batch_size,
                                       seed=t.seed, num_threads=data.num_threads, prefetch=data.prefetch)
    except ValueError as e:
        raise ConfigError(f"{config_section}.batch_size={t.batch_size}: {e}") from None
    iterator = iter(dataset)
    is_main = jax.process_index() == 0
    writer = metrics.MetricsWriter(workdir, enabled=is_main)
    best_eval, best_step, evals_since_best = None, None, 0
    eval_every = t.get("eval_every", 0) if evaluate is not None else 0
    sample_every = t.get("sample_every", 0) if write_samples is not None else 0
    patience = t.get("patience", 0)
    already_stopped = False
    resumed_from = start
    if start is None:
        ckpt.open_best(None, None)
        state = init() if init is not None else run.init(t.seed)
        start = 0
    else:
        variables, train_part, data_state = ckpt.restore(start, run.like_variables,
                                                         run.like_state.optimizer_part, iterator=iterator)
        state = TrainState.from_parts(variables, train_part)
        best_eval = data_state.get("best_eval")
        evals_since_best = int(data_state.get("evals_since_best", 0))
        best_step = data_state.get("best_step")
        ckpt.open_best(start, best_step, state.variables)
        if best_step is None:  # a checkpoint written before best_step was recorded
            best_step = ckpt.best_step()
        writer.truncate_after(start)
        logging.info("%s: resumed from %s/%d", name, checkpointing.checkpoint_dir(workdir), start)
        if patience and evals_since_best >= patience:
            logging.info("%s: the run had already stopped early (no better validation loss in %d "
                         "evaluations); nothing to do", name, evals_since_best)
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
        fetched = [(s, {k: float(v[k]) for k in run.metric_names if k in v})
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
            state, m = run.steps.train(state, batch)
            step += 1
            pending.append((step, m))
            preempted = preemption.reached(step)
            save_now = False
            if step % t.log_every == 0 or step == t.steps:
                flush_pending()
                progress.update(step, last_train)
                writer.write(step, "train", last_train)
            if sample_every and (step % sample_every == 0 or step == t.steps):
                write_samples(state.variables, step, is_main)
            if eval_every and (step % eval_every == 0 or step == t.steps):
                flush_pending()
                ev = evaluate(state.variables)
                writer.write(step, "eval", ev)
                logging.info("eval step %d: %s", step, " ".join(f"{k} {v:.4g}" for k, v in ev.items()))
                if best_eval is None or ev["loss"] < best_eval["loss"]:
                    best_eval, best_step, evals_since_best = ev, step, 0
                    ckpt.save_best(step, state.variables)
                    save_now = True  # a latest checkpoint of the best step: see RunCheckpointer
                else:
                    evals_since_best += 1
                if patience and evals_since_best >= patience:
                    logging.info("%s: no better validation loss in %d evaluations: stopping at step %d",
                                 name, evals_since_best, step)
                    stopped_early = True
            periodic = step % t.checkpoint_every == 0 or step == t.steps
            if periodic or stopped_early or save_now or preempted:
                flush_pending()
                run_state = {"best_eval": best_eval, "evals_since_best": evals_since_best,
                             "best_step": best_step}
                ckpt.save(step, state.variables, state.optimizer_part, run_state, iterator=iterator)
                last_good = step
            if preempted and step < t.steps and not stopped_early:
                ckpt.wait()
                saved = checkpointing.checkpoint_dir(workdir) / str(step)
                raise Preempted(f"{name}: stopped by SIGTERM at step {step} of {t.steps}; saved "
                                f"checkpoint {saved}: run the same command to resume")
            if stopped_early:
                break
    finally:
        preemption.__exit__()
        ckpt.wait()
        ckpt.close()
        writer.close()
    return Summary(step=step, stopped_early=stopped_early, last_train=last_train, best_eval=best_eval,
                   best_step=best_step, checkpoint_dir=checkpointing.checkpoint_dir(workdir), state=state,
                   resumed_from=resumed_from)
