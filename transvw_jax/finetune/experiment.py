"""The label-efficiency grid: fine-tune for every (label fraction, init, seed), then a table
of mean +- sd over seeds."""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path

import jax
import ml_collections

from transvw_jax import configuration, evaluation
from transvw_jax.fileio import atomic_write_json, atomic_write_text
from transvw_jax.finetune import run


def label_efficiency(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Fine-tune for every (label fraction, init, seed) of `config.experiment`, each in
    `<workdir>/label_efficiency/<init>_f<fraction>_s<seed>` (finished runs are skipped, an
    interrupted one resumes), and write the table of mean +- sd over seeds to
    `<workdir>/label_efficiency.{json,md}`."""
    workdir = Path(workdir)
    configuration.validate(config, stages=("label_efficiency",))
    e = config.experiment
    metric = e.metric or ("dice_class1" if config.finetune.task == "segmentation" else "auc")
    results: dict[str, dict] = {}
    # Every grid point has one architecture and optimiser: compile once (by class count).
    make_run = functools.cache(functools.partial(run.build_run, config))
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
                results[name] = run.finetune(c, workdir, run_dir, make_run=make_run)
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
