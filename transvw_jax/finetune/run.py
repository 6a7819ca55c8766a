"""One fine-tuning run: data, initialisation, the task on the training engine, and the
whole-volume evaluation of the best weights.

- segmentation (`tasks.segmentation`): patches with foreground oversampling, validation on
  fixed patches, then sliding-window inference of the best weights over every whole
  validation case (masks as NIfTI with the input's affine, overlays, Dice/IoU report).
- classification (`tasks.classification`): candidate cubes; AUC and accuracy.

Initialisation `scratch` or `pretrained` (`transfer`); what was loaded is written to
`<run>/pretrained.json`. `freeze_encoder` trains everything but the encoder.
Defaults follow the reference's fine-tuning (docs/REFERENCE.md section 5): Adam 1e-3,
early stopping with patience 15 evaluations, 64x64x32 inputs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from transvw_jax import checkpointing, configuration, parallel, predict, training
from transvw_jax.data import loader
from transvw_jax.errors import ConfigError
from transvw_jax.fileio import atomic_write_json
from transvw_jax.finetune.data import Data
from transvw_jax.finetune.transfer import read_pretrained, transfer
from transvw_jax.tasks import classification, segmentation

# --------------------------------------------------------------------------- a run


def make_task(config: ml_collections.ConfigDict, num_classes: int, mesh) -> training.Task:
    module = segmentation if config.finetune.task == "segmentation" else classification
    return module.make_task(config, num_classes, mesh)


def make_model(config: ml_collections.ConfigDict, num_classes: int):
    """The downstream network: UNet3D (logits per class) or EncoderClassifier."""
    module = segmentation if config.finetune.task == "segmentation" else classification
    return module.make_model(config.model, num_classes)


def build_run(config: ml_collections.ConfigDict, num_classes: int, mesh=None) -> training.Run:
    """The task, optimiser and compiled steps of a fine-tuning run (reusable across runs
    that differ only in data subset, initialisation and seed)."""
    f = config.finetune
    mesh = mesh or parallel.make_mesh(config.parallel.fsdp)
    task = make_task(config, num_classes, mesh)
    return training.place(task, training.make_optimizer(f.train, task.frozen), mesh)


def evaluate(run: training.Run, variables, source, config: ml_collections.ConfigDict) -> dict:
    """One pass over `source`: segmentation loss and Dice per class on patches, or
    classification loss, accuracy and AUC (and the raw scores under "_scores")."""
    f = config.finetune
    ds = loader.eval_dataset(source, batch_size=parallel.local_batch_size(f.train.batch_size, run.mesh,
                                                                          "finetune.train.batch_size"),
                             num_threads=config.data.num_threads)
    return run.evaluate(variables, ds, jax.random.key_data(jax.random.key(0)))


def _host_metrics(ev: dict) -> dict[str, float]:
    return {k: v for k, v in ev.items() if not k.startswith("_")}


def finetune(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    run_dir: str | Path | None = None,
    make_run: Callable[[int], training.Run] | None = None,
) -> dict:
    """Fine-tune per `config.finetune` in `run_dir` (default `<workdir>/<finetune.run_dir>`),
    resuming from its latest checkpoint; evaluate the best weights; return the summary
    (also written to `<run>/finetune_summary.json`). `make_run(num_classes)` supplies the
    compiled task (default `build_run`; a grid of runs passes a cached one)."""
    configuration.validate(config, stages=("finetune",))
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

    def init() -> training.TrainState:
        if f.init == "scratch":
            return run.init(t.seed)
        source, pretrained = read_pretrained(f.pretrained or workdir)
        fresh = jax.device_get(run.init(t.seed).variables)
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
        return run.init(t.seed, loaded)

    summary = training.fit(
        run, t, config.data, run_dir, train_source=data.train, config_section="finetune.train",
        evaluate=lambda v: _host_metrics(evaluate(run, v, data.validation, config)), init=init)
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


def final_evaluation(config: ml_collections.ConfigDict, run: training.Run, data: Data, run_dir: Path) -> dict:
    """Score the best checkpoint on the validation split: whole volumes for segmentation
    (report, masks and overlays in `<run>/eval/`), every candidate for classification."""
    f = config.finetune
    _, _, variables = checkpointing.read_stored_variables(run_dir)
    out_dir = run_dir / "eval"
    if f.task == "classification":
        ev = evaluate(run, run.place_variables(variables), data.validation, config)
        report = {"summary": _host_metrics(ev), "scores": ev["_scores"], "labels": ev["_labels"]}
        if jax.process_index() == 0:
            atomic_write_json(out_dir / "report.json", report, indent=1)
        return report["summary"]
    final = {}
    if jax.process_index() == 0:  # host-side, per case: one process scores, the others wait
        report = predict.segment_cases(
            predict.softmax_predictor(run.model),
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
