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

from transvw_jax.data import store as store_lib
from transvw_jax.data import volumes
from transvw_jax.discovery import autoencoder, words
from transvw_jax.errors import ConfigError, DataError
from transvw_jax.fileio import atomic_write, atomic_write_json

STORE_DIR = "store"
MODES = ("visual_words", "random")
DISCOVERY_DIR = "discovery"


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # visual_words: TransVW self-discovery; random: Models Genesis cubes (random positions
    # that pass the air test, words.random_cubes_per_patient per patient, one class).
    c.mode = "visual_words"
    c.volumes_dir = ""  # "" = <workdir>/volumes, where the synthesize stage writes
    c.normalization = "ct"  # ct (HU window [-1000, 1000]) | percentile (MRI) | none
    c.spacing = ()  # () keeps each volume's spacing; (2.0, 2.0, 2.0) resamples to 2 mm
    c.val_fraction = 0.2  # share of the patients kept for validation instances (random split only)
    # Subset split: the volumes of folders <volumes_dir>/<subset_pattern.format(n)>; no other
    # folder is read. () = no subsets: the seeded random split of volumes_dir (also used when
    # volumes_dir holds none of the named subset folders, i.e. every scan in one folder).
    c.train_subsets = ()  # subset numbers whose patients train, e.g. (0, 1, 2, 3, 4) for LUNA16
    c.val_subsets = ()  # subset numbers whose patients validate, e.g. (5, 6)
    c.subset_pattern = "subset{}"  # folder name of subset n ({} = n), relative to volumes_dir
    # ras: reoriented to RAS+; reference: the array as stored, transposed to (X, Y, Z) as the
    # original code reads LUNA16 (the orientation the released weights saw); data/volumes.py.
    c.orientation = "ras"
    c.seed = 0
    c.autoencoder = autoencoder.default_config()
    c.words = words.default_config()
    c.store = ml_collections.ConfigDict()
    c.store.dtype = "uint16"  # uint16 | float16 | float32 (precision: data/store.py)
    c.store.records_per_shard = 1024
    return c


def volumes_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    d = config.discovery.volumes_dir
    return Path(d) if d else workdir / "volumes"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Cheap checks before any work; ConfigError names the key."""
    d = config.discovery
    if d.mode not in MODES:
        raise ConfigError(f"discovery.mode: {d.mode!r} is not one of {', '.join(MODES)}")
    if d.words.random_cubes_per_patient < 1:
        raise ConfigError("discovery.words.random_cubes_per_patient must be >= 1")
    if d.normalization not in volumes.NORMALIZATIONS:
        raise ConfigError(f"discovery.normalization: {d.normalization!r} is not one of "
                          f"{', '.join(volumes.NORMALIZATIONS)}")
    if d.spacing and (len(d.spacing) != 3 or any(s <= 0 for s in d.spacing)):
        raise ConfigError(f"discovery.spacing must be () or 3 positive sizes in mm, got {tuple(d.spacing)}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"discovery.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.orientation not in volumes.ORIENTATIONS:
        raise ConfigError(f"discovery.orientation: {d.orientation!r} is not one of "
                          f"{', '.join(volumes.ORIENTATIONS)}")
    _validate_subsets(d)
    size = tuple(d.autoencoder.size)
    if len(size) != 3 or any(s <= 0 or s % 8 for s in size):
        raise ConfigError(f"discovery.autoencoder.size must be 3 sizes divisible by 8, got {size}")
    for key in ("width", "steps", "batch_size"):
        if d.autoencoder[key] < 1:
            raise ConfigError(f"discovery.autoencoder.{key} must be >= 1, got {d.autoencoder[key]}")
    w = d.words
    if w.train_instances < 1 or w.val_instances < 0:
        raise ConfigError("discovery.words.train_instances must be >= 1 and val_instances >= 0")
    if len(w.border) != 3 or any(b < 0 for b in w.border):
        raise ConfigError(f"discovery.words.border must be 3 sizes >= 0, got {tuple(w.border)}")
    if w.max_tries < 1:
        raise ConfigError(f"discovery.words.max_tries must be >= 1, got {w.max_tries}")
    for key in ("extra_size", "extra_offset"):
        lo_hi = tuple(w[key])
        if len(lo_hi) != 2 or lo_hi[0] >= lo_hi[1]:
            raise ConfigError(f"discovery.words.{key} must be (low, high) with low < high, got {lo_hi}")
    if w.extra_size[0] < 1:
        raise ConfigError(f"discovery.words.extra_size must be positive, got {tuple(w.extra_size)}")
    if d.store.dtype not in store_lib.CUBE_DTYPES:
        raise ConfigError(f"discovery.store.dtype: {d.store.dtype!r} is not one of "
                          f"{', '.join(store_lib.CUBE_DTYPES)}")
    if d.store.records_per_shard < 1:
        raise ConfigError("discovery.store.records_per_shard must be >= 1")


def _validate_subsets(d: ml_collections.ConfigDict) -> None:
    """The subset keys: whole numbers, no subset in both splits, a pattern with one {}."""
    for key in ("train_subsets", "val_subsets"):
        numbers = tuple(d[key])
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in numbers):
            raise ConfigError(f"discovery.{key} must be subset numbers >= 0, got {numbers}")
        if len(set(numbers)) != len(numbers):
            raise ConfigError(f"discovery.{key} names a subset twice: {numbers}")
    both = sorted(set(d.train_subsets) & set(d.val_subsets))
    if both:
        raise ConfigError(f"discovery.val_subsets: subset {both[0]} is also in discovery.train_subsets")
    if d.val_subsets and not d.train_subsets:
        raise ConfigError("discovery.train_subsets is empty but discovery.val_subsets is not: "
                          "name the training subsets too")
    if d.subset_pattern.count("{}") != 1 or "/" in d.subset_pattern:
        raise ConfigError(f"discovery.subset_pattern must be one folder name holding {{}} once "
                          f"(the subset number), got {d.subset_pattern!r}")


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
    """Run self-discovery from `config.discovery` into `workdir`; returns the store path."""
    workdir = Path(workdir)
    validate_config(config)
    d = config.discovery
    cube = tuple(int(s) for s in config.data.cube_shape)
    spacing = tuple(float(s) for s in d.spacing) or None
    source = volumes_dir(config, workdir)
    files, split_of = patient_files(d, source)
    if not files:
        raise DataError(f"{source}: no volumes ({', '.join(volumes.SUFFIXES)})")

    def load_file(path: Path) -> np.ndarray:
        return volumes.load_volume(path, normalization=d.normalization, spacing=spacing, min_shape=cube,
                                   orientation=d.orientation).array

    out = workdir / DISCOVERY_DIR
    out.mkdir(parents=True, exist_ok=True)
    cache, paths, skipped = autoencoder.build_cache(files, load_file, d.autoencoder.size, out / "resized.npy")
    logging.info("discover: %d usable volumes in %s (%d skipped)", len(paths), source, len(skipped))

    @lru_cache(maxsize=2)
    def load(i: int) -> np.ndarray:
        return load_file(paths[i])

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
    if d.mode == "random":
        del cache

        def fill_random(writer: store_lib.StoreWriter) -> dict[str, int]:
            counts = words.extract_random(paths, splits, load, writer, cube, d.words, d.seed)
            # No plan to write beforehand in this mode: record what the air filter cost instead.
            atomic_write_json(out / "plan.json", {"mode": "random", **counts}, indent=1, sort_keys=True)
            return counts
        return _write_store(config, workdir, cube, 1, fill_random)
    variables = autoencoder.train_autoencoder(cache, d.autoencoder, out / "autoencoder")
    embeddings = autoencoder.embed(cache, variables, d.autoencoder.width)
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
    return _write_store(config, workdir, cube, config.model.num_classes, lambda writer: {
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
