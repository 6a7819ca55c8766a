"""Fine-tuning data: the case split, the label fraction, and the patch / candidate sources."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np

from transvw_jax.data import labeled, patches
from transvw_jax.errors import ConfigError
from transvw_jax.fileio import atomic_write_json

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
