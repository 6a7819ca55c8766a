"""The stages a run executes, in the order `config.stages` lists them.

Each stage is a function (config, workdir) -> None that reads and writes only under the
workdir. `run` validates the whole config before any stage starts, so a typo fails in a
second rather than after an hour of discovery.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from transvw_jax import (
    checkpointing,
    configuration,
    discovery,
    export,
    finetune,
    multihost,
    parallel,
    predict,
    resolve,
)
from transvw_jax.fileio import atomic_write_json
from transvw_jax.models import abstract_variables, build_model, init_variables
from transvw_jax.tasks import pretraining


def _on_process_zero(stage: Callable[[ml_collections.ConfigDict, Path], None]):
    """Host-side stages run once per job: process 0 works, the others wait for it (and stop
    with its error if it fails)."""

    def run_once(config: ml_collections.ConfigDict, workdir: Path) -> None:
        multihost.once_per_job(stage.__name__, lambda: stage(config, workdir))

    run_once.__doc__ = stage.__doc__
    return run_once


def synthesize_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Write the embedded phantoms (`config.synthesize`) into `<workdir>/volumes`."""
    from transvw_jax.data import synthetic  # imports scipy.ndimage: only runs that synthesize pay for it

    s = config.synthesize
    out = workdir / "volumes"
    paths = synthetic.write_phantoms(out, s.count, shape=tuple(s.shape), seed=s.seed,
                                     spacing=tuple(s.spacing), masks=s.masks)
    logging.info("synthesize: wrote %d phantoms of %s voxels to %s", len(paths), tuple(s.shape), out)


def synthesize_labeled_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Write labeled phantoms (`config.synthesize_labeled`) as an nnU-Net raw dataset in
    `<workdir>/labeled`: images, nodule masks, dataset.json and a candidates CSV."""
    from transvw_jax.data import synthetic

    s = config.synthesize_labeled
    out = workdir / "labeled"
    synthetic.write_labeled_dataset(out, s.count, shape=tuple(s.shape), seed=s.seed, spacing=tuple(s.spacing))
    logging.info("synthesize_labeled: wrote %d labeled phantoms of %s voxels to %s", s.count, tuple(s.shape),
                 out)


def discover_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Self-discovery: `config.discovery.volumes_dir` (default `<workdir>/volumes`) -> `<workdir>/store`."""
    discovery.discover(config, workdir)


def pretrain_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Pretrain on the store in the workdir (or `config.data`), resuming from the latest checkpoint."""
    summary = pretraining.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        report = {"step": summary.step, "stopped_early": summary.stopped_early,
                  "last_train": summary.last_train, "best_eval": summary.best_eval,
                  "best_step": summary.best_step, "schedule": summary.schedule}
        atomic_write_json(workdir / "pretrain_summary.json", report, indent=2)


def finetune_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Fine-tune per `config.finetune` in `<workdir>/<finetune.run_dir>` and evaluate the best weights."""
    result = finetune.finetune(config, workdir)
    final = " ".join(f"{k} {v:.4g}" for k, v in result["final"].items())
    logging.info("finetune: %d steps; validation (best step %s): %s", result["step"], result["best_step"],
                 final)


def label_efficiency_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Fine-tune for every label fraction x init x seed of `config.experiment`; write the table."""
    finetune.label_efficiency(config, workdir)


def export_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Write `<workdir>/export/transvw.{pt,safetensors}` from the latest checkpoint."""
    model = build_model(config.model)
    key = jax.random.key(config.seed)
    like = abstract_variables(model)
    restored = checkpointing.restore_variables(workdir, like, best=True)
    if restored is not None:
        logging.info("exporting the best checkpoint by validation loss (step %d)", restored[0])
    else:
        restored = checkpointing.restore_variables(workdir, like)
    if restored is None:
        logging.warning("no checkpoint in %s: exporting a fresh initialisation (seed %d)",
                        checkpointing.checkpoint_dir(workdir), config.seed)
        variables = init_variables(model, key)
    else:
        step, variables = restored
        logging.info("exporting checkpoint step %d", step)
    head = config.export.head and "clc_out" in variables["params"]
    for fmt in config.export.formats:
        path = workdir / "export" / f"transvw.{fmt}"
        if fmt == "pt" and not _torch_available():
            logging.warning("skipping %s: .pt export needs PyTorch "
                            "(pip install 'transvw-jax[torch]')", path)
            continue
        export.save(path, variables, head=head)
        logging.info("wrote %s", path)


def predict_stage(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Segment the scans (or classify the candidates) of `config.predict.input` with the
    fine-tuned weights (`predict.weights`, default `<workdir>/<finetune.run_dir>`), read as
    fine-tuning reads its data; masks, probabilities and reports in `predict.output`."""
    predict.run_predict(config, workdir)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# The checks of every config, before any stage: `configuration.validate` (one place, one error type).
validate = configuration.validate

STAGES: dict[str, Callable[[ml_collections.ConfigDict, Path], None]] = {
    "synthesize": _on_process_zero(synthesize_stage),
    "synthesize_labeled": _on_process_zero(synthesize_labeled_stage),
    "discover": discover_stage,  # host-side phases on process 0, the auto-encoder on all
    "pretrain": pretrain_stage,
    "export": _on_process_zero(export_stage),
    "finetune": finetune_stage,
    "label_efficiency": label_efficiency_stage,
    "predict": _on_process_zero(predict_stage),  # host-side, case by case
}


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Write the config (file + overrides, automatic values resolved) to
    `<workdir>/config.json`, atomically."""
    return atomic_write_json(workdir / "config.json", json.loads(config.to_json_best_effort()), indent=2)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Validate `config`, join the job's processes, resolve the automatic values for the
    training mesh, save the config into `workdir`, then run its stages in order."""
    validate(config)
    configuration.refuse_urls({"--workdir": str(workdir)})
    if "parallel" not in config:
        with config.unlocked():
            config.parallel = parallel.default_config()
    # What an earlier run in this workdir chose, read before process 0 can overwrite it.
    recorded = resolve.recorded_values(workdir)
    mode = parallel.initialize(config.parallel)  # before anything touches a backend
    watchdog = None
    if jax.process_count() > 1:
        watchdog = multihost.Watchdog(int(config.parallel.heartbeat_timeout_s)).start()
    ok = False
    try:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        multihost.check_shared_directory(workdir.absolute(), "--workdir")
        _compilation_cache(config.parallel.get("compilation_cache", "workdir"), workdir)
        with config.unlocked():
            config.parallel.distributed = mode
        resolve.resolve_for_mesh(config, parallel.make_mesh(config.parallel.fsdp), recorded)
        if jax.process_index() == 0:
            save_config(config, workdir)
        stages = (config.stages,) if isinstance(config.stages, str) else tuple(config.stages)
        for i, name in enumerate(stages, 1):
            logging.info("stage %d/%d: %s", i, len(stages), name)
            STAGES[name](config, workdir)
        log_summary(workdir)
        ok = True
    except Exception as e:
        if watchdog is not None and multihost.may_be_a_lost_process(e):
            # A collective that failed because another process died raises before the
            # heartbeat timeout: let the watchdog name the lost process first.
            watchdog.await_verdict()
        raise
    finally:
        multihost.finish(watchdog, ok)




def _compilation_cache(setting: str, workdir: Path) -> None:
    """Turn on JAX's persistent compilation cache (see parallel.default_config)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or setting in ("off", ""):
        return
    if jax.config.jax_compilation_cache_dir:  # JAX opens its cache once per process
        return
    directory = workdir / "xla_cache" if setting == "workdir" else Path(setting)
    jax.config.update("jax_compilation_cache_dir", str(directory.absolute()))


def log_summary(workdir: Path) -> None:
    """What the run left behind: the store, the weights, the final losses."""
    if jax.process_index() != 0:
        return
    lines = []
    manifest = workdir / "store" / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        n_train, n_val = (m["splits"][s]["num_cubes"] for s in ("train", "validation"))
        lines.append(f"visual-word store: {workdir / 'store'} ({m['num_classes']} classes, "
                     f"{n_train} training + {n_val} validation cubes)")
    report = workdir / "pretrain_summary.json"
    if report.is_file():
        r = json.loads(report.read_text())
        last = " ".join(f"{k} {v:.4g}" for k, v in r["last_train"].items())
        lines.append(f"pretraining: {r['step']} steps{' (stopped early)' if r['stopped_early'] else ''}; "
                     f"last train {last}")
        if r["best_eval"]:
            best = " ".join(f"{k} {v:.4g}" for k, v in r["best_eval"].items() if not k.startswith("rec_"))
            lines.append(f"best validation (step {r['best_step']}): {best}; weights in "
                         f"{checkpointing.best_dir(workdir)}")
    for path in sorted(workdir.glob("*/finetune_summary.json")):
        r = json.loads(path.read_text())
        final = " ".join(f"{k} {v:.4g}" for k, v in r["final"].items())
        lines.append(f"fine-tuning ({r['task']}, {r['init']}): {r['step']} steps; validation {final}; "
                     f"report in {path.parent / 'eval'}")
    if (workdir / "label_efficiency.md").is_file():
        lines.append(f"label efficiency table: {workdir / 'label_efficiency.md'}")
    exports = sorted((workdir / "export").glob("transvw.*")) if (workdir / "export").is_dir() else []
    if exports:
        lines.append("exported: " + ", ".join(str(p) for p in exports))
    if lines:
        logging.info("summary:\n  %s", "\n  ".join(lines))
