"""Classification fine-tuning: the encoder with a classification head on candidate cubes.

Binary cross-entropy on one logit for two classes, cross-entropy otherwise; random flips
in training; AUC (Mann-Whitney; macro one-vs-rest for more than two classes) and accuracy
on the validation candidates.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from transvw_jax import evaluation, losses, training
from transvw_jax.models import build_model
from transvw_jax.tasks.segmentation import ENCODER, make_prepare


def make_model(model: ml_collections.ConfigDict, num_classes: int):
    """EncoderClassifier: one logit for two classes, one per class otherwise."""
    return build_model({**dict(model), "name": "encoder_classifier",
                        "num_classes": 1 if num_classes == 2 else num_classes})


def make_task(config: ml_collections.ConfigDict, num_classes: int, mesh) -> training.Task:
    f = config.finetune
    model = make_model(config.model, num_classes)
    prepare = make_prepare(f.flip_prob, mesh, flip_labels=False)

    def loss(variables, inputs):
        logits, upd = model.apply(variables, inputs["input"][..., None], train=True, mutable=["batch_stats"])
        value, _ = losses.classification_terms(logits, inputs["label"])
        return value.mean(), ({}, upd["batch_stats"])

    def eval_step(variables, inputs):
        logits = model.apply(variables, inputs["input"][..., None], train=False, mask=inputs["mask"])
        value, scores = losses.classification_terms(logits, inputs["label"])
        return {"loss": value, "scores": scores, "labels": inputs["label"], "mask": inputs["mask"]}

    return training.Task(name="finetune", model=model, prepare=prepare, loss=loss, metric_names=(),
                         eval_step=eval_step, summarize=summarize, eval_rows=True,
                         frozen=(ENCODER,) if f.freeze_encoder else ())


def summarize(rows: dict[str, np.ndarray]) -> dict:
    """Loss, accuracy and AUC of the validation candidates; their scores and labels under
    "_scores" / "_labels" (for the report, not the metrics log)."""
    loss, s, y = rows["loss"], rows["scores"], rows["labels"]
    if s.ndim == 1:
        pred, auc = (s > 0.5).astype(np.int32), evaluation.roc_auc(s, y)
    else:
        pred = s.argmax(1)
        aucs = [evaluation.roc_auc(s[:, k], (y == k).astype(np.int32)) for k in range(s.shape[1])]
        auc = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    return {"loss": float(loss.mean()), "accuracy": float((pred == y).mean()), "auc": auc,
            "_scores": s.tolist(), "_labels": y.tolist()}
