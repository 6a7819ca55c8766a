"""Segmentation fine-tuning: UNet3D with one logit per class, cross-entropy + soft Dice.

Training patches get random flips (the same on image and label); validation patches are
scored with the loss and the hard Dice per foreground class. The whole-volume evaluation
of the best weights is `transvw_jax.finetune`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from transvw_jax import losses, parallel, training
from transvw_jax.data import store
from transvw_jax.models import build_model
from transvw_jax.transforms.flip import flip_each_axis

ENCODER = "down_tr"  # the module-name prefix of the encoder (finetune.freeze_encoder)


def make_model(model: ml_collections.ConfigDict, num_classes: int):
    """UNet3D with logits per class (no output activation)."""
    return build_model({**dict(model), "name": "unet3d", "out_channels": num_classes, "activation": "none"})


def make_prepare(flip_prob: float, mesh, flip_labels: bool):
    """Fine-tuning's `Task.prepare`: decode the patches, flip them in training (with their
    label maps when `flip_labels`), keep them split over the batch sharding."""
    batch_sh = parallel.batch_sharding(mesh)

    def prepare(batch, keys, train):
        x = store.decode_cubes(batch["cube"])
        labels = batch["label"].astype(jnp.int32)
        if train and flip_prob > 0:
            if flip_labels:
                x, labels = flip_each_axis(keys, flip_prob, x, labels)
            else:
                x = flip_each_axis(keys, flip_prob, x)[0]
        return {"input": jax.lax.with_sharding_constraint(x, batch_sh), "label": labels,
                "mask": batch.get("mask")}

    return prepare


def make_task(config: ml_collections.ConfigDict, num_classes: int, mesh) -> training.Task:
    f = config.finetune
    model = make_model(config.model, num_classes)
    prepare = make_prepare(f.flip_prob, mesh, flip_labels=True)

    def loss(variables, inputs):
        logits, upd = model.apply(variables, inputs["input"][..., None], train=True, mutable=["batch_stats"])
        ce, inter, total = losses.segmentation_terms(logits, inputs["label"], num_classes)
        dice = losses.soft_dice(inter.sum(0), total.sum(0))
        return ce.mean() + (1.0 - dice), ({"ce": ce.mean(), "dice": dice}, upd["batch_stats"])

    def eval_step(variables, inputs):
        # Padding rows (mask False) stay out of BatchNorm's batch statistics (bn="reference"):
        # no real patch's result depends on the batch size or the device count.
        logits = model.apply(variables, inputs["input"][..., None], train=False, mask=inputs["mask"])
        ce, inter, total = losses.segmentation_terms(logits, inputs["label"], num_classes)
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes, dtype=jnp.float32)
        truth = jax.nn.one_hot(inputs["label"], num_classes, dtype=jnp.float32)
        mask = inputs["mask"].astype(jnp.float32)
        m = mask[:, None]
        return {
            "count": mask.sum(),
            "ce": (ce * mask).sum(),
            "soft_inter": (inter * m).sum(0),
            "soft_total": (total * m).sum(0),
            "inter": ((pred * truth).sum(axis=(1, 2, 3)) * m).sum(0),
            "pred": (pred.sum(axis=(1, 2, 3)) * m).sum(0),
            "truth": (truth.sum(axis=(1, 2, 3)) * m).sum(0),
        }

    def summarize(t) -> dict[str, float]:
        n = max(float(t["count"]), 1.0)
        ce = float(t["ce"]) / n
        dice_soft = float(losses.soft_dice(jnp.asarray(t["soft_inter"]), jnp.asarray(t["soft_total"])))
        out = {"loss": ce + 1.0 - dice_soft, "ce": ce}
        for c in range(1, num_classes):
            denom = float(t["pred"][c] + t["truth"][c])
            out[f"dice_class{c}"] = 1.0 if denom == 0 else 2.0 * float(t["inter"][c]) / denom
        return out

    return training.Task(name="finetune", model=model, prepare=prepare, loss=loss,
                         metric_names=("ce", "dice"),
                         eval_step=eval_step, summarize=summarize,
                         frozen=(ENCODER,) if f.freeze_encoder else ())
