"""Every objective's loss terms, per sample so that evaluation can mask padding rows.

- restoration (TransVW, Models Genesis, the discovery auto-encoder): mean squared error
  per cube;
- visual words (TransVW): cross-entropy from log_softmax of the logits (the reference's
  log(softmax) is not finite at 0), and whether the argmax is right;
- segmentation: cross-entropy + soft Dice (batch Dice over the foreground classes,
  nnU-Net's smoothing 1e-5);
- classification: binary cross-entropy on one logit for two classes, softmax
  cross-entropy otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DICE_SMOOTH = 1e-5


def squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """(B,) mean squared error per sample, in float32."""
    axes = tuple(range(1, prediction.ndim))
    return jnp.mean((prediction.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=axes)


def word_terms(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B,) cross-entropy of the visual-word class and (B,) 1.0 where the argmax is right."""
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    correct = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
    return ce, correct


def segmentation_terms(logits: jax.Array, labels: jax.Array, num_classes: int):
    """Per-sample cross-entropy (B,), and per-sample, per-class soft intersection and sums (B, C)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    ce = -(onehot * logp).sum(-1).mean(axis=(1, 2, 3))
    probs = jnp.exp(logp)
    inter = (probs * onehot).sum(axis=(1, 2, 3))
    total = probs.sum(axis=(1, 2, 3)) + onehot.sum(axis=(1, 2, 3))
    return ce, inter, total


def soft_dice(inter: jax.Array, total: jax.Array) -> jax.Array:
    """Mean batch Dice over the foreground classes from (C,) sums (class 0 = background)."""
    dice = (2.0 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)
    return dice[1:].mean() if dice.shape[0] > 1 else dice.mean()


def classification_terms(logits: jax.Array, labels: jax.Array):
    """Per-sample loss (B,) and scores: P(class 1) (B,) for one logit, softmax (B, K) otherwise."""
    if logits.shape[-1] == 1:
        loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32))
        return loss, jax.nn.sigmoid(logits[:, 0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), jax.nn.softmax(logits)
