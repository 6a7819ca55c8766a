"""Prediction with fine-tuned weights: masks, probabilities, overlays and reports.

Two callers share one inference path:
- fine-tuning's final evaluation (`finetune.run.final_evaluation`): the validation cases,
  every one with a label;
- the `predict` stage (`run_predict`): scans the network has never seen, labels optional,
  with the weights of a fine-tuning run or an exported file.

Segmentation (`segment_cases`): sliding-window inference (`inference.sliding_window`) over
each whole scan read as fine-tuning reads its cases (`finetune.normalization`,
`finetune.orientation`, native spacing: `labeled.load_case` and `patches.cache_cases`
never resample, so neither does prediction, and the mask needs no resampling back). The
argmax mask is written as `<out>/masks/<case>.nii.gz` in the INPUT file's own voxel order
with its affine (`stored_order` undoes the reorientation to RAS+), so it has the scan's
shape and overlays it in any viewer; optionally the class probabilities as float16
`<out>/probabilities/<case>.npz`; a PNG of the axial slice with the most foreground
(`<out>/overlays/`: image grey, ground truth green, prediction red, overlap yellow). Cases
with a label are scored (Dice / IoU per class, `<out>/report.json` with mean +- sd).

Classification (`classify_candidates`): the cubes around candidate centres, cut as
fine-tuning cuts them (`patches.CandidateSource`), through the EncoderClassifier; the
probabilities go to `<out>/probabilities.csv`, and with labels AUC and accuracy to
`<out>/report.json` (the format of fine-tuning's report).

Every file is written atomically. A scan or label that cannot be read stops the run with
one line naming it, rather than being skipped: a report over a silently smaller test set
would mislead.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import nibabel.orientations as nio
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image

from transvw_jax import evaluation, export, inference, losses
from transvw_jax.data import labeled, patches, store, volumes
from transvw_jax.errors import CheckpointError, ConfigError, DataError
from transvw_jax.fileio import atomic_write, atomic_write_json, atomic_write_text
from transvw_jax.models import abstract_variables
from transvw_jax.progress import Progress
from transvw_jax.samples import save_png

# nnU-Net raw image names: <case>_<4-digit channel><file ending>.
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# The output layer of each task's network, whose last axis counts the classes.
OUTPUT_LAYERS = {"segmentation": ("out_tr", "final_conv", "kernel"),
                 "classification": ("clc_out", "fc1", "kernel")}
# What the weights were fine-tuned with (<run>/split.json) and prediction must repeat.
_DATA_SETTINGS = ("task", "normalization", "orientation", "patch_shape")


# --------------------------------------------------------------------------- masks and overlays


def write_mask(path: str | os.PathLike, mask: np.ndarray, affine: np.ndarray | None) -> Path:
    """Save an integer mask (X, Y, Z) as uint8 NIfTI with `affine`, atomically."""
    image = nib.Nifti1Image(np.asarray(mask, np.uint8), np.eye(4) if affine is None else affine)
    return atomic_write(path, lambda tmp: nib.save(image, str(tmp)), suffix=".tmp.nii.gz")


def write_probabilities(path: str | os.PathLike, probabilities: np.ndarray,
                        affine: np.ndarray | None) -> Path:
    """Save (X, Y, Z, C) class probabilities as float16 `probabilities` in a compressed .npz,
    with the `affine` of their voxels (identity when the scan has none), atomically.

    float16 (3 significant digits) halves the size of float32, which matters at one value per
    voxel and class; NIfTI has no float16 type, hence .npz.
    """
    data = {"probabilities": np.asarray(probabilities, np.float16),
            "affine": np.eye(4) if affine is None else np.asarray(affine, np.float64)}
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **data), suffix=".tmp.npz")


def overlay(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray,
            scale: int = 3) -> Image.Image:
    """RGB axial slice with the most foreground: grey image, truth green, prediction red,
    both yellow. Without `truth` only the prediction is drawn."""
    truth = np.zeros_like(prediction) if truth is None else truth
    z = int(np.argmax(((truth > 0) | (prediction > 0)).sum(axis=(0, 1))))
    grey = (np.clip(image[:, :, z], 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([grey, grey, grey], axis=-1)
    t, p = truth[:, :, z] > 0, prediction[:, :, z] > 0
    rgb[t & ~p] = (0, 200, 0)
    rgb[p & ~t] = (220, 0, 0)
    rgb[p & t] = (230, 230, 0)
    img = Image.fromarray(rgb)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def stored_order(array: np.ndarray, path: str | os.PathLike,
                 orientation: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`array` (the first 3 axes as `volumes.read_raw(path, orientation)` returns the scan)
    in the file's own voxel order, and the file's affine (None for .npy).

    "ras" reorients with `io_orientation` of the stored affine (nibabel's
    `as_closest_canonical`, and `volumes` for .mhd); applying the inverse transform gives
    back the stored order, so a mask saved with the file's affine has the scan's shape and
    lands on its voxels. Trailing axes (classes) are carried along.
    """
    path = Path(path)
    suffix = volumes.volume_suffix(path)
    if suffix == ".npy":  # no geometry: read as stored whatever the orientation
        return array, None
    if suffix in (".nii", ".nii.gz"):
        try:
            stored_affine = np.array(nib.load(path).affine, np.float64)  # the header only
        except Exception as e:  # nibabel raises many types for a corrupt header
            raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    else:
        stored_affine = volumes.read_raw(path, "reference").affine
    if orientation == "reference":
        return array, stored_affine
    to_ras = nio.io_orientation(stored_affine)
    back = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), to_ras)
    return nio.apply_orientation(array, back), stored_affine


# --------------------------------------------------------------------------- segmentation


def segment_cases(predict: Callable[..., jax.Array], cases: Sequence[labeled.Case], num_classes: int,
                  window: Sequence[int], out: str | os.PathLike, *, overlap: float = 0.5, batch_size: int = 4,
                  normalization: str = "ct", blending: str = "gaussian", params: Any = None,
                  orientation: str = "ras", save_probabilities: bool = False,
                  what: str = "segment") -> dict:
    """Predict, save and draw every case, and score those with a label; return the report.

    `predict`, `overlap`, `batch_size`, `blending`, `params`: as in `inference.sliding_window`
    (`predict` returns class probabilities). `orientation`: how the cases are read
    (volumes.ORIENTATIONS); masks and probabilities are saved in the file's voxel order with
    its affine either way (`stored_order`). A case whose `label` is None is predicted but
    not scored. `what` names the progress lines.

    Returns:
      {"cases": {name: {"dice": [per class], "iou": [...]}}, "summary": {"dice_class<c>":
      {"mean", "sd"}, ...}} over the labeled cases, also written to `<out>/report.json`
      when there is at least one.
    """
    out = Path(out)
    per_case = {}
    progress = Progress(what, len(cases), "cases")
    for case in cases:
        if case.label is None:
            volume = volumes.load_volume(case.image, normalization=normalization, orientation=orientation)
            image, truth = volume.array, None
        else:
            image, truth = labeled.load_case(case, num_classes, normalization, orientation)
        probs = inference.sliding_window(predict, image, window, overlap=overlap, batch_size=batch_size,
                                         blending=blending, params=params)
        mask = np.argmax(probs, axis=-1) if probs.shape[-1] > 1 else (probs[..., 0] > 0.5).astype(np.int32)
        stored_mask, affine = stored_order(mask, case.image, orientation)
        write_mask(out / "masks" / f"{case.name}.nii.gz", stored_mask, affine)
        if save_probabilities:
            write_probabilities(out / "probabilities" / f"{case.name}.npz",
                                stored_order(probs, case.image, orientation)[0], affine)
        if truth is not None:
            scores = evaluation.dice_iou(mask, truth, num_classes)
            per_case[case.name] = {k: v.tolist() for k, v in scores.items()}
        save_png(overlay(image, truth, mask), out / "overlays" / f"{case.name}.png")
        progress.update()
    summary = {}
    for metric in ("dice", "iou"):
        for c in range(num_classes):
            mean, sd = evaluation.mean_sd([v[metric][c] for v in per_case.values()])
            summary[f"{metric}_class{c}"] = {"mean": mean, "sd": sd}
    report = {"cases": per_case, "summary": summary if per_case else {}}
    if per_case:
        atomic_write_json(out / "report.json", report, indent=1)
    return report


def softmax_predictor(model) -> Callable[[Any, jax.Array], jax.Array]:
    """(variables, (B, X, Y, Z) cubes) -> (B, X, Y, Z, C) class probabilities of a
    fine-tuned UNet3D (which outputs logits), for `segment_cases`."""

    def predict_probs(variables, x):
        return jax.nn.softmax(model.apply(variables, x[..., None], train=False), axis=-1)

    return predict_probs


def find_scans(input_path: str | os.PathLike,
               labels_dir: str | os.PathLike | None = None) -> list[labeled.Case]:
    """The scans to segment: one volume file, or the volumes of a folder, with their labels.

    The files are named as in an nnU-Net raw images folder (`imagesTs/case_0000.nii.gz`: the
    case is `case`, only channel 0000 is used, as in fine-tuning) when their folder is named
    images* or its parent holds a dataset.json, and every file ends in a 4-digit channel
    (so a plain folder of `patient_0001.nii.gz` files keeps its names); otherwise
    every volume is a scan named by its file name without the suffix. With `labels_dir`,
    each case's label is `<labels_dir>/<case><suffix>` (the image's suffix first), as
    nnU-Net's labelsTs and fine-tuning's plain label folders name them; a missing label
    raises DataError naming it.
    """
    path = Path(input_path)
    files = [path] if path.is_file() else volumes.list_volume_files(path)
    if not files:
        hint = f"; did you mean {path / 'imagesTs'}?" if (path / "imagesTs").is_dir() else ""
        raise DataError(f"{path}: no volumes (.nii, .nii.gz, .npy, .mhd){hint}")
    folder = files[0].parent
    stems = [f.name[: -len(volumes.volume_suffix(f) or "")] for f in files]
    nnunet = (folder.name.startswith("images") or (folder.parent / "dataset.json").is_file()) and all(
        _CHANNEL.match(s) for s in stems)
    cases, seen = [], {}
    for f in files:
        suffix = volumes.volume_suffix(f)
        if suffix is None:
            raise DataError(f"{f}: unknown volume format (expected one of {', '.join(volumes.SUFFIXES)})")
        name = f.name[: -len(suffix)]
        if nnunet:
            found = _CHANNEL.match(name)
            if found["channel"] != "0000":  # fine-tuning reads the first channel only
                continue
            name = found["case"]
        if name in seen:
            raise DataError(f"{f}: case {name!r} also comes from {seen[name]}")
        seen[name] = f
        label = None
        if labels_dir:
            tried = [Path(labels_dir) / f"{name}{s}" for s in (suffix, *volumes.SUFFIXES) if s]
            label = next((t for t in tried if t.is_file()), None)
            if label is None:
                raise DataError(f"{f}: case {name!r} has no label {tried[0]} (predict.labels)")
        cases.append(labeled.Case(name, f, label))
    if not cases:
        raise DataError(f"{path}: no channel-0000 images (<case>_0000{volumes.volume_suffix(files[0])})")
    return cases


# --------------------------------------------------------------------------- weights


@dataclasses.dataclass(frozen=True)
class Weights:
    """Fine-tuned variables and where they came from."""

    where: str  # the checkpoint directory or file read
    step: int | None  # the checkpoint step (None for a weights file)
    variables: dict  # {"params", "batch_stats"}, host arrays
    run_dir: Path | None  # the fine-tuning run directory, when read from one


def load_weights(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Weights:
    """The weights `predict.weights` names: a fine-tuning run directory (its best/
    checkpoint, else its latest) or a .pt / .pth / .safetensors / .h5 file; by default the
    fine-tuning run of the workdir, `<workdir>/<finetune.run_dir>`."""
    p, f = config.predict, config.finetune
    source = Path(p.weights) if p.weights else Path(workdir) / f.run_dir
    stored = export.read_weights(source) if source.exists() else None
    if stored is None:
        how = (f"fine-tune first (--config.stages=\"('finetune',)\" with --workdir {workdir}) "
               "or name a run directory or weights file in predict.weights")
        raise CheckpointError(f"{source}: no fine-tuned weights (no best/ or checkpoints/ step); {how}")
    where, step, variables = stored
    return Weights(where, step, variables, None if step is None else source)


def num_classes_of(variables: Mapping[str, Any], task: str, where: str) -> int:
    """The class count the weights predict, read from the output layer's shape.

    The output layer is what the network actually computes, present in every checkpoint
    (also of an interrupted run, which has no finetune_summary.json yet) and in exported
    files (which carry no run files at all); split.json does not record the count.
    Classification with one logit is binary: 2 classes.
    """
    path = OUTPUT_LAYERS[task]
    node: Any = variables.get("params", {})
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            other = next((t for t, p in OUTPUT_LAYERS.items() if t != task and _has(variables, p)), None)
            hint = f"; they are {other} weights" if other else ""
            raise CheckpointError(f"{where}: no params/{'/'.join(path)}: not the network of "
                                  f"finetune.task={task!r}{hint}")
        node = node[key]
    outputs = int(np.shape(node)[-1])
    if task == "segmentation" and outputs < 2:  # fine-tuning always adds the background class
        raise CheckpointError(f"{where}: the output layer has {outputs} channel: pretraining (restoration) "
                              "weights, not fine-tuned segmentation weights; fine-tune first")
    return 2 if task == "classification" and outputs == 1 else outputs


def _has(variables: Mapping[str, Any], path: Sequence[str]) -> bool:
    node: Any = variables.get("params", {})
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def fit_to_model(variables: Mapping[str, Any], model, where: str) -> dict:
    """The variables `model` needs, checked against its shapes; one line naming the first
    array that is missing or of another shape (usually another model.width).

    Arrays the model does not have (a pretraining head left in an export) are dropped.
    """
    like = {c: flatten_dict(dict(v)) for c, v in abstract_variables(model).items()}
    got = {c: flatten_dict(dict(variables.get(c, {}))) for c in like}
    out = {}
    for collection in sorted(like, key=lambda c: c != "params"):  # params first: the clearer message
        shapes, arrays = like[collection], {}
        for path, ref in shapes.items():
            key = "/".join((collection, *path))
            if path not in got[collection]:
                raise CheckpointError(f"{where}: no {key}, which the model of this config has "
                                      "(other model.name or a model of another task?)")
            value = np.asarray(got[collection][path])
            if tuple(value.shape) != tuple(ref.shape):
                raise CheckpointError(f"{where}: {key} has shape {tuple(value.shape)}, the model of this "
                                      f"config {tuple(ref.shape)} (another model.width?)")
            arrays[path] = value
        out[collection] = unflatten_dict(arrays)
    return out


def _check_run_settings(run_dir: Path | None, f: ml_collections.ConfigDict) -> None:
    """The data settings the run was fine-tuned with (its split.json) must be this config's:
    other normalisation, orientation or patch size give confident nonsense, not an error."""
    if run_dir is None or not (run_dir / "split.json").is_file():
        return
    path = run_dir / "split.json"
    try:
        recorded = json.loads(path.read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    current = json.loads(json.dumps({k: f[k] for k in _DATA_SETTINGS}))  # tuples as split.json holds them
    for key in _DATA_SETTINGS:
        if key in recorded and recorded[key] != current[key]:
            raise ConfigError(f"{path}: the weights were fine-tuned with finetune.{key}={recorded[key]!r}, "
                              f"this config has {current[key]!r}; predict with the fine-tuning config")


# --------------------------------------------------------------------------- classification


def classify_candidates(model, variables: Mapping[str, Any], candidates: Sequence[labeled.Candidate],
                        num_classes: int, patch: Sequence[int], out: str | os.PathLike,
                        cache_dir: str | os.PathLike, *, batch_size: int = 8, normalization: str = "ct",
                        orientation: str = "ras", base: str | os.PathLike | None = None,
                        where: str = "candidates") -> dict:
    """Probabilities of every candidate cube; `<out>/probabilities.csv`, and with labels
    `<out>/report.json` (loss, accuracy, AUC; scores and labels) as fine-tuning reports them.

    Cubes are cut and cached by `patches.CandidateSource` in `cache_dir`, exactly as for
    fine-tuning. Batches of `batch_size`, the last padded with masked rows, so that with
    model.bn="reference" (batch statistics) padding never enters a real candidate's
    statistics. Volume paths in the CSV are written relative to `base` when under it.
    Candidates either all have a label or none; `where` (the CSV) names them in errors.

    Returns:
      {"probabilities": (N,) P(class 1) for two classes or (N, K), "report": dict | None}.
    """
    from transvw_jax.tasks import classification

    labels = [c.label for c in candidates]
    labeled_rows = [v is not None for v in labels]
    if any(labeled_rows) and not all(labeled_rows):
        missing = labeled_rows.index(False)
        raise DataError(f"{where}: candidate {missing + 1} ({candidates[missing].volume}) has no label while "
                        "others have one: label every row or none")
    has_labels = all(labeled_rows)
    if has_labels and any(not 0 <= v < num_classes for v in labels):
        bad = next(v for v in labels if not 0 <= v < num_classes)
        raise DataError(f"{where}: candidate label {bad} outside the {num_classes} classes of the weights")
    # The cube cache keys on the labels too: unlabeled rows take 0 there (never read back).
    placeholders = [dataclasses.replace(c, label=c.label or 0) for c in candidates]
    source = patches.CandidateSource(placeholders, patch, cache_dir, normalization, orientation)

    @jax.jit
    def logits_of(v, x, mask):
        return model.apply(v, x[..., None], train=False, mask=mask)

    logits = []
    progress = Progress("predict", len(candidates), "candidates")
    for start in range(0, len(candidates), batch_size):
        cubes = store.decode_cubes(np.asarray(source.cubes[start:start + batch_size]))
        n = len(cubes)
        mask = np.arange(batch_size) < n
        if n < batch_size:
            cubes = np.concatenate([cubes, np.zeros((batch_size - n, *cubes.shape[1:]), cubes.dtype)])
        logits.append(np.asarray(logits_of(variables, jnp.asarray(cubes), jnp.asarray(mask)))[:n])
        progress.update(n)
    logits = np.concatenate(logits)
    y = np.asarray([v or 0 for v in labels], np.int32)
    loss, scores = (np.asarray(a) for a in losses.classification_terms(jnp.asarray(logits), jnp.asarray(y)))
    out = Path(out)
    _write_probabilities_csv(out / "probabilities.csv", candidates, scores, has_labels, base)
    report = None
    if has_labels:
        summary = classification.summarize({"loss": loss, "scores": scores, "labels": y})
        report = {"summary": {k: v for k, v in summary.items() if not k.startswith("_")},
                  "scores": summary["_scores"], "labels": summary["_labels"]}
        atomic_write_json(out / "report.json", report, indent=1)
    return {"probabilities": scores, "report": report}


def _write_probabilities_csv(path: Path, candidates: Sequence[labeled.Candidate], scores: np.ndarray,
                             has_labels: bool, base: str | os.PathLike | None) -> None:
    if scores.ndim == 1:
        columns = ["probability"]  # P(class 1), as fine-tuning scores two classes
    else:
        columns = [f"probability_class{k}" for k in range(scores.shape[1])]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["volume", "x", "y", "z", *columns, *(["label"] if has_labels else [])])
    for c, s in zip(candidates, scores, strict=True):
        volume = c.volume
        if base is not None and volume.is_relative_to(base):
            volume = volume.relative_to(base)
        values = [f"{float(v):.6g}" for v in np.atleast_1d(s)]
        writer.writerow([str(volume), *c.centre, *values, *([c.label] if has_labels else [])])
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- the stage


def output_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """`predict.output`, or `<workdir>/predict` when it is empty."""
    return Path(config.predict.output) if config.predict.output else Path(workdir) / "predict"


def run_predict(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """The predict stage: `config.predict.input` through the fine-tuned network of
    `config.predict.weights` (default `<workdir>/<finetune.run_dir>`), read as fine-tuning
    reads its data (`config.finetune`); outputs in `predict.output` (default
    `<workdir>/predict`), with `predict.json` recording what was used. Returns the report
    (empty without labels)."""
    from transvw_jax import configuration
    from transvw_jax.finetune import make_model  # the network fine-tuning trained

    configuration.validate(config, stages=("predict",))  # the inputs exist now
    f, p = config.finetune, config.predict
    workdir = Path(workdir)
    out = output_dir(config, workdir)
    weights = load_weights(config, workdir)
    _check_run_settings(weights.run_dir, f)
    num_classes = num_classes_of(weights.variables, f.task, weights.where)
    model = make_model(config, num_classes)
    variables = fit_to_model(weights.variables, model, weights.where)
    step = f" step {weights.step}" if weights.step is not None else ""
    logging.info("predict: %s weights, %d classes, from %s%s", f.task, num_classes, weights.where, step)
    record = {"task": f.task, "weights": weights.where, "step": weights.step, "num_classes": num_classes,
              "input": str(p.input), "labels": str(p.labels), "normalization": f.normalization,
              "orientation": f.orientation, "patch_shape": list(f.patch_shape)}
    if f.task == "classification":
        candidates = labeled.read_candidates(p.input, require_label=False)
        result = classify_candidates(
            model, variables, candidates, num_classes, tuple(f.patch_shape), out, workdir / "predict_cache",
            batch_size=int(f.train.batch_size), normalization=f.normalization, orientation=f.orientation,
            base=Path(p.input).parent, where=str(p.input))
        report = result["report"] or {}
        atomic_write_json(out / "predict.json", {**record, "candidates": len(candidates)}, indent=1)
        logging.info("predict: probabilities of %d candidates in %s%s", len(candidates),
                     out / "probabilities.csv", _summary_text(report.get("summary", {})))
        return report
    cases = find_scans(p.input, p.labels or None)
    report = segment_cases(
        softmax_predictor(model), cases, num_classes, tuple(f.patch_shape), out,
        overlap=f.inference.overlap, batch_size=f.inference.batch_size, normalization=f.normalization,
        blending=f.inference.blending, params=jax.device_put(variables), orientation=f.orientation,
        save_probabilities=bool(p.save_probabilities), what="predict")
    atomic_write_json(out / "predict.json", {**record, "cases": [c.name for c in cases]}, indent=1)
    means = {k: v["mean"] for k, v in report["summary"].items() if not k.endswith("class0")}
    logging.info("predict: %d masks in %s%s", len(cases), out / "masks", _summary_text(means))
    return report


def _summary_text(summary: Mapping[str, Any]) -> str:
    scores = " ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))
    return f"; {scores}" if scores else ""
