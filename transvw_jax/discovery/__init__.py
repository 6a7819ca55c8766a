"""Self-discovery: volumes -> auto-encoder embeddings -> visual words -> a visual-word store.

`discover(config, workdir)` runs the whole first half of TransVW and leaves under the
workdir:
  discovery/resized.npy                   the volumes resized for the auto-encoder (float16)
  discovery/autoencoder/checkpoints/      the auto-encoder (Orbax)
  discovery/embeddings.npy, patients.json one embedding per patient, the patient list + split
  discovery/plan.json                     per class: reference, coordinate, nearest patients;
                                          the references redrawn (random mode: the cubes skipped)
  store/                                  the visual-word store (data/store.py)
Patients are split into training and validation once: by subset folders where the config
names them (`discovery.train_subsets` / `val_subsets`: LUNA16's subset0..subset9, as Models
Genesis pretrains on subsets 0-4, validates on 5-6 and never reads the downstream test folds
7-9), else by a seeded random draw of `val_fraction`; classes draw their references from the
training patients. With `discovery.mode="random"` (Models Genesis)
there is no auto-encoder and no classes: up to `words.random_cubes_per_patient` cubes at
random positions that pass the air test, label 0.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import ml_collections
import numpy as np

from transvw_jax import configuration, multihost
from transvw_jax.data import store as store_lib
from transvw_jax.data import volumes
from transvw_jax.discovery import autoencoder, words
from transvw_jax.errors import ConfigError, DataError
from transvw_jax.fileio import atomic_write, atomic_write_json

STORE_DIR = "store"
DISCOVERY_DIR = "discovery"
RESIZED = "resized.npy"  # the volumes resized for the auto-encoder, under DISCOVERY_DIR


def volumes_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    d = config.discovery.volumes_dir
    return Path(d) if d else workdir / "volumes"


def subset_folders(d: ml_collections.ConfigDict, source: Path) -> dict[str, list[Path]]:
    """The folders of `d.train_subsets` / `d.val_subsets` under `source`, per split.

    Empty when the config names no subsets or `source` holds none of the named folders (all
    scans in one folder: the random split applies). Raises ConfigError, naming the key and
    the folder, when only some of them exist: a typo or a half-copied dataset must not
    silently train on fewer patients.
    """
    named = {"train_subsets": tuple(d.train_subsets), "val_subsets": tuple(d.val_subsets)}
    folders = {key: [source / d.subset_pattern.format(n) for n in numbers] for key, numbers in named.items()}
    every = [f for fs in folders.values() for f in fs]
    if not any(f.is_dir() for f in every):
        if every:
            logging.warning("discover: %s holds none of the subset folders %s: random split of its volumes "
                            "(discovery.val_fraction)", source, ", ".join(f.name for f in every))
        return {}
    for key, fs in folders.items():
        for f in fs:
            if not f.is_dir():
                raise ConfigError(f"discovery.{key}: no folder {f}")
    return {words.TRAIN: folders["train_subsets"], words.VALIDATION: folders["val_subsets"]}


def patient_files(d: ml_collections.ConfigDict, source: Path) -> tuple[list[Path], dict[Path, str] | None]:
    """The volume files discovery reads and, for a subset split, each file's split.

    With subsets only their folders are listed, so scans of other subsets (LUNA16's test
    folds) are never opened, not even to be checked; otherwise the files of `source`, whose
    split `split_patients` draws (None).
    """
    folders = subset_folders(d, source)
    if not folders:
        return volumes.list_volume_files(source), None
    split_of = {p: split for split, fs in folders.items() for f in fs for p in volumes.list_volume_files(f)}
    return list(split_of), split_of


def split_patients(count: int, val_fraction: float, seed: int) -> list[str]:
    """'train' / 'validation' per patient: a seeded draw of round(val_fraction * count) patients."""
    n_val = int(round(val_fraction * count))
    if val_fraction > 0 and n_val == 0 and count > 1:
        n_val = 1
    val = set(np.random.default_rng([seed, 2]).choice(count, size=n_val, replace=False).tolist())
    return [words.VALIDATION if i in val else words.TRAIN for i in range(count)]


def discover(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """Run self-discovery from `config.discovery` into `workdir`; returns the store path.

    Every process of the job calls this: the host-side phases (reading and resizing the
    volumes; embedding, planning and writing the store) run on process 0 while the others
    wait, and the auto-encoder trains on all of them (`autoencoder.train_autoencoder`).
    """
    workdir = Path(workdir)
    configuration.validate(config, stages=("discover",))
    out = workdir / DISCOVERY_DIR
    multihost.once_per_job("discover/volumes", lambda: _read_volumes(config, workdir))
    if config.discovery.mode == "random":
        multihost.once_per_job("discover/store", lambda: _random_store(config, workdir))
        return workdir / STORE_DIR
    d = config.discovery
    # Before the auto-encoder's training (hours at the reference size), not after it.
    words.check_class_count(config.model.num_classes, _patients(config, workdir)[1])
    cache = np.load(out / RESIZED, mmap_mode="r")
    variables = autoencoder.train_autoencoder(cache, d.autoencoder, out / "autoencoder", model=config.model,
                                              data=config.get("data"))
    del cache
    multihost.once_per_job("discover/words", lambda: _visual_words(config, workdir, variables))
    return workdir / STORE_DIR


def _loader(config: ml_collections.ConfigDict):
    """path -> the normalised volume array, as every phase reads it."""
    d = config.discovery
    cube = tuple(int(s) for s in config.data.cube_shape)
    spacing = tuple(float(s) for s in d.spacing) or None

    def load_file(path: Path) -> np.ndarray:
        return volumes.load_volume(path, normalization=d.normalization, spacing=spacing, min_shape=cube,
                                   orientation=d.orientation).array

    return load_file


def _read_volumes(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """List the volumes, resize the usable ones into `resized.npy`, split the patients and
    record them in `patients.json` (what the later phases read)."""
    d = config.discovery
    source = volumes_dir(config, workdir)
    files, split_of = patient_files(d, source)
    if not files:
        raise DataError(f"{source}: no volumes ({', '.join(volumes.SUFFIXES)})")
    out = workdir / DISCOVERY_DIR
    out.mkdir(parents=True, exist_ok=True)
    cache, paths, skipped = autoencoder.build_cache(files, _loader(config), d.autoencoder.size, out / RESIZED)
    del cache
    logging.info("discover: %d usable volumes in %s (%d skipped)", len(paths), source, len(skipped))
    if split_of is None:
        splits = split_patients(len(paths), d.val_fraction, d.seed)
        split_by = {"random": {"val_fraction": float(d.val_fraction), "seed": int(d.seed)}}
    else:
        splits = [split_of[p] for p in paths]
        split_by = {"subsets": {words.TRAIN: list(d.train_subsets), words.VALIDATION: list(d.val_subsets),
                                "pattern": d.subset_pattern}}
    atomic_write_json(out / "patients.json", {"patients": [str(p) for p in paths], "splits": splits,
                                              "skipped": [[str(p), why] for p, why in skipped],
                                              "split_by": split_by, "orientation": d.orientation},
                      indent=1, sort_keys=True)


def _patients(config: ml_collections.ConfigDict, workdir: Path):
    """(paths, splits, load(i)) of the usable patients `_read_volumes` recorded."""
    record = json.loads((workdir / DISCOVERY_DIR / "patients.json").read_text())
    paths = [Path(p) for p in record["patients"]]
    load_file = _loader(config)

    @lru_cache(maxsize=2)
    def load(i: int) -> np.ndarray:
        return load_file(paths[i])

    return paths, record["splits"], load


def _random_store(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Models Genesis: cubes at random positions that pass the air test, label 0."""
    d = config.discovery
    cube = tuple(int(s) for s in config.data.cube_shape)
    paths, splits, load = _patients(config, workdir)

    def fill_random(writer: store_lib.StoreWriter) -> dict[str, int]:
        counts = words.extract_random(paths, splits, load, writer, cube, d.words, d.seed)
        # No plan to write beforehand in this mode: record what the air filter cost instead.
        atomic_write_json(workdir / DISCOVERY_DIR / "plan.json", {"mode": "random", **counts}, indent=1,
                          sort_keys=True)
        return counts

    _write_store(config, workdir, cube, 1, fill_random)


def _visual_words(config: ml_collections.ConfigDict, workdir: Path, variables: dict) -> None:
    """Embed every patient, plan the visual words and write them into the store."""
    d = config.discovery
    out = workdir / DISCOVERY_DIR
    cube = tuple(int(s) for s in config.data.cube_shape)
    paths, splits, load = _patients(config, workdir)
    cache = np.load(out / RESIZED, mmap_mode="r")
    embeddings = autoencoder.embed(cache, variables, d.autoencoder.width, model=config.model)
    del cache
    atomic_write(out / "embeddings.npy", lambda tmp: np.save(tmp, embeddings), suffix=".tmp.npy")

    plan = words.plan_words(embeddings, splits, load, config.model.num_classes, cube, d.words, d.seed)
    atomic_write_json(out / "plan.json", {
        "references": plan.references.tolist(),
        "coordinates": plan.coordinates.tolist(),
        "neighbours": {k: v.tolist() for k, v in plan.neighbours.items()},
        "redrawn_references": plan.redrawn.tolist(),
        "reference_redraws": len(plan.redrawn),
    }, indent=1, sort_keys=True)
    _write_store(config, workdir, cube, config.model.num_classes, lambda writer: {
        **words.extract(plan, paths, load, writer, cube), "reference_redraws": len(plan.redrawn)})


def _write_store(config: ml_collections.ConfigDict, workdir: Path, cube: tuple[int, ...], num_classes: int,
                 fill) -> Path:
    d = config.discovery
    store_path = workdir / STORE_DIR
    with store_lib.StoreWriter(store_path, cube_shape=cube, dtype=d.store.dtype,
                               records_per_shard=d.store.records_per_shard) as writer:
        counts = fill(writer)
        writer.commit(num_classes=num_classes,
                      config={"discovery": json.loads(d.to_json_best_effort()), "cube_shape": list(cube)},
                      seeds={"discovery": int(d.seed), "autoencoder": int(d.autoencoder.seed)})
    # What the air filter cost (references redrawn, cubes skipped) goes in the summary line too.
    extra = "".join(f", {k}={v}" for k, v in sorted(counts.items())
                    if k not in (words.TRAIN, words.VALIDATION))
    logging.info("discover: wrote %s: %d classes, %d training + %d validation cubes%s", store_path,
                 num_classes, counts[words.TRAIN], counts[words.VALIDATION], extra)
    return store_path
