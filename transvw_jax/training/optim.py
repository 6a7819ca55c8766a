"""Optimisers and learning-rate schedules of every task, from a loop config section
(`train` for pretraining, `finetune.train`, the discovery auto-encoder's)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import ml_collections
import optax

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
                     LR_SCALINGS[t.lr_scaling], t.lr_scaling, t.get("warmup_steps", 0))
    schedule = t.get("schedule", "constant")
    warmup = int(t.get("warmup_steps", 0))
    if schedule == "constant":
        main = optax.constant_schedule(peak)
    elif schedule == "step":
        main = optax.exponential_decay(peak, t.decay_every, t.decay_factor, staircase=True)
    else:
        main = optax.cosine_decay_schedule(peak, max(1, t.steps - warmup))
    if warmup:
        warm = optax.linear_schedule(0.0, peak, warmup)
        return optax.join_schedules([warm, main], [warmup])
    return main


def make_optimizer(t: ml_collections.ConfigDict, frozen: Sequence[str] = ()) -> optax.GradientTransformation:
    """Adam or SGD on `make_schedule(t)`, with optional global-norm clipping; parameters of
    top-level modules whose names start with one of `frozen` get no update."""
    schedule = make_schedule(t)
    if t.get("optimizer", "adam") == "adam":
        opt = optax.adam(schedule)
    else:
        opt = optax.sgd(schedule, momentum=t.momentum or None)
    if t.get("grad_clip_norm", 0.0) > 0:
        opt = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), opt)
    if not frozen:
        return opt

    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: "frozen" if is_frozen(k, frozen) else "train", v)
                for k, v in params.items()}

    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


def is_frozen(module: str, frozen: Sequence[str]) -> bool:
    return any(module.startswith(prefix) for prefix in frozen)
