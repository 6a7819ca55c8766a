"""Fine-tuning: downstream segmentation and classification from pretrained weights.

The loop, checkpoints (exact resume), early stopping, metrics and progress are
pretraining's (`train.fit`); this module supplies the objective, the labeled data and the
initialisation:

- segmentation: UNet3D with `num_classes` output channels (logits), cross-entropy + soft
  Dice (batch Dice over the foreground classes, nnU-Net's smoothing 1e-5), patches with
  foreground oversampling, random flips; validation on fixed patches (loss, Dice per
  class), then sliding-window inference of the best weights over every whole validation
  case (masks as NIfTI with the input's affine, overlays, Dice/IoU report).
- classification: EncoderClassifier on candidate cubes; BCE with one logit for two
  classes, cross-entropy otherwise; AUC (Mann-Whitney; macro one-vs-rest for more than two
  classes) and accuracy.

Initialisation `scratch` or `pretrained`: from a pretraining workdir (its `best/`, else the
latest checkpoint), our export or the released PyTorch weights (.pt / .pth /
.safetensors). `finetune.load` picks the parts copied (encoder down_tr*, decoder up_tr*,
output out_tr, head clc_out); an output or head whose shape differs (another class count)
keeps its fresh initialisation, any other mismatch is an error naming the key. What was
loaded is written to `<run>/pretrained.json`. `freeze_encoder` trains everything but the
encoder (for classification: the head's conv, BN and dense train on frozen features).

Defaults follow docs/REFERENCE.md section 5 (Fine-tuning): Adam 1e-3, early stopping with patience 15
evaluations, 64x64x32 inputs.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from transvw_jax import checkpointing, evaluation, export, parallel, predict, train
from transvw_jax.data import labeled, loader, patches, store, volumes
from transvw_jax.errors import CheckpointError, ConfigError
from transvw_jax.fileio import atomic_write_json, atomic_write_text
from transvw_jax.models import build_model

TASKS = ("segmentation", "classification")
INITS = ("scratch", "pretrained")
PARTS = {"encoder": "down_tr", "decoder": "up_tr", "output": "out_tr", "head": "clc_out"}
REINIT_ON_MISMATCH = ("output", "head")  # parts whose shape follows the class count
NORMALIZATIONS = ("ct", "percentile")  # cached patches are stored in [0, 1] (uint16)
# A resumed run must have been started with the same values (else its data differs).
RESUME_SETTINGS = (
    "task",
    "patch_shape",
    "foreground_fraction",
    "patches_per_case",
    "normalization",
    "orientation",
    "init",
    "load",
    "freeze_encoder",
)
DICE_SMOOTH = 1e-5


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "segmentation"  # segmentation | classification
    # Labeled data (segmentation): an nnU-Net v2 raw dataset, or two folders + num_classes.
    c.dataset_dir = ""  # "" = <workdir>/labeled
    c.images_dir = ""
    c.labels_dir = ""
    c.num_classes = 0  # classes incl. background; 0 = from dataset.json (classification: from the CSV)
    c.candidates_csv = ""  # classification: volume,x,y,z,label rows
    c.normalization = "ct"  # ct (HU window) | percentile | none
    # ras: volumes reoriented to RAS+; reference: as stored, transposed to (X, Y, Z), as the
    # original TransVW / Models Genesis code reads LUNA16 (data/volumes.py)
    c.orientation = "ras"
    c.patch_shape = (64, 64, 32)
    c.foreground_fraction = 0.33  # nnU-Net's oversampling
    c.patches_per_case = 64  # training patches per case and epoch
    c.val_patches_per_case = 8
    c.val_fraction = 0.2  # cases (classification: volumes) held out, seeded by split_seed
    c.split_seed = 0
    c.label_fraction = 1.0  # of the training cases used (nested: 10% within 25% for one seed)
    c.flip_prob = 0.5  # per axis, same flips on image and label
    c.init = "pretrained"  # scratch | pretrained
    c.pretrained = ""  # pretraining workdir, or .pt / .pth / .safetensors; "" = this workdir
    c.load = ("encoder", "decoder", "output")  # parts copied; classification: encoder (+ head)
    c.freeze_encoder = False
    c.run_dir = "finetune"  # under the workdir
    c.inference = ml_collections.ConfigDict()
    c.inference.overlap = 0.5
    c.inference.batch_size = 4
    c.inference.blending = "gaussian"
    c.train = train.default_config()
    c.train.objective = "finetune"
    c.train.learning_rate = 1e-3
    c.train.schedule = "constant"
    c.train.batch_size = 8
    c.train.steps = 2000
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    c.train.patience = 15
    c.train.sample_every = 0
    return c


def validate_config(config: ml_collections.ConfigDict) -> None:
    f = config.get("finetune")
    if f is None:
        raise ConfigError("stage finetune needs a config.finetune section")
    if f.task not in TASKS:
        raise ConfigError(f"finetune.task: {f.task!r} is not one of {', '.join(TASKS)}")
    if f.init not in INITS:
        raise ConfigError(f"finetune.init: {f.init!r} is not one of {', '.join(INITS)}")
    for part in f.load:
        if part not in PARTS:
            raise ConfigError(f"finetune.load: unknown part {part!r}; known: {', '.join(PARTS)}")
    if f.task == "classification" and set(f.load) & {"decoder", "output"}:
        raise ConfigError(
            "finetune.load: the classification model has no decoder or output; "
            "use ('encoder',) or ('encoder', 'head')"
        )
    if f.task == "segmentation" and "head" in f.load:
        raise ConfigError("finetune.load: the segmentation model has no visual-word head")
    if f.task == "classification" and not f.candidates_csv:
        raise ConfigError("finetune.candidates_csv is empty: classification needs volume,x,y,z,label rows")
    if f.freeze_encoder and (f.init != "pretrained" or "encoder" not in f.load):
        raise ConfigError(
            "finetune.freeze_encoder=True needs init='pretrained' with 'encoder' in finetune.load "
            "(else it freezes a random encoder)"
        )
    if f.normalization not in NORMALIZATIONS:
        raise ConfigError(
            f"finetune.normalization: {f.normalization!r} is not one of {', '.join(NORMALIZATIONS)} "
            "(fine-tuning patches are cached in [0, 1])"
        )
    if f.orientation not in volumes.ORIENTATIONS:
        raise ConfigError(
            f"finetune.orientation: {f.orientation!r} is not one of {', '.join(volumes.ORIENTATIONS)}"
        )
    if not 0.0 < f.label_fraction <= 1.0:
        raise ConfigError(f"finetune.label_fraction must be in (0, 1], got {f.label_fraction}")
    if not 0.0 < f.val_fraction < 1.0:
        raise ConfigError(f"finetune.val_fraction must be in (0, 1), got {f.val_fraction}")
    if not 0.0 <= f.foreground_fraction <= 1.0:
        raise ConfigError(f"finetune.foreground_fraction must be in [0, 1], got {f.foreground_fraction}")
    shape = tuple(f.patch_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s <= 0 or s % 8 for s in shape):
        raise ConfigError(f"finetune.patch_shape must be 3 positive sizes divisible by 8, got {shape}")
    train.validate_loop_config(f.train, "finetune.train")


# --------------------------------------------------------------------------- data


def subset_names(names: Sequence[str], fraction: float, seed: int) -> list[str]:
    """round(fraction * n) names (at least one) drawn with `seed`; for one seed a smaller
    fraction's subset lies inside a larger one's (label-efficiency curves compare like with like)."""
    names = sorted(names)
    n = max(1, int(round(fraction * len(names))))
    order = np.random.default_rng([seed, 5]).permutation(len(names))
    return sorted(names[i] for i in order[:n])


def _labeled_set(f: ml_collections.ConfigDict, workdir: Path) -> labeled.LabeledSet:
    if f.images_dir or f.labels_dir:
        if not (f.images_dir and f.labels_dir and f.num_classes):
            raise ConfigError("finetune.images_dir, finetune.labels_dir and finetune.num_classes go together")
        return labeled.read_folders(f.images_dir, f.labels_dir, f.num_classes)
    ds = labeled.read_nnunet(f.dataset_dir or workdir / "labeled")
    if f.num_classes and f.num_classes != ds.num_classes:
        raise ConfigError(
            f"finetune.num_classes={f.num_classes} but {f.dataset_dir or workdir / 'labeled'}"
            f"/dataset.json lists {ds.num_classes} classes"
        )
    return ds


class Data:
    """The split, the sources and what the final evaluation needs, for one run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path, seed: int):
        f = config.finetune
        cache = workdir / "finetune_cache"
        self.task = f.task
        if f.task == "segmentation":
            ds = _labeled_set(f, workdir)
            self.num_classes, self.class_names = ds.num_classes, ds.class_names
            split = labeled.split_cases([c.name for c in ds.cases], f.val_fraction, f.split_seed)
            _check_split(split, f.val_fraction, "cases")
            used = subset_names(split["train"], f.label_fraction, seed)
            by_name = {c.name: c for c in ds.cases}
            self.val_cases = [by_name[n] for n in split["validation"]]
            cached = patches.cache_cases(
                [by_name[n] for n in used] + self.val_cases, ds.num_classes, cache, f.normalization,
                f.orientation,
            )
            train_cached, val_cached = cached[: len(used)], cached[len(used) :]
            # Every training sample is a fresh crop: the source is as long as the run needs
            # (a pure function of (seed, index), so shuffling and resuming stay exact).
            length = max(len(used) * f.patches_per_case, f.train.steps * f.train.batch_size)
            self.train = patches.PatchSource(train_cached, f.patch_shape, length, f.foreground_fraction, seed)
            self.validation = patches.PatchSource(
                val_cached,
                f.patch_shape,
                len(val_cached) * f.val_patches_per_case,
                f.foreground_fraction,
                seed=1_000_003,
            )
        else:
            candidates = labeled.read_candidates(f.candidates_csv)
            labels = sorted({c.label for c in candidates})
            self.num_classes = max(labels) + 1 if not f.num_classes else f.num_classes
            if labels[0] < 0 or labels[-1] >= self.num_classes:
                raise ConfigError(
                    f"{f.candidates_csv}: labels {labels} outside the {self.num_classes} classes "
                    "of finetune.num_classes"
                )
            if self.num_classes < 2 or len(labels) < 2:
                raise ConfigError(
                    f"{f.candidates_csv}: every candidate has label {labels[0]}; "
                    "classification needs two classes or more"
                )
            self.class_names = {i: str(i) for i in range(self.num_classes)}
            source = patches.CandidateSource(candidates, f.patch_shape, cache, f.normalization, f.orientation)
            volume_of = [str(c.volume) for c in candidates]
            split = labeled.split_cases(sorted(set(volume_of)), f.val_fraction, f.split_seed)
            _check_split(split, f.val_fraction, "volumes")
            used = subset_names(split["train"], f.label_fraction, seed)
            keep, val = set(used), set(split["validation"])
            self.train = patches.Subset(source, [i for i, v in enumerate(volume_of) if v in keep])
            self.validation = patches.Subset(source, [i for i, v in enumerate(volume_of) if v in val])
            self.val_cases = []
        settings = json.loads(json.dumps({k: f[k] for k in RESUME_SETTINGS}))  # as split.json holds them
        self.split = {
            "train": used,
            "train_pool": len(split["train"]),
            "validation": split["validation"],
            "settings": settings,
        }

    def save_split(self, run_dir: Path) -> None:
        """Write `<run>/split.json` (process 0); a resumed run must find the same split and
        data settings. Every process checks (the workdir is shared), so all fail together."""
        path = run_dir / "split.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            if {k: v for k, v in stored.items() if k != "settings"} != {
                k: v for k, v in self.split.items() if k != "settings"
            }:
                raise ConfigError(
                    f"{path}: this run was started on another split (other data, val_fraction, "
                    "split_seed, label_fraction or seed); use a new workdir"
                )
            changed = [k for k, v in self.split["settings"].items() if stored.get("settings", {}).get(k) != v]
            if changed:
                raise ConfigError(
                    f"{path}: this run was started with other finetune.{changed[0]}; use a new workdir"
                )
            return
        if jax.process_index() == 0:
            atomic_write_json(path, self.split, indent=1)


def _check_split(split: dict, val_fraction: float, what: str) -> None:
    if not split["validation"] or not split["train"]:
        n = len(split["train"]) + len(split["validation"])
        raise ConfigError(
            f"finetune.val_fraction={val_fraction} leaves {len(split['train'])} training and "
            f"{len(split['validation'])} validation {what} of {n}: both need at least one"
        )


# --------------------------------------------------------------------------- model and weights


def make_model(config: ml_collections.ConfigDict, num_classes: int):
    """The downstream network: UNet3D (logits per class) or EncoderClassifier (one logit
    for two classes)."""
    m = dict(config.model)
    if config.finetune.task == "segmentation":
        m.update(name="unet3d", out_channels=num_classes, activation="none")
    else:
        m.update(name="encoder_classifier", num_classes=1 if num_classes == 2 else num_classes)
    return build_model(m)


def read_pretrained(path: str | Path) -> tuple[str, dict]:
    """(description, numpy variables) from a pretraining workdir or an exported/released file."""
    path = Path(path)
    if path.is_file():
        return str(path), export.load(path)
    if path.is_dir():
        found = checkpointing.read_stored_variables(path)
        if found is None:
            raise CheckpointError(
                f"{path}: no best/ or checkpoints/ with a complete step: pretrain first "
                f"(python -m transvw_jax.main --config configs/demo.py --workdir {path})"
            )
        where, _, variables = found
        return str(where), variables
    raise CheckpointError(f"{path}: no such pretraining workdir or weights file")


def _part(path: tuple[str, ...]) -> str | None:
    for part, prefix in PARTS.items():
        if path[0].startswith(prefix):
            return part
    return None


def transfer(
    fresh: dict, pretrained: dict, parts: Sequence[str], source: str = "pretrained"
) -> tuple[dict, dict]:
    """Copy the entries of `parts` from `pretrained` into `fresh` (both numpy trees).

    Returns:
      (variables, report): report lists "loaded", "reinitialised" (output/head of another
      shape) and "fresh" (not selected) keys as "collection/module/.../leaf".

    Raises:
      CheckpointError naming the key: a selected entry missing from `pretrained`, or of
      another shape outside the output/head (another width or architecture).
    """
    report: dict[str, list[str]] = {"loaded": [], "reinitialised": [], "fresh": []}
    out = {}
    for collection in sorted(fresh, key=lambda c: c != "params"):  # parameters first in messages
        tree = fresh[collection]
        source_flat = flatten_dict(dict(pretrained.get(collection, {})))
        merged = {}
        for path, value in flatten_dict(dict(tree)).items():
            key = "/".join((collection,) + path)
            part = _part(path)
            if part not in parts:
                merged[path] = value
                report["fresh"].append(key)
                continue
            if path not in source_flat:
                raise CheckpointError(
                    f"{source}: has no {key} to load the {part} from (finetune.load={tuple(parts)})"
                )
            stored = np.asarray(source_flat[path])
            if stored.shape != np.shape(value):
                if part in REINIT_ON_MISMATCH:
                    merged[path] = value
                    report["reinitialised"].append(key)
                    continue
                raise CheckpointError(
                    f"{source}: {key} has shape {stored.shape}, the fine-tuning model needs "
                    f"{np.shape(value)} (another model.width or architecture?)"
                )
            merged[path] = stored.astype(np.asarray(value).dtype)
            report["loaded"].append(key)
        out[collection] = unflatten_dict(merged)
    return out, report


def make_optimizer(t: ml_collections.ConfigDict, freeze_encoder: bool) -> optax.GradientTransformation:
    tx = train.make_optimizer(t)
    if not freeze_encoder:
        return tx

    def labels(params):
        return {
            k: jax.tree.map(lambda _, k=k: "frozen" if k.startswith(PARTS["encoder"]) else "train", v)
            for k, v in params.items()
        }

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------- steps


def _flip(keys: jax.Array, prob: float, *arrays: jax.Array) -> list[jax.Array]:
    """The same random flips (each axis with `prob`) on every array, per sample."""

    def one(key, *xs):
        f = jax.random.bernoulli(key, prob, (3,))
        out = list(xs)
        for axis in range(3):
            out = [jnp.where(f[axis], jnp.flip(x, axis), x) for x in out]
        return tuple(out)

    return list(jax.vmap(one)(keys, *arrays))


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


def build_steps(
    model, tx, config: ml_collections.ConfigDict, num_classes: int, mesh, var_sh, state_sh
) -> train.Steps:
    f = config.finetune
    segmentation = f.task == "segmentation"
    batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    frozen = f.freeze_encoder

    def keep_frozen_stats(old, new):
        if not frozen:
            return new
        return {k: (old[k] if k.startswith(PARTS["encoder"]) else v) for k, v in new.items()}

    def train_step(variables, state, batch):
        x = store.decode_cubes(batch["cube"])
        labels = batch["label"].astype(jnp.int32)
        keys = train.cube_keys(state["rng"], state["step"], x.shape[0])
        if f.flip_prob > 0:
            x, labels = (
                _flip(keys, f.flip_prob, x, labels)
                if segmentation
                else (_flip(keys, f.flip_prob, x)[0], labels)
            )
        x = jax.lax.with_sharding_constraint(x, batch_sh)

        def loss_fn(params):
            if frozen:  # no gradient for the encoder: nothing to compute, and grad_norm counts what trains
                params = {
                    k: jax.lax.stop_gradient(v) if k.startswith(PARTS["encoder"]) else v
                    for k, v in params.items()
                }
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            logits, upd = model.apply(v, x[..., None], train=True, mutable=["batch_stats"])
            if segmentation:
                ce, inter, total = segmentation_terms(logits, labels, num_classes)
                dice = soft_dice(inter.sum(0), total.sum(0))
                loss = ce.mean() + (1.0 - dice)
                return loss, (upd["batch_stats"], {"ce": ce.mean(), "dice": dice})
            loss, _ = classification_terms(logits, labels)
            return loss.mean(), (upd["batch_stats"], {})

        (loss, (stats, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        new_state = {"opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        out = {"loss": loss, **extra, "grad_norm": optax.tree.norm(grads)}
        return (
            {"params": params, "batch_stats": keep_frozen_stats(variables["batch_stats"], stats)},
            new_state,
            out,
        )

    def eval_step(variables, batch, rng):
        x = store.decode_cubes(batch["cube"])
        labels = batch["label"].astype(jnp.int32)
        mask = batch["mask"].astype(jnp.float32)
        # The padding rows (mask False) stay out of BatchNorm's batch statistics (bn="reference"):
        # no real cube's result depends on the batch size or the device count.
        logits = model.apply(variables, x[..., None], train=False, mask=batch["mask"])
        if segmentation:
            ce, inter, total = segmentation_terms(logits, labels, num_classes)
            pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes, dtype=jnp.float32)
            truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
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
        loss, scores = classification_terms(logits, labels)
        return {"loss": loss, "scores": scores, "labels": labels, "mask": batch["mask"]}

    train_jit = jax.jit(
        train_step,
        donate_argnums=(0, 1),
        in_shardings=(var_sh, state_sh, batch_sh),
        out_shardings=(var_sh, state_sh, {k: rep for k in metric_names(f.task)}),
    )
    eval_jit = jax.jit(eval_step, in_shardings=(var_sh, batch_sh, rep), out_shardings=rep)
    return train.Steps(train=train_jit, eval=eval_jit, samples=None)


def metric_names(task: str) -> tuple[str, ...]:
    return ("loss", "ce", "dice", "grad_norm") if task == "segmentation" else ("loss", "grad_norm")


# --------------------------------------------------------------------------- evaluation


def evaluate(run: train.Run, variables, source, config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """One pass over `source`: segmentation loss and Dice per class on patches, or
    classification loss, accuracy and AUC (and the raw scores under "_scores")."""
    f = config.finetune
    ds = loader.eval_dataset(
        source, batch_size=parallel.local_batch_size(f.train.batch_size), num_threads=config.data.num_threads
    )
    sharding = parallel.batch_sharding(run.mesh)
    rng = jax.random.key_data(jax.random.key(0))
    if f.task == "segmentation":
        totals = None
        for batch in ds:
            sums = run.steps.eval(variables, parallel.global_batch(batch, sharding), rng)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        t = jax.device_get(totals)
        n = max(float(t["count"]), 1.0)
        ce = float(t["ce"]) / n
        dice_soft = float(soft_dice(jnp.asarray(t["soft_inter"]), jnp.asarray(t["soft_total"])))
        out = {"loss": ce + 1.0 - dice_soft, "ce": ce}
        for c in range(1, num_classes):
            denom = float(t["pred"][c] + t["truth"][c])
            out[f"dice_class{c}"] = 1.0 if denom == 0 else 2.0 * float(t["inter"][c]) / denom
        return out
    losses, scores, labels = [], [], []
    for batch in ds:
        o = jax.device_get(run.steps.eval(variables, parallel.global_batch(batch, sharding), rng))
        keep = np.asarray(o["mask"], bool)
        losses.append(np.asarray(o["loss"])[keep])
        scores.append(np.asarray(o["scores"])[keep])
        labels.append(np.asarray(o["labels"])[keep])
    loss, s, y = np.concatenate(losses), np.concatenate(scores), np.concatenate(labels)
    if s.ndim == 1:
        pred, auc = (s > 0.5).astype(np.int32), evaluation.roc_auc(s, y)
    else:
        pred = s.argmax(1)
        aucs = [evaluation.roc_auc(s[:, k], (y == k).astype(np.int32)) for k in range(s.shape[1])]
        auc = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    return {
        "loss": float(loss.mean()),
        "accuracy": float((pred == y).mean()),
        "auc": auc,
        "_scores": s.tolist(),
        "_labels": y.tolist(),
    }


def _host_metrics(ev: dict) -> dict[str, float]:
    return {k: v for k, v in ev.items() if not k.startswith("_")}


# --------------------------------------------------------------------------- a run


def build_run(config: ml_collections.ConfigDict, num_classes: int, mesh=None) -> train.Run:
    """The model, optimiser and compiled steps of a fine-tuning run (reusable across runs
    that differ only in data subset, initialisation and seed)."""
    f = config.finetune
    mesh = mesh or parallel.make_mesh(config.parallel.fsdp)
    model = make_model(config, num_classes)
    tx = make_optimizer(f.train, f.freeze_encoder)
    return train.place_run(
        model,
        tx,
        mesh,
        lambda var_sh, state_sh: build_steps(model, tx, config, num_classes, mesh, var_sh, state_sh),
    )


def finetune(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    run_dir: str | Path | None = None,
    make_run: Callable[[int], train.Run] | None = None,
) -> dict:
    """Fine-tune per `config.finetune` in `run_dir` (default `<workdir>/<finetune.run_dir>`),
    resuming from its latest checkpoint; evaluate the best weights; return the summary
    (also written to `<run>/finetune_summary.json`). `make_run(num_classes)` supplies the
    compiled model (default `build_run`; a grid of runs passes a cached one)."""
    validate_config(config)
    workdir = Path(workdir)
    f = config.finetune
    t = f.train
    run_dir = Path(run_dir) if run_dir else workdir / f.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    data = Data(config, workdir, t.seed)
    data.save_split(run_dir)
    if len(data.train) < t.batch_size:
        what = "training patches" if f.task == "segmentation" else "training candidates"
        raise ConfigError(
            f"finetune.train.batch_size={t.batch_size} is larger than the {len(data.train)} {what}"
        )
    if len(data.validation) == 0:
        raise ConfigError(
            "the validation split has no patches or candidates: raise finetune.val_fraction "
            "or finetune.val_patches_per_case"
        )
    if config.model.get("bn", "reference") == "reference":
        logging.warning(
            "finetune: model.bn='reference' normalises with batch statistics at evaluation too, "
            "so validation and inference figures depend on batch composition; "
            "model.bn='standard' (running statistics) is batch-independent"
        )
    run = (make_run or functools.partial(build_run, config))(data.num_classes)

    def init() -> tuple[dict, dict]:
        variables, state = run.init(t.seed)
        if f.init == "scratch":
            return variables, state
        source, pretrained = read_pretrained(f.pretrained or workdir)
        fresh = jax.device_get(variables)
        loaded, report = transfer(fresh, pretrained, f.load, source)
        logging.info(
            "finetune: loaded %d arrays (%s) from %s; re-initialised: %s",
            len(report["loaded"]),
            ", ".join(f.load),
            source,
            ", ".join(report["reinitialised"]) or "none",
        )
        if jax.process_index() == 0:
            atomic_write_json(run_dir / "pretrained.json", {"source": source, **report}, indent=1)
        shardings = jax.tree.map(lambda s: s.sharding, run.like_variables)
        return jax.device_put(loaded, shardings), state

    task = train.Task(
        name="finetune",
        config_section="finetune.train",
        run=run,
        train_source=data.train,
        init=init,
        evaluate=lambda v: _host_metrics(evaluate(run, v, data.validation, config, data.num_classes)),
        metric_names=metric_names(f.task),
    )
    summary = train.fit(task, t, config.data, run_dir)
    final = final_evaluation(config, run, data, run_dir)
    result = {
        "task": f.task,
        "init": f.init,
        "label_fraction": f.label_fraction,
        "seed": t.seed,
        "train_cases": len(data.split["train"]),
        "validation_cases": len(data.split["validation"]),
        "step": summary.step,
        "stopped_early": summary.stopped_early,
        "best_step": summary.best_step,
        "best_eval": summary.best_eval,
        "final": final,
    }
    if jax.process_index() == 0:
        atomic_write_json(run_dir / "finetune_summary.json", result, indent=1)
    return result


def final_evaluation(config: ml_collections.ConfigDict, run: train.Run, data: Data, run_dir: Path) -> dict:
    """Score the best checkpoint on the validation split: whole volumes for segmentation
    (report, masks and overlays in `<run>/eval/`), every candidate for classification."""
    f = config.finetune
    _, _, variables = checkpointing.read_stored_variables(run_dir)
    out_dir = run_dir / "eval"
    if f.task == "classification":
        shardings = jax.tree.map(lambda s: s.sharding, run.like_variables)
        ev = evaluate(run, jax.device_put(variables, shardings), data.validation, config, data.num_classes)
        report = {"summary": _host_metrics(ev), "scores": ev["_scores"], "labels": ev["_labels"]}
        if jax.process_index() == 0:
            atomic_write_json(out_dir / "report.json", report, indent=1)
        return report["summary"]
    final = {}
    if jax.process_index() == 0:  # host-side, per case: one process scores, the others wait
        model = run.model

        def predict_probs(v, x):
            return jax.nn.softmax(model.apply(v, x[..., None], train=False), axis=-1)

        report = predict.segment_cases(
            predict_probs,
            data.val_cases,
            data.num_classes,
            tuple(f.patch_shape),
            out_dir,
            overlap=f.inference.overlap,
            batch_size=f.inference.batch_size,
            normalization=f.normalization,
            blending=f.inference.blending,
            params=variables,
            orientation=f.orientation,
        )
        final = {k: v["mean"] for k, v in report["summary"].items() if not k.endswith("class0")}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"finetune final evaluation {run_dir}")
    return final


# --------------------------------------------------------------------------- label efficiency


EXPERIMENT_METRICS = {"segmentation": ("dice_class1", "iou_class1"), "classification": ("auc", "accuracy")}


def experiment_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.label_fractions = (0.1, 0.25, 1.0)
    c.inits = ("scratch", "pretrained")
    c.seeds = (0, 1)
    c.metric = ""  # "" = dice_class1 (segmentation) or auc (classification)
    return c


def validate_experiment(config: ml_collections.ConfigDict) -> None:
    """Check `config.experiment` before hours of runs: every grid point's config, the metric,
    and that pretrained weights exist when an init needs them."""
    e = config.get("experiment")
    if e is None:
        raise ConfigError("stage label_efficiency needs a config.experiment section")
    if not e.label_fractions or not e.inits or not e.seeds:
        raise ConfigError(
            "experiment.label_fractions, experiment.inits and experiment.seeds must be non-empty"
        )
    for init in e.inits:
        if init not in INITS:
            raise ConfigError(f"experiment.inits: {init!r} is not one of {', '.join(INITS)}")
    for fraction in e.label_fractions:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"experiment.label_fractions: {fraction} is not in (0, 1]")
    known = EXPERIMENT_METRICS[config.finetune.task]
    if e.metric and e.metric not in known and not e.metric.startswith(("dice_class", "iou_class")):
        raise ConfigError(f"experiment.metric: {e.metric!r} is not one of {', '.join(known)}")
    if (
        "pretrained" in e.inits
        and config.finetune.pretrained
        and not Path(config.finetune.pretrained).exists()
    ):
        raise CheckpointError(
            f"{config.finetune.pretrained}: no such pretraining workdir or weights file "
            "(finetune.pretrained; relative paths are from the current directory)"
        )


def label_efficiency(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Fine-tune for every (label fraction, init, seed) of `config.experiment`, each in
    `<workdir>/label_efficiency/<init>_f<fraction>_s<seed>` (finished runs are skipped, an
    interrupted one resumes), and write the table of mean +- sd over seeds to
    `<workdir>/label_efficiency.{json,md}`."""
    workdir = Path(workdir)
    validate_experiment(config)
    e = config.experiment
    metric = e.metric or ("dice_class1" if config.finetune.task == "segmentation" else "auc")
    results: dict[str, dict] = {}
    # Every grid point has one architecture and optimiser: compile once (by class count).
    make_run = functools.cache(functools.partial(build_run, config))
    total = len(e.label_fractions) * len(e.inits) * len(e.seeds)
    done = 0
    for fraction in e.label_fractions:
        for init in e.inits:
            for seed in e.seeds:
                done += 1
                name = f"{init}_f{fraction:g}_s{seed}"
                run_dir = workdir / "label_efficiency" / name
                summary_path = run_dir / "finetune_summary.json"
                if summary_path.is_file():
                    results[name] = json.loads(summary_path.read_text())
                    logging.info("label efficiency %d/%d: %s already done", done, total, name)
                    continue
                logging.info("label efficiency %d/%d: %s", done, total, name)
                c = copy.deepcopy(config)
                with c.unlocked():
                    c.finetune.label_fraction = float(fraction)
                    c.finetune.init = init
                    c.finetune.train.seed = int(seed)
                results[name] = finetune(c, workdir, run_dir, make_run=make_run)
    table = _table(results, e, metric)
    if jax.process_index() == 0:
        atomic_write_json(
            workdir / "label_efficiency.json", {"metric": metric, "rows": table, "runs": results}, indent=1
        )
        atomic_write_text(workdir / "label_efficiency.md", format_table(table, metric))
        logging.info("label efficiency (%s, validation):\n%s", metric, format_table(table, metric))
    return {"metric": metric, "rows": table}


def _table(results: dict, e: ml_collections.ConfigDict, metric: str) -> list[dict]:
    rows = []
    for fraction in e.label_fractions:
        for init in e.inits:
            values = [
                results[f"{init}_f{fraction:g}_s{s}"]["final"].get(metric, float("nan")) for s in e.seeds
            ]
            mean, sd = evaluation.mean_sd(values)
            train_cases = results[f"{init}_f{fraction:g}_s{e.seeds[0]}"]["train_cases"]
            rows.append(
                {
                    "label_fraction": fraction,
                    "train_cases": train_cases,
                    "init": init,
                    "mean": mean,
                    "sd": sd,
                    "values": values,
                }
            )
    return rows


def format_table(rows: list[dict], metric: str) -> str:
    lines = [f"| labels | training cases | init | {metric} mean +- sd | per seed |", "|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{v:.3f}" for v in r["values"])
        lines.append(
            f"| {r['label_fraction']:.0%} | {r['train_cases']} | {r['init']} | "
            f"{r['mean']:.3f} +- {r['sd']:.3f} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"
